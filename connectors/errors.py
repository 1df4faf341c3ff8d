"""Errors that name the file, the item and what is wrong.

Two kinds of failure exist in labeltriage:

* :class:`InputError` — one piece of input is bad (a malformed XML file, a box outside
  its image, a path that escapes the project).  Readers never let it stop a stream: the
  offending item is yielded with ``Item.error`` set.
* :class:`UsageError` — the user asked for something impossible (unknown format, missing
  option).  The CLI turns it into exit code 2 with a one-line message.
"""

from __future__ import annotations


class LabelTriageError(Exception):
    """Base class of every error raised on purpose by labeltriage."""


class UsageError(LabelTriageError):
    """Bad usage or bad configuration (CLI exit code 2)."""


class InputError(LabelTriageError):
    """One piece of input is bad.

    The message always reads ``FILE[:LINE][: item ITEM]: WHAT`` so a person can find it.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        item: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.item = item
        self.line = line
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.file or "<input>"
        if self.line is not None:
            where += f":{self.line}"
        if self.item is not None:
            where += f": item {self.item!r}"
        return f"{where}: {self.message}"


class PathEscapeError(InputError):
    """A path would leave the project root."""


class HumanLabelConflict(LabelTriageError):
    """A write would replace or delete a human label; it was refused."""


class VersionConflict(LabelTriageError):
    """A compare-and-swap write found the file changed since it was read; nothing was written."""


class UnsafeWriteRefused(UsageError):
    """The storage offers no atomic conditional write that this write needs; it was refused."""

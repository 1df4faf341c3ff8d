"""Shared machinery of the one-JSON-file formats (COCO, Label Studio export).

* :func:`load_json` parses a file and turns a syntax error into an :class:`InputError`
  naming the file, line and column;
* :func:`find_json` finds a project's JSON file by convention;
* :func:`rewrite_json` is the read-modify-write used by write-back, a compare-and-swap on
  the file's version: it reads the file with its version, applies a change, and replaces
  the file only if it still has that version (:meth:`ProjectFS.replace_if`: an atomic
  exchange checked afterwards on a local disk, ``If-Match: ETag`` on S3); if someone
  saved meanwhile, the change is redone on their content, so their save is never lost
  and the human-label check runs on the content that is written.  Storages without
  such a primitive refuse the write and say why;
* :func:`entries_sha256` is the checksum of written entries that ``remove_written``
  compares to tell an untouched auto-label from one a person edited;
* :class:`JsonFileFormat` is the base of such formats: locating and detecting the file,
  items that could not be read, and undoing written entries.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import posixpath
import random
import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from connectors.errors import InputError, LabelTriageError, UsageError, VersionConflict
from connectors.formats._entries import RemovesEntries, records_by_file
from connectors.formats.base import ProjectFormat, WrittenRecord
from connectors.model import Item, ItemStatus
from connectors.storage import ProjectFS

log = logging.getLogger(__name__)

T = TypeVar("T")
REWRITE_ATTEMPTS = 50


def parse_json(raw: bytes, url: str) -> Any:
    """Parse ``raw``; a syntax error names ``url``, the line and the column."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text: {exc}", file=url) from exc
    except json.JSONDecodeError as exc:
        raise InputError(
            f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            file=url,
            line=exc.lineno,
        ) from exc


def load_json(project: ProjectFS, rel: str) -> tuple[Any, bytes]:
    """The parsed content of ``rel`` and its raw bytes."""
    url = project.url_of(rel)
    try:
        raw = project.read_bytes(rel)
    except FileNotFoundError as exc:
        raise InputError("file not found", file=url) from exc
    return parse_json(raw, url), raw


def dump_json(data: Any, *, indent: int | None = None) -> bytes:
    return json.dumps(data, ensure_ascii=False, indent=indent).encode("utf-8")


def entries_sha256(entries: list[Any]) -> str:
    """Checksum of JSON entries (key order does not matter)."""
    return hashlib.sha256(
        json.dumps(entries, sort_keys=True, separators=(",", ":")).encode("utf-8")
    ).hexdigest()


def json_candidates(project: ProjectFS, folder: str = ".") -> list[str]:
    """Visible ``*.json`` files directly inside ``folder`` (relative paths)."""
    names = [
        n for n in project.listdir(folder) if n.lower().endswith(".json") and not n.startswith(".")
    ]
    return [n if folder == "." else posixpath.join(folder, n) for n in names]


def find_json(
    project: ProjectFS, *, preferred: tuple[str, ...], folders: tuple[str, ...], what: str
) -> str | None:
    """The project's JSON file: the first of ``preferred`` that exists, else the only
    ``*.json`` in the first of ``folders`` that has any; ``None`` when there is none.

    Raises :class:`UsageError` when a folder holds several candidates (pass ``file=``).
    """
    for name in preferred:
        if project.exists(name):
            return name
    for folder in folders:
        if folder != "." and not project.isdir(folder):
            continue
        found = json_candidates(project, folder)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UsageError(
                f"{project.url}: several JSON files could be the {what} ({', '.join(found)}); choose one with the file option"
            )
    return None


def peek(project: ProjectFS, rel: str, size: int = 65536) -> str:
    """The first ``size`` bytes of ``rel`` as text (for cheap format detection)."""
    with project.open(rel, "rb") as f:
        return f.read(size).decode("utf-8", errors="replace")


class ConcurrentEditError(LabelTriageError):
    """The file kept changing while it was being rewritten; nothing was written."""


def rewrite_json(
    project: ProjectFS,
    rel: str,
    change: Callable[[Any], tuple[bool, T]],
    *,
    indent: int | None = None,
) -> T:
    """Read ``rel``, apply ``change`` to the parsed data, write the result atomically.

    ``change(data)`` edits ``data`` in place and returns ``(modified, result)``; when
    ``modified`` is false nothing is written.  The write is a compare-and-swap on the
    version read: if the file changed meanwhile (a person saved it), the whole step is
    redone from the new content, so the human-label check inside ``change`` sees that
    edit and the edit is kept.  Raises :class:`ConcurrentEditError` when the file keeps
    changing for :data:`REWRITE_ATTEMPTS` attempts (nothing written), and
    :class:`~connectors.errors.UnsafeWriteRefused` on storage without compare-and-swap.
    """
    url = project.url_of(rel)
    for attempt in range(REWRITE_ATTEMPTS):
        try:
            raw, version = project.read_versioned(rel)
        except FileNotFoundError as exc:
            raise InputError("file not found", file=url) from exc
        data = parse_json(raw, url)
        modified, result = change(data)
        if not modified:
            return result
        try:
            project.replace_if(rel, dump_json(data, indent=indent), version)
        except VersionConflict:
            log.info(
                "%s changed while it was being updated; redoing the update (attempt %d)",
                url,
                attempt + 1,
            )
            time.sleep(random.uniform(0.0, 0.002 * (attempt + 1)))
            continue
        return result
    raise ConcurrentEditError(
        f"{url}: the file kept changing during {REWRITE_ATTEMPTS} attempts to update it; nothing was written"
    )


def json_int(value: Any) -> int | None:
    """An integer JSON value (``3`` or ``3.0``) as ``int``; anything else (bools too) → ``None``."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def problems_error(problems: list[str], url: str, item_id: str) -> str | None:
    """The ``error`` of item ``item_id`` of ``url`` with ``problems`` (``None`` without any)."""
    if not problems:
        return None
    return str(InputError("; ".join(problems), file=url, item=item_id))


class JsonFileFormat(RemovesEntries, ProjectFormat):
    """A project stored in one JSON file (the ``file`` option, else :meth:`find_file`).

    Subclasses say how to find the file, what its start looks like, and how to take
    written entries out of the parsed content; removal re-reads and rewrites the file
    atomically (:func:`rewrite_json`).
    """

    title: ClassVar[str]
    """The format's name in messages (``COCO``, ``Label Studio``)."""
    missing: ClassVar[str]
    """What was looked for, said when no file is found."""
    json_indent: ClassVar[int | None] = None

    def __init__(self, project: ProjectFS, **options: Any) -> None:
        super().__init__(project, **options)
        self._file: str | None = str(options["file"]) if options.get("file") else None

    @staticmethod
    @abc.abstractmethod
    def find_file(project: ProjectFS) -> str | None:
        """The project's JSON file by convention (``None`` when there is none)."""

    @classmethod
    @abc.abstractmethod
    def looks_like(cls, head: str) -> bool:
        """True when ``head``, the start of the file without leading blanks, is this format."""

    @property
    def file(self) -> str:
        """The JSON file, relative to the project root."""
        if self._file is None:
            found = self.find_file(self.project)
            if found is None:
                raise UsageError(f"{self.project.url}: {self.missing}")
            self._file = found
        return self._file

    @property
    def url(self) -> str:
        return self.project.url_of(self.file)

    def write_targets(self, item_ids: Any) -> list[str]:
        """Files a write-back rewrites (recovery looks for temporaries next to them)."""
        return [self.file] if self.has_file() else []

    def has_file(self) -> bool:
        """True when the file is named or can be found."""
        return self._file is not None or self.find_file(self.project) is not None

    file_suffixes = (".json",)
    opens_with: ClassVar[bytes]
    """The first character of the JSON (``{`` an object, ``[`` a list)."""

    @classmethod
    def detect_file(cls, project: ProjectFS, name: str) -> bool:
        if not super().detect_file(project, name):
            return False
        with project.open(name, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return head.startswith(cls.opens_with)

    @classmethod
    def detect(cls, project: ProjectFS) -> bool:
        try:
            rel = cls.find_file(project)
        except UsageError:
            return False
        if rel is None:
            return False
        return cls.looks_like(peek(project, rel).lstrip())

    def invalid_item(
        self, item_id: str, uri: str, message: str, status: ItemStatus = ItemStatus.UNLABELED
    ) -> Item:
        """An item that could not be read (``error`` names the file and item; logged)."""
        err = InputError(message, file=self.url, item=item_id)
        log.warning("%s", err)
        return Item(
            item_id=item_id, uri=uri, status=status, meta={"error_file": self.url}, error=str(err)
        )

    def item_error(self, problems: list[str], item_id: str, meta: dict[str, Any]) -> str | None:
        """The ``error`` of an item read with ``problems`` (logged; ``meta`` gets the file)."""
        error = problems_error(problems, self.url, item_id)
        if error is not None:
            log.warning("%s", error)
            meta["error_file"] = self.url
        return error

    @abc.abstractmethod
    def drop_entries(
        self, data: Any, records: list[WrittenRecord], positions: list[int]
    ) -> tuple[bool, list[tuple[int, str | None]]]:
        """Take the entries of ``records[i]`` (``i`` in ``positions``) out of the parsed
        ``data`` where they are unchanged; ``(modified, [(i, None or why kept)])``."""

    def remove_written_each(self, records: list[WrittenRecord]) -> list[str | None]:
        """Remove written entries whose content is unchanged; ``None`` = removed, else why kept."""
        outcome, by_path = records_by_file(
            self.project,
            records,
            lambda r: None if r.kind == "entry" else f"not a {self.title} entry record ({r.kind})",
        )
        for path, positions in by_path.items():

            def change(
                data: Any, positions: list[int] = positions
            ) -> tuple[bool, list[tuple[int, str | None]]]:
                return self.drop_entries(data, records, positions)

            for i, why in rewrite_json(self.project, path, change, indent=self.json_indent):
                outcome[i] = why
        return outcome

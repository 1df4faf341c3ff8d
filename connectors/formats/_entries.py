"""Undoing entries written inside shared files (COCO JSON, Label Studio export, manifest
overlays): the record of a write and the grouping of records by file for removal."""

from __future__ import annotations

import abc
from collections import defaultdict
from collections.abc import Callable

from connectors.formats.base import WrittenRecord
from connectors.storage import ProjectFS


def entry_record(path: str, item_id: str, sha256: str, entry_ids: list[str]) -> WrittenRecord:
    """The record of entries ``entry_ids`` of ``item_id`` added inside the file ``path``."""
    return WrittenRecord(
        kind="entry", path=path, item_id=item_id, sha256=sha256, entry_ids=entry_ids
    )


def records_by_file(
    project: ProjectFS,
    records: list[WrittenRecord],
    refuse: Callable[[WrittenRecord], str | None],
) -> tuple[list[str | None], dict[str, list[int]]]:
    """Group ``records`` by the file they were written into, for removal.

    Returns the outcome per record and, per existing file, the positions of its records.
    A record ``refuse`` gives a reason for, or whose file no longer exists, has that
    reason as its outcome; the others have ``None`` (to be filled by the removal).
    """
    outcome: list[str | None] = [None] * len(records)
    by_path: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        why = refuse(r)
        if why is not None:
            outcome[i] = why
        else:
            by_path[r.path].append(i)
    for path in list(by_path):
        if not project.exists(path):
            for i in by_path.pop(path):
                outcome[i] = f"{path} no longer exists"
    return outcome, dict(by_path)


class RemovesEntries(abc.ABC):
    """A format that undoes its records with one outcome per record."""

    @abc.abstractmethod
    def remove_written_each(self, records: list[WrittenRecord]) -> list[str | None]:
        """For each record, ``None`` when removed, else why it was kept."""

    def remove_written(self, records: list[WrittenRecord]) -> list[str]:
        """Why each record that was kept was kept (``ITEM: WHY``)."""
        return [
            f"{r.item_id}: {why}"
            for r, why in zip(records, self.remove_written_each(records), strict=True)
            if why is not None
        ]

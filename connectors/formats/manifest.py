"""The ``manifest`` format: a project stored as one Parquet table (the internal form).

The table has :data:`connectors.manifest.ITEM_SCHEMA` (file ``manifest.parquet`` by
default, the ``file`` option otherwise) and is read and written in bounded memory.

Write-back does **not** rewrite the manifest.  Each :meth:`ManifestFormat.write_labels`
call writes one small overlay table of auto-labels,
``.labeltriage/manifest-auto/<run_id>-<random>.parquet`` (columns ``item_id``,
``annotations``, ``run_id``, ``model_version``, ``tier``, ``score``, ``provenance``), with
an exclusive atomic create.  Reading merges the overlays: an item whose manifest row has
no label and that has an overlay row is ``auto_labeled`` (source auto) with the overlay's
annotations; a row with a human label always wins (the overlay row is then ignored).
Rollback deletes overlay rows (and empty overlay files) and never touches the manifest,
so whatever a person put in the manifest survives.  The overlays of all runs are held in
memory while reading (one entry per auto-labeled item, small next to the manifest).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from connectors.errors import InputError
from connectors.formats._entries import RemovesEntries, entry_record, records_by_file
from connectors.formats._jsonfile import entries_sha256
from connectors.formats.base import FORMATS, LabelWrite, ProjectFormat, WriteOutcome, WrittenRecord
from connectors.manifest import (
    ANNOTATION_TYPE,
    MANIFEST_NAME,
    iter_manifest_batches,
    iter_manifest_items,
    write_manifest,
)
from connectors.model import (
    AnnotationSource,
    Item,
    ItemStatus,
    annotation_from_row,
    annotation_to_row,
)
from connectors.storage import BOOKKEEPING_DIR, ProjectFS

log = logging.getLogger(__name__)

OVERLAY_DIR = f"{BOOKKEEPING_DIR}/manifest-auto"

OVERLAY_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("annotations", pa.list_(ANNOTATION_TYPE)),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model_version", pa.string()),
        pa.field("tier", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("provenance", pa.string()),
    ]
)
"""Schema of an auto-label overlay table (one row per auto-labeled item)."""


def _row_sha(row: dict[str, Any]) -> str:
    return entries_sha256([row])


def _table_bytes(rows: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=OVERLAY_SCHEMA), buf)
    return buf.getvalue()


@FORMATS.register("manifest")
class ManifestFormat(RemovesEntries, ProjectFormat):
    """A Parquet manifest plus auto-label overlays (see the module docstring).

    Options: ``file`` (the manifest, relative to the root; default ``manifest.parquet``).
    """

    name = "manifest"
    tasks = ("detection", "classification")
    detect_priority = 10
    looked_for = "a Parquet manifest"
    file_suffixes = (".parquet",)

    def __init__(self, project: ProjectFS, **options: Any) -> None:
        super().__init__(project, **options)
        self.file = str(options.get("file") or MANIFEST_NAME)

    @classmethod
    def detect(cls, project: ProjectFS) -> bool:
        return project.exists(MANIFEST_NAME)

    # -- overlays ------------------------------------------------------------------------
    def overlay_files(self) -> list[str]:
        return [
            f"{OVERLAY_DIR}/{n}"
            for n in self.project.listdir(OVERLAY_DIR)
            if n.endswith(".parquet") and not n.startswith(".")
        ]

    def _read_overlay(self, rel: str) -> list[dict[str, Any]]:
        try:
            return pq.read_table(
                io.BytesIO(self.project.read_bytes(rel)), schema=OVERLAY_SCHEMA
            ).to_pylist()
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(
                f"unreadable auto-label overlay: {exc}", file=self.project.url_of(rel)
            ) from exc

    def overlay_index(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """``item_id -> (overlay file, row)`` over every overlay (the newest run wins)."""
        index: dict[str, tuple[str, dict[str, Any]]] = {}
        for rel in sorted(self.overlay_files()):
            for row in self._read_overlay(rel):
                index[row["item_id"]] = (rel, row)
        return index

    # -- reading -------------------------------------------------------------------------
    def iter_items(self) -> Iterator[Item]:
        overlay = self.overlay_index()
        for item in iter_manifest_items(self.project, self.file):
            hit = overlay.get(item.item_id)
            if hit is None or item.error is not None:
                yield item
            elif item.is_labeled:
                if item.has_human_label:
                    log.debug(
                        "item %r has a human label; its auto-label from run %s is ignored",
                        item.item_id,
                        hit[1]["run_id"],
                    )
                yield item
            else:
                row = hit[1]
                prov = (
                    json.loads(row["provenance"])
                    if row.get("provenance")
                    else {"run_id": row["run_id"]}
                )
                yield item.model_copy(
                    update={
                        "status": ItemStatus.AUTO_LABELED,
                        "source": AnnotationSource.AUTO,
                        "annotations": [annotation_from_row(a) for a in row["annotations"] or []],
                        "meta": {
                            **item.meta,
                            "auto_label": {"run_id": row["run_id"], "provenance": prov},
                        },
                    }
                )

    def write_items(self, items: Iterable[Item], classes: list[str] | None = None) -> None:
        """Write ``items`` as the manifest (streaming, atomic). ``classes`` is not needed."""
        write_manifest(items, self.project, self.file)

    # -- write-back ----------------------------------------------------------------------
    def _current_status(self, item_ids: set[str]) -> dict[str, tuple[str, str | None]]:
        """``item_id -> (status, source)`` for ``item_ids``, read from the manifest now."""
        found: dict[str, tuple[str, str | None]] = {}
        for batch in iter_manifest_batches(
            self.project, self.file, columns=["item_id", "status", "source"]
        ):
            cols = batch.to_pydict()
            for item_id, status, source in zip(
                cols["item_id"],
                cols["status"],
                cols.get("source", [None] * batch.num_rows),
                strict=True,
            ):
                if item_id in item_ids:
                    found[item_id] = (status, source)
        return found

    def write_labels(self, writes: list[LabelWrite]) -> WriteOutcome:
        """Write one overlay table for the writes whose items have no label *now*."""
        outcome = WriteOutcome()
        if not writes:
            return outcome
        current = self._current_status({w.item.item_id for w in writes})
        overlay = self.overlay_index()
        rows: list[dict[str, Any]] = []
        for w in writes:
            item_id = w.item.item_id
            if item_id not in current:
                outcome.refused[item_id] = f"not in {self.project.url_of(self.file)}"
            elif current[item_id][0] != ItemStatus.UNLABELED.value:
                status, source = current[item_id]
                outcome.refused[item_id] = (
                    f"is {status} ({source or 'human'}) in the manifest at write time"
                )
            elif item_id in overlay:
                outcome.refused[item_id] = (
                    f"already auto-labeled by run {overlay[item_id][1]['run_id']}"
                )
            elif any(r["item_id"] == item_id for r in rows):
                outcome.refused[item_id] = "written twice in one batch"
            else:
                p = w.provenance
                rows.append(
                    {
                        "item_id": item_id,
                        "annotations": [annotation_to_row(a) for a in w.annotations],
                        "run_id": p.run_id,
                        "model_version": p.model_version,
                        "tier": p.tier,
                        "score": p.score,
                        "provenance": p.model_dump_json(),
                    }
                )
        if not rows:
            return outcome
        run_id = writes[0].provenance.run_id
        rel = f"{OVERLAY_DIR}/{run_id}-{secrets.token_hex(4)}.parquet"
        self.project.write_bytes(rel, _table_bytes(rows), overwrite=False)
        outcome.records = [
            entry_record(rel, r["item_id"], _row_sha(r), [r["item_id"]]) for r in rows
        ]
        return outcome

    def remove_written_each(self, records: list[WrittenRecord]) -> list[str | None]:
        """Delete overlay rows of ``records``; an overlay left empty is deleted."""
        outcome, by_path = records_by_file(
            self.project,
            records,
            lambda r: (
                None
                if r.kind == "entry" and r.path.startswith(OVERLAY_DIR + "/")
                else f"not a manifest overlay record ({r.kind} {r.path})"
            ),
        )
        for rel, positions in by_path.items():
            rows = self._read_overlay(rel)
            by_item = {r["item_id"]: r for r in rows}
            drop: set[str] = set()
            for i in positions:
                r = records[i]
                row = by_item.get(r.item_id)
                if row is None:
                    outcome[i] = "its overlay row is no longer there"
                elif _row_sha(row) != r.sha256:
                    outcome[i] = "its overlay row changed since it was written"
                else:
                    drop.add(r.item_id)
            remaining = [r for r in rows if r["item_id"] not in drop]
            if not remaining:
                self.project.remove(rel)
            elif drop:
                self.project.write_bytes(rel, _table_bytes(remaining))
        return outcome

    def records_of_run(self, run_id: str) -> list[WrittenRecord]:
        """Records of every overlay row of run ``run_id`` (recovery)."""
        records = []
        for rel in self.overlay_files():
            if posixpath.basename(rel).startswith(run_id + "-"):
                for row in self._read_overlay(rel):
                    if row["run_id"] == run_id:
                        records.append(
                            entry_record(rel, row["item_id"], _row_sha(row), [row["item_id"]])
                        )
        return records

"""The Parquet manifest: items as Arrow record batches, written and read in bounded memory.

One row per :class:`~connectors.model.Item` (see :func:`connectors.model.item_to_row`);
annotations are a ``list<struct<label, x1, y1, x2, y2, score>>`` column with pixel
``xyxy`` boxes (all four coordinates null for a class label), ``meta`` is a JSON string.

Writing goes batch by batch through one :class:`pyarrow.parquet.ParquetWriter` into a
temporary object that is moved into place at the end (atomic).  Reading goes row group
by row group (:meth:`pyarrow.parquet.ParquetFile.iter_batches`), so memory stays bounded
by the batch size whatever the number of items.
"""

from __future__ import annotations

import logging
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from connectors.errors import InputError
from connectors.model import Item, item_from_row, item_to_row
from connectors.storage import ProjectFS

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.parquet"
BATCH_SIZE = 4096

ANNOTATION_TYPE = pa.struct(
    [
        pa.field("label", pa.string(), nullable=False),
        pa.field("x1", pa.float64()),
        pa.field("y1", pa.float64()),
        pa.field("x2", pa.float64()),
        pa.field("y2", pa.float64()),
        pa.field("score", pa.float64()),
    ]
)

ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("annotation_seconds", pa.float64()),
        pa.field("annotations", pa.list_(ANNOTATION_TYPE)),
        pa.field("meta", pa.string()),
        pa.field("error", pa.string()),
    ]
)
"""Arrow schema of the manifest: the columns of :func:`connectors.model.item_to_row`."""

REQUIRED_COLUMNS = ("item_id", "uri", "status")


def items_to_batches(
    items: Iterable[Item], batch_size: int = BATCH_SIZE
) -> Iterator[pa.RecordBatch]:
    """Stream ``items`` as record batches of :data:`ITEM_SCHEMA`, ``batch_size`` rows each."""
    rows: list[dict[str, Any]] = []
    for item in items:
        rows.append(item_to_row(item))
        if len(rows) >= batch_size:
            yield pa.RecordBatch.from_pylist(rows, schema=ITEM_SCHEMA)
            rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=ITEM_SCHEMA)


def batches_to_items(
    batches: Iterable[pa.RecordBatch], *, source: str | None = None
) -> Iterator[Item]:
    """Items from record batches; a row that is not a valid item is yielded with ``error`` set.

    ``source`` names the file in error messages.
    """
    for batch in batches:
        for row in batch.to_pylist():
            try:
                yield item_from_row(row)
            except (ValidationError, ValueError, TypeError, KeyError) as exc:
                item_id = str(row.get("item_id") or "?")
                err = InputError(
                    f"invalid manifest row: {_first_error(exc)}", file=source, item=item_id
                )
                log.warning("%s", err)
                yield Item(item_id=item_id, uri=str(row.get("uri") or ""), error=str(err))


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        return f"{loc}: {first['msg']}" if loc else first["msg"]
    return str(exc)


def write_batches(
    batches: Iterable[pa.RecordBatch], project: ProjectFS, name: str, schema: pa.Schema
) -> int:
    """Write record batches to ``name`` atomically (temporary object, then move); returns rows."""
    full = project.resolve(name)
    parent = posixpath.dirname(full)
    if parent:
        project.fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(full)}.{uuid.uuid4().hex}.tmp")
    rows = 0
    try:
        with project.fs.open(tmp, "wb") as f, pq.ParquetWriter(f, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
        project.fs.mv(tmp, full)
    finally:
        if project.fs.exists(tmp):
            project.fs.rm_file(tmp)
    return rows


def write_manifest(items: Iterable[Item], project: ProjectFS, name: str = MANIFEST_NAME) -> int:
    """Write ``items`` as a Parquet manifest at ``name`` (atomic, streaming); returns the count."""
    count = write_batches(items_to_batches(items), project, name, ITEM_SCHEMA)
    log.info("wrote %d items to %s", count, project.url_of(name))
    return count


def open_parquet(
    project: ProjectFS, name: str, required: tuple[str, ...] = REQUIRED_COLUMNS
) -> tuple[Any, pq.ParquetFile]:
    """Open ``name`` as a :class:`pyarrow.parquet.ParquetFile`; the caller closes the handle."""
    url = project.url_of(name)
    if not project.exists(name):
        raise InputError("manifest file not found", file=url)
    handle = project.fs.open(project.resolve(name), "rb")
    try:
        pf = pq.ParquetFile(handle)
    except (pa.ArrowInvalid, OSError) as exc:
        handle.close()
        raise InputError(f"not a readable Parquet file: {exc}", file=url) from exc
    missing = [c for c in required if c not in pf.schema_arrow.names]
    if missing:
        handle.close()
        raise InputError(
            f"manifest lacks column(s) {missing}; has {pf.schema_arrow.names}", file=url
        )
    return handle, pf


def iter_manifest_batches(
    project: ProjectFS,
    name: str = MANIFEST_NAME,
    *,
    columns: list[str] | None = None,
    batch_size: int = BATCH_SIZE,
) -> Iterator[pa.RecordBatch]:
    """Record batches of the manifest, read row group by row group."""
    handle, pf = open_parquet(project, name)
    with handle:
        present = pf.schema_arrow.names
        cols = [c for c in (columns or ITEM_SCHEMA.names) if c in present]
        yield from pf.iter_batches(batch_size=batch_size, columns=cols)


def iter_manifest_items(
    project: ProjectFS, name: str = MANIFEST_NAME, *, batch_size: int = BATCH_SIZE
) -> Iterator[Item]:
    """Stream the manifest's items in bounded memory; invalid rows carry ``error``."""
    yield from batches_to_items(
        iter_manifest_batches(project, name, batch_size=batch_size), source=project.url_of(name)
    )

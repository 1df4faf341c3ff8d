"""``difficulty.parquet``: the per-item table that every later stage reads.

Columns, in this order:

==================  =========  ==============================================================
column              type       meaning
==================  =========  ==============================================================
``item_id``         string     the item's stable id
``uri``             string     its image, relative to the project root or a full URL
``status``          string     ``unlabeled`` / ``labeled`` / ``reviewed`` / ``auto_labeled``
*one per scorer*    float64    the scorer's raw value (named as the scorer), higher = harder
``score``           float64    combined difficulty in ``[0, 1]`` (null when not scored)
``tier``            string     ``easy`` / ``medium`` / ``hard`` (null when not scored)
``rank``            int64      1 = hardest scored item (null when not scored)
``error``           string     null, or why the item could not be scored
``true_error``      float64    per-item error of the predictions on labeled items, else null
``annotation_seconds`` float64 platform annotation time of the item, when known
==================  =========  ==============================================================

The run's metadata is one JSON document in the Parquet schema metadata under the key
``labeltriage`` (:data:`META_KEY`): ``run_id``, ``created`` (ISO 8601 UTC),
``source``/``format``, ``model_version`` (or the prediction source), ``scorers``,
``combination`` (method, ``weights``, ``correlations``, ``cv_rho``, ``n_labeled``),
``reference`` (a quantile sketch per scorer, see :mod:`difficulty.combine`), ``tiers``
(config and the absolute ``easy_max``/``hard_min`` thresholds) and ``settings``.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from connectors.errors import InputError
from connectors.storage import ProjectFS

FILENAME = "difficulty.parquet"
META_KEY = b"labeltriage"
LEADING = ("item_id", "uri", "status")
TRAILING = ("score", "tier", "rank", "error", "true_error", "annotation_seconds")
_STRING = ("item_id", "uri", "status", "tier", "error")
_FLOAT = ("score", "true_error", "annotation_seconds")


def scorer_columns(df: pd.DataFrame) -> list[str]:
    """The scorer columns of a difficulty table (everything between status and score)."""
    return [c for c in df.columns if c not in LEADING and c not in TRAILING]


def to_arrow(df: pd.DataFrame, meta: dict[str, Any]) -> pa.Table:
    """The Arrow table of the contract, with ``meta`` as JSON in the schema metadata."""
    scorers = [str(s) for s in meta.get("scorers", scorer_columns(df))]
    missing = [
        c for c in (*LEADING, *scorers, "score", "tier", "rank", "error") if c not in df.columns
    ]
    if missing:
        raise ValueError(f"difficulty table lacks columns {missing}")
    fields: list[pa.Field] = []
    arrays: list[pa.Array] = []
    n = len(df)
    for name in (*LEADING, *scorers, *TRAILING):
        if name in _STRING:
            typ: pa.DataType = pa.string()
            col = df[name] if name in df.columns else pd.Series([None] * n)
            values = [
                None if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v)
                for v in col
            ]
            arrays.append(pa.array(values, type=typ))
        elif name == "rank":
            typ = pa.int64()
            arrays.append(pa.array(df[name].astype("Int64"), type=typ))
        else:
            typ = pa.float64()
            col = df[name] if name in df.columns else pd.Series([np.nan] * n)
            floats = col.to_numpy(dtype=np.float64, na_value=np.nan)
            arrays.append(pa.array(floats, type=typ, from_pandas=True))  # NaN → null
        fields.append(pa.field(name, typ))
    schema = pa.schema(
        fields, metadata={META_KEY: json.dumps(meta, sort_keys=True, default=str).encode()}
    )
    return pa.Table.from_arrays(arrays, schema=schema)


def write_difficulty(
    df: pd.DataFrame,
    out_dir: str,
    meta: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Atomically write ``out_dir/difficulty.parquet`` (any fsspec URL); return its full path."""
    return write_difficulty_parts([df], out_dir, meta, storage_options)


def write_difficulty_parts(
    parts: Iterable[pd.DataFrame],
    out_dir: str,
    meta: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
) -> str:
    """:func:`write_difficulty` for a table that comes in consecutive parts (one Parquet row
    group each): one part is held at a time, and the compressed file."""
    buf = io.BytesIO()
    writer: pq.ParquetWriter | None = None
    for part in parts:
        table = to_arrow(part, meta)
        if writer is None:
            writer = pq.ParquetWriter(buf, table.schema, compression="zstd")
        writer.write_table(table)
    if writer is None:
        raise ValueError("no rows to write")
    writer.close()
    return ProjectFS(out_dir, storage_options).write_bytes(FILENAME, buf.getvalue())


def _split(dir_or_url: str) -> tuple[str, str]:
    if dir_or_url.rstrip("/").endswith(".parquet"):
        path = dir_or_url.rstrip("/")
        return posixpath.dirname(path) or ".", posixpath.basename(path)
    return dir_or_url, FILENAME


def read_difficulty(
    dir_or_url: str, storage_options: dict[str, Any] | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a run's table and its metadata (from the run folder, or the ``.parquet`` URL)."""
    root, name = _split(dir_or_url)
    fs = ProjectFS(root, storage_options)
    if not fs.exists(name):
        raise InputError(f"no {name} here (run `labeltriage score --out` first)", file=dir_or_url)
    try:
        table = pq.read_table(io.BytesIO(fs.read_bytes(name)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"unreadable difficulty table: {exc}", file=fs.url_of(name)) from exc
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise InputError(
            "not a labeltriage difficulty table (no run metadata)", file=fs.url_of(name)
        )
    meta = json.loads(raw)
    df = table.to_pandas()
    if "rank" in df.columns:
        df["rank"] = df["rank"].astype("Int64")
    return df, meta

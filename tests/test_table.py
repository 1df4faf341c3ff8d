"""The difficulty.parquet contract: columns, types, metadata, atomic writes, any fsspec URL."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.errors import InputError
from difficulty.table import FILENAME, META_KEY, read_difficulty, scorer_columns, write_difficulty


def _df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": ["a", "b", "c"],
            "uri": ["images/a.jpg", "images/b.jpg", "s3://bucket/c.png"],
            "status": ["labeled", "unlabeled", "unlabeled"],
            "fourier": [0.1, 0.5, np.nan],
            "box_least_confidence": [0.2, 0.9, np.nan],
            "score": [0.15, 0.7, np.nan],
            "tier": ["easy", "hard", None],
            "rank": pd.array([2, 1, pd.NA], dtype="Int64"),
            "error": [None, None, "images/c.png: item 'c': cannot decode"],
            "true_error": [0.0, np.nan, np.nan],
            "annotation_seconds": [12.5, np.nan, np.nan],
        }
    )


META = {
    "run_id": "20260101T000000Z-abc123",
    "created": "2026-01-01T00:00:00+00:00",
    "scorers": ["fourier", "box_least_confidence"],
    "model_version": "predictions/yolo",
    "combination": {
        "method": "single",
        "weights": {"fourier": 0.0, "box_least_confidence": 1.0},
        "correlations": {"fourier": 0.1, "box_least_confidence": 0.7},
    },
    "reference": {
        "fourier": list(np.linspace(0, 1, 101)),
        "box_least_confidence": list(np.linspace(0, 1, 101)),
    },
    "tiers": {
        "config": {"mode": "quantiles", "easy": 0.3, "hard": 0.7},
        "easy_max": 0.3,
        "hard_min": 0.6,
    },
}


def test_schema_and_metadata(tmp_path: Path) -> None:
    path = write_difficulty(_df(), str(tmp_path), META)
    assert path.endswith(FILENAME)
    schema = pq.read_schema(path)
    assert schema.names == [
        "item_id",
        "uri",
        "status",
        "fourier",
        "box_least_confidence",
        "score",
        "tier",
        "rank",
        "error",
        "true_error",
        "annotation_seconds",
    ]
    types = {f.name: f.type for f in schema}
    assert (
        types["item_id"] == pa.string()
        and types["tier"] == pa.string()
        and types["error"] == pa.string()
    )
    assert types["fourier"] == pa.float64() and types["score"] == pa.float64()
    assert types["rank"] == pa.int64()
    import json

    meta = json.loads(schema.metadata[META_KEY])
    assert meta["run_id"] == META["run_id"]
    assert meta["combination"]["weights"]["box_least_confidence"] == 1.0
    assert len(meta["reference"]["fourier"]) == 101


def test_round_trip(tmp_path: Path) -> None:
    write_difficulty(_df(), str(tmp_path), META)
    df, meta = read_difficulty(str(tmp_path))
    assert meta == META
    assert scorer_columns(df) == ["fourier", "box_least_confidence"]
    assert df["rank"].dtype == "Int64" and df["rank"].isna().tolist() == [False, False, True]
    assert df["tier"].tolist()[:2] == ["easy", "hard"] and df["tier"].isna().iloc[2]
    assert df["error"].iloc[2].startswith("images/c.png") and df["error"].isna().iloc[0]
    assert np.isnan(df["score"].iloc[2])
    # the file itself can be named
    df2, _ = read_difficulty(str(tmp_path / FILENAME))
    pd.testing.assert_frame_equal(df, df2)


def test_memory_url_and_overwrite_leave_no_temporaries() -> None:
    url = f"memory://difficulty-{uuid.uuid4().hex}/run"
    write_difficulty(_df(), url, META)
    write_difficulty(_df().assign(score=[0.2, 0.8, np.nan]), url, META)
    df, _ = read_difficulty(url)
    assert df["score"].iloc[1] == pytest.approx(0.8)
    import fsspec

    fs = fsspec.filesystem("memory")
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(url.replace("memory://", "/"), detail=False)]
    assert names == [FILENAME]


def test_atomic_local_write_keeps_old_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_difficulty(_df(), str(tmp_path), META)
    before = (tmp_path / FILENAME).read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_difficulty(_df().assign(score=[0.9, 0.9, np.nan]), str(tmp_path), META)
    assert (tmp_path / FILENAME).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [FILENAME]


def test_missing_columns_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lacks columns"):
        write_difficulty(_df().drop(columns=["tier"]), str(tmp_path), META)
    with pytest.raises(ValueError, match="box_least_confidence"):
        write_difficulty(_df().drop(columns=["box_least_confidence"]), str(tmp_path), META)


def test_optional_columns_may_be_absent(tmp_path: Path) -> None:
    write_difficulty(_df().drop(columns=["true_error", "annotation_seconds"]), str(tmp_path), META)
    df, _ = read_difficulty(str(tmp_path))
    assert df["true_error"].isna().all()


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no difficulty\.parquet"):
        read_difficulty(str(tmp_path))
    pq.write_table(pa.table({"x": [1]}), tmp_path / FILENAME)
    with pytest.raises(InputError, match="no run metadata"):
        read_difficulty(str(tmp_path))
    (tmp_path / FILENAME).write_bytes(b"not parquet")
    with pytest.raises(InputError, match="unreadable"):
        read_difficulty(str(tmp_path))

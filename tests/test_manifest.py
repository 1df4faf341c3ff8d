"""The Parquet manifest: schema, streaming round trips, bad rows, overlays, bounded memory."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _fileformat_helpers import fresh_project
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.errors import InputError
from connectors.formats.base import FORMATS, LabelWrite, Provenance
from connectors.formats.manifest import OVERLAY_DIR, ManifestFormat
from connectors.manifest import (
    ITEM_SCHEMA,
    batches_to_items,
    items_to_batches,
    iter_manifest_items,
    write_manifest,
)
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus, item_to_row
from connectors.storage import ProjectFS

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@st.composite
def annotation_values(draw: st.DrawFn) -> Annotation:
    label = draw(st.text(min_size=1, max_size=8))
    score = draw(st.none() | st.floats(0, 1))
    if draw(st.booleans()):
        return Annotation(label=label, score=score)
    x1, y1 = draw(finite), draw(finite)
    return Annotation(
        label=label,
        box=(x1, y1, x1 + draw(st.floats(0, 1e4)), y1 + draw(st.floats(0, 1e4))),
        score=score,
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**31), 2**31) | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=6,
)


@st.composite
def item_values(draw: st.DrawFn) -> Item:
    status = draw(st.sampled_from(list(ItemStatus)))
    return Item(
        item_id=draw(st.text(min_size=1, max_size=12)),
        uri=draw(st.text(max_size=20)),
        width=draw(st.none() | st.integers(1, 100_000)),
        height=draw(st.none() | st.integers(1, 100_000)),
        status=status,
        source=draw(st.sampled_from(list(AnnotationSource)))
        if status is not ItemStatus.UNLABELED
        else draw(st.none() | st.sampled_from(list(AnnotationSource))),
        annotation_seconds=draw(st.none() | st.floats(0, 1e5)),
        annotations=draw(st.lists(annotation_values(), max_size=4)),
        meta=draw(st.dictionaries(st.text(min_size=1, max_size=5), json_values, max_size=3)),
        error=draw(st.none() | st.text(max_size=10)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(item_values(), max_size=12), batch_size=st.integers(1, 5))
def test_round_trip_through_parquet(batch: list[Item], batch_size: int) -> None:
    project = fresh_project()
    try:
        assert write_manifest(iter(batch), project) == len(batch)
        assert list(iter_manifest_items(project, batch_size=batch_size)) == batch
        # and in memory, batch by batch
        batches = list(items_to_batches(batch, batch_size=batch_size))
        assert all(b.num_rows <= batch_size and b.schema.equals(ITEM_SCHEMA) for b in batches)
        assert list(batches_to_items(batches)) == batch
    finally:
        project.fs.rm(project.root, recursive=True)


def test_schema_matches_item_to_row() -> None:
    row = item_to_row(Item(item_id="a", uri="u"))
    assert list(row) == ITEM_SCHEMA.names
    assert ITEM_SCHEMA.field("annotations").type.value_type.names == [
        "label",
        "x1",
        "y1",
        "x2",
        "y2",
        "score",
    ]


def test_write_is_atomic_and_leaves_no_temporary(mem: ProjectFS) -> None:
    good = [Item(item_id=str(i), uri=f"{i}.jpg") for i in range(10)]
    write_manifest(good, mem)

    def exploding() -> Iterator[Item]:
        yield Item(item_id="x", uri="x.jpg")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_manifest(exploding(), mem)
    assert mem.listdir(".") == ["manifest.parquet"]
    assert list(iter_manifest_items(mem)) == good


def test_invalid_row_becomes_error_item(mem: ProjectFS) -> None:
    rows = [
        item_to_row(Item(item_id="ok", uri="a.jpg")),
        {**item_to_row(Item(item_id="bad", uri="b.jpg")), "status": "weird"},
    ]
    rows[1]["annotations"] = [
        {"label": "x", "x1": 5.0, "y1": 0.0, "x2": 1.0, "y2": 1.0, "score": None}
    ]
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA), buf)
    mem.write_bytes("manifest.parquet", buf.getvalue().to_pybytes())
    ok, bad = iter_manifest_items(mem)
    assert ok.error is None
    assert (
        bad.item_id == "bad"
        and bad.error is not None
        and "manifest.parquet" in bad.error
        and "'bad'" in bad.error
    )


def test_missing_columns_and_garbage(mem: ProjectFS) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"item_id": ["a"]}), buf)
    mem.write_bytes("manifest.parquet", buf.getvalue().to_pybytes())
    with pytest.raises(InputError, match=r"lacks column\(s\) \['uri', 'status'\]"):
        list(iter_manifest_items(mem))
    mem.write_bytes("manifest.parquet", b"not parquet at all")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        list(iter_manifest_items(mem))
    with pytest.raises(InputError, match="not found"):
        list(iter_manifest_items(mem, "nope.parquet"))


# -- the manifest format and its auto-label overlays ------------------------------------


def sample(mem: ProjectFS) -> ManifestFormat:
    fmt = ManifestFormat(mem)
    fmt.write_items(
        [
            Item(
                item_id="h",
                uri="h.jpg",
                width=10,
                height=10,
                status="labeled",
                annotations=[Annotation(label="a", box=(0, 0, 1, 1))],
            ),
            Item(item_id="u1", uri="u1.jpg", width=10, height=10),
            Item(item_id="u2", uri="u2.jpg", width=10, height=10),
        ]
    )
    return fmt


def lw(item: Item, run_id: str = "r1") -> LabelWrite:
    return LabelWrite(
        item=item,
        annotations=[Annotation(label="a", box=(1, 1, 5, 5), score=0.8)],
        provenance=Provenance(run_id=run_id, model_version="m", tier="easy"),
    )


def test_manifest_format_overlays(mem: ProjectFS) -> None:
    assert FORMATS["manifest"] is ManifestFormat
    fmt = sample(mem)
    assert ManifestFormat.detect(mem)
    h, u1, u2 = fmt.iter_items()
    outcome = fmt.write_labels([lw(h), lw(u1)])
    assert "labeled" in outcome.refused["h"] and [r.item_id for r in outcome.records] == ["u1"]
    assert outcome.records[0].path.startswith(OVERLAY_DIR + "/r1-")
    after = {i.item_id: i for i in fmt.iter_items()}
    assert (
        after["u1"].status is ItemStatus.AUTO_LABELED
        and after["u1"].source is AnnotationSource.AUTO
    )
    assert after["u1"].annotations == [Annotation(label="a", box=(1, 1, 5, 5), score=0.8)]
    assert after["u1"].meta["auto_label"]["run_id"] == "r1"
    assert after["h"] == h and after["u2"] == u2
    assert "already auto-labeled by run r1" in fmt.write_labels([lw(u1, "r2")]).refused["u1"]
    # a person labels u1 in the manifest: the human label wins over the overlay
    rows = [
        i
        if i.item_id != "u1"
        else i.model_copy(update={"status": ItemStatus.LABELED, "source": AnnotationSource.HUMAN})
        for i in (h, u1, u2)
    ]
    fmt.write_items(rows)
    assert {i.item_id: i for i in fmt.iter_items()}["u1"].status is ItemStatus.LABELED
    # removing the run's overlay leaves the manifest alone
    assert fmt.remove_written(outcome.records) == []
    assert mem.listdir(OVERLAY_DIR) == []
    assert list(fmt.iter_items()) == rows


def test_manifest_refuses_label_added_after_read(mem: ProjectFS) -> None:
    fmt = sample(mem)
    h, u1, u2 = fmt.iter_items()
    fmt.write_items([h, u1.model_copy(update={"status": ItemStatus.REVIEWED}), u2])
    outcome = fmt.write_labels([lw(u1), lw(u2)])
    assert "reviewed" in outcome.refused["u1"] and [r.item_id for r in outcome.records] == ["u2"]


# -- bounded memory ----------------------------------------------------------------------


def peak_while_iterating(project: ProjectFS, batch_size: int) -> tuple[int, int]:
    gc.collect()
    tracemalloc.start()
    count = 0
    for _ in iter_manifest_items(project, batch_size=batch_size):
        count += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return count, peak


def make_items(n: int) -> Iterator[Item]:
    for i in range(n):
        yield Item(
            item_id=f"{i:07d}",
            uri=f"images/{i:07d}.jpg",
            width=640,
            height=480,
            status="labeled",
            annotations=[Annotation(label="car", box=(1, 2, 30, 40))],
        )


def test_iterating_stays_bounded_in_memory() -> None:
    small, large = fresh_project(), fresh_project()
    try:
        write_manifest(make_items(2_000), small)
        write_manifest(make_items(20_000), large)
        n_small, peak_small = peak_while_iterating(small, batch_size=1000)
        n_large, peak_large = peak_while_iterating(large, batch_size=1000)
        assert (n_small, n_large) == (2_000, 20_000)
        # ten times the items, not ten times the memory (one batch is held at a time)
        assert peak_large < 2.5 * peak_small, (peak_small, peak_large)
    finally:
        for p in (small, large):
            p.fs.rm(p.root, recursive=True)

"""Runs as transactions: manifests, chunks, failures, rollback, sidecars."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from connectors.errors import UsageError
from connectors.formats.base import (
    LabelWrite,
    ProjectFormat,
    Provenance,
    WriteOutcome,
    WrittenRecord,
    sidecar_path,
)
from connectors.formats.coco import CocoFormat
from connectors.formats.labelstudio import LabelStudioFormat
from connectors.formats.manifest import ManifestFormat
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus
from connectors.sidecars import is_auto_label, read_auto_label_index, sha256_hex, write_sidecar
from connectors.storage import ProjectFS
from connectors.writeback import (
    RUNS_DIR,
    list_runs,
    load_manifest,
    new_run_id,
    rollback,
    write_run,
)

NAMES = [f"img{i}" for i in range(6)]


def coco_project(mem: ProjectFS, labeled: tuple[str, ...] = ("img0",)) -> CocoFormat:
    images = [
        {"id": i + 1, "file_name": f"{n}.jpg", "width": 64, "height": 48}
        for i, n in enumerate(NAMES)
    ]
    anns = [
        {"id": 100 + i, "image_id": NAMES.index(n) + 1, "category_id": 1, "bbox": [1, 1, 5, 5]}
        for i, n in enumerate(labeled)
    ]
    doc = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "bike"}],
    }
    mem.write_text("annotations.json", json.dumps(doc))
    return CocoFormat(mem)


def writes_for(items: Iterable[Item], run_id: str) -> list[LabelWrite]:
    return [
        LabelWrite(
            item=i,
            annotations=[Annotation(label="car", box=(2, 2, 20, 20), score=0.9)],
            provenance=Provenance(run_id=run_id, model_version="m1", score=0.9, tier="easy"),
        )
        for i in items
    ]


def all_files(mem: ProjectFS) -> list[str]:
    return sorted(mem.relative(p) for p in mem.fs.find(mem.root))


def test_run_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_run_id() for _ in range(50)]
    assert len(set(ids)) == 50
    assert ids == sorted(ids) or all(a[:22] <= b[:22] for a, b in itertools.pairwise(ids))
    assert all("/" not in i for i in ids)


def test_write_run_commits_in_chunks(mem: ProjectFS, monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = coco_project(mem)
    run_id = new_run_id()
    seen_stages: list[tuple[str, int]] = []
    original = fmt.write_labels

    def spying(writes: list[LabelWrite]) -> WriteOutcome:
        manifest = load_manifest(mem, run_id)
        seen_stages.append((manifest.stage, len(manifest.records) + len(manifest.refused)))
        return original(writes)

    monkeypatch.setattr(fmt, "write_labels", spying)
    manifest = write_run(
        fmt, writes_for(fmt.iter_items(), run_id), run_id, meta={"stage": "autolabel"}, chunk_size=2
    )
    # the manifest existed as pending before the first write and grew chunk by chunk
    assert seen_stages == [("pending", 0), ("pending", 2), ("pending", 4)]
    assert (
        manifest.stage == "committed"
        and manifest.format == "coco"
        and manifest.meta == {"stage": "autolabel"}
    )
    assert set(manifest.refused) == {"img0"}
    assert manifest.item_ids == NAMES[1:]
    stored = load_manifest(mem, run_id)
    assert stored.stage == "committed" and stored.records == manifest.records
    assert [r.run_id for r in list_runs(mem)] == [run_id]
    statuses = {i.item_id: i.status for i in CocoFormat(mem).iter_items()}
    assert statuses == {
        "img0": ItemStatus.LABELED,
        **{n: ItemStatus.AUTO_LABELED for n in NAMES[1:]},
    }


def test_dry_run_writes_nothing(mem: ProjectFS) -> None:
    fmt = coco_project(mem)
    before = all_files(mem), mem.read_bytes("annotations.json")
    run_id = new_run_id()
    manifest = write_run(fmt, writes_for(fmt.iter_items(), run_id), run_id, dry_run=True)
    assert manifest.dry_run and manifest.records == [] and set(manifest.refused) == {"img0"}
    assert (all_files(mem), mem.read_bytes("annotations.json")) == before


def test_run_refuses_human_label_that_appears_after_reading(mem: ProjectFS) -> None:
    fmt = coco_project(mem)
    items = list(fmt.iter_items())  # img3 is unlabeled as read ...
    doc = json.loads(mem.read_text("annotations.json"))
    doc["annotations"].append({"id": 555, "image_id": 4, "category_id": 2, "bbox": [3, 3, 4, 4]})
    mem.write_text("annotations.json", json.dumps(doc))  # ... then a person labels it
    run_id = new_run_id()
    manifest = write_run(fmt, writes_for(items, run_id), run_id)
    assert "img3" in manifest.refused and "human label" in manifest.refused["img3"]
    img3 = [
        a
        for a in json.loads(mem.read_text("annotations.json"))["annotations"]
        if a["image_id"] == 4
    ]
    assert img3 == [{"id": 555, "image_id": 4, "category_id": 2, "bbox": [3, 3, 4, 4]}]


def test_rollback_is_exact(mem: ProjectFS) -> None:
    fmt = coco_project(mem)
    items = {i.item_id: i for i in fmt.iter_items()}
    run1, run2 = new_run_id(), new_run_id()
    write_run(fmt, writes_for([items["img1"], items["img2"], items["img3"]], run1), run1)
    write_run(fmt, writes_for([items["img4"]], run2), run2)
    doc = json.loads(mem.read_text("annotations.json"))
    for a in doc["annotations"]:
        if a["image_id"] == 3:  # a person corrects run 1's box on img2
            a["bbox"] = [4, 4, 10, 10]
    doc["annotations"].append(
        {"id": 900, "image_id": 2, "category_id": 2, "bbox": [30, 30, 5, 5]}
    )  # and adds a box on img1
    mem.write_text("annotations.json", json.dumps(doc))

    result = rollback(fmt, run1)
    assert result.removed == ["img1", "img3"]
    assert list(result.kept) == ["img2"] and "edited" in result.kept["img2"]
    final = {i.item_id: i for i in CocoFormat(mem).iter_items()}
    assert final["img1"].annotations == [
        Annotation(label="bike", box=(30, 30, 35, 35))
    ]  # the human box stays
    assert final["img1"].status is ItemStatus.LABELED
    assert final["img2"].annotations[0].box == (4, 4, 14, 14)
    assert final["img3"].status is ItemStatus.UNLABELED
    assert final["img4"].status is ItemStatus.AUTO_LABELED  # the other run is untouched
    assert final["img0"].status is ItemStatus.LABELED
    assert (
        load_manifest(mem, run1).stage == "rolled_back"
        and load_manifest(mem, run2).stage == "committed"
    )

    snapshot = mem.read_bytes("annotations.json")
    again = rollback(fmt, run1)
    assert again.removed == [] and "already rolled back" in again.message
    assert mem.read_bytes("annotations.json") == snapshot

    with pytest.raises(UsageError, match=f"unknown run id 'nope'.*known runs: {run1}, {run2}"):
        rollback(fmt, "nope")


class ExplodingReplace:
    """Wraps ``ProjectFS.replace_if`` to fail on the ``n``-th replacement of ``target``."""

    def __init__(self, project: ProjectFS, target: str, n: int) -> None:
        self.real = project.replace_if
        self.target = target
        self.n = n
        self.count = 0

    def __call__(self, rel: str, data: bytes, version: str) -> str:
        if rel == self.target:
            self.count += 1
            if self.count == self.n:
                raise OSError("connection reset while writing")
        return self.real(rel, data, version)


@pytest.mark.parametrize("kind", ["coco", "labelstudio"])
def test_crash_in_second_chunk_leaves_nothing_behind(
    mem: ProjectFS, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    if kind == "coco":
        fmt: ProjectFormat = coco_project(mem)
        target = "annotations.json"
    else:
        tasks = [
            {"id": i, "data": {"image": f"images/{i}.jpg"}, "annotations": [], "predictions": []}
            for i in range(1, 6)
        ]
        mem.write_text("export.json", json.dumps(tasks))
        fmt, target = LabelStudioFormat(mem), "export.json"
    items = [i.model_copy(update={"width": 64, "height": 48}) for i in fmt.iter_items()]
    original = mem.read_bytes(target)
    monkeypatch.setattr(mem, "replace_if", ExplodingReplace(mem, target, n=2))
    run_id = new_run_id()
    with pytest.raises(OSError, match="connection reset"):
        write_run(fmt, writes_for(items, run_id), run_id, chunk_size=2)
    monkeypatch.undo()
    assert json.loads(mem.read_bytes(target)) == json.loads(
        original
    )  # chunk 1 undone, chunk 2 never landed
    assert not [f for f in all_files(mem) if f.endswith(".tmp")]
    manifest = load_manifest(mem, run_id)
    assert manifest.stage == "rolled_back" and "connection reset" in (manifest.error or "")
    assert "rolled back" in rollback(fmt, run_id).message


def test_crash_in_manifest_overlay_chunk(mem: ProjectFS, monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = ManifestFormat(mem)
    fmt.write_items([Item(item_id=n, uri=f"{n}.jpg") for n in NAMES])
    items = list(fmt.iter_items())
    calls = {"n": 0}
    real = mem.write_bytes

    def flaky(rel: str, data: bytes, *, overwrite: bool = True) -> str:
        if rel.startswith(".labeltriage/manifest-auto/"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("quota exceeded")
        return real(rel, data, overwrite=overwrite)

    monkeypatch.setattr(mem, "write_bytes", flaky)
    run_id = new_run_id()
    with pytest.raises(OSError, match="quota"):
        write_run(fmt, writes_for(items, run_id), run_id, chunk_size=3)
    monkeypatch.undo()
    assert list(fmt.iter_items()) == items
    assert mem.listdir(".labeltriage/manifest-auto") == []


def test_pending_run_is_recovered_from_inline_provenance(mem: ProjectFS) -> None:
    """A process killed after writing but before updating its manifest: rollback still finds it."""
    fmt = coco_project(mem)
    run_id = new_run_id()
    items = list(fmt.iter_items())
    fmt.write_labels(writes_for(items[1:3], run_id))  # written, not recorded
    from connectors.writeback import RunManifest, save_manifest

    save_manifest(mem, RunManifest(run_id=run_id, created="2026-01-01T00:00:00Z", format="coco"))
    result = rollback(fmt, run_id)
    assert result.removed == ["img1", "img2"]
    assert all(i.status is not ItemStatus.AUTO_LABELED for i in fmt.iter_items())


def test_run_id_mismatch_and_reuse_are_refused(mem: ProjectFS) -> None:
    fmt = coco_project(mem)
    items = list(fmt.iter_items())
    with pytest.raises(UsageError, match="another run id"):
        write_run(fmt, writes_for(items, "other"), new_run_id())
    run_id = new_run_id()
    write_run(fmt, writes_for(items[1:2], run_id), run_id)
    with pytest.raises(UsageError, match="already exists"):
        write_run(fmt, writes_for(items[2:3], run_id), run_id)
    with pytest.raises(UsageError, match="invalid run id"):
        write_run(fmt, [], "../escape")


# -- sidecars, with a minimal one-file-per-item format ------------------------------------


class TextLabels(ProjectFormat):
    """``labels/<id>.txt`` holding ``label x1 y1 x2 y2`` lines; items listed in ``items.txt``."""

    name = "textlabels"

    @classmethod
    def detect(cls, project: ProjectFS) -> bool:
        return project.exists("items.txt")

    def iter_items(self) -> Iterator[Item]:
        index = read_auto_label_index(self.project)
        for item_id in self.project.read_text("items.txt").split():
            rel = f"labels/{item_id}.txt"
            if not self.project.exists(rel):
                yield Item(item_id=item_id, uri=f"{item_id}.jpg")
                continue
            data = self.project.read_bytes(rel)
            anns = [
                Annotation(label=p[0], box=tuple(map(float, p[1:5])))
                for p in (line.split() for line in data.decode().splitlines())
            ]  # type: ignore[arg-type]
            auto = is_auto_label(index, item_id, sha256_hex(data))
            yield Item(
                item_id=item_id,
                uri=f"{item_id}.jpg",
                status="auto_labeled" if auto else "labeled",
                annotations=anns,
            )

    def write_items(self, items: Iterable[Item], classes: list[str] | None = None) -> None:
        raise NotImplementedError

    def write_labels(self, writes: list[LabelWrite]) -> WriteOutcome:
        outcome = WriteOutcome()
        for w in writes:
            rel = f"labels/{w.item.item_id}.txt"
            data = "".join(
                f"{a.label} {' '.join(map(str, a.box or ()))}\n" for a in w.annotations
            ).encode()
            try:
                self.project.write_bytes(rel, data, overwrite=False)
            except FileExistsError:
                outcome.refused[w.item.item_id] = "has a label file"
                continue
            record = WrittenRecord(
                kind="file", path=rel, item_id=w.item.item_id, sha256=sha256_hex(data)
            )
            write_sidecar(self.project, w.item.item_id, record, w.provenance)
            outcome.records.append(record)
        return outcome

    def remove_written(self, records: list[WrittenRecord]) -> list[str]:
        kept = []
        for r in records:
            if not self.project.exists(r.path):
                kept.append(f"{r.item_id}: gone")
            elif sha256_hex(self.project.read_bytes(r.path)) != r.sha256:
                kept.append(f"{r.item_id}: edited since")
            else:
                self.project.remove(r.path)
        return kept


def test_sidecars_mark_auto_labels_and_rollback_removes_them(mem: ProjectFS) -> None:
    mem.write_text("items.txt", "a b sub/c d")
    mem.write_text("labels/a.txt", "car 1 1 2 2\n")  # human
    fmt = TextLabels(mem)
    items = list(fmt.iter_items())
    run_id = new_run_id()
    manifest = write_run(fmt, writes_for(items, run_id), run_id)
    assert set(manifest.refused) == {"a"} and manifest.item_ids == ["b", "d", "sub/c"]
    index = read_auto_label_index(mem)
    assert set(index) == {"b", "sub/c", "d"}
    assert index["sub/c"]["run_id"] == run_id and index["sub/c"]["path"] == "labels/sub/c.txt"
    assert index["b"]["provenance"]["model_version"] == "m1"
    status = {i.item_id: (i.status, i.source) for i in fmt.iter_items()}
    assert status["b"] == (ItemStatus.AUTO_LABELED, AnnotationSource.AUTO)
    assert status["a"] == (ItemStatus.LABELED, AnnotationSource.HUMAN)
    mem.write_text("labels/d.txt", "bike 3 3 9 9\n")  # a person edits d: it is a human label now
    assert {i.item_id: i.status for i in fmt.iter_items()}["d"] is ItemStatus.LABELED

    result = rollback(fmt, run_id)
    assert result.removed == ["b", "sub/c"] and list(result.kept) == ["d"]
    assert (
        mem.read_text("labels/d.txt") == "bike 3 3 9 9\n"
        and mem.read_text("labels/a.txt") == "car 1 1 2 2\n"
    )
    assert not mem.exists("labels/b.txt") and not mem.exists("labels/sub/c.txt")
    assert read_auto_label_index(mem) == {}
    assert not mem.exists(sidecar_path("b"))


def test_sidecar_of_another_run_survives_rollback(mem: ProjectFS) -> None:
    mem.write_text("items.txt", "a b")
    fmt = TextLabels(mem)
    a, b = fmt.iter_items()
    run1, run2 = new_run_id(), new_run_id()
    write_run(fmt, writes_for([a], run1), run1)
    write_run(fmt, writes_for([b], run2), run2)
    assert rollback(fmt, run1).removed == ["a"]
    assert set(read_auto_label_index(mem)) == {"b"} and mem.exists("labels/b.txt")


def test_bookkeeping_stays_in_its_folder(mem: ProjectFS) -> None:
    fmt = coco_project(mem)
    run_id = new_run_id()
    write_run(fmt, writes_for(fmt.iter_items(), run_id), run_id)
    rollback(fmt, run_id)
    assert [f for f in all_files(mem) if not f.startswith(".labeltriage/")] == ["annotations.json"]
    assert mem.listdir(RUNS_DIR) == [f"{run_id}.json"]


def test_failed_undo_leaves_run_pending_for_a_later_rollback(
    mem: ProjectFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    fmt = coco_project(mem)
    items = list(fmt.iter_items())
    original = json.loads(mem.read_text("annotations.json"))
    real_write = fmt.write_labels
    calls = {"n": 0}

    def second_chunk_fails(writes: list[LabelWrite]) -> WriteOutcome:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("model server vanished")
        return real_write(writes)

    def undo_fails(records: list[WrittenRecord]) -> list[str | None]:
        raise OSError("storage unreachable")

    monkeypatch.setattr(fmt, "write_labels", second_chunk_fails)
    monkeypatch.setattr(fmt, "remove_written_each", undo_fails)
    run_id = new_run_id()
    with pytest.raises(RuntimeError, match="model server vanished"):
        write_run(fmt, writes_for(items, run_id), run_id, chunk_size=2)
    manifest = load_manifest(mem, run_id)
    assert manifest.stage == "pending" and "undo failed" in (manifest.error or "")
    monkeypatch.undo()
    result = rollback(CocoFormat(mem), run_id)
    assert result.removed == ["img1"]
    assert json.loads(mem.read_text("annotations.json")) == original


def test_run_and_rollback_on_local_disk(tmp_path: Any) -> None:
    project = ProjectFS(str(tmp_path))
    project.write_text("items.txt", "a b/c")
    fmt = TextLabels(project)
    run_id = new_run_id()
    write_run(fmt, writes_for(fmt.iter_items(), run_id), run_id)
    assert set(read_auto_label_index(project)) == {"a", "b/c"}
    assert (tmp_path / "labels" / "b" / "c.txt").is_file()
    assert [i.status for i in fmt.iter_items()] == [ItemStatus.AUTO_LABELED] * 2
    assert rollback(fmt, run_id).removed == ["a", "b/c"]
    assert read_auto_label_index(project) == {}
    assert not (tmp_path / "labels" / "a.txt").exists()
    coco = coco_project(project)
    run2 = new_run_id()
    write_run(coco, writes_for(coco.iter_items(), run2), run2)
    assert rollback(coco, run2).removed == NAMES[1:]
    assert not list(tmp_path.rglob("*.tmp"))


def test_list_runs_skips_a_malformed_manifest(mem: ProjectFS) -> None:
    fmt = coco_project(mem)
    run_id = new_run_id()
    write_run(fmt, writes_for(list(fmt.iter_items())[1:2], run_id), run_id)
    mem.write_text(f"{RUNS_DIR}/broken.json", "{not json")
    assert [r.run_id for r in list_runs(mem)] == [run_id]

"""The FiftyOne format against a real FiftyOne database (its own MongoDB on 127.0.0.1).

Small datasets built here from a few generated images: reading samples as items,
predictions, conditional auto-label writes, rollback (also from another process that has
no local state), the run manifests kept in the database, and scores published back.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from connectors.errors import PathEscapeError, UsageError
from connectors.formats.base import LabelWrite, Provenance
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus
from connectors.project import open_predictions, open_project
from connectors.writeback import load_manifest, rollback, write_run
from tests.integration.fo_db import fiftyone_env, import_fiftyone

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SIZES = [(200, 100), (120, 80), (64, 64), (300, 150), (90, 60), (160, 120)]


@pytest.fixture(scope="module")
def fo(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return import_fiftyone(tmp_path_factory.mktemp("fo-db"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("fo-images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def dataset(fo: ModuleType) -> Iterator[Any]:
    ds = fo.Dataset(f"lt-test-{uuid.uuid4().hex[:8]}")
    ds.persistent = True  # other processes (the CLI) see it
    yield ds
    if fo.dataset_exists(ds.name):
        fo.delete_dataset(ds.name)


def det(fo: ModuleType, label: str, box: list[float], **kw: Any) -> Any:
    return fo.Detection(label=label, bounding_box=box, **kw)


def detections(fo: ModuleType, *dets: Any) -> Any:
    return fo.Detections(detections=list(dets))


def add(ds: Any, fo: ModuleType, path: Path, *, metadata: bool = True, **fields: Any) -> str:
    sample = fo.Sample(filepath=str(path), **fields)
    if metadata:
        w, h = Image.open(path).size
        sample.metadata = fo.ImageMetadata(width=w, height=h)
    return str(ds.add_sample(sample))


def human_snapshot(ds: Any, fields: tuple[str, ...] = ("ground_truth", "predictions")) -> dict:
    """Every sample's human-owned content, field by field."""
    out = {}
    for s in ds.iter_samples():
        out[s.id] = {
            "filepath": s.filepath,
            "tags": sorted(t for t in s.tags if not t.startswith("lt_")),
            "metadata": s.metadata.to_dict() if s.metadata is not None else None,
            **{
                f: (s[f].to_dict() if s.has_field(f) and s[f] is not None else None) for f in fields
            },
        }
    return out


# -- reading ---------------------------------------------------------------------------------------


def test_samples_read_as_items_in_pixel_boxes(
    fo: ModuleType, dataset: Any, images: list[Path]
) -> None:
    a = add(
        dataset,
        fo,
        images[0],
        ground_truth=detections(
            fo,
            det(fo, "stop", [0.25, 0.5, 0.5, 0.25], confidence=0.3),
            det(fo, "car", [0, 0, 1, 1]),
        ),
    )
    b = add(dataset, fo, images[1], ground_truth=detections(fo))
    c = add(dataset, fo, images[2])
    d = add(
        dataset,
        fo,
        images[3],
        metadata=False,
        ground_truth=detections(fo, det(fo, "car", [0.5, 0.0, 0.5, 1.0])),
    )
    bad = add(
        dataset, fo, images[4], ground_truth=detections(fo, det(fo, "car", [0.8, 0.1, 0.5, 0.2]))
    )
    project = open_project(f"fiftyone://{dataset.name}")
    assert project.name == "fiftyone" and project.tasks == ("detection",)
    items = {it.item_id: it for it in project.iter_items()}
    assert list(items) == [a, b, c, d, bad]
    ia = items[a]
    assert ia.uri == "file://" + str(images[0])
    assert (ia.status, ia.source, ia.width, ia.height) == (
        ItemStatus.LABELED,
        AnnotationSource.HUMAN,
        200,
        100,
    )
    assert ia.annotations == [
        Annotation(label="stop", box=(50.0, 50.0, 150.0, 75.0)),  # a human label has no score
        Annotation(label="car", box=(0.0, 0.0, 200.0, 100.0)),
    ]
    assert items[b].status is ItemStatus.LABELED and items[b].annotations == []
    assert items[c].status is ItemStatus.UNLABELED and (items[c].width, items[c].height) == (64, 64)
    # no metadata: the size comes from the image header, and nothing is saved
    assert items[d].annotations == [Annotation(label="car", box=(150.0, 0.0, 300.0, 150.0))]
    assert dataset[d].metadata is None
    err = items[bad].error or ""
    assert str(images[4]) in err and bad in err and "ground_truth: detection" in err
    assert "ends past the image width 90" in err


def test_a_sample_whose_image_cannot_be_read_is_an_error_item(
    fo: ModuleType, dataset: Any, tmp_path: Path
) -> None:
    missing = add(dataset, fo, tmp_path / "gone.jpg", metadata=False)
    (item,) = open_project(f"fiftyone://{dataset.name}").iter_items()
    assert item.item_id == missing and "cannot read the image size" in (item.error or "")


def test_unknown_datasets_and_unreadable_fields_are_usage_errors(
    fo: ModuleType, dataset: Any, images: list[Path]
) -> None:
    with pytest.raises(UsageError, match=rf"did you mean '{dataset.name}'"):
        open_project(f"fiftyone://{dataset.name}x")
    add(dataset, fo, images[0], ground_truth=fo.Polylines(polylines=[]))
    with pytest.raises(UsageError, match="holds Polylines"):
        open_project(f"fiftyone://{dataset.name}")
    with pytest.raises(UsageError, match="both 'gt'"):
        open_project(f"fiftyone://{dataset.name}?label_field=gt&autolabel_field=gt")
    with pytest.raises(UsageError, match="takes no storage options"):
        open_project(f"fiftyone://{dataset.name}", storage_options={"anon": True})


def test_an_autolabel_field_holding_other_labels_is_refused(
    fo: ModuleType, dataset: Any, images: list[Path]
) -> None:
    add(dataset, fo, images[0], reviewed=detections(fo, det(fo, "car", [0.1, 0.1, 0.2, 0.2])))
    with pytest.raises(UsageError, match="1 label\\(s\\) that labeltriage did not write"):
        open_project(f"fiftyone://{dataset.name}?autolabel_field=reviewed")


def test_predictions_keep_confidences_and_skip_labeltriage_labels(
    fo: ModuleType, dataset: Any, images: list[Path]
) -> None:
    a = add(
        dataset,
        fo,
        images[0],
        predictions=detections(fo, det(fo, "stop sign", [0.25, 0.5, 0.5, 0.25], confidence=0.9)),
    )
    b = add(dataset, fo, images[1], predictions=detections(fo))
    c = add(dataset, fo, images[2])
    d = add(dataset, fo, images[3], predictions=fo.Detections(detections=[], lt_run_id="r0"))
    e = add(
        dataset,
        fo,
        images[4],
        predictions=detections(fo, det(fo, "car", [0.1, 0.1, 0.2, 0.2], confidence=1.5)),
    )
    url = f"fiftyone://{dataset.name}"
    project = open_project(url)
    preds = open_predictions(url, "auto", project=project)
    assert preds.dataset is project.dataset  # type: ignore[attr-defined]
    pa = preds.get(a)
    assert pa is not None and pa.annotations == [
        Annotation(label="stop sign", box=(50.0, 50.0, 150.0, 75.0), score=0.9)
    ]
    assert pa.model_version == "predictions" and pa.source == f"{url}?field=predictions"
    pb = preds.get(b)
    assert pb is not None and pb.annotations == [] and pb.error is None
    assert preds.get(c) is None  # no prediction for this sample
    assert preds.get(d) is None  # written by labeltriage: never read as a prediction
    assert "confidence 1.5, outside [0, 1]" in (preds.get(e).error or "")  # type: ignore[union-attr]
    assert preds.get("not-an-id") is None
    assert {p.item_id for p in preds} == {a, b, e}
    with pytest.raises(UsageError, match="no predictions field 'yolo'"):
        open_predictions(f"{url}?field=yolo", "auto")
    with pytest.raises(UsageError, match="holds the project's human labels"):
        open_predictions(f"{url}?field=ground_truth", "fiftyone", project=project)
    again = pickle.loads(pickle.dumps(preds))
    assert again.get(a) == pa


def test_classification_labels_and_logits(fo: ModuleType, dataset: Any, images: list[Path]) -> None:
    dataset.default_classes = ["cat", "dog", "fox"]
    dataset.save()
    a = add(
        dataset,
        fo,
        images[0],
        ground_truth=fo.Classification(label="dog"),
        predictions=fo.Classification(label="dog", confidence=0.7, logits=[0.0, 2.0, 1.0]),
    )
    b = add(dataset, fo, images[1], predictions=fo.Classification(label="fox", confidence=0.6))
    url = f"fiftyone://{dataset.name}"
    project = open_project(url)
    assert project.tasks == ("classification",)
    items = {it.item_id: it for it in project.iter_items()}
    assert items[a].class_label == "dog" and items[b].status is ItemStatus.UNLABELED
    preds = open_predictions(url, "fiftyone", project=project)
    probs = preds.get(a).probs  # type: ignore[union-attr]
    assert probs is not None and list(probs) == ["cat", "dog", "fox"]
    z = np.exp([0.0, 2.0, 1.0])
    assert list(probs.values()) == pytest.approx(list(z / z.sum()))
    assert preds.get(b).probs == {"fox": 0.6}  # type: ignore[union-attr]


# -- writing and rolling back --------------------------------------------------------------------------


def label_write(
    item: Item, run_id: str, *boxes: tuple[str, tuple[float, ...], float]
) -> LabelWrite:
    return LabelWrite(
        item=item,
        annotations=[Annotation(label=lab, box=box, score=s) for lab, box, s in boxes],  # type: ignore[arg-type]
        provenance=Provenance(
            run_id=run_id,
            model_version="yolov5n",
            score=min((s for *_, s in boxes), default=None),
            tier="easy",
            extra={"difficulty": 0.12, "audit": True},
        ),
    )


def test_autolabels_are_written_with_provenance_and_rolled_back_exactly(
    fo: ModuleType, dataset: Any, images: list[Path]
) -> None:
    human = add(
        dataset, fo, images[0], ground_truth=detections(fo, det(fo, "car", [0.1, 0.1, 0.2, 0.2]))
    )
    free = add(
        dataset,
        fo,
        images[1],
        predictions=detections(fo, det(fo, "car", [0.1, 0.1, 0.5, 0.5], confidence=0.8)),
    )
    late = add(dataset, fo, images[2])
    empty = add(dataset, fo, images[3])
    dataset.tag_samples("reviewed-by-anna")
    url = f"fiftyone://{dataset.name}"
    project = open_project(url)
    items = {it.item_id: it for it in project.iter_items()}
    before = human_snapshot(dataset)
    # a person labels `late` after it was read and before the write
    sample = dataset[late]
    sample.ground_truth = detections(fo, det(fo, "bus", [0.0, 0.0, 0.5, 0.5]))
    sample.save()
    before[late] = human_snapshot(dataset)[late]
    writes = [
        label_write(items[human], "run-1", ("car", (1.0, 1.0, 5.0, 5.0), 0.9)),
        label_write(
            items[free],
            "run-1",
            ("car", (12.0, 8.0, 72.0, 48.0), 0.8),
            ("bus", (0.0, 0.0, 120.0, 80.0), 0.6),
        ),
        label_write(items[late], "run-1", ("car", (1.0, 1.0, 5.0, 5.0), 0.9)),
        label_write(items[empty], "run-1"),
    ]
    manifest = write_run(project, writes, "run-1")
    assert manifest.stage == "committed"
    assert {r.item_id for r in manifest.records} == {free, empty}
    assert manifest.refused[human] == "has a human label (as read)"
    assert "human label in field 'ground_truth' (added since it was read)" in manifest.refused[late]
    dataset.reload()
    assert human_snapshot(dataset) == before  # human fields, tags, metadata untouched
    written = dataset[free].lt_autolabel
    assert [d.label for d in written.detections] == ["car", "bus"]
    assert written.detections[0].bounding_box == pytest.approx([0.1, 0.1, 0.5, 0.5])
    assert written.detections[0].confidence == 0.8
    assert (written.detections[1].lt_run_id, written.detections[1].lt_tier) == ("run-1", "easy")
    assert (written.lt_run_id, written.lt_tier, written.lt_model_version) == (
        "run-1",
        "easy",
        "yolov5n",
    )
    assert (written.lt_score, written.lt_difficulty, written.lt_audit) == (0.6, 0.12, True)
    assert (
        dataset[empty].lt_autolabel.detections == []
        and dataset[empty].lt_autolabel.lt_run_id == "run-1"
    )
    assert dataset[late].lt_autolabel is None and dataset[human].lt_autolabel is None
    # the App can filter on the provenance
    assert dataset.count_values("lt_autolabel.detections.lt_run_id") == {"run-1": 2}
    # read back: auto-labeled, never human; a second run does not stack labels
    reread = {it.item_id: it for it in open_project(url).iter_items()}
    assert (
        reread[free].status is ItemStatus.AUTO_LABELED
        and reread[free].source is AnnotationSource.AUTO
    )
    assert reread[free].annotations[0].box == pytest.approx((12.0, 8.0, 72.0, 48.0))
    second = write_run(
        project, [label_write(items[free], "run-2", ("car", (1.0, 1.0, 9.0, 9.0), 0.9))], "run-2"
    )
    assert second.records == []
    assert "already auto-labeled by run run-1" in second.refused[free]
    # rollback, by a fresh instance: exactly run-1's labels go, and the emptied field too
    result = rollback(open_project(url), "run-1")
    assert sorted(result.removed) == sorted([free, empty]) and result.kept == {}
    dataset.reload()
    assert dataset.get_field("lt_autolabel") is None
    assert human_snapshot(dataset) == before
    assert rollback(open_project(url), "run-1").message.endswith("nothing to do")


def test_rollback_keeps_an_auto_label_a_person_edited(
    fo: ModuleType, dataset: Any, images: list[Path]
) -> None:
    a = add(dataset, fo, images[0])
    b = add(dataset, fo, images[1])
    url = f"fiftyone://{dataset.name}"
    project = open_project(url)
    items = {it.item_id: it for it in project.iter_items()}
    write_run(
        project,
        [label_write(items[i], "run-e", ("car", (1.0, 1.0, 50.0, 50.0), 0.9)) for i in (a, b)],
        "run-e",
    )
    sample = dataset[a]
    sample.lt_autolabel.detections[0].bounding_box = [0.2, 0.2, 0.3, 0.3]  # corrected in the App
    sample.save()
    result = rollback(open_project(url), "run-e")
    assert result.removed == [b]
    assert "changed since it was written" in result.kept[a]
    dataset.reload()
    assert dataset[a].lt_autolabel.detections[0].bounding_box == [0.2, 0.2, 0.3, 0.3]
    assert dataset[b].lt_autolabel is None


def test_a_run_that_fails_midway_removes_what_it_wrote(
    fo: ModuleType, dataset: Any, images: list[Path]
) -> None:
    ids = [add(dataset, fo, p) for p in images[:3]]
    project = open_project(f"fiftyone://{dataset.name}")
    items = {it.item_id: it for it in project.iter_items()}
    real = project.write_labels
    calls = 0

    def write_then_fail(writes: list[LabelWrite]) -> Any:
        nonlocal calls
        calls += 1
        outcome = real(writes)  # written to the dataset ...
        if calls == 2:
            raise RuntimeError("connection lost")  # ... but never recorded in the manifest
        return outcome

    project.write_labels = write_then_fail  # type: ignore[method-assign]
    writes = [label_write(items[i], "run-f", ("car", (1.0, 1.0, 20.0, 20.0), 0.9)) for i in ids]
    with pytest.raises(RuntimeError, match="connection lost"):
        write_run(project, writes, "run-f", chunk_size=1)
    dataset.reload()
    assert dataset.get_field("lt_autolabel") is None or dataset.count("lt_autolabel") == 0
    manifest = load_manifest(project.project, "run-f")
    assert manifest.stage == "rolled_back" and manifest.meta["rollback"]["removed"] == 2


def test_rollback_works_from_another_process_without_local_state(
    fo: ModuleType, dataset: Any, images: list[Path], tmp_path: Path
) -> None:
    ids = [add(dataset, fo, p) for p in images[:2]]
    url = f"fiftyone://{dataset.name}"
    project = open_project(url)
    items = {it.item_id: it for it in project.iter_items()}
    write_run(
        project,
        [label_write(items[i], "run-p", ("car", (1.0, 1.0, 20.0, 20.0), 0.9)) for i in ids],
        "run-p",
    )
    env = {
        **os.environ,
        **fiftyone_env(Path(fo.config.database_dir)),
        "HOME": str(tmp_path / "elsewhere"),
        "LABELTRIAGE_STATE_DIR": str(tmp_path / "no-state"),
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "autolabel.cli", "rollback", "run-p", "--source", url],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run run-p rolled back: 2 item labels removed, 0 kept" in proc.stdout
    dataset.reload()
    assert dataset.get_field("lt_autolabel") is None


# -- the state folder in the database --------------------------------------------------------------------


def test_bookkeeping_files_live_in_the_database(
    fo: ModuleType, dataset: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connectors.formats.fiftyone import state

    fs = open_project(f"fiftyone://{dataset.name}").project
    monkeypatch.setattr(state, "PART_BYTES", 7)  # many parts for a short file
    data = bytes(range(200)) * 3
    fs.write_bytes(".labeltriage/runs/a.json", data)
    assert fs.read_bytes(".labeltriage/runs/a.json") == data
    assert fs.exists(".labeltriage/runs/a.json") and fs.isdir(".labeltriage")
    fs.write_text(".labeltriage/runs/a.json", "short")
    assert fs.read_text(".labeltriage/runs/a.json") == "short"
    # the parts of the old content are gone: one part is left
    db = fo.core.odm.get_db_conn()
    assert (
        db[state.PARTS_COLLECTION].count_documents({"file": fs.resolve(".labeltriage/runs/a.json")})
        == 1
    )
    with pytest.raises(FileExistsError):
        fs.write_text(".labeltriage/runs/a.json", "again", overwrite=False)
    fs.write_text(".labeltriage/runs/b.json", "b", overwrite=False)
    fs.write_text(".labeltriage/auto/x/y.json", "{}")
    assert fs.listdir(".labeltriage") == ["auto", "runs"]
    assert fs.listdir(".labeltriage/runs") == ["a.json", "b.json"]
    with fs.open(".labeltriage/runs/b.json", "rt") as f:
        assert f.read() == "b"
    fs.remove(".labeltriage/runs/b.json")
    assert not fs.exists(".labeltriage/runs/b.json")
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(".labeltriage/runs/b.json")
    with pytest.raises(PathEscapeError):
        fs.write_text("../other/x.json", "no")
    assert (
        fs.url_of(".labeltriage/runs/a.json")
        == f"fiftyone://{dataset.name}/.labeltriage/runs/a.json"
    )
    copy = pickle.loads(pickle.dumps(fs))
    assert copy.read_text(".labeltriage/runs/a.json") == "short"
    # another dataset has its own files
    other = fo.Dataset()
    try:
        assert not open_project(f"fiftyone://{other.name}").project.exists(
            ".labeltriage/runs/a.json"
        )
    finally:
        other.delete()


# -- scores ---------------------------------------------------------------------------------------------


def test_scores_go_back_as_fields_and_tier_tags(
    fo: ModuleType, dataset: Any, images: list[Path]
) -> None:
    ids = [add(dataset, fo, p) for p in images[:4]]
    dataset.select(ids[0]).tag_samples("keep-me")
    dataset.select(ids[3]).tag_samples("lt_hard")  # from an earlier run; this one does not score it
    project = open_project(f"fiftyone://{dataset.name}")
    table = pd.DataFrame(
        {
            "item_id": ids[:3],
            "fourier": [0.1, 0.5, np.nan],
            "score": [0.05, 0.9, np.nan],
            "tier": ["easy", "hard", None],
            "error": [None, None, "img2.png: cannot decode"],
        }
    )
    counts = project.publish_scores(table, {"run_id": "run-s", "scorers": ["fourier"]})  # type: ignore[attr-defined]
    assert counts == {"lt_easy": 1, "lt_medium": 0, "lt_hard": 1}
    dataset.reload()
    assert dataset.values("lt_difficulty") == [0.05, 0.9, None, None]
    assert dataset.values("lt_tier") == ["easy", "hard", None, None]
    assert dataset.values("lt_fourier") == [0.1, 0.5, None, None]
    assert dataset.values("lt_error") == [None, None, "img2.png: cannot decode", None]
    assert dataset.values("lt_score_run") == ["run-s", "run-s", "run-s", None]
    assert [sorted(t) for t in dataset.values("tags")] == [
        ["keep-me", "lt_easy"],
        ["lt_hard"],
        [],
        ["lt_hard"],
    ]
    # the App sorts and filters on them
    assert dataset.sort_by("lt_difficulty", reverse=True).first().id == ids[1]
    # the next run moves a sample to another tier: its old tag goes
    project.publish_scores(
        table.assign(tier=["hard", "easy", None]), {"run_id": "run-t", "scorers": ["fourier"]}
    )  # type: ignore[attr-defined]
    dataset.reload()
    assert [sorted(t) for t in dataset.values("tags")][:2] == [["keep-me", "lt_hard"], ["lt_easy"]]
    # opt out, and a field of another type under our name
    off = open_project(f"fiftyone://{dataset.name}?publish_scores=false")
    assert off.publish_scores(table, {"run_id": "x", "scorers": []}) == {}  # type: ignore[attr-defined]
    dataset.add_sample_field("mine_tier", fo.IntField)
    with pytest.raises(UsageError, match=r"'mine_tier' .* is a IntField, not a StringField"):
        open_project(f"fiftyone://{dataset.name}?prefix=mine_").publish_scores(
            table, {"run_id": "x", "scorers": []}
        )  # type: ignore[attr-defined]


# -- a whole project --------------------------------------------------------------------------------------


def test_a_voc_project_written_into_a_dataset_reads_back_the_same(
    fo: ModuleType, dataset: Any
) -> None:
    sample = REPO / "examples" / "sample_project"
    voc = open_project(str(sample), "voc")
    source = [it for _, it in zip(range(30), voc.iter_items(), strict=False)]
    as_urls = [it.model_copy(update={"uri": "file://" + str(sample / it.uri)}) for it in source]
    project = open_project(f"fiftyone://{dataset.name}")
    project.write_items(as_urls, classes=["stop", "trafficlight", "speedlimit", "crosswalk"])
    back = list(open_project(f"fiftyone://{dataset.name}").iter_items())
    assert len(back) == len(source)
    for a, b in zip(source, back, strict=True):
        assert b.status == a.status
        w, h = Image.open(sample / a.uri).size  # the dataset knows every image's size
        assert (b.width, b.height) == (w, h)
        assert [x.label for x in b.annotations] == [x.label for x in a.annotations]
        for x, y in zip(a.annotations, b.annotations, strict=True):
            assert y.box == pytest.approx(x.box, abs=1e-6)
    assert dataset.classes["ground_truth"][0] == "stop"
    with pytest.raises(UsageError, match="already has 30 samples"):
        project.write_items(as_urls)

"""The auto-label gate end to end on a small Pascal VOC project: select, write, refuse, audit, roll back."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import connectors.formats  # noqa: F401  (registers every format)
from autolabel.audit import choose_audit, measure_audit_precision
from autolabel.gate import auto_label, run_autolabel
from connectors.errors import UsageError
from connectors.formats._filebased import LabelFileFormat
from connectors.formats.base import FORMATS, PredictionSource, ProjectFormat
from connectors.formats.voc import VocFormat
from connectors.labelmap import LabelMap
from connectors.labelstudio.provenance import package_version
from connectors.model import Annotation, Item, ItemStatus, Prediction
from connectors.storage import ProjectFS
from connectors.writeback import list_runs, load_manifest, rollback, write_run
from difficulty.runrecord import GateRecord
from difficulty.table import read_difficulty, write_difficulty

LABEL_MAP = LabelMap(map={"stop sign": "stop"})
GOOD_BOX = (2.0, 2.0, 12.0, 12.0)


def voc_xml(name: str, boxes: list[tuple[str, tuple[float, float, float, float]]]) -> str:
    objects = "".join(
        f"<object><name>{label}</name><bndbox><xmin>{b[0]:g}</xmin><ymin>{b[1]:g}</ymin><xmax>{b[2]:g}</xmax><ymax>{b[3]:g}</ymax></bndbox></object>"
        for label, b in boxes
    )
    return f"<annotation><filename>{name}.jpg</filename><size><width>16</width><height>16</height><depth>3</depth></size>{objects}</annotation>"


class DictPredictions(PredictionSource):
    """Predictions held in a dict; ``on_get`` runs before each lookup (to simulate races)."""

    def __init__(
        self, preds: dict[str, Prediction], on_get: dict[str, object] | None = None
    ) -> None:
        self.preds = preds
        self.on_get = on_get or {}

    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        hook = self.on_get.pop(item_id, None)
        if callable(hook):
            hook()
        return self.preds.get(item_id)

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.preds.values())


def make_project(
    root: Path, *, n_labeled: int = 80, n_unlabeled: int = 20, hard_from: float = 0.75
) -> tuple[DictPredictions, pd.DataFrame]:
    """A VOC project: labeled items ``l00..``, unlabeled ``u00..``; difficulty rises with the index.

    Predictions are right (one ``stop sign`` box on the true box) for items with difficulty
    below ``hard_from`` and carry an extra confident box above it.
    """
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    preds: dict[str, Prediction] = {}
    rows = []
    ids = [(f"l{i:02d}", i / n_labeled, True) for i in range(n_labeled)] + [
        (f"u{i:02d}", i / n_unlabeled, False) for i in range(n_unlabeled)
    ]
    for item_id, score, labeled in ids:
        Image.new("RGB", (16, 16), (120, 30, 30)).save(root / "images" / f"{item_id}.jpg")
        if labeled:
            (root / "annotations" / f"{item_id}.xml").write_text(
                voc_xml(item_id, [("stop", GOOD_BOX)])
            )
        anns = [
            Annotation(label="stop sign", box=GOOD_BOX, score=0.9),
            Annotation(label="person", box=(0, 0, 5, 5), score=0.8),
        ]
        if score >= hard_from:
            anns.append(Annotation(label="stop sign", box=(13.0, 13.0, 16.0, 16.0), score=0.85))
        preds[item_id] = Prediction(item_id=item_id, annotations=anns, model_version="yolo-test-1")
        rows.append(
            {
                "item_id": item_id,
                "uri": f"images/{item_id}.jpg",
                "status": "labeled" if labeled else "unlabeled",
                "score": score,
            }
        )
    df = pd.DataFrame(rows)
    df["tier"] = np.where(df["score"] < 0.3, "easy", "medium")
    df["rank"] = df["score"].rank(ascending=False, method="first").astype(int)
    df["error"] = None
    return DictPredictions(preds), df


def snapshot(root: Path, *, skip_bookkeeping: bool = True) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not (skip_bookkeeping and rel.startswith(".labeltriage/")):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture()
def project(tmp_path: Path) -> tuple[VocFormat, DictPredictions, str, Path]:
    root = tmp_path / "proj"
    preds, df = make_project(root)
    report = tmp_path / "report"
    write_difficulty(df, str(report), {"scorers": [], "run_id": "score-1"})
    return VocFormat(ProjectFS(str(root))), preds, str(report), root


def _run(fmt: ProjectFormat, preds: PredictionSource, report: str, **kw: object) -> GateRecord:
    args: dict[str, object] = {
        "difficulty_dir": report,
        "predictions": preds,
        "epsilon": 0.1,
        "delta": 0.1,
        "label_map": LABEL_MAP,
    }
    args.update(kw)
    return run_autolabel(fmt, **args)  # type: ignore[arg-type]


def test_writes_only_easy_unlabeled_items_with_provenance(
    project: tuple[VocFormat, DictPredictions, str, Path],
) -> None:
    fmt, preds, report, root = project
    before = snapshot(root)
    res = _run(fmt, preds, report, audit_share=0.0)
    t = res.threshold
    assert t is not None and 0.5 < t < 0.8
    assert res.bound <= 0.1 and res.n >= 30
    expected = sorted(f"u{i:02d}" for i in range(20) if i / 20 <= t)
    assert res.written == expected == res.selected
    after = snapshot(root)
    # human labels untouched; only annotation files of the selected items appeared
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == [f"annotations/{i}.xml" for i in expected]
    # the written label is the mapped prediction: one stop box, the unmapped person dropped
    items = {i.item_id: i for i in fmt.iter_items()}
    assert items[expected[0]].status.value == "auto_labeled"
    assert [(a.label, a.box) for a in items[expected[0]].annotations] == [("stop", GOOD_BOX)]
    sidecar = json.loads((root / ".labeltriage" / "auto" / f"{expected[0]}.json").read_text())
    prov = sidecar["provenance"]
    assert (
        prov["run_id"] == res.run_id
        and prov["model_version"] == "yolo-test-1"
        and prov["tier"] == "easy"
    )
    assert prov["score"] == pytest.approx(0.9) and prov["extra"]["difficulty"] <= t
    # one score, one set of tiers, one gate: the run's table now cuts "easy" at t, and
    # every written item is in it (the scored table had them in "medium")
    table, meta = read_difficulty(report)
    assert meta["tiers"]["source"] == "calibrated" and meta["tiers"]["easy_max"] == t
    tier = dict(zip(table["item_id"], table["tier"], strict=True))
    assert {tier[i] for i in res.written} == {"easy"}
    assert set(table.loc[table["tier"] == "easy", "item_id"]) == set(
        table.loc[table["score"] <= t, "item_id"]
    )
    assert res.tiers is not None and res.tiers.source == "calibrated"
    assert res.tiers.counts["easy"] == int((table["score"] <= t).sum())
    report_json = json.loads(Path(report, "autolabel.json").read_text())
    for key in (
        "run_id",
        "stage",
        "threshold",
        "box_confidence",
        "bound",
        "n",
        "k",
        "epsilon",
        "delta",
        "written",
        "refused",
        "audit",
        "coverage",
        "dry_run",
    ):
        assert key in report_json
    assert report_json["written"] == expected and report_json["dry_run"] is False
    assert load_manifest(fmt.project, res.run_id).stage == "committed"


def test_nothing_passes_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    preds, df = make_project(root, hard_from=0.0)  # every prediction carries a wrong box
    write_difficulty(df, str(tmp_path / "r"), {"scorers": []})
    fmt = VocFormat(ProjectFS(str(root)))
    before = snapshot(root)
    res = _run(fmt, preds, str(tmp_path / "r"))
    assert res.threshold is None and res.written == [] and res.coverage == 0.0
    assert snapshot(root) == before
    assert json.loads((tmp_path / "r" / "autolabel.json").read_text())["threshold"] is None


def test_dry_run_writes_nothing_and_reports(
    project: tuple[VocFormat, DictPredictions, str, Path],
) -> None:
    fmt, preds, report, root = project
    before = snapshot(root, skip_bookkeeping=False)
    res = _run(fmt, preds, report, dry_run=True)
    assert res.dry_run and res.selected and res.written == []
    assert snapshot(root, skip_bookkeeping=False) == before
    assert not Path(report, "autolabel.json").exists()


# -- the same write-back guarantees on every writable project format ------------------------

WRITABLE = ("voc", "yolo", "coco", "labelstudio")


class FormatProject:
    """A small project in one format: names ``l00..l59`` (labeled) and ``u00..u19`` (unlabeled).

    ``ids`` maps those names to the format's own item ids (Label Studio uses task ids).
    """

    def __init__(self, kind: str, root: Path, n_labeled: int = 60, n_unlabeled: int = 20) -> None:
        self.kind, self.root = kind, root
        (root / "images").mkdir(parents=True)
        items = []
        for name, labeled in [(f"l{i:02d}", True) for i in range(n_labeled)] + [
            (f"u{i:02d}", False) for i in range(n_unlabeled)
        ]:
            Image.new("RGB", (16, 16), (90, 20, 20)).save(root / "images" / f"{name}.jpg")
            items.append(
                Item(
                    item_id=name,
                    uri=f"images/{name}.jpg",
                    width=16,
                    height=16,
                    status=ItemStatus.LABELED if labeled else ItemStatus.UNLABELED,
                    annotations=[Annotation(label="stop", box=GOOD_BOX)] if labeled else [],
                )
            )
        FORMATS[kind](ProjectFS(str(root))).write_items(items, classes=["stop"])
        self.ids = {Path(i.uri).stem: i.item_id for i in self.fmt().iter_items()}

    def fmt(self) -> ProjectFormat:
        return FORMATS[self.kind](ProjectFS(str(self.root)))

    def predictions(self) -> DictPredictions:
        return DictPredictions(
            {
                item_id: Prediction(
                    item_id=item_id,
                    annotations=[Annotation(label="stop sign", box=GOOD_BOX, score=0.9)],
                    model_version="yolo-test-1",
                )
                for item_id in self.ids.values()
            }
        )

    def difficulty(self, out: Path, unlabeled: dict[str, float]) -> str:
        """Labeled items score ``i/60``; unlabeled ones as given (others are left unscored)."""
        rows = [(self.ids[f"l{i:02d}"], i / 60) for i in range(60)] + [
            (self.ids[n], v) for n, v in unlabeled.items()
        ]
        df = pd.DataFrame(
            {
                "item_id": [r[0] for r in rows],
                "uri": "",
                "status": "",
                "score": [r[1] for r in rows],
                "tier": None,
                "rank": 1,
                "error": None,
            }
        )
        write_difficulty(df, str(out), {"scorers": []})
        return str(out)

    def state(self) -> dict[str, tuple[str, list[tuple[str, object]]]]:
        """Every item's status and label, by name: what a reviewer would see."""
        by_id = {v: k for k, v in self.ids.items()}
        return {
            by_id[i.item_id]: (i.status.value, [(a.label, a.box) for a in i.annotations])
            for i in self.fmt().iter_items()
        }

    def add_human_label(self, name: str, box: tuple[float, float, float, float]) -> None:
        """What an annotation tool does when a person saves a label for ``name``."""
        item_id = self.ids[name]
        if self.kind in ("voc", "yolo"):
            fmt = self.fmt()
            assert isinstance(fmt, LabelFileFormat)
            item = Item(item_id=item_id, uri=f"images/{name}.jpg", width=16, height=16)
            (self.root / fmt.label_path(item_id)).write_bytes(
                fmt.render_label(item, [Annotation(label="stop", box=box)])
            )
        elif self.kind == "coco":
            path = self.root / "annotations.json"
            data = json.loads(path.read_text())
            image_id = next(im["id"] for im in data["images"] if im["file_name"] == f"{name}.jpg")
            next_id = max([a["id"] for a in data["annotations"]] + [0]) + 1
            w, h = box[2] - box[0], box[3] - box[1]
            data["annotations"].append(
                {
                    "id": next_id,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            path.write_text(json.dumps(data))
        else:
            path = self.root / "export.json"
            tasks = json.loads(path.read_text())
            task = next(t for t in tasks if str(t["id"]) == item_id)
            value = {
                "x": box[0] / 16 * 100,
                "y": box[1] / 16 * 100,
                "width": (box[2] - box[0]) / 16 * 100,
                "height": (box[3] - box[1]) / 16 * 100,
                "rotation": 0,
                "rectanglelabels": ["stop"],
            }
            result = {
                "id": "hx",
                "type": "rectanglelabels",
                "from_name": "label",
                "to_name": "image",
                "original_width": 16,
                "original_height": 16,
                "value": value,
            }
            task["annotations"].append(
                {"id": 900, "result": [result], "was_cancelled": False, "ground_truth": False}
            )
            path.write_text(json.dumps(tasks, indent=1))


@pytest.fixture(params=WRITABLE)
def fproject(request: pytest.FixtureRequest, tmp_path: Path) -> FormatProject:
    return FormatProject(request.param, tmp_path / request.param)


def _gate(p: FormatProject, preds: PredictionSource, report: str, **kw: object) -> Any:
    return _run(p.fmt(), preds, report, **{"audit_share": 0.0, **kw})


def _tmp_files(root: Path) -> list[Path]:
    return [q for q in root.rglob("*") if q.is_file() and q.name.endswith(".tmp")]


def test_each_format_writes_with_provenance(fproject: FormatProject, tmp_path: Path) -> None:
    p = fproject
    report = p.difficulty(tmp_path / "r", {f"u{i:02d}": i / 20 for i in range(20)})
    before = p.state()
    res = _gate(p, p.predictions(), report)
    assert res.threshold is not None and res.written and not res.refused
    names = {v: k for k, v in p.ids.items()}
    after = p.state()
    for name, state in after.items():
        if p.ids[name] in res.written:
            assert state == ("auto_labeled", [("stop", GOOD_BOX)])
        else:
            assert state == before[name]
    if p.kind in ("voc", "yolo"):
        prov = json.loads(
            (p.root / ".labeltriage" / "auto" / f"{res.written[0]}.json").read_text()
        )["provenance"]
        assert (prov["run_id"], prov["model_version"], prov["tier"]) == (
            res.run_id,
            "yolo-test-1",
            "easy",
        )
    elif p.kind == "labelstudio":
        task = next(
            t
            for t in json.loads((p.root / "export.json").read_text())
            if str(t["id"]) == res.written[0]
        )
        (pred,) = task["predictions"]
        assert pred["model_version"] == f"labeltriage-{package_version()}/{res.run_id}"
        assert pred["labeltriage"]["model_version"] == "yolo-test-1"
        assert pred["score"] == pytest.approx(0.9)
        assert task["annotations"] == []  # predictions, never annotations
    else:
        data = json.loads((p.root / "annotations.json").read_text())
        auto = [a for a in data["annotations"] if "labeltriage" in a]
        assert {a["labeltriage"]["run_id"] for a in auto} == {res.run_id} and all(
            a["score"] == pytest.approx(0.9) for a in auto
        )
    assert all(names[i].startswith("u") for i in res.written)


def _human_label_during_selection(
    p: FormatProject, tmp_path: Path
) -> tuple[str, DictPredictions, str, tuple[float, float, float, float]]:
    """A scored project whose ``u01`` gets a human label while the gate selects it (read as
    unlabeled, a person saves a label now): report, predictions, its id, the human box."""
    report = p.difficulty(tmp_path / "r", {f"u{i:02d}": i / 20 for i in range(20)})
    preds = p.predictions()
    target = p.ids["u01"]
    human_box = (1.0, 1.0, 9.0, 9.0)
    preds.on_get[target] = lambda: p.add_human_label("u01", human_box)
    return report, preds, target, human_box


def test_each_format_refuses_a_human_label_that_appears_after_selection(
    fproject: FormatProject, tmp_path: Path
) -> None:
    p = fproject
    report, preds, target, human_box = _human_label_during_selection(p, tmp_path)
    res = _gate(p, preds, report)
    assert target in res.selected and target not in res.written and target in res.refused
    assert p.state()["u01"] == ("labeled", [("stop", human_box)])
    assert len(res.written) == len(res.selected) - 1


def test_an_item_refused_at_write_time_leaves_the_audit_list(
    fproject: FormatProject, tmp_path: Path
) -> None:
    p = fproject
    report, preds, target, _ = _human_label_during_selection(p, tmp_path)
    res = _gate(p, preds, report, audit_share=1.0)  # every selected item is chosen for audit
    assert target in res.selected and target in res.refused
    assert target not in res.audit and res.audit == res.written
    manifest = load_manifest(p.fmt().project, res.run_id)
    assert manifest.meta["audit"]["item_ids"] == res.audit


def test_each_format_rollback_is_exact(fproject: FormatProject, tmp_path: Path) -> None:
    p = fproject
    preds = p.predictions()
    start = p.state()
    # u09 is harder than every calibration item: the first run leaves it alone
    first = _gate(
        p,
        preds,
        p.difficulty(tmp_path / "r1", {**{f"u{i:02d}": i / 10 for i in range(9)}, "u09": 5.0}),
    )
    assert first.written and p.ids["u09"] not in first.written
    p.add_human_label("u09", (3.0, 3.0, 11.0, 11.0))  # a person labels an item the run left alone
    second = _gate(
        p, preds, p.difficulty(tmp_path / "r2", {f"u{i:02d}": 0.0 for i in range(10, 20)})
    )
    assert sorted(second.written) == sorted(p.ids[f"u{i:02d}"] for i in range(10, 20))
    before_rollback = p.state()
    files_before = snapshot(p.root)

    result = rollback(p.fmt(), first.run_id)
    assert sorted(result.removed) == sorted(first.written) and result.kept == {}
    now = p.state()
    names = {v: k for k, v in p.ids.items()}
    for name in now:
        if p.ids[name] in first.written:
            assert now[name] == start[name] == ("unlabeled", [])
        else:
            assert (
                now[name] == before_rollback[name]
            )  # the second run's labels, the human's label, the rest
    assert now["u09"][0] == "labeled"
    if p.kind in ("voc", "yolo"):
        gone = set(files_before) - set(snapshot(p.root))
        assert gone == {p.fmt().label_path(i) for i in first.written}  # type: ignore[attr-defined]
    assert {r.run_id: r.stage for r in list_runs(p.fmt().project)} == {
        first.run_id: "rolled_back",
        second.run_id: "committed",
    }
    assert all(names[i].startswith("u") for i in result.removed)


def test_each_format_crash_mid_write_leaves_nothing_behind(
    fproject: FormatProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = fproject
    report = p.difficulty(tmp_path / "r", {f"u{i:02d}": i / 20 for i in range(20)})
    before, files_before = p.state(), snapshot(p.root)
    kwdefaults = write_run.__kwdefaults__
    assert kwdefaults is not None
    monkeypatch.setitem(kwdefaults, "chunk_size", 5)  # several chunks per run
    # crash at the 4th label file, or at the 2nd rewrite of the JSON file
    crash_at = 4 if p.kind in ("voc", "yolo") else 2
    real_write = ProjectFS.write_bytes
    calls = {"n": 0}

    def write_bytes(self: ProjectFS, rel: str, data: bytes, *, overwrite: bool = True) -> str:
        if not rel.startswith(".labeltriage/"):
            calls["n"] += 1
            if calls["n"] == crash_at:  # the disk fills up while the bytes are being written

                def no_space(fd: int) -> None:
                    raise OSError(28, "No space left on device")

                with monkeypatch.context() as m:
                    m.setattr(os, "fsync", no_space)
                    return real_write(self, rel, data, overwrite=overwrite)
        return real_write(self, rel, data, overwrite=overwrite)

    real_replace = ProjectFS.replace_if

    def replace_if(self: ProjectFS, rel: str, data: bytes, version: str) -> str:
        calls["n"] += 1  # the JSON formats rewrite their file by compare-and-swap
        if calls["n"] == crash_at:
            with monkeypatch.context() as m:
                m.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space")))
                return real_replace(self, rel, data, version)
        return real_replace(self, rel, data, version)

    monkeypatch.setattr(ProjectFS, "write_bytes", write_bytes)
    monkeypatch.setattr(ProjectFS, "replace_if", replace_if)
    with pytest.raises(OSError, match="No space"):
        _gate(p, p.predictions(), report)
    monkeypatch.undo()
    assert calls["n"] >= crash_at  # (the undo rewrites too)
    assert p.state() == before
    assert _tmp_files(p.root) == []
    if p.kind in ("voc", "yolo"):
        assert snapshot(p.root) == files_before
    (manifest,) = list_runs(p.fmt().project)
    assert manifest.stage == "rolled_back" and "No space" in (manifest.error or "")


def test_audit_share_is_deterministic_and_measured(
    project: tuple[VocFormat, DictPredictions, str, Path],
) -> None:
    fmt, preds, report, root = project
    res = _run(fmt, preds, report, audit_share=0.25, run_id="20260101T000000000000Z-abcdef")
    assert len(res.audit) == int(np.ceil(0.25 * len(res.written)))
    assert set(res.audit) <= set(res.written)
    assert res.audit == choose_audit(res.written, res.run_id, 0.25)
    manifest = load_manifest(fmt.project, res.run_id)
    assert manifest.meta["audit"]["item_ids"] == res.audit
    assert json.loads(Path(report, "autolabel.json").read_text())["audit"] == res.audit
    assert measure_audit_precision(fmt).reviewed == 0
    # a reviewer fixes the first audited item (moves the box), and leaves the others as they are
    wrong, *_ = res.audit
    (root / "annotations" / f"{wrong}.xml").write_text(
        voc_xml(wrong, [("stop", (8.0, 8.0, 16.0, 16.0))])
    )
    measured = measure_audit_precision(fmt)
    assert measured.audited == len(res.audit) and measured.reviewed == 1
    assert measured.correct == 0 and measured.precision == 0.0


def test_bad_arguments_are_usage_errors(
    project: tuple[VocFormat, DictPredictions, str, Path],
) -> None:
    fmt, preds, report, _ = project
    with pytest.raises(UsageError, match="exactly one"):
        run_autolabel(fmt, difficulty_dir=report, epsilon=0.1, delta=0.1, label_map=LABEL_MAP)
    with pytest.raises(UsageError, match="stage"):
        _run(fmt, preds, report, stage="yolo")
    with pytest.raises(UsageError, match="audit share"):
        _run(fmt, preds, report, audit_share=1.5)


def _run_with_checkpoint(
    project: tuple[VocFormat, DictPredictions, str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    meta: dict[str, object],
    **kw: object,
) -> tuple[GateRecord, list[str], list[str]]:
    """A gate run with a checkpoint holding out every other labeled item (inference faked);
    the record, the items predicted and the held-out ids."""
    from dataclasses import dataclass, field

    import difficulty.inference
    from difficulty.checkpoint import save_checkpoint

    fmt, preds, report, _ = project
    held_out = [f"l{i:02d}" for i in range(0, 80, 2)]  # 40 of the 80 labeled items
    ckpt = str(tmp_path / "model.pt")
    save_checkpoint(
        ckpt,
        {},
        {"task": "detection", "calibration_ids": held_out, "model_version": "ckpt-7", **meta},
    )

    @dataclass
    class Batch:
        predictions: list[Prediction]
        errors: dict[str, str] = field(default_factory=dict)

    seen: list[str] = []

    def fake_infer(
        checkpoint: object, items: list[Item], project: object, **kw: object
    ) -> Iterator[Batch]:
        seen.extend(i.item_id for i in items)
        yield Batch(
            [preds.preds[i.item_id].model_copy(update={"model_version": None}) for i in items]
        )

    monkeypatch.setattr(difficulty.inference, "infer", fake_infer)
    res = run_autolabel(
        fmt,
        difficulty_dir=report,
        checkpoint=ckpt,
        epsilon=0.1,
        delta=0.1,
        label_map=LABEL_MAP,
        **kw,  # type: ignore[arg-type]
    )
    return res, seen, held_out


def test_checkpoint_calibrates_only_on_its_held_out_items(
    project: tuple[VocFormat, DictPredictions, str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With our own model, items it trained on never enter the calibration."""
    res, seen, held_out = _run_with_checkpoint(
        project, tmp_path, monkeypatch, {}, box_confidences=(0.5,)
    )
    assert res.n_calibration == 40
    assert {i for i in seen if i.startswith("l")} == set(
        held_out
    )  # trained-on items are not even predicted
    assert res.written and res.model_version == "ckpt-7"
    sidecar = json.loads(
        (
            Path(project[0].project.root) / ".labeltriage" / "auto" / f"{res.written[0]}.json"
        ).read_text()
    )
    assert sidecar["provenance"]["model_version"] == "ckpt-7"


def test_checkpoint_box_confidence_is_tested_at_the_full_delta(
    project: tuple[VocFormat, DictPredictions, str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A box confidence chosen on the training items is not calibrated again: one walk at δ.

    30 of the 40 held-out items are right: enough at the full δ = 0.1 (22 needed), not at
    δ / 5 (38 needed), so splitting δ over the grid would label nothing.
    """
    chosen = {"box_confidence": {"value": 0.5, "rule": "test"}}
    res, _, _ = _run_with_checkpoint(project, tmp_path, monkeypatch, chosen)
    assert res.level == pytest.approx(0.1)
    assert res.box_confidence == 0.5
    assert [w.box_confidence for w in res.per_confidence] == [0.5]
    assert res.threshold is not None and res.n == 30 and res.k == 0
    assert res.written


def test_an_explicit_grid_is_calibrated_with_delta_split(
    project: tuple[VocFormat, DictPredictions, str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Explicit ``box_confidences`` win over the checkpoint's own, at the price of δ / |C|."""
    chosen = {"box_confidence": {"value": 0.5, "rule": "test"}}
    res, _, _ = _run_with_checkpoint(
        project, tmp_path, monkeypatch, chosen, box_confidences=(0.1, 0.25, 0.4, 0.55, 0.7)
    )
    assert res.level == pytest.approx(0.02)
    assert len(res.per_confidence) == 5
    assert res.threshold is None and not res.written


def test_checkpoint_without_calibration_split_is_refused(
    project: tuple[VocFormat, DictPredictions, str, Path], tmp_path: Path
) -> None:
    from difficulty.checkpoint import save_checkpoint

    fmt, _, report, _ = project
    ckpt = str(tmp_path / "model.pt")
    save_checkpoint(ckpt, {}, {"task": "detection"})
    with pytest.raises(UsageError, match="calibration"):
        run_autolabel(
            fmt, difficulty_dir=report, checkpoint=ckpt, epsilon=0.1, delta=0.1, label_map=LABEL_MAP
        )


def test_auto_label_classification_and_detection() -> None:
    lm = LabelMap(map={"seven": "7", "one": "1", "car": "Car"}, ignore=("DontCare",))
    pred = Prediction(item_id="a", probs={"seven": 0.7, "one": 0.2, "dog": 0.1})
    assert auto_label(pred, lm, task="classification", box_confidence=0.5) == [
        Annotation(label="7", score=0.7)
    ]
    assert auto_label(pred, lm, task="classification", box_confidence=0.8) is None
    boxes = Prediction(
        item_id="b",
        annotations=[
            Annotation(label="car", box=(0, 0, 5, 5), score=0.9),
            Annotation(label="car", box=(5, 5, 9, 9), score=0.2),
            Annotation(label="dog", box=(1, 1, 4, 4), score=0.95),
        ],
    )
    assert auto_label(boxes, lm, task="detection", box_confidence=0.25) == [
        Annotation(label="Car", box=(0, 0, 5, 5), score=0.9)
    ]
    assert auto_label(boxes, lm, task="detection", box_confidence=0.95) == []  # "nothing here"


def test_score_weights_fit_on_labels_are_recorded(
    project: tuple[VocFormat, DictPredictions, str, Path],
) -> None:
    fmt, preds, report, _ = project
    df = pd.read_parquet(Path(report, "difficulty.parquet"))
    write_difficulty(
        df,
        report,
        {"scorers": [], "combination": {"method": "rho", "n_labeled": 80, "weights": {}}},
    )
    res = _run(fmt, preds, report, dry_run=True)
    assert res.score_weights_fit_on == 80
    write_difficulty(
        df,
        report,
        {"scorers": [], "combination": {"method": "default", "n_labeled": 80, "weights": {}}},
    )
    assert _run(fmt, preds, report, dry_run=True).score_weights_fit_on == 0

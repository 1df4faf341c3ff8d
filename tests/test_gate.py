"""The auto-label gate end to end on a small Pascal VOC project: select, write, refuse, audit, roll back."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from autolabel.audit import choose_audit, measure_audit_precision
from autolabel.gate import run_autolabel
from connectors.errors import UsageError
from connectors.formats.base import PredictionSource
from connectors.formats.voc import VocFormat
from connectors.labelmap import LabelMap
from connectors.model import Annotation, Item, Prediction
from connectors.storage import ProjectFS
from connectors.writeback import list_runs, load_manifest, rollback
from difficulty.table import write_difficulty

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

    def __init__(self, preds: dict[str, Prediction], on_get: dict[str, object] | None = None) -> None:
        self.preds = preds
        self.on_get = on_get or {}

    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        hook = self.on_get.pop(item_id, None)
        if callable(hook):
            hook()
        return self.preds.get(item_id)

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.preds.values())


def make_project(root: Path, *, n_labeled: int = 80, n_unlabeled: int = 20, hard_from: float = 0.75) -> tuple[DictPredictions, pd.DataFrame]:
    """A VOC project: labeled items ``l00..``, unlabeled ``u00..``; difficulty rises with the index.

    Predictions are right (one ``stop sign`` box on the true box) for items with difficulty
    below ``hard_from`` and carry an extra confident box above it.
    """
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    preds: dict[str, Prediction] = {}
    rows = []
    ids = [(f"l{i:02d}", i / n_labeled, True) for i in range(n_labeled)] + [(f"u{i:02d}", i / n_unlabeled, False) for i in range(n_unlabeled)]
    for item_id, score, labeled in ids:
        Image.new("RGB", (16, 16), (120, 30, 30)).save(root / "images" / f"{item_id}.jpg")
        if labeled:
            (root / "annotations" / f"{item_id}.xml").write_text(voc_xml(item_id, [("stop", GOOD_BOX)]))
        anns = [Annotation(label="stop sign", box=GOOD_BOX, score=0.9), Annotation(label="person", box=(0, 0, 5, 5), score=0.8)]
        if score >= hard_from:
            anns.append(Annotation(label="stop sign", box=(13.0, 13.0, 16.0, 16.0), score=0.85))
        preds[item_id] = Prediction(item_id=item_id, annotations=anns, model_version="yolo-test-1")
        rows.append({"item_id": item_id, "uri": f"images/{item_id}.jpg", "status": "labeled" if labeled else "unlabeled", "score": score})
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


def _run(fmt: VocFormat, preds: PredictionSource, report: str, **kw: object) -> object:
    args: dict[str, object] = {"difficulty_dir": report, "predictions": preds, "epsilon": 0.1, "delta": 0.1, "label_map": LABEL_MAP}
    args.update(kw)
    return run_autolabel(fmt, **args)  # type: ignore[arg-type]


def test_writes_only_easy_unlabeled_items_with_provenance(project: tuple[VocFormat, DictPredictions, str, Path]) -> None:
    fmt, preds, report, root = project
    before = snapshot(root)
    res = _run(fmt, preds, report, audit_share=0.0)
    t = res.threshold
    assert t is not None and 0.5 < t < 0.8
    assert res.bound <= 0.1 and res.calibration.n >= 30
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
    assert prov["run_id"] == res.run_id and prov["model_version"] == "yolo-test-1" and prov["tier"] == "easy"
    assert prov["score"] == pytest.approx(0.9) and prov["extra"]["difficulty"] <= t
    report_json = json.loads(Path(report, "autolabel.json").read_text())
    for key in ("run_id", "stage", "threshold", "box_confidence", "bound", "n", "k", "epsilon", "delta", "written", "refused", "audit", "coverage", "dry_run"):
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


def test_dry_run_writes_nothing_and_reports(project: tuple[VocFormat, DictPredictions, str, Path]) -> None:
    fmt, preds, report, root = project
    before = snapshot(root, skip_bookkeeping=False)
    res = _run(fmt, preds, report, dry_run=True)
    assert res.dry_run and res.selected and res.written == []
    assert snapshot(root, skip_bookkeeping=False) == before
    assert not Path(report, "autolabel.json").exists()


def test_human_label_appearing_after_selection_is_never_overwritten(project: tuple[VocFormat, DictPredictions, str, Path]) -> None:
    fmt, preds, report, root = project
    human = voc_xml("u01", [("stop", (1.0, 1.0, 9.0, 9.0))])

    def annotator_saves() -> None:  # runs after u01 was read as unlabeled, before the write
        (root / "annotations" / "u01.xml").write_text(human)

    preds.on_get["u01"] = annotator_saves
    res = _run(fmt, preds, report)
    assert "u01" in res.selected and "u01" not in res.written
    assert "u01" in res.refused
    assert (root / "annotations" / "u01.xml").read_text() == human
    assert not (root / ".labeltriage" / "auto" / "u01.json").exists()
    assert "u01" not in res.audit


def test_rollback_removes_exactly_what_the_run_wrote(project: tuple[VocFormat, DictPredictions, str, Path]) -> None:
    fmt, preds, report, root = project
    before = snapshot(root, skip_bookkeeping=False)
    first = _run(fmt, preds, report)
    assert first.written
    # a second run on new items, and a person's own edit elsewhere, must survive the rollback
    Image.new("RGB", (16, 16)).save(root / "images" / "u99.jpg")
    preds.preds["u99"] = Prediction(item_id="u99", annotations=[Annotation(label="stop sign", box=GOOD_BOX, score=0.95)])
    df = pd.DataFrame({"item_id": ["u99"], "uri": ["images/u99.jpg"], "status": ["unlabeled"], "score": [0.0], "tier": ["easy"], "rank": [1], "error": [None]})
    write_difficulty(pd.concat([pd.read_parquet(Path(report, "difficulty.parquet")), df]), report, {"scorers": []})
    second = _run(fmt, preds, report)
    assert second.written == ["u99"]
    (root / "annotations" / "l05.xml").write_text(voc_xml("l05", [("stop", (3.0, 3.0, 12.0, 12.0))]))
    after_second = snapshot(root, skip_bookkeeping=False)

    result = rollback(fmt, first.run_id)
    assert sorted(result.removed) == first.written and result.kept == {}
    now = snapshot(root, skip_bookkeeping=False)
    gone = set(after_second) - set(now)
    assert gone == {f"annotations/{i}.xml" for i in first.written} | {f".labeltriage/auto/{i}.json" for i in first.written}
    changed = {k for k in now if k in after_second and now[k] != after_second[k]}
    assert changed == {f".labeltriage/runs/{first.run_id}.json"}  # only its own manifest, marked rolled back
    assert "annotations/u99.xml" in now and now["annotations/l05.xml"] != before["annotations/l05.xml"]
    assert {r.run_id: r.stage for r in list_runs(fmt.project)} == {first.run_id: "rolled_back", second.run_id: "committed"}


def test_crash_mid_write_leaves_no_partial_file(project: tuple[VocFormat, DictPredictions, str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    fmt, preds, report, root = project
    before = snapshot(root)
    calls = {"n": 0}
    real_link = os.link

    def failing_link(src: str, dst: str, *a: object, **kw: object) -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # the fourth atomic create dies, mid-run
            raise OSError(28, "No space left on device")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(OSError, match="No space"):
        _run(fmt, preds, report)
    monkeypatch.undo()
    assert snapshot(root) == before
    leftovers = [p for p in root.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or p.parent.name == "auto")]
    assert leftovers == []
    (manifest,) = list_runs(fmt.project)
    assert manifest.stage == "rolled_back" and "No space" in (manifest.error or "")


def test_audit_share_is_deterministic_and_measured(project: tuple[VocFormat, DictPredictions, str, Path]) -> None:
    fmt, preds, report, root = project
    res = _run(fmt, preds, report, audit_share=0.25, run_id="20260101T000000000000Z-abcdef")
    assert len(res.audit) == int(np.ceil(0.25 * len(res.written)))
    assert set(res.audit) <= set(res.written)
    assert res.audit == choose_audit(res.written, res.run_id, 0.25)
    manifest = load_manifest(fmt.project, res.run_id)
    assert manifest.meta["audit"]["item_ids"] == res.audit
    assert json.loads(Path(report, "autolabel.json").read_text())["audit"] == res.audit
    assert measure_audit_precision(fmt)["reviewed"] == 0
    # a reviewer fixes the first audited item (moves the box), and leaves the others as they are
    wrong, *_ = res.audit
    (root / "annotations" / f"{wrong}.xml").write_text(voc_xml(wrong, [("stop", (8.0, 8.0, 16.0, 16.0))]))
    measured = measure_audit_precision(fmt)
    assert measured["audited"] == len(res.audit) and measured["reviewed"] == 1
    assert measured["correct"] == 0 and measured["precision"] == 0.0


def test_bad_arguments_are_usage_errors(project: tuple[VocFormat, DictPredictions, str, Path]) -> None:
    fmt, preds, report, _ = project
    with pytest.raises(UsageError, match="exactly one"):
        run_autolabel(fmt, difficulty_dir=report, epsilon=0.1, delta=0.1, label_map=LABEL_MAP)
    with pytest.raises(UsageError, match="stage"):
        _run(fmt, preds, report, stage="yolo")
    with pytest.raises(UsageError, match="audit share"):
        _run(fmt, preds, report, audit_share=1.5)

"""Rollout stages: report and shadow write nothing; shadow agreement decides on promotion."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image

from autolabel.gate import run_autolabel
from autolabel.stages import (
    ShadowLabel,
    ShadowRecord,
    check_stage,
    measure_shadow_agreement,
    read_shadow_record,
)
from connectors.errors import InputError, UsageError
from connectors.formats.base import PredictionSource
from connectors.formats.voc import VocFormat
from connectors.labelmap import LabelMap
from connectors.model import Annotation, Item, ItemStatus, Prediction
from connectors.storage import ProjectFS
from difficulty.runrecord import GateRecord
from difficulty.table import write_difficulty

BOX = (2.0, 2.0, 12.0, 12.0)
LABEL_MAP = LabelMap(map={"stop sign": "stop"})


class Preds(PredictionSource):
    def __init__(self, preds: dict[str, Prediction]) -> None:
        self.preds = preds

    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        return self.preds.get(item_id)

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.preds.values())


def xml(name: str, box: tuple[float, float, float, float]) -> str:
    b = "".join(
        f"<{t}>{v:g}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
    )
    return f"<annotation><filename>{name}.jpg</filename><size><width>16</width><height>16</height></size><object><name>stop</name><bndbox>{b}</bndbox></object></annotation>"


def build(
    root: Path, n_labeled: int = 60, n_unlabeled: int = 40
) -> tuple[VocFormat, Preds, pd.DataFrame]:
    """Every prediction is right; difficulty rises with the index."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    preds, rows = {}, []
    for prefix, count, labeled in (("l", n_labeled, True), ("u", n_unlabeled, False)):
        for i in range(count):
            item_id = f"{prefix}{i:02d}"
            Image.new("RGB", (16, 16)).save(root / "images" / f"{item_id}.jpg")
            if labeled:
                (root / "annotations" / f"{item_id}.xml").write_text(xml(item_id, BOX))
            preds[item_id] = Prediction(
                item_id=item_id,
                annotations=[Annotation(label="stop sign", box=BOX, score=0.9)],
                model_version="m1",
            )
            rows.append(
                {
                    "item_id": item_id,
                    "uri": f"images/{item_id}.jpg",
                    "status": "labeled" if labeled else "unlabeled",
                    "score": i / count,
                    "tier": "easy",
                    "rank": 1,
                    "error": None,
                }
            )
    return VocFormat(ProjectFS(str(root))), Preds(preds), pd.DataFrame(rows)


def tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[VocFormat, Preds, Path, Path]:
    fmt, preds, df = build(tmp_path / "proj")
    store = tmp_path / "store" / "roads"
    write_difficulty(df, str(store / "run1"), {"scorers": []})
    return fmt, preds, tmp_path / "proj", store


def run_stage(setup: tuple[VocFormat, Preds, Path, Path], stage: str, **options: Any) -> GateRecord:
    """The gate at ε = δ = 0.1 on the project of ``setup`` and its first scored run."""
    fmt, preds, _, store = setup
    return run_autolabel(
        fmt,
        difficulty_dir=str(store / "run1"),
        predictions=preds,
        epsilon=0.1,
        delta=0.1,
        label_map=LABEL_MAP,
        stage=stage,
        **options,
    )


def test_check_stage() -> None:
    assert check_stage("shadow") == "shadow"
    with pytest.raises(UsageError, match="report, shadow, autolabel"):
        check_stage("production")


def test_report_stage_calibrates_and_writes_nothing(
    setup: tuple[VocFormat, Preds, Path, Path],
) -> None:
    _, _, root, store = setup
    before = tree(root)
    res = run_stage(setup, "report")
    assert res.threshold is not None and res.selected == [] and res.written == []
    assert tree(root) == before
    assert json.loads((store / "run1" / "autolabel.json").read_text())["stage"] == "report"


def test_shadow_records_would_be_labels_and_writes_nothing(
    setup: tuple[VocFormat, Preds, Path, Path],
) -> None:
    _, _, root, store = setup
    before = tree(root)
    res = run_stage(setup, "shadow")
    assert tree(root) == before  # not even the bookkeeping folder
    assert res.written == [] and res.audit == [] and len(res.selected) == 40
    record = read_shadow_record(str(store / "run1"))
    assert record.run_id == res.run_id and record.threshold == res.threshold
    assert {s.item_id for s in record.labels} == set(res.selected)
    assert record.labels[0].annotations == [Annotation(label="stop", box=BOX, score=0.9)]


def test_shadow_agreement_says_when_promotion_is_safe(
    setup: tuple[VocFormat, Preds, Path, Path],
) -> None:
    fmt, _, root, store = setup
    run_stage(setup, "shadow")
    record = read_shadow_record(str(store / "run1" / "shadow.json"))
    # too early: nobody has labeled the shadow items yet
    early = measure_shadow_agreement(fmt, record, LABEL_MAP)
    assert early["n_compared"] == 0 and early["promotion_safe"] is False
    # annotators label every shadow item: all agree with the would-be label
    for s in record.labels:
        (root / "annotations" / f"{s.item_id}.xml").write_text(xml(s.item_id, BOX))
    agree = measure_shadow_agreement(fmt, record, LABEL_MAP)
    assert agree["n_compared"] == 40 and agree["n_wrong"] == 0
    assert agree["bound"] <= 0.1 and agree["promotion_safe"] is True
    # … but if a quarter of them disagree, promotion is not safe
    for s in record.labels[:10]:
        (root / "annotations" / f"{s.item_id}.xml").write_text(
            xml(s.item_id, (8.0, 8.0, 16.0, 16.0))
        )
    disagree = measure_shadow_agreement(fmt, str(store / "run1"), LABEL_MAP)
    assert disagree["n_wrong"] == 10 and disagree["promotion_safe"] is False
    assert "above epsilon" in disagree["reason"]


def test_next_shadow_run_reports_agreement_of_the_previous_one(
    setup: tuple[VocFormat, Preds, Path, Path],
) -> None:
    _, _, root, store = setup
    first = run_stage(setup, "shadow")
    for item_id in first.selected:
        (root / "annotations" / f"{item_id}.xml").write_text(xml(item_id, BOX))
    second = run_stage(setup, "shadow", out_dir=str(store / "run2"))
    assert second.agreement is not None
    assert second.agreement.run_id == first.run_id and second.agreement.promotion_safe is True


def test_agreement_uses_ignore_regions() -> None:
    items = [
        Item(
            item_id=f"k{i}",
            uri=f"images/k{i}.jpg",
            status=ItemStatus.LABELED,
            annotations=[
                Annotation(label="Car", box=(0, 0, 10, 10)),
                Annotation(label="DontCare", box=(50, 50, 90, 90)),
            ],
        )
        for i in range(30)
    ]
    labels = [
        ShadowLabel(
            item_id=f"k{i}",
            annotations=[
                Annotation(label="Car", box=(0, 0, 10, 10), score=0.9),
                Annotation(label="Car", box=(60, 60, 70, 70), score=0.5),
            ],
            difficulty=0.1,
            model_version="m",
        )
        for i in range(30)
    ]
    record = ShadowRecord(
        run_id="r",
        epsilon=0.2,
        delta=0.1,
        threshold=0.5,
        box_confidence=0.25,
        bound=0.1,
        ignore=["DontCare"],
        labels=labels,
    )
    assert measure_shadow_agreement(items, record)["n_wrong"] == 0
    assert (
        measure_shadow_agreement(items, record, LabelMap())["n_wrong"] == 30
    )  # without the ignore list


def test_missing_shadow_record_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"shadow\.json"):
        read_shadow_record(str(tmp_path))

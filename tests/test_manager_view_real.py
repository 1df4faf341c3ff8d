"""The manager's view on the real road_signs data: tiers hold their shares, the gate writes
only the easy tier of the run's table, and the report says what it wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from autolabel.gate import run_autolabel
from connectors.formats.voc import VocFormat
from connectors.formats.yolo import YoloPredictions
from connectors.labelmap import LabelMap
from connectors.storage import ProjectFS
from difficulty.report import write_report
from difficulty.scoring import score_project

ROAD_MAP = LabelMap(map={"stop sign": "stop", "traffic light": "trafficlight"})


def test_four_class_tiers_hold_their_shares(road_signs: Path, tmp_path: Path) -> None:
    """Brought predictions on all four classes: the chosen scorer gives 48 % of the items
    one value (no stop sign or traffic light predicted); the tie-break keeps 30/40/30."""
    project = VocFormat(ProjectFS(str(road_signs)))
    preds = YoloPredictions(ProjectFS(str(road_signs / "predictions" / "yolo")), project=project)
    result = score_project(
        project, out_dir=str(tmp_path / "run"), predictions=preds, label_map=ROAD_MAP, num_workers=0
    )
    shares = result.table["tier"].value_counts(normalize=True)
    assert abs(shares["easy"] - 0.3) <= 0.05
    assert abs(shares["medium"] - 0.4) <= 0.05
    assert abs(shares["hard"] - 0.3) <= 0.05


@pytest.fixture(scope="module")
def two_class(road_signs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """road_signs with only the stop and trafficlight boxes, every 4th item unlabeled."""
    import xml.etree.ElementTree as ET

    root = tmp_path_factory.mktemp("rs2") / "proj"
    shutil.copytree(road_signs / "images", root / "images")
    (root / "annotations").mkdir()
    xmls = sorted((road_signs / "annotations").glob("*.xml"), key=lambda p: int(p.stem[4:]))
    for k, xml in enumerate(xmls):
        if k % 4 == 3:
            continue
        doc = ET.parse(xml).getroot()
        for obj in list(doc.iter("object")):
            if obj.findtext("name") not in ("stop", "trafficlight"):
                doc.remove(obj)
        (root / "annotations" / xml.name).write_bytes(ET.tostring(doc))
    return root


@pytest.mark.parametrize("epsilon", [0.05, 0.1])
def test_gate_writes_only_the_easy_tier_and_the_report_says_so(
    two_class: Path, road_signs: Path, tmp_path: Path, epsilon: float
) -> None:
    root = tmp_path / "proj"
    shutil.copytree(two_class, root)
    project = VocFormat(ProjectFS(str(root)))
    preds = YoloPredictions(ProjectFS(str(road_signs / "predictions" / "yolo")), project=project)
    run = tmp_path / "store" / "rs2" / "r1"
    score_project(project, out_dir=str(run), predictions=preds, label_map=ROAD_MAP, num_workers=0)
    record = run_autolabel(
        project,
        difficulty_dir=str(run),
        predictions=preds,
        epsilon=epsilon,
        delta=0.1,
        label_map=ROAD_MAP,
        audit_share=0.05,
    )
    assert record.threshold is not None and record.bound <= epsilon
    # one score, one set of tiers, one gate
    table = pd.read_parquet(run / "difficulty.parquet")
    assert set(table.loc[table["item_id"].isin(record.written), "tier"]) == {"easy"}
    assert (table.loc[table["tier"] == "easy", "score"] <= record.threshold).all()
    # coverage of the unlabeled items: at least the benchmark's mean over half/half splits
    # (0.70 at ε 0.05, 0.97 at ε 0.1) minus 0.05; here 525 labeled items calibrate
    assert record.coverage >= {0.05: 0.65, 0.1: 0.92}[epsilon]
    assert record.labels.with_boxes + record.labels.empty == len(record.written)
    write_report(str(run), project=project, predictions=preds)
    page = (run / "report.html").read_text()
    assert f"→ {len(record.written)} items written" in page
    assert f"{record.labels.with_boxes} with boxes, {record.labels.empty} empty" in page
    summary = json.loads((run / "summary.json").read_text())
    assert summary["plan"]["remaining_items"] == 175 - len(record.written)

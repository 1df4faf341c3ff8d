"""Real data: road_signs (VOC), kitti_tiny (KITTI + YOLO/COCO predictions), the sample project."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from autolabel.cli import cli
from connectors.labelmap import load_label_map
from connectors.project import open_predictions, open_project
from connectors.stats import compute_stats

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ROAD_SIGNS_CLASSES = {"speedlimit": 632, "crosswalk": 156, "trafficlight": 132, "stop": 72}


def test_road_signs_as_voc(road_signs: Path) -> None:
    stats = compute_stats(open_project(str(road_signs), "voc"))
    assert (stats["items"], stats["labeled"], stats["unlabeled"], stats["boxes"]) == (
        700,
        700,
        0,
        992,
    )
    assert stats["classes"] == ROAD_SIGNS_CLASSES
    assert stats["errors"] == []


def test_road_signs_auto_detects_voc(road_signs: Path) -> None:
    assert open_project(str(road_signs)).name == "voc"


def test_cli_stats_on_road_signs(road_signs: Path) -> None:
    result = CliRunner().invoke(cli, ["stats", "--source", str(road_signs), "--format", "voc"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert (stats["items"], stats["boxes"]) == (700, 992)
    assert stats["classes"] == ROAD_SIGNS_CLASSES


def test_road_signs_predictions_count(road_signs: Path) -> None:
    project = open_project(str(road_signs), "voc")
    preds = open_predictions(str(road_signs / "predictions" / "yolo"), "yolo", project=project)
    stats = compute_stats(project, preds)
    assert stats["predictions"] == 2875 and stats["errors"] == []


def test_kitti_tiny(kitti_tiny: Path) -> None:
    project = open_project(str(kitti_tiny))
    assert project.name == "kitti"
    stats = compute_stats(project)
    assert (stats["items"], stats["boxes"]) == (75, 499)
    assert stats["classes"]["DontCare"] == 188 and stats["classes"]["Car"] == 209
    assert stats["errors"] == []


def test_kitti_yolo_and_coco_predictions_agree_box_for_box(kitti_tiny: Path) -> None:
    project = open_project(str(kitti_tiny), "kitti")
    yolo = open_predictions(str(kitti_tiny / "predictions" / "yolo"), "yolo", project=project)
    coco = open_predictions(str(kitti_tiny / "predictions" / "coco.json"), "coco", project=project)
    total = 0
    worst = 0.0
    for item in project.iter_items():
        a, b = yolo.get(item.item_id, item), coco.get(item.item_id, item)
        assert a is not None and b is not None, item.item_id
        assert a.error is None and b.error is None
        assert len(a.annotations) == len(b.annotations), item.item_id
        for x, y in zip(a.annotations, b.annotations, strict=True):
            assert x.label == y.label
            assert x.score == pytest.approx(y.score, abs=1e-4)
            assert x.box is not None and y.box is not None
            worst = max(worst, *(abs(p - q) for p, q in zip(x.box, y.box, strict=True)))
        total += len(a.annotations)
    assert total == 1225
    assert worst < 0.01


def test_sample_project() -> None:
    project = open_project(str(EXAMPLES / "sample_project"))
    assert project.name == "voc"
    preds = open_predictions(
        str(EXAMPLES / "sample_project_predictions" / "yolo"), "yolo", project=project
    )
    label_map = load_label_map(str(EXAMPLES / "label_map.yaml"))
    assert label_map.map == {"stop sign": "stop", "traffic light": "trafficlight"}
    stats = compute_stats(project, preds, label_map=label_map)
    assert (stats["items"], stats["labeled"], stats["unlabeled"]) == (120, 80, 40)
    assert set(stats["classes"]) == {"speedlimit", "crosswalk", "trafficlight", "stop"}
    assert stats["predicted_items"] == 120 and stats["errors"] == []
    size = sum(p.stat().st_size for p in (EXAMPLES / "sample_project").rglob("*") if p.is_file())
    assert size <= 5 * 1024 * 1024
    assert "CC0" in (EXAMPLES / "sample_project" / "LICENSE.md").read_text()

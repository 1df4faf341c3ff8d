"""A run at stage autolabel renders its report once, after the gate, from what the gate did
— also when the gate fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_pipeline import make_config, tiny_voc  # noqa: F401  (tiny_voc is a fixture)

from autolabel.pipeline import run_project


def _predictions(tmp_path: Path, project: Path) -> Path:
    """Right predictions for every image of the tiny VOC project (YOLO txt, COCO names)."""
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "classes.txt").write_text("stop sign\ntraffic light\n")
    for i in range(12):
        cls = 0 if i % 2 else 1
        x1, y1, x2, y2 = 5 + i, 4, 30 + i, 40
        cx, cy, w, h = (x1 + x2) / 2 / 64, (y1 + y2) / 2 / 48, (x2 - x1) / 64, (y2 - y1) / 48
        (preds / f"img{i:02d}.txt").write_text(f"{cls} {cx} {cy} {w} {h} 0.9\n")
    return preds


def _config(tmp_path: Path, project: Path, stage: str):  # type: ignore[no-untyped-def]
    return make_config(
        tmp_path,
        project,
        stage=stage,
        predictions={"source": str(_predictions(tmp_path, project)), "format": "yolo"},
        label_map={"map": {"stop sign": "stop", "traffic light": "trafficlight"}},
        epsilon=0.5,
        delta=0.1,
        min_count=3,
        audit_share=0.5,
    )


def test_report_once_after_the_gate(tmp_path: Path, tiny_voc: Path) -> None:  # noqa: F811
    record = run_project(_config(tmp_path, tiny_voc, "autolabel"), "tiny")
    assert record.status == "ok", record.error
    assert list(record.steps) == ["stats", "score", "autolabel", "report"]
    run_dir = tmp_path / "reports" / "tiny" / record.run_id
    gate = json.loads((run_dir / "autolabel.json").read_text())
    assert gate["written"] and record.counts["autolabel"]["written"] == len(gate["written"])
    # the run's tiers are the gate's: easy = at or below the calibrated threshold
    assert record.counts["tiers"] == gate["tiers"]["counts"]
    page = (run_dir / "report.html").read_text()
    assert f"→ {len(gate['written'])} items written" in page
    assert (run_dir / "report.html").stat().st_mtime >= (run_dir / "autolabel.json").stat().st_mtime


def test_a_failing_gate_still_leaves_a_report(
    tmp_path: Path,
    tiny_voc: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import autolabel.gate

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the gate broke")

    monkeypatch.setattr(autolabel.gate, "run_autolabel", broken)
    record = run_project(_config(tmp_path, tiny_voc, "shadow"), "tiny")
    assert record.status == "failed" and "shadow" in (record.error or "")
    assert "the gate broke" in (record.error or "")
    assert list(record.steps) == ["stats", "score", "shadow", "report"]
    run_dir = tmp_path / "reports" / "tiny" / record.run_id
    page = (run_dir / "report.html").read_text()
    assert "Auto-labeling not run" in page and not (run_dir / "autolabel.json").exists()

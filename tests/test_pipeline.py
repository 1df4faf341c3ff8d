"""One run of a project: steps, run folder, run record (also when a step fails), reference
and history from earlier runs.  A tiny generated VOC project keeps this fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from autolabel.config import AppConfig, parse_config
from autolabel.pipeline import build_label_map, label_inputs, run_locked, run_project, score_inputs
from autolabel.store import ReportStore, RunRecord, new_run_id


def _voc_xml(name: str, boxes: list[tuple[str, int, int, int, int]]) -> str:
    objects = "".join(
        f"<object><name>{label}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for label, x1, y1, x2, y2 in boxes
    )
    return f"<annotation><filename>{name}.jpg</filename><size><width>64</width><height>48</height><depth>3</depth></size>{objects}</annotation>"


@pytest.fixture
def tiny_voc(tmp_path: Path) -> Path:
    """12 images 64×48 (smooth to noisy), 8 labeled with one box each (VOC xyxy px)."""
    root = tmp_path / "project"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        noise = rng.uniform(0, 255, (48, 64, 3)) * (i / 11)
        base = np.linspace(0, 255, 64)[None, :, None].repeat(48, 0).repeat(3, 2) * (1 - i / 11)
        Image.fromarray((noise + base).clip(0, 255).astype(np.uint8)).save(
            root / "images" / f"img{i:02d}.jpg"
        )
        if i % 3 != 2:
            label = "stop" if i % 2 else "trafficlight"
            (root / "annotations" / f"img{i:02d}.xml").write_text(
                _voc_xml(f"img{i:02d}", [(label, 5 + i, 4, 30 + i, 40)])
            )
    return root


def make_config(tmp_path: Path, source: Path, **project: object) -> AppConfig:
    data = {
        "report_store": "reports",
        "projects": {
            "tiny": {"source": str(source), "format": "voc", "scorers": ["fourier"], **project}
        },
    }
    return parse_config(data, base_dir=tmp_path)


def test_run_writes_outputs_and_an_ok_record(tmp_path: Path, tiny_voc: Path) -> None:
    cfg = make_config(tmp_path, tiny_voc)
    record = run_project(cfg, "tiny", run_id="20260101T000000000000Z-aaaaaa")
    assert record.status == "ok", record.error
    run_dir = tmp_path / "reports" / "tiny" / record.run_id
    assert {
        "stats.json",
        "difficulty.parquet",
        "summary.json",
        "report.html",
        "plan.csv",
        "run.json",
    } <= {p.name for p in run_dir.iterdir()}
    stored = RunRecord.model_validate_json((run_dir / "run.json").read_text())
    assert stored == record
    assert stored.finished is not None and stored.started <= stored.finished
    assert list(stored.steps) == ["stats", "score", "report"]  # stage report: no gate step
    assert stored.counts["items"] == 12 and stored.counts["labeled"] == 8
    assert sum(stored.counts["tiers"].values()) == 12
    assert json.loads((run_dir / "stats.json").read_text())["items"] == 12
    assert not (tiny_voc / ".labeltriage").exists()  # stage report writes nothing into the project


def test_second_run_scores_against_the_first_and_reports_history(
    tmp_path: Path, tiny_voc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(tmp_path, tiny_voc)
    first = run_project(cfg, "tiny")
    import difficulty.report

    seen: dict[str, object] = {}
    real = difficulty.report.write_report

    def spy(run_dir: str, **kwargs: object) -> dict[str, str]:
        seen.update(kwargs)
        return real(run_dir, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(difficulty.report, "write_report", spy)
    second = run_project(cfg, "tiny")
    assert second.status == "ok", second.error
    first_dir = str(tmp_path / "reports" / "tiny" / first.run_id)
    assert second.counts["reference"] == first_dir
    assert seen["history"] == [first_dir]
    assert seen["plan_settings"].audit_share == cfg.projects["tiny"].audit_share  # type: ignore[attr-defined]


def test_failing_step_makes_the_run_failed_but_the_record_is_written(
    tmp_path: Path, tiny_voc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import difficulty.report

    def broken(run_dir: str, **kwargs: object) -> dict[str, str]:
        raise RuntimeError("disk full")

    monkeypatch.setattr(difficulty.report, "write_report", broken)
    cfg = make_config(tmp_path, tiny_voc)
    record = run_project(cfg, "tiny")
    assert record.status == "failed"
    assert record.error == "report: RuntimeError: disk full"
    stored = ReportStore(cfg.report_store).read_record("tiny", record.run_id)
    assert stored is not None and stored.status == "failed" and stored.error == record.error
    assert "difficulty" in stored.outputs and "report" in stored.steps

    monkeypatch.undo()
    later = run_project(cfg, "tiny")
    assert later.status == "ok"
    assert (
        "reference" not in later.counts or record.run_id not in later.counts["reference"]
    )  # failed runs are no reference


def test_bad_source_fails_in_stats(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, tmp_path / "missing")
    record = run_project(cfg, "tiny")
    assert (
        record.status == "failed"
        and record.error is not None
        and record.error.startswith("stats: ")
    )


def test_report_store_on_another_filesystem(tmp_path: Path, tiny_voc: Path) -> None:
    cfg = make_config(tmp_path, tiny_voc).model_copy(update={"report_store": "memory://lt-reports"})
    record = run_project(cfg, "tiny")
    assert record.status == "ok", record.error
    store = ReportStore("memory://lt-reports")
    assert store.read_record("tiny", record.run_id) == record
    assert store.has_output("tiny", record.run_id, "report.html")


def test_run_locked_without_a_database_for_a_remote_store(tmp_path: Path, tiny_voc: Path) -> None:
    cfg = make_config(tmp_path, tiny_voc).model_copy(update={"report_store": "memory://lt-nolock"})
    assert cfg.job_store_url() is None
    calls = []

    def fake(cfg: AppConfig, name: str, **kwargs: object) -> RunRecord:
        calls.append(name)
        return run_project(cfg, name, **kwargs)  # type: ignore[arg-type]

    assert run_locked(cfg, "tiny", run_fn=fake).status == "ok"
    assert calls == ["tiny"]


def test_label_map_file_and_inline_are_merged(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text(
        yaml.safe_dump({"map": {"stop sign": "stop", "car": "vehicle"}, "ignore": ["DontCare"]})
    )
    cfg = parse_config(
        {
            "projects": {
                "p": {
                    "source": "x",
                    "label_map": {"file": str(path), "map": {"car": "car"}, "ignore": ["Misc"]},
                }
            }
        },
        base_dir=tmp_path,
    )
    label_map = build_label_map(cfg.projects["p"])
    assert dict(label_map.map) == {"stop sign": "stop", "car": "car"}
    assert label_map.ignore == ("DontCare", "Misc")


@pytest.mark.parametrize(
    ("project", "checkpoint", "score", "label"),
    [
        ({"predictions": {"source": "p"}}, None, (True, False), (True, False)),
        ({"model": "m.pt"}, "m.pt", (False, True), (False, True)),
        ({"predictions": {"source": "p"}, "model": "m.pt"}, "m.pt", (True, False), (True, False)),
        (
            {"predictions": {"source": "p"}, "model": "m.pt", "score_with": "model"},
            "m.pt",
            (False, True),
            (True, False),
        ),
        (
            {
                "predictions": {"source": "p"},
                "model": "m.pt",
                "score_with": "predictions",
                "label_with": "model",
            },
            "m.pt",
            (True, False),
            (False, True),
        ),
        ({}, None, (False, False), (False, False)),
    ],
)
def test_what_scores_and_what_labels(
    project: dict[str, object],
    checkpoint: str | None,
    score: tuple[bool, bool],
    label: tuple[bool, bool],
) -> None:
    p = parse_config({"projects": {"p": {"source": "x", **project}}}).projects["p"]
    assert score_inputs(p, checkpoint) == score
    assert label_inputs(p, checkpoint) == label


def test_run_ids_sort_by_time() -> None:
    ids = [new_run_id() for _ in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50


@pytest.mark.slow
def test_training_run_and_warm_start_from_the_previous_model(
    tmp_path: Path, tiny_voc: Path
) -> None:
    train = {
        "task": "detection",
        "arch": "ssdlite",
        "epochs": 1,
        "batch_size": 4,
        "image_size": 64,
        "warm_start": True,
    }
    cfg = make_config(tmp_path, tiny_voc, train=train, scorers=None)
    first = run_project(cfg, "tiny")
    assert first.status == "ok", first.error
    assert Path(first.outputs["model"]).is_file() and list(first.steps) == [
        "stats",
        "train",
        "score",
        "report",
    ]
    assert "predicted_loss" in first.counts["scorers"]  # scored with the trained model
    assert "warm_start" not in first.counts
    second = run_project(cfg, "tiny")
    assert second.status == "ok", second.error
    assert second.counts["warm_start"] == first.outputs["model"]

"""The manager's report: sections, self-containment, plan files, trend, Chromium rendering."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from connectors.formats.base import ProjectFormat
from connectors.storage import ProjectFS
from difficulty.plan import PlanSettings
from difficulty.report import SECTIONS, write_report
from difficulty.table import write_difficulty

CHROMIUM = next(
    (
        p
        for p in (
            shutil.which("chromium"),
            shutil.which("chromium-browser"),
            shutil.which("google-chrome"),
        )
        if p
    ),
    None,
)


def _run(root: Path, run: str, *, created: str, shift: float = 0.0, n: int = 30) -> Path:
    """A scored run folder ``root/store/proj/<run>`` of ``n`` items with images in ``root/project``."""
    project = root / "project"
    (project / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = project / "images" / f"<im{i}>.jpg"
        if not path.exists():
            Image.fromarray((rng.random((40, 60, 3)) * 255 * (i / n)).astype(np.uint8)).save(path)
    score = np.clip(np.linspace(0.0, 1.0, n) + shift, 0, 1)
    tier = np.where(score <= 0.3, "easy", np.where(score >= 0.7, "hard", "medium")).astype(object)
    df = pd.DataFrame(
        {
            "item_id": [f"<im{i}>" for i in range(n)],
            "uri": [f"images/<im{i}>.jpg" for i in range(n)],
            "status": ["labeled" if i % 3 == 0 else "unlabeled" for i in range(n)],
            "fourier": score + 0.01,
            "box_least_confidence": score[::-1].copy(),
            "score": score,
            "tier": tier,
            "rank": pd.array(
                np.argsort(np.argsort(-score, kind="stable"), kind="stable") + 1, dtype="Int64"
            ),
            "error": [None] * n,
            "true_error": [float(s > 0.5) if i % 3 == 0 else np.nan for i, s in enumerate(score)],
            "annotation_seconds": [
                20.0 + 40 * s if i % 3 == 0 else np.nan for i, s in enumerate(score)
            ],
        }
    )
    df.loc[n - 1, ["score", "tier"]] = [np.nan, None]
    df.loc[n - 1, "error"] = "images/<im29>.jpg: item '<im29>': cannot decode"
    df["rank"] = df["score"].rank(ascending=False, method="first").astype("Int64")
    meta = {
        "run_id": run,
        "created": created,
        "source": str(project),
        "format": "voc",
        "task": "detection",
        "model_version": "predictions/yolo",
        "scorers": ["fourier", "box_least_confidence"],
        "combination": {
            "method": "rho",
            "weights": {"fourier": 0.7, "box_least_confidence": 0.3},
            "correlations": {"fourier": 0.6, "box_least_confidence": -0.2},
            "cv_rho": {"single": 0.5, "rho": 0.55, "rho2": 0.52},
            "n_labeled": 10,
            "reason": "rho has the highest 2-fold cross-validated ρ",
            "combined_rho": 0.58,
        },
        "reference": {
            "fourier": list(np.linspace(0, 1, 101)),
            "box_least_confidence": list(np.linspace(0, 1, 101)),
        },
        "tiers": {
            "config": {"mode": "thresholds", "easy": 0.3, "hard": 0.7},
            "easy_max": 0.3,
            "hard_min": 0.7,
            "source": "thresholds",
        },
    }
    out = root / "store" / "proj" / run
    write_difficulty(df, str(out), meta)
    return out


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    return _run(tmp_path, "r2", created="2026-01-02T00:00:00+00:00")


def test_report_files_and_sections(run_dir: Path) -> None:
    paths = write_report(str(run_dir), team_size=2, hours_per_day=6.0)
    assert set(paths) == {"report", "summary", "plan", "assignment"}
    page = (run_dir / "report.html").read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in page
    # self-contained: every image inline, nothing fetched
    assert not re.search(r'(src|href)="(https?:)?//', page)
    srcs = re.findall(r'<img[^>]* src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert page.count("data:image/jpeg;base64,") == 24  # 12 hardest + 12 easiest thumbnails
    # item ids are escaped, not markup
    assert "&lt;im0&gt;" in page and "<im0>" not in page
    assert "Auto-labeling not run" in page
    assert "First run of this project" in page


def test_hardest_and_easiest_in_score_order(run_dir: Path) -> None:
    write_report(str(run_dir))
    page = (run_dir / "report.html").read_text()
    hardest = page[page.index('id="hardest"') : page.index('id="easiest"')]
    easiest = page[page.index('id="easiest"') : page.index('id="agreement"')]
    ranks_h = [int(r) for r in re.findall(r"<b>#(\d+)</b>", hardest)]
    ranks_e = [int(r) for r in re.findall(r"<b>#(\d+)</b>", easiest)]
    assert ranks_h == list(range(1, 13))
    assert ranks_e == list(range(29, 17, -1))  # 29 scored items


def test_summary_and_plan_numbers(run_dir: Path) -> None:
    settings = PlanSettings(
        seconds_per_tier={"easy": 36.0, "medium": 72.0, "hard": 144.0},
        min_history=100,
        audit_share=0.0,
    )
    write_report(str(run_dir), plan_settings=settings, team_size=1, hours_per_day=1.0)
    summary = json.loads((run_dir / "summary.json").read_text())
    plan = summary["plan"]
    tiers = {r["tier"]: r for r in plan["tiers"]}
    df = pd.read_parquet(run_dir / "difficulty.parquet")
    left = df[df["status"] == "unlabeled"]
    expected = (
        sum({"easy": 36, "medium": 72, "hard": 144}[t] for t in left["tier"].dropna())
        + 72 * left["tier"].isna().sum()
    )
    assert plan["remaining_hours"] == pytest.approx(expected / 3600)
    assert plan["forecast_days"] == pytest.approx(expected / 3600)
    assert tiers["easy"]["seconds_source"] == "default"
    assert summary["items"] == 30 and summary["errors"] == 1
    assert summary["combination"]["weights"]["fourier"] == 0.7
    csv = pd.read_csv(run_dir / "plan.csv")
    assert csv.iloc[-1]["tier"] == "total" and csv.iloc[-1]["hours"] == pytest.approx(
        expected / 3600, rel=1e-3
    )
    assignment = pd.read_csv(run_dir / "assignment.csv")
    assert len(assignment) == len(left) and set(assignment["assignee"]) == {"senior-1"}


def test_trend_across_runs_of_the_same_project(tmp_path: Path) -> None:
    _run(tmp_path, "r1", created="2026-01-01T00:00:00+00:00", shift=0.2)
    later = _run(tmp_path, "r2", created="2026-01-02T00:00:00+00:00")
    _run(tmp_path, "r3", created="2026-01-03T00:00:00+00:00")  # a later run is not history
    write_report(str(later))
    summary = json.loads((later / "summary.json").read_text())
    assert [p["run_id"] for p in summary["trend"]] == ["r1", "r2"]
    assert summary["trend"][0]["tiers"]["hard"] > summary["trend"][1]["tiers"]["hard"]
    page = (later / "report.html").read_text()
    trend = page[page.index('id="trend"') : page.index('id="autolabel"')]
    assert "r1" in trend and "data:image/png" in trend


def _gate_project(tmp_path: Path, **kw: object) -> tuple[Any, Any, Path, Path]:
    """The gate tests' VOC project (80 labeled, 20 unlabeled items, predictions right below
    difficulty 0.75) with its scored table in a run folder of a report store."""
    from test_gate import make_project

    from connectors.formats.voc import VocFormat

    root = tmp_path / "proj"
    preds, df = make_project(root, **kw)  # type: ignore[arg-type]
    df["fourier"] = df["score"]
    df["true_error"] = np.nan
    run = tmp_path / "store" / "proj" / "r1"
    meta = {
        "run_id": "r1",
        "created": "2026-01-01T00:00:00+00:00",
        "source": str(root),
        "format": "voc",
        "task": "detection",
        "model_version": "yolo-test-1",
        "reference": {},
        "scorers": ["fourier"],
        "combination": {"method": "default", "weights": {"fourier": 1.0}, "reason": "test"},
        "tiers": {
            "config": {"mode": "quantiles", "easy": 0.3, "hard": 0.7},
            "easy_max": 0.3,
            "hard_min": 0.7,
            "source": "quantiles",
        },
        "settings": {"label_map": {"map": {"stop sign": "stop"}}, "error_min_score": 0.25},
    }
    write_difficulty(df, str(run), meta)
    return VocFormat(ProjectFS(str(root))), preds, run, root


def _gate_and_report(fmt: Any, preds: Any, run: Path, stage: str, **kw: Any) -> str:
    from autolabel.gate import run_autolabel
    from connectors.labelmap import LabelMap

    run_autolabel(
        fmt,
        difficulty_dir=str(run),
        predictions=preds,
        epsilon=kw.pop("epsilon", 0.1),
        delta=0.1,
        label_map=LabelMap(map={"stop sign": "stop"}),
        stage=stage,
        audit_share=0.25,
        **kw,
    )
    write_report(str(run), project=fmt, predictions=preds)
    return (run / "report.html").read_text()


def _pixels_near(data_uri: str, color: str) -> int:
    import base64
    import io

    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))))
    target = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb.astype(int) - target).sum(axis=2) < 90).sum())


def test_report_after_the_real_gate_says_what_was_written(tmp_path: Path) -> None:
    from difficulty.report import PREDICTION_COLOR

    fmt, preds, run, _ = _gate_project(tmp_path)
    page = _gate_and_report(fmt, preds, run, "autolabel")
    record = json.loads((run / "autolabel.json").read_text())
    written = record["written"]
    assert 0 < len(written) < 20 and record["threshold"] is not None
    section = page[page.index('id="autolabel"') :]
    # the verdict in words, the written count in a card, no raw dotted keys
    assert f"→ {len(written)} items written, {len(record['audit'])} sent to audit." in section
    assert re.search(rf'<div class="l">Written</div><div class="v">{len(written)}</div>', section)
    assert "calibration." not in page and "audit_summary" not in page and "entries" not in page
    assert f"{len(written)} with boxes, 0 empty" in page  # every written label holds a stop box
    # written items left the work: the plan and the top card count only what is still unlabeled
    summary = json.loads((run / "summary.json").read_text())
    assert summary["plan"]["remaining_items"] == 20 - len(written)
    assert summary["plan"]["auto_label"]["kind"] == "written"
    assert summary["autolabel"]["written"] == written
    assert re.search(rf'Left to label</div><div class="v">{20 - len(written)}</div>', page), (
        "left to label still counts written items"
    )
    # thumbnails of the written labels and of the audit sample, with the auto-label box drawn
    thumbs = re.findall(r'src="(data:image/jpeg;base64,[^"]+)"', section)
    assert len(thumbs) >= len(written[:12])
    assert all(_pixels_near(t, PREDICTION_COLOR) > 10 for t in thumbs)
    # the risk–coverage curve of the calibration is there, and the tiers say what easy means
    assert 'alt="risk–coverage curve of the calibration"' in section
    assert "Easy means the model labels the item with error ≤ ε 0.1" in page
    # no written item outside the easy tier of the run's final table
    table = pd.read_parquet(run / "difficulty.parquet")
    assert set(table.loc[table["item_id"].isin(written), "tier"]) == {"easy"}


def test_shadow_report_says_would_write_and_claims_no_saving(tmp_path: Path) -> None:
    fmt, preds, run, root = _gate_project(tmp_path)
    page = _gate_and_report(fmt, preds, run, "shadow")
    section = page[page.index('id="autolabel"') :]
    record = json.loads((run / "autolabel.json").read_text())
    assert record["written"] == [] and record["selected"]
    assert f"→ would write {len(record['selected'])} items (shadow: nothing written)." in section
    summary = json.loads((run / "summary.json").read_text())
    assert summary["plan"]["remaining_items"] == 20  # nothing was written
    assert summary["plan"]["auto_label"]["kind"] == "would"
    assert "would save" in page and "h saved" not in page
    assert not (root / "annotations" / "u00.xml").exists()


def test_refused_gate_report_writes_nothing_and_says_why(tmp_path: Path) -> None:
    fmt, preds, run, _ = _gate_project(tmp_path, hard_from=0.0)  # every prediction is wrong
    page = _gate_and_report(fmt, preds, run, "autolabel")
    section = page[page.index('id="autolabel"') :]
    assert "Refused: the best bound" in section and "nothing written." in section
    summary = json.loads((run / "summary.json").read_text())
    assert summary["plan"]["auto_label"]["kind"] is None
    assert summary["plan"]["remaining_items"] == 20
    assert "no hours are saved" in page
    assert "so none of it is auto-labeled" in page  # easy is only a planning tier here


def test_missing_images_give_a_placeholder(tmp_path: Path) -> None:
    run = _run(tmp_path, "r1", created="2026-01-01T00:00:00+00:00")
    shutil.rmtree(tmp_path / "project" / "images")
    write_report(str(run))
    page = (run / "report.html").read_text()
    assert "no preview" in page and "data:image/jpeg" not in page


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    write_report(str(run_dir), team_size=3)
    url = (run_dir / "report.html").as_uri()
    shot = tmp_path / "report.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp()}",
    ]
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1280,3000", url],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Image.open(shot) as im:
        assert im.size == (1280, 3000)
        assert len(np.unique(np.asarray(im.convert("L").resize((64, 64))))) > 10  # not a blank page
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", url],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for section in SECTIONS:
        assert f'id="{section}"' in dom


def test_without_labels_the_agreement_section_says_so(tmp_path: Path) -> None:
    project = _unlabeled_project(tmp_path)
    from difficulty.scoring import score_project

    score_project(project, out_dir=str(tmp_path / "store" / "p" / "r1"), num_workers=0)
    write_report(str(tmp_path / "store" / "p" / "r1"), project=project)
    page = (tmp_path / "store" / "p" / "r1" / "report.html").read_text()
    agreement = page[page.index('id="agreement"') : page.index('id="plan"')]
    assert "No labeled item has a known error" in agreement
    assert "Combination: default" in agreement
    summary = json.loads((tmp_path / "store" / "p" / "r1" / "summary.json").read_text())
    assert summary["combination"]["weights"] == {"fourier": 1.0, "fourier_entropy": 0.0}
    assert summary["plan"]["remaining_items"] == 8


def _unlabeled_project(tmp_path: Path) -> ProjectFormat:
    from connectors.formats.imagefolder import ImageFolderFormat

    rng = np.random.default_rng(1)
    folder = tmp_path / "proj" / "_unlabeled"
    folder.mkdir(parents=True)
    for i in range(8):
        Image.fromarray((rng.random((32, 32)) * 255 * i / 8).astype(np.uint8)).save(
            folder / f"u{i}.png"
        )
    return ImageFolderFormat(ProjectFS(str(tmp_path / "proj")))


def test_the_report_needs_no_torch(run_dir: Path) -> None:
    """Thumbnails are decoded with Pillow alone: rendering a report never imports torch."""
    import os
    import sys

    code = (
        "import sys; from difficulty.report import write_report; "
        "write_report(sys.argv[1]); print('torch' in sys.modules)"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code, str(run_dir)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=300,
    )
    assert done.stdout.strip() == "False"
    assert (run_dir / "report.html").read_text().count("data:image/jpeg") == 24


def test_tier_notes_say_when_ties_break_the_shares() -> None:
    from difficulty.report import tier_notes

    score = np.r_[np.full(60, 0.25), np.linspace(0.3, 1.0, 40)]  # 60 % tied in every scorer
    tier = np.where(score <= 0.25, "easy", np.where(score >= 0.79, "hard", "medium"))
    df = pd.DataFrame({"score": score, "tier": tier})
    meta = {
        "tiers": {
            "config": {"mode": "quantiles", "easy": 0.3, "hard": 0.7},
            "source": "quantiles",
            "easy_max": 0.25,
        }
    }
    notes = tier_notes(df, meta, None)
    assert notes["tie"] == {"value": 0.25, "count": 60, "share": 0.6}
    assert notes["shares"]["got"]["easy"] == pytest.approx(0.6)
    assert "30 % lowest scores" in notes["easy"]
    even = pd.DataFrame(
        {"score": np.linspace(0, 1, 100), "tier": ["easy"] * 30 + ["medium"] * 40 + ["hard"] * 30}
    )
    assert tier_notes(even, meta, None)["tie"] is None

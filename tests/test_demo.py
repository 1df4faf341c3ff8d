"""The demo: its folder preparation (fast) and the whole job on the sample project (slow)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from autolabel.cli import cli
from autolabel.commands.demo import EXAMPLES, MARKER, MODEL_PROJECT, PROJECT, prepare, promote
from autolabel.config import load_config
from autolabel.store import ReportStore
from connectors.errors import UsageError


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_prepare_copies_the_sample_and_writes_a_valid_config(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    config = prepare(out, EXAMPLES)
    assert (out / MARKER).is_file()
    assert len(list((out / "project" / "images").iterdir())) == 120
    cfg = load_config(config)
    assert cfg.report_store == str(out / "reports")
    assert cfg.projects[PROJECT].source == str(out / PROJECT)
    assert cfg.projects[MODEL_PROJECT].source == str(out / "project")
    assert cfg.projects[PROJECT].epsilon <= 0.1  # a bound the predictions earn
    # the stop-sign and traffic-light job: 270 photos, only those two classes' boxes kept
    from connectors.formats.voc import VocFormat
    from connectors.storage import ProjectFS

    items = list(VocFormat(ProjectFS(str(out / PROJECT))).iter_items())
    assert len(items) == 270 and sum(i.status.value == "unlabeled" for i in items) == 90
    assert {a.label for i in items for a in i.annotations} == {"stop", "trafficlight"}
    four = list(VocFormat(ProjectFS(str(out / "project"))).iter_items())
    assert len(four) == 120 and "speedlimit" in {a.label for i in four for a in i.annotations}
    assert cfg.projects[PROJECT].stage == "shadow"
    assert Path(cfg.projects[PROJECT].predictions.source).is_dir()  # type: ignore[union-attr]

    promote(config)
    promoted = load_config(config)
    assert promoted.projects[PROJECT].stage == "autolabel"
    assert promoted.projects[MODEL_PROJECT] == cfg.projects[MODEL_PROJECT]


def test_prepare_replaces_an_earlier_demo_but_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    prepare(out, EXAMPLES)
    (out / "project" / "annotations" / "leftover.xml").write_text("<annotation/>")
    prepare(out, EXAMPLES)
    assert not (out / "project" / "annotations" / "leftover.xml").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="not an earlier demo folder"):
        prepare(foreign, EXAMPLES)
    assert (foreign / "notes.txt").read_text() == "x"


@pytest.mark.slow
def test_demo_runs_the_whole_job(tmp_path: Path) -> None:
    before = _tree_digest(EXAMPLES / "sample_project")
    start = time.perf_counter()
    result = CliRunner().invoke(
        cli, ["-q", "demo", "--out", str(tmp_path / "demo"), "--no-progress"]
    )
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert elapsed < 300, f"the demo took {elapsed:.0f} s"

    out = tmp_path / "demo"
    cfg = load_config(out / "config.yaml")
    store = ReportStore(cfg.report_store)
    model_runs = store.records(MODEL_PROJECT)
    runs = store.records(PROJECT)
    assert [r.status for r in model_runs] == ["ok"] and [r.status for r in runs] == ["ok", "ok"]
    assert "model" in model_runs[0].outputs and "predicted_loss" in model_runs[0].counts["scorers"]
    assert [r.stage for r in runs] == ["shadow", "autolabel"]
    shadow, final = runs
    assert shadow.counts["shadow"]["written"] == 0
    written = final.counts["autolabel"]["written"]
    assert written >= 1 and written == final.counts["autolabel"]["selected"]
    assert final.counts["reference"].endswith(shadow.run_id)
    for record in (*model_runs, *runs):
        assert Path(record.outputs["report"]).is_file()
        assert (
            f"report ({record.project}, {record.stage}): {record.outputs['report']}"
            in result.output
        )

    sidecars = list((out / PROJECT / ".labeltriage" / "auto").glob("*.json"))
    assert len(sidecars) == written
    assert all((out / PROJECT / "annotations" / f"{p.stem}.xml").is_file() for p in sidecars)
    # honest: ε ≤ 0.1 printed next to the bound, written items only from the easy tier
    assert final.counts["autolabel"]["epsilon"] <= 0.1
    assert "≤ ε 0.1 at 90 % confidence" in result.output
    table = pd.read_parquet(Path(final.outputs["difficulty"]))
    written_ids = {p.stem for p in sidecars}
    assert set(table.loc[table["item_id"].isin(written_ids), "tier"]) == {"easy"}
    # the model project: no constant scorer presented as a ranking
    model_table = pd.read_parquet(Path(model_runs[0].outputs["difficulty"]))
    summary = json.loads(Path(model_runs[0].outputs["summary"]).read_text())
    for name in summary["scorers"]:
        if model_table[name].nunique(dropna=True) <= 1:
            assert name in summary["combination"]["dropped"]
            assert summary["combination"]["weights"][name] == 0.0
    # difficulty is predicted loss combined with the other scores: the loss module counts
    assert model_table["predicted_loss"].nunique() > 1
    assert summary["combination"]["weights"]["predicted_loss"] > 0
    shown = [ln for ln in result.output.splitlines() if ln.strip().startswith("combination (")]
    assert shown and "predicted_loss" in shown[0]
    assert (
        _tree_digest(EXAMPLES / "sample_project") == before
    )  # the bundled sample is never touched
    data = yaml.safe_load((out / "config.yaml").read_text())
    assert data["projects"][PROJECT]["stage"] == "autolabel"

"""The command line: help for every command, bad usage → exit 2, config as option defaults,
and one end-to-end ``run`` of the sample project."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from autolabel.cli import COMMANDS, cli, main
from autolabel.config import load_config
from autolabel.store import ReportStore, StateDB

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def write_config(tmp_path: Path, **project: object) -> Path:
    data = {
        "report_store": str(tmp_path / "reports"),
        "projects": {
            "roads": {
                "source": str(EXAMPLES / "sample_project"),
                "format": "voc",
                "predictions": {
                    "source": str(EXAMPLES / "sample_project_predictions" / "yolo"),
                    "format": "yolo",
                },
                "label_map": str(EXAMPLES / "label_map.yaml"),
                **project,
            }
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_group_help_lists_every_command(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output
    assert "--config" in result.output and "Exit codes" in result.output


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help_for_every_option(runner: CliRunner, name: str) -> None:
    result = runner.invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    command = cli.get_command(click.Context(cli), name)
    assert command is not None and command.help
    missing = [
        "/".join(param.opts)
        for param in command.params
        if isinstance(param, click.Option) and param.name != "help" and not param.help
    ]
    assert not missing, f"options of {name} without help text: {', '.join(missing)}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_rejects_an_unknown_option(runner: CliRunner, name: str) -> None:
    result = runner.invoke(cli, [name, "--no-such-option"])
    assert result.exit_code == 2
    assert "No such option" in result.output


@pytest.mark.parametrize("name", list(COMMANDS))
def test_missing_required_options_exit_2(
    runner: CliRunner, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LABELTRIAGE_CONFIG", raising=False)
    command = cli.get_command(click.Context(cli), name)
    assert command is not None
    required = [p for p in command.params if p.required]
    if not required:
        pytest.skip(f"{name} has no required option")
    result = runner.invoke(cli, [name])
    assert result.exit_code == 2
    assert "Missing" in result.output


def test_unknown_command_is_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["scroe"])
    assert result.exit_code == 2


@pytest.mark.parametrize("name", ["run", "schedule"])
def test_operator_commands_need_a_config(
    runner: CliRunner, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LABELTRIAGE_CONFIG", raising=False)
    result = runner.invoke(cli, [name])
    assert result.exit_code == 2
    assert "no config" in result.output


@pytest.mark.parametrize("where", ["command", "group"])
def test_bad_config_names_the_field_and_exits_2(
    runner: CliRunner, tmp_path: Path, where: str
) -> None:
    path = write_config(tmp_path, epsilon=3)
    args = ["run", "--config", str(path)] if where == "command" else ["--config", str(path), "run"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 2
    assert "projects.roads.epsilon: Input should be less than 1" in result.output


def test_missing_config_file_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["run", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "file not found" in result.output


def test_run_unknown_project_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(
        cli, ["run", "--config", str(write_config(tmp_path)), "--project", "kitti"]
    )
    assert result.exit_code == 2 and "unknown project 'kitti'" in result.output


def test_schedule_without_any_schedule_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["schedule", "--config", str(write_config(tmp_path))])
    assert result.exit_code == 2 and "no project has a schedule" in result.output


def test_schedule_list_shows_jobs(runner: CliRunner, tmp_path: Path) -> None:
    path = write_config(tmp_path, schedule="15 4 * * *")
    result = runner.invoke(cli, ["schedule", "--config", str(path), "--list"])
    assert result.exit_code == 0, result.output
    assert "roads" in result.output and "15 4 * * *" in result.output
    result = runner.invoke(cli, ["schedule", "--config", str(path), "--list", "--json"])
    row = json.loads(result.output.strip().splitlines()[0])
    assert row["project"] == "roads" and row["last_status"] is None


def test_demo_refuses_a_folder_it_did_not_make(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = runner.invoke(cli, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not an earlier demo folder" in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_demo_needs_the_examples(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(
        cli, ["demo", "--out", str(tmp_path / "out"), "--examples", str(tmp_path / "empty")]
    )
    assert result.exit_code == 2 and "missing" in result.output


def test_config_fills_options_of_other_commands(runner: CliRunner, tmp_path: Path) -> None:
    """stats has --source required: the config provides it."""
    path = write_config(tmp_path)
    result = runner.invoke(cli, ["--config", str(path), "stats"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert stats["items"] == 120 and stats["labeled"] == 80


def test_inline_label_map_reaches_commands(runner: CliRunner, tmp_path: Path) -> None:
    path = write_config(tmp_path, label_map={"map": {"stop sign": "stop"}})
    # stdout only: the label-map check warns on stderr (this map leaves trafficlight unmapped)
    with_map = json.loads(runner.invoke(cli, ["--config", str(path), "stats"]).stdout)
    path = write_config(
        tmp_path, label_map={"map": {"stop sign": "stop", "traffic light": "trafficlight"}}
    )
    with_two = json.loads(runner.invoke(cli, ["--config", str(path), "stats"]).stdout)
    assert 0 < with_map["predictions"] < with_two["predictions"]


def test_commands_section_sets_any_option_and_unknown_ones_exit_2(
    runner: CliRunner, tmp_path: Path
) -> None:
    path = write_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["commands"] = {"stats": {"format": "yolo"}}
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(cli, ["--config", str(path), "stats"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)  # the VOC project read as YOLO: nothing labeled
    assert stats["format"] == "yolo" and stats["labeled"] == 0
    data["commands"] = {"stats": {"colour": "red"}, "frobnicate": {}}
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(cli, ["--config", str(path), "stats"])
    assert result.exit_code == 2
    assert "commands.stats.colour: unknown option of stats" in result.output
    assert "commands.frobnicate: unknown command" in result.output


def test_main_maps_library_errors_to_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--config", str(tmp_path / "nope.yaml")])
    assert exc.value.code == 2
    assert "file not found" in capsys.readouterr().err


def test_run_that_fails_exits_1_and_is_recorded(runner: CliRunner, tmp_path: Path) -> None:
    path = write_config(tmp_path, source=str(tmp_path / "no_such_project"))
    result = runner.invoke(cli, ["-q", "run", "--config", str(path), "--json"])
    assert result.exit_code == 1
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["status"] == "failed" and record["error"].startswith("stats:")
    stored = ReportStore(str(tmp_path / "reports")).records("roads")
    assert [r.status for r in stored] == ["failed"]


def test_run_end_to_end_then_again_against_the_first(runner: CliRunner, tmp_path: Path) -> None:
    """The real pipeline on the 120-image sample project, stage shadow, with its predictions."""
    path = write_config(
        tmp_path, stage="shadow", epsilon=0.3, delta=0.1, min_count=10, schedule="0 2 * * *"
    )
    first = runner.invoke(cli, ["run", "--config", str(path), "--json"])
    assert first.exit_code == 0, first.output
    record = json.loads(first.output.strip().splitlines()[-1])
    assert record["status"] == "ok" and record["stage"] == "shadow"
    run_dir = Path(record["outputs"]["report"]).parent
    for name in (
        "stats.json",
        "difficulty.parquet",
        "summary.json",
        "report.html",
        "plan.csv",
        "autolabel.json",
        "run.json",
    ):
        assert (run_dir / name).is_file(), name
    assert record["counts"]["items"] == 120 and sum(record["counts"]["tiers"].values()) == 120
    shadow = record["counts"]["shadow"]
    assert shadow["written"] == 0  # shadow writes nothing to the project
    html = (run_dir / "report.html").read_text()
    assert "Auto-labeling not run" not in html  # the report shows the gate that just ran
    assert set(record["steps"]) == {"stats", "score", "report", "shadow"}
    assert not (EXAMPLES / "sample_project" / ".labeltriage").exists()

    second = runner.invoke(cli, ["run", "--config", str(path)])
    assert second.exit_code == 0, second.output
    assert "roads: ok" in second.output and "report:" in second.output
    records = ReportStore(str(tmp_path / "reports")).records("roads")
    assert [r.status for r in records] == ["ok", "ok"]
    assert records[1].counts["reference"] == str(run_dir)  # scored against the first run

    listed = runner.invoke(cli, ["schedule", "--config", str(path), "--list"])
    assert listed.exit_code == 0 and f"ok {records[1].run_id}" in listed.output


def test_sigterm_during_run_records_it_failed_and_frees_the_project(tmp_path: Path) -> None:
    """A container being stopped: the run ends, is recorded failed, and its lock is released.

    The run is held inside its steps for as long as the test needs: one label file of the
    project is a named pipe that nobody writes, so reading it blocks until the signal.
    """
    project = tmp_path / "project"
    shutil.copytree(EXAMPLES / "sample_project", project)
    held = sorted((project / "annotations").glob("*.xml"))[-1]
    held.unlink()
    os.mkfifo(held)
    path = write_config(tmp_path, source=str(project))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen(
        [sys.executable, "-m", "autolabel.cli", "run", "--config", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    store = ReportStore(str(tmp_path / "reports"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not store.records("roads"):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    [record] = store.records("roads")
    assert record.status == "failed" and record.error == "interrupted (SystemExit)"
    db = StateDB(str(load_config(path).job_store_url()))
    assert db.lock_holder("roads") is None
    assert [h["status"] for h in db.history("roads")] == ["failed"]

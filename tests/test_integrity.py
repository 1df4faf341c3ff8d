"""Faults beyond the write-back itself: run records, locks, recovery, config, CSV, secrets.

Each test is one case of "nothing lost, nothing disguised, one clear line": a report store
that fails, a run killed without recording its end, a stale lock of a dead process, an
interrupted run found on the next open, a config that is not UTF-8 or an alias bomb, a
symlinked label folder, spreadsheet formulas in CSV cells, passwords in URLs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
import yaml
from _moto import local_s3, s3_options
from click.testing import CliRunner
from test_scheduler import fake_run

import connectors.storage as storage
from autolabel.cli import cli
from autolabel.config import ConfigError, load_config, parse_config
from autolabel.pipeline import run_locked, run_project
from autolabel.store import ReportStore, RunRecord, StateDB, locks_table, new_run_id, utcnow
from connectors.csvsafe import csv_text, neutralise
from connectors.errors import VersionConflict
from connectors.formats.base import LabelWrite, Provenance
from connectors.formats.voc import VocFormat
from connectors.model import Annotation, ItemStatus
from connectors.owner import Owner, current
from connectors.project import open_project
from connectors.storage import ProjectFS, redact_url
from connectors.writeback import RUNS_DIR, Journal, list_runs, recover, write_run
from connectors.writeback import new_run_id as new_wb_run_id

REPO = Path(__file__).resolve().parents[1]
VOC_XML = "<annotation><size><width>64</width><height>48</height></size><object><name>stop</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object></annotation>"


def _voc(root: Path, n: int = 6, labeled: int = 2) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for k in range(n):
        Image.new("RGB", (64, 48), (k * 30, 20, 90)).save(root / "images" / f"i{k}.jpg")
        if k < labeled:
            (root / "annotations" / f"i{k}.xml").write_text(VOC_XML)
    return root


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _dead_owner() -> str:
    return str(Owner(host=socket.gethostname(), pid=_dead_pid(), start="1"))


# -- process identity ------------------------------------------------------------------------


def test_owner_tells_a_dead_process_from_a_live_one() -> None:
    me = current()
    assert Owner.parse(str(me)) == me and not me.is_dead()
    assert Owner.parse(_dead_owner()).is_dead()  # type: ignore[union-attr]
    assert not Owner(host="another-host", pid=1, start="5").is_dead()  # cannot be seen: alive
    reused = Owner(host=me.host, pid=os.getpid(), start="not-my-start-time")
    assert reused.is_dead()  # same pid, another process (a pid reused after a restart)
    assert Owner.parse("dead:1") is None and Owner.parse("") is None


# -- the write-back: journals and recovery ------------------------------------------------------


def _writes(fmt: VocFormat, run_id: str) -> list[LabelWrite]:
    return [
        LabelWrite(
            item=i,
            annotations=[Annotation(label="stop", box=(2, 2, 20, 20), score=0.9)],
            provenance=Provenance(run_id=run_id, model_version="m", score=0.9),
        )
        for i in fmt.iter_items()
        if i.status is ItemStatus.UNLABELED
    ]


def _killed_run(root: Path) -> str:
    """A run killed (SIGKILL) after writing two labels; returns its run id."""
    run_id = new_wb_run_id()
    pid = os.fork()
    if pid == 0:
        fmt = VocFormat(ProjectFS(str(root)))
        real = fmt.write_labels

        def write_then_die(writes: list[LabelWrite]) -> Any:
            real(writes[:2])
            os.kill(os.getpid(), signal.SIGKILL)

        fmt.write_labels = write_then_die  # type: ignore[method-assign]
        write_run(fmt, _writes(fmt, run_id), run_id)
        os._exit(0)
    os.waitpid(pid, 0)
    return run_id


def test_any_command_opening_the_project_recovers_a_killed_run(tmp_path: Path) -> None:
    root = _voc(tmp_path / "p")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    run_id = _killed_run(root)
    assert (root / RUNS_DIR / f"{run_id}.journal").exists()
    unrecovered = VocFormat(ProjectFS(str(root)))
    assert [i.status for i in unrecovered.iter_items()].count(ItemStatus.AUTO_LABELED) == 2
    result = CliRunner().invoke(cli, ["stats", "-s", str(root), "-f", "voc"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert (stats["labeled"], stats["auto_labeled"]) == (2, 0)
    after = {
        p: p.read_bytes() for p in root.rglob("*") if p.is_file() and ".labeltriage" not in p.parts
    }
    assert after == before
    (manifest,) = list_runs(ProjectFS(str(root)))
    assert manifest.stage == "rolled_back" and manifest.error.startswith("interrupted")
    assert manifest.meta["recovered"]["by"] == str(current())
    assert not (root / RUNS_DIR / f"{run_id}.journal").exists()


def test_recover_command_says_what_it_did(tmp_path: Path) -> None:
    root = _voc(tmp_path / "p")
    run_id = _killed_run(root)
    result = CliRunner().invoke(cli, ["recover", "-s", str(root), "-f", "voc"])
    assert result.exit_code == 0, result.output
    (run,) = json.loads(result.stdout)["runs"]
    assert run["run_id"] == run_id and run["outcome"] == "rolled_back"
    assert sorted(run["removed"]) == ["i2", "i3"]
    again = CliRunner().invoke(cli, ["recover", "-s", str(root), "-f", "voc"])
    assert json.loads(again.stdout)["runs"] == [] and "nothing to recover" in again.stderr


def test_a_live_run_is_left_alone(tmp_path: Path) -> None:
    root = _voc(tmp_path / "p")
    fmt = VocFormat(ProjectFS(str(root)))
    journal = Journal.start(fmt.project, new_wb_run_id(), "voc")  # held, as a writing run holds it
    try:
        (result,) = recover(fmt)
        assert result.outcome == "in_progress" and "in progress" in result.message
        assert (root / journal.rel).exists()
    finally:
        journal.finish()
    assert recover(fmt) == []


def test_remote_journal_of_another_host_waits_until_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    project = ProjectFS(f"memory://journals-{uuid.uuid4().hex}")
    fmt = VocFormat(project)
    project.write_bytes("images/a.jpg", b"x")
    run_id = new_wb_run_id()
    head = {"run_id": run_id, "format": "voc", "owner": "elsewhere:7:9", "at": time.time()}
    project.write_text(f"{RUNS_DIR}/{run_id}.journal", json.dumps(head) + "\n")
    (result,) = recover(fmt)
    assert result.outcome == "in_progress" and "stale" in result.message
    import connectors.writeback as wb

    monkeypatch.setattr(wb, "STALE_SECONDS", 0.0)
    (result,) = recover(fmt)
    assert result.outcome == "rolled_back"
    assert list_runs(project)[0].stage == "rolled_back"


def test_rollback_of_a_run_still_writing_is_refused(tmp_path: Path) -> None:
    from connectors.errors import UsageError
    from connectors.writeback import rollback

    fmt = VocFormat(ProjectFS(str(_voc(tmp_path / "p"))))
    run_id = new_wb_run_id()
    journal = Journal.start(fmt.project, run_id, "voc")
    try:
        with pytest.raises(UsageError, match="in progress"):
            rollback(fmt, run_id)
    finally:
        journal.finish()


# -- compare-and-swap on a local disk -----------------------------------------------------------


def test_a_save_between_check_and_exchange_is_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = ProjectFS(str(tmp_path))
    project.write_bytes("doc.json", b"v1")
    data, version = project.read_versioned("doc.json")
    real = storage._renameat2()
    assert real is not None

    saved = []

    def save_first(a: str, b: str) -> None:  # someone saves at the worst moment, once
        if not saved:
            other = tmp_path / ".someone-else"
            other.write_bytes(b"their save")
            os.replace(other, tmp_path / "doc.json")
            saved.append(True)
        real(a, b)

    monkeypatch.setattr(storage, "_renameat2", lambda: save_first)
    with pytest.raises(VersionConflict):
        project.replace_if("doc.json", b"ours", version)
    assert (tmp_path / "doc.json").read_bytes() == b"their save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json"]
    data, version = project.read_versioned("doc.json")
    project.replace_if("doc.json", data + b" + ours", version)
    assert (tmp_path / "doc.json").read_bytes() == b"their save + ours"


# -- run records, locks, report-store failures ---------------------------------------------------


def _config(tmp_path: Path, source: Path | str, **top: Any) -> Path:
    data = {
        "report_store": str(tmp_path / "store"),
        "scheduler": {"job_store": f"sqlite:///{tmp_path / 'state.sqlite'}"},
        "projects": {"roads": {"source": str(source), "format": "voc", "scorers": ["fourier"]}},
        **top,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_record_left_running_by_a_dead_run_and_its_lock_are_recovered(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, tmp_path / "p"))
    store = ReportStore(cfg.report_store)
    dead = _dead_owner()
    stuck = RunRecord(
        run_id=new_run_id(), project="roads", stage="report", started=utcnow(), owner=dead
    )
    store.write_record(stuck)
    db = StateDB(cfg.job_store_url())  # type: ignore[arg-type]
    with db.engine.begin() as conn:  # its lock, far from stale by time
        conn.execute(
            locks_table.insert().values(
                project="roads",
                owner=f"{dead}:abcd1234",
                acquired_at=time.time(),
                expires_at=time.time() + 3600,
            )
        )
    record = run_locked(cfg, "roads", run_fn=fake_run, db=db)
    assert record.status == "ok"  # not skipped until the lock's TTL
    old = store.read_record("roads", stuck.run_id)
    assert old is not None and old.status == "failed" and old.error.startswith("interrupted")
    history = {r["run_id"]: r for r in db.history("roads")}
    assert history[stuck.run_id]["status"] == "failed"


def test_a_live_holder_keeps_its_lock(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, tmp_path / "p"))
    db = StateDB(cfg.job_store_url())  # type: ignore[arg-type]
    with db.lock("roads", ttl=600).held() as acquired:
        assert acquired
        assert run_locked(cfg, "roads", run_fn=fake_run, db=db).status == "skipped"


def test_a_report_store_that_fails_is_a_failed_run_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the report store should be")
    path = _config(tmp_path, _voc(tmp_path / "p"), report_store=str(blocker / "reports"))
    result = subprocess.run(
        [sys.executable, "-m", "autolabel.cli", "--config", str(path), "run"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stdout.startswith("roads: failed") and "report store" in result.stdout
    (row,) = StateDB(f"sqlite:///{tmp_path / 'state.sqlite'}").history("roads")
    assert row["status"] == "failed" and row["error"].startswith("report store:")


def test_no_bucket_is_created_unless_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with local_s3(monkeypatch) as (endpoint, client):
        options = s3_options(endpoint)
        data = yaml.safe_load(_config(tmp_path, _voc(tmp_path / "p")).read_text())
        data.update(report_store="s3://no-such-bucket/reports", report_store_options=options)
        cfg = parse_config(data)
        record = run_project(cfg, "roads")
        assert record.status == "failed" and "bucket" in (record.error or "").lower(), record.error
        # (moto keeps one store per process: other tests' buckets may be there)
        before = {b["Name"] for b in client.list_buckets()["Buckets"]}
        assert "no-such-bucket" not in before
        cfg = parse_config({**data, "report_store_create": True})
        record = run_project(cfg, "roads")
        assert record.status == "ok", record.error
        after = {b["Name"] for b in client.list_buckets()["Buckets"]}
        assert after - before == {"no-such-bucket"}


def test_passwords_in_urls_never_reach_records_history_or_logs(tmp_path: Path) -> None:
    source = "http://annotator:hunter2@127.0.0.1:9/projects/1"
    path = _config(tmp_path, source)
    result = subprocess.run(
        [sys.executable, "-m", "autolabel.cli", "-v", "--config", str(path), "run"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "127.0.0.1:9" in result.stdout + result.stderr  # the error is there ...
    assert "hunter2" not in result.stdout + result.stderr  # ... without the password
    records = list((tmp_path / "store" / "roads").glob("*/run.json"))
    assert records and all("hunter2" not in r.read_text() for r in records)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'state.sqlite'}")
    with engine.connect() as conn:
        rows = [
            str(tuple(r)) for r in conn.execute(sa.text("select * from labeltriage_run_history"))
        ]
    assert rows and all("hunter2" not in r for r in rows)
    assert redact_url("s3://KEY:se/cr+et@bucket/x") == "s3://KEY:***@bucket/x"


# -- config ---------------------------------------------------------------------------------------


def test_a_config_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes("projects:\n  roads:\n    source: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"line 3: not UTF-8 text \(byte 0xe9\)"):
        load_config(path)
    result = CliRunner().invoke(cli, ["--config", str(path), "stats"])
    assert result.exit_code == 2 and "not UTF-8" in result.output


def test_a_yaml_alias_bomb_is_refused_fast(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nprojects: {}\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="alias"):
        load_config(path)
    assert time.perf_counter() - start < 2.0
    shared = tmp_path / "anchors.yaml"  # ordinary anchors still work
    shared.write_text(
        "defaults: &d {format: voc, source: p}\nprojects:\n  a: *d\n  b: {<<: *d, stage: report}\n"
    )
    data = yaml.safe_load(shared.read_text())
    data.pop("defaults")
    assert set(parse_config(data, base_dir=tmp_path).projects) == {"a", "b"}


# -- reading a project ------------------------------------------------------------------------------


def test_a_symlinked_label_folder_is_one_error_row(tmp_path: Path) -> None:
    root = _voc(tmp_path / "p")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.xml").write_text(VOC_XML)
    (root / "images" / "sub").mkdir()
    (root / "images" / "sub" / "x.jpg").hardlink_to(root / "images" / "i0.jpg")
    (root / "annotations" / "sub").symlink_to(elsewhere)
    result = CliRunner().invoke(cli, ["stats", "-s", str(root), "-f", "voc"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["items"] == 7 and stats["labeled"] == 2
    (error,) = stats["errors"]
    assert error["item"] == "sub/x" and "outside the project root" in error["message"]


def test_label_studio_tasks_pointing_elsewhere_are_item_errors(tmp_path: Path) -> None:
    from difficulty.imagestream import iter_image_batches

    root = _voc(tmp_path / "p", n=1, labeled=0)
    secret = tmp_path / "secret.jpg"
    secret.hardlink_to(root / "images" / "i0.jpg")
    tasks = [
        {"id": 1, "data": {"image": "/data/local-files/?d=images/i0.jpg"}},
        {"id": 2, "data": {"image": secret.as_uri()}},
        {"id": 3, "data": {"image": "http://127.0.0.1:9/data/upload/1/x.jpg"}},
    ]
    (root / "export.json").write_text(json.dumps(tasks))
    fmt = open_project(str(root / "export.json"), "labelstudio")
    batches = list(
        iter_image_batches(fmt.iter_items(), fmt.project, size=16, batch_size=4, num_workers=0)
    )
    errors = {k: v for b in batches for k, v in b.errors.items()}
    assert [i for b in batches for i in b.item_ids] == ["1"]
    assert set(errors) == {"2", "3"} and all("allow_image_hosts" in e for e in errors.values())
    allowed = open_project(
        str(root / "export.json"), "labelstudio", allow_image_hosts=[tmp_path.as_uri()]
    )
    batches = list(
        iter_image_batches(
            allowed.iter_items(), allowed.project, size=16, batch_size=4, num_workers=0
        )
    )
    assert [i for b in batches for i in b.item_ids] == ["1", "2"]


# -- CSV ---------------------------------------------------------------------------------------------


def test_csv_cells_never_start_a_formula(tmp_path: Path) -> None:
    from difficulty.selection import write_selection

    assert neutralise("=HYPERLINK(1)") == "'=HYPERLINK(1)" and neutralise(-1.5) == -1.5
    frame = pd.DataFrame(
        {"item_id": ["=cmd|' /C calc'!A0", "+1", "@sum", "-x", "ok"], "score": [-0.5, 1, 2, 3, 4]}
    )
    lines = csv_text(frame).splitlines()
    assert lines[1:] == ["'=cmd|' /C calc'!A0,-0.5", "'+1,1.0", "'@sum,2.0", "'-x,3.0", "ok,4.0"]
    out = tmp_path / "next.csv"
    write_selection([("=1+2", 0.9), ("b", 0.5)], str(out))
    assert out.read_text().splitlines()[1] == "'=1+2,0.9,1"


def test_plan_and_assignment_csv_are_neutralised(tmp_path: Path) -> None:
    from difficulty.plan import write_plan

    plan = {
        "tiers": [{"tier": "easy", "items": 1, "remaining": 1, "seconds_per_item": 20, "seconds_source": "default", "hours": 0.1}],
        "assignment": [{"name": "=HYPERLINK(\"http://x\")", "easy": 1}],
        "remaining_items": 1, "remaining_hours": 0.1, "audit_items": 0, "audit_hours": 0.0,
        "auto_label": {"kind": "none", "items": 0, "hours_saved": 0.0},
        "forecast_days": 1, "forecast_days_if_auto_labeled": 1,
    }  # fmt: skip
    text = Path(write_plan(plan, str(tmp_path))).read_text()
    assert "'=HYPERLINK" in text and ",=HYPERLINK" not in text

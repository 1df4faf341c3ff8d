"""The scheduler: persistent jobs, no overlapping runs of a project, a record per run.

Runs are tiny fake run functions (``RUNNER``), referenced by name as the real job is,
so the same code path (lock, history, records) is exercised without the pipeline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from autolabel.config import AppConfig, load_config
from autolabel.pipeline import run_locked
from autolabel.scheduler import (
    current_slot,
    list_jobs,
    make_scheduler,
    open_job_store,
    scheduled_run,
    serve,
    sync_jobs,
)
from autolabel.store import ReportStore, RunRecord, StateDB, locks_table, new_run_id, utcnow

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
RUNNER = "test_scheduler:fake_run"
FAILING_RUNNER = "test_scheduler:failing_run"


def fake_run(
    cfg: AppConfig,
    name: str,
    *,
    run_id: str | None = None,
    trigger: str = "manual",
    progress: bool = False,
) -> RunRecord:
    """Writes a record, leaves a ``started`` marker, sleeps ``FAKE_RUN_SECONDS``, finishes ``ok``.

    With ``FAKE_RUN_UNTIL_SKIPPED`` set it first holds on until a rival attempt of the same
    project has been recorded ``skipped`` (so overlap tests do not depend on timing).
    """
    store = ReportStore(cfg.report_store)
    record = RunRecord(
        run_id=run_id or new_run_id(),
        project=name,
        stage="report",
        trigger=trigger,
        started=utcnow(),
    )
    store.write_record(record)
    store.fs.write_text(f"{name}/{record.run_id}/started", str(os.getpid()))
    if os.environ.get("FAKE_RUN_UNTIL_SKIPPED"):  # hold the lock until the rival attempt gave up
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            r.status == "skipped" for r in store.records(name)
        ):
            time.sleep(0.05)
    time.sleep(float(os.environ.get("FAKE_RUN_SECONDS", "0.05")))
    record.status = "ok"
    record.finished = utcnow()
    store.write_record(record)
    store.fs.write_text(f"{name}/{record.run_id}/finished", str(os.getpid()))
    return record


def failing_run(
    cfg: AppConfig,
    name: str,
    *,
    run_id: str | None = None,
    trigger: str = "manual",
    progress: bool = False,
) -> RunRecord:
    raise RuntimeError("model file vanished")


def db_url(cfg: AppConfig) -> str:
    url = cfg.job_store_url()
    assert url is not None
    return url


def write_config(tmp_path: Path, projects: dict[str, str | None], **scheduler: object) -> Path:
    data = {
        "report_store": "store",
        "scheduler": {"misfire_grace_seconds": 600, **scheduler},
        "projects": {
            name: {"source": "project", "format": "voc", "schedule": cron}
            for name, cron in projects.items()
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def test_job_persists_across_restart_with_its_next_run_time(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"roads": "0 3 * * *", "kitti": "30 * * * *"})
    cfg = load_config(path)

    first = make_scheduler(cfg)
    first.start(paused=True)
    assert sync_jobs(first, cfg, str(path), runner=RUNNER) == {"roads": "added", "kitti": "added"}
    next_roads = first.get_job("roads").next_run_time
    first.shutdown(wait=False)

    # a new process would build a new scheduler on the same SQLite store
    second = make_scheduler(cfg)
    second.start(paused=True)
    try:
        assert {j.id for j in second.get_jobs()} == {"roads", "kitti"}
        job = second.get_job("roads")
        assert job.next_run_time == next_roads
        assert (job.next_run_time.hour, job.next_run_time.minute) == (3, 0)
        assert job.coalesce is True and job.max_instances == 1 and job.misfire_grace_time == 600
        assert sync_jobs(second, cfg, str(path), runner=RUNNER) == {
            "roads": "kept",
            "kitti": "kept",
        }
        assert second.get_job("roads").next_run_time == next_roads
    finally:
        second.shutdown(wait=False)

    listed = {j.project: j for j in list_jobs(cfg)}
    assert listed["roads"].next_run == next_roads and listed["roads"].schedule == "0 3 * * *"


def test_changed_schedule_is_rescheduled_and_removed_project_dropped(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"roads": "0 3 * * *", "kitti": "30 * * * *"})
    cfg = load_config(path)
    sched = make_scheduler(cfg)
    sched.start(paused=True)
    sync_jobs(sched, cfg, str(path), runner=RUNNER)
    sched.shutdown(wait=False)

    path = write_config(tmp_path, {"roads": "15 4 * * *"})
    cfg = load_config(path)
    sched = make_scheduler(cfg)
    sched.start(paused=True)
    try:
        assert sync_jobs(sched, cfg, str(path), runner=RUNNER) == {
            "roads": "rescheduled",
            "kitti": "removed",
        }
        job = sched.get_job("roads")
        assert (job.next_run_time.hour, job.next_run_time.minute) == (4, 15)
        assert sched.get_job("kitti") is None
    finally:
        sched.shutdown(wait=False)


def test_two_threads_one_project_only_one_runs_other_recorded_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_RUN_UNTIL_SKIPPED", "1")
    cfg = load_config(write_config(tmp_path, {"roads": None}))
    results: list[RunRecord] = []
    barrier = threading.Barrier(2)

    def attempt() -> None:
        barrier.wait()
        results.append(run_locked(cfg, "roads", run_fn=fake_run, trigger="schedule"))

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status for r in results) == ["ok", "skipped"]
    skipped = next(r for r in results if r.status == "skipped")
    assert "already in progress" in (skipped.error or "")

    records = ReportStore(cfg.report_store).records("roads")
    assert sorted(r.status for r in records) == ["ok", "skipped"]
    db = StateDB(db_url(cfg))
    assert sorted(h["status"] for h in db.history("roads")) == ["ok", "skipped"]
    assert db.lock_holder("roads") is None  # released after the run


def test_two_processes_one_project_only_one_runs(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"roads": "0 3 * * *"})
    code = f"from autolabel.scheduler import scheduled_run; print(scheduled_run({str(path)!r}, 'roads', {RUNNER!r}))"
    env = _env() | {"FAKE_RUN_UNTIL_SKIPPED": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    assert sorted(outs) == ["ok", "skipped"]
    cfg = load_config(path)
    records = ReportStore(cfg.report_store).records("roads")
    assert sorted(r.status for r in records) == ["ok", "skipped"]
    assert {r.trigger for r in records} == {"schedule"}


def test_a_record_and_history_row_per_run(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"roads": "0 3 * * *"})
    cfg = load_config(path)
    returned = [run_locked(cfg, "roads", run_fn=fake_run, trigger="schedule") for _ in range(3)]
    returned.append(run_locked(cfg, "roads", run_fn=failing_run, trigger="schedule"))
    assert [r.status for r in returned] == ["ok", "ok", "ok", "failed"]
    records = ReportStore(cfg.report_store).records("roads")
    assert [r.status for r in records] == ["ok", "ok", "ok", "failed"]
    assert "model file vanished" in (records[-1].error or "")
    assert all(r.finished is not None and r.finished >= r.started for r in records)
    history = StateDB(db_url(cfg)).history("roads")
    assert [h["run_id"] for h in reversed(history)] == [r.run_id for r in records]
    last = {j.project: j for j in list_jobs(cfg)}["roads"]
    assert last.last_status == "failed" and last.last_run_id == records[-1].run_id


def test_a_scheduled_slot_runs_once_even_when_two_daemons_fire_it(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, {"roads": "0 3 * * *"}))
    slot = "2026-01-01T03:00:00+00:00"
    first = run_locked(cfg, "roads", run_fn=fake_run, trigger="schedule", slot=slot)
    second = run_locked(cfg, "roads", run_fn=fake_run, trigger="schedule", slot=slot)
    assert (first.status, second.status) == ("ok", "skipped")
    assert f"already ran (run {first.run_id})" in (second.error or "")
    assert (
        run_locked(
            cfg, "roads", run_fn=fake_run, trigger="schedule", slot="2026-01-02T03:00:00+00:00"
        ).status
        == "ok"
    )
    assert (
        run_locked(cfg, "roads", run_fn=fake_run, trigger="manual").status == "ok"
    )  # manual runs have no slot


def test_current_slot_is_the_latest_fire_time_within_the_grace(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, {"roads": "0 3 * * *"}, misfire_grace_seconds=3600))
    at = datetime(2026, 3, 1, 3, 20, tzinfo=timezone.utc)
    assert current_slot(cfg, "0 3 * * *", at) == "2026-03-01T03:00:00+00:00"
    assert current_slot(cfg, "*/5 * * * *", at) == "2026-03-01T03:20:00+00:00"
    assert current_slot(cfg, "0 3 * * *", at + timedelta(hours=2)) is None  # past the grace


def test_a_config_broken_between_runs_fails_that_run_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(tmp_path, {"roads": "0 3 * * *"})
    path.write_text(
        path.read_text().replace("misfire_grace_seconds: 600", "misfire_grace_seconds: -1")
    )
    assert scheduled_run(str(path), "roads", RUNNER) == "failed"
    assert "scheduler.misfire_grace_seconds" in caplog.text


def test_stale_lock_of_a_crashed_run_is_taken_over(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, {"roads": None}))
    db = StateDB(db_url(cfg))
    with db.engine.begin() as conn:
        conn.execute(
            locks_table.insert().values(
                project="roads", owner="dead:1", acquired_at=0.0, expires_at=1.0
            )
        )
    assert run_locked(cfg, "roads", run_fn=fake_run, db=db).status == "ok"
    live = db.lock("roads", ttl=60)
    assert live.acquire()
    assert not db.lock("roads", ttl=60).acquire()
    live.release()


def _due_now(path: Path, project: str) -> None:
    """Store the job as if the daemon had been down when it was due (a misfire)."""
    cfg = load_config(path)
    sched = make_scheduler(cfg)
    sched.start(paused=True)
    sync_jobs(sched, cfg, str(path), runner=RUNNER)
    sched.shutdown(wait=False)
    store = open_job_store(cfg)
    job = store.lookup_job(project)
    job.next_run_time = datetime.now(timezone.utc) - timedelta(seconds=30)
    store.update_job(job)
    store.shutdown()


def _missed_run_done(cfg: AppConfig, store: ReportStore, project: str) -> bool:
    """The missed run finished and the job's next run is in the future: every firing the
    scheduler was going to make for the missed time has been made (stopping now waits for
    any still running), so counting the records afterwards counts them all."""
    if not any(r.status == "ok" for r in store.records(project)):
        return False
    nxt = {j.project: j for j in list_jobs(cfg)}[project].next_run
    return nxt is not None and nxt > datetime.now(timezone.utc)


def test_missed_run_runs_once_after_restart(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"roads": "0 3 * * *"})
    _due_now(path, "roads")
    cfg = load_config(path)
    store = ReportStore(cfg.report_store)
    stop = threading.Event()
    thread = threading.Thread(
        target=serve, args=(cfg, str(path)), kwargs={"runner": RUNNER, "stop": stop}
    )
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _missed_run_done(cfg, store, "roads"):
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=30)
    assert [r.status for r in store.records("roads")] == ["ok"]
    nxt = {j.project: j for j in list_jobs(cfg)}["roads"].next_run
    assert nxt is not None and nxt > datetime.now(timezone.utc) and (nxt.hour, nxt.minute) == (3, 0)


def test_sigterm_lets_the_run_in_progress_finish(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"roads": "0 3 * * *"})
    _due_now(path, "roads")
    cfg = load_config(path)
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from autolabel.config import load_config; from autolabel.scheduler import serve\n"
        f"serve(load_config({str(path)!r}), {str(path)!r}, runner={RUNNER!r})\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=_env() | {"FAKE_RUN_SECONDS": "3"},
        stderr=subprocess.PIPE,
        text=True,
    )
    store_root = Path(cfg.report_store) / "roads"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(store_root.glob("*/started")):
        time.sleep(0.1)
    assert list(store_root.glob("*/started")), "the due job did not start"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopping after the run in progress" in err
    assert len(list(store_root.glob("*/finished"))) == 1
    records = ReportStore(cfg.report_store).records("roads")
    assert [r.status for r in records] == ["ok"]

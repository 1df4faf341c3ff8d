"""The scheduler daemon: one cron job per configured project, persistent across restarts.

APScheduler 3 with a :class:`~apscheduler.jobstores.sqlalchemy.SQLAlchemyJobStore`
(SQLite next to a local report store by default, any SQLAlchemy URL otherwise):

* one job per project with a ``schedule``; job id = project name; ``coalesce=True`` (a
  backlog of missed runs becomes one run), ``max_instances=1`` and ``misfire_grace_time``
  from the config;
* jobs live in the database: on restart a job whose trigger is unchanged keeps its
  stored next run time, so a run missed while the daemon was down still happens (within
  the grace time); changed schedules are rescheduled, removed projects removed;
* the job function :func:`scheduled_run` is module-level and takes plain arguments
  (config path, project, runner reference), so it pickles into the store;
* each run holds the project lock of :class:`~autolabel.store.StateDB` in the same
  database, so two daemons sharing a store (or a daemon and ``labeltriage run``) never
  run one project twice at once; the loser is recorded ``skipped``;
* SIGTERM / SIGINT stop the daemon cleanly: no new runs start, the run in progress
  finishes, then the process exits.
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import FrameType
from typing import Any

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from autolabel.config import AppConfig, ConfigError, load_config
from autolabel.pipeline import RunFunction, run_locked
from autolabel.store import StateDB
from connectors.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_RUNNER = "autolabel.pipeline:run_project"
JOBS_TABLE = "labeltriage_jobs"


def resolve_runner(ref: str) -> RunFunction:
    """``"package.module:function"`` → the function (a run function, see :mod:`autolabel.pipeline`)."""
    module_name, _, attr = ref.partition(":")
    fn = getattr(importlib.import_module(module_name), attr)
    if not callable(fn):
        raise UsageError(f"runner {ref!r} is not callable")
    return fn  # type: ignore[no-any-return,unused-ignore]


def scheduled_run(config_path: str, project: str, runner: str = DEFAULT_RUNNER) -> str:
    """The job function: re-read the config, run ``project`` under its lock; returns the status.

    The config is read at every run, so edits (stage, ε, tiers) take effect at the next
    run without a restart; a config that became invalid makes the run fail loudly.
    """
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:  # an edit broke the config: this run cannot start, later ones may
        log.error("scheduled run of %s not started: %s", project, exc)
        return "failed"
    p = cfg.projects.get(project)
    if p is None:
        log.error(
            "project %s is no longer in %s; run skipped (restart the scheduler to drop its job)",
            project,
            config_path,
        )
        return "skipped"
    slot = current_slot(cfg, p.schedule) if p.schedule else None
    record = run_locked(cfg, project, run_fn=resolve_runner(runner), trigger="schedule", slot=slot)
    return record.status


def current_slot(cfg: AppConfig, cron: str, now: datetime | None = None) -> str | None:
    """The latest fire time of ``cron`` at or before ``now`` within the misfire grace (ISO, UTC).

    Two daemons that share a store both fire a job; the slot lets the second one see
    that this scheduled run already happened.
    """
    now = now or datetime.now(timezone.utc)
    trigger = trigger_for(cfg, cron)
    fire = trigger.get_next_fire_time(
        None, now - timedelta(seconds=cfg.scheduler.misfire_grace_seconds)
    )
    latest = None
    while fire is not None and fire <= now:
        latest = fire
        fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
    return latest.astimezone(timezone.utc).isoformat() if latest is not None else None


def job_store_url(cfg: AppConfig) -> str:
    url = cfg.job_store_url()
    if url is None:
        raise UsageError(
            "scheduler.job_store: a SQLAlchemy URL is required when report_store is not a local path"
        )
    return url


def make_scheduler(cfg: AppConfig) -> BackgroundScheduler:
    """A (not yet started) scheduler on the config's job store."""
    store = SQLAlchemyJobStore(
        url=job_store_url(cfg), tablename=JOBS_TABLE, engine_options=_engine_options(cfg)
    )
    return BackgroundScheduler(
        jobstores={"default": store},
        executors={"default": {"type": "threadpool", "max_workers": max(1, len(cfg.projects))}},
        job_defaults={
            "coalesce": True,
            "max_instances": 1,
            "misfire_grace_time": cfg.scheduler.misfire_grace_seconds,
        },
        timezone=cfg.scheduler.timezone,
    )


def _engine_options(cfg: AppConfig) -> dict[str, Any]:
    url = job_store_url(cfg)
    if url.startswith("sqlite"):
        from autolabel.store import make_engine

        make_engine(url).dispose()  # creates the folder of the SQLite file
        return {"connect_args": {"timeout": 30}}
    return {}


def trigger_for(cfg: AppConfig, cron: str) -> CronTrigger:
    return CronTrigger.from_crontab(cron, timezone=cfg.scheduler.timezone)


def sync_jobs(
    scheduler: BackgroundScheduler,
    cfg: AppConfig,
    config_path: str,
    *,
    runner: str = DEFAULT_RUNNER,
) -> dict[str, str]:
    """Make the stored jobs match the config; returns ``{project: added|kept|rescheduled|updated|removed}``.

    The scheduler must be started (paused is fine) so that the job store is open.
    """
    actions: dict[str, str] = {}
    wanted = {name: p.schedule for name, p in cfg.projects.items() if p.schedule}
    kwargs_for = {
        name: {"config_path": config_path, "project": name, "runner": runner} for name in wanted
    }
    for job in scheduler.get_jobs():
        if job.id not in wanted:
            scheduler.remove_job(job.id)
            actions[job.id] = "removed"
    for name, cron in wanted.items():
        trigger = trigger_for(cfg, cron)
        job = scheduler.get_job(name)
        if job is None:
            scheduler.add_job(
                scheduled_run, trigger=trigger, id=name, name=f"labeltriage run {name}", kwargs=kwargs_for[name],
                replace_existing=True, coalesce=True, max_instances=1,
                misfire_grace_time=cfg.scheduler.misfire_grace_seconds,
            )  # fmt: skip
            actions[name] = "added"
            continue
        action = "kept"
        if repr(job.trigger) != repr(trigger):
            scheduler.reschedule_job(name, trigger=trigger)
            action = "rescheduled"
        if (
            job.kwargs != kwargs_for[name]
            or job.misfire_grace_time != cfg.scheduler.misfire_grace_seconds
        ):
            scheduler.modify_job(
                name,
                kwargs=kwargs_for[name],
                misfire_grace_time=cfg.scheduler.misfire_grace_seconds,
                coalesce=True,
                max_instances=1,
            )
            action = "rescheduled" if action == "rescheduled" else "updated"
        actions[name] = action
    return actions


@dataclass
class JobInfo:
    project: str
    schedule: str | None
    next_run: datetime | None
    last_status: str | None
    last_run_id: str | None
    last_finished: str | None
    last_error: str | None


def open_job_store(cfg: AppConfig) -> SQLAlchemyJobStore:
    """The job store opened for reading and editing jobs without a running scheduler.

    (Starting and stopping a paused scheduler just to read jobs is not safe: a scheduler
    that is shutting down can still pick up a due job, fail to submit it and advance its
    next run time, losing the run of the daemon that owns the store.)
    """
    store = SQLAlchemyJobStore(
        url=job_store_url(cfg), tablename=JOBS_TABLE, engine_options=_engine_options(cfg)
    )
    store.start(BackgroundScheduler(timezone=cfg.scheduler.timezone), "default")
    return store


def list_jobs(cfg: AppConfig) -> list[JobInfo]:
    """Jobs in the store (and configured projects without one), with next run and last outcome."""
    store = open_job_store(cfg)
    try:
        jobs = {job.id: job for job in store.get_all_jobs()}
    finally:
        store.shutdown()
    db = StateDB(job_store_url(cfg))
    try:
        out = []
        for name in sorted(set(jobs) | set(cfg.projects)):
            job = jobs.get(name)
            last = db.last_outcome(name)
            p = cfg.projects.get(name)
            out.append(
                JobInfo(
                    project=name,
                    schedule=p.schedule if p is not None else None,
                    next_run=job.next_run_time if job is not None else None,
                    last_status=last["status"] if last else None,
                    last_run_id=last["run_id"] if last else None,
                    last_finished=last["finished"] if last else None,
                    last_error=last["error"] if last else None,
                )
            )
        return out
    finally:
        db.dispose()


def serve(
    cfg: AppConfig,
    config_path: str,
    *,
    runner: str = DEFAULT_RUNNER,
    stop: threading.Event | None = None,
    on_started: Callable[[BackgroundScheduler, dict[str, str]], None] | None = None,
) -> None:
    """Run the daemon until SIGTERM/SIGINT (or ``stop`` is set); the run in progress finishes first."""
    if not any(p.schedule for p in cfg.projects.values()):
        raise UsageError(
            "no project has a schedule; add projects.<name>.schedule (a cron string) to the config"
        )
    stop = stop or threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping after the run in progress", signal.Signals(signum).name)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handle)
    scheduler = make_scheduler(cfg)
    scheduler.start(paused=True)
    try:
        actions = sync_jobs(scheduler, cfg, config_path, runner=runner)
        for name, action in sorted(actions.items()):
            job = scheduler.get_job(name)
            log.info("job %s: %s; next run %s", name, action, job.next_run_time if job else "-")
        scheduler.resume()
        if on_started is not None:
            on_started(scheduler, actions)
        stop.wait()
    finally:
        scheduler.shutdown(wait=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("scheduler stopped")

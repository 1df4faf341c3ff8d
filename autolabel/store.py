"""Where runs leave their traces: the report store, run records, the project lock.

* :class:`ReportStore` — an fsspec location (local folder, ``s3://…``, ``memory://…``)
  holding one folder per run, ``<project>/<run_id>/``, with the run's outputs
  (``difficulty.parquet``, ``report.html``, …) and its record ``run.json``.
* :class:`RunRecord` — what one run did: stage, times, status (``ok``, ``failed`` or
  ``skipped``), error, outputs and counts.  Written atomically, also for failed and
  skipped runs.
* :class:`StateDB` — a SQLAlchemy database (the scheduler's job store database):
  a run-history table and the cross-process project lock.  The lock is a row per
  project inserted under a primary-key constraint, so two processes sharing the
  database (two scheduler daemons, a daemon and a ``labeltriage run``) never run the
  same project at once.  A holder refreshes its row; a row not refreshed for
  ``ttl`` seconds (a crashed process) is stale and may be taken over, and a row whose
  holder is a process of this host that no longer runs is taken over at once.

A run killed without a chance to record its end leaves its record ``running``;
:meth:`ReportStore.recover_records` marks such records ``failed`` (``interrupted``) once
their process is known to be gone.  Records and history rows never hold the password of
a ``scheme://user:password@`` URL (:func:`connectors.storage.redact_url`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, Field

from connectors import owner as owners
from connectors.runid import new_run_id as new_run_id  # one run id for every run
from connectors.storage import ProjectFS, redact_url

if TYPE_CHECKING:
    from autolabel.config import AppConfig

log = logging.getLogger(__name__)

RunStatus = Literal["running", "ok", "failed", "skipped"]
RECORD_NAME = "run.json"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class RunRecord(BaseModel):
    """One run of one project (JSON ``<project>/<run_id>/run.json`` in the report store)."""

    run_id: str
    project: str
    stage: str
    trigger: str = "manual"
    started: datetime
    finished: datetime | None = None
    status: RunStatus = "running"
    error: str | None = None
    outputs: dict[str, str] = Field(default_factory=dict)
    counts: dict[str, Any] = Field(default_factory=dict)
    steps: dict[str, float] = Field(default_factory=dict, description="seconds per step")
    owner: str | None = Field(None, description="the process running it (HOST:PID:START)")

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")


class ReportStore:
    """The report store: ``<url>/<project>/<run_id>/`` per run."""

    def __init__(
        self, url: str, storage_options: dict[str, Any] | None = None, *, create: bool = False
    ) -> None:
        """``create``: also create a missing bucket (object stores); a local folder is
        always created."""
        self.fs = ProjectFS(url, storage_options)
        if self.fs.is_local:
            os.makedirs(self.fs.root, exist_ok=True)
        elif create:
            self.fs.fs.makedirs(self.fs.root, exist_ok=True)
        self.url = url
        self.storage_options = dict(storage_options or {})

    def run_rel(self, project: str, run_id: str) -> str:
        return f"{project}/{run_id}"

    def run_dir(self, project: str, run_id: str) -> str:
        """Full location of a run folder (a local path for a local store, else a URL)."""
        return self.fs.url_of(self.run_rel(project, run_id))

    def make_run_dir(self, project: str, run_id: str) -> str:
        full = self.fs.resolve(self.run_rel(project, run_id))
        if self.fs.is_local:  # object stores have no folders (and s3fs would create a bucket)
            self.fs.fs.makedirs(full, exist_ok=True)
        return self.run_dir(project, run_id)

    def write_record(self, record: RunRecord) -> str:
        """Atomically write (or replace) the record of a run; returns its location."""
        rel = f"{self.run_rel(record.project, record.run_id)}/{RECORD_NAME}"
        self.fs.write_text(rel, redact_url(record.model_dump_json(indent=2)))
        return self.fs.url_of(rel)

    def recover_records(self, project: str, *, lock_held: bool) -> list[RunRecord]:
        """Mark ``failed`` the records left ``running`` by runs whose process is gone.

        With ``lock_held`` (the caller holds the project's lock, so no other run of it
        lives) every ``running`` record is such a leftover; without, only records whose
        owner is a process of this host that no longer runs.  Returns the records changed
        (their history rows are the caller's).
        """
        changed = []
        for record in self.records(project):
            if record.status != "running":
                continue
            holder = owners.Owner.parse(record.owner or "")
            if not lock_held and not (holder is not None and holder.is_dead()):
                continue
            record.status = "failed"
            record.finished = record.finished or utcnow()
            record.error = (
                f"interrupted: process {record.owner or 'unknown'} stopped without finishing "
                f"the run (recovered by {owners.current()})"
            )
            self.write_record(record)
            log.warning("run %s of project %s: %s", record.run_id, project, record.error)
            changed.append(record)
        return changed

    def read_record(self, project: str, run_id: str) -> RunRecord | None:
        rel = f"{self.run_rel(project, run_id)}/{RECORD_NAME}"
        if not self.fs.exists(rel):
            return None
        return RunRecord.model_validate_json(self.fs.read_bytes(rel))

    def run_ids(self, project: str) -> list[str]:
        """Run ids of a project, oldest first (run ids sort by start time)."""
        return [n for n in self.fs.listdir(project) if not n.startswith(".")]

    def records(self, project: str) -> list[RunRecord]:
        """Every readable run record of a project, oldest first."""
        out = []
        for run_id in self.run_ids(project):
            try:
                record = self.read_record(project, run_id)
            except ValueError as exc:
                log.warning(
                    "%s/%s/%s: unreadable run record: %s", project, run_id, RECORD_NAME, exc
                )
                continue
            if record is not None:
                out.append(record)
        return out

    def earlier_runs(self, project: str, before: str, *, status: str = "ok") -> list[RunRecord]:
        """Finished runs of ``project`` started before run ``before``, oldest first."""
        return [r for r in self.records(project) if r.run_id < before and r.status == status]

    def has_output(self, project: str, run_id: str, name: str) -> bool:
        return self.fs.exists(f"{self.run_rel(project, run_id)}/{name}")


# -- the state database: run history and project locks -----------------------------------

_metadata = sa.MetaData()

locks_table = sa.Table(
    "labeltriage_locks",
    _metadata,
    sa.Column("project", sa.String(200), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("acquired_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

history_table = sa.Table(
    "labeltriage_run_history",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), nullable=False, index=True),
    sa.Column("project", sa.String(200), nullable=False, index=True),
    sa.Column("trigger", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started", sa.String(40), nullable=False),
    sa.Column("finished", sa.String(40)),
    sa.Column("error", sa.Text),
    sa.Column("slot", sa.String(40), index=True),
)


def make_engine(url: str) -> sa.Engine:
    """A SQLAlchemy engine; SQLite gets a busy timeout and its folder created."""
    parsed = sa.engine.make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 30}
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    return sa.create_engine(url, **kwargs)


class StateDB:
    """Run history and project locks in a SQLAlchemy database (any URL)."""

    def __init__(self, url: str, *, engine: sa.Engine | None = None) -> None:
        self.url = url
        self.engine = engine or make_engine(url)
        self._create_tables()

    def _create_tables(self) -> None:
        # Two processes may create the tables at the same moment: the loser sees
        # "already exists", and the second (checkfirst) pass then has nothing to do.
        for attempt in range(3):
            try:
                _metadata.create_all(self.engine, checkfirst=True)
                return
            except (sa.exc.OperationalError, sa.exc.ProgrammingError):
                if attempt == 2:
                    raise
                time.sleep(0.1 * (attempt + 1))

    def dispose(self) -> None:
        self.engine.dispose()

    # -- history --------------------------------------------------------------------
    def add_history(self, record: RunRecord, *, slot: str | None = None) -> None:
        """One history row per run attempt; ``slot`` is the scheduled time it was for."""
        with self.engine.begin() as conn:
            conn.execute(
                history_table.insert().values(
                    slot=slot,
                    run_id=record.run_id,
                    project=record.project,
                    trigger=record.trigger,
                    status=record.status,
                    started=record.started.isoformat(),
                    finished=record.finished.isoformat() if record.finished else None,
                    error=redact_url(record.error) if record.error else None,
                )
            )

    def history(
        self, project: str | None = None, *, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """History rows, newest first."""
        query = sa.select(history_table).order_by(history_table.c.id.desc())
        if project is not None:
            query = query.where(history_table.c.project == project)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def slot_run(self, project: str, slot: str) -> str | None:
        """The run id that already ran (not skipped) for a scheduled ``slot``, if any."""
        table = history_table
        query = sa.select(table.c.run_id).where(
            table.c.project == project, table.c.slot == slot, table.c.status != "skipped"
        )
        with self.engine.connect() as conn:
            row = conn.execute(query.limit(1)).first()
        return None if row is None else str(row.run_id)

    def last_outcome(self, project: str) -> dict[str, Any] | None:
        rows = self.history(project, limit=1)
        return rows[0] if rows else None

    # -- locks ----------------------------------------------------------------------
    def lock(self, project: str, *, ttl: float = 900.0, owner: str | None = None) -> ProjectLock:
        return ProjectLock(self, project, ttl=ttl, owner=owner)

    def lock_holder(self, project: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(locks_table).where(locks_table.c.project == project)
            ).first()
        return dict(row._mapping) if row is not None and row.expires_at >= time.time() else None


class ProjectLock:
    """Exclusive right to run one project, shared by every process using the database.

    ``acquire()`` returns ``False`` at once when another live holder has it.  While held
    (``with lock.held():``) a thread refreshes the expiry every ``ttl / 3`` seconds.
    """

    def __init__(
        self, db: StateDB, project: str, *, ttl: float = 900.0, owner: str | None = None
    ) -> None:
        self.db = db
        self.project = project
        self.ttl = float(ttl)
        self.owner = owner or f"{owners.current()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> bool:
        now = time.time()
        table = locks_table
        with self.db.engine.begin() as conn:  # a crashed holder's row is stale after ttl
            conn.execute(
                table.delete().where(table.c.project == self.project, table.c.expires_at < now)
            )
            row = conn.execute(sa.select(table.c.owner).where(table.c.project == self.project))
            holder = row.scalar()
            if holder is not None and _holder_is_dead(str(holder)):
                log.warning(
                    "project %s: lock holder %s no longer runs; taking the lock over",
                    self.project,
                    holder,
                )
                conn.execute(
                    table.delete().where(table.c.project == self.project, table.c.owner == holder)
                )
        try:
            with self.db.engine.begin() as conn:
                conn.execute(
                    table.insert().values(
                        project=self.project,
                        owner=self.owner,
                        acquired_at=now,
                        expires_at=now + self.ttl,
                    )
                )
        except sa.exc.IntegrityError:
            return False
        return True

    def refresh(self) -> bool:
        """Extend the expiry; ``False`` if the lock is no longer ours."""
        table = locks_table
        with self.db.engine.begin() as conn:
            result = conn.execute(
                table.update()
                .where(table.c.project == self.project, table.c.owner == self.owner)
                .values(expires_at=time.time() + self.ttl)
            )
        return bool(result.rowcount)

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        table = locks_table
        with self.db.engine.begin() as conn:
            conn.execute(
                table.delete().where(table.c.project == self.project, table.c.owner == self.owner)
            )

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.refresh():
                    log.error("lock of project %s was taken over while running", self.project)
                    return
            except sa.exc.SQLAlchemyError as exc:
                log.warning("could not refresh the lock of project %s: %s", self.project, exc)

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """Try to acquire; yields whether it was acquired; releases on exit."""
        if not self.acquire():
            yield False
            return
        self._stop.clear()
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"lock-{self.project}", daemon=True
        )
        self._heartbeat.start()
        try:
            yield True
        finally:
            self.release()


def _holder_is_dead(owner: str) -> bool:
    """Whether a lock owner (``HOST:PID:START:TOKEN``) is a process of this host that is gone."""
    process, _, _ = owner.rpartition(":")
    holder = owners.Owner.parse(process)
    return holder is not None and holder.is_dead()


def record_json(record: RunRecord) -> str:
    """A record as one JSON line (for the command line)."""
    return redact_url(json.dumps(record.model_dump(mode="json"), sort_keys=True))


ROLLBACK_FILENAME = "rollback.json"
"""Left in a run's folder by ``labeltriage rollback``: ``serve`` never serves from that run."""


def mark_rolled_back(
    store: ReportStore, project: str, run_id: str, outcome: dict[str, Any]
) -> str | None:
    """Record in run ``run_id``'s folder that it was rolled back; ``None`` when there is no folder."""
    folder = store.run_rel(project, run_id)
    if not store.fs.isdir(folder):
        return None
    body = {"run_id": run_id, "rolled_back": utcnow().isoformat(), **outcome}
    return store.fs.write_text(
        f"{folder}/{ROLLBACK_FILENAME}", json.dumps(body, indent=1, sort_keys=True)
    )


def recover_run_records(cfg: AppConfig, name: str) -> list[RunRecord]:
    """Mark ``failed`` the records of ``name`` that dead runs left ``running`` (with history).

    Under the project's lock (when it is free) every ``running`` record is a leftover;
    while another run holds it, only those of provably dead processes of this host.
    """
    store = ReportStore(cfg.report_store, cfg.report_store_options)
    url = cfg.job_store_url()
    if url is None:
        return store.recover_records(name, lock_held=False)
    state = StateDB(url)
    try:
        with state.lock(name, ttl=cfg.scheduler.lock_ttl_seconds).held() as acquired:
            changed = store.recover_records(name, lock_held=acquired)
            for record in changed:
                state.add_history(record)
    finally:
        state.dispose()
    return changed

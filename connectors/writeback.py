"""Write-back bookkeeping for file-based projects: runs, journals, sidecars, rollback, recovery.

Everything lives in the project's own ``.labeltriage/`` folder::

    .labeltriage/runs/<run_id>.json      one RunManifest per auto-label run
    .labeltriage/runs/<run_id>.journal   the intent log of a run in flight (gone when it ends)
    .labeltriage/auto/<item_id>.json     one sidecar per auto-labeled item (file formats)

A run is a transaction (see :func:`write_run`), crash-consistent in this order:

1. **intent**: the journal is created (durably: synced file and folder on a local disk)
   and names the run's owner (host, pid); before each chunk of writes it gets a line
   with the chunk's item ids;
2. per item, the **sidecar** (the label's path and sha256) is written durably *before*
   the label file is created (:func:`write_auto_file`), so that at every instant a label
   file written by a run has its sidecar and reads as an auto-label; formats that keep
   labels inside one shared file (COCO, Label Studio) tag every written entry with its
   run id in the same atomic write;
3. the **commit mark**: the manifest is marked ``committed``, then the journal removed.

On an exception inside the run (``BaseException``: Ctrl-C and SIGTERM too) everything
the run wrote is removed again and the manifest ends ``rolled_back``.  A run cut short
with no chance to clean up (``kill -9``, a power cut) leaves its journal: the next time
the project is opened (:func:`connectors.project.open_project`, i.e. by any command) or by
``labeltriage recover``, :func:`recover` finds it, checks that its owner is gone (an
``flock`` on the journal on a local disk; elsewhere a dead pid on the same host or a
journal untouched for :data:`STALE_SECONDS`), and rolls the run back — or, if its
manifest was already ``committed``, completes it — and removes the temporaries of
interrupted writes.  The manifest then reads ``rolled_back`` with ``error``
``interrupted: …``.

:func:`rollback` undoes a committed run later, exactly: only that run's records, and
never a file a person has edited since (its sha256 changed).

Sidecars tell readers that a label file is an auto-label: a reader loads the index once
(:func:`read_auto_label_index`) and, for an item whose label file still has the sha256
recorded in its sidecar, reports ``status=auto_labeled``/``source=auto``; if the sha256
differs, a person edited the file and the item is a human label.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field, ValidationError

from connectors import owner as owners
from connectors.errors import InputError, UsageError
from connectors.runid import new_run_id as new_run_id  # one run id for every run
from connectors.sidecars import (
    WrittenRecord,
    read_auto_label_index,
    sidecar_path,
)
from connectors.storage import BOOKKEEPING_DIR, ProjectFS

if TYPE_CHECKING:
    from connectors.formats.base import LabelWrite, ProjectFormat

log = logging.getLogger(__name__)

RUNS_DIR = f"{BOOKKEEPING_DIR}/runs"
WRITE_CHUNK = 256
"""Items per ``write_labels`` call inside a run; the manifest is updated after each."""
JOURNAL_SUFFIX = ".journal"
STALE_SECONDS = 600.0
"""A journal of another host not touched for this long belongs to a run that died."""

RunStage = Literal["pending", "committed", "rolled_back"]


# -- hashing and run ids -------------------------------------------------------------------


def _check_run_id(run_id: str) -> str:
    if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
        raise UsageError(
            f"invalid run id {run_id!r}: use new_run_id() (letters, digits, '-', no '/')"
        )
    return run_id


# -- run manifests -------------------------------------------------------------------------


class RunManifest(BaseModel):
    """What one auto-label run wrote, precisely enough to undo it.

    ``stage`` is the transaction state: ``pending`` while writing, then ``committed``, or
    ``rolled_back`` (after a failure inside the run, or a later :func:`rollback`).
    ``refused`` maps item ids that were not written to why (a human label appeared, …).
    ``meta`` is free (rollout stage, model version, thresholds, …).
    """

    run_id: str
    created: datetime
    format: str
    stage: RunStage = "pending"
    dry_run: bool = False
    records: list[WrittenRecord] = Field(default_factory=list)
    refused: dict[str, str] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    updated: datetime | None = None

    @property
    def item_ids(self) -> list[str]:
        return sorted({r.item_id for r in self.records})


class RollbackResult(BaseModel):
    """Outcome of :func:`rollback`: item ids whose labels were removed, and those kept (why)."""

    run_id: str
    removed: list[str] = Field(default_factory=list)
    kept: dict[str, str] = Field(default_factory=dict)
    message: str = ""


def manifest_path(run_id: str) -> str:
    return f"{RUNS_DIR}/{_check_run_id(run_id)}.json"


def save_manifest(project: ProjectFS, manifest: RunManifest) -> None:
    """Atomically (re)write a run manifest."""
    manifest.updated = datetime.now(timezone.utc)
    project.write_text(manifest_path(manifest.run_id), manifest.model_dump_json(indent=1))


def load_manifest(project: ProjectFS, run_id: str) -> RunManifest:
    """The manifest of ``run_id``; :class:`UsageError` listing known runs when unknown."""
    path = manifest_path(run_id)
    if not project.exists(path):
        known = [r.removesuffix(".json") for r in project.listdir(RUNS_DIR) if r.endswith(".json")]
        listing = ", ".join(known[-20:]) if known else "none"
        raise UsageError(f"unknown run id {run_id!r} in {project.url}; known runs: {listing}")
    return _parse_manifest(project, path)


def _parse_manifest(project: ProjectFS, path: str) -> RunManifest:
    try:
        return RunManifest.model_validate_json(project.read_bytes(path))
    except ValidationError as exc:
        raise InputError(
            f"malformed run manifest: {exc.errors()[0]['msg']}", file=project.url_of(path)
        ) from exc


def list_runs(project: ProjectFS) -> list[RunManifest]:
    """Every run manifest of the project, oldest first (run ids sort by time).

    A manifest that cannot be parsed is logged and left out (``load_manifest`` on its run
    id raises the error).
    """
    runs = []
    for name in project.listdir(RUNS_DIR):
        if name.endswith(".json") and not name.startswith("."):
            try:
                runs.append(_parse_manifest(project, f"{RUNS_DIR}/{name}"))
            except InputError as exc:
                log.warning("%s", exc)
    return sorted(runs, key=lambda m: m.run_id)


# -- journals: the intent log of a run in flight -------------------------------------------


def journal_path(run_id: str) -> str:
    return f"{RUNS_DIR}/{_check_run_id(run_id)}{JOURNAL_SUFFIX}"


def runs_in_flight(project: ProjectFS) -> list[str]:
    """Run ids with a journal: runs writing now, or cut short and not yet recovered."""
    return [
        name.removesuffix(JOURNAL_SUFFIX)
        for name in project.listdir(RUNS_DIR)
        if name.endswith(JOURNAL_SUFFIX) and not name.startswith(".")
    ]


def _line(body: dict[str, Any]) -> bytes:
    return (json.dumps({**body, "at": time.time()}, sort_keys=True) + "\n").encode("utf-8")


class Journal:
    """The journal of one run (see the module docstring).

    On a local disk it is one file opened for appending, each line synced, and held
    under an exclusive ``flock`` for as long as the run lives: the kernel drops the lock
    when the process dies, however it dies, which is how recovery knows.  Elsewhere
    (object stores) the whole journal is rewritten at each line; its first line names
    the owner and every line carries the time it was written.
    """

    def __init__(self, project: ProjectFS, run_id: str, fd: int | None, lines: list[bytes]):
        self.project = project
        self.run_id = run_id
        self.rel = journal_path(run_id)
        self._fd = fd
        self._lines = lines

    @classmethod
    def start(cls, project: ProjectFS, run_id: str, fmt_name: str) -> Journal:
        """Create the journal of a new run; :class:`UsageError` if it exists already."""
        head = _line(
            {
                "run_id": run_id,
                "format": fmt_name,
                "owner": str(owners.current()),
                "started": datetime.now(timezone.utc).isoformat(),
            }
        )
        rel = journal_path(run_id)
        fd = None
        try:
            if project.is_local:
                import fcntl

                full = project.resolve(rel)
                os.makedirs(os.path.dirname(full), exist_ok=True)
                fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.write(fd, head)
                os.fsync(fd)
            else:
                project.write_bytes(rel, head, overwrite=False)
        except FileExistsError as exc:
            raise UsageError(
                f"run {run_id} already exists in {project.url}; every run needs a new run id"
            ) from exc
        project.sync(rel)
        return cls(project, run_id, fd, [head])

    def intend(self, item_ids: list[str]) -> None:
        """Record, durably, that the next writes are for ``item_ids``."""
        line = _line({"items": item_ids})
        if self._fd is not None:
            os.write(self._fd, line)
            os.fsync(self._fd)
        else:
            self._lines.append(line)
            self.project.write_bytes(self.rel, b"".join(self._lines))

    def abandon(self) -> None:
        """Leave the journal for recovery, marked so that no live owner is assumed."""
        with contextlib.suppress(Exception):
            self.intend([])
            line = _line({"abandoned": True})
            if self._fd is not None:
                os.write(self._fd, line)
            else:
                self._lines.append(line)
                self.project.write_bytes(self.rel, b"".join(self._lines))
        self._close()

    def finish(self) -> None:
        """The run is over (committed or rolled back): remove the journal."""
        with contextlib.suppress(FileNotFoundError):
            self.project.remove(self.rel)
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


class _JournalClaim:
    """A journal whose run is not alive, held (locally: flocked) while it is recovered."""

    def __init__(self, head: dict[str, Any], items: list[str], fd: int | None) -> None:
        self.head = head
        self.items = items
        self.fd = fd


def _parse_journal(data: bytes) -> tuple[dict[str, Any], list[str], bool, float]:
    """``(first line, item ids, abandoned, time of the last line)``; a torn last line is skipped."""
    head: dict[str, Any] = {}
    items: list[str] = []
    abandoned = False
    last = 0.0
    for raw in data.splitlines():
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(body, dict):
            continue
        if not head:
            head = body
        items.extend(str(i) for i in body.get("items") or [])
        abandoned = abandoned or bool(body.get("abandoned"))
        if isinstance(body.get("at"), int | float):
            last = max(last, float(body["at"]))
    return head, list(dict.fromkeys(items)), abandoned, last


@contextlib.contextmanager
def _claim(project: ProjectFS, run_id: str) -> Iterator[_JournalClaim | str]:
    """Claim the journal of ``run_id`` for recovery; yields why not when its run lives."""
    rel = journal_path(run_id)
    fd = None
    try:
        if project.is_local:
            import fcntl

            full = project.resolve(rel)
            try:
                fd = os.open(full, os.O_RDONLY)
            except FileNotFoundError:
                yield "its journal is gone (the run ended meanwhile)"
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                head, *_ = _parse_journal(os.pread(fd, 4096, 0))
                yield f"it is in progress (process {head.get('owner', 'unknown')})"
                return
            try:
                if os.stat(full).st_ino != os.fstat(fd).st_ino:
                    yield "its journal was replaced meanwhile"
                    return
            except FileNotFoundError:
                yield "its journal is gone (the run ended meanwhile)"
                return
            with os.fdopen(os.dup(fd), "rb") as f:
                head, items, _, _ = _parse_journal(f.read())
        else:
            try:
                data = project.read_bytes(rel)
            except FileNotFoundError:
                yield "its journal is gone (the run ended meanwhile)"
                return
            head, items, abandoned, last = _parse_journal(data)
            holder = owners.Owner.parse(str(head.get("owner", "")))
            age = time.time() - last
            if not abandoned and not (holder is not None and holder.is_dead()):
                if holder is not None and holder.host == owners.current().host:
                    yield f"it is in progress (process {holder})"
                    return
                if age < STALE_SECONDS:
                    yield (
                        f"it may be in progress on {holder.host if holder else 'another host'} "
                        f"(journal updated {age:.0f} s ago; it counts as stale after {STALE_SECONDS:.0f} s)"
                    )
                    return
        yield _JournalClaim(head, items, fd)
    finally:
        if fd is not None:
            os.close(fd)


# -- removal with a per-record outcome -------------------------------------------------------


@runtime_checkable
class RemovesEach(Protocol):
    """Formats that can undo many records in one pass and say what happened to each."""

    def remove_written_each(self, records: list[WrittenRecord]) -> list[str | None]:
        """For each record, ``None`` when removed, else why it was kept."""
        ...


@runtime_checkable
class FindsRunRecords(Protocol):
    """Formats whose entries carry their run id inline (COCO, Label Studio, manifest)."""

    def records_of_run(self, run_id: str) -> list[WrittenRecord]:
        """Records of everything in the project that ``run_id`` wrote."""
        ...


def _remove_each(fmt: ProjectFormat, records: list[WrittenRecord]) -> list[str | None]:
    if not records:
        return []
    if isinstance(fmt, RemovesEach):
        return fmt.remove_written_each(records)
    outcome: list[str | None] = []
    for record in records:
        kept = fmt.remove_written([record])
        outcome.append("; ".join(kept) if kept else None)
    return outcome


def _remove_sidecars(project: ProjectFS, run_id: str, item_ids: Iterable[str]) -> None:
    for item_id in item_ids:
        rel = sidecar_path(item_id)
        if not project.exists(rel):
            continue
        try:
            body = json.loads(project.read_bytes(rel))
        except json.JSONDecodeError:
            continue
        if body.get("run_id") == run_id:
            project.remove(rel)


def _sidecar_records_of_run(project: ProjectFS, run_id: str) -> list[WrittenRecord]:
    records = []
    for body in read_auto_label_index(project).values():
        if body.get("run_id") == run_id and isinstance(body.get("record"), dict):
            try:
                records.append(WrittenRecord.model_validate(body["record"]))
            except ValidationError:
                continue
    return records


def _record_key(record: WrittenRecord) -> tuple[str, str, str, tuple[str, ...]]:
    return (record.kind, record.path, record.item_id, tuple(record.entry_ids))


# -- the transaction -----------------------------------------------------------------------


def write_run(
    fmt: ProjectFormat,
    writes: list[LabelWrite],
    run_id: str,
    *,
    meta: dict[str, Any] | None = None,
    dry_run: bool = False,
    chunk_size: int = WRITE_CHUNK,
) -> RunManifest:
    """Write ``writes`` as one run: all of it, or (on an exception) none of it.

    1. the run's journal is created (durable intent, owner named) and the manifest is
       written as ``pending`` before any label;
    2. chunk by chunk, the chunk's item ids go to the journal, then ``fmt.write_labels``
       writes them (file formats: each sidecar before its label); its records and
       refusals are added to the manifest (rewritten atomically);
    3. the manifest is marked ``committed`` (the commit mark), then the journal removed.

    If anything raises — ``KeyboardInterrupt`` and ``SystemExit`` (SIGTERM) included —
    what this run wrote is removed, the manifest is marked ``rolled_back`` with the
    error, and the exception propagates.  If even that fails, the journal stays for
    :func:`recover`.

    ``dry_run`` writes nothing, not even the manifest: the returned manifest lists as
    refused the items that already have a human label as read.
    """
    _check_run_id(run_id)
    project = fmt.project
    manifest = RunManifest(
        run_id=run_id,
        created=datetime.now(timezone.utc),
        format=getattr(fmt, "name", type(fmt).__name__),
        dry_run=dry_run,
        meta=dict(meta or {}),
    )
    mismatched = sorted({w.item.item_id for w in writes if w.provenance.run_id != run_id})
    if mismatched:
        raise UsageError(
            f"run {run_id}: writes for {mismatched[:5]} carry another run id in their provenance"
        )
    if dry_run:
        manifest.refused = {
            w.item.item_id: "has a human label" for w in writes if w.item.has_human_label
        }
        manifest.stage = "committed"
        log.info(
            "run %s (dry run): %d writes, %d refused, nothing written",
            run_id,
            len(writes),
            len(manifest.refused),
        )
        return manifest
    if project.exists(manifest_path(run_id)):
        raise UsageError(
            f"run {run_id} already exists in {project.url}; every run needs a new run id"
        )
    journal = Journal.start(project, run_id, manifest.format)
    try:
        save_manifest(project, manifest)
        for start in range(0, len(writes), max(1, chunk_size)):
            chunk = writes[start : start + chunk_size]
            journal.intend([w.item.item_id for w in chunk])
            outcome = fmt.write_labels(chunk)
            manifest.records.extend(outcome.records)
            manifest.refused.update(outcome.refused)
            save_manifest(project, manifest)
        manifest.stage = "committed"
        save_manifest(project, manifest)
        project.sync(manifest_path(run_id))
    except BaseException as exc:
        log.error(
            "run %s failed after %d records; removing what it wrote: %s",
            run_id,
            len(manifest.records),
            exc,
        )
        manifest.error = f"{type(exc).__name__}: {exc}"
        _roll_back(fmt, manifest, writes, journal, exc)
        raise
    journal.finish()
    log.info(
        "run %s committed: %d records, %d refused",
        run_id,
        len(manifest.records),
        len(manifest.refused),
    )
    return manifest


def _roll_back(
    fmt: ProjectFormat,
    manifest: RunManifest,
    writes: list[LabelWrite],
    journal: Journal,
    exc: BaseException,
) -> None:
    """After ``exc``: remove what the run wrote and mark it ``rolled_back``.  If even that
    fails, the journal stays for :func:`recover` and ``exc`` is raised from the failure."""
    project = fmt.project
    try:
        records = _records_to_undo(fmt, manifest)
        undone = _undo(fmt, manifest, records)
        _remove_temporaries(fmt, manifest, records, [w.item.item_id for w in writes])
        manifest.stage = "rolled_back"
        manifest.meta = {
            **manifest.meta,
            "rollback": {"removed": len(undone.removed), "kept": undone.kept},
        }
        save_manifest(project, manifest)
    except BaseException as undo_exc:
        # Leave the journal: `recover` (or the next open of the project) finishes the job.
        log.error(
            "run %s: could not remove what it wrote (%s); `labeltriage recover` will",
            manifest.run_id,
            undo_exc,
        )
        manifest.error = f"{manifest.error}; undo failed: {type(undo_exc).__name__}: {undo_exc}"
        with contextlib.suppress(Exception):
            save_manifest(project, manifest)
        journal.abandon()
        raise exc from undo_exc
    journal.finish()


def _undo(
    fmt: ProjectFormat, manifest: RunManifest, records: list[WrittenRecord] | None = None
) -> RollbackResult:
    """Remove the manifest's records plus anything else tagged with its run id
    (``records``: those, found by :func:`_records_to_undo`)."""
    if records is None:
        records = _records_to_undo(fmt, manifest)
    outcomes = _remove_each(fmt, records)
    result = RollbackResult(run_id=manifest.run_id)
    for record, kept in zip(records, outcomes, strict=True):
        if kept is None:
            result.removed.append(record.item_id)
        else:
            result.kept[record.item_id] = kept
    _remove_sidecars(fmt.project, manifest.run_id, {r.item_id for r in records})
    result.removed = sorted(set(result.removed) - set(result.kept))
    return result


def _records_to_undo(fmt: ProjectFormat, manifest: RunManifest) -> list[WrittenRecord]:
    """The manifest's records, the run's sidecars and entries tagged with its run id."""
    records = list(manifest.records)
    seen = {_record_key(r) for r in records}
    extra: list[WrittenRecord] = _sidecar_records_of_run(fmt.project, manifest.run_id)
    if isinstance(fmt, FindsRunRecords):
        extra.extend(fmt.records_of_run(manifest.run_id))
    for record in extra:
        if _record_key(record) not in seen:
            seen.add(_record_key(record))
            records.append(record)
    return records


def rollback(fmt: ProjectFormat, run_id: str) -> RollbackResult:
    """Remove exactly what run ``run_id`` wrote; keep anything a person edited since.

    Raises :class:`UsageError` (listing the known runs) for an unknown run id, and for a
    run that is still writing.  A run that was cut short is recovered (rolled back, or
    completed if it had committed) first.  Rolling back a run twice is a no-op whose
    ``message`` says so.
    """
    project = fmt.project
    if project.exists(journal_path(run_id)):
        for recovered in recover(fmt, run_ids=[run_id]):
            if recovered.outcome == "in_progress":
                raise UsageError(f"run {run_id} cannot be rolled back now: {recovered.message}")
            if recovered.outcome == "rolled_back":
                return RollbackResult(
                    run_id=run_id,
                    removed=recovered.removed,
                    kept=recovered.kept,
                    message=recovered.message,
                )
    manifest = load_manifest(project, run_id)
    if manifest.stage == "rolled_back":
        when = manifest.updated.isoformat() if manifest.updated else "earlier"
        message = f"run {run_id} was already rolled back ({when}); nothing to do"
        log.info(message)
        return RollbackResult(run_id=run_id, message=message)
    if manifest.dry_run:
        return RollbackResult(
            run_id=run_id, message=f"run {run_id} was a dry run; it wrote nothing"
        )
    result = _undo(fmt, manifest)
    manifest.stage = "rolled_back"
    manifest.meta = {
        **manifest.meta,
        "rollback": {"removed": len(result.removed), "kept": result.kept},
    }
    save_manifest(project, manifest)
    result.message = f"run {run_id} rolled back: {len(result.removed)} item labels removed, {len(result.kept)} kept"
    if result.kept:
        result.message += (
            " (" + "; ".join(f"{k}: {v}" for k, v in sorted(result.kept.items())[:5]) + ")"
        )
    log.info(result.message)
    return result


# -- recovery of runs cut short ----------------------------------------------------------


class RecoveryResult(BaseModel):
    """What :func:`recover` did with one run that has a journal.

    ``outcome``: ``rolled_back`` (its writes were undone), ``completed`` (it had
    committed; only its journal and temporaries were left) or ``in_progress`` (its
    owner lives; nothing was touched).
    """

    run_id: str
    outcome: Literal["rolled_back", "completed", "in_progress"]
    removed: list[str] = Field(default_factory=list)
    kept: dict[str, str] = Field(default_factory=dict)
    temporaries: list[str] = Field(default_factory=list)
    message: str = ""


def recover(fmt: ProjectFormat, *, run_ids: list[str] | None = None) -> list[RecoveryResult]:
    """Roll back or complete every run of the project that was cut short.

    A run is cut short when its journal is still there and its owner is gone (see the
    module docstring).  A ``pending`` run is rolled back (what it wrote removed, edits
    by people kept) and its manifest marked ``rolled_back`` with ``error``
    ``interrupted: …``; a run whose manifest says ``committed`` keeps its labels.  Either
    way the temporaries of interrupted writes are removed and the journal last of all.
    ``run_ids`` limits recovery to those runs.  Runs still alive are reported
    ``in_progress`` and left alone.
    """
    project = fmt.project
    results = []
    for run_id in runs_in_flight(project):
        if run_ids is not None and run_id not in run_ids:
            continue
        with _claim(project, run_id) as claim:
            if isinstance(claim, str):
                message = f"run {run_id} left alone: {claim}"
                log.info("%s", message)
                results.append(
                    RecoveryResult(run_id=run_id, outcome="in_progress", message=message)
                )
                continue
            results.append(_recover_run(fmt, run_id, claim))
    return results


def _recover_run(fmt: ProjectFormat, run_id: str, claim: _JournalClaim) -> RecoveryResult:
    project = fmt.project
    by = str(owners.current())
    try:
        manifest = load_manifest(project, run_id)
    except UsageError:  # cut before its manifest was written
        manifest = RunManifest(
            run_id=run_id,
            created=claim.head.get("started") or datetime.now(timezone.utc),
            format=str(claim.head.get("format") or getattr(fmt, "name", "")),
        )
    records = _records_to_undo(fmt, manifest)
    if manifest.stage == "pending":
        undone = _undo(fmt, manifest, records)
        manifest.stage = "rolled_back"
        cause = f"process {claim.head.get('owner', 'unknown')} stopped during write-back"
        manifest.error = f"interrupted: {cause}" + (
            f" (then: {manifest.error})" if manifest.error else ""
        )
        manifest.meta = {
            **manifest.meta,
            "rollback": {"removed": len(undone.removed), "kept": undone.kept},
            "recovered": {"at": datetime.now(timezone.utc).isoformat(), "by": by},
        }
        save_manifest(project, manifest)
        project.sync(manifest_path(run_id))
        result = RecoveryResult(
            run_id=run_id,
            outcome="rolled_back",
            removed=undone.removed,
            kept=undone.kept,
            message=(
                f"run {run_id} was interrupted: rolled back, {len(undone.removed)} item "
                f"labels removed, {len(undone.kept)} kept"
            ),
        )
    else:
        result = RecoveryResult(
            run_id=run_id,
            outcome="completed",
            message=f"run {run_id} had finished ({manifest.stage}); its leftovers were removed",
        )
    result.temporaries = _remove_temporaries(fmt, manifest, records, claim.items)
    with contextlib.suppress(FileNotFoundError):
        project.remove(journal_path(run_id))
    log.warning("%s", result.message)
    return result


def _remove_temporaries(
    fmt: ProjectFormat, manifest: RunManifest, records: list[WrittenRecord], items: list[str]
) -> list[str]:
    """Delete the temporaries the run's interrupted writes left; their relative paths."""
    removed = []
    for folder in sorted(_write_folders(fmt, manifest, records, items)):
        if fmt.project.isdir(folder):
            removed.extend(fmt.project.remove_temporaries(folder))
    return removed


def _write_folders(
    fmt: ProjectFormat, manifest: RunManifest, records: list[WrittenRecord], items: list[str]
) -> set[str]:
    """Folders where the run's interrupted writes may have left temporaries."""
    paths = [manifest_path(manifest.run_id)]
    paths += [r.path for r in records]
    paths += [sidecar_path(i) for i in items]
    targets = getattr(fmt, "write_targets", None)
    if callable(targets):
        paths += list(targets(items))
    folders = {posixpath.dirname(p) or "." for p in paths}
    if fmt.project.is_local and fmt.project.isdir(BOOKKEEPING_DIR):
        full = fmt.project.resolve(BOOKKEEPING_DIR)
        for dirpath, _, _ in os.walk(full):
            folders.add(fmt.project.relative(dirpath))
    return folders

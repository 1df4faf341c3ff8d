"""Write-back bookkeeping for file-based projects: runs, manifests, sidecars, rollback.

Everything lives in the project's own ``.labeltriage/`` folder::

    .labeltriage/runs/<run_id>.json      one RunManifest per auto-label run
    .labeltriage/auto/<item_id>.json     one sidecar per auto-labeled item (file formats)

A run is a transaction (see :func:`write_run`): its manifest is written as ``pending``
before anything else, grows by the records of each chunk that the format wrote, and ends
``committed``; on an exception everything the run wrote is removed again and the manifest
ends ``rolled_back``.  :func:`rollback` undoes a committed run later, exactly: only that
run's records, and never a file a person has edited since (its sha256 changed).

Sidecars tell readers that a label file is an auto-label: a reader loads the index once
(:func:`read_auto_label_index`) and, for an item whose label file still has the sha256
recorded in its sidecar, reports ``status=auto_labeled``/``source=auto``; if the sha256
differs, a person edited the file and the item is a human label.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import posixpath
import secrets
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field, ValidationError

from connectors.errors import InputError, UsageError
from connectors.storage import BOOKKEEPING_DIR, ProjectFS

if TYPE_CHECKING:
    from connectors.formats.base import LabelWrite, ProjectFormat, Provenance

log = logging.getLogger(__name__)

RUNS_DIR = f"{BOOKKEEPING_DIR}/runs"
WRITE_CHUNK = 256
"""Items per ``write_labels`` call inside a run; the manifest is updated after each."""

RunStage = Literal["pending", "committed", "rolled_back"]


# -- hashing and run ids -------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data`` (the checksum stored in records and sidecars)."""
    return hashlib.sha256(data).hexdigest()


def new_run_id() -> str:
    """A new run id that sorts by creation time: ``YYYYmmddTHHMMSSffffffZ-<6 hex>``."""
    now = datetime.now(timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%S%f')}Z-{secrets.token_hex(3)}"


def _check_run_id(run_id: str) -> str:
    if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
        raise UsageError(
            f"invalid run id {run_id!r}: use new_run_id() (letters, digits, '-', no '/')"
        )
    return run_id


# -- sidecars ------------------------------------------------------------------------------


def write_sidecar(
    project: ProjectFS, item_id: str, record: WrittenRecord, provenance: Provenance
) -> str:
    """Write the sidecar of one auto-labeled item; returns its relative path.

    Content (JSON): ``item_id``, ``run_id``, ``path`` (the label file, relative to the
    root), ``sha256`` (of the label file as written), ``provenance`` and the ``record``.
    """
    from connectors.formats.base import sidecar_path

    rel = sidecar_path(item_id)
    body = {
        "item_id": item_id,
        "run_id": provenance.run_id,
        "path": record.path,
        "sha256": record.sha256,
        "provenance": provenance.model_dump(mode="json"),
        "record": record.model_dump(mode="json"),
    }
    project.write_text(rel, json.dumps(body, sort_keys=True, indent=1))
    return rel


def read_auto_label_index(project: ProjectFS) -> dict[str, dict[str, Any]]:
    """All sidecars, ``item_id -> sidecar dict``: one recursive listing, then one batch read.

    A reader marks an item ``auto_labeled`` when its label file's sha256 equals
    ``index[item_id]["sha256"]``; otherwise a person edited it and it is a human label.
    Unreadable sidecars are logged and skipped (the item then reads as a human label,
    the safe side: it will never be overwritten).
    """
    from connectors.formats.base import AUTO_SIDECAR_DIR

    root = project.resolve(AUTO_SIDECAR_DIR)
    if not project.fs.isdir(root):
        return {}
    files = sorted(str(p) for p in project.fs.find(root) if str(p).endswith(".json"))
    files = [f for f in files if not posixpath.basename(f).startswith(".")]  # in-flight temporaries
    if not files:
        return {}
    contents = project.fs.cat(files, on_error="return")
    index: dict[str, dict[str, Any]] = {}
    prefix = root.rstrip("/") + "/"
    for full in files:
        data = contents.get(full) if isinstance(contents, dict) else None
        if data is None:  # some filesystems key cat() results by their own path form
            data = (
                contents.get(project.fs._strip_protocol(full))
                if isinstance(contents, dict)
                else None
            )
        stripped = project.fs._strip_protocol(full)
        item_id = (
            stripped[len(prefix) :] if stripped.startswith(prefix) else posixpath.basename(stripped)
        )
        item_id = item_id.removesuffix(".json")
        if not isinstance(data, bytes):
            log.warning("%s: could not read auto-label sidecar: %s", full, data)
            continue
        try:
            body = json.loads(data)
        except json.JSONDecodeError as exc:
            log.warning("%s:%d: malformed auto-label sidecar: %s", full, exc.lineno, exc.msg)
            continue
        if isinstance(body, dict):
            index[str(body.get("item_id", item_id))] = body
    return index


def is_auto_label(index: dict[str, dict[str, Any]], item_id: str, label_sha256: str) -> bool:
    """True when ``item_id`` has a sidecar and its label file is unchanged since the write."""
    entry = index.get(item_id)
    return entry is not None and entry.get("sha256") == label_sha256


# -- run manifests -------------------------------------------------------------------------
#
# Imported here, after the sidecar helpers: ``connectors.formats`` imports every format
# module, and file formats import the helpers above from this module.  Importing this
# module first therefore reaches them while it is still initialising.

from connectors.formats.base import WrittenRecord  # noqa: E402


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
    from connectors.formats.base import sidecar_path

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

    1. the manifest is written as ``pending`` (atomically) before any label;
    2. ``fmt.write_labels`` runs chunk by chunk; after each chunk its records and refusals
       are added to the manifest (rewritten atomically);
    3. the manifest is marked ``committed``.

    If anything raises, what this run wrote is removed (``remove_written``), the manifest
    is marked ``rolled_back`` with the error, and the exception propagates.

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
    save_manifest(project, manifest)
    try:
        for start in range(0, len(writes), max(1, chunk_size)):
            chunk = writes[start : start + chunk_size]
            outcome = fmt.write_labels(chunk)
            manifest.records.extend(outcome.records)
            manifest.refused.update(outcome.refused)
            save_manifest(project, manifest)
        manifest.stage = "committed"
        save_manifest(project, manifest)
    except BaseException as exc:
        log.error(
            "run %s failed after %d records; removing what it wrote: %s",
            run_id,
            len(manifest.records),
            exc,
        )
        manifest.error = f"{type(exc).__name__}: {exc}"
        try:
            undone = _undo(fmt, manifest)
        except Exception as undo_exc:
            # Leave the manifest pending: `rollback RUN_ID` can finish the job later.
            log.error(
                "run %s: could not remove what it wrote (%s); run `rollback %s`",
                run_id,
                undo_exc,
                run_id,
            )
            manifest.error += f"; undo failed: {type(undo_exc).__name__}: {undo_exc}"
            with contextlib.suppress(Exception):
                save_manifest(project, manifest)
            raise exc from undo_exc
        manifest.stage = "rolled_back"
        manifest.meta = {
            **manifest.meta,
            "rollback": {"removed": len(undone.removed), "kept": undone.kept},
        }
        save_manifest(project, manifest)
        raise
    log.info(
        "run %s committed: %d records, %d refused",
        run_id,
        len(manifest.records),
        len(manifest.refused),
    )
    return manifest


def _undo(fmt: ProjectFormat, manifest: RunManifest) -> RollbackResult:
    """Remove the manifest's records plus anything else tagged with its run id."""
    records = list(manifest.records)
    seen = {_record_key(r) for r in records}
    extra: list[WrittenRecord] = _sidecar_records_of_run(fmt.project, manifest.run_id)
    if isinstance(fmt, FindsRunRecords):
        extra.extend(fmt.records_of_run(manifest.run_id))
    for record in extra:
        if _record_key(record) not in seen:
            seen.add(_record_key(record))
            records.append(record)
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


def rollback(fmt: ProjectFormat, run_id: str) -> RollbackResult:
    """Remove exactly what run ``run_id`` wrote; keep anything a person edited since.

    Raises :class:`UsageError` (listing the known runs) for an unknown run id.  Rolling
    back a run twice is a no-op whose ``message`` says so.
    """
    project = fmt.project
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

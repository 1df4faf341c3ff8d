"""Sidecars: the record kept next to every auto-label a file format writes.

A sidecar (``.labeltriage/auto/<item_id>.json``) names the label file written for an item,
the sha256 of its content and the label's :class:`Provenance`.  A reader marks an item
``auto_labeled`` only while its label file still has that sha256; once a person edits the
file it reads as a human label and is never overwritten.  Also here: the record of one
write (:class:`WrittenRecord`), which a run manifest keeps to undo it.

This module is below both the formats and :mod:`connectors.writeback`: both import it,
it imports neither.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import posixpath
from typing import Any

from pydantic import BaseModel, Field

from connectors.storage import ProjectFS

log = logging.getLogger(__name__)


class Provenance(BaseModel):
    """Where an auto-label came from; stored with every write."""

    run_id: str
    model_version: str
    score: float | None = None
    tier: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class WrittenRecord(BaseModel):
    """One thing a write created, precisely enough to remove it and nothing else.

    ``kind="file"``: ``path`` (relative to the root) was created, with ``sha256`` of its
    content.  ``kind="entry"``: entries with ``entry_ids`` were added inside the shared
    file ``path`` (COCO JSON, Label Studio export).
    """

    kind: str
    path: str
    item_id: str
    sha256: str | None = None
    entry_ids: list[str] = Field(default_factory=list)


AUTO_SIDECAR_DIR = ".labeltriage/auto"


def sidecar_path(item_id: str) -> str:
    """Relative path of the sidecar record of an auto-labeled item (provenance + sha256)."""
    return f"{AUTO_SIDECAR_DIR}/{item_id}.json"


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data`` (the checksum stored in records and sidecars)."""
    return hashlib.sha256(data).hexdigest()


def write_sidecar(
    project: ProjectFS, item_id: str, record: WrittenRecord, provenance: Provenance
) -> str:
    """Write the sidecar of one auto-labeled item; returns its relative path.

    Content (JSON): ``item_id``, ``run_id``, ``path`` (the label file, relative to the
    root), ``sha256`` (of the label file as written), ``provenance`` and the ``record``.
    """
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
    project.sync(rel)
    return rel


def read_sidecar(project: ProjectFS, item_id: str) -> dict[str, Any] | None:
    """The sidecar of ``item_id`` as a dict; ``None`` when there is none or it is unreadable."""
    try:
        body = json.loads(project.read_bytes(sidecar_path(item_id)))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def write_auto_file(
    project: ProjectFS, item_id: str, rel: str, content: bytes, provenance: Provenance
) -> WrittenRecord | str:
    """Create the auto-label file ``rel`` of ``item_id``, its sidecar first.

    Returns the record of the write, or why nothing was written (a file is at ``rel``,
    or the item's earlier auto-label is still in place).  Order: the sidecar (naming
    ``rel`` and the sha256 of ``content``) is written and synced, then ``rel`` is
    created, never replacing anything (:meth:`ProjectFS.write_bytes` with
    ``overwrite=False``).  If the create fails, the sidecar is taken back.  Whatever
    instant the process dies at, a file at ``rel`` with ``content`` has its sidecar;
    a sidecar without its file (an intent) reads as nothing and recovery removes it.
    """
    record = WrittenRecord(kind="file", path=rel, item_id=item_id, sha256=sha256_hex(content))
    if project.exists(rel):
        return f"{rel}: a file exists already; not overwritten"
    previous = read_sidecar(project, item_id) or {}
    previous_path = previous.get("path")
    if isinstance(previous_path, str) and project.exists(previous_path):
        # its label is in place: replacing the sidecar would make that label read as human
        return f"{previous_path}: auto-labeled by run {previous.get('run_id')} already"
    write_sidecar(project, item_id, record, provenance)
    try:
        project.write_bytes(rel, content, overwrite=False)
    except FileExistsError:
        _take_back_sidecar(project, item_id, record)
        return f"{rel}: a file was created meanwhile (a human label); not overwritten"
    except BaseException:
        # cut while creating the file: an intent without its file is taken back; a file
        # that made it keeps its sidecar (the run's undo or recovery removes both)
        with contextlib.suppress(Exception):
            if not project.exists(rel):
                _take_back_sidecar(project, item_id, record)
        raise
    log.debug("%s: wrote auto-label %s (sidecar %s)", item_id, rel, sidecar_path(item_id))
    return record


def _take_back_sidecar(project: ProjectFS, item_id: str, record: WrittenRecord) -> None:
    """Remove ``item_id``'s sidecar if it is the one written for ``record``."""
    body = read_sidecar(project, item_id)
    if body is not None and body.get("path") == record.path and body.get("sha256") == record.sha256:
        with contextlib.suppress(FileNotFoundError):
            project.remove(sidecar_path(item_id))


def read_auto_label_index(project: ProjectFS) -> dict[str, dict[str, Any]]:
    """All sidecars, ``item_id -> sidecar dict``: one recursive listing, then one batch read.

    A reader marks an item ``auto_labeled`` when its label file's sha256 equals
    ``index[item_id]["sha256"]``; otherwise a person edited it and it is a human label.
    Unreadable sidecars are logged and skipped (the item then reads as a human label,
    the safe side: it will never be overwritten).
    """
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

"""A Label Studio ML backend that pre-annotates only the calibrated easy tier.

What is served is decided here; :mod:`autolabel.mlserver` serves it over HTTP (FastAPI on
uvicorn).

Label Studio talks to an ML backend over four JSON endpoints (its ``ml/api_connector.py``):

=================  ==============================================================
endpoint           what it does here
=================  ==============================================================
``GET /health``    ``{"status": "UP", "model_class", "model_version", "stage", "serving",
                   "reason", "easy_items"}``
``POST /setup``    ``{"model_version", "stage", "serving", "reason"}`` (Label Studio sends
                   the project's label config, kept for ``/predict``)
``POST /predict``  ``{"tasks": [...]}`` → ``{"results": [...]}``, one entry per task in
                   order: for an unlabeled task of the calibrated easy tier a list with one
                   prediction — the label of its prediction (label-mapped, boxes at the
                   calibrated box confidence) as ``rectanglelabels``/``choices`` regions with
                   ``score``; for every other task an empty list, which Label Studio stores
                   as *no* prediction (an empty result would be stored, read later as the
                   platform's "nothing here", and keep Label Studio from asking again)
``POST /webhook``  Label Studio's webhook events with an annotation are appended as one
                   JSON line to ``events_url`` (in the report store) for the next run
=================  ==============================================================

Also ``GET /versions`` and ``GET /openapi.json`` (the schema; no docs page).

**What is served.**  The easy tier is read from a scored and calibrated run folder:
``difficulty.parquet`` and ``autolabel.json``; a task is easy when its row has no error,
its status is ``unlabeled`` and its combined ``score`` is at or below the calibrated
``threshold``.  Predictions are served only when that run was made at stage
``autolabel`` and was not rolled back (``labeltriage rollback`` leaves ``rollback.json`` in
the run folder); otherwise ``/health`` and ``/setup`` say why (``serving: false``,
``reason``) and ``/predict`` answers no task.  Given a report-store project folder, the
newest calibrated run that was not rolled back is used, re-read when it changes (checked
every ``refresh_s`` seconds).  A task that has a human annotation or already holds a
labeltriage prediction gets nothing.  Every served prediction carries labeltriage's
provenance (:mod:`connectors.labelstudio.provenance`): ``model_version``
``labeltriage-<version>/<run_id>`` — the same string ``/setup`` reports and the run's
write-back used, so Label Studio does not ask again about tasks the run already labeled
— and region ``meta`` with ``via: "serve"``.

**Image sizes.**  Percent boxes need the task's image size, and YOLO predictions need it
to be read at all: it comes from the task's regions, else from the image header read
from Label Studio under the image-source policy (``size_of``).  A task whose size cannot be
found is logged as a warning and gets nothing.

**Safety and operation.**  Binds ``127.0.0.1`` unless told otherwise (another address needs
basic auth or a token); with ``basic_auth`` and/or ``token`` set, every request must carry
one of them (``Authorization: Basic …`` as Label Studio sends it, or ``Bearer``/``Token``);
the answer to anything else is 401 without reading the body.  Bodies over
``max_body_bytes`` are 413, JSON nested deeper than ``max_json_depth`` or not a JSON object
400, unknown paths 404, wrong methods 405, a missing calibration 503, a failure inside a
handler 500 (logged); the server never exits because of a request.  Connections that do
not deliver a complete request within ``read_timeout_s`` are closed, idle keep-alive
connections after ``keepalive_s``; at most ``limit_concurrency`` connections are served
(503 beyond), the work of requests runs on at most ``workers`` threads.  Each request is
logged as one JSON line on the logger ``labeltriage.access``.  SIGTERM or Ctrl-C stop
accepting, let requests in flight finish (at most ``shutdown_timeout_s``), then exit.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any

from autolabel.gate import REPORT_FILENAME, auto_label
from autolabel.store import ROLLBACK_FILENAME
from connectors.errors import InputError, LabelTriageError, UsageError
from connectors.formats.base import PredictionSource, Provenance
from connectors.labelmap import LabelMap
from connectors.labelstudio.provenance import (
    content_sha256,
    model_version_for,
    provenance_meta,
)
from connectors.labelstudio.regions import (
    annotation_to_region,
    human_annotations,
    image_size_of,
    labeltriage_predictions,
)
from connectors.model import Annotation, Item
from connectors.storage import ProjectFS
from difficulty.items import usable_scores
from difficulty.table import FILENAME as DIFFICULTY_FILENAME
from difficulty.table import read_difficulty

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9090
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_JSON_DEPTH = 64
EVENTS_FILENAME = "labelstudio_events.jsonl"
MODEL_CLASS = "labeltriage-easy-tier"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

SizeLookup = Callable[[dict[str, Any]], "tuple[int, int] | None"]
"""``task → (width, height)`` of its image, or ``None`` when unknown."""


class RequestError(Exception):
    """A request the backend refuses, with the HTTP status to answer."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- the easy tier --------------------------------------------------------------------------


@dataclass(frozen=True)
class EasyTier:
    """The calibrated easy tier of one run: which items, at what box confidence, served or not."""

    run_dir: str
    run_id: str | None
    task: str
    threshold: float | None
    box_confidence: float | None
    model_version: str
    """The model the labels come from (the predictions' version)."""
    stage: str | None = None
    rolled_back: bool = False
    scores: dict[str, float] = field(default_factory=dict)
    """``item_id → combined difficulty score`` of the unlabeled items in the easy tier."""

    def is_easy(self, item_id: str) -> bool:
        return item_id in self.scores

    @property
    def version(self) -> str:
        """The ``model_version`` the backend reports and stamps on what it serves."""
        return model_version_for(self.run_id)

    @property
    def reason(self) -> str | None:
        """Why nothing is served, or ``None`` when the tier is served."""
        if self.rolled_back:
            return f"run {self.run_id} was rolled back"
        if self.stage != "autolabel":
            return (
                f"run {self.run_id} is at stage {self.stage or 'unknown'}; "
                "predictions are served only at stage autolabel"
            )
        if self.threshold is None or self.box_confidence is None:
            return f"run {self.run_id} found no calibrated easy tier (the bound was not met)"
        return None

    @property
    def serving(self) -> bool:
        return self.reason is None


def is_rolled_back(fs: ProjectFS, name: str = "") -> bool:
    return fs.exists(f"{name}/{ROLLBACK_FILENAME}" if name else ROLLBACK_FILENAME)


def find_run_dir(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """``url`` itself when it holds a calibrated run, else its newest such run not rolled back."""
    fs = ProjectFS(url, storage_options)
    if fs.exists(DIFFICULTY_FILENAME) and fs.exists(REPORT_FILENAME):
        return url
    for name in reversed(fs.listdir(".")):
        calibrated = fs.exists(f"{name}/{DIFFICULTY_FILENAME}") and fs.exists(
            f"{name}/{REPORT_FILENAME}"
        )
        if calibrated and not is_rolled_back(fs, name):
            return f"{url.rstrip('/')}/{name}"
    raise InputError(
        f"no run folder with {DIFFICULTY_FILENAME} and {REPORT_FILENAME} (not rolled back) here "
        "(run `labeltriage run` at stage autolabel first)",
        file=url,
    )


def load_easy_tier(run_dir: str, storage_options: dict[str, Any] | None = None) -> EasyTier:
    """Read the easy tier of the run at ``run_dir`` (see the module docstring)."""
    df, meta = read_difficulty(run_dir, storage_options)
    fs = ProjectFS(run_dir, storage_options)
    try:
        calib = json.loads(fs.read_bytes(REPORT_FILENAME))
    except json.JSONDecodeError as exc:
        raise InputError(
            f"malformed {REPORT_FILENAME}: {exc}", file=fs.url_of(REPORT_FILENAME)
        ) from exc
    if not isinstance(calib, dict):
        raise InputError(f"{REPORT_FILENAME} is not a JSON object", file=fs.url_of(REPORT_FILENAME))
    threshold = calib.get("threshold")
    box_confidence = calib.get("box_confidence")
    scores: dict[str, float] = {}
    if threshold is not None:
        scores = usable_scores(df, unlabeled_only=True, at_most=float(threshold))
    return EasyTier(
        run_dir=run_dir,
        run_id=calib.get("run_id") or meta.get("run_id"),
        task=str(calib.get("task") or "detection"),
        threshold=None if threshold is None else float(threshold),
        box_confidence=None if box_confidence is None else float(box_confidence),
        model_version=str(calib.get("model_version") or meta.get("model_version") or MODEL_CLASS),
        stage=calib.get("stage"),
        rolled_back=is_rolled_back(fs),
        scores=scores,
    )


# -- the model behind the endpoints -------------------------------------------------------------


@dataclass
class BackendConfig:
    """Everything the backend needs; plain data (built by the ``serve`` command or tests)."""

    run_url: str
    predictions: PredictionSource
    label_map: LabelMap = field(default_factory=LabelMap)
    storage_options: dict[str, Any] = field(default_factory=dict)
    events_url: str | None = None
    size_of: SizeLookup | None = None
    basic_auth: tuple[str, str] | None = None
    token: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    refresh_s: float = 30.0
    read_timeout_s: float = 15.0
    keepalive_s: float = 5.0
    limit_concurrency: int = 256
    workers: int = 8
    shutdown_timeout_s: float = 10.0

    def check(self, host: str) -> None:
        """Refuse settings that cannot work or would expose the backend."""
        if self.max_body_bytes < 1 or self.max_json_depth < 2:
            raise UsageError("max body size and JSON depth must be positive")
        if self.basic_auth is not None and not all(self.basic_auth):
            raise UsageError("basic auth needs both a user and a password")
        if min(self.read_timeout_s, self.keepalive_s, self.shutdown_timeout_s) <= 0:
            raise UsageError("timeouts must be positive")
        if self.workers < 1 or self.limit_concurrency < 1:
            raise UsageError("workers and the concurrency limit must be at least 1")
        if host not in LOOPBACK and self.basic_auth is None and not self.token:
            raise UsageError(
                f"binding {host} exposes the backend beyond this machine: set basic auth "
                "(--basic-auth-user) or a token (--token-env)"
            )


class EasyTierBackend:
    """The logic of the endpoints, independent of HTTP (so it can be tested directly)."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._tier: EasyTier | None = None
        self._tier_stamp: bytes | None = None
        self._checked = 0.0
        self.label_config: str | None = None
        """The project's label config, as Label Studio last sent it (``/setup``, ``/predict``)."""

    # -- the tier, refreshed when a new calibration lands --------------------------------------
    def tier(self) -> EasyTier:
        with self._lock:
            now = time.monotonic()
            if self._tier is not None and now - self._checked < self.config.refresh_s:
                return self._tier
            self._checked = now
            run_dir = find_run_dir(self.config.run_url, self.config.storage_options)
            fs = ProjectFS(run_dir, self.config.storage_options)
            stamp = run_dir.encode() + fs.read_bytes(REPORT_FILENAME) + bytes([is_rolled_back(fs)])
            if self._tier is None or stamp != self._tier_stamp:
                self._tier = load_easy_tier(run_dir, self.config.storage_options)
                self._tier_stamp = stamp
                log.info(
                    "easy tier of %s: %d items (threshold %s, box confidence %s); %s",
                    run_dir,
                    len(self._tier.scores),
                    self._tier.threshold,
                    self._tier.box_confidence,
                    self._tier.reason or "served",
                )
            return self._tier

    def _status(self, tier: EasyTier) -> dict[str, Any]:
        return {
            "model_version": tier.version,
            "stage": tier.stage,
            "serving": tier.serving,
            "reason": tier.reason,
        }

    # -- endpoints --------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        tier = self.tier()
        return {
            "status": "UP",
            "model_class": MODEL_CLASS,
            **self._status(tier),
            "easy_items": len(tier.scores) if tier.serving else 0,
        }

    def setup(self, body: dict[str, Any]) -> dict[str, Any]:
        if isinstance(body.get("schema"), str):
            self.label_config = body["schema"]
        return self._status(self.tier())

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) and "id" in t for t in tasks):
            raise RequestError(
                HTTPStatus.BAD_REQUEST, "'tasks' must be a list of task objects with an 'id'"
            )
        if isinstance(body.get("label_config"), str):
            self.label_config = body["label_config"]
        tier = self.tier()
        return {
            "results": [self.predict_task(task, tier) for task in tasks],
            "model_version": tier.version,
        }

    def predict_task(self, task: dict[str, Any], tier: EasyTier) -> list[dict[str, Any]]:
        """One task's answer: a list with the easy-tier prediction, or an empty list."""
        item_id = str(task["id"])
        if (
            not tier.serving
            or not tier.is_easy(item_id)
            or human_annotations(task)
            or labeltriage_predictions(task)
            or tier.box_confidence is None
        ):
            return []
        try:
            size = self._size(task)
            item = Item(item_id=item_id, uri="", width=size[0], height=size[1]) if size else None
            pred = self.config.predictions.get(item_id, item)
            if pred is None:
                return []
            if pred.error:
                raise InputError(pred.error, item=item_id)
            annotations = auto_label(
                pred, self.config.label_map, task=tier.task, box_confidence=tier.box_confidence
            )
            if annotations is None:
                return []
            result = self._regions(item_id, size, annotations, tier)
        except (ValueError, LabelTriageError) as exc:
            log.warning("task %s is easy, but its label cannot be served: %s", item_id, exc)
            return []
        scores = [a.score for a in annotations if a.score is not None]
        return [
            {
                "result": result,
                "score": min(scores) if scores else None,
                "model_version": tier.version,
            }
        ]

    def _size(self, task: dict[str, Any]) -> tuple[int, int] | None:
        width, height = image_size_of(task)
        if width and height:
            return width, height
        return self.config.size_of(task) if self.config.size_of else None

    def _regions(
        self,
        item_id: str,
        size: tuple[int, int] | None,
        annotations: list[Annotation],
        tier: EasyTier,
    ) -> list[dict[str, Any]]:
        from connectors.labelstudio.config import parse_label_config

        if not self.label_config:
            raise ValueError(
                "no label config known (Label Studio sends it with /setup and /predict)"
            )
        config = parse_label_config(self.label_config, where="label config")
        if size is None and any(a.box is not None for a in annotations):
            raise ValueError("the image size is unknown (no region gives it, no Label Studio URL)")
        width, height = size or (None, None)
        regions = [
            annotation_to_region(a, config.names, width, height, region_id=f"lt{i}")
            for i, a in enumerate(annotations)
        ]
        scores = [a.score for a in annotations if a.score is not None]
        provenance = Provenance(
            run_id=tier.run_id or "unknown",
            model_version=tier.model_version,
            score=min(scores) if scores else None,
            tier="easy",
            extra={"difficulty": tier.scores[item_id]},
        )
        meta = provenance_meta(
            provenance, via="serve", sha256=content_sha256(regions, tier.version)
        )
        for region in regions:
            region["meta"] = meta
        return regions

    def webhook(self, body: dict[str, Any]) -> dict[str, Any]:
        action = body.get("action")
        if not isinstance(action, str):
            raise RequestError(HTTPStatus.BAD_REQUEST, "a webhook event needs an 'action'")
        annotation = body.get("annotation")
        task = body.get("task")
        if not isinstance(annotation, dict) and not body.get("annotations"):
            return {"status": "ignored", "action": action}
        project = body.get("project")
        event = {
            "received": datetime.now(timezone.utc).isoformat(),
            "action": action,
            "project": project.get("id") if isinstance(project, dict) else project,
            "task": task.get("id") if isinstance(task, dict) else (annotation or {}).get("task"),
            "annotation": annotation if isinstance(annotation, dict) else None,
            "annotations": body.get("annotations") if not isinstance(annotation, dict) else None,
        }
        if self.config.events_url:
            append_event(self.config.events_url, event, self.config.storage_options)
        return {"status": "recorded", "action": action}


# -- the events file --------------------------------------------------------------------------


_EVENTS_LOCK = threading.Lock()
"""Serialises appends of this process (request work runs in threads)."""


def append_event(
    url: str, event: dict[str, Any], storage_options: dict[str, Any] | None = None
) -> None:
    """Append one event as a JSON line to ``url`` (a local file, or any fsspec URL).

    A local file is appended to in place (``O_APPEND``, one ``write`` per line, fsync); on
    other filesystems (object stores cannot append) the file is rewritten atomically with
    the line added.  Appends of one process are serialised.
    """
    line = (json.dumps(event, sort_keys=True, default=str) + "\n").encode()
    parent, _, name = url.rstrip("/").rpartition("/")
    fs = ProjectFS(parent or ".", storage_options)
    with _EVENTS_LOCK:
        if fs.is_local:
            os.makedirs(fs.root, exist_ok=True)
            fd = os.open(os.path.join(fs.root, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        old = fs.read_bytes(name) if fs.exists(name) else b""
        fs.write_bytes(name, old + line)


def read_events(url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The events recorded by the webhook, oldest first (a truncated last line is skipped)."""
    parent, _, name = url.rstrip("/").rpartition("/")
    fs = ProjectFS(parent or ".", storage_options)
    if not fs.exists(name):
        return []
    events = []
    for number, raw in enumerate(fs.read_text(name).splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            events.append(json.loads(raw))
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping a malformed event line", url, number)
    return events


def label_studio_size_lookup(project: Any) -> SizeLookup:
    """Image sizes of tasks of a live Label Studio project (:class:`LabelStudioAPI`).

    The size comes from the task's regions, else from the image's header, read from Label
    Studio with its token only where the image-source policy allows; otherwise ``None``.
    """
    cache: dict[str, tuple[int, int]] = {}
    lock = threading.Lock()
    image_key = project.config.image_key

    def size_of(task: dict[str, Any]) -> tuple[int, int] | None:
        width, height = image_size_of(task)
        if width and height:
            return width, height
        value = (task.get("data") or {}).get(image_key)
        if not isinstance(value, str):
            return None
        with lock:
            if value in cache:
                return cache[value]
        try:
            size = project.image_size(value, item=str(task.get("id")))
        except (InputError, UsageError) as exc:
            log.warning("task %s: cannot read the image size: %s", task.get("id"), exc)
            return None
        with lock:
            cache[value] = size
        return size

    return size_of


__all__ = [
    "ROLLBACK_FILENAME",
    "BackendConfig",
    "EasyTier",
    "EasyTierBackend",
    "RequestError",
    "append_event",
    "find_run_dir",
    "label_studio_size_lookup",
    "load_easy_tier",
    "read_events",
]

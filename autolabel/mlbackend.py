"""A Label Studio ML backend that pre-annotates only the calibrated easy tier.

Label Studio talks to an ML backend over four JSON endpoints (see Label Studio's
``ml/api_connector.py``):

==============  =================================================================
endpoint        what it does here
==============  =================================================================
``GET /health`` ``{"status": "UP", "model_class": ..., "model_version": ...}``
``POST /setup`` ``{"model_version": ...}`` (Label Studio sends the project, its label
                config, its host name and an access token)
``POST /predict`` ``{"tasks": [...]}`` → ``{"results": [...]}``, one entry per task in
                order: for a task of the calibrated easy tier the prediction's label
                (label-mapped, boxes at the calibrated box confidence) as
                ``rectanglelabels``/``choices`` regions with ``score`` and
                ``model_version``; for every other task an empty ``result``
``POST /webhook`` Label Studio's webhook events (``ANNOTATION_CREATED``,
                ``ANNOTATION_UPDATED``, ``ANNOTATIONS_DELETED``, …): each event with an
                annotation is appended as one line to a JSONL file (``events_url``, in
                the report store) so that the next scheduled run sees it
==============  =================================================================

The easy tier is read from a scored and calibrated run folder: ``difficulty.parquet``
(:func:`difficulty.table.read_difficulty`) and ``autolabel.json`` (written by
:mod:`autolabel.gate`): a task is easy when its row has no error and its combined
``score`` is at or below the calibrated ``threshold``.  No calibrated threshold (the bound
could not be met) means no task is easy.  The folder is re-read when ``autolabel.json``
changes (checked at most every ``refresh_s`` seconds), so a scheduled run's new
calibration takes effect without a restart.  Given a report-store project folder instead
of a run folder, the newest run folder holding both files is used.

Safety: the server binds ``127.0.0.1`` unless told otherwise; with ``basic_auth`` set every
request must carry that user and password (Label Studio sends them when the backend is
connected with "basic auth"); a body larger than ``max_body_bytes`` is answered 413, a
missing length 411, a body that is not a JSON object 400, an unknown path 404; an error
inside a handler is logged and answered 500.  The server never exits because of a request.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pandas as pd

from autolabel.gate import REPORT_FILENAME, auto_label
from connectors.errors import InputError, LabelTriageError, UsageError
from connectors.formats.base import PredictionSource
from connectors.labelmap import LabelMap
from connectors.model import Annotation, Item
from connectors.storage import ProjectFS
from difficulty.table import FILENAME as DIFFICULTY_FILENAME
from difficulty.table import read_difficulty

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9090
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
EVENTS_FILENAME = "labelstudio_events.jsonl"
MODEL_CLASS = "labeltriage-easy-tier"

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
    """The calibrated easy tier of one run: which items, and at what box confidence."""

    run_dir: str
    run_id: str | None
    task: str
    threshold: float | None
    box_confidence: float | None
    model_version: str
    scores: dict[str, float] = field(default_factory=dict)
    """``item_id → combined difficulty score`` of the items in the easy tier."""

    def is_easy(self, item_id: str) -> bool:
        return item_id in self.scores

    @property
    def version(self) -> str:
        """The ``model_version`` the backend reports: model and calibration run."""
        return f"{self.model_version}@{self.run_id}" if self.run_id else self.model_version


def find_run_dir(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """``url`` itself when it holds a calibrated run, else its newest run folder that does."""
    fs = ProjectFS(url, storage_options)
    if fs.exists(DIFFICULTY_FILENAME) and fs.exists(REPORT_FILENAME):
        return url
    for name in reversed(fs.listdir(".")):
        if fs.exists(f"{name}/{DIFFICULTY_FILENAME}") and fs.exists(f"{name}/{REPORT_FILENAME}"):
            return f"{url.rstrip('/')}/{name}"
    raise InputError(
        f"no run folder with {DIFFICULTY_FILENAME} and {REPORT_FILENAME} here "
        "(run `labeltriage score` and `labeltriage autolabel`, or a scheduled run, first)",
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
        ok = df["error"].isna() if "error" in df.columns else pd.Series(True, index=df.index)
        easy = df[ok & df["score"].notna() & (df["score"] <= float(threshold))]
        scores = {str(i): float(s) for i, s in zip(easy["item_id"], easy["score"], strict=True)}
    return EasyTier(
        run_dir=run_dir,
        run_id=calib.get("run_id") or meta.get("run_id"),
        task=str(calib.get("task") or "detection"),
        threshold=None if threshold is None else float(threshold),
        box_confidence=None if box_confidence is None else float(box_confidence),
        model_version=str(calib.get("model_version") or meta.get("model_version") or MODEL_CLASS),
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
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    refresh_s: float = 30.0


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
            stamp = run_dir.encode() + ProjectFS(run_dir, self.config.storage_options).read_bytes(
                REPORT_FILENAME
            )
            if self._tier is None or stamp != self._tier_stamp:
                self._tier = load_easy_tier(run_dir, self.config.storage_options)
                self._tier_stamp = stamp
                log.info(
                    "easy tier of %s: %d items (threshold %s, box confidence %s)",
                    run_dir,
                    len(self._tier.scores),
                    self._tier.threshold,
                    self._tier.box_confidence,
                )
            return self._tier

    # -- endpoints --------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        tier = self.tier()
        return {
            "status": "UP",
            "model_class": MODEL_CLASS,
            "model_version": tier.version,
            "easy_items": len(tier.scores),
        }

    def setup(self, body: dict[str, Any]) -> dict[str, Any]:
        if isinstance(body.get("schema"), str):
            self.label_config = body["schema"]
        return {"model_version": self.tier().version}

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

    def predict_task(self, task: dict[str, Any], tier: EasyTier) -> dict[str, Any]:
        """One task's answer: the easy-tier label, or an empty result (not easy / no label)."""
        item_id = str(task["id"])
        empty: dict[str, Any] = {"result": [], "score": None, "model_version": tier.version}
        if not tier.is_easy(item_id) or tier.box_confidence is None:
            return empty
        pred = self.config.predictions.get(item_id, _item_of(task))
        if pred is None or pred.error:
            return empty
        annotations = auto_label(
            pred, self.config.label_map, task=tier.task, box_confidence=tier.box_confidence
        )
        if annotations is None:
            return empty
        try:
            result = self._regions(task, annotations, tier)
        except (ValueError, LabelTriageError) as exc:
            log.warning("task %s: easy, but its label cannot be sent: %s", item_id, exc)
            return empty
        scores = [a.score for a in annotations if a.score is not None]
        return {
            "result": result,
            "score": min(scores) if scores else None,
            "model_version": tier.version,
        }

    def _regions(
        self, task: dict[str, Any], annotations: list[Annotation], tier: EasyTier
    ) -> list[dict[str, Any]]:
        from connectors.formats.labelstudio_api import annotation_to_region, parse_label_config

        if not self.label_config:
            raise ValueError(
                "no label config known (Label Studio sends it with /setup and /predict)"
            )
        config = parse_label_config(self.label_config, where="label config")
        width = height = None
        if any(a.box is not None for a in annotations):
            size = self.config.size_of(task) if self.config.size_of else None
            if size is None:
                raise ValueError("the image size is unknown")
            width, height = size
        meta = {
            "labeltriage": {
                "run_id": tier.run_id,
                "tier": "easy",
                "difficulty": tier.scores[str(task["id"])],
            },
            "text": [f"labeltriage easy tier (run {tier.run_id})"],
        }
        return [
            annotation_to_region(a, config, width, height, region_id=f"lt{i}", meta=meta)
            for i, a in enumerate(annotations)
        ]

    def webhook(self, body: dict[str, Any]) -> dict[str, Any]:
        action = body.get("action")
        if not isinstance(action, str):
            raise RequestError(HTTPStatus.BAD_REQUEST, "a webhook event needs an 'action'")
        annotation = body.get("annotation")
        task = body.get("task")
        if not isinstance(annotation, dict) and not body.get("annotations"):
            return {"status": "ignored", "action": action}
        event = {
            "received": datetime.now(timezone.utc).isoformat(),
            "action": action,
            "project": (body.get("project") or {}).get("id")
            if isinstance(body.get("project"), dict)
            else body.get("project"),
            "task": task.get("id") if isinstance(task, dict) else (annotation or {}).get("task"),
            "annotation": annotation if isinstance(annotation, dict) else None,
            "annotations": body.get("annotations") if not isinstance(annotation, dict) else None,
        }
        if self.config.events_url:
            append_event(self.config.events_url, event, self.config.storage_options)
        return {"status": "recorded", "action": action}


def _item_of(task: dict[str, Any]) -> Item | None:
    try:
        return Item(item_id=str(task["id"]), uri="")
    except (KeyError, ValueError):
        return None


# -- the events file --------------------------------------------------------------------------


_EVENTS_LOCK = threading.Lock()
"""Serialises appends of this process (the server answers requests in threads)."""


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


# -- HTTP -----------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: BackendServer
    protocol_version = "HTTP/1.1"
    server_version = "labeltriage-mlbackend"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(
        self, status: HTTPStatus, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        expected = self.server.backend.config.basic_auth
        if expected is None:
            return True
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        ok_user = hmac.compare_digest(user.encode(), expected[0].encode())
        ok_pass = hmac.compare_digest(password.encode(), expected[1].encode())
        return ok_user and ok_pass

    def _body(self) -> dict[str, Any]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise RequestError(
                HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted; send Content-Length"
            )
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        try:
            length = int(raw_length)
        except ValueError:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"bad Content-Length {raw_length!r}"
            ) from None
        if length < 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {raw_length!r}")
        limit = self.server.backend.config.max_body_bytes
        if length > limit:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {length} bytes is over the limit of {limit}",
            )
        data = self.rfile.read(length)
        try:
            body = json.loads(data or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        return body

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        backend = self.server.backend
        try:
            if not self._authorized():
                # Do not read the body of an unauthenticated request; close the connection.
                self.close_connection = True
                self._send(
                    HTTPStatus.UNAUTHORIZED,
                    {"error": "authentication required"},
                    {"WWW-Authenticate": 'Basic realm="labeltriage"'},
                )
                return
            if method == "GET" and path in ("/health", "/"):
                self._send(HTTPStatus.OK, backend.health())
            elif method == "GET" and path == "/versions":
                self._send(HTTPStatus.OK, {"versions": [backend.tier().version]})
            elif method == "POST" and path in ("/setup", "/predict", "/webhook"):
                body = self._body()
                handler = {
                    "/setup": backend.setup,
                    "/predict": backend.predict,
                    "/webhook": backend.webhook,
                }[path]
                self._send(HTTPStatus.OK, handler(body))
            elif path in ("/health", "/versions", "/setup", "/predict", "/webhook"):
                self._send(
                    HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{method} is not allowed on {path}"}
                )
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {path}"})
        except RequestError as exc:
            if exc.status in (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, HTTPStatus.LENGTH_REQUIRED):
                self.close_connection = True  # the unread body must not be parsed as a request
            self._send(exc.status, {"error": exc.message})
        except (UsageError, InputError) as exc:
            log.error("%s %s: %s", method, path, exc)
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
        except Exception as exc:
            log.exception("%s %s failed", method, path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class BackendServer(ThreadingHTTPServer):
    """The HTTP server; ``serve_forever`` in a thread for tests, or until Ctrl-C."""

    daemon_threads = True

    def __init__(
        self, backend: EasyTierBackend, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
    ) -> None:
        self.backend = backend
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{name}:{port}"


def make_server(
    config: BackendConfig, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> BackendServer:
    """A ready server (bound, not yet serving); ``port=0`` picks a free port."""
    if config.max_body_bytes < 1:
        raise UsageError(f"max body size must be positive, got {config.max_body_bytes}")
    if config.basic_auth is not None and not all(config.basic_auth):
        raise UsageError("basic auth needs both a user and a password")
    return BackendServer(EasyTierBackend(config), host, port)


def label_studio_size_lookup(base_url: str, token: str, *, timeout: float = 30.0) -> SizeLookup:
    """Image sizes of tasks, read from the image header served by Label Studio.

    Only images on ``base_url``'s server (paths such as ``/data/upload/…``) are fetched,
    with the token; the size of any other image is unknown (``None``).
    """
    import io
    import urllib.parse

    import requests
    from PIL import Image, UnidentifiedImageError

    from connectors.formats.labelstudio_api import LabelStudioClient

    client = LabelStudioClient(base_url, token, timeout=timeout)
    parts = urllib.parse.urlsplit(base_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    cache: dict[str, tuple[int, int]] = {}

    def size_of(task: dict[str, Any]) -> tuple[int, int] | None:
        for region in (r for a in task.get("annotations") or [] for r in a.get("result") or []):
            if region.get("original_width") and region.get("original_height"):
                return int(region["original_width"]), int(region["original_height"])
        values = [v for v in (task.get("data") or {}).values() if isinstance(v, str)]
        path = next((v for v in values if v.startswith("/data/")), None)
        if path is None:
            return None
        if path in cache:
            return cache[path]
        try:
            r = client.session.get(origin + path, timeout=timeout)
            r.raise_for_status()
            size = Image.open(io.BytesIO(r.content)).size
        except (requests.RequestException, UnidentifiedImageError, OSError) as exc:
            log.warning(
                "task %s: cannot read the image size from %s: %s", task.get("id"), path, exc
            )
            return None
        cache[path] = (int(size[0]), int(size[1]))
        return cache[path]

    return size_of


__all__ = [
    "BackendConfig",
    "BackendServer",
    "EasyTier",
    "EasyTierBackend",
    "append_event",
    "find_run_dir",
    "label_studio_size_lookup",
    "load_easy_tier",
    "make_server",
    "read_events",
]

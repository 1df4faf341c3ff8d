"""A live Label Studio project, read and written through its REST API.

Source: the project's URL, ``http://HOST:PORT/projects/ID`` (``/api/projects/ID`` and a
trailing ``/data`` or query string are accepted too).  The API token comes from
``storage_options["token"]`` or the environment variable ``LABEL_STUDIO_TOKEN``: a legacy
token is sent as ``Authorization: Token T``; a personal access token (a JWT) is first
exchanged at ``/api/token/refresh`` for an access token sent as ``Bearer``.

Reading (:meth:`LabelStudioAPI.iter_items`) pages through ``/api/tasks?project=ID`` with
``page``/``page_size``; one page is in memory at a time.

* ``item_id`` is ``str(task id)``; ``uri`` is the full URL of the task's image (a
  server-relative path such as ``/data/upload/3/ab12-road1.jpg`` is joined to the server
  URL).  The image field is the ``value="$key"`` of the label config's ``<Image>`` tag.
* A task is ``labeled`` (source ``human``) when it has an annotation that was not
  cancelled ("skipped").  Of several, a ``ground_truth`` one wins, else the most recently
  updated.  Its ``lead_time`` becomes ``annotation_seconds``.
* ``rectanglelabels`` regions are percentages of the image (``x``, ``y``, ``width``,
  ``height`` in 0..100, rotated by ``rotation`` degrees clockwise about the top-left
  corner); they become pixel ``xyxy`` through ``original_width``/``original_height``
  (a rotated box becomes its axis-aligned bounding box).  ``choices`` regions become one
  class label (classification).
* A region that does not fit the image, or lacks its image size, makes the item an
  error item naming the task and the region.

Writing (:meth:`LabelStudioAPI.write_labels`) creates Label Studio *predictions*, never
annotations: ``POST /api/predictions`` with ``model_version``, ``score`` and one region
per box (with its own ``score``).  Label Studio keeps no prediction-level metadata, so the
provenance (run id, difficulty tier, item score) rides in every region's ``meta`` under
``"labeltriage"``, next to a human-readable ``meta.text`` line that the labeling UI shows.
Just before each write the task is fetched again; a task that has gained a human
annotation is refused.  Annotations are separate objects in Label Studio, so a
prediction can never replace one.  :meth:`LabelStudioAPI.remove_written` deletes exactly
the predictions it created, by the ids in the run manifest's records, and keeps one whose
content changed (checksum of result and model version) or that moved to another task.
An empty label ("nothing to mark here") is a prediction with an empty ``result``: it has
no region to carry the provenance, so only the manifest's record identifies it.

Label Studio has no place for files, so the run manifests that
:mod:`connectors.writeback` keeps under ``.labeltriage/`` live in a local *state folder*
(option ``state_dir``, else ``$LABELTRIAGE_STATE_DIR/labelstudio/<server>/<project>``,
else ``~/.cache/labeltriage/labelstudio/<server>/<project>``).

Image reads: the format's ``project`` (:class:`LabelStudioFS`) carries the
``Authorization`` header in its HTTP storage options, so an image reader that opens a
full ``http(s)://`` item uri with the project's storage options
(``fsspec.open(uri, headers=...)``) gets through.  Those options apply to every
``http(s)://`` uri of the project, so tasks whose images live on another web server
would receive the header too: :meth:`LabelStudioAPI.iter_items` therefore refuses such
tasks (error item) unless the option ``allow_foreign_images=True`` is given.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import requests
from PIL import Image, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from connectors.errors import InputError, UsageError
from connectors.formats.base import (
    LabelWrite,
    PredictionSource,
    ProjectFormat,
    Provenance,
    WriteOutcome,
    WrittenRecord,
)
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus, Prediction
from connectors.storage import ProjectFS

log = logging.getLogger(__name__)

TOKEN_ENV = "LABEL_STUDIO_TOKEN"
STATE_ENV = "LABELTRIAGE_STATE_DIR"
META_KEY = "labeltriage"
"""Key of the provenance inside each written region's ``meta``."""
PREDICTIONS_PATH = "api/predictions"
"""``WrittenRecord.path`` of a prediction written to Label Studio (ids in ``entry_ids``)."""
DEFAULT_PAGE_SIZE = 100
DEFAULT_TIMEOUT_S = 30.0

_PROJECT_URL = re.compile(
    r"^(?P<base>https?://[^?#]*?)/(?:api/)?projects/(?P<id>\d+)(?:/[^?#]*)?/?(?:[?#].*)?$"
)


# -- locations and the HTTP client -------------------------------------------------------------


@dataclass(frozen=True)
class ProjectLocation:
    """A Label Studio project: the server's base URL (no trailing slash) and the project id."""

    base_url: str
    project_id: int

    @property
    def url(self) -> str:
        return f"{self.base_url}/projects/{self.project_id}"

    @property
    def origin(self) -> str:
        parts = urllib.parse.urlsplit(self.base_url)
        return f"{parts.scheme}://{parts.netloc}"


def parse_project_url(source: str) -> ProjectLocation:
    """``http://HOST:PORT[/prefix]/projects/ID[/…]`` → :class:`ProjectLocation`.

    Raises :class:`UsageError` naming the source when it is not such a URL.
    """
    match = _PROJECT_URL.match(source.strip())
    if match is None:
        raise UsageError(
            f"{source!r} is not a Label Studio project URL; expected http(s)://HOST:PORT/projects/ID"
        )
    return ProjectLocation(
        base_url=match.group("base").rstrip("/"), project_id=int(match.group("id"))
    )


def is_project_url(source: str) -> bool:
    return _PROJECT_URL.match(source.strip()) is not None


def resolve_token(storage_options: dict[str, Any] | None) -> str:
    """The API token from ``storage_options["token"]`` or ``$LABEL_STUDIO_TOKEN``."""
    token = (storage_options or {}).get("token") or os.environ.get(TOKEN_ENV)
    if not token:
        raise UsageError(
            f"a Label Studio API token is needed: pass storage_options token=... or set {TOKEN_ENV}"
        )
    return str(token)


class LabelStudioClient:
    """A small, typed wrapper of Label Studio's REST API (``requests`` with retries).

    GET and DELETE are retried on connection errors and 502/503/504; POST is not (it would
    create a second prediction).  Every failure raises :class:`UsageError` (the server is
    unreachable, the token is refused, the project does not exist) or :class:`InputError`
    (an answer that is not the JSON expected), naming the URL.
    """

    def __init__(self, base_url: str, token: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        retry = Retry(
            total=3,
            backoff_factor=0.3,
            status_forcelist=(502, 503, 504),
            allowed_methods=frozenset({"GET", "DELETE", "HEAD"}),
        )
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        self.auth_header = self._auth_header(token)
        self.session.headers["Authorization"] = self.auth_header

    def _auth_header(self, token: str) -> str:
        if token.count(".") == 2 and token.startswith("ey"):
            # A personal access token (JWT refresh token): exchange it for an access token.
            url = f"{self.base_url}/api/token/refresh"
            try:
                r = self.session.post(url, json={"refresh": token}, timeout=self.timeout)
            except requests.RequestException as exc:
                raise UsageError(f"{url}: cannot reach Label Studio: {exc}") from exc
            if r.status_code != 200 or "access" not in r.json():
                raise UsageError(
                    f"{url}: the personal access token was refused (HTTP {r.status_code})"
                )
            return f"Bearer {r.json()['access']}"
        return f"Token {token}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def request(
        self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any
    ) -> requests.Response:
        url = self.url(path)
        try:
            r = self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise UsageError(f"{url}: cannot reach Label Studio: {exc}") from exc
        if r.status_code in ok:
            return r
        if r.status_code in (401, 403):
            raise UsageError(f"{method} {url}: the API token was refused (HTTP {r.status_code})")
        detail = r.text[:300].replace("\n", " ")
        raise UsageError(f"{method} {url}: HTTP {r.status_code}: {detail}")

    def json(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        r = self.request(method, path, ok=ok, **kwargs)
        try:
            return r.json()
        except ValueError as exc:
            raise InputError(f"answer is not JSON: {r.text[:200]!r}", file=self.url(path)) from exc

    # -- endpoints ----------------------------------------------------------------------
    def project(self, project_id: int) -> dict[str, Any]:
        body = self.json("GET", f"api/projects/{project_id}")
        if not isinstance(body, dict):
            raise InputError(
                "project answer is not a JSON object", file=self.url(f"api/projects/{project_id}")
            )
        return body

    def task(self, task_id: int | str) -> dict[str, Any] | None:
        """One task with its annotations and predictions; ``None`` when it no longer exists."""
        r = self.request("GET", f"api/tasks/{task_id}", ok=(200, 404))
        if r.status_code == 404:
            return None
        body = r.json()
        return body if isinstance(body, dict) else None

    def iter_tasks(
        self, project_id: int, *, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[dict[str, Any]]:
        """Every task of the project (with ``annotations`` and ``predictions``), page by page."""
        page = 1
        seen = 0
        while True:
            params: dict[str, str | int] = {
                "project": project_id,
                "page": page,
                "page_size": page_size,
                "fields": "all",
            }
            r = self.request("GET", "api/tasks", ok=(200, 404), params=params)
            if r.status_code == 404:  # "Invalid page": past the last one
                return
            body = r.json()
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            if not isinstance(tasks, list):
                raise InputError(
                    f"page {page} of the task list is not a list", file=self.url("api/tasks")
                )
            yield from tasks
            seen += len(tasks)
            total = body.get("total") if isinstance(body, dict) else None
            if not tasks or len(tasks) < page_size or (isinstance(total, int) and seen >= total):
                return
            page += 1

    def create_prediction(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = self.json("POST", "api/predictions", ok=(200, 201), json=body)
        if not isinstance(answer, dict) or "id" not in answer:
            raise InputError(
                f"prediction answer has no id: {str(answer)[:200]}",
                file=self.url("api/predictions"),
            )
        return answer

    def prediction(self, prediction_id: int | str) -> dict[str, Any] | None:
        r = self.request("GET", f"api/predictions/{prediction_id}", ok=(200, 404))
        return r.json() if r.status_code == 200 else None

    def delete_prediction(self, prediction_id: int | str) -> bool:
        """Delete one prediction; ``False`` when it was already gone."""
        r = self.request("DELETE", f"api/predictions/{prediction_id}", ok=(200, 204, 404))
        return r.status_code != 404

    def predictions(self, project_id: int) -> list[dict[str, Any]]:
        body = self.json("GET", "api/predictions", params={"project": project_id})
        return body if isinstance(body, list) else list(body.get("results", []))


# -- label config -------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelConfig:
    """What labeltriage needs from a project's XML label config."""

    image_key: str
    image_name: str
    boxes_from: str | None
    choices_from: str | None
    labels: tuple[str, ...]

    @property
    def task(self) -> str:
        return "detection" if self.boxes_from else "classification"


def parse_label_config(xml: str, *, where: str = "<label config>") -> LabelConfig:
    """The image field and the ``RectangleLabels``/``Choices`` controls of a label config."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InputError(f"malformed label config: {exc}", file=where) from exc
    image = next((el for el in root.iter() if el.tag == "Image"), None)
    if image is None or not image.get("value", "").startswith("$"):
        raise UsageError(
            f'{where}: the label config has no <Image value="$..."> tag; labeltriage needs images'
        )
    name = image.get("name", "image")
    boxes = next(
        (el for el in root.iter() if el.tag == "RectangleLabels" and el.get("toName") == name), None
    )
    choices = next(
        (el for el in root.iter() if el.tag == "Choices" and el.get("toName") == name), None
    )
    if boxes is None and choices is None:
        raise UsageError(
            f"{where}: the label config has neither <RectangleLabels> nor <Choices> for image {name!r}"
        )
    controls = [c for c in (boxes, choices) if c is not None]
    labels = tuple(
        el.get("value", "")
        for el in controls[0]
        if el.tag in ("Label", "Choice") and el.get("value")
    )
    return LabelConfig(
        image_key=image.get("value", "$image")[1:],
        image_name=name,
        boxes_from=boxes.get("name") if boxes is not None else None,
        choices_from=choices.get("name") if choices is not None else None,
        labels=labels,
    )


# -- regions <-> annotations --------------------------------------------------------------------


def region_to_annotation(
    region: dict[str, Any], *, default_score: float | None = None
) -> Annotation | None:
    """One Label Studio result region → an :class:`Annotation` (pixel ``xyxy``), or ``None``.

    Regions of other kinds (text areas, relations, …) give ``None``.  Raises
    :class:`ValueError` (with the reason) for a box that cannot be converted.
    """
    kind = region.get("type")
    value = region.get("value") or {}
    score = region.get("score", default_score)
    score = None if score is None else float(score)
    if kind == "rectanglelabels":
        labels = value.get("rectanglelabels") or []
        if len(labels) != 1:
            raise ValueError(f"region {region.get('id')!r} has {len(labels)} labels, expected 1")
        width, height = region.get("original_width"), region.get("original_height")
        if not width or not height:
            raise ValueError(f"region {region.get('id')!r} has no original_width/original_height")
        box = percent_to_xyxy(value, int(width), int(height))
        return Annotation(label=str(labels[0]), box=box, score=score)
    if kind == "choices":
        choices = value.get("choices") or []
        if len(choices) != 1:
            raise ValueError(f"region {region.get('id')!r} has {len(choices)} choices, expected 1")
        return Annotation(label=str(choices[0]), score=score)
    return None


def percent_to_xyxy(
    value: dict[str, Any], width: int, height: int
) -> tuple[float, float, float, float]:
    """Label Studio's ``x, y, width, height`` (percent, rotated about the top-left corner) → pixel ``xyxy``.

    A rotated rectangle becomes its axis-aligned bounding box.  Raises :class:`ValueError`
    when the box has no size or lies outside the image (1 % slack).
    """
    x, y, w, h = (float(value.get(k, math.nan)) for k in ("x", "y", "width", "height"))
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"box {value} has a missing or non-finite coordinate")
    px, py, pw, ph = x * width / 100.0, y * height / 100.0, w * width / 100.0, h * height / 100.0
    rotation = float(value.get("rotation") or 0.0)
    if rotation % 360.0:
        a = math.radians(rotation)
        cos, sin = math.cos(a), math.sin(a)
        xs = [px + dx * cos - dy * sin for dx, dy in ((0, 0), (pw, 0), (pw, ph), (0, ph))]
        ys = [py + dx * sin + dy * cos for dx, dy in ((0, 0), (pw, 0), (pw, ph), (0, ph))]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    else:
        x1, y1, x2, y2 = px, py, px + pw, py + ph
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {value} has zero or negative size")
    tol_x, tol_y = width / 100.0, height / 100.0
    if x1 < -tol_x or y1 < -tol_y or x2 > width + tol_x or y2 > height + tol_y:
        raise ValueError(f"box {value} lies outside the {width}x{height} image")
    return (max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2))


def annotation_to_region(
    a: Annotation,
    config: LabelConfig,
    width: int | None,
    height: int | None,
    *,
    region_id: str,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """An :class:`Annotation` (pixel ``xyxy`` or a class) → one Label Studio result region."""
    if a.box is None:
        if config.choices_from is None:
            raise UsageError(
                f"{a.label!r}: a class label needs a <Choices> control in the label config"
            )
        region: dict[str, Any] = {
            "from_name": config.choices_from,
            "to_name": config.image_name,
            "type": "choices",
            "value": {"choices": [a.label]},
        }
    else:
        if config.boxes_from is None:
            raise UsageError(
                f"{a.label!r}: a box needs a <RectangleLabels> control in the label config"
            )
        if not width or not height:
            raise ValueError("the image size is unknown; boxes cannot be written as percentages")
        x1, y1, x2, y2 = a.box
        region = {
            "from_name": config.boxes_from,
            "to_name": config.image_name,
            "type": "rectanglelabels",
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {
                "x": 100.0 * x1 / width,
                "y": 100.0 * y1 / height,
                "width": 100.0 * (x2 - x1) / width,
                "height": 100.0 * (y2 - y1) / height,
                "rotation": 0,
                "rectanglelabels": [a.label],
            },
        }
    region["id"] = region_id
    if a.score is not None:
        region["score"] = float(a.score)
    region["meta"] = meta
    return region


def provenance_meta(p: Provenance) -> dict[str, Any]:
    """Region ``meta``: the provenance for machines, and one line the labeling UI shows."""
    body = {
        "run_id": p.run_id,
        "model_version": p.model_version,
        "tier": p.tier,
        "score": p.score,
        **p.extra,
    }
    text = f"labeltriage run {p.run_id}, tier {p.tier or '?'}, model {p.model_version}"
    return {META_KEY: body, "text": [text]}


def written_provenance(prediction: dict[str, Any]) -> dict[str, Any] | None:
    """The labeltriage provenance of a Label Studio prediction, or ``None`` if it is not ours."""
    for region in prediction.get("result") or []:
        meta = region.get("meta") if isinstance(region, dict) else None
        if isinstance(meta, dict) and isinstance(meta.get(META_KEY), dict):
            return dict(meta[META_KEY])
    return None


def content_sha256(result: list[dict[str, Any]], model_version: str | None) -> str:
    """Checksum of a prediction's content as labeltriage wrote it (to spot later edits)."""
    canonical = json.dumps(
        {"result": result, "model_version": model_version}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def human_annotations(task: dict[str, Any]) -> list[dict[str, Any]]:
    """A task's annotations that count as a human label (not cancelled/skipped)."""
    return [
        a
        for a in task.get("annotations") or []
        if isinstance(a, dict) and not a.get("was_cancelled")
    ]


# -- the project filesystem -------------------------------------------------------------------


class LabelStudioFS(ProjectFS):
    """The project as labeltriage's storage layer sees a Label Studio project.

    ``fs``/``storage_options``/``url`` are the server over HTTP with the
    ``Authorization`` header, so image readers open item uris with them; every relative
    path (run manifests under ``.labeltriage/``) lives in the local ``state`` folder.
    """

    def __init__(self, location: ProjectLocation, auth_header: str, state: ProjectFS) -> None:
        super().__init__(location.url, {"headers": {"Authorization": auth_header}})
        self.state = state
        self.location = location

    def __repr__(self) -> str:
        return f"LabelStudioFS({self.url!r}, state={self.state.url!r})"

    def resolve(self, rel: str, *, item: str | None = None) -> str:
        return self.state.resolve(rel, item=item)

    def relative(self, full: str) -> str:
        return self.state.relative(full)

    def url_of(self, rel: str) -> str:
        return self.state.url_of(rel)

    def exists(self, rel: str) -> bool:
        return self.state.exists(rel)

    def isdir(self, rel: str) -> bool:
        return self.state.isdir(rel)

    def read_bytes(self, rel: str) -> bytes:
        return self.state.read_bytes(rel)

    def open(self, rel: str, mode: str = "rb") -> Any:
        return self.state.open(rel, mode)

    def listdir(self, rel: str = ".") -> list[str]:
        return self.state.listdir(rel)

    def walk_files(self, rel: str = ".") -> Iterator[str]:
        return self.state.walk_files(rel)

    def write_bytes(self, rel: str, data: bytes, *, overwrite: bool = True) -> str:
        return self.state.write_bytes(rel, data, overwrite=overwrite)

    def remove(self, rel: str) -> None:
        self.state.remove(rel)


def default_state_dir(location: ProjectLocation) -> str:
    parts = urllib.parse.urlsplit(location.base_url)
    server = re.sub(
        r"[^A-Za-z0-9_.-]+", "_", f"{parts.hostname}_{parts.port or ''}{parts.path}"
    ).strip("_")
    base = os.environ.get(STATE_ENV)
    root = Path(base) if base else Path.home() / ".cache" / "labeltriage"
    return str(root / "labelstudio" / server / f"project-{location.project_id}")


# -- the format ---------------------------------------------------------------------------


class LabelStudioAPI(ProjectFormat):
    """A live Label Studio project (see the module docstring).

    Build it with :meth:`from_url` (``source`` URL + ``storage_options``), or pass a
    :class:`~connectors.storage.ProjectFS` whose ``url`` is the project URL and whose
    ``storage_options`` hold the token.  Options: ``page_size`` (tasks per API page),
    ``timeout`` (seconds per request), ``state_dir`` (where run manifests go),
    ``allow_foreign_images`` (see the module docstring), ``client`` (a ready
    :class:`LabelStudioClient`).
    """

    name: ClassVar[str] = "labelstudio_api"
    tasks: ClassVar[tuple[str, ...]] = ("detection", "classification")

    def __init__(self, project: ProjectFS, **options: Any) -> None:
        location = parse_project_url(project.url)
        client = options.pop("client", None)
        if client is None:
            token = resolve_token({**project.storage_options, **options})
            client = LabelStudioClient(
                location.base_url, token, timeout=float(options.get("timeout", DEFAULT_TIMEOUT_S))
            )
        options.pop("token", None)
        self.client: LabelStudioClient = client
        self.location = location
        self.page_size = int(options.get("page_size", DEFAULT_PAGE_SIZE))
        if not 1 <= self.page_size <= 10_000:
            raise UsageError(f"page_size must be between 1 and 10000, got {self.page_size}")
        self.allow_foreign_images = bool(options.get("allow_foreign_images", False))
        state = ProjectFS(str(options.get("state_dir") or default_state_dir(location)))
        if state.is_local:
            os.makedirs(state.root, exist_ok=True)
        super().__init__(LabelStudioFS(location, self.client.auth_header, state), **options)
        self._config: LabelConfig | None = None
        self._sizes: dict[str, tuple[int, int]] = {}

    @classmethod
    def from_url(
        cls, source: str, storage_options: dict[str, Any] | None = None, **options: Any
    ) -> LabelStudioAPI:
        """The project at ``source`` (``http(s)://HOST:PORT/projects/ID``)."""
        location = parse_project_url(source)
        token = resolve_token(storage_options)
        timeout = float(options.get("timeout", DEFAULT_TIMEOUT_S))
        client = options.pop("client", None) or LabelStudioClient(
            location.base_url, token, timeout=timeout
        )
        bare = _BareProjectFS(location.url, {})
        return cls(bare, client=client, **options)

    @classmethod
    def detect(cls, project: ProjectFS) -> bool:
        return is_project_url(project.url)

    # -- reading ---------------------------------------------------------------------------
    @property
    def config(self) -> LabelConfig:
        if self._config is None:
            body = self.client.project(self.location.project_id)
            self._config = parse_label_config(
                body.get("label_config") or "", where=self.location.url
            )
        return self._config

    def image_url(self, value: str) -> str:
        """The full URL of a task's image field (server paths are joined to the server URL)."""
        if value.startswith("/"):
            return f"{self.location.origin}{value}"
        return value

    def iter_items(self) -> Iterator[Item]:
        config = self.config
        for task in self.client.iter_tasks(self.location.project_id, page_size=self.page_size):
            yield self.task_to_item(task, config)

    def task_to_item(self, task: dict[str, Any], config: LabelConfig | None = None) -> Item:
        """One task (as the API returns it, with ``annotations``) → an :class:`Item`."""
        config = config or self.config
        task_id = str(task.get("id"))
        where = f"{self.location.url}/data?task={task_id}"
        value = (task.get("data") or {}).get(config.image_key)
        if not isinstance(value, str) or not value:
            return Item(
                item_id=task_id,
                uri="",
                error=str(
                    InputError(
                        f"task data has no {config.image_key!r} image", file=where, item=task_id
                    )
                ),
            )
        uri = self.image_url(value)
        if (
            uri.startswith(("http://", "https://"))
            and not uri.startswith(self.location.origin + "/")
            and not self.allow_foreign_images
        ):
            message = (
                f"image {uri} is on another server; the Label Studio token would be sent there "
                "(pass allow_foreign_images=True to read it anyway)"
            )
            return Item(
                item_id=task_id, uri=uri, error=str(InputError(message, file=where, item=task_id))
            )
        meta: dict[str, Any] = {"labelstudio_image": value}
        chosen = _choose_annotation(human_annotations(task))
        try:
            width, height = _image_size_of(task)
            if chosen is None:
                return Item(item_id=task_id, uri=uri, width=width, height=height, meta=meta)
            annotations = [
                a for r in chosen.get("result") or [] if (a := region_to_annotation(r)) is not None
            ]
        except ValueError as exc:
            return Item(
                item_id=task_id,
                uri=uri,
                meta=meta,
                error=str(InputError(str(exc), file=where, item=task_id)),
            )
        meta["labelstudio_annotation_id"] = chosen.get("id")
        lead_time = chosen.get("lead_time")
        return Item(
            item_id=task_id,
            uri=uri,
            width=width,
            height=height,
            status=ItemStatus.LABELED,
            source=AnnotationSource.HUMAN,
            annotations=annotations,
            annotation_seconds=float(lead_time)
            if isinstance(lead_time, (int, float)) and lead_time > 0
            else None,
            meta=meta,
        )

    # -- writing ----------------------------------------------------------------------------
    def write_items(self, items: Iterable[Item], classes: list[str] | None = None) -> None:
        """Import ``items`` as new tasks (their labels as annotations), in batches.

        Item uris must be full URLs that Label Studio can serve (``http(s)://``, or a server
        path such as ``/data/local-files/?d=…``); images are referenced, not uploaded.
        """
        config = self.config
        batch: list[dict[str, Any]] = []
        for item in items:
            if item.error:
                continue
            if "://" not in item.uri and not item.uri.startswith("/"):
                raise UsageError(
                    f"item {item.item_id!r}: uri {item.uri!r} is not a URL Label Studio can serve"
                )
            task: dict[str, Any] = {"data": {config.image_key: item.uri}}
            if item.is_labeled:
                regions = [
                    annotation_to_region(
                        a, config, item.width, item.height, region_id=f"r{i}", meta={}
                    )
                    for i, a in enumerate(item.annotations)
                ]
                for r in regions:
                    r.pop("meta")
                task["annotations"] = [
                    {
                        "result": regions,
                        **(
                            {"lead_time": item.annotation_seconds}
                            if item.annotation_seconds
                            else {}
                        ),
                    }
                ]
            batch.append(task)
            if len(batch) >= self.page_size:
                self._import(batch)
                batch = []
        if batch:
            self._import(batch)

    def _import(self, tasks: list[dict[str, Any]]) -> None:
        self.client.json(
            "POST", f"api/projects/{self.location.project_id}/import", ok=(200, 201), json=tasks
        )

    def write_labels(self, writes: list[LabelWrite]) -> WriteOutcome:
        outcome = WriteOutcome()
        config = self.config
        for w in writes:
            item_id = w.item.item_id
            if w.item.has_human_label:
                outcome.refused[item_id] = "has a human label (as read)"
                continue
            task = self.client.task(item_id)
            if task is None:
                outcome.refused[item_id] = "the task no longer exists in Label Studio"
                continue
            humans = human_annotations(task)
            if humans:
                ids = ", ".join(str(a.get("id")) for a in humans)
                outcome.refused[item_id] = (
                    f"has a human annotation in Label Studio (annotation {ids})"
                )
                continue
            try:
                width, height = self._write_size(w.item, task)
                meta = provenance_meta(w.provenance)
                result = [
                    annotation_to_region(a, config, width, height, region_id=f"lt{i}", meta=meta)
                    for i, a in enumerate(w.annotations)
                ]
            except (ValueError, InputError) as exc:
                outcome.refused[item_id] = f"cannot convert the labels: {exc}"
                continue
            body = {
                "task": int(item_id),
                "result": result,
                "model_version": w.provenance.model_version,
                "score": w.provenance.score,
            }
            answer = self.client.create_prediction(body)
            outcome.records.append(
                WrittenRecord(
                    kind="entry",
                    path=PREDICTIONS_PATH,
                    item_id=item_id,
                    sha256=content_sha256(result, w.provenance.model_version),
                    entry_ids=[str(answer["id"])],
                )
            )
            log.debug(
                "task %s: prediction %s written (run %s)",
                item_id,
                answer["id"],
                w.provenance.run_id,
            )
        return outcome

    def _write_size(self, item: Item, task: dict[str, Any]) -> tuple[int | None, int | None]:
        """The image size for percent boxes: the item's, the task's regions', or the image's header."""
        if item.width and item.height:
            return item.width, item.height
        width, height = _image_size_of(task)
        if width and height:
            return width, height
        if item.item_id in self._sizes:
            return self._sizes[item.item_id]
        value = (task.get("data") or {}).get(self.config.image_key)
        if not isinstance(value, str):
            raise ValueError(f"task data has no {self.config.image_key!r} image")
        url = self.image_url(value)
        if not url.startswith(self.location.origin + "/"):
            raise ValueError(f"image {url} is not on the Label Studio server; its size is unknown")
        try:
            r = self.client.session.get(url, timeout=self.client.timeout)
            r.raise_for_status()
            size = Image.open(io.BytesIO(r.content)).size
        except (requests.RequestException, UnidentifiedImageError, OSError) as exc:
            raise InputError(
                f"cannot read the image size: {exc}", file=url, item=item.item_id
            ) from exc
        self._sizes[item.item_id] = size
        return size

    def remove_written(self, records: list[WrittenRecord]) -> list[str]:
        return [reason for reason in self.remove_written_each(records) if reason]

    def remove_written_each(self, records: list[WrittenRecord]) -> list[str | None]:
        """For each record: ``None`` when its prediction was deleted (or was already gone), else why it was kept."""
        outcome: list[str | None] = []
        for record in records:
            if record.kind != "entry" or record.path != PREDICTIONS_PATH:
                outcome.append(
                    f"task {record.item_id}: record {record.kind}:{record.path} is not a Label Studio prediction"
                )
                continue
            kept: list[str] = []
            for pid in record.entry_ids:
                current = self.client.prediction(pid)
                if current is None:
                    continue
                if str(current.get("task")) != record.item_id:
                    kept.append(
                        f"prediction {pid} belongs to task {current.get('task')}, not {record.item_id}"
                    )
                    continue
                sha = content_sha256(current.get("result") or [], current.get("model_version"))
                if record.sha256 is not None and sha != record.sha256:
                    kept.append(
                        f"prediction {pid} of task {record.item_id} changed since it was written"
                    )
                    continue
                self.client.delete_prediction(pid)
            outcome.append("; ".join(kept) if kept else None)
        return outcome

    def records_of_run(self, run_id: str) -> list[WrittenRecord]:
        """Records of every prediction whose region provenance names ``run_id``.

        Predictions with an empty result carry no provenance; the run manifest's records
        cover them.
        """
        records = []
        for p in self.client.predictions(self.location.project_id):
            prov = written_provenance(p)
            if prov is not None and prov.get("run_id") == run_id:
                records.append(
                    WrittenRecord(
                        kind="entry",
                        path=PREDICTIONS_PATH,
                        item_id=str(p.get("task")),
                        sha256=content_sha256(p.get("result") or [], p.get("model_version")),
                        entry_ids=[str(p["id"])],
                    )
                )
        return records


class _BareProjectFS(ProjectFS):
    """A ProjectFS that only carries a URL (no filesystem is opened for it)."""

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        self.url = url
        self.storage_options = dict(storage_options)
        self.root = url
        self.is_local = False


def _choose_annotation(annotations: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The annotation that stands for the task's label: a ground-truth one, else the latest."""
    if not annotations:
        return None
    truth = [a for a in annotations if a.get("ground_truth")]
    pool = truth or annotations
    return max(
        pool,
        key=lambda a: (
            str(a.get("updated_at") or a.get("created_at") or ""),
            int(a.get("id") or 0),
        ),
    )


def _image_size_of(task: dict[str, Any]) -> tuple[int | None, int | None]:
    """``(width, height)`` from any region of the task's annotations or predictions."""
    for group in ("annotations", "predictions"):
        for entry in task.get(group) or []:
            for region in (entry.get("result") or []) if isinstance(entry, dict) else []:
                if (
                    isinstance(region, dict)
                    and region.get("original_width")
                    and region.get("original_height")
                ):
                    return int(region["original_width"]), int(region["original_height"])
    return None, None


# -- predictions already in Label Studio ------------------------------------------------------------


class LabelStudioPredictions(PredictionSource):
    """Predictions stored in a Label Studio project (e.g. from an ML backend or an import).

    ``model_version`` picks one model's predictions; without it, the most recent
    prediction per task is used.  Predictions that labeltriage itself wrote are skipped.
    The whole set is read once (page by page) on first use and kept as
    :class:`~connectors.model.Prediction` objects: one per task.
    """

    def __init__(self, api: LabelStudioAPI, *, model_version: str | None = None) -> None:
        self.api = api
        self.model_version = model_version
        self._index: dict[str, Prediction] | None = None

    @classmethod
    def from_url(
        cls, source: str, storage_options: dict[str, Any] | None = None, **options: Any
    ) -> LabelStudioPredictions:
        model_version = options.pop("model_version", None)
        return cls(
            LabelStudioAPI.from_url(source, storage_options, **options), model_version=model_version
        )

    def _load(self) -> dict[str, Prediction]:
        if self._index is None:
            index: dict[str, Prediction] = {}
            for task in self.api.client.iter_tasks(
                self.api.location.project_id, page_size=self.api.page_size
            ):
                prediction = self.task_prediction(task)
                if prediction is not None:
                    index[prediction.item_id] = prediction
            self._index = index
        return self._index

    def task_prediction(self, task: dict[str, Any]) -> Prediction | None:
        """The chosen prediction of one task as a :class:`Prediction` (boxes in pixel ``xyxy``)."""
        task_id = str(task.get("id"))
        candidates = [
            p
            for p in task.get("predictions") or []
            if isinstance(p, dict)
            and written_provenance(p) is None
            and (self.model_version is None or p.get("model_version") == self.model_version)
        ]
        if not candidates:
            return None
        chosen = max(
            candidates, key=lambda p: (str(p.get("created_at") or ""), int(p.get("id") or 0))
        )
        source = f"{self.api.location.url}/data?task={task_id}&prediction={chosen.get('id')}"
        score = chosen.get("score")
        try:
            annotations = [
                a
                for r in chosen.get("result") or []
                if (
                    a := region_to_annotation(
                        r, default_score=float(score) if score is not None else None
                    )
                )
                is not None
            ]
        except ValueError as exc:
            return Prediction(
                item_id=task_id,
                source=source,
                error=str(InputError(str(exc), file=source, item=task_id)),
            )
        probs = None
        if annotations and all(a.box is None for a in annotations):
            probs = {a.label: float(a.score if a.score is not None else 1.0) for a in annotations}
        return Prediction(
            item_id=task_id,
            annotations=annotations,
            probs=probs,
            model_version=chosen.get("model_version") or None,
            source=source,
        )

    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        return self._load().get(item_id)

    def __iter__(self) -> Iterator[Prediction]:
        yield from self._load().values()


__all__ = [
    "PREDICTIONS_PATH",
    "LabelConfig",
    "LabelStudioAPI",
    "LabelStudioClient",
    "LabelStudioFS",
    "LabelStudioPredictions",
    "ProjectLocation",
    "parse_label_config",
    "parse_project_url",
    "percent_to_xyxy",
]

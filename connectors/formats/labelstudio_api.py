"""A live Label Studio project, read and written through its REST API (``label-studio-sdk``).

Source: the project's URL, ``http://HOST:PORT/projects/ID`` (``/api/projects/ID`` and a
trailing ``/data`` or query string are accepted too).  The API token comes from
``storage_options["token"]`` or ``$LABEL_STUDIO_TOKEN`` (legacy token or personal access
token; :mod:`connectors.labelstudio.client`).

Reading (:meth:`LabelStudioAPI.iter_items`) pages through the project's tasks; one page
is in memory at a time.

* ``item_id`` is ``str(task id)``; ``uri`` is the full URL of the task's image on the
  server.  The image field is the ``value="$key"`` of the label config's ``<Image>``.
  A reference the image-source policy refuses (another host, ``file://``, a server path
  that is not an image path such as ``/data/../api/users``) makes an error item, so the
  token never leaves for it (``allow_foreign_images=True`` reads other hosts, and then
  sends them the token: only for hosts you trust).
* the label is read by :func:`connectors.labelstudio.regions.read_task_label`, the
  converter the export-file format uses too: ``labeled`` (human) from the ground-truth or
  latest non-cancelled annotation, ``auto_labeled`` from a prediction labeltriage stored,
  else ``unlabeled``; a region that cannot be converted makes an error item naming the
  task and the region.
* ``meta``: ``labelstudio_image`` (the task's image reference), ``task_url`` (the task in
  the labeling UI), ``labelstudio_annotation_id``, and ``auto_label`` for auto-labeled tasks.

Writing (:meth:`LabelStudioAPI.write_labels`) creates Label Studio *predictions*, never
annotations, with ``model_version`` ``labeltriage-<version>/<run_id>`` and the provenance
in each region's ``meta`` (:mod:`connectors.labelstudio.provenance`).  Just before each
write the task is fetched again and refused when it has a human annotation or already
holds a labeltriage prediction (a second run, or ``serve``'s answer stored by Label Studio,
is never stacked on the first), and every region is read back through the converter: what
is written reads back as the same label, or it is not written.  An empty label ("nothing
to mark here") is a prediction with an empty ``result``, marked by its ``model_version``.
:meth:`LabelStudioAPI.remove_written` deletes exactly the predictions it is given and keeps
one whose content changed since (checksum of its regions without ``meta`` and its model
version) or that moved to another task.

Run manifests: Label Studio has no place for files, so the manifests that
:mod:`connectors.writeback` keeps under ``.labeltriage/`` live in a local *state folder*
(option ``state_dir``, else ``$LABELTRIAGE_STATE_DIR/labelstudio/<server>/<project>``, else
``~/.cache/labeltriage/labelstudio/<server>/<project>``).  The project itself is the
record of what a run stored (every prediction names its run), so a manifest missing from
this machine's state folder is rebuilt from the project (:meth:`LabelStudioAPI.restore_manifest`):
``labeltriage rollback RUN_ID`` works from any machine.

Data Manager columns (option ``data_columns=True``): :meth:`LabelStudioAPI.publish_difficulty`
writes ``lt_tier`` and ``lt_difficulty`` into each scored task's ``data``, so a manager can
sort and filter by them in Label Studio.

Image reads: the format's ``project`` (:class:`LabelStudioFS`) carries the
``Authorization`` header in its HTTP storage options, so an image reader that opens an
item uri with the project's storage options gets through; the policy above keeps every
such uri on the server's image paths.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import urllib.parse
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, UnidentifiedImageError

from connectors.errors import InputError, UsageError
from connectors.formats.base import (
    LabelWrite,
    PredictionSource,
    ProjectFormat,
    WriteOutcome,
    WrittenRecord,
)
from connectors.labelstudio.client import (
    DEFAULT_PAGE_SIZE,
    DEFAULT_TIMEOUT_S,
    ImageSourceRefused,
    LabelStudioClient,
    ProjectLocation,
    image_url,
    is_project_url,
    parse_project_url,
    resolve_token,
)
from connectors.labelstudio.config import LabelConfig, parse_label_config
from connectors.labelstudio.provenance import (
    content_sha256,
    content_unchanged,
    is_labeltriage,
    model_version_for,
    provenance_meta,
    provenance_of,
)
from connectors.labelstudio.regions import (
    annotation_to_region,
    human_annotations,
    image_size_of,
    labeltriage_predictions,
    latest,
    read_regions,
    read_task_label,
    region_to_annotation,
)
from connectors.model import Annotation, Item, Prediction
from connectors.storage import ProjectFS
from connectors.writeback import RunManifest, manifest_path, save_manifest

log = logging.getLogger(__name__)

STATE_ENV = "LABELTRIAGE_STATE_DIR"
PREDICTIONS_PATH = "api/predictions"
"""``WrittenRecord.path`` of a prediction written to Label Studio (ids in ``entry_ids``)."""
DATA_COLUMNS = ("lt_tier", "lt_difficulty")


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


class _BareProjectFS(ProjectFS):
    """A ProjectFS that only carries a URL (no filesystem is opened for it)."""

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        self.url = url
        self.storage_options = dict(storage_options)
        self.root = url
        self.is_local = False


def default_state_dir(location: ProjectLocation) -> str:
    parts = urllib.parse.urlsplit(location.base_url)
    server = re.sub(
        r"[^A-Za-z0-9_.-]+", "_", f"{parts.hostname}_{parts.port or ''}{parts.path}"
    ).strip("_")
    base = os.environ.get(STATE_ENV)
    root = Path(base) if base else Path.home() / ".cache" / "labeltriage"
    return str(root / "labelstudio" / server / f"project-{location.project_id}")


def _record(item_id: str, prediction: dict[str, Any], sha256: str | None) -> WrittenRecord:
    return WrittenRecord(
        kind="entry",
        path=PREDICTIONS_PATH,
        item_id=item_id,
        sha256=sha256,
        entry_ids=[str(prediction["id"])],
    )


# -- the format ---------------------------------------------------------------------------


class LabelStudioAPI(ProjectFormat):
    """A live Label Studio project (see the module docstring).

    Build it with :meth:`from_url` (``source`` URL + ``storage_options``), or pass a
    :class:`~connectors.storage.ProjectFS` whose ``url`` is the project URL and whose
    ``storage_options`` hold the token.  Options: ``page_size`` (tasks per API page),
    ``timeout`` (seconds per request), ``state_dir`` (where run manifests go),
    ``allow_foreign_images``, ``data_columns`` (see the module docstring), ``client`` (a
    ready :class:`LabelStudioClient`).
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
        self.data_columns = bool(options.get("data_columns", False))
        state = ProjectFS(str(options.get("state_dir") or default_state_dir(location)))
        if state.is_local:
            os.makedirs(state.root, exist_ok=True)
        super().__init__(LabelStudioFS(location, self.client.auth_header(), state), **options)
        self._config: LabelConfig | None = None
        self._sizes: dict[str, tuple[int, int]] = {}

    @classmethod
    def from_url(
        cls, source: str, storage_options: dict[str, Any] | None = None, **options: Any
    ) -> LabelStudioAPI:
        """The project at ``source`` (``http(s)://HOST:PORT/projects/ID``)."""
        location = parse_project_url(source)
        if options.get("client") is None:
            token = resolve_token(storage_options)
            timeout = float(options.get("timeout", DEFAULT_TIMEOUT_S))
            options["client"] = LabelStudioClient(location.base_url, token, timeout=timeout)
        return cls(_BareProjectFS(location.url, {}), **options)

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
        """The full URL of a task's image reference, if the image-source policy allows it."""
        return image_url(value, self.location, allow_foreign=self.allow_foreign_images)

    def task_url(self, item_id: str) -> str:
        """The task in Label Studio's labeling UI."""
        return self.location.task_url(item_id)

    def iter_items(self) -> Iterator[Item]:
        config = self.config
        for task in self.client.iter_tasks(self.location.project_id, page_size=self.page_size):
            yield self.task_to_item(task, config)

    def task_to_item(self, task: dict[str, Any], config: LabelConfig | None = None) -> Item:
        """One task (as the API returns it, with ``annotations``) → an :class:`Item`."""
        config = config or self.config
        task_id = str(task.get("id"))
        where = self.location.task_url(task_id)
        meta: dict[str, Any] = {"task_url": where}
        value = (task.get("data") or {}).get(config.image_key)
        if not isinstance(value, str) or not value:
            message = f"task data has no {config.image_key!r} image"
            missing = InputError(message, file=where, item=task_id)
            return Item(item_id=task_id, uri="", meta=meta, error=str(missing))
        meta["labelstudio_image"] = value
        try:
            uri = self.image_url(value)
        except ImageSourceRefused as exc:
            refused = InputError(exc.message, file=where, item=task_id)
            return Item(item_id=task_id, uri=value, meta=meta, error=str(refused))
        label = read_task_label(task)
        if label.annotation_id is not None:
            meta["labelstudio_annotation_id"] = label.annotation_id
        if label.auto_label is not None:
            meta["auto_label"] = label.auto_label
        error: str | None = None
        if label.problems:
            error = str(InputError("; ".join(label.problems), file=where, item=task_id))
            log.warning("%s", error)
        return label.to_item(task_id, uri, meta, error)

    # -- writing a whole project -------------------------------------------------------------
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
                try:
                    regions = [
                        annotation_to_region(
                            a, config.names, item.width, item.height, region_id=f"r{i}"
                        )
                        for i, a in enumerate(item.annotations)
                    ]
                except ValueError as exc:
                    raise UsageError(f"item {item.item_id!r}: {exc}") from exc
                annotation: dict[str, Any] = {"result": regions}
                if item.annotation_seconds:
                    annotation["lead_time"] = item.annotation_seconds
                task["annotations"] = [annotation]
            batch.append(task)
            if len(batch) >= self.page_size:
                self.client.import_tasks(self.location.project_id, batch)
                batch = []
        if batch:
            self.client.import_tasks(self.location.project_id, batch)

    # -- write-back --------------------------------------------------------------------------
    def write_labels(self, writes: list[LabelWrite]) -> WriteOutcome:
        outcome = WriteOutcome()
        for w in writes:
            item_id = w.item.item_id
            refused = self._refusal(w)
            if refused is None:
                try:
                    refused = self._write_one(w, outcome)
                except (ValueError, InputError) as exc:
                    refused = f"cannot convert the labels: {exc}"
            if refused is not None:
                outcome.refused[item_id] = refused
                log.info("%s: not writing task %s: %s", self.location.url, item_id, refused)
        return outcome

    def _refusal(self, w: LabelWrite) -> str | None:
        """Why ``w`` must not be written, as far as the item read says; ``None`` if it may."""
        if w.item.has_human_label:
            return "has a human label (as read)"
        if not w.item.item_id.isdigit():
            return f"{w.item.item_id!r} is not a Label Studio task id"
        return None

    def _write_one(self, w: LabelWrite, outcome: WriteOutcome) -> str | None:
        """Re-check the task as it is now, then write; the refusal reason, or ``None``."""
        item_id = w.item.item_id
        task = self.client.task(item_id)
        if task is None:
            return "the task no longer exists in Label Studio"
        humans = human_annotations(task)
        if humans:
            ids = ", ".join(str(a.get("id")) for a in humans)
            return f"has a human annotation in Label Studio (annotation {ids})"
        ours = latest(labeltriage_predictions(task))
        if ours is not None:
            run = (provenance_of(ours) or {}).get("run_id")
            return f"already holds labeltriage prediction {ours.get('id')} (run {run})"
        width, height = self._write_size(w.item, task)
        regions = [
            annotation_to_region(a, self.config.names, width, height, region_id=f"lt{i}")
            for i, a in enumerate(w.annotations)
        ]
        for region, wanted in zip(regions, w.annotations, strict=True):
            back = region_to_annotation(region)
            if back is None or not _same(back, wanted):
                return f"label {wanted.label!r} {wanted.box} would read back as {back}"
        model_version = model_version_for(w.provenance.run_id)
        sha = content_sha256(regions, model_version)
        meta = provenance_meta(w.provenance, via="run", sha256=sha)
        for region in regions:
            region["meta"] = meta
        created = self.client.create_prediction(
            task=int(item_id), result=regions, model_version=model_version, score=w.provenance.score
        )
        outcome.records.append(_record(item_id, created, sha))
        log.debug(
            "task %s: prediction %s written (run %s)", item_id, created["id"], w.provenance.run_id
        )
        return None

    def _write_size(self, item: Item, task: dict[str, Any]) -> tuple[int | None, int | None]:
        """The image size for percent boxes: the item's, the task's regions', or the image's header."""
        if item.width and item.height:
            return item.width, item.height
        width, height = image_size_of(task)
        if width and height:
            return width, height
        if item.item_id in self._sizes:
            return self._sizes[item.item_id]
        value = (task.get("data") or {}).get(self.config.image_key)
        if not isinstance(value, str):
            raise ValueError(f"task data has no {self.config.image_key!r} image")
        size = self.image_size(value, item=item.item_id)
        self._sizes[item.item_id] = size
        return size

    def image_size(self, value: str, *, item: str | None = None) -> tuple[int, int]:
        """``(width, height)`` of a task's image, read from the server under the image policy."""
        url = self.image_url(value)
        data = self.client.fetch(url)
        try:
            size = Image.open(io.BytesIO(data)).size
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"cannot read the image size: {exc}", file=url, item=item) from exc
        return int(size[0]), int(size[1])

    # -- undo ------------------------------------------------------------------------------
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
                if not content_unchanged(
                    record.sha256, current.get("result") or [], current.get("model_version")
                ):
                    kept.append(
                        f"prediction {pid} of task {record.item_id} changed since it was written"
                    )
                    continue
                self.client.delete_prediction(pid)
            outcome.append("; ".join(kept) if kept else None)
        return outcome

    def records_of_run(self, run_id: str) -> list[WrittenRecord]:
        """Records of every prediction in the project that names run ``run_id``.

        That is what the run wrote and what ``serve`` answered from its calibration and Label
        Studio stored; each record's checksum is the one written into the prediction's
        ``meta`` (the current content's for an empty prediction, which has no region).
        """
        records = []
        for p in self.client.predictions(self.location.project_id):
            provenance = provenance_of(p)
            if provenance is None or provenance.get("run_id") != run_id:
                continue
            sha = provenance.get("sha256")
            if not isinstance(sha, str):
                sha = content_sha256(p.get("result") or [], p.get("model_version"))
            records.append(_record(str(p.get("task")), p, sha))
        return sorted(records, key=lambda r: int(r.item_id) if r.item_id.isdigit() else 0)

    def restore_manifest(self, run_id: str) -> bool:
        """Rebuild the manifest of ``run_id`` from the project when this state folder lacks it.

        Returns ``True`` when a manifest was rebuilt and saved, ``False`` when one was
        already here or the project holds nothing of that run.
        """
        if self.project.exists(manifest_path(run_id)):
            return False
        records = self.records_of_run(run_id)
        if not records:
            return False
        manifest = RunManifest(
            run_id=run_id,
            created=datetime.now(timezone.utc),
            format=self.name,
            stage="committed",
            records=records,
            meta={"rebuilt_from": self.location.url},
        )
        save_manifest(self.project, manifest)
        log.info(
            "run %s: manifest rebuilt from %d predictions in %s",
            run_id,
            len(records),
            self.location.url,
        )
        return True

    # -- Data Manager columns ----------------------------------------------------------------
    def publish_difficulty(self, rows: Iterable[tuple[str, str | None, float | None]]) -> int:
        """Write ``lt_tier``/``lt_difficulty`` into the ``data`` of each task ``(item_id, tier, score)``.

        Only with the option ``data_columns``; a task whose values are already there is
        not written again, one that no longer exists is skipped.  Returns the number of
        tasks updated.
        """
        if not self.data_columns:
            return 0
        updated = 0
        for item_id, tier, score in rows:
            if not item_id.isdigit():
                continue
            task = self.client.task(item_id)
            if task is None or not isinstance(task.get("data"), dict):
                continue
            difficulty = (
                None if score is None or not math.isfinite(score) else round(float(score), 4)
            )
            values = {"lt_tier": tier, "lt_difficulty": difficulty}
            data = task["data"]
            if all(data.get(k) == v for k, v in values.items()):
                continue
            self.client.update_task_data(item_id, {**data, **values})
            updated += 1
        log.info("%s: lt_tier/lt_difficulty written to %d tasks", self.location.url, updated)
        return updated


def _same(a: Annotation, b: Annotation) -> bool:
    if a.label != b.label or (a.box is None) != (b.box is None):
        return False
    if a.box is None or b.box is None:
        return True
    return all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in zip(a.box, b.box, strict=True))


# -- predictions already in Label Studio ------------------------------------------------------------


class LabelStudioPredictions(PredictionSource):
    """Predictions stored in a Label Studio project (from an ML backend or an import).

    ``model_version`` picks one model's predictions; without it, the most recent
    prediction per task is used.  Predictions labeltriage stored (its write-back, or
    ``serve``'s answers that Label Studio kept) are never read: they are labeltriage's own
    output, not the platform's.  The whole set is read once (page by page) on first use
    and kept as :class:`~connectors.model.Prediction` objects: one per task.
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
            and not is_labeltriage(p)
            and (self.model_version is None or p.get("model_version") == self.model_version)
        ]
        chosen = latest(candidates)
        if chosen is None:
            return None
        source = f"{self.api.location.task_url(task_id)}&prediction={chosen.get('id')}"
        score = chosen.get("score")
        annotations, problems = read_regions(
            chosen.get("result") or [],
            f"prediction {chosen.get('id')}",
            default_score=float(score) if isinstance(score, int | float) else None,
        )
        if problems:
            error = InputError("; ".join(problems), file=source, item=task_id)
            return Prediction(item_id=task_id, source=source, error=str(error))
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
    "DATA_COLUMNS",
    "PREDICTIONS_PATH",
    "LabelStudioAPI",
    "LabelStudioFS",
    "LabelStudioPredictions",
]

"""Label Studio JSON export: a list of tasks with ``data``, ``annotations``, ``predictions``.

Regions and the task's label are read by :mod:`connectors.labelstudio.regions`, the one
converter the live project (:mod:`connectors.formats.labelstudio_api`) uses too: percent
boxes become pixel ``xyxy``, a rectangle rotated by a multiple of 90° converts exactly and
any other angle is refused, a box overshooting the image by at most 1 % is clipped.

One task is one item:

* ``item_id`` = ``str(task["id"])``;
* ``uri`` from ``data.image`` (the ``image_key`` option): ``/data/local-files/?d=PATH``
  → ``PATH`` (minus the ``local_files_prefix`` option), ``/data/upload/…`` →
  ``upload/…``, a relative path as is; other storage URLs (``s3://``, …) are kept; a
  ``file://`` image, and an ``http(s)://`` image on a host not listed in the
  ``allow_image_hosts`` option, make an error item (:func:`uri_from_task`);
* ``status`` is ``labeled`` (source human) when the task has an annotation that was not
  cancelled (``was_cancelled``); the ``ground_truth`` one, else the latest, gives the
  annotations and ``annotation_seconds`` (its ``lead_time``);
* a task with no such annotation but with a prediction labeltriage stored
  (:mod:`connectors.labelstudio.provenance`) is ``auto_labeled`` (source auto);
* image size comes from the regions' ``original_width``/``original_height``.

Write-back (:meth:`LabelStudioFormat.write_labels`) adds a ``predictions`` entry —
``model_version`` ``labeltriage-<version>/<run_id>``, ``score``, regions each with
``score``, and ``labeltriage`` = ``{run_id, tier, model_version, entry_id, …}`` — to tasks
that have no annotation and no labeltriage prediction at write time, never touching
``annotations``; the export is re-read at write time and rewritten atomically.
Percent boxes need the image size: the task's regions give it, else the item's
``width``/``height``, else the image's header is read (only the header, through the
project's storage; relative and ``/data/local-files/`` images).  A box is refused, with
the reason, only when none of these gives a size, or when it would not read back as the
same box.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from connectors.errors import InputError, UsageError
from connectors.formats._entries import entry_record
from connectors.formats._filebased import image_size
from connectors.formats._jsonfile import (
    JsonFileFormat,
    dump_json,
    entries_sha256,
    find_json,
    load_json,
    problems_error,
    rewrite_json,
)
from connectors.formats.base import (
    FORMATS,
    PREDICTION_FORMATS,
    LabelWrite,
    PredictionSource,
    ProjectFormat,
    WriteOutcome,
    WrittenRecord,
)
from connectors.labelstudio.client import ImageSourceRefused
from connectors.labelstudio.provenance import META_KEY, model_version_for, provenance_of
from connectors.labelstudio.regions import (
    RegionNames,
    annotation_to_region,
    human_annotations,
    image_size_of,
    labeltriage_predictions,
    latest,
    read_regions,
    read_task_label,
    region_to_annotation,
)
from connectors.model import Item, ItemStatus, Prediction
from connectors.storage import ProjectFS, url_allowed

log = logging.getLogger(__name__)

PROVENANCE_KEY = META_KEY
DEFAULT_FILE = "export.json"
LOCAL_FILES = "/data/local-files/"
UPLOAD = "/data/upload/"


# -- conversions at the edge ---------------------------------------------------------------


def uri_from_task(
    value: str, *, local_files_prefix: str = "", allowed_hosts: tuple[str, ...] = ()
) -> str:
    """A task's image reference as an item ``uri`` (relative to the project, or a full URL).

    Raises :class:`ImageSourceRefused` (an :class:`InputError`) for a ``file://`` or
    ``http(s)://`` image that ``allowed_hosts`` (an ``allow_image_hosts`` list: hosts,
    ``host:port``, URL prefixes or ``*``, see :func:`connectors.storage.url_allowed`) does
    not admit; other storage URLs are left to the project's storage to judge.
    """
    scheme = urlsplit(value).scheme.lower()
    if scheme in ("file", "http", "https") and not url_allowed(value, allowed_hosts):
        where = (
            "a file:// image outside the folders"
            if scheme == "file"
            else f"on host {urlsplit(value).netloc!r}, not one"
        )
        raise ImageSourceRefused(
            f"image {value!r} is {where} the project allows (option allow_image_hosts)",
            file=value,
        )
    if value.startswith(LOCAL_FILES):
        d = parse_qs(urlsplit(value).query).get("d", [""])[0]
        prefix = local_files_prefix.strip("/")
        if prefix and (d == prefix or d.startswith(prefix + "/")):
            d = d[len(prefix) :].lstrip("/")
        return d
    if value.startswith(UPLOAD):
        return value[len("/data/") :]
    return value


def uri_to_task(uri: str, *, local_files_prefix: str = "") -> str:
    """Inverse of :func:`uri_from_task`: full URLs as is, project paths as local files."""
    if "://" in uri:
        return uri
    if uri.startswith("upload/"):
        return "/data/" + uri
    prefix = local_files_prefix.strip("/")
    path = f"{prefix}/{uri}" if prefix else uri
    return f"{LOCAL_FILES}?d={quote(path)}"


@FORMATS.register("labelstudio")
class LabelStudioFormat(JsonFileFormat):
    """A Label Studio JSON export file (see the module docstring).

    Options: ``file`` (the export, relative to the root), ``image_key`` (default
    ``image``), ``local_files_prefix`` (stripped from ``/data/local-files/?d=`` paths),
    ``allow_image_hosts`` (hosts whose ``http(s)://`` images are read),
    ``from_name``/``choice_from_name``/``to_name`` for written regions (default: as found
    in the file, else ``label``/``choice``/``image``).
    """

    name = "labelstudio"
    tasks = ("detection", "classification")
    title = "Label Studio"
    missing = "no Label Studio export (*.json) found in the project root"
    detect_priority = 20
    looked_for = "a Label Studio JSON export"
    opens_with = b"["
    json_indent = 1

    def __init__(self, project: ProjectFS, **options: Any) -> None:
        super().__init__(project, **options)
        self.image_key = str(options.get("image_key") or "image")
        self.local_files_prefix = str(options.get("local_files_prefix") or "")
        hosts = options.get("allow_image_hosts") or ()
        self.image_hosts = (hosts,) if isinstance(hosts, str) else tuple(str(h) for h in hosts)

    @staticmethod
    def find_file(project: ProjectFS) -> str | None:
        return find_json(project, preferred=(), folders=(".",), what="Label Studio export")

    @classmethod
    def looks_like(cls, head: str) -> bool:
        return head.startswith("[") and (
            '"data"' in head or head.replace(" ", "").replace("\n", "") == "[]"
        )

    def load_tasks(self) -> tuple[list[Any], bytes]:
        data, raw = load_json(self.project, self.file)
        if not isinstance(data, list):
            raise InputError(
                f"expected a Label Studio export (a JSON list of tasks), got a JSON {type(data).__name__}",
                file=self.url,
            )
        return data, raw

    # -- reading -------------------------------------------------------------------------
    def iter_items(self) -> Iterator[Item]:
        tasks, _ = self.load_tasks()
        seen: set[str] = set()
        for pos, task in enumerate(tasks):
            item = self.task_to_item(task, pos)
            if item.item_id in seen and item.error is None:
                item = self.invalid_item(
                    item.item_id, item.uri, f"duplicate task id {item.item_id}", item.status
                )
            seen.add(item.item_id)
            yield item

    def task_to_item(self, task: Any, pos: int) -> Item:
        """One task as an :class:`Item` (``error`` set when the task is malformed)."""
        if not isinstance(task, dict) or "id" not in task or not isinstance(task.get("data"), dict):
            return self.invalid_item(f"task:{pos}", "", f"task {pos} needs 'id' and 'data'")
        item_id = str(task["id"])
        data = task["data"]
        ref = data.get(self.image_key)
        if not isinstance(ref, str):
            strings = [v for v in data.values() if isinstance(v, str)]
            ref = strings[0] if len(strings) == 1 else None
        label = read_task_label(task)
        if ref is None:
            return self.invalid_item(
                item_id, "", f"data has no image reference {self.image_key!r}", label.status
            )
        try:
            allowed = self.image_hosts + tuple(getattr(self.project, "allow_image_hosts", ()))
            uri = uri_from_task(
                ref, local_files_prefix=self.local_files_prefix, allowed_hosts=allowed
            )
            if "://" not in uri:
                self.project.resolve(uri, item=item_id)
        except ImageSourceRefused as exc:
            return self.invalid_item(item_id, ref, exc.message, label.status)
        except InputError as exc:
            return self.invalid_item(item_id, ref, f"image {ref!r}: {exc.message}", label.status)
        meta: dict[str, Any] = dict(task["meta"]) if isinstance(task.get("meta"), dict) else {}
        if label.auto_label is not None:
            meta["auto_label"] = label.auto_label
        return label.to_item(item_id, uri, meta, self.item_error(label.problems, item_id, meta))

    # -- writing a whole project ---------------------------------------------------------
    def _names(self, tasks: list[Any] | None = None) -> RegionNames:
        found: dict[str, str] = {}
        for task in tasks or []:
            for group in ("annotations", "predictions"):
                for entry in (task.get(group) if isinstance(task, dict) else None) or []:
                    for region in (entry.get("result") if isinstance(entry, dict) else None) or []:
                        if isinstance(region, dict):
                            key = (
                                "rect"
                                if region.get("type") == "rectanglelabels"
                                else "choice"
                                if region.get("type") == "choices"
                                else None
                            )
                            if key and key not in found:
                                found[key] = str(region.get("from_name"))
                                found.setdefault("to", str(region.get("to_name")))
            if len(found) == 3:
                break
        return RegionNames(
            boxes_from=str(self.options.get("from_name") or found.get("rect") or "label"),
            choices_from=str(
                self.options.get("choice_from_name") or found.get("choice") or "choice"
            ),
            to_name=str(self.options.get("to_name") or found.get("to") or "image"),
        )

    def write_items(self, items: Iterable[Item], classes: list[str] | None = None) -> None:
        """Write ``items`` as a Label Studio export (``file``, default ``export.json``).

        Human labels become ``annotations`` (with ``lead_time``), auto-labels become
        ``predictions`` with their provenance, ``item.meta`` becomes the task ``meta``.
        Task ids are the item ids when those are integers, else ``1..N``.  Items with
        ``error`` are skipped (logged).
        """
        rel = self._file or DEFAULT_FILE
        names = self._names()
        tasks: list[dict[str, Any]] = []
        for n, item in enumerate(items, start=1):
            if item.error is not None:
                log.warning("not writing item %r to Label Studio: %s", item.item_id, item.error)
                continue
            if classes is not None:
                unknown = sorted({a.label for a in item.annotations} - set(classes))
                if unknown:
                    raise UsageError(
                        f"item {item.item_id!r}: labels {unknown} are not in the given classes {classes}"
                    )
            task_id: int | str = int(item.item_id) if item.item_id.isdigit() else n
            meta = {k: v for k, v in item.meta.items() if k not in ("auto_label", "error_file")}
            task: dict[str, Any] = {
                "id": task_id,
                "data": {
                    self.image_key: uri_to_task(
                        item.uri, local_files_prefix=self.local_files_prefix
                    )
                },
                "annotations": [],
                "predictions": [],
            }
            if meta:
                task["meta"] = meta
            try:
                result = [
                    annotation_to_region(a, names, item.width, item.height, region_id=f"r{i}")
                    for i, a in enumerate(item.annotations)
                ]
            except ValueError as exc:
                raise UsageError(f"item {item.item_id!r}: {exc}") from exc
            if item.status is ItemStatus.AUTO_LABELED:
                prov = dict((item.meta.get("auto_label") or {}).get("provenance") or {})
                task["predictions"].append(
                    {
                        "model_version": prov.get("model_version"),
                        "score": prov.get("score"),
                        "result": result,
                        PROVENANCE_KEY: prov,
                    }
                )
            elif item.is_labeled:
                ann: dict[str, Any] = {
                    "id": n,
                    "result": result,
                    "was_cancelled": False,
                    "ground_truth": False,
                }
                if item.annotation_seconds is not None:
                    ann["lead_time"] = item.annotation_seconds
                task["annotations"].append(ann)
            tasks.append(task)
        self.project.write_bytes(rel, dump_json(tasks, indent=1))
        self._file = rel
        log.info("wrote %d tasks to %s", len(tasks), self.project.url_of(rel))

    # -- write-back ----------------------------------------------------------------------
    def write_labels(self, writes: list[LabelWrite]) -> WriteOutcome:
        """Add a ``predictions`` entry to each task with no annotation *at write time*."""
        rel = self.file
        sizes: dict[str, tuple[int, int]] = {}  # header reads, kept across re-tries

        def change(tasks: Any) -> tuple[bool, WriteOutcome]:
            if not isinstance(tasks, list):
                raise InputError(
                    "expected a Label Studio export (a JSON list of tasks)", file=self.url
                )
            outcome = WriteOutcome()
            by_id = {str(t["id"]): t for t in tasks if isinstance(t, dict) and "id" in t}
            names = self._names(tasks)
            for w in writes:
                item_id = w.item.item_id
                task = by_id.get(item_id)
                if task is None:
                    outcome.refused[item_id] = f"no task with id {item_id} in {self.url}"
                    continue
                if task.get("annotations"):
                    live = human_annotations(task)
                    outcome.refused[item_id] = (
                        f"has a human annotation ({len(live)}) at write time"
                        if live
                        else "has annotations (cancelled ones) at write time"
                    )
                    continue
                ours = labeltriage_predictions(task)
                if ours:
                    run = (provenance_of(ours[-1]) or {}).get("run_id")
                    outcome.refused[item_id] = f"already auto-labeled by run {run}"
                    continue
                width, height = image_size_of(task)
                width, height = width or w.item.width, height or w.item.height
                if not (width and height) and any(a.box is not None for a in w.annotations):
                    try:
                        width, height = self._header_size(task, w.item, sizes)
                    except InputError as exc:
                        outcome.refused[item_id] = f"image size unknown: {exc}"
                        continue
                try:
                    result = [
                        annotation_to_region(a, names, width, height, region_id=f"lt{i}")
                        for i, a in enumerate(w.annotations)
                    ]
                    for region in result:  # what is written must read back as written
                        region_to_annotation(region)
                except ValueError as exc:
                    outcome.refused[item_id] = str(exc)
                    continue
                entry_id = f"{w.provenance.run_id}:{item_id}"
                prov: dict[str, Any] = {
                    "run_id": w.provenance.run_id,
                    "tier": w.provenance.tier,
                    "model_version": w.provenance.model_version,
                    "score": w.provenance.score,
                    "entry_id": entry_id,
                }
                if w.provenance.extra:
                    prov["extra"] = w.provenance.extra
                prediction = {
                    "model_version": model_version_for(w.provenance.run_id),
                    "score": w.provenance.score,
                    "result": result,
                    PROVENANCE_KEY: prov,
                }
                task.setdefault("predictions", [])
                if not isinstance(task["predictions"], list):
                    outcome.refused[item_id] = "its 'predictions' is not a list"
                    continue
                task["predictions"].append(prediction)
                outcome.records.append(
                    entry_record(rel, item_id, entries_sha256([prediction]), [entry_id])
                )
            return bool(outcome.records), outcome

        outcome = rewrite_json(self.project, rel, change, indent=1)
        for item_id, why in outcome.refused.items():
            log.info("%s: not writing task %s: %s", self.url, item_id, why)
        return outcome

    def _header_size(
        self, task: dict[str, Any], item: Item, sizes: dict[str, tuple[int, int]]
    ) -> tuple[int, int]:
        """``(width, height)`` from the header of the task's image (``sizes`` caches reads).

        The image is the task's ``data`` reference as it is at write time (a
        ``/data/local-files/`` or relative path inside the project), else the item's
        ``uri``.  Raises :class:`InputError` saying why when it cannot be read.
        """
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        ref = data.get(self.image_key) if isinstance(data, dict) else None
        uri = (
            uri_from_task(ref, local_files_prefix=self.local_files_prefix)
            if isinstance(ref, str)
            else item.uri
        )
        if uri in sizes:
            return sizes[uri]
        if not uri or "://" in uri:
            raise InputError(
                "the task records no original_width/original_height and its image is not a file of the project",
                file=uri or self.url,
                item=item.item_id,
            )
        sizes[uri] = image_size(self.project, uri, item=item.item_id)
        return sizes[uri]

    def drop_entries(
        self, tasks: Any, records: list[WrittenRecord], positions: list[int]
    ) -> tuple[bool, list[tuple[int, str | None]]]:
        """Remove written predictions whose content is unchanged."""
        if not isinstance(tasks, list):
            return False, [(i, "the file is no longer a list of tasks") for i in positions]
        by_id = {str(t["id"]): t for t in tasks if isinstance(t, dict) and "id" in t}
        results: list[tuple[int, str | None]] = []
        changed = False
        for i in positions:
            r = records[i]
            task = by_id.get(r.item_id) or {}
            preds = task.get("predictions") or []
            mine = [
                p
                for p in preds
                if isinstance(p, dict)
                and (p.get(PROVENANCE_KEY) or {}).get("entry_id") in r.entry_ids
            ]
            if len(mine) != len(r.entry_ids):
                results.append((i, "its prediction is no longer in the export"))
            elif entries_sha256(mine) != r.sha256:
                results.append((i, "its prediction was edited since it was written"))
            else:
                task["predictions"] = [p for p in preds if not any(p is m for m in mine)]
                changed = True
                results.append((i, None))
        return changed, results

    def records_of_run(self, run_id: str) -> list[WrittenRecord]:
        """Records of the predictions that run ``run_id`` left in the export (recovery)."""
        if not self.has_file():
            return []
        tasks, _ = self.load_tasks()
        records = []
        for task in tasks:
            if not isinstance(task, dict) or "id" not in task:
                continue
            for p in labeltriage_predictions(task):
                prov = p.get(PROVENANCE_KEY)
                if isinstance(prov, dict) and prov.get("run_id") == run_id and prov.get("entry_id"):
                    records.append(
                        entry_record(
                            self.file, str(task["id"]), entries_sha256([p]), [str(prov["entry_id"])]
                        )
                    )
        return records


# -- predictions -------------------------------------------------------------------------


@PREDICTION_FORMATS.register("labelstudio")
class LabelStudioPredictions(PredictionSource):
    """``predictions`` of the tasks of a Label Studio export.

    Region ``score`` (else the prediction's ``score``) becomes the annotation score; the
    prediction's ``model_version`` is kept.  With several predictions per task the one
    with the ``model_version`` option is used, else the latest one.  Predictions
    labeltriage stored are never read: they are its own output, not the platform's.
    """

    def __init__(
        self, fs: ProjectFS, *, project: ProjectFormat | None = None, **options: Any
    ) -> None:
        self.fs = fs
        self.reader = LabelStudioFormat(fs, **options)
        self.model_version: str | None = options.get("model_version")
        tasks, _ = self.reader.load_tasks()
        self.tasks: dict[str, dict[str, Any]] = {}
        for task in tasks:
            if isinstance(task, dict) and "id" in task:
                self.tasks.setdefault(str(task["id"]), task)
        self.url = self.reader.url

    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        task = self.tasks.get(item_id)
        if task is None:
            return None
        preds = [
            p
            for p in (task.get("predictions") or [])
            if isinstance(p, dict) and not provenance_of(p)
        ]
        if self.model_version is not None:
            preds = [p for p in preds if p.get("model_version") == self.model_version]
        pred = latest(preds)
        if pred is None:
            return None
        default = pred.get("score")
        good, problems = read_regions(
            [r for r in pred.get("result") or [] if isinstance(r, dict)],
            f"prediction {pred.get('id', '?')}",
            default_score=float(default) if isinstance(default, int | float) else None,
        )
        error = problems_error(problems, self.url, item_id)
        version = pred.get("model_version")
        return Prediction(
            item_id=item_id,
            annotations=good,
            model_version=str(version) if version is not None else None,
            source=self.url,
            error=error,
        )

    def __iter__(self) -> Iterator[Prediction]:
        for item_id in self.tasks:
            prediction = self.get(item_id)
            if prediction is not None:
                yield prediction

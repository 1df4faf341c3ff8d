"""Label Studio JSON export: a list of tasks with ``data``, ``annotations``, ``predictions``.

Box convention at this edge: a ``rectanglelabels`` region has ``x``, ``y``, ``width``,
``height`` in **percent** of ``original_width``/``original_height``; inside labeltriage it
becomes pixel ``xyxy`` = ``(x·W/100, y·H/100, (x+width)·W/100, (y+height)·H/100)``.
A ``choices`` region is a class label (an annotation without box).

One task is one item:

* ``item_id`` = ``str(task["id"])``;
* ``uri`` from ``data.image`` (the ``image_key`` option): ``/data/local-files/?d=PATH``
  → ``PATH`` (minus the ``local_files_prefix`` option), ``/data/upload/…`` →
  ``upload/…``, a relative path as is; full URLs (``http(s)://``, ``s3://``, …) are kept;
* ``status`` is ``labeled`` (source human) when the task has an annotation that was not
  cancelled (``was_cancelled``); the ``ground_truth`` one, else the last one, gives the
  annotations and ``annotation_seconds`` (its ``lead_time``);
* a task with no such annotation but with a prediction written by labeltriage (it
  carries the ``labeltriage`` provenance dict) is ``auto_labeled`` (source auto);
* image size comes from the regions' ``original_width``/``original_height``.

Write-back (:meth:`LabelStudioFormat.write_labels`) adds a ``predictions`` entry —
``model_version``, ``score``, regions each with ``score``, and ``labeltriage`` =
``{run_id, tier, entry_id, …}`` — to tasks that have no annotation at write time, never
touching ``annotations``; the export is re-read at write time and rewritten atomically.
Percent boxes need the image size: the task's regions give it, else the item's
``width``/``height``, else the image's header is read (only the header, through the
project's storage; relative and ``/data/local-files/`` images).  A box is refused, with
the reason, only when none of these gives a size.
"""

from __future__ import annotations

import logging
import secrets
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
    json_int,
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
from connectors.model import (
    Annotation,
    AnnotationSource,
    Item,
    ItemStatus,
    Prediction,
    check_box_in_image,
)
from connectors.storage import ProjectFS

log = logging.getLogger(__name__)

PROVENANCE_KEY = "labeltriage"
DEFAULT_FILE = "export.json"
LOCAL_FILES = "/data/local-files/"
UPLOAD = "/data/upload/"


# -- conversions at the edge ---------------------------------------------------------------


def uri_from_task(value: str, *, local_files_prefix: str = "") -> str:
    """A task's image reference as an item ``uri`` (relative to the project, or a full URL)."""
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


def region_to_annotation(
    region: dict[str, Any], default_score: float | None = None
) -> tuple[Annotation | None, int | None, int | None]:
    """One result region → (annotation or ``None`` for other region types, width, height).

    Raises ValueError (naming the region) when the region is malformed or its box does
    not fit the image.
    """
    kind = region.get("type")
    value = region.get("value")
    rid = region.get("id", "?")
    if kind not in ("rectanglelabels", "choices"):
        return None, None, None
    if not isinstance(value, dict):
        raise ValueError(f"region {rid}: 'value' is not an object")
    width, height = json_int(region.get("original_width")), json_int(region.get("original_height"))
    score = region.get("score", default_score)
    if score is not None and not (isinstance(score, int | float) and 0.0 <= float(score) <= 1.0):
        raise ValueError(f"region {rid}: score {score!r} is not in [0, 1]")
    score = None if score is None else float(score)
    if kind == "choices":
        choices = value.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], str):
            raise ValueError(f"region {rid}: expected exactly one choice, got {choices!r}")
        return Annotation(label=choices[0], score=score), width, height
    labels = value.get("rectanglelabels")
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        raise ValueError(f"region {rid}: expected exactly one rectangle label, got {labels!r}")
    if width is None or height is None:
        raise ValueError(
            f"region {rid}: original_width/original_height missing; percent coordinates need them"
        )
    if value.get("rotation") not in (None, 0, 0.0):
        raise ValueError(
            f"region {rid}: rotated rectangles ({value.get('rotation')} degrees) are not supported"
        )
    try:
        x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"region {rid}: x, y, width, height must be numbers") from None
    if w < 0 or h < 0:
        raise ValueError(f"region {rid}: negative width or height ({w}%, {h}%)")
    box = (x * width / 100.0, y * height / 100.0, (x + w) * width / 100.0, (y + h) * height / 100.0)
    why = check_box_in_image(box, width, height)
    if why is not None:
        raise ValueError(f"region {rid}: {why}")
    return Annotation(label=labels[0], box=box, score=score), width, height


def annotation_to_region(
    a: Annotation, width: int | None, height: int | None, *, names: tuple[str, str, str]
) -> dict[str, Any]:
    """An :class:`Annotation` as a Label Studio result region (percent coordinates)."""
    rect_from, choice_from, to_name = names
    region: dict[str, Any] = {"id": secrets.token_hex(5), "to_name": to_name}
    if a.box is None:
        region.update(type="choices", from_name=choice_from, value={"choices": [a.label]})
    else:
        if not width or not height:
            raise ValueError("image size unknown; Label Studio boxes are percent of it")
        x1, y1, x2, y2 = a.box
        region.update(
            type="rectanglelabels",
            from_name=rect_from,
            original_width=width,
            original_height=height,
            image_rotation=0,
            value={
                "x": x1 * 100.0 / width,
                "y": y1 * 100.0 / height,
                "width": (x2 - x1) * 100.0 / width,
                "height": (y2 - y1) * 100.0 / height,
                "rotation": 0,
                "rectanglelabels": [a.label],
            },
        )
    if a.score is not None:
        region["score"] = a.score
    return region


def _live_annotations(task: dict[str, Any]) -> list[dict[str, Any]]:
    anns = task.get("annotations") or []
    return [a for a in anns if isinstance(a, dict) and not a.get("was_cancelled")]


def _our_predictions(task: dict[str, Any]) -> list[dict[str, Any]]:
    preds = task.get("predictions") or []
    return [p for p in preds if isinstance(p, dict) and isinstance(p.get(PROVENANCE_KEY), dict)]


def _regions(result: Any, where: str) -> tuple[list[Annotation], list[str]]:
    """Annotations of a result list, and the problems of its malformed regions."""
    if not isinstance(result, list):
        return [], [f"{where}: 'result' is not a list"]
    good: list[Annotation] = []
    problems: list[str] = []
    for region in result:
        if not isinstance(region, dict):
            problems.append(f"{where}: region {region!r} is not an object")
            continue
        try:
            ann, _, _ = region_to_annotation(region)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if ann is not None:
            good.append(ann)
    return good, problems


def _task_size(task: dict[str, Any]) -> tuple[int | None, int | None]:
    for group in ("annotations", "predictions"):
        for entry in task.get(group) or []:
            for region in (entry.get("result") if isinstance(entry, dict) else None) or []:
                if isinstance(region, dict):
                    w = json_int(region.get("original_width"))
                    h = json_int(region.get("original_height"))
                    if w and h:
                        return w, h
    return None, None


@FORMATS.register("labelstudio")
class LabelStudioFormat(JsonFileFormat):
    """A Label Studio JSON export file (see the module docstring).

    Options: ``file`` (the export, relative to the root), ``image_key`` (default
    ``image``), ``local_files_prefix`` (stripped from ``/data/local-files/?d=`` paths),
    ``from_name``/``choice_from_name``/``to_name`` for written regions (default: as found
    in the file, else ``label``/``choice``/``image``).
    """

    name = "labelstudio"
    tasks = ("detection", "classification")
    title = "Label Studio"
    missing = "no Label Studio export (*.json) found in the project root"
    json_indent = 1

    def __init__(self, project: ProjectFS, **options: Any) -> None:
        super().__init__(project, **options)
        self.image_key = str(options.get("image_key") or "image")
        self.local_files_prefix = str(options.get("local_files_prefix") or "")

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
        live = _live_annotations(task)
        status = ItemStatus.LABELED if live else ItemStatus.UNLABELED
        if ref is None:
            return self.invalid_item(
                item_id, "", f"data has no image reference {self.image_key!r}", status
            )
        uri = uri_from_task(ref, local_files_prefix=self.local_files_prefix)
        if "://" not in uri:
            try:
                self.project.resolve(uri, item=item_id)
            except InputError as exc:
                return self.invalid_item(item_id, ref, f"image {ref!r}: {exc.message}", status)
        width, height = _task_size(task)
        meta: dict[str, Any] = dict(task["meta"]) if isinstance(task.get("meta"), dict) else {}
        problems: list[str] = []
        annotations: list[Annotation] = []
        source: AnnotationSource | None = None
        seconds: float | None = None
        if live:
            chosen = next((a for a in live if a.get("ground_truth")), live[-1])
            annotations, problems = _regions(
                chosen.get("result", []), f"annotation {chosen.get('id', '?')}"
            )
            source = AnnotationSource.HUMAN
            lead = chosen.get("lead_time")
            seconds = (
                float(lead)
                if isinstance(lead, int | float) and not isinstance(lead, bool) and lead >= 0
                else None
            )
        else:
            ours = _our_predictions(task)
            if ours:
                pred = ours[-1]
                annotations, problems = _regions(
                    pred.get("result", []), f"prediction {pred.get('id', '?')}"
                )
                status, source = ItemStatus.AUTO_LABELED, AnnotationSource.AUTO
                prov = pred[PROVENANCE_KEY]
                meta["auto_label"] = {"run_id": prov.get("run_id"), "provenance": prov}
        error = self.item_error(problems, item_id, meta)
        return Item(
            item_id=item_id,
            uri=uri,
            width=width,
            height=height,
            status=status,
            source=source,
            annotations=annotations,
            annotation_seconds=seconds,
            meta=meta,
            error=error,
        )

    # -- writing a whole project ---------------------------------------------------------
    def _names(self, tasks: list[Any] | None = None) -> tuple[str, str, str]:
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
        return (
            str(self.options.get("from_name") or found.get("rect") or "label"),
            str(self.options.get("choice_from_name") or found.get("choice") or "choice"),
            str(self.options.get("to_name") or found.get("to") or "image"),
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
                    annotation_to_region(a, item.width, item.height, names=names)
                    for a in item.annotations
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
                    live = _live_annotations(task)
                    outcome.refused[item_id] = (
                        f"has a human annotation ({len(live)}) at write time"
                        if live
                        else "has annotations (cancelled ones) at write time"
                    )
                    continue
                ours = _our_predictions(task)
                if ours:
                    outcome.refused[item_id] = (
                        f"already auto-labeled by run {ours[-1][PROVENANCE_KEY].get('run_id')}"
                    )
                    continue
                width, height = _task_size(task)
                width, height = width or w.item.width, height or w.item.height
                if not (width and height) and any(a.box is not None for a in w.annotations):
                    try:
                        width, height = self._header_size(task, w.item, sizes)
                    except InputError as exc:
                        outcome.refused[item_id] = f"image size unknown: {exc}"
                        continue
                try:
                    result = [
                        annotation_to_region(a, width, height, names=names) for a in w.annotations
                    ]
                except ValueError as exc:
                    outcome.refused[item_id] = str(exc)
                    continue
                boxes = [a.box for a in w.annotations if a.box is not None]
                misfit = next(
                    (why for b in boxes if (why := check_box_in_image(b, width, height))), None
                )
                if misfit:
                    outcome.refused[item_id] = misfit
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
                    "model_version": w.provenance.model_version,
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
            for p in _our_predictions(task):
                if p[PROVENANCE_KEY].get("run_id") == run_id and p[PROVENANCE_KEY].get("entry_id"):
                    records.append(
                        entry_record(
                            self.file,
                            str(task["id"]),
                            entries_sha256([p]),
                            [str(p[PROVENANCE_KEY]["entry_id"])],
                        )
                    )
        return records


# -- predictions -------------------------------------------------------------------------


@PREDICTION_FORMATS.register("labelstudio")
class LabelStudioPredictions(PredictionSource):
    """``predictions`` of the tasks of a Label Studio export.

    Region ``score`` (else the prediction's ``score``) becomes the annotation score; the
    prediction's ``model_version`` is kept.  With several predictions per task the one
    with the ``model_version`` option is used, else the last one.
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
        preds = [p for p in (task.get("predictions") or []) if isinstance(p, dict)]
        if self.model_version is not None:
            preds = [p for p in preds if p.get("model_version") == self.model_version]
        if not preds:
            return None
        pred = preds[-1]
        default = pred.get("score")
        good: list[Annotation] = []
        problems: list[str] = []
        for region in pred.get("result") or []:
            if not isinstance(region, dict):
                continue
            try:
                ann, _, _ = region_to_annotation(
                    region, default_score=default if isinstance(default, int | float) else None
                )
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if ann is not None:
                good.append(ann)
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

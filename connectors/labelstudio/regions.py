"""Label Studio result regions ↔ labeltriage annotations, and a task's label: one converter.

Used by the export-file format (:mod:`connectors.formats.labelstudio`), the live project
(:mod:`connectors.formats.labelstudio_api`) and the ML backend, so that one task reads the
same whichever way it arrives.

Box convention at this edge: a ``rectanglelabels`` region has ``x``, ``y``, ``width``,
``height`` in **percent** of ``original_width``/``original_height``, rotated by ``rotation``
degrees clockwise about its top-left corner.  Inside labeltriage it becomes pixel
``xyxy`` (:func:`percent_to_xyxy`):

* **Rotation**: a multiple of 90° converts exactly (the turned rectangle is still
  axis-aligned); any other angle is refused with the reason.  labeltriage's boxes are
  axis-aligned, and the bounding box of a rectangle turned by 30° is a different, larger
  box: read as a human label it would misjudge every prediction compared with it, and
  calibration would learn from a label nobody drew.
* **Edges**: a box that overshoots the image by at most 1 % of its side (Label Studio's
  own rounding, or a converted import) is clipped to the image, so every box inside
  labeltriage lies in its image; one that overshoots by more is refused.
* A box with zero or negative size, a missing or non-finite coordinate, or no image size
  is refused.

A ``choices`` region is one class label (an annotation without box).  Other region types
(text areas, keypoints, relations, …) are ignored.  A refused region makes the item (or
prediction) an error item that names the task and the region; one bad task never stops a
stream.

A task's label (:func:`read_task_label`): the task is ``labeled`` (source human) when it
has an annotation that was not cancelled ("skipped"); of several, a ``ground_truth`` one
wins, else the most recently updated (then the highest id, then the last listed); its
``lead_time`` (seconds, when positive) becomes ``annotation_seconds``.  A task without one
that holds a prediction stored by labeltriage (:mod:`connectors.labelstudio.provenance`)
is ``auto_labeled`` (source auto) with that prediction's regions.  The image size comes
from any region's ``original_width``/``original_height``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from connectors.labelstudio.provenance import provenance_of
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus

EDGE_SLACK = 0.01
"""How far (share of the image side) a box may overshoot the image and still be clipped."""


@dataclass(frozen=True)
class RegionNames:
    """The control and object names written regions carry (``from_name``/``to_name``)."""

    boxes_from: str | None = "label"
    choices_from: str | None = "choice"
    to_name: str = "image"


# -- one region ----------------------------------------------------------------------------


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value <= 0 or int(value) != value:
        return None
    return int(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def percent_to_xyxy(
    value: dict[str, Any], width: int, height: int, *, where: str = "region"
) -> tuple[float, float, float, float]:
    """Label Studio's percent ``x, y, width, height`` (+ ``rotation``) → pixel ``xyxy``.

    See the module docstring for rotation and edges.  Raises :class:`ValueError` saying
    why (prefixed with ``where``) when the box cannot be converted.
    """
    coords = [_number(value.get(k)) for k in ("x", "y", "width", "height")]
    if any(c is None for c in coords):
        raise ValueError(f"{where}: x, y, width, height must be finite numbers, got {value}")
    x, y, w, h = (float(c) for c in coords)  # type: ignore[arg-type]
    if w < 0 or h < 0:
        raise ValueError(f"{where}: negative width or height ({w}%, {h}%)")
    rotation = _number(value.get("rotation") or 0.0)
    if rotation is None:
        raise ValueError(f"{where}: rotation {value.get('rotation')!r} is not a number")
    turns = rotation / 90.0
    if abs(turns - round(turns)) > 1e-6:
        raise ValueError(
            f"{where}: a rectangle rotated by {rotation:g}° is not supported "
            "(labeltriage boxes are axis-aligned; multiples of 90° convert exactly)"
        )
    px, py, pw, ph = x * width / 100.0, y * height / 100.0, w * width / 100.0, h * height / 100.0
    # Clockwise turns about the top-left corner (y points down): exact, no trigonometry.
    x1, y1, x2, y2 = {
        0: (px, py, px + pw, py + ph),
        1: (px - ph, py, px, py + pw),
        2: (px - pw, py - ph, px, py),
        3: (px, py - pw, px + ph, py),
    }[round(turns) % 4]
    box = [x1, y1, x2, y2]
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{where}: box {box} has zero or negative size")
    slack_x, slack_y = EDGE_SLACK * width, EDGE_SLACK * height
    if x1 < -slack_x or y1 < -slack_y:
        raise ValueError(f"{where}: box {box} starts outside the {width}x{height} image")
    if x2 > width + slack_x:
        raise ValueError(f"{where}: box {box} ends past the image width {width}")
    if y2 > height + slack_y:
        raise ValueError(f"{where}: box {box} ends past the image height {height}")
    clipped = (max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise ValueError(f"{where}: box {box} lies outside the {width}x{height} image")
    return clipped


def region_to_annotation(
    region: dict[str, Any], default_score: float | None = None
) -> Annotation | None:
    """One result region → an :class:`Annotation` (pixel ``xyxy``), or ``None`` for other types.

    ``default_score`` (the prediction's ``score``) stands in for a missing region score.
    Raises :class:`ValueError` naming the region when it cannot be converted.
    """
    kind = region.get("type")
    if kind not in ("rectanglelabels", "choices"):
        return None
    where = f"region {region.get('id', '?')}"
    value = region.get("value")
    if not isinstance(value, dict):
        raise ValueError(f"{where}: 'value' is not an object")
    score = region.get("score", default_score)
    if score is not None and not (_number(score) is not None and 0.0 <= float(score) <= 1.0):
        raise ValueError(f"{where}: score {score!r} is not in [0, 1]")
    score = None if score is None else float(score)
    key = "choices" if kind == "choices" else "rectanglelabels"
    labels = value.get(key)
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        what = "choice" if kind == "choices" else "rectangle label"
        raise ValueError(f"{where}: expected exactly one {what}, got {labels!r}")
    if kind == "choices":
        return Annotation(label=labels[0], score=score)
    width = _positive_int(region.get("original_width"))
    height = _positive_int(region.get("original_height"))
    if width is None or height is None:
        raise ValueError(
            f"{where}: original_width/original_height missing; percent coordinates need them"
        )
    box = percent_to_xyxy(value, width, height, where=where)
    return Annotation(label=labels[0], box=box, score=score)


def annotation_to_region(
    a: Annotation,
    names: RegionNames,
    width: int | None,
    height: int | None,
    *,
    region_id: str,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An :class:`Annotation` (pixel ``xyxy`` or a class) → one result region (percent).

    Raises :class:`ValueError` when the label config has no control for it or, for a box,
    the image size is unknown.
    """
    if a.box is None:
        if names.choices_from is None:
            raise ValueError(f"{a.label!r}: a class label needs a <Choices> control")
        region: dict[str, Any] = {
            "id": region_id,
            "from_name": names.choices_from,
            "to_name": names.to_name,
            "type": "choices",
            "value": {"choices": [a.label]},
        }
    else:
        if names.boxes_from is None:
            raise ValueError(f"{a.label!r}: a box needs a <RectangleLabels> control")
        if not width or not height:
            raise ValueError("the image size is unknown; boxes cannot be written as percentages")
        x1, y1, x2, y2 = a.box
        region = {
            "id": region_id,
            "from_name": names.boxes_from,
            "to_name": names.to_name,
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
    if a.score is not None:
        region["score"] = float(a.score)
    if meta is not None:
        region["meta"] = meta
    return region


def read_regions(
    result: Any, where: str, default_score: float | None = None
) -> tuple[list[Annotation], list[str]]:
    """The annotations of a ``result`` list, and the problems of its malformed regions."""
    if not isinstance(result, list):
        return [], [f"{where}: 'result' is not a list"]
    good: list[Annotation] = []
    problems: list[str] = []
    for region in result:
        if not isinstance(region, dict):
            problems.append(f"{where}: region {region!r} is not an object")
            continue
        try:
            annotation = region_to_annotation(region, default_score)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if annotation is not None:
            good.append(annotation)
    return good, problems


# -- one task ------------------------------------------------------------------------------


def human_annotations(task: dict[str, Any]) -> list[dict[str, Any]]:
    """A task's annotations that count as a human label (not cancelled/skipped)."""
    return [
        a
        for a in task.get("annotations") or []
        if isinstance(a, dict) and not a.get("was_cancelled")
    ]


def latest(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The most recently updated entry (then created, then highest id, then last listed)."""

    def key(pair: tuple[int, dict[str, Any]]) -> tuple[str, int, int]:
        pos, e = pair
        stamp = str(e.get("updated_at") or e.get("created_at") or "")
        ident = e.get("id")
        return stamp, ident if isinstance(ident, int) and not isinstance(ident, bool) else 0, pos

    return max(enumerate(entries), key=key)[1] if entries else None


def choose_annotation(annotations: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The annotation that stands for the task's label: a ground-truth one, else the latest."""
    truth = [a for a in annotations if a.get("ground_truth")]
    return latest(truth or annotations)


def labeltriage_predictions(task: dict[str, Any]) -> list[dict[str, Any]]:
    """The task's predictions that labeltriage stored (run write-back or served)."""
    return [p for p in task.get("predictions") or [] if isinstance(p, dict) and provenance_of(p)]


def image_size_of(task: dict[str, Any]) -> tuple[int | None, int | None]:
    """``(width, height)`` from any region of the task's annotations or predictions."""
    for group in ("annotations", "predictions"):
        for entry in task.get(group) or []:
            result = entry.get("result") if isinstance(entry, dict) else None
            for region in result if isinstance(result, list) else []:
                if isinstance(region, dict):
                    w = _positive_int(region.get("original_width"))
                    h = _positive_int(region.get("original_height"))
                    if w and h:
                        return w, h
    return None, None


def _lead_seconds(value: Any) -> float | None:
    number = _number(value)
    return number if number is not None and number > 0 else None


@dataclass
class TaskLabel:
    """What a task says about its item's label (see :func:`read_task_label`)."""

    status: ItemStatus = ItemStatus.UNLABELED
    source: AnnotationSource | None = None
    annotations: list[Annotation] = field(default_factory=list)
    annotation_seconds: float | None = None
    width: int | None = None
    height: int | None = None
    problems: list[str] = field(default_factory=list)
    annotation_id: Any = None
    auto_label: dict[str, Any] | None = None
    """``{"run_id", "provenance"}`` of the labeltriage prediction an auto-labeled task holds."""

    def to_item(self, item_id: str, uri: str, meta: dict[str, Any], error: str | None) -> Item:
        """The item of the task: this label, its image ``uri``, ``meta`` and ``error``."""
        return Item(
            item_id=item_id,
            uri=uri,
            width=self.width,
            height=self.height,
            status=self.status,
            source=self.source,
            annotations=self.annotations,
            annotation_seconds=self.annotation_seconds,
            meta=meta,
            error=error,
        )


def read_task_label(task: dict[str, Any]) -> TaskLabel:
    """The label of one task (see the module docstring); never raises for bad regions."""
    width, height = image_size_of(task)
    label = TaskLabel(width=width, height=height)
    humans = human_annotations(task)
    if humans:
        chosen = choose_annotation(humans) or humans[-1]
        label.annotations, label.problems = read_regions(
            chosen.get("result", []), f"annotation {chosen.get('id', '?')}"
        )
        label.status, label.source = ItemStatus.LABELED, AnnotationSource.HUMAN
        label.annotation_seconds = _lead_seconds(chosen.get("lead_time"))
        label.annotation_id = chosen.get("id")
        return label
    ours = latest(labeltriage_predictions(task))
    if ours is not None:
        score = _number(ours.get("score"))
        label.annotations, label.problems = read_regions(
            ours.get("result", []), f"prediction {ours.get('id', '?')}", default_score=score
        )
        label.status, label.source = ItemStatus.AUTO_LABELED, AnnotationSource.AUTO
        provenance = provenance_of(ours) or {}
        label.auto_label = {"run_id": provenance.get("run_id"), "provenance": provenance}
    return label


__all__ = [
    "EDGE_SLACK",
    "RegionNames",
    "TaskLabel",
    "annotation_to_region",
    "choose_annotation",
    "human_annotations",
    "image_size_of",
    "labeltriage_predictions",
    "latest",
    "percent_to_xyxy",
    "read_regions",
    "read_task_label",
    "region_to_annotation",
]

"""The task model: what one item of a labeling project is.

Conventions (stated once, used everywhere):

* Boxes inside labeltriage are **pixel ``xyxy``**: ``x1 < x2``, ``y1 < y2``, origin at the
  top-left corner of the image, x to the right, y down, in the image's pixel units.
  Formats convert at their edge: COCO ``xywh`` pixels, YOLO normalised ``cx cy w h``,
  Pascal VOC / KITTI ``xyxy`` pixels.
* A **detection** label is a list of :class:`Annotation` with ``box`` set; a
  **classification** label is exactly one :class:`Annotation` with ``box=None``.
* ``Item.uri`` is relative to the project root (POSIX separators), or a full fsspec URL.
* ``score`` on an annotation is a model confidence in ``[0, 1]``; human labels have none.
"""

from __future__ import annotations

import json
from enum import Enum
from math import isfinite
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ItemStatus(str, Enum):
    UNLABELED = "unlabeled"
    LABELED = "labeled"
    REVIEWED = "reviewed"
    AUTO_LABELED = "auto_labeled"


class AnnotationSource(str, Enum):
    HUMAN = "human"
    AUTO = "auto"
    MODEL = "model"


class Annotation(BaseModel):
    """One box (pixel ``xyxy``) with a class name, or one class label (``box=None``)."""

    model_config = ConfigDict(frozen=True)

    label: str
    box: tuple[float, float, float, float] | None = None
    score: float | None = None

    @field_validator("box")
    @classmethod
    def _box_ordered(
        cls, box: tuple[float, float, float, float] | None
    ) -> tuple[float, float, float, float] | None:
        if box is None:
            return None
        x1, y1, x2, y2 = box
        if not (isfinite(x1) and isfinite(y1) and isfinite(x2) and isfinite(y2)):
            raise ValueError(f"box {box} has a non-finite coordinate")
        if x2 < x1 or y2 < y1:
            raise ValueError(
                f"box {box} has negative width or height (expected x1 <= x2, y1 <= y2)"
            )
        return box

    @field_validator("score")
    @classmethod
    def _score_in_range(cls, score: float | None) -> float | None:
        if score is not None and not (0.0 <= score <= 1.0):
            raise ValueError(f"score {score} is outside [0, 1]")
        return score

    @property
    def area(self) -> float:
        if self.box is None:
            return 0.0
        x1, y1, x2, y2 = self.box
        return (x2 - x1) * (y2 - y1)


def check_box_in_image(
    box: tuple[float, float, float, float],
    width: int | None,
    height: int | None,
    *,
    tol: float = 1.0,
) -> str | None:
    """Return why ``box`` does not fit a ``width``×``height`` image, or ``None`` if it does.

    ``tol`` pixels of slack are allowed (VOC's 1-based coordinates reach ``width``).
    """
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return f"box {list(box)} has zero or negative size"
    if x1 < -tol or y1 < -tol:
        return f"box {list(box)} starts outside the image"
    if width is not None and x2 > width + tol:
        return f"box {list(box)} ends past the image width {width}"
    if height is not None and y2 > height + tol:
        return f"box {list(box)} ends past the image height {height}"
    return None


class Item(BaseModel):
    """One thing to label.

    ``error`` is set (and everything else may be partial) when the item could not be
    read; such items flow through every stage as rows with ``error`` set.
    """

    item_id: str
    uri: str
    width: int | None = None
    height: int | None = None
    status: ItemStatus = ItemStatus.UNLABELED
    annotations: list[Annotation] = Field(default_factory=list)
    source: AnnotationSource | None = None
    annotation_seconds: float | None = None
    meta: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None

    @model_validator(mode="after")
    def _status_consistent(self) -> Item:
        if self.status is not ItemStatus.UNLABELED and self.source is None:
            self.source = (
                AnnotationSource.AUTO
                if self.status is ItemStatus.AUTO_LABELED
                else AnnotationSource.HUMAN
            )
        return self

    @property
    def is_labeled(self) -> bool:
        return self.status is not ItemStatus.UNLABELED

    @property
    def has_human_label(self) -> bool:
        return (
            self.status in (ItemStatus.LABELED, ItemStatus.REVIEWED)
            and self.source is AnnotationSource.HUMAN
        )

    @property
    def class_label(self) -> str | None:
        """The class of a classification item (one annotation without a box)."""
        if len(self.annotations) == 1 and self.annotations[0].box is None:
            return self.annotations[0].label
        return None


class Prediction(BaseModel):
    """A model's output for one item: boxes with scores, or class probabilities.

    ``probs`` maps class name → probability (classification); ``annotations`` hold
    scored boxes (detection) or the arg-max class.  ``source`` names where the
    prediction came from (a model version, or the file it was read from).
    """

    item_id: str
    annotations: list[Annotation] = Field(default_factory=list)
    probs: dict[str, float] | None = None
    model_version: str | None = None
    source: str | None = None
    error: str | None = None


# -- Arrow / Parquet form -------------------------------------------------------------


def annotation_to_row(a: Annotation) -> dict[str, Any]:
    x1, y1, x2, y2 = a.box if a.box is not None else (None, None, None, None)
    return {"label": a.label, "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": a.score}


def annotation_from_row(row: dict[str, Any]) -> Annotation:
    box = None
    if row.get("x1") is not None:
        box = (float(row["x1"]), float(row["y1"]), float(row["x2"]), float(row["y2"]))
    return Annotation(label=row["label"], box=box, score=row.get("score"))


def item_to_row(item: Item) -> dict[str, Any]:
    """The flat row of :data:`connectors.manifest.ITEM_SCHEMA` for one item."""
    return {
        "item_id": item.item_id,
        "uri": item.uri,
        "width": item.width,
        "height": item.height,
        "status": item.status.value,
        "source": item.source.value if item.source else None,
        "annotation_seconds": item.annotation_seconds,
        "annotations": [annotation_to_row(a) for a in item.annotations],
        "meta": json.dumps(item.meta, sort_keys=True) if item.meta else None,
        "error": item.error,
    }


def item_from_row(row: dict[str, Any]) -> Item:
    return Item(
        item_id=row["item_id"],
        uri=row["uri"],
        width=row.get("width"),
        height=row.get("height"),
        status=ItemStatus(row.get("status") or "unlabeled"),
        source=AnnotationSource(row["source"]) if row.get("source") else None,
        annotation_seconds=row.get("annotation_seconds"),
        annotations=[annotation_from_row(a) for a in (row.get("annotations") or [])],
        meta=json.loads(row["meta"]) if row.get("meta") else {},
        error=row.get("error"),
    )

"""Would an auto-label pass review?  Matching predictions against ground truth.

The rule is the one a reviewer applies to an auto-labeled item:

* **detection** — every ground-truth box is matched, one to one, by a predicted box of
  the same class at IoU ≥ ``iou_threshold`` (0.5), and no predicted box is left over;
* **classification** — the predicted (arg-max) class is the true class.

Boxes are pixel ``xyxy`` (``x1 <= x2``, ``y1 <= y2``), as everywhere in labeltriage.

Ignore regions (KITTI ``DontCare``, COCO crowd).  Ground-truth boxes whose class is
ignored are not targets: missing them is no error.  A prediction that matches no real
ground-truth box but lies mostly inside an ignore region — its *intersection over its
own area* (IoA) with the region is ≥ 0.5, as COCO treats crowd regions — is neither a
true nor a false positive; it is counted as ``ignored``.  A prediction whose own class
is an ignored class is dropped the same way.

Greedy one-to-one matching: predictions in order of descending score (ties keep input
order; a missing score counts as 1.0) each take the unmatched ground-truth box of the
same class with the highest IoU, if that IoU reaches the threshold.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from connectors.labelmap import LabelMap
from connectors.model import Annotation, Item, Prediction

IGNORE_IOA = 0.5
"""A prediction at least this much inside an ignore region (IoA) is ignored."""


@dataclass(frozen=True)
class MatchResult:
    """Counts of one image's matching.  ``correct`` ⇔ ``fp == 0 and fn == 0``."""

    tp: int
    fp: int
    fn: int
    ignored: int
    correct: bool


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of pixel ``xyxy`` boxes.

    ``a``: ``(N, 4)``, ``b``: ``(M, 4)`` → ``(N, M)`` float64.  Zero-area pairs give 0.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    inter = _intersection(a, b)
    area_a = _areas(a)[:, None]
    area_b = _areas(b)[None, :]
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def box_ioa(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection over the area of ``a``: ``(N, 4)``, ``(M, 4)`` → ``(N, M)``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    inter = _intersection(a, b)
    area_a = _areas(a)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(area_a > 0, inter / area_a, 0.0)


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    return wh[..., 0] * wh[..., 1]


def _boxes(annotations: Sequence[Annotation]) -> np.ndarray:
    if not annotations:
        return np.zeros((0, 4), dtype=np.float64)
    return np.array([a.box for a in annotations], dtype=np.float64)


def _score(a: Annotation) -> float:
    return a.score if a.score is not None else 1.0


@dataclass(frozen=True)
class MatchCurve:
    """One image's greedy matching, done once, read at any minimum box score.

    The kept predictions (boxed, not of an ignored class) are sorted once by descending
    score; those with ``score >= c`` are a prefix of that order, and the greedy matching of
    a prefix is the prefix of the greedy matching (each prediction only sees the targets
    taken before it).  So one pass gives the counts for every ``c``: ``at(c)`` equals
    :func:`match_detections` with ``min_score=c``, for any ``c >= min_score``.

    ``neg_scores``: the kept predictions' scores, negated, ascending; ``tp``, ``fp``,
    ``in_region``: counts over the first ``k`` predictions, ``k = 0 … P``;
    ``ignored_class_scores``: scores of predictions whose own class is ignored;
    ``targets``: ground-truth boxes to find.
    """

    neg_scores: tuple[float, ...]
    tp: tuple[int, ...]
    fp: tuple[int, ...]
    in_region: tuple[int, ...]
    ignored_class_scores: tuple[float, ...]
    targets: int
    min_score: float = 0.0

    def at(self, min_score: float | None = None) -> MatchResult:
        """The counts with predictions below ``min_score`` dropped (default: the curve's own)."""
        c = self.min_score if min_score is None else float(min_score)
        if c < self.min_score:
            raise ValueError(f"this matching starts at score {self.min_score}, asked for {c}")
        k = bisect.bisect_right(self.neg_scores, -c)  # the predictions with score >= c
        tp, fp = self.tp[k], self.fp[k]
        ignored = self.in_region[k] + sum(1 for s in self.ignored_class_scores if s >= c)
        fn = self.targets - tp
        return MatchResult(tp=tp, fp=fp, fn=fn, ignored=ignored, correct=fp == 0 and fn == 0)


def match_curve(
    gt: Sequence[Annotation],
    pred: Sequence[Annotation],
    *,
    iou_threshold: float = 0.5,
    ignore_labels: Collection[str] = frozenset(),
    min_score: float = 0.0,
) -> MatchCurve:
    """Match one image's predicted boxes to its ground truth once, for every ``c >= min_score``.

    Same rule and arguments as :func:`match_detections`; predictions below ``min_score``
    are left out of the matching (read the curve only at ``c >= min_score``).
    """
    ignore = frozenset(ignore_labels)
    gt_boxed = [a for a in gt if a.box is not None]
    targets = [a for a in gt_boxed if a.label not in ignore]
    regions = [a for a in gt_boxed if a.label in ignore]

    boxed = [a for a in pred if a.box is not None and _score(a) >= min_score]
    ignored_class = tuple(_score(a) for a in boxed if a.label in ignore)
    kept = sorted((a for a in boxed if a.label not in ignore), key=lambda a: -_score(a))

    iou: list[list[float]] = (
        box_iou(_boxes(kept), _boxes(targets)).tolist() if kept and targets else []
    )
    in_region: list[bool]
    if regions and kept:
        inside: np.ndarray = np.asarray(box_ioa(_boxes(kept), _boxes(regions)) >= IGNORE_IOA)
        in_region = [bool(v) for v in np.asarray(inside.any(axis=1))]
    else:
        in_region = [False] * len(kept)

    labels = [a.label for a in targets]
    taken = [False] * len(targets)
    tp, fp, region = [0], [0], [0]
    for i, p in enumerate(kept):
        # the untaken target of the same class with the highest IoU (the first on ties)
        best, j = -1.0, -1
        for t, label in enumerate(labels):
            if not taken[t] and label == p.label and iou[i][t] > best:
                best, j = iou[i][t], t
        matched = j >= 0 and best >= iou_threshold
        if matched:
            taken[j] = True
        tp.append(tp[-1] + matched)
        fp.append(fp[-1] + (not matched and not in_region[i]))
        region.append(region[-1] + (not matched and in_region[i]))
    return MatchCurve(
        neg_scores=tuple(-_score(a) for a in kept),
        tp=tuple(tp),
        fp=tuple(fp),
        in_region=tuple(region),
        ignored_class_scores=ignored_class,
        targets=len(targets),
        min_score=float(min_score),
    )


def match_detections(
    gt: Sequence[Annotation],
    pred: Sequence[Annotation],
    *,
    iou_threshold: float = 0.5,
    ignore_labels: Collection[str] = frozenset(),
    min_score: float = 0.0,
) -> MatchResult:
    """Match one image's predicted boxes to its ground truth (see the module docstring).

    ``gt`` and ``pred`` hold boxed annotations (pixel ``xyxy``); annotations without a box
    are ignored.  Predictions with ``score < min_score`` are dropped before matching.
    """
    return match_curve(
        gt, pred, iou_threshold=iou_threshold, ignore_labels=ignore_labels, min_score=min_score
    ).at(min_score)


def match_error(m: MatchResult) -> float:
    """``1 − F1 = (fp + fn) / (2·tp + fp + fn)``; 0 when there is nothing to find or predict."""
    denom = 2 * m.tp + m.fp + m.fn
    return 0.0 if denom == 0 else (m.fp + m.fn) / denom


def detection_error(
    gt: Sequence[Annotation],
    pred: Sequence[Annotation],
    *,
    iou_threshold: float = 0.5,
    ignore_labels: Collection[str] = frozenset(),
    min_score: float = 0.0,
) -> float:
    """:func:`match_error` of one image's matching; ``pred`` already in project classes."""
    return match_error(
        match_detections(
            gt, pred, iou_threshold=iou_threshold, ignore_labels=ignore_labels, min_score=min_score
        )
    )


def mapped_probs(prediction: Prediction, label_map: LabelMap) -> dict[str, float]:
    """The prediction's class probabilities over project classes: probabilities of model
    classes mapped to the same project class add up; classes the (non-empty) map does not
    name are dropped."""
    mapped: dict[str, float] = {}
    for name, p in (prediction.probs or {}).items():
        target = label_map.map.get(name) if label_map.map else name
        if target is not None:
            mapped[target] = mapped.get(target, 0.0) + float(p)
    return mapped


def project_probs(prediction: Prediction, label_map: LabelMap) -> dict[str, float]:
    """:func:`mapped_probs` rescaled to sum to 1: a distribution over project classes
    (empty when no class of the prediction is a project class)."""
    mapped = mapped_probs(prediction, label_map)
    total = sum(mapped.values())
    return {k: v / total for k, v in mapped.items()} if total > 0 else {}


def predicted_class(prediction: Prediction, label_map: LabelMap, min_score: float) -> str | None:
    """The arg-max project class of a classification prediction, or ``None``.

    With ``probs``, model classes are mapped first (probabilities of classes mapped to the
    same project class add up; unmapped classes are dropped when the map is non-empty).
    Without ``probs``, the first annotation's label is used.  A top probability below
    ``min_score`` gives ``None`` (no label would be written).
    """
    if prediction.probs:
        mapped = mapped_probs(prediction, label_map)
        if not mapped:
            return None
        best = max(mapped, key=lambda k: mapped[k])
        return best if mapped[best] >= min_score else None
    anns = label_map.apply(prediction.annotations)
    if not anns:
        return None
    top = anns[0]
    if top.score is not None and top.score < min_score:
        return None
    return top.label


def item_match_curve(
    item: Item,
    prediction: Prediction | None,
    label_map: LabelMap,
    *,
    iou_threshold: float = 0.5,
    min_score: float = 0.0,
) -> MatchCurve:
    """The detection matching of ``item``'s labels and its prediction, once for every box
    confidence ``c >= min_score`` (:class:`MatchCurve`).

    The label map turns model classes into project classes (unmapped ones dropped) and
    names the ignored classes; a missing prediction is an empty one.
    """
    pred = label_map.apply(prediction.annotations) if prediction is not None else []
    return match_curve(
        item.annotations,
        pred,
        iou_threshold=iou_threshold,
        ignore_labels=label_map.ignore,
        min_score=min_score,
    )


def item_correct(
    item: Item,
    prediction: Prediction | None,
    label_map: LabelMap,
    *,
    task: str = "detection",
    iou_threshold: float = 0.5,
    min_score: float = 0.0,
) -> bool:
    """Would ``prediction``, written as ``item``'s label, pass review against its labels?

    The label map turns model classes into project classes (unmapped ones dropped) and
    names the ignored classes.  A missing prediction is an empty one: right only for a
    detection item with nothing (but ignore regions) to find.
    """
    return wrong_at(
        item, prediction, label_map, [min_score], task=task, iou_threshold=iou_threshold
    ) == [False]


def wrong_at(
    item: Item,
    prediction: Prediction | None,
    label_map: LabelMap,
    confidences: Sequence[float],
    *,
    task: str = "detection",
    iou_threshold: float = 0.5,
) -> list[bool]:
    """For each box confidence ``c``: would the auto-label from boxes with score ≥ ``c`` be
    rejected?  ``not item_correct(..., min_score=c)`` for every ``c``, with one matching.
    """
    if task == "classification":
        truth = item.class_label
        return [
            truth is None
            or (predicted_class(prediction, label_map, c) if prediction is not None else None)
            != truth
            for c in confidences
        ]
    if not confidences:
        return []
    curve = item_match_curve(
        item, prediction, label_map, iou_threshold=iou_threshold, min_score=min(confidences)
    )
    return [not curve.at(c).correct for c in confidences]


def item_error(
    item: Item,
    prediction: Prediction | None,
    label_map: LabelMap,
    *,
    task: str = "detection",
    iou_threshold: float = 0.5,
    min_score: float = 0.0,
) -> float:
    """A continuous per-item error in ``[0, 1]``: the true loss that difficulty scores rank.

    Detection: ``1 − F1 = (fp + fn) / (2·tp + fp + fn)``, 0 when there is nothing to find
    and nothing predicted.  Classification: 0 when right, 1 when wrong.
    """
    if task == "classification":
        return (
            0.0
            if item_correct(item, prediction, label_map, task=task, min_score=min_score)
            else 1.0
        )
    pred = label_map.apply(prediction.annotations) if prediction is not None else []
    return detection_error(
        item.annotations,
        pred,
        iou_threshold=iou_threshold,
        ignore_labels=label_map.ignore,
        min_score=min_score,
    )

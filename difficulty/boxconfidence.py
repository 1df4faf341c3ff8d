"""The box confidence a checkpoint's auto-labels keep, chosen on the items it trained on.

An auto-label is the model's boxes with confidence ``≥ c``; which ``c`` is best depends
on the model.  Choosing ``c`` on the calibration items themselves costs the gate a
Bonferroni split of ``δ`` over every candidate (:mod:`autolabel.calibrate`).  A checkpoint
trained by labeltriage holds out its calibration items, so ``c`` can instead be chosen on
the *training* items: they are disjoint from the calibration items, so the choice is a
function of data independent of them, fixed before the calibration looks at any error,
and the gate may test it at the full level ``δ``.

**Rule** (:func:`choose_box_confidence`): over the grid :data:`DEFAULT_BOX_CONFIDENCES`,
the ``c`` whose auto-labels are wrong (:func:`difficulty.matching.wrong_at`) on the fewest
training items; ties go to the larger ``c``.  The model fits its training items better
than new ones, so the shares it records are optimistic; only their order is used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from connectors.labelmap import LabelMap
from connectors.model import Item, Prediction
from difficulty.matching import wrong_at

DEFAULT_BOX_CONFIDENCES: tuple[float, ...] = (0.1, 0.25, 0.4, 0.55, 0.7)
"""Grid of per-box confidences an auto-label may keep."""

RULE = "fewest wrong auto-labels on the training items; ties to the larger confidence"


def choose_box_confidence(
    items: Iterable[Item],
    predictions: Mapping[str, Prediction],
    *,
    grid: Sequence[float] = DEFAULT_BOX_CONFIDENCES,
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """The box confidence of :data:`RULE` over ``grid``, with what it was chosen from.

    ``items``: labeled items the model trained on (never calibration items);
    ``predictions``: the model's prediction per item id (boxes in project classes; a
    missing one counts as empty).  Returns plain data for a checkpoint's metadata:
    ``value``, ``rule``, ``items`` (how many) and ``wrong_share`` per grid confidence.
    """
    if not grid:
        raise ValueError("the box-confidence grid is empty")
    cs = sorted(float(c) for c in grid)
    rows = [
        wrong_at(it, predictions.get(it.item_id), LabelMap(), cs, iou_threshold=iou_threshold)
        for it in items
    ]
    if not rows:
        raise ValueError("no items to choose a box confidence on")
    share = np.asarray(rows, dtype=np.float64).mean(axis=0)
    best = min(range(len(cs)), key=lambda j: (share[j], -cs[j]))
    return {
        "value": cs[best],
        "rule": RULE,
        "items": len(rows),
        "wrong_share": {f"{c:g}": float(s) for c, s in zip(cs, share, strict=True)},
    }

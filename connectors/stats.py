"""Counts of a project: items, labels, boxes per class, predictions and bad items.

One pass over the item stream (and one prediction look-up per item when predictions are
given); memory holds counters and the list of errors, never the items.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

from connectors.formats.base import PredictionSource, ProjectFormat
from connectors.labelmap import LabelMap, LabelMapCheck, check_label_map
from connectors.model import Item, ItemStatus, Prediction

log = logging.getLogger(__name__)


def item_error(item: Item) -> dict[str, Any]:
    """``{file, item, message}`` of an item read with ``error`` set.

    Formats put ``FILE[:LINE]`` in ``meta["error_file"]`` and ``error`` reads
    ``FILE[:LINE]: WHAT``; without it the item's ``uri`` is the file.
    """
    message = item.error or ""
    where = item.meta.get("error_file")
    if isinstance(where, str) and message.startswith(where + ": "):
        return {"file": where, "item": item.item_id, "message": message[len(where) + 2 :]}
    return {"file": item.uri, "item": item.item_id, "message": message}


def prediction_error(prediction: Prediction) -> dict[str, Any]:
    message = prediction.error or ""
    source = prediction.source
    if source and message.startswith(source):
        where, _, rest = message.partition(": ")
        return {"file": where, "item": prediction.item_id, "message": rest or message}
    return {"file": source, "item": prediction.item_id, "message": message}


def compute_stats(
    project: ProjectFormat,
    predictions: PredictionSource | None = None,
    *,
    label_map: LabelMap | None = None,
    items: Iterable[Item] | None = None,
) -> dict[str, Any]:
    """Counts of ``project`` in one streaming pass (over ``items`` when the caller has read
    them already, else over ``project.iter_items()``).

    Keys: ``items`` (every item, bad ones included), ``labeled`` (any labeled status:
    human, reviewed or auto), ``auto_labeled``, ``unlabeled`` (items without error only),
    ``boxes``, ``classes`` (class name → number of boxes; for classification, → number
    of items), ``errors`` (list of ``{file, item, message}``) and, when ``predictions``
    are given, ``predictions`` (number of predicted boxes on the project's items, after
    ``label_map`` when one is given), ``predicted_items``, ``predicted_classes`` (model
    class → boxes, before the map) and ``label_map_check``
    (:func:`connectors.labelmap.check_label_map`; its warning is logged).
    """
    counts: Counter[str] = Counter()
    classes: Counter[str] = Counter()
    raw_classes: Counter[str] = Counter()
    errors: list[dict[str, Any]] = []
    predicted_boxes = predicted_items = 0
    for item in project.iter_items() if items is None else items:
        counts["items"] += 1
        if item.error is not None:
            errors.append(item_error(item))
            continue
        if item.is_labeled:
            counts["labeled"] += 1
            if item.status is ItemStatus.AUTO_LABELED:
                counts["auto_labeled"] += 1
            for a in item.annotations:
                classes[a.label] += 1
                if a.box is not None:
                    counts["boxes"] += 1
        else:
            counts["unlabeled"] += 1
        if predictions is None:
            continue
        prediction = predictions.get(item.item_id, item)
        if prediction is None:
            continue
        if prediction.error is not None:
            errors.append(prediction_error(prediction))
            continue
        predicted_items += 1
        raw_classes.update(a.label for a in prediction.annotations)
        annotations = (
            label_map.apply(prediction.annotations)
            if label_map is not None
            else prediction.annotations
        )
        predicted_boxes += sum(1 for a in annotations if a.box is not None)
    stats: dict[str, Any] = {
        "format": getattr(project, "name", type(project).__name__),
        "items": counts["items"],
        "labeled": counts["labeled"],
        "auto_labeled": counts["auto_labeled"],
        "unlabeled": counts["unlabeled"],
        "boxes": counts["boxes"],
        "classes": dict(sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
    if predictions is not None:
        stats["predictions"] = predicted_boxes
        stats["predicted_items"] = predicted_items
        stats["predicted_classes"] = dict(raw_classes.most_common())
        check = check_label_map(raw_classes, classes, label_map or LabelMap())
        check.items_seen = counts["items"]
        if check.warning:
            log.warning("label map: %s", check.warning)
        stats["label_map_check"] = check.model_dump()
    stats["errors"] = errors
    log.info("%s: %d items, %d errors", stats["format"], stats["items"], len(errors))
    return stats


def label_map_check(
    project: ProjectFormat,
    predictions: PredictionSource,
    label_map: LabelMap,
    *,
    limit: int | None = 2000,
    warn: bool = True,
) -> LabelMapCheck:
    """:func:`connectors.labelmap.check_label_map` on the classes of the first ``limit``
    items (all with ``None``) and their predictions; its warning is logged (``warn``)."""
    project_classes: Counter[str] = Counter()
    predicted: Counter[str] = Counter()
    seen = 0
    for item in itertools.islice(project.iter_items(), limit):
        seen += 1
        if item.error is not None:
            continue
        if item.is_labeled:
            project_classes.update(a.label for a in item.annotations)
        prediction = predictions.get(item.item_id, item)
        if prediction is not None and prediction.error is None:
            predicted.update(a.label for a in prediction.annotations)
    check = check_label_map(predicted, project_classes, label_map)
    check.items_seen = seen
    if warn and check.warning:
        log.warning("label map: %s", check.warning)
    return check

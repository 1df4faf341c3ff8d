"""Counts of a project: items, labels, boxes per class, predictions and bad items.

One pass over the item stream (and one prediction look-up per item when predictions are
given); memory holds counters and the list of errors, never the items.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from connectors.formats.base import PredictionSource, ProjectFormat
from connectors.labelmap import LabelMap, LabelMapCheck, check_label_map
from connectors.model import Item, ItemStatus, Prediction

log = logging.getLogger(__name__)

LABEL_MAP_CHECK_ITEMS = 2000
"""Items whose classes (and predictions' classes) the label-map check counts."""


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
    limit: int | None = LABEL_MAP_CHECK_ITEMS,
    warn: bool = True,
) -> LabelMapCheck:
    """:func:`connectors.labelmap.check_label_map` on the classes of the first ``limit``
    items (all with ``None``) and their predictions; its warning is logged (``warn``).

    A run that reads the items and their predictions anyway takes the same counts from
    its own stream with a :class:`LabelMapTally` instead of reading them again.
    """
    tally = LabelMapTally(predictions, limit=limit)
    for item in tally.items(itertools.islice(project.iter_items(), limit)):
        if item.error is None:
            tally.predictions.get(item.item_id, item)
    return tally.check(label_map, warn=warn)


class LabelMapTally:
    """The counts of :func:`label_map_check`, taken from the stream a run reads anyway.

    :meth:`items` passes the run's item stream through and counts the labels of its
    first ``limit`` items; :attr:`predictions` is ``predictions`` counting the classes
    of each prediction the run looks up for one of those items (once per item).
    :meth:`check` then makes the check, first looking up the predictions of counted
    items that the run did not look up here (e.g. because other processes did), so the
    result is that of :func:`label_map_check` whoever read what.  Memory: at most
    ``limit`` items waiting for their prediction.
    """

    def __init__(
        self, predictions: PredictionSource, *, limit: int | None = LABEL_MAP_CHECK_ITEMS
    ) -> None:
        self.limit = limit
        self.seen = 0
        self.project_classes: Counter[str] = Counter()
        self.predicted: Counter[str] = Counter()
        self.waiting: dict[str, Item] = {}
        self.source = predictions
        self.predictions: PredictionSource = _CountedPredictions(predictions, self)

    def items(self, stream: Iterable[Item]) -> Iterator[Item]:
        """``stream`` as it is, counting its first ``limit`` items."""
        for item in stream:
            if self.limit is None or self.seen < self.limit:
                self.seen += 1
                if item.error is None:
                    if item.is_labeled:
                        self.project_classes.update(a.label for a in item.annotations)
                    self.waiting[item.item_id] = item
            yield item

    def count(self, item_id: str, prediction: Prediction | None) -> None:
        """Count ``prediction`` when its item is counted and waits for one."""
        if self.waiting.pop(item_id, None) is None:
            return
        if prediction is not None and prediction.error is None:
            self.predicted.update(a.label for a in prediction.annotations)

    def check(self, label_map: LabelMap, *, warn: bool = True) -> LabelMapCheck:
        """:func:`connectors.labelmap.check_label_map` on the counts; its warning logged."""
        for item_id, item in list(self.waiting.items()):
            self.count(item_id, self.source.get(item_id, item))
        check = check_label_map(self.predicted, self.project_classes, label_map)
        check.items_seen = self.seen
        if warn and check.warning:
            log.warning("label map: %s", check.warning)
        return check


class _CountedPredictions(PredictionSource):
    """A prediction source whose look-ups a :class:`LabelMapTally` counts; every other
    attribute is the wrapped source's."""

    def __init__(self, inner: PredictionSource, tally: LabelMapTally) -> None:
        self._inner = inner
        self._tally = tally

    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        prediction = self._inner.get(item_id, item)
        if self._tally.waiting:
            self._tally.count(item_id, prediction)
        return prediction

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self._inner)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self._inner, name)

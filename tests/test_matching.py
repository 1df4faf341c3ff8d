"""The review rule: one-to-one matching, ignore regions, label maps, per-item error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.labelmap import LabelMap
from connectors.model import Annotation, Item, ItemStatus, Prediction
from difficulty.matching import (
    MatchResult,
    box_iou,
    item_correct,
    item_error,
    match_curve,
    match_detections,
    wrong_at,
)


def box(
    label: str, x1: float, y1: float, x2: float, y2: float, score: float | None = None
) -> Annotation:
    return Annotation(label=label, box=(x1, y1, x2, y2), score=score)


def test_box_iou_known_values() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0])
    np.testing.assert_allclose(iou[1], [0.0, 0.0, 0.0])


coords = st.floats(0, 100, allow_nan=False)


@given(st.lists(st.tuples(coords, coords, coords, coords), min_size=1, max_size=5))
def test_box_iou_symmetric_and_in_range(raw: list[tuple[float, float, float, float]]) -> None:
    boxes = np.array([[min(a, c), min(b, d), max(a, c), max(b, d)] for a, b, c, d in raw])
    iou = box_iou(boxes, boxes)
    assert np.all((iou >= 0) & (iou <= 1 + 1e-12))
    np.testing.assert_allclose(iou, iou.T)


def test_exact_match_is_correct() -> None:
    gt = [box("car", 0, 0, 10, 10), box("car", 20, 20, 30, 30)]
    pred = [box("car", 0, 0, 10, 11, 0.9), box("car", 20, 20, 30, 30, 0.8)]
    assert match_detections(gt, pred) == MatchResult(tp=2, fp=0, fn=0, ignored=0, correct=True)


def test_wrong_class_is_a_miss_and_an_extra() -> None:
    m = match_detections([box("car", 0, 0, 10, 10)], [box("van", 0, 0, 10, 10, 0.9)])
    assert (m.tp, m.fp, m.fn, m.correct) == (0, 1, 1, False)


def test_iou_below_threshold_fails() -> None:
    # IoU = 50/150 = 0.33
    m = match_detections([box("car", 0, 0, 10, 10)], [box("car", 5, 0, 15, 10, 0.9)])
    assert not m.correct and m.fn == 1 and m.fp == 1


def test_one_to_one_duplicate_is_a_false_positive() -> None:
    gt = [box("car", 0, 0, 10, 10)]
    pred = [box("car", 0, 0, 10, 10, 0.9), box("car", 0, 0, 10, 10, 0.8)]
    m = match_detections(gt, pred)
    assert (m.tp, m.fp, m.fn, m.correct) == (1, 1, 0, False)


def test_greedy_by_score_takes_best_iou_target() -> None:
    gt = [box("car", 0, 0, 10, 10), box("car", 2, 0, 12, 10)]
    # the higher-scored prediction overlaps the second target best
    pred = [box("car", 0, 0, 10, 10, 0.5), box("car", 2, 0, 12, 10, 0.9)]
    m = match_detections(gt, pred)
    assert m.correct and m.tp == 2


def test_min_score_drops_low_confidence_boxes() -> None:
    gt = [box("car", 0, 0, 10, 10)]
    pred = [box("car", 0, 0, 10, 10, 0.9), box("car", 50, 50, 60, 60, 0.1)]
    assert not match_detections(gt, pred).correct
    assert match_detections(gt, pred, min_score=0.2).correct
    assert not match_detections(gt, pred, min_score=0.95).correct  # the true box is dropped too


def test_empty_both_is_correct_and_error_zero() -> None:
    assert match_detections([], []).correct
    item = Item(item_id="a", uri="a.jpg", status=ItemStatus.LABELED)
    assert item_error(item, None, LabelMap()) == 0.0
    assert item_correct(item, None, LabelMap())


def test_ignore_region_neither_target_nor_false_positive() -> None:
    gt = [box("Car", 0, 0, 10, 10), box("DontCare", 100, 100, 200, 200)]
    inside = box("Car", 110, 110, 150, 150, 0.7)  # IoA 1.0 with the region
    m = match_detections(gt, [box("Car", 0, 0, 10, 10, 0.9), inside], ignore_labels={"DontCare"})
    assert (m.tp, m.fp, m.fn, m.ignored, m.correct) == (1, 0, 0, 1, True)
    # the ignore region itself is no miss
    m2 = match_detections(gt, [box("Car", 0, 0, 10, 10, 0.9)], ignore_labels={"DontCare"})
    assert m2.correct and m2.fn == 0


def test_prediction_mostly_outside_ignore_region_is_false_positive() -> None:
    gt = [box("DontCare", 100, 100, 200, 200)]
    straddling = box("Car", 60, 100, 120, 200, 0.7)  # IoA = 20/60 < 0.5
    m = match_detections(gt, [straddling], ignore_labels={"DontCare"})
    assert m.fp == 1 and not m.correct


def test_without_ignore_the_dontcare_box_is_a_target() -> None:
    gt = [box("DontCare", 100, 100, 200, 200)]
    assert not match_detections(gt, []).correct


def test_prediction_matching_real_gt_inside_ignore_region_is_a_true_positive() -> None:
    gt = [box("Car", 110, 110, 150, 150), box("DontCare", 100, 100, 200, 200)]
    m = match_detections(gt, [box("Car", 110, 110, 150, 150, 0.9)], ignore_labels={"DontCare"})
    assert (m.tp, m.ignored) == (1, 0)


def test_item_correct_applies_label_map_and_drops_unmapped() -> None:
    lm = LabelMap(map={"stop sign": "stop", "traffic light": "trafficlight"})
    item = Item(
        item_id="a", uri="a.jpg", status=ItemStatus.LABELED, annotations=[box("stop", 0, 0, 10, 10)]
    )
    pred = Prediction(
        item_id="a",
        annotations=[box("stop sign", 0, 0, 10, 10, 0.9), box("person", 50, 50, 60, 60, 0.9)],
    )
    assert item_correct(item, pred, lm)  # person is unmapped → dropped
    assert not item_correct(
        item, pred, LabelMap()
    )  # no map: "stop sign" != "stop", person is extra
    assert not item_correct(item, None, lm)


def test_item_correct_with_label_map_and_ignore_kitti_style() -> None:
    lm = LabelMap(map={"car": "Car", "person": "Pedestrian"}, ignore=("DontCare",))
    item = Item(
        item_id="000001",
        uri="images/000001.jpg",
        status=ItemStatus.LABELED,
        annotations=[box("Car", 0, 0, 40, 20), box("DontCare", 300, 100, 400, 150)],
    )
    pred = Prediction(
        item_id="000001",
        annotations=[
            box("car", 1, 0, 40, 20, 0.8),
            box("car", 320, 110, 360, 140, 0.3),
            box("truck", 500, 0, 600, 50, 0.9),
        ],
    )
    assert item_correct(item, pred, lm)
    assert item_error(item, pred, lm) == 0.0


def test_item_error_is_one_minus_f1() -> None:
    item = Item(
        item_id="a",
        uri="a.jpg",
        status=ItemStatus.LABELED,
        annotations=[box("c", 0, 0, 10, 10), box("c", 20, 0, 30, 10)],
    )
    pred = Prediction(
        item_id="a", annotations=[box("c", 0, 0, 10, 10, 0.9), box("c", 50, 50, 60, 60, 0.8)]
    )
    # tp=1 fp=1 fn=1 → (1+1)/(2+1+1)
    assert item_error(item, pred, LabelMap()) == pytest.approx(0.5)
    assert item_error(item, Prediction(item_id="a"), LabelMap()) == 1.0


def test_classification_argmax_with_label_map() -> None:
    item = Item(
        item_id="a", uri="a.png", status=ItemStatus.LABELED, annotations=[Annotation(label="7")]
    )
    pred = Prediction(item_id="a", probs={"seven": 0.6, "one": 0.4})
    lm = LabelMap(map={"seven": "7", "one": "1"})
    assert item_correct(item, pred, lm, task="classification")
    assert item_error(item, pred, lm, task="classification") == 0.0
    assert not item_correct(item, pred, lm, task="classification", min_score=0.7)
    wrong = Prediction(item_id="a", probs={"seven": 0.2, "one": 0.8})
    assert item_error(item, wrong, lm, task="classification") == 1.0
    by_label = Prediction(item_id="a", annotations=[Annotation(label="seven", score=0.9)])
    assert item_correct(item, by_label, lm, task="classification")


# -- one matching for every box confidence ------------------------------------------------


def reference_match(
    gt: list[Annotation], pred: list[Annotation], ignore: set[str], min_score: float
) -> tuple[int, int, int, int]:
    """The review rule written out plainly, one threshold at a time: (tp, fp, fn, ignored)."""
    targets = [a for a in gt if a.label not in ignore]
    regions = [a for a in gt if a.label in ignore]
    kept = [a for a in pred if (1.0 if a.score is None else a.score) >= min_score]
    ignored = sum(a.label in ignore for a in kept)
    kept = sorted(
        (a for a in kept if a.label not in ignore),
        key=lambda a: -(1.0 if a.score is None else a.score),
    )
    taken: set[int] = set()
    tp = fp = 0
    for p in kept:
        best, best_iou = -1, -1.0
        for j, t in enumerate(targets):
            if j in taken or t.label != p.label:
                continue
            iou = float(box_iou(np.array([p.box]), np.array([t.box]))[0, 0])
            if iou > best_iou:
                best, best_iou = j, iou
        if best >= 0 and best_iou >= 0.5:
            taken.add(best)
            tp += 1
            continue
        x1, y1, x2, y2 = p.box  # type: ignore[misc]
        area = max(x2 - x1, 0) * max(y2 - y1, 0)
        inside = False
        for r in regions:
            ix = max(min(x2, r.box[2]) - max(x1, r.box[0]), 0)  # type: ignore[index]
            iy = max(min(y2, r.box[3]) - max(y1, r.box[1]), 0)  # type: ignore[index]
            inside = inside or (area > 0 and ix * iy / area >= 0.5)
        if inside:
            ignored += 1
        else:
            fp += 1
    return tp, fp, len(targets) - tp, ignored


grid = st.integers(0, 6).map(lambda v: v * 5.0)
box_st = st.tuples(
    st.sampled_from(["car", "van", "DontCare"]), grid, grid, st.integers(1, 4), st.integers(1, 4)
)
score_st = st.one_of(st.none(), st.sampled_from([0.1, 0.25, 0.3, 0.3, 0.55, 0.7, 0.9, 1.0]))


def to_annotation(b: tuple[str, float, float, int, int], score: float | None) -> Annotation:
    label, x, y, w, h = b
    return box(label, x, y, x + 5.0 * w, y + 5.0 * h, score)


@settings(deadline=None)  # runs the matcher nine times per example; slow on a busy machine
@given(
    st.lists(box_st, max_size=5),
    st.lists(st.tuples(box_st, score_st), max_size=7),
    st.booleans(),
)
def test_curve_equals_matching_at_every_confidence(
    gt_raw: list[tuple[str, float, float, int, int]],
    pred_raw: list[tuple[tuple[str, float, float, int, int], float | None]],
    with_ignore: bool,
) -> None:
    gt = [to_annotation(b, None) for b in gt_raw]
    pred = [to_annotation(b, s) for b, s in pred_raw]
    ignore = {"DontCare"} if with_ignore else set()
    curve = match_curve(gt, pred, ignore_labels=ignore)
    for c in (0.0, 0.1, 0.2, 0.25, 0.3, 0.31, 0.7, 0.95, 1.0):
        expected = reference_match(gt, pred, ignore, c)
        m = curve.at(c)
        assert (m.tp, m.fp, m.fn, m.ignored) == expected
        assert m == match_detections(gt, pred, ignore_labels=ignore, min_score=c)
        assert m.correct == (m.fp == 0 and m.fn == 0)


def test_curve_refuses_confidences_below_its_start() -> None:
    curve = match_curve([box("car", 0, 0, 10, 10)], [box("car", 0, 0, 10, 10, 0.5)], min_score=0.3)
    assert curve.at(0.3).correct and not curve.at(0.6).correct
    with pytest.raises(ValueError, match=r"starts at score 0\.3"):
        curve.at(0.1)


def test_wrong_at_is_item_correct_per_confidence() -> None:
    lm = LabelMap(map={"car": "Car"}, ignore=("DontCare",))
    item = Item(
        item_id="a",
        uri="a.jpg",
        status=ItemStatus.LABELED,
        annotations=[box("Car", 0, 0, 40, 20), box("DontCare", 300, 100, 400, 150)],
    )
    pred = Prediction(
        item_id="a",
        annotations=[
            box("car", 1, 0, 40, 20, 0.8),
            box("car", 100, 100, 140, 140, 0.2),  # an extra box, only at low confidence
            box("car", 320, 110, 360, 140, 0.5),  # inside the ignore region
        ],
    )
    grid_c = [0.1, 0.25, 0.5, 0.9]
    assert wrong_at(item, pred, lm, grid_c) == [True, False, False, True]
    assert wrong_at(item, pred, lm, grid_c) == [
        not item_correct(item, pred, lm, min_score=c) for c in grid_c
    ]
    assert wrong_at(item, None, lm, grid_c) == [True] * 4
    cls_item = Item(
        item_id="b", uri="b.png", status=ItemStatus.LABELED, annotations=[Annotation(label="7")]
    )
    probs = Prediction(item_id="b", probs={"7": 0.6, "1": 0.4})
    assert wrong_at(cls_item, probs, LabelMap(), [0.5, 0.7], task="classification") == [
        False,
        True,
    ]

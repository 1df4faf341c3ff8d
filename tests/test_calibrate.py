"""Clopper–Pearson bound and the fixed-sequence (Learn-then-Test) walk."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import beta, binom

from autolabel.calibrate import (
    calibrate,
    calibrate_with_confidence,
    clopper_pearson_upper,
    fixed_sequence_threshold,
    min_passing_count,
)
from connectors.errors import UsageError
from connectors.labelmap import LabelMap
from connectors.model import Annotation, Item, ItemStatus, Prediction


@pytest.mark.parametrize(
    ("k", "n", "delta"),
    [(0, 30, 0.1), (3, 50, 0.05), (10, 100, 0.1), (1, 1000, 0.01), (29, 30, 0.2)],
)
def test_clopper_pearson_matches_scipy_beta_quantile(k: int, n: int, delta: float) -> None:
    assert clopper_pearson_upper(k, n, delta) == pytest.approx(
        beta.ppf(1 - delta, k + 1, n - k), rel=1e-12
    )


def test_clopper_pearson_is_scipys_beta_quantile_to_the_bit() -> None:
    """Computed without scipy.stats, the bound is the same float: a threshold that passed
    at ε before passes now, and one that failed still fails."""
    for n in range(1, 160):
        for k in range(n):
            for delta in (0.1, 0.05, 0.01, 0.1 / 3, 0.1 / 5):
                assert clopper_pearson_upper(k, n, delta) == beta.ppf(1 - delta, k + 1, n - k)


def test_clopper_pearson_closed_form_for_zero_errors() -> None:
    # k = 0: the bound solves (1 - p)^n = delta
    n, delta = 40, 0.1
    assert clopper_pearson_upper(0, n, delta) == pytest.approx(1 - delta ** (1 / n))


def test_clopper_pearson_edges() -> None:
    assert clopper_pearson_upper(0, 0, 0.1) == 1.0
    assert clopper_pearson_upper(5, 5, 0.1) == 1.0
    with pytest.raises(ValueError):
        clopper_pearson_upper(6, 5, 0.1)
    with pytest.raises(ValueError):
        clopper_pearson_upper(1, 5, 1.5)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 300).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n))),
    st.sampled_from([0.01, 0.05, 0.1, 0.2]),
)
def test_clopper_pearson_is_exact_tail(kn: tuple[int, int], delta: float) -> None:
    k, n = kn
    u = clopper_pearson_upper(k, n, delta)
    # at the bound, seeing k or fewer errors has probability delta exactly
    assert binom.cdf(k, n, u) == pytest.approx(delta, abs=1e-9)
    assert u >= k / n


def test_walk_picks_last_passing_threshold() -> None:
    # 100 easy items (no error), then 100 hard items (all wrong)
    scores = np.linspace(0, 1, 200)
    errors = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    res = fixed_sequence_threshold(
        scores,
        errors,
        epsilon=0.1,
        delta=0.1,
        candidates=scores[[49, 99, 104, 149, 199]],
        min_count=30,
    )
    assert res.threshold == pytest.approx(scores[104])  # 105 items, 5 wrong: CP(5, 105, .1) = 0.082
    assert res.n == 105 and res.k == 5
    assert res.bound <= 0.1
    assert [s.passed for s in res.steps] == [True, True, True, False, False]
    assert [s.tested for s in res.steps] == [True, True, True, True, False]


def test_walk_stops_at_first_failure_even_if_later_passes() -> None:
    # a bad patch early in the sequence: fixed sequence must not jump over it
    scores = np.arange(300, dtype=float)
    errors = np.zeros(300, bool)
    errors[30:45] = True  # 15 wrong among the first 60
    res = fixed_sequence_threshold(
        scores,
        errors,
        epsilon=0.1,
        delta=0.1,
        candidates=np.array([29.0, 59.0, 299.0]),
        min_count=30,
    )
    # 300 items with 15 wrong would pass (CP(15, 300, .1) = 0.068), but 60 with 15 fails first
    assert clopper_pearson_upper(15, 300, 0.1) <= 0.1
    assert res.threshold == 29.0
    assert [s.passed for s in res.steps] == [True, False, False]
    assert not res.steps[2].tested


def test_walk_nothing_passes() -> None:
    scores = np.linspace(0, 1, 100)
    errors = np.zeros(100, bool)
    errors[::3] = True
    res = fixed_sequence_threshold(scores, errors, epsilon=0.05, delta=0.1)
    assert res.threshold is None
    assert res.coverage == 0.0
    assert res.bound > 0.05
    assert res.steps[0].tested is False  # fewer than 30 items under the strictest quantiles
    assert next(s for s in res.steps if s.tested).passed is False


def test_walk_min_count_skips_small_sets_instead_of_stopping() -> None:
    scores = np.arange(100, dtype=float)
    errors = np.zeros(100, bool)
    errors[:3] = True  # errors among the strictest items: with 25 items they would stop the walk
    cands = np.array([24.0, 99.0])
    res = fixed_sequence_threshold(
        scores, errors, epsilon=0.1, delta=0.1, candidates=cands, min_count=30
    )
    assert [s.tested for s in res.steps] == [False, True]
    assert res.threshold == 99.0 and res.k == 3
    strict = fixed_sequence_threshold(
        scores, errors, epsilon=0.1, delta=0.1, candidates=cands, min_count=1
    )
    assert strict.threshold is None  # tested at n=25: CP(3, 25, .1) > .1 stops the walk
    assert strict.steps[0].tested and not strict.steps[1].tested


def test_walk_skips_sets_too_small_to_ever_pass() -> None:
    # ε = 0.05, δ = 0.1: even with no error at all, 44 items give a bound above ε
    assert min_passing_count(0.05, 0.1) == 45
    assert clopper_pearson_upper(0, 45, 0.1) <= 0.05 < clopper_pearson_upper(0, 44, 0.1)
    scores = np.arange(200, dtype=float)
    res = fixed_sequence_threshold(
        scores,
        np.zeros(200, bool),
        epsilon=0.05,
        delta=0.1,
        candidates=np.array([34.0, 199.0]),
        min_count=30,
    )
    assert [s.tested for s in res.steps] == [False, True]
    assert res.threshold == 199.0


def test_walk_no_candidate_reaches_min_count() -> None:
    res = fixed_sequence_threshold(
        np.arange(10.0), np.zeros(10, bool), epsilon=0.1, delta=0.1, min_count=30
    )
    assert res.threshold is None and res.n == 0 and res.bound == 1.0
    assert not any(s.tested for s in res.steps)


def test_walk_rejects_bad_input() -> None:
    with pytest.raises(UsageError):
        fixed_sequence_threshold(np.zeros(3), np.zeros(3, bool), epsilon=0.0, delta=0.1)
    with pytest.raises(UsageError):
        fixed_sequence_threshold(np.zeros(3), np.zeros(3, bool), epsilon=0.1, delta=1.0)
    with pytest.raises(ValueError, match="NaN"):
        fixed_sequence_threshold(np.array([0.1, np.nan]), np.zeros(2, bool), epsilon=0.1, delta=0.1)


def test_walk_controls_risk_in_simulation() -> None:
    """Over many calibration draws, the chosen threshold's true risk exceeds ε at most δ of the time."""
    rng = np.random.default_rng(0)
    epsilon, delta, n = 0.1, 0.1, 400
    # true conditional error rate rises with the score: p(s) = s / 2, so R(t) = t / 4
    violations = 0
    trials = 300
    for _ in range(trials):
        s = rng.uniform(0, 1, n)
        e = rng.uniform(0, 1, n) < s / 2
        res = fixed_sequence_threshold(
            s, e, epsilon=epsilon, delta=delta, candidates=np.linspace(0.05, 1, 20)
        )
        if res.threshold is not None and res.threshold / 4 > epsilon:
            violations += 1
    assert violations / trials <= delta


def test_bonferroni_over_box_confidence_picks_largest_coverage() -> None:
    scores = np.arange(200, dtype=float)
    loose = np.zeros(200, bool)
    loose[::4] = True  # confidence 0.1: many extra boxes → 25% wrong everywhere
    tight = np.zeros(200, bool)
    tight[150:] = True  # confidence 0.5: right on the easiest 150
    res = calibrate_with_confidence(
        scores,
        {0.1: loose, 0.5: tight},
        epsilon=0.1,
        delta=0.1,
        candidates=np.arange(49, 200, 50, dtype=float),
    )
    assert res.box_confidence == 0.5
    assert res.threshold == 149.0
    assert res.level == pytest.approx(0.05)
    assert len(res.per_confidence) == 2 and res.per_confidence[0].threshold is None
    assert res.to_dict()["coverage"] == pytest.approx(0.75)


def _item(i: int, *, labeled: bool = True, boxes: list[Annotation] | None = None) -> Item:
    return Item(
        item_id=f"i{i}",
        uri=f"images/i{i}.jpg",
        status=ItemStatus.LABELED if labeled else ItemStatus.UNLABELED,
        annotations=boxes or [] if labeled else [],
    )


def test_calibrate_end_to_end_on_items() -> None:
    gt = Annotation(label="stop", box=(0, 0, 10, 10))
    items = [_item(i, boxes=[gt]) for i in range(120)] + [
        _item(500 + i, labeled=False) for i in range(20)
    ]
    preds: dict[str, Prediction] = {}
    for i in range(120):
        anns = [Annotation(label="stop sign", box=(0, 0, 10, 10), score=0.9)]
        if i >= 80:  # harder items carry a spurious low-confidence box
            anns.append(Annotation(label="stop sign", box=(50, 50, 60, 60), score=0.3))
        preds[f"i{i}"] = Prediction(item_id=f"i{i}", annotations=anns)
    df = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(120)] + [f"i{500 + i}" for i in range(20)],
            "score": np.r_[np.linspace(0, 1, 120), np.full(20, 0.1)],
        }
    )
    lm = LabelMap(map={"stop sign": "stop"})
    res = calibrate(items, df, preds, lm, epsilon=0.05, delta=0.1, box_confidences=(0.1, 0.5))
    assert res.n_calibration == 120  # unlabeled items are not calibration items
    assert res.box_confidence == 0.5 and res.threshold == pytest.approx(1.0) and res.k == 0
    only_low = calibrate(items, df, preds, lm, epsilon=0.05, delta=0.1, box_confidences=(0.1,))
    assert only_low.threshold is not None and only_low.threshold < 0.7
    held_out = calibrate(
        items,
        df,
        preds,
        lm,
        epsilon=0.05,
        delta=0.1,
        box_confidences=(0.5,),
        calibration_ids=[f"i{i}" for i in range(20)],
    )
    assert held_out.n_calibration == 20 and held_out.threshold is None


def test_calibration_matches_each_item_once_for_all_box_confidences(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import difficulty.matching

    gt = Annotation(label="stop", box=(0, 0, 10, 10))
    items = [_item(i, boxes=[gt]) for i in range(30)]
    preds = {
        f"i{i}": Prediction(
            item_id=f"i{i}",
            annotations=[
                Annotation(label="stop", box=(0, 0, 10, 10), score=0.9),
                Annotation(label="stop", box=(40, 40, 50, 50), score=0.1 + 0.02 * i),
            ],
        )
        for i in range(30)
    }
    df = pd.DataFrame({"item_id": [f"i{i}" for i in range(30)], "score": np.linspace(0, 1, 30)})
    calls = {"match_curve": 0, "match_detections": 0}
    for name in calls:
        real = getattr(difficulty.matching, name)

        def counted(*args: object, _real: object = real, _name: str = name, **kw: object) -> object:
            calls[_name] += 1
            return _real(*args, **kw)  # type: ignore[operator]

        monkeypatch.setattr(difficulty.matching, name, counted)
    confidences = (0.1, 0.2, 0.3, 0.5, 0.7)
    res = calibrate(
        items, df, preds, LabelMap(), epsilon=0.05, delta=0.1, box_confidences=confidences
    )
    assert res.n_calibration == 30
    assert calls["match_curve"] + calls["match_detections"] == 30  # not 30 × 5

"""Calibrating the easy tier: the largest auto-label set with a guaranteed error bound.

What is guaranteed
------------------
An item's *auto-label* is its predicted boxes (label-mapped) whose confidence is at
least ``c``; it is *wrong* when a reviewer would reject it (see
:mod:`difficulty.matching`).  For a difficulty threshold ``t`` let
``R(c, t) = P(wrong | score ≤ t)`` be the error rate among items the rule would
auto-label.  We choose ``(c, t)`` from labeled calibration items, exchangeable with the
unlabeled items to be written, such that

    P( R(c, t) ≤ ε )  ≥  1 − δ      (over the draw of the calibration set).

The argument (Learn-then-Test, Angelopoulos et al. 2021)
--------------------------------------------------------
* For each candidate ``t`` the null hypothesis is ``H_t: R(c, t) > ε``.  Among the
  ``n`` calibration items with ``score ≤ t`` the number ``k`` of wrong auto-labels is
  ``Binomial(n, R(c, t))``, so rejecting ``H_t`` when the one-sided Clopper–Pearson upper
  bound ``U(k, n, δ) = Beta⁻¹(1 − δ; k + 1, n − k)`` is ``≤ ε`` is a level-``δ`` test.
* **Fixed sequence.**  Candidates are ordered strict → loose (ascending ``t``) before any
  correctness is looked at, and tested in that order at the *full* level ``δ``; the walk
  stops at the first candidate that is not rejected (bound ``> ε``).  A true null can
  only be rejected if the first true null in the sequence is rejected, which happens
  with probability ``≤ δ``; hence the family-wise error is ``≤ δ`` with no split of
  ``δ`` across the sequence.  The last rejected candidate is the threshold; if the first
  tested candidate already fails, nothing is auto-labeled.
* **Minimum count.**  Candidates with fewer than ``min_count`` calibration items under
  them are *not tested* (neither pass nor stop the walk); the sequence starts at the
  first candidate with ``n ≥ min_count``.  Which candidates are tested depends only on
  the scores, never on correctness, so the ordering is still fixed before the tests and
  the argument above holds unchanged.  Since ``n`` only grows with ``t``, every candidate
  after the first tested one is tested too.  The walk also skips candidates with too few
  items to pass even with zero errors (``n < ln(level) / ln(1 − ε)``, where the bound of
  ``k = 0`` first drops to ``ε``): testing them could only stop the walk.  That count
  again depends on ``n`` alone, so it is part of the fixed sequence, not a look at errors.
* **Box confidence.**  The per-box confidence ``c`` changes which boxes become labels and
  so which items are right.  Two ways to fix it, both valid:

  - *chosen beforehand, full δ* (a labeltriage checkpoint): the checkpoint records the
    ``c`` chosen on its own **training** items (:mod:`difficulty.boxconfidence`).  Those
    are disjoint from the calibration items, so ``c`` is a function of data independent of
    them — as fixed, from the calibration's point of view, as a constant.  Conditionally
    on the training data the hypotheses ``H_t`` for this one ``c`` form a single fixed
    sequence, tested at the full level ``δ`` as above; integrating over the training
    data keeps ``P(a true H_t is rejected) ≤ δ``.  The grid is then ``C = {c}``.
  - *calibrated, δ split* (brought predictions, or a grid given explicitly): for a grid
    ``C`` the fixed-sequence walk runs once per ``c`` at level ``δ / |C|`` (Bonferroni).
    The union bound gives ``P(any rejected H is true) ≤ |C| · δ/|C| = δ``, so *every*
    passing ``(c, t)`` is simultaneously valid and we may pick any of them after
    looking: we pick the one with the largest coverage (most calibration items under
    ``t``; ties go to the lower bound).  The price: a threshold passes only with more
    calibration items (``min_passing_count`` at ``δ / |C|``: 38 error-free items instead
    of 22 at ε = δ = 0.1 with 5 confidences).

Assumptions, stated plainly: calibration and target items are exchangeable (drawn from
the same distribution — not the case if the labeled items were chosen as the hardest by
active learning), the model did not train on the calibration items (a brought model's
predictions are taken on trust), and the difficulty score is fixed before calibration.
The last one holds for a score computed from predictions or images alone; a combined
score whose few weights were fit on labeled items (``difficulty.combine``) reuses the
calibration labels for those weights, which makes the bound slightly optimistic — the
gate records how many labeled items the weights were fit on (``score_weights_fit_on``).
The guarantee is on the *rate* ``R``; the realised error on a finite target set
fluctuates around it (see ``bench/autolabel_guarantee.py`` for the measured behaviour).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
from scipy.special import betaincinv

from connectors.errors import UsageError
from connectors.labelmap import LabelMap
from connectors.model import Item, Prediction
from difficulty.boxconfidence import DEFAULT_BOX_CONFIDENCES
from difficulty.items import usable_scores as _score_lookup
from difficulty.matching import wrong_at

log = logging.getLogger(__name__)


DEFAULT_MAX_CANDIDATES = 50
"""Default number of difficulty thresholds (quantiles of the calibration scores)."""


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """One-sided exact (Clopper–Pearson) upper ``1 − δ`` confidence bound of a rate.

    ``k`` errors in ``n`` trials: ``Beta⁻¹(1 − δ; k + 1, n − k)``; 1 when ``n == 0`` or
    ``k == n``.  The inverse regularized incomplete beta function of ``scipy.special``
    gives the quantile ``scipy.stats.beta.ppf`` gives, to the bit, without importing
    ``scipy.stats`` (about half a second of every gate run's start-up).
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if n == 0 or k >= n:
        return 1.0
    return float(betaincinv(k + 1, n - k, 1.0 - delta))


@dataclass(frozen=True)
class CalibrationStep:
    """One candidate threshold of the walk: ``n`` items with score ≤ ``threshold``, ``k`` wrong."""

    threshold: float
    n: int
    k: int
    bound: float
    tested: bool
    passed: bool


@dataclass(frozen=True)
class CalibrationResult:
    """The outcome of a calibration.

    ``threshold`` is ``None`` when nothing may be auto-labeled.  ``bound``/``n``/``k``
    belong to the chosen threshold (or, when none passed, to the first tested candidate;
    ``bound = 1`` and ``n = 0`` when none could be tested).  ``delta`` is the confidence
    level of the whole procedure; ``level`` the level each walk used (``δ / |C|``).
    """

    threshold: float | None
    bound: float
    n: int
    k: int
    epsilon: float
    delta: float
    steps: list[CalibrationStep] = field(default_factory=list)
    box_confidence: float | None = None
    level: float | None = None
    n_calibration: int = 0
    min_count: int = 30
    per_confidence: list[CalibrationResult] = field(default_factory=list)

    @property
    def coverage(self) -> float:
        """Share of calibration items under the chosen threshold."""
        return (
            self.n / self.n_calibration
            if self.n_calibration and self.threshold is not None
            else 0.0
        )

    def to_dict(self, *, with_steps: bool = False) -> dict[str, Any]:
        """A JSON-ready summary (steps of each walk only with ``with_steps``)."""
        out: dict[str, Any] = {
            "threshold": self.threshold,
            "box_confidence": self.box_confidence,
            "bound": self.bound,
            "n": self.n,
            "k": self.k,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "level": self.level,
            "n_calibration": self.n_calibration,
            "min_count": self.min_count,
            "coverage": self.coverage,
        }
        if with_steps:
            out["steps"] = [asdict(s) for s in self.steps]
        if self.per_confidence:
            out["per_confidence"] = [r.to_dict(with_steps=with_steps) for r in self.per_confidence]
        return out


def default_candidates(
    scores: np.ndarray, max_candidates: int = DEFAULT_MAX_CANDIDATES
) -> np.ndarray:
    """Candidate thresholds: distinct quantiles of ``scores``, ascending (strict → loose).

    They depend on the scores only, never on correctness.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return np.zeros(0)
    qs = np.quantile(scores, np.linspace(0.0, 1.0, max_candidates + 1)[1:], method="inverted_cdf")
    return np.unique(qs)


def min_passing_count(epsilon: float, level: float) -> int:
    """The least ``n`` for which ``n`` items without an error give a bound ``≤ ε``."""
    n = max(1, math.ceil(math.log(level) / math.log1p(-epsilon)))
    while clopper_pearson_upper(0, n, level) > epsilon:  # guard against rounding at the edge
        n += 1
    return n


def _validate(epsilon: float, delta: float, min_count: int) -> None:
    if not 0.0 < epsilon < 1.0:
        raise UsageError(f"epsilon must be in (0, 1), got {epsilon}")
    if not 0.0 < delta < 1.0:
        raise UsageError(f"delta must be in (0, 1), got {delta}")
    if min_count < 1:
        raise UsageError(f"min_count must be at least 1, got {min_count}")


def _candidates(scores: np.ndarray, candidates: np.ndarray | None) -> np.ndarray:
    """The thresholds to walk: ``candidates`` (sorted, unique), else the defaults for
    ``scores`` ``(N,)``; ValueError when a score is NaN."""
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN: drop unscored items before calibrating")
    if candidates is None:
        return default_candidates(scores)
    return np.unique(np.asarray(candidates, dtype=np.float64))


def fixed_sequence_threshold(
    scores: np.ndarray,
    errors: np.ndarray,
    *,
    epsilon: float,
    delta: float,
    candidates: np.ndarray | None = None,
    min_count: int = 30,
) -> CalibrationResult:
    """The loosest difficulty threshold whose error bound stays ≤ ε, walking strict → loose.

    ``scores``: ``(N,)`` difficulty of the calibration items (higher = harder);
    ``errors``: ``(N,)`` bool, True where the auto-label would be wrong.  Items with
    ``score ≤ t`` form the auto-label set of threshold ``t``.  See the module docstring
    for why the result holds with probability ``1 − δ``.
    """
    _validate(epsilon, delta, min_count)
    scores = np.asarray(scores, dtype=np.float64)
    errors = np.asarray(errors, dtype=bool)
    if scores.shape != errors.shape or scores.ndim != 1:
        raise ValueError(
            f"scores {scores.shape} and errors {errors.shape} must be equal-length vectors"
        )
    cands = _candidates(scores, candidates)
    return _walk(
        scores, errors, cands, epsilon=epsilon, delta=delta, level=delta, min_count=min_count
    )


def _walk(
    scores: np.ndarray,
    errors: np.ndarray,
    cands: np.ndarray,
    *,
    epsilon: float,
    delta: float,
    level: float,
    min_count: int,
    box_confidence: float | None = None,
) -> CalibrationResult:
    n_start = max(min_count, min_passing_count(epsilon, level))
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    cum_err = np.concatenate([[0], np.cumsum(errors[order])])
    ns = np.searchsorted(sorted_scores, cands, side="right")

    steps: list[CalibrationStep] = []
    chosen: CalibrationStep | None = None
    first_tested: CalibrationStep | None = None
    stopped = False
    for t, n in zip(cands, ns, strict=True):
        n = int(n)
        k = int(cum_err[n])
        if stopped or n < n_start:
            steps.append(CalibrationStep(float(t), n, k, float("nan"), tested=False, passed=False))
            continue
        bound = clopper_pearson_upper(k, n, level)
        passed = bound <= epsilon
        step = CalibrationStep(float(t), n, k, bound, tested=True, passed=passed)
        steps.append(step)
        first_tested = first_tested or step
        if passed:
            chosen = step
        else:
            stopped = True
    ref = chosen or first_tested
    return CalibrationResult(
        threshold=chosen.threshold if chosen else None,
        bound=ref.bound if ref else 1.0,
        n=ref.n if ref else 0,
        k=ref.k if ref else 0,
        epsilon=epsilon,
        delta=delta,
        steps=steps,
        box_confidence=box_confidence,
        level=level,
        n_calibration=int(scores.size),
        min_count=min_count,
    )


def calibrate_with_confidence(
    scores: np.ndarray,
    errors_by_confidence: Mapping[float, np.ndarray],
    *,
    epsilon: float,
    delta: float,
    candidates: np.ndarray | None = None,
    min_count: int = 30,
) -> CalibrationResult:
    """Calibrate box confidence ``c`` and difficulty threshold ``t`` together.

    ``errors_by_confidence[c]``: ``(N,)`` bool, the auto-label errors when boxes with
    confidence ≥ ``c`` are kept.  One fixed-sequence walk per ``c`` at level ``δ/|C|``;
    the passing ``(c, t)`` with the largest coverage is returned (its ``per_confidence``
    lists every walk).
    """
    _validate(epsilon, delta, min_count)
    if not errors_by_confidence:
        raise ValueError("errors_by_confidence is empty: give at least one box confidence")
    scores = np.asarray(scores, dtype=np.float64)
    cands = _candidates(scores, candidates)
    level = delta / len(errors_by_confidence)
    walks = [
        _walk(
            scores,
            np.asarray(errs, dtype=bool),
            cands,
            epsilon=epsilon,
            delta=delta,
            level=level,
            min_count=min_count,
            box_confidence=float(c),
        )
        for c, errs in sorted(errors_by_confidence.items())
    ]
    passing = [w for w in walks if w.threshold is not None]
    if passing:
        best = max(passing, key=lambda w: (w.n, -w.bound))
    else:
        tested = [w for w in walks if w.n > 0]
        best = min(tested, key=lambda w: w.bound) if tested else walks[0]
    return CalibrationResult(
        threshold=best.threshold,
        bound=best.bound,
        n=best.n,
        k=best.k,
        epsilon=epsilon,
        delta=delta,
        steps=best.steps,
        box_confidence=best.box_confidence,
        level=level,
        n_calibration=int(scores.size),
        min_count=min_count,
        per_confidence=walks,
    )


class _PredictionLookup(Protocol):
    def get(self, item_id: str, item: Item | None = None) -> Prediction | None: ...


def _lookup(
    predictions: Mapping[str, Prediction] | _PredictionLookup, item: Item
) -> Prediction | None:
    if isinstance(predictions, Mapping):
        return predictions.get(item.item_id)
    return predictions.get(item.item_id, item)


def calibration_table(
    items_with_truth: Iterable[Item],
    difficulty_df: pd.DataFrame,
    predictions: Mapping[str, Prediction] | _PredictionLookup,
    label_map: LabelMap,
    *,
    task: str = "detection",
    box_confidences: Sequence[float] = DEFAULT_BOX_CONFIDENCES,
    iou_threshold: float = 0.5,
    calibration_ids: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Per calibration item: ``item_id``, ``score`` and one bool column ``wrong@c`` per ``c``.

    Calibration items are those with a human label (``labeled``/``reviewed``), no read
    error, a finite difficulty score and a usable prediction — and, when
    ``calibration_ids`` is given (a checkpoint's held-out items), only those.
    """
    scores = _score_lookup(difficulty_df)
    allowed = set(calibration_ids) if calibration_ids is not None else None
    rows: list[dict[str, Any]] = []
    for item in items_with_truth:
        if item.error is not None or not item.has_human_label:
            continue
        if allowed is not None and item.item_id not in allowed:
            continue
        score = scores.get(item.item_id)
        if score is None:
            continue
        pred = _lookup(predictions, item)
        if pred is None or pred.error is not None:
            continue
        wrong = wrong_at(
            item, pred, label_map, box_confidences, task=task, iou_threshold=iou_threshold
        )  # one matching for every box confidence
        row: dict[str, Any] = {"item_id": item.item_id, "score": score}
        row.update({wrong_column(c): w for c, w in zip(box_confidences, wrong, strict=True)})
        rows.append(row)
    columns = ["item_id", "score", *(wrong_column(c) for c in box_confidences)]
    return pd.DataFrame(rows, columns=columns)


def wrong_column(c: float) -> str:
    return f"wrong@{c:g}"


def calibrate(
    items_with_truth: Iterable[Item],
    difficulty_df: pd.DataFrame,
    predictions: Mapping[str, Prediction] | _PredictionLookup,
    label_map: LabelMap,
    *,
    epsilon: float,
    delta: float,
    task: str = "detection",
    box_confidences: Sequence[float] = DEFAULT_BOX_CONFIDENCES,
    candidates: np.ndarray | None = None,
    min_count: int = 30,
    iou_threshold: float = 0.5,
    calibration_ids: Iterable[str] | None = None,
) -> CalibrationResult:
    """Calibrate ``(box confidence, difficulty threshold)`` on labeled items.

    ``items_with_truth``: the project's items (only human-labeled ones are used);
    ``difficulty_df``: ``item_id`` and ``score`` (the ``difficulty.parquet`` table);
    ``predictions``: ``item_id → Prediction`` or a prediction source with ``get``;
    ``calibration_ids``: restrict to these items (a checkpoint's held-out split).
    """
    _validate(epsilon, delta, min_count)
    if not box_confidences:
        raise UsageError("box_confidences is empty")
    table = calibration_table(
        items_with_truth,
        difficulty_df,
        predictions,
        label_map,
        task=task,
        box_confidences=box_confidences,
        iou_threshold=iou_threshold,
        calibration_ids=calibration_ids,
    )
    log.info(
        "calibrating on %d labeled items (%d box confidences)", len(table), len(box_confidences)
    )
    scores = table["score"].to_numpy(dtype=np.float64)
    errors = {float(c): table[wrong_column(c)].to_numpy(dtype=bool) for c in box_confidences}
    return calibrate_with_confidence(
        scores, errors, epsilon=epsilon, delta=delta, candidates=candidates, min_count=min_count
    )

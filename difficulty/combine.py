"""Combine per-scorer values into one difficulty score in ``[0, 1]``.

Three steps, all plain functions of arrays:

1. **Percentiles against a reference distribution.**  Each scorer's raw values are turned
   into percentiles so that scorers on different scales can be averaged, and so that the
   score of an item means the same thing in two runs.  Within the run that defines the
   reference, the percentile is the empirical CDF with mid-ranks,
   ``(#{r < v} + ½·#{r = v}) / n``.  The run stores each reference as a *quantile
   sketch* (:data:`SKETCH_SIZE` quantiles, ``q_k`` at probability ``k/(m−1)``); a later
   run scored against that sketch gets ``p(v)`` by linear interpolation between the
   quantiles, the mid-point of the tied probabilities when ``v`` equals one or more
   quantiles, 0 below the smallest and 1 above the largest.

2. **Weights from the measured agreement with the truth.**  On labeled items with a true
   per-item error (the error of the predictions, see :func:`difficulty.matching.item_error`),
   each scorer's Spearman ρ with that error is measured.  The candidates are every scorer
   alone (``single``) and two blends built from the ρs:

   * ``rho`` — weights ``∝ max(0, ρ)``;
   * ``rho2`` — weights ``∝ max(0, ρ)²`` (sharper: the best scorers dominate).

   The default is the ``rho`` blend: every scorer that agrees with the error counts,
   weighted by how well it agrees (a learned loss predictor and the Fourier scores take
   part like any other scorer).  The alternatives are ``rho2`` and every scorer alone
   (``single``).  They are judged out of sample: the labeled items are split into
   ``folds`` folds (``repeats`` times, reshuffled); in each, the blends' ρs are measured
   on the other folds and every candidate is judged on the held-out fold.  The judge
   (``criterion``) is by default the **risk–coverage area** (``aurc``): the mean true
   error among the ``k`` easiest held-out items, averaged over ``k`` (ties share their
   error).  It asks what the tiers promise — the easy end holds little error — and what
   the auto-label gate needs: a score with a low AURC gives the calibrated easy tier more
   coverage at the same error bound.  ``criterion="rho"`` judges by held-out Spearman ρ
   with the error instead (the whole ranking, hardest end included: what active learning
   wants).  An alternative replaces the default only when it beats it on the held-out
   folds by more than two standard errors of the paired per-fold differences (the best
   such one, by its cross-validated mean): a part that wins by noise is not taken.  The
   chosen candidate's weights are refit on all labeled items.  Why the blend is the
   default: scorers that each rank the error moderately well disagree on *which* items
   they misplace, so their average keeps the easy end cleaner than any one of them (on
   the road-sign detector's held-out items the ``rho`` blend's risk over the easiest half
   is a third of the best single scorer's, ``bench/results/detector.md``), while a lone
   scorer that is measurably better still wins.

   With ``signed=True`` (off by default) scorers with ρ < 0 take part too, reversed
   (weights ``∝ |ρ|`` with a negative sign, see :func:`candidate_weights`).

   With fewer than ``min_labeled`` labeled items (or no scorer with ρ > 0) nothing is
   fit: the ``default`` scorer (``fourier``, the model-free one) is used alone; when it
   was not computed, every scorer gets the same weight.

   A scorer that gives every item the same value (up to float rounding,
   :func:`nearly_constant`: an untrained model's outputs) ranks nothing: it is **dropped**
   (weight 0, listed in :attr:`CombineFit.dropped`, with a warning), whatever the labels say.

3. **Ties broken by the continuous scorers.**  A coarse scorer chosen alone (a box count)
   leaves many items with one value, and a quantile cut through such a block cannot give
   its configured share.  The combined score is therefore
   ``(1 − η)·primary + η·secondary`` with ``η =`` :data:`TIE_BREAK` (10⁻⁶): ``primary`` is
   the weighted combination above, ``secondary`` the ``rho`` blend of every scorer that
   agrees with the error (without labels: all scorers, equal weights).  Items whose
   primary scores differ by more than η keep their order; inside a tie the secondary key
   orders them.  Items tied in the primary and the secondary key stay tied (the report says how many).

The weighted combination is ``Σ_i w_i·p_i / Σ_i w_i`` (``1 − p_i`` and ``|w_i|`` for a
reversed scorer) over the scorers with a value for the item (weights renormalised per item
when a scorer has no value for it), so it stays in ``[0, 1]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SKETCH_SIZE = 101
"""Quantiles kept per scorer as its reference distribution (0 %, 1 %, …, 100 %)."""

CANDIDATES = ("single", "rho", "rho2")
BLENDS = ("rho", "rho2")
CRITERIA = ("aurc", "rho")
DEFAULT_BLEND = "rho"
"""The candidate taken unless another one beats it out of sample (module docstring)."""
_RULE = (
    "every scorer weighted by its agreement, unless a single scorer or the rho2 blend "
    "beats that by more than two standard errors"
)

CONSTANT_RTOL = 1e-5
"""Values within this share of their magnitude of each other count as one value (a scorer
whose every item falls within it is constant)."""

TIE_BREAK = 1e-6
"""η: the weight of the secondary (tie-breaking) key in the combined score."""


# -- percentiles ------------------------------------------------------------------------


def quantile_sketch(values: np.ndarray, size: int = SKETCH_SIZE) -> list[float]:
    """``size`` evenly spaced quantiles (0 … 1) of the finite ``values``; ``[]`` if none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return []
    return [float(q) for q in np.quantile(v, np.linspace(0.0, 1.0, size))]


def ecdf_midrank(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mid-rank empirical CDF of ``values`` ``(N,)`` against raw ``reference`` values.

    ``(#{r < v} + ½·#{r = v}) / n`` with ``n`` the number of finite reference values.
    NaN in ``values`` stays NaN; an empty reference gives all NaN.
    """
    v = np.asarray(values, dtype=np.float64)
    r = np.sort(np.asarray(reference, dtype=np.float64))
    r = r[np.isfinite(r)]
    out = np.full(v.shape, np.nan)
    if r.size == 0:
        return out
    ok = np.isfinite(v)
    left = np.searchsorted(r, v[ok], side="left")
    right = np.searchsorted(r, v[ok], side="right")
    out[ok] = (left + 0.5 * (right - left)) / r.size
    return out


def sketch_percentile(values: np.ndarray, sketch: Sequence[float]) -> np.ndarray:
    """Percentile of ``values`` ``(N,)`` against a quantile sketch (see the module docstring)."""
    v = np.asarray(values, dtype=np.float64)
    q = np.asarray(sketch, dtype=np.float64)
    out = np.full(v.shape, np.nan)
    if q.size == 0:
        return out
    if q.size == 1:
        ok = np.isfinite(v)
        out[ok] = np.where(v[ok] < q[0], 0.0, np.where(v[ok] > q[0], 1.0, 0.5))
        return out
    probs = np.linspace(0.0, 1.0, q.size)
    ok = np.isfinite(v)
    x = v[ok]
    left = np.searchsorted(q, x, side="left")
    right = np.searchsorted(q, x, side="right")
    tied = right > left
    p = np.empty(x.shape)
    # equal to one or more quantiles: the mid-point of their probabilities
    p[tied] = (left[tied] + right[tied] - 1) / 2.0 / (q.size - 1)
    # strictly between two quantiles (or outside): linear interpolation, clamped to [0, 1]
    p[~tied] = np.interp(x[~tied], q, probs, left=0.0, right=1.0)
    out[ok] = p
    return out


def nearly_constant(values: np.ndarray, rtol: float = CONSTANT_RTOL) -> bool:
    """Whether the finite ``values`` are all equal up to ``rtol`` of their magnitude (float
    rounding: a model that gives every item the same output, give or take 10⁻⁷)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return True
    return bool(np.ptp(v) <= max(rtol * float(np.abs(v).max()), 1e-12))


def percentiles(
    table: pd.DataFrame,
    scorers: Sequence[str],
    reference: Mapping[str, Sequence[float]] | None = None,
) -> pd.DataFrame:
    """Per-scorer percentiles ``(N, S)`` in ``[0, 1]`` (NaN where a value is missing).

    Without ``reference`` each column is ranked against its own values (mid-rank ECDF);
    with it, against the stored quantile sketch of the scorer of the same name.  A column
    that is constant over the items up to float rounding (:func:`nearly_constant`) ranks
    nothing: every item gets ½ (its differences are noise, not an order).
    """
    out = {}
    for name in scorers:
        values = table[name].to_numpy(dtype=np.float64, na_value=np.nan)
        if nearly_constant(values):
            out[name] = np.where(np.isfinite(values), 0.5, np.nan)
        elif reference is not None and name in reference:
            out[name] = sketch_percentile(values, reference[name])
        else:
            out[name] = ecdf_midrank(values, values)
    return pd.DataFrame(out, index=table.index)


# -- weights ----------------------------------------------------------------------------


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` ``(N,)``, tied values sharing the mean of their ranks
    (``scipy.stats.rankdata``'s ``average`` method, computed here without importing
    ``scipy.stats``: seconds of start-up for one function)."""
    v = np.asarray(values)
    order = np.argsort(v, kind="mergesort")
    ordered = v[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]  # where a block of equal values starts
    bounds = np.r_[np.flatnonzero(first), v.size]
    block = np.cumsum(first)  # 1-based block of each sorted position
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = 0.5 * (bounds[block] + bounds[block - 1] + 1)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman ρ over the pairs where both are finite; NaN with < 3 pairs or no spread.

    The Pearson correlation of the average ranks, computed as ``scipy.stats.spearmanr``
    computes it (``numpy.corrcoef`` of the two rank columns), to the same bits.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    ranked = np.column_stack((average_ranks(x[ok]), average_ranks(y[ok])))
    return float(np.corrcoef(ranked, rowvar=False)[1, 0])


def candidate_weights(
    rhos: Mapping[str, float], method: str, *, signed: bool = False
) -> dict[str, float]:
    """Weights of one candidate from per-scorer ρs, ``Σ|w| = 1``; ``{}`` if none qualifies.

    Unsigned (the default) only scorers with ρ > 0 get weight.  ``signed``: every scorer
    with a finite ρ ≠ 0 does, by ``|ρ|``, and a negative weight means the scorer counts
    reversed (``1 − p``): a scorer that ranks the error backwards is as informative as
    one that ranks it forwards.
    """
    mag = {
        k: (abs(float(v)) if signed else float(v))
        for k, v in rhos.items()
        if np.isfinite(v) and v != 0
    }
    mag = {k: v for k, v in mag.items() if v > 0}
    if not mag:
        return {}
    sign = {k: (float(np.sign(rhos[k])) if signed else 1.0) for k in mag}
    if method == "single":
        best = max(mag, key=lambda k: (mag[k], k))
        return {k: (sign[k] if k == best else 0.0) for k in rhos}
    power = {"rho": 1.0, "rho2": 2.0}[method]
    total = sum(v**power for v in mag.values())
    return {k: (sign[k] * mag[k] ** power / total if k in mag else 0.0) for k in rhos}


def combine(pct: pd.DataFrame, weights: Mapping[str, float]) -> np.ndarray:
    """``Σ |w_i| p'_i / Σ |w_i|`` per row over the scorers with a value; NaN if none has one.

    ``p'_i = p_i`` for ``w_i > 0`` and ``1 − p_i`` for ``w_i < 0`` (a reversed scorer).
    """
    names = [k for k, w in weights.items() if w != 0 and k in pct.columns]
    if not names:
        return np.full(len(pct), np.nan)
    p = pct[names].to_numpy(dtype=np.float64)
    w = np.array([weights[k] for k in names], dtype=np.float64)
    p = np.where(w < 0, 1.0 - p, p)
    w = np.abs(w)
    have = np.isfinite(p)
    num = np.where(have, p, 0.0) @ w
    den = have.astype(np.float64) @ w
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def risk_coverage_curve(score: np.ndarray, error: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage ``k/N`` and risk (mean error among the ``k`` lowest-scored items) for
    ``k = 1..N``, over the pairs where both are finite.

    Tied scores have no order, so inside a tie block the error is spread evenly (each
    position gets the block's mean error).
    """
    s = np.asarray(score, dtype=np.float64)
    e = np.asarray(error, dtype=np.float64)
    ok = np.isfinite(s) & np.isfinite(e)
    order = np.argsort(s[ok], kind="stable")
    s, e = s[ok][order], e[ok][order]
    n = s.size
    if n == 0:
        return np.zeros(0), np.zeros(0)
    block = np.r_[0, np.cumsum(np.diff(s) != 0)]  # tie block of each position
    starts = np.r_[0, np.flatnonzero(np.diff(s) != 0) + 1]
    ends = np.r_[starts[1:], n]
    cum = np.r_[0.0, np.cumsum(e)]
    rate = (cum[ends] - cum[starts]) / (ends - starts)  # mean error inside each block
    pos = np.arange(n)
    expected = cum[starts[block]] + rate[block] * (pos - starts[block] + 1)
    return (pos + 1) / n, expected / (pos + 1)


def risk_coverage_area(score: np.ndarray, error: np.ndarray) -> float:
    """AURC: the mean error among the ``k`` lowest-scored items, averaged over ``k = 1..N``
    (:func:`risk_coverage_curve`); lower is better.  NaN with fewer than 3 pairs."""
    _, risk = risk_coverage_curve(score, error)
    return float(risk.mean()) if risk.size >= 3 else float("nan")


def constant_scorers(pct: pd.DataFrame) -> list[str]:
    """Columns of ``pct`` whose finite values are all equal (or that have none)."""
    out = []
    for name in pct.columns:
        v = pct[name].to_numpy(dtype=np.float64, na_value=np.nan)
        v = v[np.isfinite(v)]
        if v.size == 0 or np.ptp(v) == 0:
            out.append(str(name))
    return out


def tie_break_weights(
    correlations: Mapping[str, float], scorers: Sequence[str], *, signed: bool = False
) -> dict[str, float]:
    """The secondary key's weights: the ``rho`` blend of ``scorers``, else equal weights."""
    rhos = {k: correlations.get(k, float("nan")) for k in scorers}
    w = candidate_weights(rhos, "rho", signed=signed)
    if w:
        return {k: v for k, v in w.items() if v != 0}
    return {k: 1.0 / len(scorers) for k in scorers} if scorers else {}


@dataclass
class CombineFit:
    """The chosen combination and the evidence for it (goes into run metadata and report).

    ``method``: ``single``, ``rho``, ``rho2``, ``default`` (the default scorer alone, no
    labels), ``equal`` (no labels and no default scorer) or ``reference`` (weights reused
    from an earlier run).  ``correlations``: each scorer's Spearman ρ with the true error
    on all labeled items.  ``cv_rho`` / ``cv_aurc``: mean held-out ρ / risk–coverage area
    of each candidate (by ``criterion``; ``single:NAME`` for a scorer alone under
    ``aurc``).  ``tie_break``: the secondary key's weights (``None``: derived from the
    correlations, see :func:`tie_break_weights`).  ``dropped``: scorers left out and why.
    """

    method: str
    weights: dict[str, float]
    correlations: dict[str, float] = field(default_factory=dict)
    cv_rho: dict[str, float] = field(default_factory=dict)
    n_labeled: int = 0
    reason: str = ""
    criterion: str = "aurc"
    cv_aurc: dict[str, float] = field(default_factory=dict)
    tie_break: dict[str, float] | None = None
    dropped: dict[str, str] = field(default_factory=dict)

    def secondary(self, columns: Sequence[str]) -> dict[str, float]:
        """The tie-break weights over ``columns`` (the stored ones, or derived)."""
        if self.tie_break is not None:
            return {k: v for k, v in self.tie_break.items() if k in columns}
        keep = [c for c in columns if c not in self.dropped]
        return tie_break_weights(self.correlations, keep)

    def score(self, pct: pd.DataFrame) -> np.ndarray:
        """The combined score ``(N,)`` of percentiles ``pct``: the weighted combination
        (:func:`combine`) with ties broken by the secondary key (module docstring)."""
        primary = combine(pct, self.weights)
        secondary = combine(pct, self.secondary(list(pct.columns)))
        secondary = np.where(np.isfinite(secondary), secondary, primary)
        return (1.0 - TIE_BREAK) * primary + TIE_BREAK * secondary

    def to_dict(self) -> dict[str, Any]:
        def clean(d: Mapping[str, float]) -> dict[str, float | None]:
            return {k: (float(v) if np.isfinite(v) else None) for k, v in d.items()}

        return {
            "method": self.method,
            "criterion": self.criterion,
            "weights": clean(self.weights),
            "correlations": clean(self.correlations),
            "cv_rho": clean(self.cv_rho),
            "cv_aurc": clean(self.cv_aurc),
            "tie_break": None if self.tie_break is None else clean(self.tie_break),
            "dropped": dict(self.dropped),
            "n_labeled": self.n_labeled,
            "reason": self.reason,
        }


def _fallback(
    scorers: Sequence[str],
    default: str,
    n: int,
    correlations: dict[str, float],
    reason: str,
    dropped: dict[str, str],
) -> CombineFit:
    usable = [s for s in scorers if s not in dropped]
    if default in usable:
        weights = {k: float(k == default) for k in scorers}
        method = "default"
    else:
        w = 1.0 / len(usable) if usable else 0.0
        weights = {k: (w if k in usable else 0.0) for k in scorers}
        method = "equal"
        reason += f"; {default!r} not computed, equal weights"
    return CombineFit(
        method,
        weights,
        correlations,
        n_labeled=n,
        reason=reason,
        tie_break=tie_break_weights(correlations, usable),
        dropped=dropped,
    )


def fit_weights(
    pct: pd.DataFrame,
    error: np.ndarray,
    *,
    min_labeled: int = 30,
    folds: int = 5,
    repeats: int = 3,
    seed: int = 0,
    default: str = "fourier",
    signed: bool = False,
    criterion: str = "aurc",
) -> CombineFit:
    """Choose weights for the columns of ``pct`` ``(N, S)`` from the true ``error`` ``(N,)``.

    ``error`` is NaN for items without a true error (unlabeled, or no prediction); only
    finite rows are used.  ``criterion``: ``aurc`` (default) or ``rho``, how held-out
    candidates are judged.  See the module docstring for the procedure.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    scorers = list(pct.columns)
    dropped = {
        s: f"constant over the {len(pct)} items: it ranks nothing" for s in constant_scorers(pct)
    }
    for name in dropped:
        log.warning(
            "scorer %s gives every item the same value (up to float rounding): dropped from the combination",
            name,
        )
    live = [s for s in scorers if s not in dropped]
    err = np.asarray(error, dtype=np.float64)
    labeled = np.flatnonzero(np.isfinite(err))
    n = int(labeled.size)
    correlations = (
        {k: spearman(pct[k].to_numpy()[labeled], err[labeled]) for k in scorers} if n else {}
    )
    live_rhos = {k: v for k, v in correlations.items() if k in live}
    if n < min_labeled:
        return _fallback(
            scorers,
            default,
            n,
            correlations,
            f"{n} labeled items with a true error (< {min_labeled})",
            dropped,
        )
    if not candidate_weights(live_rhos, "single", signed=signed):
        return _fallback(
            scorers,
            default,
            n,
            correlations,
            "no scorer agrees positively with the true error",
            dropped,
        )
    judge = _judge_aurc if criterion == "aurc" else _judge_rho
    best, weights, cv, reason = judge(
        pct, err, labeled, live, live_rhos, folds, repeats, seed, signed
    )
    if best is None:
        return _fallback(scorers, default, n, correlations, reason, dropped)
    weights = {k: weights.get(k, 0.0) for k in scorers}
    log.info("combination: %s", reason)
    return CombineFit(
        best,
        weights,
        correlations,
        cv_rho=cv if criterion == "rho" else {},
        n_labeled=n,
        reason=reason,
        criterion=criterion,
        cv_aurc=cv if criterion == "aurc" else {},
        tie_break=tie_break_weights(correlations, live, signed=signed),
        dropped=dropped,
    )


def _fold_count(n: int, folds: int) -> int:
    """Folds per repeat of the cross-validation on ``n`` labeled items (at least 10 items
    a fold, at least 2 folds, at most ``folds``)."""
    return max(2, min(folds, n // 10))


def _folds(
    labeled: np.ndarray, folds: int, repeats: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` row indices: ``repeats`` reshuffled ``k``-fold splits of ``labeled``."""
    rng = np.random.default_rng(seed)
    n = labeled.size
    k = _fold_count(n, folds)
    for _ in range(repeats):
        order = rng.permutation(labeled)
        fold_of = np.arange(n) % k
        for f in range(k):
            yield order[fold_of != f], order[fold_of == f]


def _wins(table: pd.DataFrame, challenger: str, incumbent: str, *, lower: bool, folds: int) -> bool:
    """Whether ``challenger`` beats ``incumbent`` on the paired held-out folds by more than
    two standard errors.

    The rows of ``table`` are the folds of repeated ``folds``-fold cross-validation on one
    set of items: they overlap (every item is in every repeat, and the training parts
    share most items), so the plain standard error of their mean would be far too small.
    The variance of the mean is taken with the correction of Nadeau & Bengio (2003) for
    resampled estimates, ``(1/J + n_test/n_train)·s²`` over ``J`` rows, with
    ``n_test/n_train = 1/(folds − 1)``.
    """
    diff = (
        (table[incumbent] - table[challenger]) if lower else (table[challenger] - table[incumbent])
    )
    diff = diff.dropna()
    if len(diff) < 2:
        return False
    variance = (1.0 / len(diff) + 1.0 / max(folds - 1, 1)) * float(diff.var(ddof=1))
    return float(diff.mean()) > 2.0 * float(np.sqrt(variance))


def _choose(table: pd.DataFrame, cv: dict[str, float], *, lower: bool, folds: int) -> str | None:
    """The candidate column of ``table`` (one row per held-out fold of repeated
    ``folds``-fold cross-validation) to take: the ``rho`` blend, unless an alternative
    beats it by more than two standard errors (:func:`_wins`; then the best such one by its
    cross-validated mean ``cv``); the best finite alternative when the blend has no finite
    value; ``None`` when no candidate has one."""
    finite = [c for c in table.columns if np.isfinite(cv.get(c, float("nan")))]
    if not finite:
        return None

    def rank(c: str) -> tuple[float, str]:
        return (cv[c] if lower else -cv[c], c)

    if DEFAULT_BLEND not in finite:
        return min(finite, key=rank)
    winners = [
        c
        for c in finite
        if c != DEFAULT_BLEND and _wins(table, c, DEFAULT_BLEND, lower=lower, folds=folds)
    ]
    return min(winners, key=rank) if winners else DEFAULT_BLEND


def _judge_aurc(
    pct: pd.DataFrame,
    err: np.ndarray,
    labeled: np.ndarray,
    live: list[str],
    rhos: dict[str, float],
    folds: int,
    repeats: int,
    seed: int,
    signed: bool,
) -> tuple[str | None, dict[str, float], dict[str, float], str]:
    """Every live scorer that agrees with the error alone, and the two blends, judged by
    held-out risk–coverage area (lower is better)."""
    singles = {
        s: (float(np.sign(r)) if signed else 1.0)
        for s, r in rhos.items()
        if np.isfinite(r) and (r > 0 or (signed and r < 0))
    }
    rows: list[dict[str, float]] = []
    k = _fold_count(labeled.size, folds)
    for train, test in _folds(labeled, folds, repeats, seed):
        row: dict[str, float] = {}
        for s, sign in singles.items():
            p = pct[s].to_numpy()[test]
            row[f"single:{s}"] = risk_coverage_area(p if sign > 0 else 1.0 - p, err[test])
        rho_train = {s: spearman(pct[s].to_numpy()[train], err[train]) for s in live}
        for c in BLENDS:
            w = candidate_weights(rho_train, c, signed=signed)
            row[c] = (
                risk_coverage_area(combine(pct.iloc[test], w), err[test]) if w else float("nan")
            )
        rows.append(row)
    table = pd.DataFrame(rows)
    cv = {
        c: float(table[c].mean()) if table[c].notna().any() else float("nan") for c in table.columns
    }
    chosen = _choose(table, cv, lower=True, folds=k)
    if chosen is None:
        return None, {}, cv, "cross-validation gave no finite risk–coverage area"
    if chosen.startswith("single:"):
        name = chosen.split(":", 1)[1]
        best, weights, label = "single", {name: singles[name]}, f"single ({name})"
    else:
        best, weights, label = chosen, candidate_weights(rhos, chosen, signed=signed), chosen
    reason = (
        f"{label}: cross-validated risk–coverage area {cv[chosen]:.3f} (mean true error among "
        f"the easiest items; {repeats}×{k}-fold on {labeled.size} labeled "
        f"items; {_RULE})"
    )
    return best, weights, cv, reason


def _judge_rho(
    pct: pd.DataFrame,
    err: np.ndarray,
    labeled: np.ndarray,
    live: list[str],
    rhos: dict[str, float],
    folds: int,
    repeats: int,
    seed: int,
    signed: bool,
) -> tuple[str | None, dict[str, float], dict[str, float], str]:
    """The best-ρ scorer alone and the two blends, judged by held-out Spearman ρ."""
    rows: list[dict[str, float]] = []
    k = _fold_count(labeled.size, folds)
    for train, test in _folds(labeled, folds, repeats, seed):
        rho_train = {s: spearman(pct[s].to_numpy()[train], err[train]) for s in live}
        row: dict[str, float] = {}
        for c in CANDIDATES:
            w = candidate_weights(rho_train, c, signed=signed)
            row[c] = spearman(combine(pct.iloc[test], w), err[test]) if w else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(CANDIDATES))
    cv = {c: float(table[c].mean()) if table[c].notna().any() else float("nan") for c in CANDIDATES}
    best = _choose(table, cv, lower=False, folds=k)
    if best is None:
        return None, {}, cv, "cross-validation gave no finite ρ"
    reason = (
        f"{best}: cross-validated ρ {cv[best]:.3f} ({repeats}×{k}-fold on "
        f"{labeled.size} labeled items; {_RULE})"
    )
    return best, candidate_weights(rhos, best, signed=signed), cv, reason

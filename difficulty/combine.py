"""Combine per-scorer values into one difficulty score in ``[0, 1]``.

Two steps, both plain functions of arrays:

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
   each scorer's Spearman ρ with that error is measured.  Three candidate combinations
   are built from the ρs:

   * ``single`` — the scorer with the highest ρ alone;
   * ``rho`` — weights ``∝ max(0, ρ)``;
   * ``rho2`` — weights ``∝ max(0, ρ)²`` (sharper: the best scorers dominate).

   The candidate is chosen by **cross-validated ρ**: the labeled items are split into
   ``folds`` folds (``repeats`` times, reshuffled); in each, the ρs are measured on the
   other folds, every candidate's weights built from them, and its combined score's ρ
   with the error measured on the held-out fold.  The best single scorer is the default
   choice; the better of the two blends replaces it only when its mean held-out ρ beats
   single's by more than two standard errors of the paired per-fold differences (a blend
   that wins by noise is not taken).  The chosen candidate's weights are then refit on
   all labeled items.  So the combination is the best single part unless a blend
   measurably beats it out of sample — "never worse than its best part" in practice.

   With ``signed=True`` (off by default) scorers with ρ < 0 take part too, reversed
   (weights ``∝ |ρ|`` with a negative sign, see :func:`candidate_weights`).

   With fewer than ``min_labeled`` labeled items (or no scorer with ρ > 0) nothing is
   fit: the ``default`` scorer (``fourier``, the model-free one) is used alone; when it
   was not computed, every scorer gets the same weight.

Ties are kept: a coarse scorer chosen alone (a box count) leaves many items with one
score, and the report shows them as such.  Breaking those ties with a weaker blend adds
rank variance without information about the error inside the tie, which lowers ρ.

The combined score is ``Σ_i w_i·p_i / Σ_i w_i`` (``1 − p_i`` and ``|w_i|`` for a reversed
scorer) over the scorers with a value for the
item (weights renormalised per item when a scorer has no value for it), so it stays in
``[0, 1]``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

log = logging.getLogger(__name__)

SKETCH_SIZE = 101
"""Quantiles kept per scorer as its reference distribution (0 %, 1 %, …, 100 %)."""

CANDIDATES = ("single", "rho", "rho2")


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


def percentiles(
    table: pd.DataFrame,
    scorers: Sequence[str],
    reference: Mapping[str, Sequence[float]] | None = None,
) -> pd.DataFrame:
    """Per-scorer percentiles ``(N, S)`` in ``[0, 1]`` (NaN where a value is missing).

    Without ``reference`` each column is ranked against its own values (mid-rank ECDF);
    with it, against the stored quantile sketch of the scorer of the same name.
    """
    out = {}
    for name in scorers:
        values = table[name].to_numpy(dtype=np.float64, na_value=np.nan)
        if reference is not None and name in reference:
            out[name] = sketch_percentile(values, reference[name])
        else:
            out[name] = ecdf_midrank(values, values)
    return pd.DataFrame(out, index=table.index)


# -- weights ----------------------------------------------------------------------------


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman ρ over the pairs where both are finite; NaN with < 3 pairs or no spread."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return float(spearmanr(x[ok], y[ok]).statistic)


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


@dataclass
class CombineFit:
    """The chosen combination and the evidence for it (goes into run metadata and report).

    ``method``: ``single``, ``rho``, ``rho2``, ``default`` (the default scorer alone, no
    labels), ``equal`` (no labels and no default scorer) or ``reference`` (weights reused
    from an earlier run).  ``correlations``: each scorer's Spearman ρ with the true error
    on all labeled items.  ``cv_rho``: mean held-out ρ of each candidate.
    """

    method: str
    weights: dict[str, float]
    correlations: dict[str, float] = field(default_factory=dict)
    cv_rho: dict[str, float] = field(default_factory=dict)
    n_labeled: int = 0
    reason: str = ""

    def score(self, pct: pd.DataFrame) -> np.ndarray:
        """The combined score ``(N,)`` of percentiles ``pct`` (see :func:`combine`)."""
        return combine(pct, self.weights)

    def to_dict(self) -> dict[str, Any]:
        def clean(d: Mapping[str, float]) -> dict[str, float | None]:
            return {k: (float(v) if np.isfinite(v) else None) for k, v in d.items()}

        return {
            "method": self.method,
            "weights": clean(self.weights),
            "correlations": clean(self.correlations),
            "cv_rho": clean(self.cv_rho),
            "n_labeled": self.n_labeled,
            "reason": self.reason,
        }


def _fallback(
    scorers: Sequence[str], default: str, n: int, correlations: dict[str, float], reason: str
) -> CombineFit:
    if default in scorers:
        return CombineFit(
            "default", {k: float(k == default) for k in scorers}, correlations, {}, n, reason
        )
    w = 1.0 / len(scorers) if scorers else 0.0
    return CombineFit(
        "equal",
        dict.fromkeys(scorers, w),
        correlations,
        {},
        n,
        reason + f"; {default!r} not computed, equal weights",
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
) -> CombineFit:
    """Choose weights for the columns of ``pct`` ``(N, S)`` from the true ``error`` ``(N,)``.

    ``error`` is NaN for items without a true error (unlabeled, or no prediction); only
    finite rows are used.  See the module docstring for the procedure.
    """
    scorers = list(pct.columns)
    err = np.asarray(error, dtype=np.float64)
    labeled = np.flatnonzero(np.isfinite(err))
    n = int(labeled.size)
    correlations = (
        {k: spearman(pct[k].to_numpy()[labeled], err[labeled]) for k in scorers} if n else {}
    )
    if n < min_labeled:
        return _fallback(
            scorers,
            default,
            n,
            correlations,
            f"{n} labeled items with a true error (< {min_labeled})",
        )
    if not candidate_weights(correlations, "single", signed=signed):
        return _fallback(
            scorers, default, n, correlations, "no scorer agrees positively with the true error"
        )

    rng = np.random.default_rng(seed)
    k = max(2, min(folds, n // 10))
    paired: list[
        dict[str, float]
    ] = []  # one entry per (repeat, fold): held-out ρ of each candidate
    for _ in range(repeats):
        order = rng.permutation(labeled)
        fold_of = np.arange(n) % k
        for f in range(k):
            test = order[fold_of == f]
            train = order[fold_of != f]
            rho_train = {s: spearman(pct[s].to_numpy()[train], err[train]) for s in scorers}
            row: dict[str, float] = {}
            for c in CANDIDATES:
                w = candidate_weights(rho_train, c, signed=signed)
                row[c] = spearman(combine(pct.iloc[test], w), err[test]) if w else float("nan")
            paired.append(row)
    table = pd.DataFrame(paired, columns=list(CANDIDATES))
    cv_rho = {
        c: float(table[c].mean()) if table[c].notna().any() else float("nan") for c in CANDIDATES
    }
    if not np.isfinite(cv_rho["single"]):
        return _fallback(scorers, default, n, correlations, "cross-validation gave no finite ρ")
    best = "single"
    blends = [c for c in CANDIDATES[1:] if np.isfinite(cv_rho[c])]
    if blends:
        blend = max(blends, key=lambda c: cv_rho[c])
        diff = (table[blend] - table["single"]).dropna()
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
        if len(diff) and float(diff.mean()) > 2.0 * se:
            best = blend
    weights = candidate_weights(correlations, best, signed=signed)
    reason = (
        f"{best}: cross-validated ρ {cv_rho[best]:.3f} ({repeats}×{k}-fold on {n} labeled items; "
        f"a blend replaces the best single scorer only when it wins by more than two standard errors)"
    )
    log.info("combination: %s", reason)
    return CombineFit(best, weights, correlations, cv_rho, n, reason)

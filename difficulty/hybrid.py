"""Batch-aware query strategies built from the classic ones.

The classic strategies (:mod:`difficulty.strategies`) give one value per item and the
top ``budget`` items are labeled.  With a small batch out of a small pool, the top of an
uncertainty ranking is often a cluster of near-duplicates (the same ambiguous 1-vs-7
stroke fifty times), and a ranking learned from training losses near zero (the
loss-prediction module) is noisy.  The strategies here fix the *batch*, not the value:

=====================  =================================================================
``badge``              BADGE (Ash et al., ICLR 2020): gradient embeddings at the last
                       layer for the model's own predicted label, chosen by k-means++
                       seeding — uncertain *and* diverse in one step
``margin_kcenter``     margin values, k-center greedy on the model's features among the
                       ``candidate_factor × budget`` highest (:func:`difficulty.selection.select`)
``entropy_kcenter``    the same with entropy
``margin_cluster``     margin values; the ``candidate_factor × budget`` highest are split
                       into ``budget`` clusters by k-means on the model's features and the
                       highest-margin item of each cluster is taken (cluster-margin: one
                       uncertain item per region, without k-center's pull to outliers)
``margin_coreset``     margin values; k-center greedy (the core-set rule of Sener & Savarese
                       2018) among the ``candidate_factor × budget`` highest, with the
                       distances started from the *already labeled* items' features, so
                       the batch fills the regions farthest from everything labeled so far
``learning_loss_subset``  the loss-prediction module's ranking inside a seeded random
                       subset of the pool (Yoo & Kweon's random-subset trick), then
                       k-center greedy among its top candidates
``combined``           the percentile combination of :mod:`difficulty.combine` over
                       several strategies, weights refit each cycle from the true losses
                       of the items revealed so far (see :class:`CombinedState`)
=====================  =================================================================

**Gradient embedding (BADGE).**  For a softmax cross-entropy last layer ``z = W h + b``
and the hallucinated label ``ŷ = argmax p``, the gradient of the loss with respect to
``[W b]`` is ``g = (p − e_ŷ) ⊗ [h, 1]``, shape ``C·(D+1)``.  Its norm is large when the
model is unsure (``p_ŷ`` small) and when the item's features are large; its direction
says *which* classes would move.  k-means++ seeding picks the first item with the largest
``‖g‖`` and each next item with probability ``∝ D²`` (squared distance to the nearest
item picked so far), so the batch covers many directions of gradient.

Every function here maps arrays to arrays (no model, file or config inside).  Each
strategy is also registered in :data:`difficulty.registry.SCORERS` with its per-item value
(``badge``: ``‖g‖``; ``*_kcenter``: the base value), so ``labeltriage select`` can rank by
it; the batch rule is :func:`pick_batch`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from difficulty import fourier as _fourier  # noqa: F401  (registers fourier)
from difficulty import strategies as _classic  # noqa: F401  (registers the classic strategies)
from difficulty.combine import combine as combine_percentiles
from difficulty.combine import fit_weights, percentiles
from difficulty.diversity import select
from difficulty.registry import SCORERS, register_scorer, scorer_names

NEEDS_LABELED = frozenset({"margin_coreset"})
"""Batch strategies that also read the labeled items' features (``arrays["labeled_features"]``)."""

DEFAULT_PARTS = ("margin", "entropy", "egl", "learning_loss", "fourier")
"""What ``combined`` combines by default (each a registered scorer)."""


# -- gradient embeddings and k-means++ --------------------------------------------------


def gradient_embedding(probs: np.ndarray, features: np.ndarray, *, bias: bool = True) -> np.ndarray:
    """``(p − e_ŷ) ⊗ [h, 1]`` per item: ``probs`` ``(N, C)``, ``features`` ``(N, D)`` → ``(N, C·(D+1))``.

    ``ŷ = argmax p``; without ``bias`` the appended ``1`` is left out (``(N, C·D)``).
    """
    p = np.asarray(probs, dtype=np.float64)
    h = np.asarray(features, dtype=np.float64)
    if bias:
        h = np.concatenate([h, np.ones((h.shape[0], 1))], axis=1)
    a = p.copy()
    a[np.arange(p.shape[0]), p.argmax(axis=1)] -= 1.0
    return (a[:, :, None] * h[:, None, :]).reshape(p.shape[0], -1)


@register_scorer(
    "badge",
    needs={"probs", "features"},
    description="length of the last-layer gradient for the predicted label (BADGE's embedding norm)",
    tags={"strategy", "classification", "batch"},
)
def badge(probs: np.ndarray, features: np.ndarray) -> np.ndarray:
    """``‖p − e_ŷ‖ · sqrt(‖h‖² + 1)`` per item, the norm of :func:`gradient_embedding` ``(N,)``."""
    p = np.asarray(probs, dtype=np.float64)
    h = np.asarray(features, dtype=np.float64)
    a = p.copy()
    a[np.arange(p.shape[0]), p.argmax(axis=1)] -= 1.0
    return np.sqrt((a * a).sum(axis=1)) * np.sqrt((h * h).sum(axis=1) + 1.0)


def kmeanspp_seeding(embedding: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k-means++ seeding on ``embedding`` ``(N, E)``: ``k`` row indices in pick order.

    The first row is the one of largest norm; each next row is drawn with probability
    proportional to its squared distance to the nearest row picked so far.  When every
    remaining row coincides with a picked one, the rest are taken in index order.
    """
    x = np.asarray(embedding, dtype=np.float64)
    n = x.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return []
    sq = (x * x).sum(axis=1)
    first = int(sq.argmax())
    chosen = [first]
    taken = np.zeros(n, dtype=bool)
    taken[first] = True
    d2 = np.maximum(sq + sq[first] - 2.0 * x @ x[first], 0.0)
    while len(chosen) < k:
        weights = np.where(taken, 0.0, d2)
        total = weights.sum()
        if total <= 0.0:
            rest = np.flatnonzero(~taken)[: k - len(chosen)]
            chosen.extend(int(i) for i in rest)
            break
        nxt = int(rng.choice(n, p=weights / total))
        chosen.append(nxt)
        taken[nxt] = True
        d2 = np.minimum(d2, np.maximum(sq + sq[nxt] - 2.0 * x @ x[nxt], 0.0))
    return chosen


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, *, iters: int = 25) -> np.ndarray:
    """Lloyd's k-means on ``x`` ``(N, D)`` from a k-means++ start: cluster index per row ``(N,)``.

    The k-means++ start draws the first centre uniformly; an emptied cluster keeps its
    centre.  Stops when no assignment changes or after ``iters`` rounds.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    k = min(int(k), n)
    sq = (x * x).sum(axis=1)
    centres = [int(rng.integers(n))]
    d2 = np.maximum(sq + sq[centres[0]] - 2.0 * x @ x[centres[0]], 0.0)
    while len(centres) < k:
        total = d2.sum()
        nxt = (
            int(rng.choice(n, p=d2 / total))
            if total > 0
            else int(np.flatnonzero(~np.isin(np.arange(n), centres))[0])
        )
        centres.append(nxt)
        d2 = np.minimum(d2, np.maximum(sq + sq[nxt] - 2.0 * x @ x[nxt], 0.0))
    c = x[centres].copy()
    assign = np.full(n, -1)
    for _ in range(iters):
        dist = sq[:, None] + (c * c).sum(axis=1)[None, :] - 2.0 * x @ c.T
        new = dist.argmin(axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = assign == j
            if members.any():
                c[j] = x[members].mean(axis=0)
    return assign


def cluster_pick(
    values: np.ndarray,
    features: np.ndarray,
    budget: int,
    rng: np.random.Generator,
    *,
    candidate_factor: int = 4,
) -> np.ndarray:
    """Cluster-diverse top items: row indices (rank order) of ``budget`` items.

    The ``candidate_factor × budget`` highest ``values`` ``(N,)`` are clustered into
    ``budget`` groups by :func:`kmeans` on ``features`` ``(N, D)``; each group gives its
    highest-valued member, ranked by value.
    """
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(-v, kind="stable")
    candidates = order[: max(budget, candidate_factor * budget)]
    if candidates.size <= budget:
        return candidates[:budget]
    assign = kmeans(np.asarray(features)[candidates], budget, rng)
    best = [
        int(candidates[assign == j][np.argmax(v[candidates[assign == j]])])
        for j in np.unique(assign)
    ]
    best.sort(key=lambda i: -v[i])
    if len(best) < budget:  # fewer non-empty clusters than asked: fill by value
        rest = [int(i) for i in candidates if int(i) not in set(best)]
        best.extend(rest[: budget - len(best)])
    return np.asarray(best[:budget], dtype=np.int64)


def coreset_pick(
    values: np.ndarray,
    features: np.ndarray,
    labeled_features: np.ndarray | None,
    budget: int,
    *,
    candidate_factor: int = 4,
) -> np.ndarray:
    """k-center greedy among the top candidates, counting the labeled items as centres.

    ``values`` ``(N,)``; ``features`` ``(N, D)`` of the pool; ``labeled_features``
    ``(L, D)`` of the labeled items (``None`` or empty: start from the highest value).
    Among the ``candidate_factor × budget`` highest values, repeatedly take the candidate
    farthest (Euclidean) from every labeled item and every item taken so far.  Returns
    row indices in pick order.
    """
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(-v, kind="stable")
    candidates = order[: max(budget, candidate_factor * budget)]
    x = np.asarray(features, dtype=np.float64)[candidates]
    if labeled_features is not None and len(labeled_features):
        lab = np.asarray(labeled_features, dtype=np.float64)
        d2 = (x * x).sum(axis=1)[:, None] + (lab * lab).sum(axis=1)[None, :] - 2.0 * x @ lab.T
        dist = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
        chosen: list[int] = []
    else:
        chosen = [0]
        dist = np.linalg.norm(x - x[0], axis=1)
    taken = np.zeros(len(candidates), dtype=bool)
    taken[chosen] = True
    while len(chosen) < min(budget, len(candidates)):
        nxt = int(np.where(taken, -1.0, dist).argmax())
        chosen.append(nxt)
        taken[nxt] = True
        dist = np.minimum(dist, np.linalg.norm(x - x[nxt], axis=1))
    return candidates[np.asarray(chosen, dtype=np.int64)]


# -- the batch rule -----------------------------------------------------------------------


def base_strategy(name: str) -> str:
    """The classic strategy whose values batch strategy ``name`` diversifies."""
    return _base_of(name)


def _base_of(name: str) -> str:
    return {
        "margin_kcenter": "margin",
        "entropy_kcenter": "entropy",
        "margin_cluster": "margin",
        "margin_coreset": "margin",
        "learning_loss_subset": "learning_loss",
    }.get(name, name)


def strategy_needs(name: str, *, parts: Sequence[str] = DEFAULT_PARTS) -> frozenset[str]:
    """What strategy ``name`` (classic, batch or ``combined``) needs, as registry needs."""
    if name == "combined":
        out: set[str] = {"probs"}
        for part in parts:
            out |= SCORERS[part].needs
        return frozenset(out)
    needs = set(SCORERS[_base_of(name)].needs)
    if name in batch_strategies():
        needs |= {"features", "rng"}
    return frozenset(needs)


def values_of(
    name: str, arrays: Mapping[str, Any], settings: Mapping[str, Any] | None = None
) -> np.ndarray:
    """Per-item values ``(N,)`` of registered scorer ``name`` from ``arrays`` (keyed by need)."""
    spec = SCORERS[name]
    kwargs = {need: arrays[need] for need in spec.needs}
    extra = spec.settings(**(settings or {})).model_dump()
    values = np.asarray(spec.fn(**kwargs, **extra), dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(values)):
        raise RuntimeError(f"strategy {name} gave non-finite values")
    return values


def pick_batch(
    name: str,
    arrays: Mapping[str, Any],
    budget: int,
    rng: np.random.Generator,
    *,
    subset: int | None = None,
    candidate_factor: int = 4,
) -> np.ndarray:
    """Row indices (rank order) of the ``budget`` items batch strategy ``name`` labels next.

    ``arrays`` holds the strategy's needs over the ``N`` pool items (``probs``
    ``(N, C)``, ``features`` ``(N, D)``, ``predicted_loss`` ``(N,)``…).
    ``learning_loss_subset`` ranks inside a random subset of ``subset`` items (default:
    half the pool, at least ``candidate_factor × budget``) and runs k-center among the
    ``candidate_factor × budget`` best of it; ``*_kcenter`` runs k-center among the
    ``candidate_factor × budget`` highest values of the whole pool.
    """
    n = int(np.asarray(arrays["features"]).shape[0])
    budget = min(int(budget), n)
    ids = [str(i) for i in range(n)]
    if name == "badge":
        return np.asarray(
            kmeanspp_seeding(gradient_embedding(arrays["probs"], arrays["features"]), budget, rng),
            dtype=np.int64,
        )
    if name in ("margin_kcenter", "entropy_kcenter"):
        values = values_of(_base_of(name), arrays)
        ranked = select(
            values,
            ids,
            budget,
            features=arrays["features"],
            diversity="kcenter",
            candidate_factor=candidate_factor,
        )
        return np.array([int(i) for i, _ in ranked], dtype=np.int64)
    if name == "margin_coreset":
        return coreset_pick(
            values_of("margin", arrays),
            arrays["features"],
            arrays.get("labeled_features"),
            budget,
            candidate_factor=candidate_factor,
        )
    if name == "margin_cluster":
        return cluster_pick(
            values_of("margin", arrays),
            arrays["features"],
            budget,
            rng,
            candidate_factor=candidate_factor,
        )
    if name == "learning_loss_subset":
        size = subset if subset is not None else max(n // 2, candidate_factor * budget)
        keep = np.sort(rng.choice(n, size=min(size, n), replace=False))
        values = values_of("learning_loss", arrays)[keep]
        feats = np.asarray(arrays["features"])[keep]
        ranked = select(
            values,
            [str(i) for i in range(keep.size)],
            budget,
            features=feats,
            diversity="kcenter",
            candidate_factor=candidate_factor,
        )
        return np.array([int(keep[int(i)]) for i, _ in ranked], dtype=np.int64)
    raise ValueError(
        f"unknown batch strategy {name!r}; choose one of: {', '.join(batch_strategies())}"
    )


def _register_batch_values() -> None:
    for name in (
        "margin_kcenter",
        "entropy_kcenter",
        "margin_cluster",
        "margin_coreset",
        "learning_loss_subset",
    ):
        base = SCORERS[_base_of(name)]
        register_scorer(
            name,
            needs=base.needs,
            description=f"{base.description}; batch diversified on the model's features (see difficulty.hybrid.pick_batch)",
            tags=set(base.tags) | {"batch"},
        )(base.fn)


_register_batch_values()


def batch_strategies() -> tuple[str, ...]:
    """The batch strategies: scorers tagged ``strategy`` and ``batch`` (registration order)."""
    return scorer_names("strategy", "batch")


def batch_selections() -> tuple[str, ...]:
    """The batch strategies ``labeltriage select`` runs on classification models (the whole
    batch chosen at once, uncertain and diverse): all but those that read labeled items."""
    return tuple(n for n in batch_strategies() if n not in NEEDS_LABELED)


def __getattr__(name: str) -> Any:
    """``BATCH_STRATEGIES`` and ``BATCH_SELECTIONS``, derived from the registry's tags when read."""
    if name == "BATCH_STRATEGIES":
        return batch_strategies()
    if name == "BATCH_SELECTIONS":
        return batch_selections()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the combined difficulty --------------------------------------------------------------


@dataclass
class CombinedState:
    """The combined strategy across cycles: what it has seen, and its current weights.

    Each cycle the pool is scored by every part; the values become percentiles within
    the pool (:func:`difficulty.combine.percentiles`) and are combined with the current
    weights.  Once the picked items are labeled, their *true* loss under the model that
    picked them (cross-entropy of the revealed label, an out-of-sample loss: the model
    never trained on them) is recorded with their percentiles, and the weights are refit
    on everything recorded (:func:`difficulty.combine.fit_weights`: Spearman ρ per part,
    the ρ-weighted blend unless one part alone measurably beats it out of sample).  Before any
    item is revealed the ``default`` part is used alone.
    """

    parts: tuple[str, ...] = DEFAULT_PARTS
    default: str = "margin"
    min_labeled: int = 30
    seed: int = 0
    seen: list[pd.DataFrame] = field(default_factory=list)
    losses: list[np.ndarray] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    method: str = "default"
    _last: pd.DataFrame | None = None

    def values(self, arrays: Mapping[str, Any]) -> np.ndarray:
        """Combined values ``(N,)`` in ``[0, 1]`` for the pool described by ``arrays``."""
        table = pd.DataFrame({part: values_of(part, arrays) for part in self.parts})
        pct = percentiles(table, list(self.parts))
        self._last = pct
        weights = self.weights or {p: float(p == self.default) for p in self.parts}
        return np.nan_to_num(combine_percentiles(pct, weights), nan=0.0)

    def observe(self, picked: np.ndarray, losses: np.ndarray) -> None:
        """Record the true losses ``(k,)`` of pool rows ``picked`` of the last :meth:`values` call; refit."""
        if self._last is None:
            raise RuntimeError("observe() before values()")
        self.seen.append(self._last.iloc[np.asarray(picked, dtype=np.int64)].reset_index(drop=True))
        self.losses.append(np.asarray(losses, dtype=np.float64))
        pct = pd.concat(self.seen, ignore_index=True)
        fit = fit_weights(
            pct,
            np.concatenate(self.losses),
            min_labeled=self.min_labeled,
            seed=self.seed,
            default=self.default,
            criterion="rho",
        )
        self.weights, self.method = dict(fit.weights), fit.method


__all__ = [
    "DEFAULT_PARTS",
    "CombinedState",
    "badge",
    "batch_selections",
    "batch_strategies",
    "cluster_pick",
    "coreset_pick",
    "gradient_embedding",
    "kmeans",
    "kmeanspp_seeding",
    "pick_batch",
    "strategy_needs",
    "values_of",
]

"""Ranking with diversity: the top of a ranking, or k-center greedy among its head.

Used by ``labeltriage select`` (:mod:`difficulty.selection`) and by the batch strategies
(:mod:`difficulty.hybrid`).
"""

from __future__ import annotations

import numpy as np

from connectors.errors import UsageError

DIVERSITY = ("kcenter",)


def kcenter_greedy(features: np.ndarray, k: int, *, first: int = 0) -> list[int]:
    """k-center greedy (Sener & Savarese 2018) on ``features`` ``(N, D)``: ``k`` row indices.

    Starts from row ``first`` and repeatedly adds the row farthest (Euclidean) from the
    rows chosen so far.
    """
    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    k = min(k, n)
    if k <= 0:
        return []
    chosen = [first]
    dist = np.linalg.norm(x - x[first], axis=1)
    while len(chosen) < k:
        nxt = int(dist.argmax())
        if dist[nxt] <= 0.0:  # all remaining rows coincide with chosen ones: take them in order
            rest = [i for i in range(n) if i not in set(chosen)]
            chosen.extend(rest[: k - len(chosen)])
            break
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(x - x[nxt], axis=1))
    return chosen


def select(
    values: np.ndarray,
    ids: list[str],
    budget: int,
    *,
    features: np.ndarray | None = None,
    diversity: str | None = None,
    candidate_factor: int = 10,
) -> list[tuple[str, float]]:
    """The ``budget`` items to label first, as ``(item_id, value)`` in rank order.

    ``values`` ``(N,)`` higher = more informative.  Ties break by position (stable).
    ``diversity="kcenter"`` needs ``features`` ``(N, D)``: the ``candidate_factor × budget``
    highest-valued items are candidates, the best of them is taken first and k-center
    greedy picks the rest; ranks follow the order of picking.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.shape[0] != len(ids):
        raise ValueError(f"{v.shape[0]} values for {len(ids)} ids")
    if budget < 0:
        raise ValueError(f"budget {budget} is negative")
    order = np.argsort(-v, kind="stable")
    if diversity is None:
        chosen = order[:budget]
    elif diversity == "kcenter":
        if features is None:
            raise ValueError("k-center diversity needs features")
        candidates = order[: max(budget, candidate_factor * budget)]
        picked = kcenter_greedy(np.asarray(features)[candidates], budget, first=0)
        chosen = candidates[picked]
    else:
        raise UsageError(f"unknown diversity {diversity!r}; choose one of: {', '.join(DIVERSITY)}")
    return [(ids[i], float(v[i])) for i in chosen]


__all__ = ["DIVERSITY", "kcenter_greedy", "select"]

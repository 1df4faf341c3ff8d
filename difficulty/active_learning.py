"""The active-learning cycle on in-memory data: select → reveal → update → train.

:func:`run_active_learning` simulates a labeling project whose labels are hidden until
"annotated": it starts from ``initial`` random labels, and each cycle

1. **trains** the target model + loss-prediction module on the labeled items with the
   same model and training code as ``labeltriage train``
   (:func:`difficulty.training.train_on_arrays`; warm start from the previous cycle's
   model when ``warm_start``) and measures accuracy on the held-out test set;
2. **scores** the unlabeled pool with the same inference code as ``labeltriage select``
   (:func:`difficulty.inference.infer_arrays`: probabilities, last-layer features,
   MC-dropout committee, predicted loss) and applies the strategy;
3. **selects** ``step`` items: the top of the strategy's ranking through
   :func:`difficulty.selection.select` (the CLI's selection), or the batch rule of
   :func:`difficulty.hybrid.pick_batch` for the batch strategies, or the percentile
   combination of :class:`difficulty.hybrid.CombinedState`;
4. **reveals** their labels and moves them to the labeled set.

Everything random is seeded from ``seed``: the initial labels (the same for every
strategy at a given seed, so strategies are compared on the same start), the training
(``seed + cycle``), the strategy's own draws (``random``, k-means++, subsets) — a run is
reproducible from its seed on the same machine and torch build.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from difficulty import hybrid
from difficulty.checkpoint import Checkpoint
from difficulty.diversity import select
from difficulty.inference import InferenceBatch
from difficulty.models.lossnet import LossNetConfig
from difficulty.registry import SCORERS
from difficulty.selection import DEFAULT_COMMITTEE
from difficulty.strategies import query_strategies
from difficulty.training import infer_arrays, train_on_arrays

log = logging.getLogger(__name__)


def classic_strategies() -> tuple[str, ...]:
    """Strategies that rank by one registered value: the query strategies and ``fourier``
    (the model-free image complexity)."""
    return (*query_strategies(), "fourier")


def strategy_names() -> tuple[str, ...]:
    """Every strategy the cycle runs: classic, batch, and ``combined``."""
    return (*classic_strategies(), *hybrid.batch_strategies(), "combined")


def __getattr__(name: str) -> Any:
    """``CLASSIC`` and ``STRATEGY_NAMES``, derived from the registry when read."""
    if name == "CLASSIC":
        return classic_strategies()
    if name == "STRATEGY_NAMES":
        return strategy_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TrainSettings(BaseModel):
    """How each cycle trains (passed to :func:`difficulty.training.train_on_arrays`).

    ``min_steps``: at least this many optimizer steps per cycle; ``warm_start``: start
    each cycle from the previous cycle's model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "small_cnn"
    width: int = Field(32, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    epochs: int = Field(10, ge=1)
    min_steps: int = Field(60, ge=0)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(0.1, gt=0.0)
    warm_start: bool = True
    lossnet: LossNetConfig = LossNetConfig()


class CycleSettings(BaseModel):
    """The cycle: ``initial`` random labels, then ``step`` more per cycle for ``cycles`` cycles.

    ``committee``: MC-dropout members for the committee strategies; ``subset``: score only
    a random subset of that many unlabeled items each cycle (``None``: the whole pool).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial: int = Field(50, ge=2)
    step: int = Field(50, ge=1)
    cycles: int = Field(10, ge=0)
    committee: int = Field(DEFAULT_COMMITTEE, ge=2)
    subset: int | None = Field(None, ge=1)
    train: TrainSettings = TrainSettings()


@dataclass
class CycleRecord:
    """One cycle: ``labels`` trained on, test ``accuracy``, seconds spent training and selecting."""

    cycle: int
    labels: int
    accuracy: float
    train_seconds: float
    select_seconds: float
    note: str = ""


@dataclass
class ActiveLearningRun:
    """A whole run of one strategy at one seed; ``order``: pool indices in the order labeled."""

    strategy: str
    seed: int
    records: list[CycleRecord] = field(default_factory=list)
    order: list[int] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.labels for r in self.records])

    @property
    def accuracy(self) -> np.ndarray:
        return np.array([r.accuracy for r in self.records])


def _gray(x: np.ndarray) -> torch.Tensor:
    """``(N, H, W)`` or ``(N, C, H, W)`` → ``(N, H, W)`` float32 (channel mean)."""
    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    return t.mean(dim=1) if t.dim() == 4 else t


def pool_arrays(
    batch: InferenceBatch, x: np.ndarray, needs: frozenset[str], rng: np.random.Generator
) -> dict[str, Any]:
    """The arrays a strategy may need, keyed by need, from one inference over the pool ``x``."""
    arrays: dict[str, Any] = {
        "probs": batch.probs,
        "features": batch.features,
        "predicted_loss": batch.predicted_loss,
        "rng": rng,
        "n": len(batch),
    }
    if batch.committee is not None:
        arrays["committee"] = batch.committee
    if "images" in needs:
        arrays["images"] = _gray(x)
    return arrays


def choose(
    strategy: str,
    arrays: dict[str, Any],
    budget: int,
    rng: np.random.Generator,
    *,
    combined: hybrid.CombinedState | None = None,
) -> np.ndarray:
    """Row indices (rank order) of the ``budget`` pool items ``strategy`` labels next."""
    n = int(arrays["n"])
    ids = [str(i) for i in range(n)]
    if strategy in hybrid.batch_strategies():
        return hybrid.pick_batch(strategy, arrays, budget, rng)
    if strategy == "combined":
        if combined is None:
            raise ValueError("the combined strategy needs its CombinedState")
        values = combined.values(arrays)
    elif strategy == "random":
        values = SCORERS["random"].fn(rng=rng, n=n)
    else:
        values = hybrid.values_of(strategy, arrays)
    return np.array([int(i) for i, _ in select(values, ids, budget)], dtype=np.int64)


def _accuracy(ckpt: Checkpoint, x: np.ndarray, y: np.ndarray, device: str) -> float:
    probs = infer_arrays(ckpt, x, device=device).probs
    assert probs is not None  # classification always gives probs
    return float((probs.argmax(axis=1) == np.asarray(y)).mean())


def _next_batch(
    strategy: str,
    ckpt: Checkpoint,
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    labeled: list[int],
    unlabeled: np.ndarray,
    rng: np.random.Generator,
    settings: CycleSettings,
    needs: frozenset[str],
    committee: int,
    combined: hybrid.CombinedState | None,
    device: str,
) -> np.ndarray:
    """The pool indices ``strategy`` picks next among ``unlabeled`` (a seeded subset of them
    with ``settings.subset``); the combined strategy learns from their revealed labels."""
    candidates = unlabeled
    if settings.subset is not None and settings.subset < unlabeled.size:
        candidates = np.sort(rng.choice(unlabeled, size=settings.subset, replace=False))
    budget = min(settings.step, candidates.size)
    if strategy == "random":
        arrays: dict[str, Any] = {"n": int(candidates.size)}
    else:
        batch = infer_arrays(ckpt, x_pool[candidates], committee=committee, device=device)
        arrays = pool_arrays(batch, x_pool[candidates], needs, rng)
        if strategy in hybrid.NEEDS_LABELED:
            arrays["labeled_features"] = infer_arrays(
                ckpt, x_pool[np.asarray(labeled)], device=device
            ).features
    picked = choose(strategy, arrays, budget, rng, combined=combined)
    new = candidates[picked]
    if combined is not None:
        p = np.asarray(arrays["probs"])[picked]
        combined.observe(picked, -np.log(np.clip(p[np.arange(len(new)), y_pool[new]], 1e-12, 1.0)))
    return np.asarray(new)


def run_active_learning(
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    strategy: str,
    seed: int = 0,
    settings: CycleSettings = CycleSettings(),
    classes: Sequence[str] | None = None,
    combined_parts: Sequence[str] = hybrid.DEFAULT_PARTS,
    device: str = "cpu",
) -> ActiveLearningRun:
    """Run the cycle for ``strategy`` (one of :data:`STRATEGY_NAMES`) and return its curve.

    ``x_pool`` ``(N, H, W)`` or ``(N, C, H, W)`` float images, ``y_pool`` ``(N,)`` class
    indices (hidden until an item is selected); ``x_test``/``y_test`` the fixed held-out
    split.  ``classes`` default ``["0", …, str(max label)]``.  Returns one
    :class:`CycleRecord` per trained model: ``settings.cycles + 1`` of them, from
    ``initial`` to ``initial + cycles × step`` labels (fewer if the pool runs out).
    """
    if strategy not in strategy_names():
        raise ValueError(
            f"unknown strategy {strategy!r}; choose one of: {', '.join(strategy_names())}"
        )
    y_pool = np.asarray(y_pool, dtype=np.int64)
    n_pool = int(y_pool.shape[0])
    if settings.initial > n_pool:
        raise ValueError(f"initial {settings.initial} labels > pool of {n_pool}")
    classes = (
        list(classes)
        if classes is not None
        else [str(i) for i in range(int(max(y_pool.max(), np.max(y_test))) + 1)]
    )
    needs = (
        hybrid.strategy_needs(strategy, parts=combined_parts)
        if strategy not in ("random",)
        else frozenset()
    )
    committee = settings.committee if needs & {"committee"} else 0
    combined = (
        hybrid.CombinedState(parts=tuple(combined_parts), seed=seed)
        if strategy == "combined"
        else None
    )
    ts = settings.train

    start = np.random.default_rng(seed)
    labeled = [int(i) for i in start.choice(n_pool, size=settings.initial, replace=False)]
    run = ActiveLearningRun(strategy, seed, order=list(labeled))
    unlabeled = np.setdiff1d(np.arange(n_pool), labeled)
    ckpt: Checkpoint | None = None
    for cycle in range(settings.cycles + 1):
        t0 = time.perf_counter()
        idx = np.asarray(labeled)
        ckpt = train_on_arrays(
            x_pool[idx],
            y_pool[idx],
            classes=classes,
            arch=ts.arch,
            epochs=ts.epochs,
            batch_size=ts.batch_size,
            lr=ts.lr,
            seed=seed * 1000 + cycle,
            lossnet=ts.lossnet,
            init=ckpt if (ts.warm_start and ckpt is not None) else None,
            min_steps=ts.min_steps,
            width=ts.width,
            dropout=ts.dropout,
            ids=[str(i) for i in idx],
            device=device,
        )
        train_s = time.perf_counter() - t0
        acc = _accuracy(ckpt, x_test, y_test, device)
        note = (
            f"{combined.method}: "
            + ", ".join(f"{k}={v:.2f}" for k, v in combined.weights.items() if v > 0)
            if combined is not None and combined.weights
            else ""
        )
        select_s = 0.0
        if cycle < settings.cycles and unlabeled.size:
            t1 = time.perf_counter()
            rng = np.random.default_rng([seed, cycle, 7])
            new = _next_batch(
                strategy, ckpt, x_pool, y_pool, labeled, unlabeled, rng, settings,
                needs, committee, combined, device,
            )  # fmt: skip
            labeled.extend(int(i) for i in new)
            run.order.extend(int(i) for i in new)
            unlabeled = np.setdiff1d(unlabeled, new)
            select_s = time.perf_counter() - t1
        run.records.append(CycleRecord(cycle, int(idx.size), acc, train_s, select_s, note))
        log.info(
            "%s seed %d cycle %d: %d labels, accuracy %.4f (train %.1fs, select %.1fs)",
            strategy, seed, cycle, idx.size, acc, train_s, select_s,
        )  # fmt: skip
    return run


def labels_to_reach(labels: np.ndarray, accuracy: np.ndarray, target: float) -> float:
    """Labels at which the curve ``accuracy(labels)`` first reaches ``target``.

    Linear interpolation between the two cycles around the first crossing; the first
    point if it already reaches it; ``nan`` if the curve never does.
    """
    lab = np.asarray(labels, dtype=np.float64)
    acc = np.asarray(accuracy, dtype=np.float64)
    hit = np.flatnonzero(acc >= target)
    if hit.size == 0:
        return float("nan")
    i = int(hit[0])
    if i == 0:
        return float(lab[0])
    a0, a1 = acc[i - 1], acc[i]
    return float(lab[i - 1] + (target - a0) / (a1 - a0) * (lab[i] - lab[i - 1]))

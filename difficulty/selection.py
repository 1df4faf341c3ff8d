"""Choosing the next items to label: rank by a strategy's values, optionally diversify.

:func:`select` is the pure part (values → ranked ids).  :func:`select_from_project` is what
``labeltriage select`` runs:

1. keep only **unlabeled** items without ``error`` (a labeled item is never returned);
2. the random-subset trick of Yoo & Kweon: score a seeded random subset of ``subset`` (M)
   items instead of the whole pool (the paper uses M = 10,000), which bounds the cost per
   cycle and keeps consecutive picks from being the same top-ranked region;
3. run the checkpoint over the subset (:func:`difficulty.inference.infer`; ``random`` needs
   no model) and apply the strategy to all outputs at once;
4. take the ``budget`` highest values, or with ``diversity="kcenter"`` run k-center greedy
   on the model's features among the ``candidate_factor × budget`` highest (so one batch is
   not a set of near-duplicates);
5. write ``item_id, value, rank`` (rank 1 = label first) to a ``.csv`` or ``.parquet`` file.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from connectors.csvsafe import csv_text
from connectors.errors import UsageError
from connectors.model import Item, ItemStatus
from connectors.storage import ProjectFS
from difficulty import hybrid
from difficulty.checkpoint import Checkpoint, load_checkpoint
from difficulty.diversity import DIVERSITY, select
from difficulty.registry import ScorerSpec
from difficulty.strategies import strategy_for_task

log = logging.getLogger(__name__)

DEFAULT_COMMITTEE = 8
"""Committee members for the committee strategies (the stored bootstrap ones, at most this
many, when the checkpoint has them; else MC-dropout passes)."""


@dataclass
class SelectionResult:
    """``ranked``: ``(item_id, value)`` in rank order; ``errors``: items that could not be scored."""

    ranked: list[tuple[str, float]]
    strategy: str
    scored: int
    pool: int
    errors: dict[str, str] = field(default_factory=dict)
    model_version: str | None = None


def _batch_spec(name: str, needs: frozenset[str]) -> ScorerSpec:
    """A spec carrying what batch strategy ``name`` needs from inference (no own function)."""
    return ScorerSpec(name, lambda **_: None, needs - {"rng", "n"}, f"batch strategy {name}")


def _gather(
    batches: Iterable[Any], spec: ScorerSpec
) -> tuple[list[str], dict[str, Any], np.ndarray | None, dict[str, str]]:
    ids: list[str] = []
    errors: dict[str, str] = {}
    arrays: dict[str, list[Any]] = {}
    features: list[np.ndarray] = []
    for batch in batches:
        errors.update(batch.errors)
        if not batch.item_ids:
            continue
        ids.extend(batch.item_ids)
        features.append(batch.features)
        for need in spec.needs - {"rng", "n"}:
            value = getattr(batch, need)
            if value is None:
                raise UsageError(
                    f"strategy {spec.name!r} needs {need!r}, which this model does not give"
                )
            arrays.setdefault(need, []).append(value)
    merged: dict[str, Any] = {}
    for need, parts in arrays.items():
        if need == "committee":
            merged[need] = np.concatenate(parts, axis=1)
        elif isinstance(parts[0], list):
            merged[need] = [a for p in parts for a in p]
        else:
            merged[need] = np.concatenate(parts)
    return ids, merged, (np.concatenate(features) if features else None), errors


def _selection_spec(
    strategy: str,
    checkpoint: str | Checkpoint | None,
    task: str | None,
    diversity: str | None,
    settings: dict[str, Any] | None,
    storage_options: dict[str, Any] | None,
) -> tuple[Checkpoint | None, str, Any, dict[str, Any]]:
    """Check a selection's inputs: ``(checkpoint, task, strategy spec, its settings)``."""
    from difficulty import hybrid

    batch_strategy = strategy in hybrid.batch_selections()
    if batch_strategy and task not in (None, "classification"):
        raise UsageError(
            f"strategy {strategy!r} chooses batches on a classification model; for detection "
            "use a classic strategy with --diversity kcenter"
        )
    ckpt = (
        load_checkpoint(checkpoint, storage_options=storage_options)
        if checkpoint is not None
        else None
    )
    if ckpt is None and strategy != "random":
        raise UsageError(f"strategy {strategy!r} needs a trained model: give --model CHECKPOINT")
    if diversity is not None and diversity not in DIVERSITY:
        raise UsageError(f"unknown diversity {diversity!r}; choose one of: {', '.join(DIVERSITY)}")
    if diversity is not None and ckpt is None:
        raise UsageError("diversity works on the model's features: give --model CHECKPOINT")
    task = task or (ckpt.task if ckpt is not None else "classification")
    if batch_strategy and task != "classification":
        raise UsageError(
            f"strategy {strategy!r} chooses batches on a classification model, not on "
            f"this {task} model; for detection use a classic strategy with --diversity kcenter"
        )
    spec = (
        _batch_spec(strategy, hybrid.strategy_needs(strategy))
        if batch_strategy
        else strategy_for_task(strategy, task)
    )
    try:
        kwargs = spec.settings(**(settings or {})).model_dump()
    except Exception as exc:  # pydantic ValidationError
        raise UsageError(f"bad settings for strategy {strategy!r}: {exc}") from exc

    return ckpt, task, spec, kwargs


def _batch_ranked(
    strategy: str,
    arrays: dict[str, Any],
    ids: list[str],
    budget: int,
    rng: np.random.Generator,
    candidate_factor: int,
) -> list[tuple[str, float]]:
    """The batch a strategy of :data:`BATCH_SELECTIONS` picks, with each item's value."""
    from difficulty import hybrid

    picked = hybrid.pick_batch(
        strategy, arrays, budget, rng, subset=len(ids), candidate_factor=candidate_factor
    )
    values = (
        hybrid.values_of(hybrid.base_strategy(strategy), arrays)
        if strategy != "badge"
        else np.linalg.norm(hybrid.gradient_embedding(arrays["probs"], arrays["features"]), axis=1)
    )
    return [(ids[int(i)], float(values[int(i)])) for i in picked]


def select_from_project(
    items: Iterable[Item],
    project: ProjectFS | Any,
    *,
    strategy: str,
    budget: int,
    checkpoint: str | Checkpoint | None = None,
    task: str | None = None,
    subset: int | None = None,
    seed: int = 0,
    diversity: str | None = None,
    settings: dict[str, Any] | None = None,
    committee: int = DEFAULT_COMMITTEE,
    batch_size: int = 32,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
    candidate_factor: int = 4,
) -> SelectionResult:
    """Rank the unlabeled items of a project by ``strategy`` and keep ``budget`` of them.

    ``checkpoint`` is required for every strategy but ``random`` (:class:`UsageError`
    otherwise); ``task`` defaults to the checkpoint's (``random`` without a model works for
    any task).  ``subset``: score only a seeded random subset of that many unlabeled items.
    ``settings``: the strategy's own settings (e.g. ``{"reduction": "mean"}`` for detection).
    ``candidate_factor``: k-center and the batch strategies choose among the
    ``candidate_factor × budget`` highest-valued items.

    The batch strategies of :mod:`difficulty.hybrid` (:func:`~difficulty.hybrid.batch_selections`:
    ``margin_kcenter``, ``entropy_kcenter``, ``margin_cluster``, ``badge``,
    ``learning_loss_subset``) choose the whole batch at once, on classification models;
    ``learning_loss_subset`` scores a seeded random half of the pool unless ``subset`` is
    given (the random-subset trick of Yoo & Kweon).
    """

    batch_strategy = strategy in hybrid.batch_selections()
    ckpt, task, spec, kwargs = _selection_spec(
        strategy, checkpoint, task, diversity, settings, storage_options
    )

    pool = [it for it in items if it.status is ItemStatus.UNLABELED and it.error is None]
    pool.sort(key=lambda it: it.item_id)
    rng = np.random.default_rng(seed)
    if strategy == "learning_loss_subset" and subset is None:
        subset = max(len(pool) // 2, candidate_factor * budget)
    if subset is not None and subset < len(pool):
        keep = np.sort(rng.choice(len(pool), size=subset, replace=False))
        chosen_items = [pool[i] for i in keep]
    else:
        chosen_items = pool
    log.info("scoring %d of %d unlabeled items with %s", len(chosen_items), len(pool), spec.name)

    if ckpt is None or (not (spec.needs - {"rng", "n"}) and diversity is None):
        ids = [it.item_id for it in chosen_items]
        values = spec.fn(rng=rng, n=len(ids))
        ranked = select(values, ids, budget)
        return SelectionResult(
            ranked, strategy, len(ids), len(pool), model_version=ckpt.version if ckpt else None
        )

    from difficulty.inference import infer

    m = committee if spec.needs & {"committee", "box_committee"} else 0
    batches = infer(
        ckpt,
        chosen_items,
        project,
        batch_size=batch_size,
        committee=m,
        device=device,
        num_workers=num_workers,
        progress=progress,
    )
    ids, arrays, features, errors = _gather(batches, spec)
    for item_id, message in errors.items():
        log.warning("item %s not scored: %s", item_id, message)
    if "rng" in spec.needs:
        arrays["rng"] = rng
    if "n" in spec.needs:
        arrays["n"] = len(ids)
    if batch_strategy and ids:
        arrays["features"] = features
        ranked = _batch_ranked(strategy, arrays, ids, budget, rng, candidate_factor)
        return SelectionResult(ranked, strategy, len(ids), len(pool), errors, ckpt.version)
    values = np.asarray(spec.fn(**arrays, **kwargs), dtype=np.float64) if ids else np.zeros(0)
    if not np.all(np.isfinite(values)):
        raise RuntimeError(f"strategy {spec.name} gave non-finite values")
    ranked = select(
        values,
        ids,
        budget,
        features=features,
        diversity=diversity,
        candidate_factor=candidate_factor,
    )
    return SelectionResult(ranked, strategy, len(ids), len(pool), errors, ckpt.version)


def write_selection(
    ranked: list[tuple[str, float]], out: str, *, storage_options: dict[str, Any] | None = None
) -> str:
    """Write ``item_id, value, rank`` to ``out`` (``.csv`` or ``.parquet``, any fsspec URL), atomically."""
    frame = pd.DataFrame(
        {
            "item_id": [r[0] for r in ranked],
            "value": [r[1] for r in ranked],
            "rank": list(range(1, len(ranked) + 1)),
        }
    )
    buffer = io.BytesIO()
    if out.endswith(".parquet"):
        frame.to_parquet(buffer, index=False)
    elif out.endswith(".csv"):
        buffer.write(csv_text(frame).encode("utf-8"))  # no cell starts a formula
    else:
        raise UsageError(f"--out {out}: expected a .csv or .parquet file")
    if "://" in out:
        protocol, rest = out.split("://", 1)
        parent, name = posixpath.split(rest)
        parent = f"{protocol}://{parent}"
    else:
        parent, name = os.path.split(os.path.abspath(out))
    ProjectFS(parent, storage_options).write_bytes(name, buffer.getvalue())
    return out

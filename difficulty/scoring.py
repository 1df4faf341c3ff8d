"""Score a whole project: stream items, run the scorers, combine, tier, write the table.

:func:`score_project` is the orchestrator; the per-chunk work is the pure function
:func:`score_chunk` (a list of items in, one row per item out), so the same work can run
as Dask tasks over manifest partitions and be concatenated afterwards.

Each scorer is fed exactly what it declares in ``needs`` (see
:mod:`difficulty.registry`): images come from :mod:`difficulty.imagestream`, box
confidences and class probabilities from the predictions the user brings (after the label
map, so only project classes count) or from a model checkpoint through
:mod:`difficulty.inference`.  A scorer runs on the items that have all of its inputs; the
others get NaN in its column.

On labeled items (a human label) with a prediction, the *true error* of the prediction is
measured with :func:`difficulty.matching.item_error` (``1 − F1`` of the box matching at
IoU ``iou_threshold``, predictions below ``error_min_score`` dropped, ignore classes from
the label map).  It drives the combination weights (:mod:`difficulty.combine`).

An item that cannot be read, decoded or predicted is a row with ``error`` set and no
scores; it never stops the run.
"""

from __future__ import annotations

import importlib
import json
import logging
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from connectors.errors import UsageError
from connectors.formats.base import PredictionSource, ProjectFormat
from connectors.labelmap import LabelMap
from connectors.model import Item, Prediction
from connectors.storage import ProjectFS
from difficulty.combine import (
    CombineFit,
    fit_weights,
    percentiles,
    quantile_sketch,
    spearman,
)
from difficulty.registry import SCORERS, ScorerSpec
from difficulty.table import write_difficulty
from difficulty.tiers import TierConfig, tier_thresholds, tiers_from_thresholds

log = logging.getLogger(__name__)

SCORER_MODULES = ("difficulty.fourier", "difficulty.strategies", "difficulty.prediction_scores")
"""Modules whose import registers scorers."""

DEFAULT_SCORER = "fourier"
CHUNK_SIZE = 512
ChunkRunner = Callable[..., Iterable[pd.DataFrame]]
"""``runner(chunks, **score_chunk_kwargs)`` → the tables of :func:`score_chunk`, in chunk order."""
PREDICTION_FIELDS = (
    "probs",
    "committee",
    "features",
    "predicted_loss",
    "box_scores",
    "box_probs",
    "box_committee",
    "box_features",
)
"""Needs that a model checkpoint (``difficulty.inference``) can provide."""


def load_scorers() -> None:
    """Import every module that registers scorers (missing optional ones are skipped)."""
    for name in SCORER_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            log.debug("scorer module %s is not installed", name)


def new_run_id(now: datetime | None = None) -> str:
    """A sortable, unique run id: ``20260101T120000Z-1a2b3c``."""
    now = now or datetime.now(timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


# -- choosing scorers -----------------------------------------------------------------------


def available_needs(task: str, *, predictions: bool, checkpoint: bool) -> frozenset[str]:
    """The needs the given inputs can satisfy (``rng`` and ``n`` always)."""
    needs = {"images", "rng", "n"}
    if predictions:
        needs |= {"box_scores"} if task == "detection" else {"probs"}
    if checkpoint:
        needs |= set(PREDICTION_FIELDS)
    return frozenset(needs)


def default_scorers(needs: frozenset[str]) -> list[str]:
    """``fourier`` plus every scorer the inputs support, without baselines and aliases.

    Left out: baselines (scorers that read ``rng``: ``random``) and batch-mode selection
    strategies (tag ``batch``: their value depends on the rest of the batch, it is no
    per-item difficulty).  When two names share one function (``learning_loss`` /
    ``predicted_loss``) the one not tagged ``strategy`` is kept.
    """
    load_scorers()
    chosen: dict[int, ScorerSpec] = {}
    for name in SCORERS:
        spec = SCORERS[name]
        if "rng" in spec.needs or "batch" in spec.tags or not spec.needs <= needs:
            continue
        key = id(spec.fn)
        if key not in chosen or ("strategy" in chosen[key].tags and "strategy" not in spec.tags):
            chosen[key] = spec
    names = sorted(s.name for s in chosen.values())
    if DEFAULT_SCORER in names:
        names.remove(DEFAULT_SCORER)
        names.insert(0, DEFAULT_SCORER)
    return names


def resolve_scorers(
    names: Sequence[str], settings: Mapping[str, Mapping[str, Any]] | None, needs: frozenset[str]
) -> dict[str, dict[str, Any]]:
    """Validate scorer names, their settings and their needs; return ``name → kwargs``."""
    load_scorers()
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise UsageError(f"settings given for scorers that are not run: {', '.join(unknown)}")
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        spec = SCORERS[name]  # UsageError with the valid choices on a miss
        missing = sorted(spec.needs - needs)
        if missing:
            raise UsageError(
                f"scorer {name!r} needs {', '.join(missing)}, which these inputs do not provide (bring predictions or a model)"
            )
        try:
            out[name] = spec.settings.model_validate(dict(settings.get(name, {}))).model_dump()
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise UsageError(f"scorer {name!r}: invalid setting {loc!r}: {first['msg']}") from exc
    return out


# -- per-chunk work -----------------------------------------------------------------------


def _box_scores(prediction: Prediction, label_map: LabelMap) -> np.ndarray:
    anns = [a for a in label_map.apply(prediction.annotations) if a.box is not None]
    return np.array([1.0 if a.score is None else a.score for a in anns], dtype=np.float64)


def _collate(need: str, values: list[Any]) -> Any:
    """Stack per-item inputs into what a scorer of that need receives."""
    if need == "images":
        import torch

        return torch.stack(values) if values else torch.zeros((0, 1, 1))
    if need == "committee":
        return np.stack(values, axis=1)
    if need == "probs" and values and isinstance(values[0], dict):
        classes = sorted({k for v in values for k in v})
        return np.array([[float(v.get(c, 0.0)) for c in classes] for v in values], dtype=np.float64)
    if need in ("probs", "features", "predicted_loss"):
        return np.stack([np.asarray(v) for v in values]) if values else np.zeros((0,))
    return list(values)


def _split_batch(need: str, value: Any, n: int) -> list[Any]:
    """The inverse of :func:`_collate` for a model's batch output."""
    if need == "committee":
        return [value[:, i] for i in range(n)]
    return [value[i] for i in range(n)]


def _images(
    items: list[Item], project: ProjectFS, size: int, batch_size: int, num_workers: int
) -> tuple[dict[str, Any], dict[str, str]]:
    from difficulty.imagestream import iter_image_batches

    images: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for batch in iter_image_batches(
        items, project, size=size, batch_size=batch_size, num_workers=num_workers, progress=False
    ):
        errors.update(batch.errors)
        for i, item_id in enumerate(batch.item_ids):
            images[item_id] = batch.images[i]
    return images, errors


def _model_outputs(
    checkpoint: str,
    items: list[Item],
    project: ProjectFS,
    batch_size: int,
    needs: frozenset[str],
    storage_options: dict[str, Any] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Prediction], dict[str, str]]:
    from difficulty.inference import infer

    per_need: dict[str, dict[str, Any]] = {}
    preds: dict[str, Prediction] = {}
    errors: dict[str, str] = {}
    committee = 0
    if needs & {"committee", "box_committee"}:
        committee = 8
    for batch in infer(
        checkpoint,
        items,
        project,
        batch_size=batch_size,
        committee=committee,
        storage_options=storage_options,
    ):
        errors.update(batch.errors)
        ids = list(batch.item_ids)
        for need in PREDICTION_FIELDS:
            value = getattr(batch, need, None)
            if value is None:
                continue
            for item_id, v in zip(ids, _split_batch(need, value, len(ids)), strict=True):
                per_need.setdefault(need, {})[item_id] = v
        for p in batch.predictions or []:
            preds[p.item_id] = p
    return per_need, preds, errors


def score_chunk(
    items: Sequence[Item],
    *,
    project: ProjectFS,
    scorers: Mapping[str, Mapping[str, Any]],
    predictions: PredictionSource | None = None,
    checkpoint: str | None = None,
    checkpoint_storage_options: dict[str, Any] | None = None,
    label_map: LabelMap = LabelMap(),
    task: str = "detection",
    image_size: int = 128,
    batch_size: int = 64,
    num_workers: int = 0,
    iou_threshold: float = 0.5,
    error_min_score: float = 0.25,
    seed: int = 0,
) -> pd.DataFrame:
    """Score one chunk of items; one row per item, in input order.

    ``scorers`` maps scorer name → validated settings (see :func:`resolve_scorers`).
    ``checkpoint_storage_options``: fsspec options for reading ``checkpoint``.
    Columns: ``item_id``, ``uri``, ``status``, one raw value per scorer, ``error``,
    ``true_error``, ``annotation_seconds``, ``model_version``.
    """
    items = list(items)
    specs = {name: SCORERS[name] for name in scorers}
    wanted = frozenset().union(*(s.needs for s in specs.values())) if specs else frozenset()
    errors: dict[str, str] = {it.item_id: it.error for it in items if it.error}
    ok = [it for it in items if not it.error]
    inputs: dict[str, dict[str, Any]] = {}
    preds: dict[str, Prediction] = {}

    if "images" in wanted and ok:
        images, image_errors = _images(ok, project, image_size, batch_size, num_workers)
        errors.update(image_errors)
        inputs["images"] = images
    if checkpoint is not None and ok:
        per_need, preds, model_errors = _model_outputs(
            checkpoint, ok, project, batch_size, wanted, checkpoint_storage_options
        )
        errors.update(model_errors)
        inputs.update(per_need)
    elif predictions is not None:
        for it in ok:
            p = predictions.get(it.item_id, it)
            if p is None:
                continue
            if p.error:
                errors[it.item_id] = p.error
                continue
            preds[it.item_id] = p
            inputs.setdefault("box_scores", {})[it.item_id] = _box_scores(p, label_map)
            if p.probs:
                inputs.setdefault("probs", {})[it.item_id] = p.probs

    n = len(items)
    rows: dict[str, Any] = {
        "item_id": [it.item_id for it in items],
        "uri": [it.uri for it in items],
        "status": [it.status.value for it in items],
    }
    good = [it.item_id for it in items if it.item_id not in errors]
    position = {it.item_id: i for i, it in enumerate(items)}
    for name, spec in specs.items():
        col = np.full(n, np.nan)
        data_needs = spec.needs - {"rng", "n"}
        ids = [i for i in good if all(i in inputs.get(need, {}) for need in data_needs)]
        if ids:
            kwargs: dict[str, Any] = {
                need: _collate(need, [inputs[need][i] for i in ids]) for need in data_needs
            }
            if "n" in spec.needs:
                kwargs["n"] = len(ids)
            if "rng" in spec.needs:
                kwargs["rng"] = np.random.default_rng([seed, zlib.crc32(ids[0].encode())])
            values = np.asarray(spec.fn(**kwargs, **scorers[name]), dtype=np.float64).reshape(-1)
            col[[position[i] for i in ids]] = values
        rows[name] = col

    from difficulty.matching import item_error

    true_error = np.full(n, np.nan)
    for i, it in enumerate(items):
        if it.item_id in errors or it.item_id not in preds or not it.has_human_label:
            continue
        true_error[i] = item_error(
            it,
            preds[it.item_id],
            label_map,
            task=task,
            iou_threshold=iou_threshold,
            min_score=error_min_score,
        )
    rows["error"] = [errors.get(it.item_id) for it in items]
    rows["true_error"] = true_error
    rows["annotation_seconds"] = [
        np.nan if it.annotation_seconds is None else float(it.annotation_seconds) for it in items
    ]
    rows["model_version"] = [
        preds[it.item_id].model_version if it.item_id in preds else None for it in items
    ]
    df = pd.DataFrame(rows)
    for name in (
        "error",
        "model_version",
    ):  # nullable text: the same dtype whether or not a chunk has values
        df[name] = pd.Series(rows[name], dtype=object)
    return df


# -- the whole project ----------------------------------------------------------------------


@dataclass
class ScoreResult:
    """What :func:`score_project` wrote: the table, its metadata and the paths."""

    table: pd.DataFrame
    meta: dict[str, Any]
    summary: dict[str, Any]
    paths: dict[str, str] = field(default_factory=dict)


def describe_predictions(predictions: PredictionSource | None) -> str | None:
    """Where brought predictions come from (their folder or file), for the run metadata."""
    if predictions is None:
        return None
    for attr in ("fs", "project_fs", "source"):
        value = getattr(predictions, attr, None)
        if isinstance(value, ProjectFS):
            return value.url
        if isinstance(value, str):
            return value
    return type(predictions).__name__


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for it in items:
        chunk.append(it)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _task(project: ProjectFormat) -> str:
    tasks = tuple(getattr(project, "tasks", ("detection",)))
    return "detection" if "detection" in tasks else tasks[0]


def finish_table(
    raw: pd.DataFrame,
    scorers: Sequence[str],
    *,
    tiers: TierConfig = TierConfig(),
    reference_meta: dict[str, Any] | None = None,
    min_labeled: int = 30,
    seed: int = 0,
    signed_weights: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Percentiles, combination, tiers and ranks for the concatenated chunk rows.

    Returns the contract table and the metadata parts ``combination``, ``reference``
    and ``tiers``.  With ``reference_meta`` (an earlier run's metadata) its quantile
    sketches and weights are reused, and — unless ``tiers`` was set explicitly — its
    absolute tier thresholds.
    """
    df = raw.reset_index(drop=True).copy()
    ok = df["error"].isna().to_numpy()
    err = df["true_error"].to_numpy(dtype=np.float64, na_value=np.nan)
    err = np.where(ok, err, np.nan)
    scored = df.loc[ok, list(scorers)]

    ref_sketch = None
    if reference_meta is not None:
        ref_sketch = {
            k: v for k, v in reference_meta.get("reference", {}).items() if k in scorers and v
        }
    pct = percentiles(scored, scorers, ref_sketch)
    sketch = dict(ref_sketch or {})
    for name in scorers:
        sketch.setdefault(
            name, quantile_sketch(scored[name].to_numpy(dtype=np.float64, na_value=np.nan))
        )

    err_ok = err[ok]
    if reference_meta is not None:
        ref_weights = {
            k: float(v or 0.0)
            for k, v in reference_meta.get("combination", {}).get("weights", {}).items()
        }
        weights = {k: ref_weights.get(k, 0.0) for k in scorers}
        dropped = sorted(set(ref_weights) - set(scorers))
        if dropped:
            log.warning(
                "reference weights for scorers not run here are dropped: %s", ", ".join(dropped)
            )
        fit = CombineFit(
            "reference",
            weights,
            {k: spearman(pct[k].to_numpy(), err_ok) for k in scorers},
            {},
            int(np.isfinite(err_ok).sum()),
            f"weights reused from run {reference_meta.get('run_id')}",
        )
    else:
        fit = fit_weights(pct, err_ok, min_labeled=min_labeled, seed=seed, signed=signed_weights)

    score = np.full(len(df), np.nan)
    score[ok] = fit.score(pct)
    ref_tiers = (reference_meta or {}).get("tiers") or {}
    if (
        reference_meta is not None
        and not tiers.model_fields_set
        and ref_tiers.get("easy_max") is not None
        and ref_tiers.get("hard_min") is not None
    ):
        easy_max = float(ref_tiers["easy_max"])
        hard_min = float(ref_tiers["hard_min"])
        tier_source = f"reference run {reference_meta.get('run_id')}"
    else:
        easy_max, hard_min = tier_thresholds(score, tiers)
        tier_source = tiers.mode
    df["score"] = score
    df["tier"] = tiers_from_thresholds(score, easy_max, hard_min)
    rank = pd.Series(pd.NA, index=df.index, dtype="Int64")
    finite = np.flatnonzero(np.isfinite(score))
    order = finite[np.argsort(-score[finite], kind="stable")]
    rank.iloc[order] = np.arange(1, order.size + 1)
    df["rank"] = rank
    fit_dict = fit.to_dict()
    combined_rho = spearman(score[ok], err_ok)
    fit_dict["combined_rho"] = combined_rho if np.isfinite(combined_rho) else None
    meta = {
        "combination": fit_dict,
        "reference": sketch,
        "tiers": {
            "config": tiers.model_dump(),
            "easy_max": easy_max if np.isfinite(easy_max) else None,  # None: nothing scored
            "hard_min": hard_min if np.isfinite(hard_min) else None,
            "source": tier_source,
        },
    }
    return df, meta


def summarize(df: pd.DataFrame, meta: dict[str, Any], *, max_errors: int = 50) -> dict[str, Any]:
    """The run's numbers for ``summary.json``."""
    tiers = df["tier"].value_counts()
    errors = df[df["error"].notna()]
    labeled = df["status"].isin(["labeled", "reviewed"])
    return {
        "run_id": meta["run_id"],
        "created": meta["created"],
        "source": meta.get("source"),
        "format": meta.get("format"),
        "task": meta.get("task"),
        "model_version": meta.get("model_version"),
        "items": len(df),
        "scored": int(df["score"].notna().sum()),
        "errors": len(errors),
        "labeled": int(labeled.sum()),
        "with_true_error": int(df["true_error"].notna().sum()),
        "tiers": {t: int(tiers.get(t, 0)) for t in ("easy", "medium", "hard")},
        "thresholds": {
            "easy_max": meta["tiers"]["easy_max"],
            "hard_min": meta["tiers"]["hard_min"],
        },
        "scorers": meta["scorers"],
        "combination": meta["combination"],
        "error_items": [
            {"item_id": r.item_id, "error": r.error} for r in errors.head(max_errors).itertuples()
        ],
    }


def score_project(
    project: ProjectFormat,
    *,
    out_dir: str,
    predictions: PredictionSource | None = None,
    checkpoint: str | None = None,
    label_map: LabelMap = LabelMap(),
    scorers: list[str] | None = None,
    settings: dict[str, dict[str, Any]] | None = None,
    tiers: TierConfig = TierConfig(),
    reference: str | None = None,
    storage_options: dict[str, Any] | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = False,
    run_id: str | None = None,
    image_size: int = 128,
    iou_threshold: float = 0.5,
    error_min_score: float = 0.25,
    min_labeled: int = 30,
    chunk_size: int = CHUNK_SIZE,
    seed: int = 0,
    chunk_runner: ChunkRunner | None = None,
    signed_weights: bool = False,
) -> ScoreResult:
    """Score every item of ``project``; write ``out_dir/difficulty.parquet`` and ``summary.json``.

    ``scorers`` defaults to ``fourier`` plus whatever the inputs support
    (:func:`default_scorers`); ``settings`` holds per-scorer settings under the scorer's
    name.  ``reference`` is an earlier run folder whose reference distributions, weights
    and tier thresholds are reused so that the scores of both runs compare.
    ``signed_weights`` lets scorers that rank the true error backwards take part reversed
    (see :func:`difficulty.combine.candidate_weights`); off by default.
    ``out_dir`` is any fsspec URL (``storage_options`` apply to it, to ``reference`` and to
    ``checkpoint``).
    ``chunk_runner`` (an engine, e.g. :meth:`autolabel.engine_dask.DaskEngine.map_chunks`)
    maps :func:`score_chunk` over the chunks elsewhere and yields their tables in order;
    ``None`` runs them here, one after another.
    """
    if predictions is not None and checkpoint is not None:
        raise UsageError("give predictions or a model checkpoint, not both")
    task = _task(project)
    needs = available_needs(
        task, predictions=predictions is not None, checkpoint=checkpoint is not None
    )
    names = list(scorers) if scorers else default_scorers(needs)
    if not names:
        raise UsageError("no scorer to run")
    chosen = resolve_scorers(names, settings, needs)
    reference_meta = None
    if reference is not None:
        from difficulty.table import read_difficulty

        _, reference_meta = read_difficulty(reference, storage_options)
    run_id = run_id or new_run_id()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")

    parts: list[pd.DataFrame] = []
    items: Iterable[Item] = project.iter_items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="score", unit="item")
    chunk_kwargs: dict[str, Any] = {
        "project": project.project,
        "scorers": chosen,
        "predictions": predictions,
        "checkpoint": checkpoint,
        "checkpoint_storage_options": storage_options,
        "label_map": label_map,
        "task": task,
        "image_size": image_size,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "iou_threshold": iou_threshold,
        "error_min_score": error_min_score,
        "seed": seed,
    }
    if chunk_runner is None:
        parts = [score_chunk(chunk, **chunk_kwargs) for chunk in _chunks(items, chunk_size)]
    else:
        parts = list(chunk_runner(_chunks(items, chunk_size), **chunk_kwargs))
    if not parts:
        raise UsageError(f"project {project.project.url} has no items")
    raw = pd.concat(parts, ignore_index=True)
    if scorers is None:
        empty = [
            n for n in names if raw.loc[raw["error"].isna(), n].isna().all() and n != DEFAULT_SCORER
        ]
        if empty:
            log.info("scorers without inputs in this project are left out: %s", ", ".join(empty))
            names = [n for n in names if n not in empty]
            raw = raw.drop(columns=empty)
    df, parts_meta = finish_table(
        raw,
        names,
        tiers=tiers,
        reference_meta=reference_meta,
        min_labeled=min_labeled,
        seed=seed,
        signed_weights=signed_weights,
    )
    versions = sorted({str(v) for v in df["model_version"].dropna()})
    if checkpoint is not None:
        model_version: str | None = checkpoint
    elif versions:
        model_version = ", ".join(versions)
    else:
        model_version = describe_predictions(predictions)
    meta: dict[str, Any] = {
        "run_id": run_id,
        "created": created,
        "source": project.project.url,
        "format": getattr(project, "name", type(project).__name__),
        "task": task,
        "model_version": model_version,
        "scorers": names,
        "settings": {
            "scorers": {k: dict(v) for k, v in chosen.items() if k in names},
            "label_map": label_map.model_dump(mode="json"),
            "iou_threshold": iou_threshold,
            "error_min_score": error_min_score,
            "image_size": image_size,
            "min_labeled": min_labeled,
            "signed_weights": signed_weights,
            "reference": reference,
        },
        **parts_meta,
    }
    df = df.drop(columns=["model_version"])
    paths = {"difficulty": write_difficulty(df, out_dir, meta, storage_options)}
    summary = summarize(df, meta)
    paths["summary"] = ProjectFS(out_dir, storage_options).write_text(
        "summary.json", json.dumps(summary, indent=2, default=str)
    )
    log.info("scored %d items (%d errors) into %s", summary["items"], summary["errors"], out_dir)
    return ScoreResult(df, meta, summary, paths)

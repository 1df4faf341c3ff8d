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
the label map).  It drives the combination weights (:mod:`difficulty.combine`).  With a
checkpoint that records the box confidence its auto-labels keep
(:mod:`difficulty.boxconfidence`), ``error_min_score`` defaults to it: the true error is
then the error of the label the gate would write, which the combination learns to rank.

An item that cannot be read, decoded or predicted is a row with ``error`` set and no
scores; it never stops the run.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from pydantic import ValidationError

from connectors.errors import UsageError
from connectors.formats.base import PredictionSource, ProjectFormat
from connectors.labelmap import LabelMap
from connectors.model import Annotation, Item, Prediction
from connectors.runid import new_run_id
from connectors.storage import ProjectFS
from difficulty.combine import (
    CombineFit,
    fit_weights,
    percentiles,
    quantile_sketch,
    spearman,
)
from difficulty.items import chunks as _chunks
from difficulty.items import task_of as _task
from difficulty.matching import detection_error, item_error, project_probs
from difficulty.options import ScoreOptions
from difficulty.registry import SCORERS, ScorerSpec, load_scorers
from difficulty.table import write_difficulty_parts
from difficulty.tiers import TierConfig, tier_thresholds, tiers_from_thresholds

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_SCORER = "fourier"
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
        if "images" in spec.needs and spec.needs - {"images", "rng", "n"}:
            raise UsageError(
                f"scorer {name!r} needs images together with {', '.join(sorted(spec.needs - {'images'}))}; "
                "image scorers run where images are decoded and get images only"
            )
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


def image_scorers(scorers: Iterable[str]) -> list[str]:
    """The scorers that need images and nothing else: they run where images are decoded."""
    return [name for name in scorers if SCORERS[name].needs == {"images"}]


def _box_scores(mapped: Sequence[Annotation]) -> np.ndarray:
    """Confidences of the boxed predictions (already in project classes)."""
    return np.array(
        [1.0 if a.score is None else a.score for a in mapped if a.box is not None],
        dtype=np.float64,
    )


def _collate(need: str, values: list[Any]) -> Any:
    """Stack per-item inputs into what a scorer of that need receives."""
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


def _scored_images(
    items: Iterable[Item],
    project: ProjectFS,
    scorers: Mapping[str, Mapping[str, Any]],
    *,
    image_size: int,
    batch_size: int,
    num_workers: int,
) -> Iterator[tuple[Item, dict[str, float], str | None]]:
    """Each item with the values of the image scorers (or why its image was not scored),
    in input order, through one image stream (:mod:`difficulty.imagestream`)."""
    from difficulty.imagestream import iter_image_scores

    plan = [(name, SCORERS[name].fn, dict(scorers[name])) for name in image_scorers(scorers)]
    in_flight: deque[Item] = deque()

    def feed() -> Iterator[Item]:
        for item in items:
            in_flight.append(item)
            yield item

    batches = iter_image_scores(
        feed(), project, plan, size=image_size, batch_size=batch_size, num_workers=num_workers
    )
    for batch in batches:
        for _, values, error in batch.per_item():
            yield in_flight.popleft(), values, error


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
    image_values: dict[str, dict[str, float]] = {}
    image_errors: dict[str, str] = {}
    ok = [it for it in items if not it.error]
    if image_scorers(scorers) and ok:
        for item, values, error in _scored_images(
            ok,
            project,
            scorers,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
        ):
            if error is None:
                image_values[item.item_id] = values
            else:
                image_errors[item.item_id] = error
    return _chunk_frame(
        items,
        image_values,
        image_errors,
        project=project,
        scorers=scorers,
        predictions=predictions,
        checkpoint=checkpoint,
        checkpoint_storage_options=checkpoint_storage_options,
        label_map=label_map,
        task=task,
        batch_size=batch_size,
        iou_threshold=iou_threshold,
        error_min_score=error_min_score,
        seed=seed,
    )


def _prediction_inputs(
    items: list[Item],
    predictions: PredictionSource | None,
    label_map: LabelMap,
    errors: dict[str, str],
) -> tuple[dict[str, dict[str, Any]], dict[str, Prediction], dict[str, list[Annotation]]]:
    """The scorers' inputs from brought predictions (``need → item_id → value``), the
    predictions and their label-mapped boxes; a prediction's error goes to ``errors``."""
    inputs: dict[str, dict[str, Any]] = {}
    preds: dict[str, Prediction] = {}
    mapped: dict[str, list[Annotation]] = {}
    if predictions is None:
        return inputs, preds, mapped
    for it in items:
        p = predictions.get(it.item_id, it)
        if p is None:
            continue
        if p.error:
            errors[it.item_id] = p.error
            continue
        preds[it.item_id] = p
        mapped[it.item_id] = label_map.apply(p.annotations)
        inputs.setdefault("box_scores", {})[it.item_id] = _box_scores(mapped[it.item_id])
        if probs := project_probs(p, label_map):
            inputs.setdefault("probs", {})[it.item_id] = probs
    return inputs, preds, mapped


def _chunk_frame(
    items: list[Item],
    image_values: Mapping[str, Mapping[str, float]],
    image_errors: Mapping[str, str],
    *,
    project: ProjectFS,
    scorers: Mapping[str, Mapping[str, Any]],
    predictions: PredictionSource | None,
    checkpoint: str | None,
    checkpoint_storage_options: dict[str, Any] | None,
    label_map: LabelMap,
    task: str,
    batch_size: int,
    iou_threshold: float,
    error_min_score: float,
    seed: int,
) -> pd.DataFrame:
    """The rows of :func:`score_chunk`, given the image scorers' values of the chunk's items."""
    specs = {name: SCORERS[name] for name in scorers}
    wanted = frozenset().union(*(s.needs for s in specs.values())) if specs else frozenset()
    errors: dict[str, str] = {it.item_id: it.error for it in items if it.error}
    ok = [it for it in items if not it.error]
    errors.update(image_errors)
    if checkpoint is not None and ok:
        inputs, preds, model_errors = _model_outputs(
            checkpoint, ok, project, batch_size, wanted, checkpoint_storage_options
        )
        errors.update(model_errors)
        mapped: dict[str, list[Annotation]] = {}
    else:
        inputs, preds, mapped = _prediction_inputs(ok, predictions, label_map, errors)

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
        if spec.needs == {"images"}:
            for i in good:
                if i in image_values:
                    col[position[i]] = image_values[i][name]
            rows[name] = col
            continue
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

    true_error = np.full(n, np.nan)
    for row, it in enumerate(items):
        if it.item_id in errors or it.item_id not in preds or not it.has_human_label:
            continue
        p = preds[it.item_id]
        if task == "classification":
            true_error[row] = item_error(
                it, p, label_map, task=task, iou_threshold=iou_threshold, min_score=error_min_score
            )
            continue
        true_error[row] = detection_error(
            it.annotations,
            mapped[it.item_id] if it.item_id in mapped else label_map.apply(p.annotations),
            iou_threshold=iou_threshold,
            ignore_labels=label_map.ignore,
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
    """What :func:`score_project` wrote: its metadata, summary and paths.

    The run streams its table to ``difficulty.parquet`` and never holds it whole;
    :attr:`table` reads the written table back on first use.
    """

    meta: dict[str, Any]
    summary: dict[str, Any]
    paths: dict[str, str] = field(default_factory=dict)
    out_dir: str = ""
    storage_options: dict[str, Any] | None = None
    _table: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def table(self) -> pd.DataFrame:
        """The written difficulty table (read from ``out_dir`` once)."""
        if self._table is None:
            from difficulty.table import read_difficulty

            self._table, _ = read_difficulty(self.out_dir, self.storage_options)
        return self._table


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


@dataclass
class _Collected:
    """The chunk tables of a run, streamed to a local Parquet file in row groups.

    Kept in memory: only what combination and the summary need — one float64 array per
    scorer, the true error, which rows were scored, and counts.
    """

    path: str
    scorers: list[str]
    values: dict[str, list[np.ndarray]] = field(default_factory=dict)
    true_error: list[np.ndarray] = field(default_factory=list)
    ok: list[np.ndarray] = field(default_factory=list)
    items: int = 0
    labeled: int = 0
    errors: int = 0
    error_items: list[dict[str, Any]] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)
    _pending: list[Any] = field(default_factory=list)
    _pending_rows: int = 0
    _writer: Any = None

    def add(self, part: pd.DataFrame) -> None:
        import pyarrow as pa

        ok = part["error"].isna().to_numpy()
        for name in self.scorers:
            self.values.setdefault(name, []).append(part[name].to_numpy(dtype=np.float64))
        self.true_error.append(part["true_error"].to_numpy(dtype=np.float64, na_value=np.nan))
        self.ok.append(ok)
        self.items += len(part)
        self.labeled += int(part["status"].isin(["labeled", "reviewed"]).sum())
        self.errors += int((~ok).sum())
        for row in part.loc[~ok, ["item_id", "error"]].itertuples(index=False):
            if len(self.error_items) >= MAX_ERROR_ITEMS:
                break
            self.error_items.append({"item_id": row.item_id, "error": row.error})
        self.versions.update(str(v) for v in part["model_version"].dropna())
        schema = pa.schema(
            [
                pa.field(c, pa.float64() if c in self.scorers or c in _RAW_FLOATS else pa.string())
                for c in part.columns
                if c != "model_version"
            ]
        )
        self._pending.append(
            pa.Table.from_pandas(
                part.drop(columns=["model_version"]), schema=schema, preserve_index=False
            )
        )
        self._pending_rows += len(part)
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def column(self, name: str) -> np.ndarray:
        """One kept column over all rows: a scorer's values, ``true_error`` or ``ok``."""
        if name == "ok":
            return np.concatenate(self.ok) if self.ok else np.zeros(0, dtype=bool)
        parts = self.true_error if name == "true_error" else self.values.get(name, [])
        return np.concatenate(parts) if parts else np.zeros(0)

    def parts(self, drop: Sequence[str]) -> Iterator[pd.DataFrame]:
        """The raw rows back from the file, a row group at a time, without ``drop``."""
        import pyarrow.parquet as pq

        if self.items == 0:
            return
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=ROW_GROUP_ROWS):
            yield batch.to_pandas().drop(columns=list(drop))


ROW_GROUP_ROWS = 16384
"""Rows per Parquet row group of the run's tables."""
MAX_ERROR_ITEMS = 50
"""Error items listed by name in ``summary.json``."""
_RAW_FLOATS = ("true_error", "annotation_seconds")


def summarize(df: pd.DataFrame, meta: dict[str, Any], *, max_errors: int = 50) -> dict[str, Any]:
    """The run's numbers for ``summary.json``, from a whole difficulty table."""
    errors = df[df["error"].notna()]
    return run_summary(
        meta,
        items=len(df),
        labeled=int(df["status"].isin(["labeled", "reviewed"]).sum()),
        score=df["score"].to_numpy(dtype=np.float64, na_value=np.nan),
        tier=df["tier"].to_numpy(),
        true_error=df["true_error"].to_numpy(dtype=np.float64, na_value=np.nan),
        errors=len(errors),
        error_items=[
            {"item_id": r.item_id, "error": r.error} for r in errors.head(max_errors).itertuples()
        ],
    )


def run_summary(
    meta: dict[str, Any],
    *,
    items: int,
    labeled: int,
    score: np.ndarray,
    tier: np.ndarray,
    true_error: np.ndarray,
    errors: int,
    error_items: list[dict[str, Any]],
) -> dict[str, Any]:
    """The run's numbers for ``summary.json``, from the counts and columns of the run."""
    tiers = {t: int(np.count_nonzero(tier == t)) for t in ("easy", "medium", "hard")}
    return {
        "run_id": meta["run_id"],
        "created": meta["created"],
        "source": meta.get("source"),
        "format": meta.get("format"),
        "task": meta.get("task"),
        "model_version": meta.get("model_version"),
        "items": items,
        "scored": int(np.isfinite(score).sum()),
        "errors": errors,
        "labeled": labeled,
        "with_true_error": int(np.isfinite(true_error).sum()),
        "tiers": tiers,
        "thresholds": {
            "easy_max": meta["tiers"]["easy_max"],
            "hard_min": meta["tiers"]["hard_min"],
        },
        "scorers": meta["scorers"],
        "combination": meta["combination"],
        "error_items": error_items,
    }


def _local_chunks(
    items: Iterable[Item], chunk_size: int, **chunk_kwargs: Any
) -> Iterator[pd.DataFrame]:
    """:func:`score_chunk` over the chunks of ``items``, with one image stream for all of
    them: the decoding workers start once and run ahead of the chunk being finished."""
    scored: Iterable[tuple[Item, dict[str, float], str | None]]
    if image_scorers(chunk_kwargs["scorers"]):
        scored = _scored_images(
            items,
            chunk_kwargs["project"],
            chunk_kwargs["scorers"],
            image_size=chunk_kwargs["image_size"],
            batch_size=chunk_kwargs["batch_size"],
            num_workers=chunk_kwargs["num_workers"],
        )
    else:
        scored = ((item, {}, None) for item in items)
    frame_kwargs = {k: v for k, v in chunk_kwargs.items() if k not in ("image_size", "num_workers")}
    for chunk in _chunks(scored, chunk_size):
        values = {item.item_id: v for item, v, error in chunk if error is None}
        errors = {item.item_id: error for item, _, error in chunk if error is not None}
        yield _chunk_frame([item for item, _, _ in chunk], values, errors, **frame_kwargs)


def _default_error_min_score(
    checkpoint: str | None, storage_options: dict[str, Any] | None
) -> float:
    """The checkpoint's recorded box confidence, else 0.25."""
    if checkpoint is not None:
        from difficulty.checkpoint import load_checkpoint_meta

        chosen = (
            load_checkpoint_meta(checkpoint, storage_options=storage_options).get("box_confidence")
            or {}
        )
        if chosen.get("value") is not None:
            return float(chosen["value"])
    return 0.25


def _plan(
    o: ScoreOptions,
    task: str,
    has_predictions: bool,
    checkpoint: str | None,
    storage_options: dict[str, Any] | None,
) -> tuple[ScoreOptions, list[str], dict[str, dict[str, Any]]]:
    """The options with their defaults filled in, the scorer names and their settings."""
    needs = available_needs(task, predictions=has_predictions, checkpoint=checkpoint is not None)
    names = list(o.scorers) if o.scorers else default_scorers(needs)
    if not names:
        raise UsageError("no scorer to run")
    chosen = resolve_scorers(names, o.settings, needs)
    if o.error_min_score is None:
        o = o.model_copy(
            update={"error_min_score": _default_error_min_score(checkpoint, storage_options)}
        )
    return o, names, chosen


def score_project(
    project: ProjectFormat,
    options: ScoreOptions | None = None,
    *,
    out_dir: str,
    items: Iterable[Item] | None = None,
    predictions: PredictionSource | None = None,
    checkpoint: str | None = None,
    label_map: LabelMap = LabelMap(),
    reference: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
    run_id: str | None = None,
    chunk_runner: ChunkRunner | None = None,
    **keywords: Any,
) -> ScoreResult:
    """Score every item of ``project`` with ``options``; write ``out_dir/difficulty.parquet``
    and ``summary.json``.

    ``keywords`` are fields of :class:`~difficulty.options.ScoreOptions` laid over
    ``options``.  ``items`` is the run's stream of the project's items when it has read
    them already (any iterable, read once; default: ``project.iter_items()``);
    ``predictions`` any :class:`PredictionSource`, e.g. one over predictions held in
    memory.  ``reference`` is an earlier run folder whose reference distributions, weights
    and tier thresholds are reused so that the scores of both runs compare.  ``out_dir`` is
    any fsspec URL (``storage_options`` apply to it, to ``reference`` and to ``checkpoint``).
    ``error_min_score`` defaults to the checkpoint's box confidence
    (``meta["box_confidence"]``), else 0.25.
    ``chunk_runner`` (an engine, e.g. :meth:`autolabel.engine_dask.DaskEngine.map_chunks`)
    maps :func:`score_chunk` over the chunks elsewhere and yields their tables in order;
    ``None`` runs them here, with one image stream (``num_workers`` decoding processes)
    for the whole project.

    Memory does not grow with the project beyond a few numbers per item: chunk tables go
    to a temporary Parquet file as they come, and the final table is written from it a
    row group at a time.
    """
    o = ScoreOptions.of(options, keywords)
    if predictions is not None and checkpoint is not None:
        raise UsageError("give predictions or a model checkpoint, not both")
    task = _task(project)
    o, names, chosen = _plan(o, task, predictions is not None, checkpoint, storage_options)
    reference_meta = None
    if reference is not None:
        from difficulty.table import read_difficulty

        _, reference_meta = read_difficulty(reference, storage_options)
    meta: dict[str, Any] = {
        "run_id": run_id or new_run_id(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": project.project.url,
        "format": getattr(project, "name", type(project).__name__),
        "task": task,
    }
    stream: Iterable[Item] = project.iter_items() if items is None else items
    if progress:
        from tqdm import tqdm

        stream = tqdm(stream, desc="score", unit="item")
    chunk_kwargs: dict[str, Any] = {
        "project": project.project, "scorers": chosen, "predictions": predictions,
        "checkpoint": checkpoint, "checkpoint_storage_options": storage_options,
        "label_map": label_map, "task": task, "image_size": o.image_size,
        "batch_size": o.batch_size, "num_workers": o.num_workers,
        "iou_threshold": o.iou_threshold, "error_min_score": o.error_min_score, "seed": o.seed,
    }  # fmt: skip
    with _long_lived_frozen(), tempfile.TemporaryDirectory(prefix="labeltriage-score-") as spill:
        raw = _Collected(os.path.join(spill, "raw.parquet"), list(names))
        if chunk_runner is None:
            parts: Iterable[pd.DataFrame] = _local_chunks(stream, o.chunk_size, **chunk_kwargs)
        else:
            parts = chunk_runner(_chunks(stream, o.chunk_size), **chunk_kwargs)
        for part in parts:
            raw.add(part)
        raw.close()
        if raw.items == 0:
            raise UsageError(f"project {project.project.url} has no items")
        names, empty = _scorers_with_values(raw, names, given=o.scorers is not None)
        finished, parts_meta = _finish(raw, names, o, reference_meta)
        meta |= {
            "model_version": _model_version(raw, checkpoint, predictions),
            "scorers": names,
            "settings": {
                "scorers": {k: dict(v) for k, v in chosen.items() if k in names},
                "label_map": label_map.model_dump(mode="json"),
                **o.model_dump(include=RECORDED_OPTIONS),
                "reference": reference,
            },
            **parts_meta,
        }
        paths = {
            "difficulty": write_difficulty_parts(
                _finished_parts(raw, empty, finished), out_dir, meta, storage_options
            )
        }
    return _result(project, raw, finished, meta, paths, out_dir, storage_options)


@contextlib.contextmanager
def _long_lived_frozen() -> Iterator[None]:
    """Leave the objects that exist now out of the garbage collector's passes while a run
    streams.

    By now the process holds the objects of every imported module (pandas, pyarrow,
    pydantic: hundreds of thousands); the stream allocates many small objects per item,
    which sets off full collections that would scan all of them each time.  Frozen, they
    are skipped; the objects the stream creates are collected as usual.  They are
    unfrozen at the end (unless a caller had frozen objects already: then that caller's
    choice stands).  Only a run in the main thread does this: the collector's state is
    the whole process's, and runs in other threads (``serve``, the scheduler) would
    unfreeze each other's objects.
    """
    if gc.get_freeze_count() or threading.current_thread() is not threading.main_thread():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


RECORDED_OPTIONS = {
    "iou_threshold",
    "error_min_score",
    "image_size",
    "min_labeled",
    "signed_weights",
}
"""The scoring options a table's metadata records under ``settings``."""


def _scorers_with_values(
    raw: _Collected, names: list[str], *, given: bool
) -> tuple[list[str], list[str]]:
    """``(names kept, names left out)``: default scorers without any value are left out."""
    if given:
        return names, []
    ok = raw.column("ok")
    empty = [n for n in names if n != DEFAULT_SCORER and np.isnan(raw.column(n)[ok]).all()]
    if empty:
        log.info("scorers without inputs in this project are left out: %s", ", ".join(empty))
    return [n for n in names if n not in empty], empty


def _finish(
    raw: _Collected,
    names: list[str],
    o: ScoreOptions,
    reference_meta: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The combined ``score``, ``tier``, ``rank`` and ``true_error`` arrays of every item,
    and the table metadata of the combination and tiers (:func:`finish_table`)."""
    ok = raw.column("ok")
    true_error = raw.column("true_error")
    lean = pd.DataFrame({name: raw.column(name) for name in names})
    lean["error"] = pd.Series([None if good else "error" for good in ok], dtype=object)
    lean["true_error"] = true_error
    finished, parts_meta = finish_table(
        lean,
        names,
        tiers=o.tiers,
        reference_meta=reference_meta,
        min_labeled=o.min_labeled,
        seed=o.seed,
        signed_weights=o.signed_weights,
    )
    arrays = {
        "score": finished["score"].to_numpy(dtype=np.float64),
        "tier": finished["tier"].to_numpy(),
        "rank": finished["rank"].array,
        "true_error": true_error,
    }
    return arrays, parts_meta


def _model_version(
    raw: _Collected, checkpoint: str | None, predictions: PredictionSource | None
) -> str | None:
    if checkpoint is not None:
        return checkpoint
    versions = sorted(raw.versions)
    return ", ".join(versions) if versions else describe_predictions(predictions)


def _finished_parts(
    raw: _Collected, empty: list[str], finished: dict[str, Any]
) -> Iterator[pd.DataFrame]:
    """The collected parts with their ``score``, ``tier`` and ``rank``, a part at a time."""
    start = 0
    for part in raw.parts(drop=empty):
        stop = start + len(part)
        for column in ("score", "tier", "rank"):
            part[column] = finished[column][start:stop]
        start = stop
        yield part


def _result(
    project: ProjectFormat,
    raw: _Collected,
    finished: dict[str, Any],
    meta: dict[str, Any],
    paths: dict[str, Any],
    out_dir: str,
    storage_options: dict[str, Any] | None,
) -> ScoreResult:
    """Write ``summary.json``; the run's result (published where the platform shows scores)."""
    summary = run_summary(
        meta,
        items=raw.items,
        labeled=raw.labeled,
        score=finished["score"],
        tier=finished["tier"],
        true_error=finished["true_error"],
        errors=raw.errors,
        error_items=raw.error_items,
    )
    paths["summary"] = ProjectFS(out_dir, storage_options).write_text(
        "summary.json", json.dumps(summary, indent=2, default=str)
    )
    log.info("scored %d items (%d errors) into %s", summary["items"], summary["errors"], out_dir)
    result = ScoreResult(meta, summary, paths, out_dir, storage_options)
    publish = getattr(project, "publish_scores", None)
    if callable(publish):  # a platform that shows the scores next to its items (FiftyOne)
        publish(result.table, meta)
    return result

"""The auto-label gate: calibrate, cut the easy tier there, write it back safely.

One call of :func:`run_autolabel` is one run of a project at its rollout stage
(:mod:`autolabel.stages`):

1. read the run's difficulty table (``DIR/difficulty.parquet``);
2. calibrate ``(box confidence c, difficulty threshold t)`` on human-labeled items the
   model did not train on (:mod:`autolabel.calibrate`): for brought predictions every
   human-labeled item, for a checkpoint only its held-out ``calibration_ids``.  A
   checkpoint that records the box confidence chosen on its training items
   (``meta["box_confidence"]``, :mod:`difficulty.boxconfidence`) fixes ``c`` beforehand
   and the threshold is tested at the full ``δ``; otherwise ``c`` is calibrated over a
   grid with ``δ`` split over it (explicit ``box_confidences`` always win);
3. **one score, one set of tiers, one gate**: at stages ``shadow`` and ``autolabel``,
   when a threshold passed, the table's easy tier is cut at ``t`` on the same combined
   score (medium and hard split the rest, :func:`difficulty.tiers.calibrated_cuts`) and
   the table is written back to the run folder — "easy" then means "labeled by the model
   with error ≤ ε at confidence 1 − δ";
4. select the unlabeled items of that easy tier that have a prediction; their label is
   the prediction, label-mapped, with boxes of confidence ``≥ c`` (classification: the
   arg-max class, if its probability is ``≥ c``).  No item outside the easy tier of the
   run's final table is ever selected; when no threshold passed, nothing is;
5. flag ``audit_share`` of them for human audit (:func:`autolabel.audit.choose_audit`);
6. ``autolabel``: write through :func:`connectors.writeback.write_run` — one transaction
   per run, atomic, refused per item where a human label exists *at write time*, undone
   by ``labeltriage rollback RUN_ID``; ``shadow``: write nothing, record the would-be
   labels in ``DIR/shadow.json``; ``report``: calibrate and report only (tiers untouched);
7. write the run record ``DIR/autolabel.json`` (:class:`difficulty.runrecord.GateRecord`:
   calibration and its walk, what was selected, written, refused and audited, how many
   labels hold boxes, the tiers after the gate, audit precision so far, shadow
   agreement).  A dry run writes nothing at all, not even this file or the table; the
   returned record says what would be written.

Provenance of every written label: ``run_id``; ``model_version`` (the prediction's model
version, else its source, else the prediction source's name or the checkpoint's
version); ``score`` = the model's confidence in the label (classification: the class
probability; detection: the lowest confidence among the written boxes, ``None`` for an
empty label); ``tier="easy"``; and in ``extra`` the item's ``difficulty`` score, the
calibrated ``threshold``, ``box_confidence``, ``bound``, ``epsilon``, ``delta``, the
``stage`` and whether it is flagged for ``audit``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd

from autolabel.audit import audit_meta, choose_audit, measure_audit_precision
from autolabel.calibrate import (
    DEFAULT_BOX_CONFIDENCES,
    CalibrationResult,
    calibrate,
    min_passing_count,
)
from autolabel.stages import (
    SHADOW_FILENAME,
    ShadowLabel,
    ShadowRecord,
    check_stage,
    measure_shadow_agreement,
    read_shadow_record,
    write_shadow_record,
)
from connectors.errors import UsageError
from connectors.formats.base import LabelWrite, PredictionSource, ProjectFormat, Provenance
from connectors.labelmap import LabelMap
from connectors.model import Annotation, Item, ItemStatus, Prediction
from connectors.storage import ProjectFS
from connectors.writeback import new_run_id, save_manifest, write_run
from difficulty.matching import predicted_class
from difficulty.runrecord import FILENAME as RECORD_FILENAME
from difficulty.runrecord import (
    CalibrationStep,
    ConfidenceWalk,
    GateRecord,
    LabelCounts,
    LabelExample,
    ShadowAgreement,
    TierSummary,
    write_gate_record,
)
from difficulty.table import read_difficulty, write_difficulty
from difficulty.tiers import TIERS, TierConfig, calibrated_cuts, tiers_from_thresholds

log = logging.getLogger(__name__)

REPORT_FILENAME = RECORD_FILENAME
EASY = "easy"


# -- predictions ---------------------------------------------------------------------------


class _Predictor:
    """Predictions for items, from a brought source or from a checkpoint."""

    def __init__(
        self,
        fmt: ProjectFormat,
        predictions: PredictionSource | None,
        checkpoint: str | None,
        storage_options: dict[str, Any] | None,
    ) -> None:
        self.fmt = fmt
        self.source = predictions
        self.calibration_ids: set[str] | None = None
        self.box_score_min = min(DEFAULT_BOX_CONFIDENCES)
        self.default_version = (
            type(predictions).__name__ if predictions is not None else str(checkpoint)
        )
        self._checkpoint: Any = None
        self.box_confidence: float | None = None
        if checkpoint is not None:
            from difficulty.checkpoint import load_checkpoint  # heavy (torch): import on use

            self._checkpoint = load_checkpoint(checkpoint, storage_options=storage_options)
            meta = self._checkpoint.meta
            ids = meta.get("calibration_ids")
            if not ids:
                raise UsageError(
                    f"checkpoint {checkpoint} records no calibration split (calibration_ids): "
                    "train it with a calibration share, or bring predictions instead"
                )
            self.calibration_ids = {str(i) for i in ids}
            chosen = meta.get("box_confidence") or {}
            if chosen.get("value") is not None:
                self.box_confidence = float(chosen["value"])
            self.default_version = str(
                meta.get("model_version") or meta.get("version") or checkpoint
            )

    def predict(self, items: list[Item]) -> dict[str, Prediction]:
        """``item_id → Prediction`` for ``items`` (missing where there is none)."""
        out: dict[str, Prediction] = {}
        if self.source is not None:
            for item in items:
                pred = self.source.get(item.item_id, item)
                if pred is not None:
                    out[item.item_id] = pred
            return out
        from difficulty.inference import infer

        for batch in infer(self._checkpoint, items, self.fmt, box_score_min=self.box_score_min):
            for item_id, why in batch.errors.items():
                log.warning("%s: no prediction: %s", item_id, why)
            for pred in batch.predictions:
                out[pred.item_id] = pred.model_copy(
                    update={"model_version": pred.model_version or self.default_version}
                )
        return out

    def version_of(self, pred: Prediction) -> str:
        return pred.model_version or pred.source or self.default_version


# -- labels --------------------------------------------------------------------------------


def auto_label(
    pred: Prediction, label_map: LabelMap, *, task: str, box_confidence: float
) -> list[Annotation] | None:
    """The label a prediction becomes at box confidence ``box_confidence`` (project classes).

    Detection: label-mapped boxes with confidence ``≥ box_confidence``, ignored classes
    dropped (possibly an empty list: "nothing here").  Classification: one annotation with
    the arg-max class; ``None`` when no class reaches ``box_confidence``.
    """
    if task == "classification":
        cls = predicted_class(pred, label_map, box_confidence)
        if cls is None:
            return None
        if pred.probs:
            mapped = [
                p
                for name, p in pred.probs.items()
                if (label_map.map.get(name) if label_map.map else name) == cls
            ]
            prob: float | None = min(1.0, float(sum(mapped)))
        else:
            prob = label_map.apply(pred.annotations)[0].score
        return [Annotation(label=cls, score=prob)]
    return [
        a
        for a in label_map.apply(pred.annotations)
        if a.box is not None
        and (a.score if a.score is not None else 1.0) >= box_confidence
        and not label_map.is_ignored(a.label)
    ]


def _label_confidence(annotations: list[Annotation]) -> float | None:
    scores = [a.score for a in annotations if a.score is not None]
    return min(scores) if scores else None


# -- the run -------------------------------------------------------------------------------


def _task_of(fmt: ProjectFormat) -> str:
    return (
        "classification"
        if tuple(getattr(fmt, "tasks", ("detection",))) == ("classification",)
        else "detection"
    )


def _scores(df: pd.DataFrame) -> dict[str, float]:
    ok = df[df["error"].isna()] if "error" in df.columns else df
    ok = ok[np.isfinite(ok["score"].to_numpy(dtype=np.float64))]
    return dict(zip(ok["item_id"].astype(str), ok["score"].astype(float), strict=True))


def _batches(items: Iterable[Item], size: int = 256) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _calibration_pool(
    fmt: ProjectFormat, predictor: _Predictor, scores: dict[str, float]
) -> tuple[list[Item], dict[str, Prediction]]:
    """Human-labeled, scored items allowed for calibration, and their predictions."""
    allowed = predictor.calibration_ids

    def keep(item: Item) -> bool:
        return (
            item.error is None
            and item.has_human_label
            and item.item_id in scores
            and (allowed is None or item.item_id in allowed)
        )

    items: list[Item] = []
    preds: dict[str, Prediction] = {}
    for batch in _batches(i for i in fmt.iter_items() if keep(i)):
        preds.update(predictor.predict(batch))
        items.extend(batch)
    return items, preds


def _previous_agreement(
    out_dir: str,
    run_id: str,
    label_map: LabelMap,
    fmt: ProjectFormat,
    min_count: int,
    storage_options: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """Agreement of the latest earlier shadow record in a sibling run folder, if any.

    The report store keeps one folder per run under the project's folder, so earlier
    runs' ``shadow.json`` files sit next to ``out_dir``.
    """
    parent, _, here = out_dir.rstrip("/").rpartition("/")
    if not parent:
        return None
    fs = ProjectFS(parent, storage_options)
    earlier = [
        name for name in fs.listdir(".") if name != here and fs.exists(f"{name}/{SHADOW_FILENAME}")
    ]
    if not earlier:
        return None
    record = read_shadow_record(
        f"{parent}/{sorted(earlier)[-1]}/{SHADOW_FILENAME}", storage_options
    )
    if record.run_id == run_id:
        return None
    return measure_shadow_agreement(fmt, record, label_map, min_count=min_count)


def _retier(
    df: pd.DataFrame,
    meta: dict[str, Any],
    threshold: float,
    calib: CalibrationResult,
    run_id: str,
) -> dict[str, Any]:
    """Cut the table's tiers at the calibrated ``threshold`` (in place); the new tier metadata."""
    old = dict(meta.get("tiers") or {})
    config = TierConfig.model_validate(old.get("config") or {})
    score = df["score"].to_numpy(dtype=np.float64, na_value=np.nan)
    easy_max, hard_min = calibrated_cuts(score, threshold, config)
    df["tier"] = tiers_from_thresholds(score, easy_max, hard_min)
    return {
        **old,
        "easy_max": easy_max,
        "hard_min": hard_min,
        "source": "calibrated",
        "uncalibrated": {k: old.get(k) for k in ("easy_max", "hard_min", "source")},
        "calibration": {
            "run_id": run_id,
            "epsilon": calib.epsilon,
            "delta": calib.delta,
            "box_confidence": calib.box_confidence,
            "bound": calib.bound,
            "n": calib.n,
        },
    }


def _tier_summary(df: pd.DataFrame, tiers: dict[str, Any]) -> TierSummary:
    counts = df["tier"].value_counts()
    return TierSummary(
        easy_max=tiers.get("easy_max"),
        hard_min=tiers.get("hard_min"),
        source=str(tiers.get("source") or "quantiles"),
        counts={t: int(counts.get(t, 0)) for t in TIERS},
    )


def _label_counts(labels: dict[str, list[Annotation]]) -> LabelCounts:
    classes: Counter[str] = Counter()
    boxes = with_boxes = 0
    for anns in labels.values():
        n_boxes = sum(1 for a in anns if a.box is not None)
        boxes += n_boxes
        with_boxes += int(n_boxes > 0)
        classes.update(a.label for a in anns)
    return LabelCounts(
        total=len(labels),
        with_boxes=with_boxes,
        empty=sum(1 for anns in labels.values() if not anns),
        boxes=boxes,
        classes=dict(sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))),
    )


def _examples(
    writes: dict[str, LabelWrite], ids: list[str], audit: set[str], per_kind: int = 12
) -> list[LabelExample]:
    """Up to ``per_kind`` audited labels and ``per_kind`` others, spread over difficulty."""

    def example(item_id: str) -> LabelExample:
        w = writes[item_id]
        return LabelExample(
            item_id=item_id,
            uri=w.item.uri,
            difficulty=float(w.provenance.extra["difficulty"]),
            annotations=w.annotations,
            audit=item_id in audit,
        )

    audited = [i for i in ids if i in audit][:per_kind]
    others = sorted((i for i in ids if i not in audit), key=lambda i: example(i).difficulty)
    if len(others) > per_kind:
        picks = np.unique(np.linspace(0, len(others) - 1, per_kind).round().astype(int))
        others = [others[i] for i in picks]
    return [example(i) for i in [*audited, *others]]


def _walks(calib: CalibrationResult) -> list[ConfidenceWalk]:
    return [
        ConfidenceWalk(
            box_confidence=float(w.box_confidence if w.box_confidence is not None else 0.0),
            threshold=w.threshold,
            bound=w.bound,
            n=w.n,
            k=w.k,
        )
        for w in calib.per_confidence
    ]


def _steps(calib: CalibrationResult) -> list[CalibrationStep]:
    return [
        CalibrationStep(
            threshold=s.threshold,
            n=s.n,
            k=s.k,
            bound=s.bound if math.isfinite(s.bound) else None,
            tested=s.tested,
            passed=s.passed,
        )
        for s in calib.steps
    ]


def run_autolabel(
    project: ProjectFormat,
    *,
    difficulty_dir: str,
    predictions: PredictionSource | None = None,
    checkpoint: str | None = None,
    epsilon: float,
    delta: float,
    label_map: LabelMap,
    stage: str = "autolabel",
    dry_run: bool = False,
    audit_share: float = 0.05,
    min_count: int = 30,
    seed: int = 0,
    out_dir: str | None = None,
    storage_options: dict[str, Any] | None = None,
    task: str | None = None,
    box_confidences: tuple[float, ...] | None = None,
    iou_threshold: float = 0.5,
    run_id: str | None = None,
) -> GateRecord:
    """One gate run of ``project`` at ``stage`` (see the module docstring).

    ``difficulty_dir`` (and ``out_dir``, default the same) are fsspec URLs of the report
    folder, opened with ``storage_options``.  Exactly one of ``predictions`` and
    ``checkpoint`` is required.  ``task`` defaults to the format's (classification for
    class-only formats, else detection).  ``box_confidences``: the grid ``c`` is calibrated
    over (``δ`` split over it); default: the checkpoint's own box confidence (full ``δ``),
    else :data:`DEFAULT_BOX_CONFIDENCES`.  Returns the run record (also written as
    ``out_dir/autolabel.json``, except in a dry run).
    """
    check_stage(stage)
    if (predictions is None) == (checkpoint is None):
        raise UsageError("give exactly one of predictions and checkpoint")
    if not 0.0 <= audit_share <= 1.0:
        raise UsageError(f"audit share must be in [0, 1], got {audit_share}")
    if not 0.0 < epsilon < 1.0 or not 0.0 < delta < 1.0:
        raise UsageError(f"epsilon and delta must be in (0, 1), got {epsilon} and {delta}")
    if box_confidences is not None and not box_confidences:
        raise UsageError("box_confidences is empty")
    out_dir = out_dir or difficulty_dir
    task = task or _task_of(project)
    run_id = run_id or new_run_id()
    df, score_meta = read_difficulty(difficulty_dir, storage_options)
    combination = score_meta.get("combination") or {}
    fitted = combination.get("method") in ("single", "rho", "rho2")  # chosen from labeled errors
    fit_on = int(combination.get("n_labeled") or 0) if fitted else 0
    if fit_on:
        log.info(
            "the difficulty score's combination weights were fit on %d labeled items; "
            "a few weights fit on the calibration items make the bound slightly optimistic",
            fit_on,
        )
    scores = _scores(df)
    predictor = _Predictor(project, predictions, checkpoint, storage_options)
    if box_confidences is None:
        fixed = predictor.box_confidence
        box_confidences = (fixed,) if fixed is not None else DEFAULT_BOX_CONFIDENCES
        if fixed is not None:
            log.info("box confidence %g, chosen on the model's training items: full δ", fixed)
    predictor.box_score_min = min(box_confidences)

    cal_items, cal_preds = _calibration_pool(project, predictor, scores)
    calib = calibrate(
        cal_items,
        df,
        cal_preds,
        label_map,
        epsilon=epsilon,
        delta=delta,
        task=task,
        box_confidences=box_confidences,
        min_count=min_count,
        iou_threshold=iou_threshold,
    )
    del cal_items, cal_preds
    log.info(
        "run %s: threshold %s, box confidence %s, bound %.4f (ε %g) on n=%d",
        run_id,
        calib.threshold,
        calib.box_confidence,
        calib.bound,
        epsilon,
        calib.n,
    )

    # -- one score, one set of tiers, one gate ----------------------------------------------
    t, c = calib.threshold, calib.box_confidence
    tiers_meta = dict(score_meta.get("tiers") or {})
    retiered = stage in ("shadow", "autolabel") and t is not None
    if retiered and t is not None:
        tiers_meta = _retier(df, score_meta, t, calib, run_id)
        score_meta = {**score_meta, "tiers": tiers_meta}
        if not dry_run:
            write_difficulty(df, out_dir, score_meta, storage_options)
    easy = set(df.loc[df["tier"] == EASY, "item_id"].astype(str)) if retiered else set()

    # -- select -----------------------------------------------------------------------------
    writes: dict[str, LabelWrite] = {}
    n_eligible = n_unlabeled = 0
    unlabeled = (
        i
        for i in project.iter_items()
        if i.error is None and i.status is ItemStatus.UNLABELED and i.item_id in scores
    )
    for batch in _batches(unlabeled):
        n_unlabeled += len(batch)
        preds = predictor.predict(batch)
        for item in batch:
            pred = preds.get(item.item_id)
            if pred is None or pred.error is not None:
                continue
            n_eligible += 1
            if item.item_id not in easy or c is None:
                continue
            anns = auto_label(pred, label_map, task=task, box_confidence=c)
            if anns is None:
                continue
            provenance = Provenance(
                run_id=run_id,
                model_version=predictor.version_of(pred),
                score=_label_confidence(anns),
                tier=EASY,
                extra={
                    "difficulty": scores[item.item_id],
                    "threshold": t,
                    "box_confidence": c,
                    "bound": calib.bound,
                    "epsilon": epsilon,
                    "delta": delta,
                    "stage": stage,
                },
            )
            writes[item.item_id] = LabelWrite(item=item, annotations=anns, provenance=provenance)
    selected = sorted(writes)
    audit_ids = (
        choose_audit(selected, run_id, audit_share, seed=seed) if stage == "autolabel" else []
    )
    audited = set(audit_ids)
    for w in writes.values():
        w.provenance.extra["audit"] = w.item.item_id in audited

    # -- write ------------------------------------------------------------------------------
    written: list[str] = []
    refused: dict[str, str] = {}
    agreement: dict[str, Any] | None = None
    manifest_stage: str | None = None
    if stage == "autolabel" and writes:
        labels = {i: w.annotations for i, w in writes.items()}
        meta = {
            "stage": stage,
            "task": task,
            "calibration": calib.to_dict(),
            "audit": audit_meta(
                {i: labels[i] for i in audit_ids},
                task=task,
                ignore=label_map.ignore,
                iou_threshold=iou_threshold,
            ),
            "audit_share": audit_share,
            "seed": seed,
        }
        manifest = write_run(
            project, [writes[i] for i in selected], run_id, meta=_jsonable(meta), dry_run=dry_run
        )
        manifest_stage = manifest.stage
        refused = dict(manifest.refused)
        if not dry_run:
            written = sorted(manifest.item_ids)
            kept_audit = [i for i in audit_ids if i in set(written)]
            if kept_audit != audit_ids:  # items refused at write time are not audited
                manifest.meta["audit"] = audit_meta(
                    {i: labels[i] for i in kept_audit},
                    task=task,
                    ignore=label_map.ignore,
                    iou_threshold=iou_threshold,
                )
                save_manifest(project.project, manifest)
                audit_ids = kept_audit
    elif stage == "shadow":
        record = ShadowRecord(
            run_id=run_id,
            task=task,
            epsilon=epsilon,
            delta=delta,
            threshold=t,
            box_confidence=c,
            bound=calib.bound,
            ignore=list(label_map.ignore),
            iou_threshold=iou_threshold,
            labels=[
                ShadowLabel(
                    item_id=i,
                    annotations=writes[i].annotations,
                    difficulty=scores[i],
                    model_version=writes[i].provenance.model_version,
                )
                for i in selected
            ],
        )
        if not dry_run:
            write_shadow_record(out_dir, record, storage_options)
        agreement = _previous_agreement(
            out_dir, run_id, label_map, project, min_count, storage_options
        )

    result = GateRecord(
        run_id=run_id,
        stage=stage,
        dry_run=dry_run,
        task=task,
        model_version=predictor.default_version,
        source=project.project.url,
        epsilon=epsilon,
        delta=delta,
        min_count=min_count,
        audit_share=audit_share,
        iou_threshold=iou_threshold,
        threshold=t,
        box_confidence=c,
        bound=calib.bound,
        n=calib.n,
        k=calib.k,
        level=calib.level,
        n_calibration=calib.n_calibration,
        min_passing=max(min_count, min_passing_count(epsilon, calib.level or delta)),
        steps=_steps(calib),
        per_confidence=_walks(calib),
        score_weights_fit_on=fit_on,
        n_unlabeled=n_unlabeled,
        n_eligible=n_eligible,
        selected=selected,
        written=written,
        refused=refused,
        audit=audit_ids,
        tiers=_tier_summary(df, tiers_meta),
        manifest_stage=manifest_stage,
        audit_precision=measure_audit_precision(project, delta=delta),
        agreement=ShadowAgreement.model_validate(agreement) if agreement else None,
    )
    labeled = result.labeled_items
    result.labels = _label_counts({i: writes[i].annotations for i in labeled})
    result.examples = _examples(writes, labeled, set(audit_ids))
    if not dry_run:
        result.report_path = write_gate_record(out_dir, result, storage_options)
    log.info("run %s (%s%s): %s", run_id, stage, ", dry run" if dry_run else "", result.verdict())
    return result


def _jsonable(value: Any) -> Any:
    """Plain JSON data: non-finite floats become ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value

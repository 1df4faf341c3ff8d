"""The auto-label gate: calibrate, select the easy unlabeled items, write them back safely.

One call of :func:`run_autolabel` is one run of a project at its rollout stage
(:mod:`autolabel.stages`):

1. read the difficulty table (``DIR/difficulty.parquet``);
2. calibrate ``(box confidence c, difficulty threshold t)`` on human-labeled items the
   model did not train on (:mod:`autolabel.calibrate`): for brought predictions every
   human-labeled item, for a checkpoint only its held-out ``calibration_ids``;
3. select the unlabeled items with ``score ≤ t`` (tier ``easy``) that have a prediction;
   their label is the prediction, label-mapped, with boxes of confidence ``≥ c``
   (classification: the arg-max class, if its probability is ``≥ c``);
4. flag ``audit_share`` of them for human audit (:func:`autolabel.audit.choose_audit`);
5. ``autolabel``: write through :func:`connectors.writeback.write_run` — one transaction
   per run, atomic, refused per item where a human label exists *at write time*, undone
   by ``labeltriage rollback RUN_ID``; ``shadow``: write nothing, record the would-be
   labels in ``DIR/shadow.json``; ``report``: calibrate and report only;
6. write ``DIR/autolabel.json`` (run id, stage, calibration, items written, refused,
   audit ids, coverage, audit precision so far, shadow agreement, dry run).  A dry run
   writes nothing at all, not even this file; the result says what would be written.

Provenance of every written label: ``run_id``; ``model_version`` (the prediction's model
version, else its source, else the prediction source's name or the checkpoint's
version); ``score`` = the model's confidence in the label (classification: the class
probability; detection: the lowest confidence among the written boxes, ``None`` for an
empty label); ``tier="easy"``; and in ``extra`` the item's ``difficulty`` score, the
calibrated ``threshold``, ``box_confidence``, ``bound``, ``epsilon``, ``delta``, the
``stage`` and whether it is flagged for ``audit``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from autolabel.audit import audit_meta, choose_audit, measure_audit_precision
from autolabel.calibrate import DEFAULT_BOX_CONFIDENCES, CalibrationResult, calibrate
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
from difficulty.table import read_difficulty

log = logging.getLogger(__name__)

REPORT_FILENAME = "autolabel.json"
EASY = "easy"


@dataclass
class AutolabelResult:
    """What one gate run did (also written as ``autolabel.json``)."""

    run_id: str
    stage: str
    dry_run: bool
    task: str
    calibration: CalibrationResult
    selected: list[str]
    written: list[str]
    refused: dict[str, str]
    audit: list[str]
    n_eligible: int
    model_version: str
    score_weights_fit_on: int = 0
    audit_precision: dict[str, Any] = field(default_factory=dict)
    agreement: dict[str, Any] | None = None
    manifest_stage: str | None = None
    report_path: str | None = None

    @property
    def threshold(self) -> float | None:
        return self.calibration.threshold

    @property
    def box_confidence(self) -> float | None:
        return self.calibration.box_confidence

    @property
    def bound(self) -> float:
        return self.calibration.bound

    @property
    def coverage(self) -> float:
        """Share of eligible unlabeled items (scored, with a prediction) selected."""
        return len(self.selected) / self.n_eligible if self.n_eligible else 0.0

    @property
    def precision(self) -> float | None:
        """Measured auto-label precision: audit precision so far, or (shadow) the agreement
        of the previous shadow run; ``None`` while nothing has been reviewed."""
        if (
            self.stage == "shadow"
            and self.agreement
            and self.agreement.get("error_rate") is not None
        ):
            return 1.0 - float(self.agreement["error_rate"])
        value = self.audit_precision.get("precision")
        return None if value is None else float(value)

    def to_dict(self) -> dict[str, Any]:
        c = self.calibration
        return {
            "run_id": self.run_id,
            "stage": self.stage,
            "dry_run": self.dry_run,
            "task": self.task,
            "model_version": self.model_version,
            "threshold": c.threshold,
            "box_confidence": c.box_confidence,
            "bound": c.bound,
            "n": c.n,
            "k": c.k,
            "epsilon": c.epsilon,
            "delta": c.delta,
            "min_count": c.min_count,
            "n_calibration": c.n_calibration,
            "calibration_coverage": c.coverage,
            "n_eligible": self.n_eligible,
            "score_weights_fit_on": self.score_weights_fit_on,
            "coverage": self.coverage,
            "selected": self.selected,
            "written": self.written,
            "refused": self.refused,
            "audit": self.audit,
            "precision": self.precision,
            "precision_lower_bound": 1.0 - c.bound if c.threshold is not None else None,
            "audit_precision": self.audit_precision.get("precision"),
            "audit_summary": self.audit_precision,
            "agreement": self.agreement,
            "manifest_stage": self.manifest_stage,
            "calibration": c.to_dict(with_steps=True),
        }


# -- predictions ---------------------------------------------------------------------------


class _Predictor:
    """Predictions for items, from a brought source or from a checkpoint."""

    def __init__(
        self,
        fmt: ProjectFormat,
        predictions: PredictionSource | None,
        checkpoint: str | None,
        storage_options: dict[str, Any] | None,
        box_score_min: float,
    ) -> None:
        self.fmt = fmt
        self.source = predictions
        self.calibration_ids: set[str] | None = None
        self.box_score_min = box_score_min
        self.default_version = (
            type(predictions).__name__ if predictions is not None else str(checkpoint)
        )
        self._checkpoint: Any = None
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
    box_confidences: tuple[float, ...] = DEFAULT_BOX_CONFIDENCES,
    iou_threshold: float = 0.5,
    run_id: str | None = None,
) -> AutolabelResult:
    """One gate run of ``project`` at ``stage`` (see the module docstring).

    ``difficulty_dir`` (and ``out_dir``, default the same) are fsspec URLs of the report
    folder, opened with ``storage_options``.  Exactly one of ``predictions`` and
    ``checkpoint`` is required.  ``task`` defaults to the format's (classification for
    class-only formats, else detection).
    """
    check_stage(stage)
    if (predictions is None) == (checkpoint is None):
        raise UsageError("give exactly one of predictions and checkpoint")
    if not 0.0 <= audit_share <= 1.0:
        raise UsageError(f"audit share must be in [0, 1], got {audit_share}")
    if not 0.0 < epsilon < 1.0 or not 0.0 < delta < 1.0:
        raise UsageError(f"epsilon and delta must be in (0, 1), got {epsilon} and {delta}")
    if not box_confidences:
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
    predictor = _Predictor(project, predictions, checkpoint, storage_options, min(box_confidences))

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
        "run %s: threshold %s, box confidence %s, bound %.4f on n=%d",
        run_id,
        calib.threshold,
        calib.box_confidence,
        calib.bound,
        calib.n,
    )

    # -- select ----------------------------------------------------------------------------
    writes: list[LabelWrite] = []
    n_eligible = 0
    t, c = calib.threshold, calib.box_confidence
    unlabeled = (
        i
        for i in project.iter_items()
        if i.error is None and i.status is ItemStatus.UNLABELED and i.item_id in scores
    )
    for batch in _batches(unlabeled):
        preds = predictor.predict(batch)
        for item in batch:
            pred = preds.get(item.item_id)
            if pred is None or pred.error is not None:
                continue
            n_eligible += 1
            if t is None or c is None or stage == "report" or scores[item.item_id] > t:
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
            writes.append(LabelWrite(item=item, annotations=anns, provenance=provenance))
    selected = sorted(w.item.item_id for w in writes)
    audit_ids = (
        choose_audit(selected, run_id, audit_share, seed=seed) if stage == "autolabel" else []
    )
    audited = set(audit_ids)
    for w in writes:
        w.provenance.extra["audit"] = w.item.item_id in audited

    # -- write -----------------------------------------------------------------------------
    written: list[str] = []
    refused: dict[str, str] = {}
    agreement: dict[str, Any] | None = None
    manifest_stage: str | None = None
    if stage == "autolabel" and writes:
        labels = {w.item.item_id: w.annotations for w in writes}
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
        manifest = write_run(project, writes, run_id, meta=_jsonable(meta), dry_run=dry_run)
        manifest_stage = manifest.stage
        refused = dict(manifest.refused)
        if not dry_run:
            written = manifest.item_ids
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
                    item_id=w.item.item_id,
                    annotations=w.annotations,
                    difficulty=scores[w.item.item_id],
                    model_version=w.provenance.model_version,
                )
                for w in writes
            ],
        )
        if not dry_run:
            write_shadow_record(out_dir, record, storage_options)
        agreement = _previous_agreement(
            out_dir, run_id, label_map, project, min_count, storage_options
        )

    result = AutolabelResult(
        run_id=run_id,
        stage=stage,
        dry_run=dry_run,
        task=task,
        calibration=calib,
        selected=selected,
        written=written,
        refused=refused,
        audit=audit_ids,
        n_eligible=n_eligible,
        model_version=predictor.default_version,
        score_weights_fit_on=fit_on,
        audit_precision=measure_audit_precision(project, delta=delta),
        agreement=agreement,
        manifest_stage=manifest_stage,
    )
    if not dry_run:
        body = json.dumps(_jsonable(result.to_dict()), indent=1, sort_keys=True)
        result.report_path = ProjectFS(out_dir, storage_options).write_text(REPORT_FILENAME, body)
    log.info(
        "run %s (%s%s): %d selected, %d written, %d refused, %d for audit",
        run_id,
        stage,
        ", dry run" if dry_run else "",
        len(selected),
        len(written),
        len(refused),
        len(audit_ids),
    )
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

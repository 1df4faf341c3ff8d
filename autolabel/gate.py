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
from collections.abc import Iterable, Iterator, Sequence
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
from difficulty.items import chunks
from difficulty.items import task_of as _task_of
from difficulty.items import usable_scores as _scores
from difficulty.matching import mapped_probs, predicted_class
from difficulty.options import Options
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
            prob: float | None = min(1.0, mapped_probs(pred, label_map)[cls])
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


def _batches(items: Iterable[Item]) -> Iterator[list[Item]]:
    return chunks(items, 256)


def _calibration_items(
    items: Iterable[Item], predictor: _Predictor, scores: dict[str, float]
) -> list[Item]:
    """The human-labeled, scored items allowed for calibration."""
    allowed = predictor.calibration_ids
    return [
        item
        for item in items
        if item.error is None
        and item.has_human_label
        and item.item_id in scores
        and (allowed is None or item.item_id in allowed)
    ]


def _unlabeled(items: Iterable[Item], scores: dict[str, float]) -> Iterator[Item]:
    """The unlabeled, scored items the gate may label."""
    return (
        i
        for i in items
        if i.error is None and i.status is ItemStatus.UNLABELED and i.item_id in scores
    )


def _predict_all(predictor: _Predictor, items: list[Item]) -> dict[str, Prediction]:
    preds: dict[str, Prediction] = {}
    for batch in _batches(items):
        preds.update(predictor.predict(batch))
    return preds


def _previous_agreement(
    out_dir: str,
    run_id: str,
    label_map: LabelMap,
    items: Iterable[Item],
    min_count: int,
    storage_options: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """Agreement of the latest earlier shadow record in a sibling run folder, if any,
    with the human labels of ``items``.

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
    return measure_shadow_agreement(items, record, label_map, min_count=min_count)


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


class GateOptions(Options):
    """The settings of one gate run (:func:`run_autolabel`).

    ``epsilon``/``delta``: the guarantee (auto-label error ≤ ε with confidence 1 − δ);
    ``stage``: ``report``, ``shadow`` or ``autolabel``; ``dry_run``: write nothing;
    ``audit_share``: share of written labels flagged for audit (drawn with ``seed``);
    ``min_count``: fewest calibration items a threshold needs; ``task``: default the
    format's; ``box_confidences``: the grid of box confidences ``c`` calibration walks
    (``δ`` split over it); default: the checkpoint's own box confidence, chosen on its
    training items (full ``δ``), else :data:`DEFAULT_BOX_CONFIDENCES`;
    ``iou_threshold``: a box matches a labeled box at this IoU.
    """

    epsilon: float
    delta: float
    stage: str = "autolabel"
    dry_run: bool = False
    audit_share: float = 0.05
    min_count: int = 30
    seed: int = 0
    task: str | None = None
    box_confidences: tuple[float, ...] | None = None
    iou_threshold: float = 0.5


def _check_options(o: GateOptions, predictions: Any, checkpoint: str | None) -> None:
    check_stage(o.stage)
    if (predictions is None) == (checkpoint is None):
        raise UsageError("give exactly one of predictions and checkpoint")
    if not 0.0 <= o.audit_share <= 1.0:
        raise UsageError(f"audit share must be in [0, 1], got {o.audit_share}")
    if not 0.0 < o.epsilon < 1.0 or not 0.0 < o.delta < 1.0:
        raise UsageError(f"epsilon and delta must be in (0, 1), got {o.epsilon} and {o.delta}")
    if o.box_confidences is not None and not o.box_confidences:
        raise UsageError("box_confidences is empty")


def _weights_fit_on(score_meta: dict[str, Any]) -> int:
    """How many labeled items the score's combination weights were fit on (0: not fit)."""
    combination = score_meta.get("combination") or {}
    fitted = combination.get("method") in ("single", "rho", "rho2")  # chosen from labeled errors
    fit_on = int(combination.get("n_labeled") or 0) if fitted else 0
    if fit_on:
        log.info(
            "the difficulty score's combination weights were fit on %d labeled items; "
            "a few weights fit on the calibration items make the bound slightly optimistic",
            fit_on,
        )
    return fit_on


class _Gate:
    """One gate run: its inputs, and what each step found."""

    def __init__(
        self,
        project: ProjectFormat,
        o: GateOptions,
        predictor: _Predictor,
        label_map: LabelMap,
        run_id: str,
        out_dir: str,
        storage_options: dict[str, Any] | None,
    ) -> None:
        self.project, self.o, self.predictor, self.label_map = project, o, predictor, label_map
        self.run_id, self.out_dir, self.storage_options = run_id, out_dir, storage_options
        self.task = o.task or _task_of(project)
        self.scores: dict[str, float] = {}
        self.items: Sequence[Item] | None = None  # the run's items, when it holds them
        self.writes: dict[str, LabelWrite] = {}
        self.n_eligible = self.n_unlabeled = 0

    def read(self) -> Iterable[Item]:
        """The project's items: the run's list when it holds one (no new pass over the
        project), else a fresh stream from the project."""
        return self.project.iter_items() if self.items is None else self.items

    def calibrate(self, df: pd.DataFrame, items: list[Item]) -> CalibrationResult:
        o = self.o
        calib = calibrate(
            items,
            df,
            _predict_all(self.predictor, items),
            self.label_map,
            epsilon=o.epsilon,
            delta=o.delta,
            task=self.task,
            box_confidences=o.box_confidences or DEFAULT_BOX_CONFIDENCES,
            min_count=o.min_count,
            iou_threshold=o.iou_threshold,
        )
        log.info(
            "run %s: threshold %s, box confidence %s, bound %.4f (ε %g) on n=%d",
            self.run_id, calib.threshold, calib.box_confidence, calib.bound, o.epsilon, calib.n,
        )  # fmt: skip
        return calib

    def select(self, unlabeled: Iterable[Item], easy: set[str], calib: CalibrationResult) -> None:
        """The labels of the unlabeled easy items that have a prediction (``self.writes``)."""
        o, t, c = self.o, calib.threshold, calib.box_confidence
        for batch in _batches(unlabeled):
            self.n_unlabeled += len(batch)
            preds = self.predictor.predict(batch)
            for item in batch:
                pred = preds.get(item.item_id)
                if pred is None or pred.error is not None:
                    continue
                self.n_eligible += 1
                if item.item_id not in easy or c is None:
                    continue
                anns = auto_label(pred, self.label_map, task=self.task, box_confidence=c)
                if anns is None:
                    continue
                provenance = Provenance(
                    run_id=self.run_id,
                    model_version=self.predictor.version_of(pred),
                    score=_label_confidence(anns),
                    tier=EASY,
                    extra={
                        "difficulty": self.scores[item.item_id], "threshold": t,
                        "box_confidence": c, "bound": calib.bound, "epsilon": o.epsilon,
                        "delta": o.delta, "stage": o.stage,
                    },
                )  # fmt: skip
                self.writes[item.item_id] = LabelWrite(
                    item=item, annotations=anns, provenance=provenance
                )

    def audit_meta(self, ids: list[str]) -> dict[str, Any]:
        return audit_meta(
            {i: self.writes[i].annotations for i in ids},
            task=self.task,
            ignore=self.label_map.ignore,
            iou_threshold=self.o.iou_threshold,
        )

    def write(
        self, selected: list[str], audit_ids: list[str], calib: CalibrationResult
    ) -> tuple[list[str], dict[str, str], str | None, list[str]]:
        """Stage autolabel: write the selected labels; ``(written, refused, manifest stage,
        audit ids kept)`` — items refused at write time are not audited."""
        o = self.o
        meta = {
            "stage": o.stage, "task": self.task, "calibration": calib.to_dict(),
            "audit": self.audit_meta(audit_ids), "audit_share": o.audit_share, "seed": o.seed,
        }  # fmt: skip
        manifest = write_run(
            self.project,
            [self.writes[i] for i in selected],
            self.run_id,
            meta=_jsonable(meta),
            dry_run=o.dry_run,
        )
        refused = dict(manifest.refused)
        if o.dry_run:
            return [], refused, manifest.stage, audit_ids
        written = sorted(manifest.item_ids)
        kept_audit = [i for i in audit_ids if i in set(written)]
        if kept_audit != audit_ids:
            manifest.meta["audit"] = self.audit_meta(kept_audit)
            save_manifest(self.project.project, manifest)
        return written, refused, manifest.stage, kept_audit

    def shadow(self, selected: list[str], calib: CalibrationResult) -> dict[str, Any] | None:
        """Stage shadow: record the would-be labels; agreement of the previous shadow run."""
        o = self.o
        record = ShadowRecord(
            run_id=self.run_id, task=self.task, epsilon=o.epsilon, delta=o.delta,
            threshold=calib.threshold, box_confidence=calib.box_confidence, bound=calib.bound,
            ignore=list(self.label_map.ignore), iou_threshold=o.iou_threshold,
            labels=[
                ShadowLabel(
                    item_id=i,
                    annotations=self.writes[i].annotations,
                    difficulty=self.scores[i],
                    model_version=self.writes[i].provenance.model_version,
                )
                for i in selected
            ],
        )  # fmt: skip
        if not o.dry_run:
            write_shadow_record(self.out_dir, record, self.storage_options)
        return _previous_agreement(
            self.out_dir, self.run_id, self.label_map, self.read(), o.min_count, self.storage_options,
        )  # fmt: skip

    def record(self, calib: CalibrationResult, **found: Any) -> GateRecord:
        o = self.o
        return GateRecord(
            run_id=self.run_id, stage=o.stage, dry_run=o.dry_run, task=self.task,
            model_version=self.predictor.default_version, source=self.project.project.url,
            epsilon=o.epsilon, delta=o.delta, min_count=o.min_count,
            audit_share=o.audit_share, iou_threshold=o.iou_threshold,
            threshold=calib.threshold, box_confidence=calib.box_confidence, bound=calib.bound,
            n=calib.n, k=calib.k, level=calib.level, n_calibration=calib.n_calibration,
            min_passing=max(o.min_count, min_passing_count(o.epsilon, calib.level or o.delta)),
            steps=_steps(calib), per_confidence=_walks(calib),
            n_unlabeled=self.n_unlabeled, n_eligible=self.n_eligible,
            audit_precision=measure_audit_precision(self.project, delta=o.delta, items=self.read()),
            **found,
        )  # fmt: skip


def run_autolabel(
    project: ProjectFormat,
    options: GateOptions | None = None,
    *,
    difficulty_dir: str,
    label_map: LabelMap,
    predictions: PredictionSource | None = None,
    checkpoint: str | None = None,
    out_dir: str | None = None,
    storage_options: dict[str, Any] | None = None,
    run_id: str | None = None,
    items: Sequence[Item] | None = None,
    table: tuple[pd.DataFrame, dict[str, Any]] | None = None,
    **keywords: Any,
) -> GateRecord:
    """One gate run of ``project`` with ``options`` (see the module docstring).

    ``keywords`` are fields of :class:`GateOptions` laid over ``options`` (``epsilon`` and
    ``delta`` are required when no ``options`` are given).  ``difficulty_dir`` (and
    ``out_dir``, default the same) are fsspec URLs of the report folder, opened with
    ``storage_options``.  Exactly one of ``predictions`` and ``checkpoint`` is required.
    ``items``: the project's items when the run holds them in memory (every step of the
    gate uses them, no new pass over the project); default: each step streams
    ``project.iter_items()`` (calibration, selection, audit and shadow measurements).  ``table``: the run's difficulty table and its
    metadata when the caller holds them (default: read from ``difficulty_dir``); the gate
    re-tiers them in place.  Returns the run record (also written as
    ``out_dir/autolabel.json``, except in a dry run).
    """
    o = GateOptions.of(options, keywords)
    _check_options(o, predictions, checkpoint)
    out_dir = out_dir or difficulty_dir
    run_id = run_id or new_run_id()
    df, score_meta = (
        table if table is not None else read_difficulty(difficulty_dir, storage_options)
    )
    predictor = _Predictor(project, predictions, checkpoint, storage_options)
    confidences = o.box_confidences
    if confidences is None:
        fixed = predictor.box_confidence
        confidences = (fixed,) if fixed is not None else DEFAULT_BOX_CONFIDENCES
        o = o.model_copy(update={"box_confidences": confidences})
        if fixed is not None:
            log.info("box confidence %g, chosen on the model's training items: full δ", fixed)
    predictor.box_score_min = min(confidences)
    gate = _Gate(project, o, predictor, label_map, run_id, out_dir, storage_options)
    gate.scores = _scores(df)
    gate.items = items
    calib = gate.calibrate(df, _calibration_items(gate.read(), predictor, gate.scores))

    # -- one score, one set of tiers, one gate ----------------------------------------------
    t = calib.threshold
    tiers_meta = dict(score_meta.get("tiers") or {})
    retiered = o.stage in ("shadow", "autolabel") and t is not None
    if retiered and t is not None:
        tiers_meta = _retier(df, score_meta, t, calib, run_id)
        score_meta["tiers"] = tiers_meta  # the caller's table is re-tiered too
        if not o.dry_run:
            write_difficulty(df, out_dir, score_meta, storage_options)
    easy = set(df.loc[df["tier"] == EASY, "item_id"].astype(str)) if retiered else set()
    gate.select(_unlabeled(gate.read(), gate.scores), easy, calib)
    selected = sorted(gate.writes)
    audit_ids = (
        choose_audit(selected, run_id, o.audit_share, seed=o.seed) if o.stage == "autolabel" else []
    )
    audited = set(audit_ids)
    for w in gate.writes.values():
        w.provenance.extra["audit"] = w.item.item_id in audited

    written: list[str] = []
    refused: dict[str, str] = {}
    agreement: dict[str, Any] | None = None
    manifest_stage: str | None = None
    if o.stage == "autolabel" and gate.writes:
        written, refused, manifest_stage, audit_ids = gate.write(selected, audit_ids, calib)
    elif o.stage == "shadow":
        agreement = gate.shadow(selected, calib)
    result = gate.record(
        calib, score_weights_fit_on=_weights_fit_on(score_meta), selected=selected,
        written=written, refused=refused, audit=audit_ids, tiers=_tier_summary(df, tiers_meta),
        manifest_stage=manifest_stage,
        agreement=ShadowAgreement.model_validate(agreement) if agreement else None,
    )  # fmt: skip
    labeled = result.labeled_items
    result.labels = _label_counts({i: gate.writes[i].annotations for i in labeled})
    result.examples = _examples(gate.writes, labeled, set(audit_ids))
    if not o.dry_run:
        result.report_path = write_gate_record(out_dir, result, storage_options)
    log.info(
        "run %s (%s%s): %s", run_id, o.stage, ", dry run" if o.dry_run else "", result.verdict()
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

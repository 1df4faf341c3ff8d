"""Rollout stages of auto-labeling, and the shadow stage's record and agreement check.

================  ==================================================================
stage             what a run does
================  ==================================================================
``report``        calibrate and report the threshold and coverage; nothing is
                  selected for writing and nothing is written to the project
``shadow``        also select the easy unlabeled items and record the labels that
                  *would* be written (``shadow.json`` in the report folder); write
                  nothing.  When people label those items later,
                  :func:`measure_shadow_agreement` compares and says whether
                  promotion to ``autolabel`` is safe
``autolabel``     write the selected labels to the project (see :mod:`autolabel.gate`)
================  ==================================================================

A project moves up a stage only by configuration.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from autolabel.calibrate import clopper_pearson_upper
from connectors.errors import InputError, UsageError
from connectors.formats.base import ProjectFormat
from connectors.labelmap import LabelMap
from connectors.model import Annotation, Item, Prediction
from connectors.storage import ProjectFS
from difficulty.matching import item_correct

log = logging.getLogger(__name__)

STAGES = ("report", "shadow", "autolabel")
SHADOW_FILENAME = "shadow.json"


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise UsageError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    return stage


class ShadowLabel(BaseModel):
    """The label one item would have received (project classes, pixel ``xyxy``)."""

    item_id: str
    annotations: list[Annotation]
    difficulty: float
    model_version: str


class ShadowRecord(BaseModel):
    """What a shadow run would have written, with the calibration it relied on."""

    run_id: str
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    task: str = "detection"
    epsilon: float
    delta: float
    threshold: float | None
    box_confidence: float | None
    bound: float
    ignore: list[str] = Field(default_factory=list)
    iou_threshold: float = 0.5
    labels: list[ShadowLabel] = Field(default_factory=list)


def write_shadow_record(
    out_dir: str, record: ShadowRecord, storage_options: dict[str, Any] | None = None
) -> str:
    """Atomically write ``out_dir/shadow.json``; returns its full path."""
    return ProjectFS(out_dir, storage_options).write_text(
        SHADOW_FILENAME, record.model_dump_json(indent=1)
    )


def read_shadow_record(
    path_or_dir: str, storage_options: dict[str, Any] | None = None
) -> ShadowRecord:
    """Read a shadow record from its file or from the report folder holding it."""
    if path_or_dir.rstrip("/").endswith(".json"):
        parent, _, name = path_or_dir.rstrip("/").rpartition("/")
        fs, rel = ProjectFS(parent or ".", storage_options), name
    else:
        fs, rel = ProjectFS(path_or_dir, storage_options), SHADOW_FILENAME
    if not fs.exists(rel):
        raise InputError(
            "no shadow record here (run autolabel with --stage shadow first)", file=fs.url_of(rel)
        )
    try:
        return ShadowRecord.model_validate_json(fs.read_bytes(rel))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise InputError(f"malformed shadow record: {exc}", file=fs.url_of(rel)) from exc


def measure_shadow_agreement(
    project: ProjectFormat | Iterable[Item],
    shadow_record: ShadowRecord | str,
    label_map: LabelMap | None = None,
    *,
    min_count: int = 30,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare a shadow run's would-be labels with the human labels that arrived since.

    For every recorded item that now has a human label, the would-be label is judged by
    the review rule (:func:`difficulty.matching.item_correct`; the labels are already in
    project classes, so only the ignore list of ``label_map`` — or the record's — is
    used).  Promotion is safe when at least ``min_count`` items were compared and the
    one-sided Clopper–Pearson upper bound of their error at the record's ``δ`` is
    ``≤ ε``.  The items people happened to label are taken as a random sample of the
    shadow set; if they were chosen otherwise, the bound speaks only for them.

    Returns ``n_shadow``, ``n_compared``, ``n_wrong``, ``error_rate``, ``bound``,
    ``epsilon``, ``delta``, ``promotion_safe`` and ``reason``.
    """
    record = (
        shadow_record
        if isinstance(shadow_record, ShadowRecord)
        else read_shadow_record(shadow_record, storage_options)
    )
    ignore = tuple(label_map.ignore) if label_map is not None else tuple(record.ignore)
    judge = LabelMap(ignore=ignore)
    wanted = {s.item_id: s for s in record.labels}
    items = project.iter_items() if isinstance(project, ProjectFormat) else project
    n = k = 0
    wrong_ids: list[str] = []
    for item in items:
        shadow = wanted.get(item.item_id)
        if shadow is None or item.error is not None or not item.has_human_label:
            continue
        pred = Prediction(
            item_id=item.item_id, annotations=shadow.annotations, model_version=shadow.model_version
        )
        n += 1
        if not item_correct(
            item, pred, judge, task=record.task, iou_threshold=record.iou_threshold
        ):
            k += 1
            wrong_ids.append(item.item_id)
    bound = clopper_pearson_upper(k, n, record.delta)
    if n < min_count:
        safe, reason = (
            False,
            f"only {n} shadow items have human labels so far; need at least {min_count}",
        )
    elif bound > record.epsilon:
        safe, reason = (
            False,
            f"error bound {bound:.3f} is above epsilon {record.epsilon} ({k} of {n} wrong)",
        )
    else:
        safe, reason = (
            True,
            f"error bound {bound:.3f} <= epsilon {record.epsilon} on {n} items ({k} wrong)",
        )
    log.info("shadow run %s: %s", record.run_id, reason)
    return {
        "run_id": record.run_id,
        "n_shadow": len(record.labels),
        "n_compared": n,
        "n_wrong": k,
        "error_rate": k / n if n else None,
        "bound": bound,
        "epsilon": record.epsilon,
        "delta": record.delta,
        "promotion_safe": safe,
        "reason": reason,
        "wrong_items": wrong_ids[:50],
    }

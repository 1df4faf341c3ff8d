"""The auto-label gate's run record: ``autolabel.json``, typed.

The gate (:mod:`autolabel.gate`) writes one :class:`GateRecord` per run into the run
folder; the report (:mod:`difficulty.report`), the ``audit`` command and the Label Studio
backend read it back with :func:`read_gate_record`.  The model lives here, in the layer
both sides import, so that the writer and the readers share one shape and nobody guesses
keys.

What the fields mean:

* the guarantee asked for — ``epsilon`` (ε, the auto-label error target), ``delta``
  (δ: the bound holds with confidence 1 − δ), ``min_count``, ``audit_share``;
* the calibration — ``threshold`` (the largest difficulty score whose auto-label error
  has a Clopper–Pearson upper bound ≤ ε; ``None`` when no threshold passed),
  ``box_confidence`` (the least confidence a predicted box needs to become a label),
  ``bound`` (the bound at the threshold, or the best refused one), ``n``/``k`` (labeled
  calibration items under the threshold, wrong among them), ``n_calibration`` (all
  calibration items), ``min_passing`` (the fewest items a threshold needs to pass even
  with no error), ``steps`` (the walk of the chosen box confidence: the risk–coverage
  curve of the calibration items), ``per_confidence`` (one line per box confidence);
* what it did — ``selected`` (unlabeled items of the easy tier with a label to write),
  ``written`` (labels written: stage ``autolabel`` only), ``refused`` (items refused
  at write time, with why), ``audit`` (written items flagged for human audit), ``labels``
  (how many of the written — in shadow: would-be — labels hold boxes, how many are empty,
  boxes per class), ``examples`` (some of those labels, for thumbnails);
* the tiers after the gate — ``tiers``: where labels allowed calibration, "easy" *is*
  "at or below the calibrated threshold";
* what people measured since — ``audit_precision`` (audited items reviewed by people,
  judged by the review rule) and, in shadow, ``agreement`` of an earlier shadow run.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field

from connectors.errors import InputError
from connectors.model import Annotation
from connectors.storage import ProjectFS

log = logging.getLogger(__name__)

FILENAME = "autolabel.json"
Stage = Literal["report", "shadow", "autolabel"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CalibrationStep(_Model):
    """One candidate threshold of the walk: ``n`` calibration items with score ≤
    ``threshold``, ``k`` of them wrong; ``bound`` is ``None`` where it was not tested."""

    threshold: float
    n: int
    k: int
    bound: float | None
    tested: bool
    passed: bool


class ConfidenceWalk(_Model):
    """The outcome of the walk at one box confidence."""

    box_confidence: float
    threshold: float | None
    bound: float
    n: int
    k: int


class LabelCounts(_Model):
    """The labels written (in shadow: that would be written)."""

    total: int = 0
    with_boxes: int = 0
    empty: int = 0
    boxes: int = 0
    classes: dict[str, int] = Field(default_factory=dict)


class LabelExample(_Model):
    """One written (or would-be) label, for a thumbnail: pixel ``xyxy`` boxes."""

    item_id: str
    uri: str
    difficulty: float
    annotations: list[Annotation]
    audit: bool = False


class AuditRunCounts(_Model):
    audited: int = 0
    reviewed: int = 0
    correct: int = 0


class AuditPrecision(_Model):
    """Audit precision over every committed run of the project with audited items.

    ``reviewed``: flagged items a person has reviewed since (status ``reviewed``, or the
    written label edited: it now reads as human); ``correct``: those whose auto-label
    passed the review rule; ``precision``: ``correct / reviewed`` (``None`` before any
    review); ``error_bound``: one-sided Clopper–Pearson upper bound of the error at δ.
    """

    runs: int = 0
    audited: int = 0
    reviewed: int = 0
    correct: int = 0
    precision: float | None = None
    error_bound: float = 1.0
    delta: float = 0.1
    per_run: dict[str, AuditRunCounts] = Field(default_factory=dict)
    measured: datetime | None = None


class ShadowAgreement(_Model):
    """How an earlier shadow run's would-be labels compare with the human labels since."""

    run_id: str
    n_shadow: int
    n_compared: int
    n_wrong: int
    error_rate: float | None
    bound: float
    epsilon: float
    delta: float
    promotion_safe: bool
    reason: str
    wrong_items: list[str] = Field(default_factory=list)


class TierSummary(_Model):
    """The tiers of the run's table after the gate.

    ``source``: ``calibrated`` (easy = score ≤ the calibrated threshold) or how the
    scoring cut them (``quantiles``, ``thresholds``, ``reference run …``).
    """

    easy_max: float | None
    hard_min: float | None
    source: str
    counts: dict[str, int] = Field(default_factory=dict)


class GateRecord(_Model):
    """What one gate run did (``autolabel.json``)."""

    record_version: int = 1
    run_id: str
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    stage: Stage
    dry_run: bool = False
    task: str = "detection"
    model_version: str = ""
    source: str | None = None
    epsilon: float
    delta: float
    min_count: int = 30
    audit_share: float = 0.0
    iou_threshold: float = 0.5

    threshold: float | None = None
    box_confidence: float | None = None
    bound: float = 1.0
    n: int = 0
    k: int = 0
    level: float | None = None
    n_calibration: int = 0
    min_passing: int = 0
    steps: list[CalibrationStep] = Field(default_factory=list)
    per_confidence: list[ConfidenceWalk] = Field(default_factory=list)
    score_weights_fit_on: int = 0

    n_unlabeled: int = 0
    n_eligible: int = 0
    selected: list[str] = Field(default_factory=list)
    written: list[str] = Field(default_factory=list)
    refused: dict[str, str] = Field(default_factory=dict)
    audit: list[str] = Field(default_factory=list)
    labels: LabelCounts = Field(default_factory=LabelCounts)
    examples: list[LabelExample] = Field(default_factory=list)
    tiers: TierSummary | None = None
    manifest_stage: str | None = None

    audit_precision: AuditPrecision = Field(default_factory=AuditPrecision)
    agreement: ShadowAgreement | None = None

    report_path: str | None = Field(default=None, exclude=True)
    """Where this record was written (not part of the record)."""

    # -- derived -----------------------------------------------------------------------
    @computed_field  # type: ignore[prop-decorator]
    @property
    def coverage(self) -> float:
        """Share of eligible unlabeled items (scored, with a prediction) selected."""
        return len(self.selected) / self.n_eligible if self.n_eligible else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def calibration_coverage(self) -> float:
        """Share of the calibration items under the threshold."""
        if self.threshold is None or not self.n_calibration:
            return 0.0
        return self.n / self.n_calibration

    @computed_field  # type: ignore[prop-decorator]
    @property
    def precision(self) -> float | None:
        """Measured precision: audit precision so far, or (shadow) the agreement of the
        previous shadow run; ``None`` while nothing has been compared."""
        if self.stage == "shadow" and self.agreement and self.agreement.error_rate is not None:
            return 1.0 - self.agreement.error_rate
        return self.audit_precision.precision

    @computed_field  # type: ignore[prop-decorator]
    @property
    def outcome(self) -> str:
        """``refused``, ``written``, ``would_write``, ``none_easy`` or ``calibrated``
        (stage report: calibrated, nothing selected)."""
        if self.threshold is None:
            return "refused"
        if self.stage == "report":
            return "calibrated"
        if not self.selected:
            return "none_easy"
        if self.stage == "autolabel" and not self.dry_run:
            return "written"
        return "would_write"

    @property
    def labeled_items(self) -> list[str]:
        """The items whose labels :attr:`labels` counts: written, else selected."""
        return self.written if self.stage == "autolabel" and not self.dry_run else self.selected

    def refusal(self) -> str:
        """Why nothing may be auto-labeled (for a refused calibration)."""
        eps = f"ε {self.epsilon:g}"
        if self.n_calibration < self.min_passing:
            return (
                f"only {self.n_calibration} labeled items with a prediction to calibrate on; "
                f"at {eps} a threshold needs at least {self.min_passing} items under it even "
                "with no error"
            )
        if self.n == 0:
            return f"no threshold had enough labeled items under it to be tested at {eps}"
        return f"the best bound {self.bound:.3f} is above {eps} ({self.k} of {self.n} wrong)"

    def verdict(self) -> str:
        """One sentence: what the gate concluded and what it did."""
        conf = f"{100 * (1 - self.delta):g} % confidence"
        if self.threshold is None:
            return f"Refused: {self.refusal()}; nothing written."
        head = (
            f"Calibrated on {self.n_calibration} labeled items: threshold {self.threshold:.3g}"
            f"{'' if self.box_confidence is None else f' (boxes ≥ {self.box_confidence:g})'}, "
            f"error bound {self.bound:.3f} ≤ ε {self.epsilon:g} at {conf}"
        )
        audit = f", {len(self.audit)} sent to audit" if self.audit else ""
        refused = f", {len(self.refused)} refused at write time" if self.refused else ""
        outcome = self.outcome
        if outcome == "calibrated":
            return f"{head} → stage report: nothing selected or written."
        if outcome == "none_easy":
            return f"{head} → no unlabeled item is in the easy tier; nothing written."
        if outcome == "written":
            return f"{head} → {len(self.written)} items written{audit}{refused}."
        why = "dry run" if self.dry_run else "shadow: nothing written"
        return f"{head} → would write {len(self.selected)} items ({why})."


def write_gate_record(
    out_dir: str, record: GateRecord, storage_options: dict[str, Any] | None = None
) -> str:
    """Atomically write ``out_dir/autolabel.json``; returns its full path."""
    return ProjectFS(out_dir, storage_options).write_text(
        FILENAME, record.model_dump_json(indent=1)
    )


def read_gate_record(
    run_dir: str, storage_options: dict[str, Any] | None = None
) -> GateRecord | None:
    """The run's gate record, or ``None`` when the gate did not run there.

    Raises :class:`InputError` naming the file when it is not a gate record.
    """
    fs = ProjectFS(run_dir, storage_options)
    if not fs.exists(FILENAME):
        return None
    try:
        return GateRecord.model_validate_json(fs.read_bytes(FILENAME))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise InputError(f"not a gate record: {exc}", file=fs.url_of(FILENAME)) from exc

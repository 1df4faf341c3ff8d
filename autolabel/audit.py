"""Human audit of auto-labels: which items to audit, and the precision measured so far.

Each auto-label run flags a share of the items it writes for human audit.  The choice is
deterministic given the run id (a hash of run id and item id, lowest first), so it can
be recomputed and checked, and it is independent of difficulty and correctness: the
audited items are a uniform random sample of what was written.

The loop: the run manifest's ``meta["audit"]`` keeps the flagged item ids and the labels
written for them; ``labeltriage audit RUN_DIR`` lists them for people (CSV, and a Label
Studio view of the tasks).  Once a person has reviewed an audited item — its status is
``reviewed``, or its label now reads as a human label (the file was saved since the
write: sha256 mismatch) — the written label is judged against the current one by the
review rule of :mod:`difficulty.matching` (:func:`audit_verdicts`).  Audit precision =
share of reviewed audited items whose auto-label was right, with the Clopper–Pearson
upper bound of its error (:func:`summarize_audit`); every gate run and every ``audit``
command records it in the run's ``autolabel.json``, and the report shows it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from autolabel.calibrate import clopper_pearson_upper
from connectors.formats.base import ProjectFormat
from connectors.labelmap import LabelMap
from connectors.model import Annotation, Item, ItemStatus, Prediction
from connectors.writeback import list_runs
from difficulty.matching import item_correct
from difficulty.runrecord import AuditPrecision, AuditRunCounts

log = logging.getLogger(__name__)


def choose_audit(item_ids: Sequence[str], run_id: str, share: float, *, seed: int = 0) -> list[str]:
    """``ceil(share · n)`` of ``item_ids`` (none when ``share == 0``), chosen by a hash of the run id.

    The same run id, seed and ids always give the same sample.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"audit share must be in [0, 1], got {share}")
    count = min(len(item_ids), math.ceil(share * len(item_ids)))
    if count == 0:
        return []

    def key(item_id: str) -> str:
        return hashlib.sha256(f"{run_id}\0{seed}\0{item_id}".encode()).hexdigest()

    return sorted(sorted(item_ids, key=key)[:count])


def audit_meta(
    labels: dict[str, list[Annotation]], *, task: str, ignore: Sequence[str], iou_threshold: float
) -> dict[str, Any]:
    """The ``meta["audit"]`` entry of a run manifest: flagged ids and their written labels."""
    return {
        "item_ids": sorted(labels),
        "labels": {
            i: [a.model_dump(mode="json") for a in anns] for i, anns in sorted(labels.items())
        },
        "task": task,
        "ignore": list(ignore),
        "iou_threshold": iou_threshold,
    }


def _reviewed(item: Item) -> bool:
    return item.error is None and (item.status is ItemStatus.REVIEWED or item.has_human_label)


@dataclass(frozen=True)
class AuditVerdict:
    """One audited item: the run that flagged it, the label written, and — once a person
    has reviewed the item — whether that label passed the review rule (``None`` before)."""

    item_id: str
    run_id: str
    annotations: list[Annotation]
    uri: str | None = None
    correct: bool | None = None

    @property
    def state(self) -> str:
        """``pending``, ``right`` or ``wrong``."""
        return "pending" if self.correct is None else "right" if self.correct else "wrong"


def audit_verdicts(fmt: ProjectFormat, items: Iterable[Item] | None = None) -> list[AuditVerdict]:
    """Every item flagged for audit by a committed run of the project, judged where a
    person has reviewed it since (status ``reviewed``, or the written label edited so it
    reads as human): the written label against the current one, by the review rule of
    :func:`difficulty.matching.item_correct`.  An item flagged twice counts for the later
    run.  ``items``: the project's items when the caller has read them already."""
    flagged: dict[str, tuple[str, list[Annotation], dict[str, Any]]] = {}
    for manifest in list_runs(fmt.project):
        audit = (
            manifest.meta.get("audit")
            if manifest.stage == "committed" and not manifest.dry_run
            else None
        )
        if not isinstance(audit, dict) or not audit.get("item_ids"):
            continue
        labels = audit.get("labels", {})
        for item_id in audit["item_ids"]:
            anns = [Annotation.model_validate(a) for a in labels.get(item_id, [])]
            flagged[item_id] = (manifest.run_id, anns, audit)  # a later run's flag wins
    verdicts: dict[str, AuditVerdict] = {
        i: AuditVerdict(item_id=i, run_id=run, annotations=anns)
        for i, (run, anns, _) in flagged.items()
    }
    if flagged:
        for item in fmt.iter_items() if items is None else items:
            entry = flagged.get(item.item_id)
            if entry is None:
                continue
            run_id, anns, audit = entry
            correct: bool | None = None
            if _reviewed(item):
                pred = Prediction(item_id=item.item_id, annotations=anns, source=run_id)
                correct = item_correct(
                    item,
                    pred,
                    LabelMap(ignore=tuple(audit.get("ignore", ()))),
                    task=str(audit.get("task", "detection")),
                    iou_threshold=float(audit.get("iou_threshold", 0.5)),
                )
            verdicts[item.item_id] = AuditVerdict(item.item_id, run_id, anns, item.uri, correct)
    return sorted(verdicts.values(), key=lambda v: (v.run_id, v.item_id))


def summarize_audit(verdicts: Sequence[AuditVerdict], *, delta: float = 0.1) -> AuditPrecision:
    """Audit precision of ``verdicts``: ``correct / reviewed`` with the one-sided
    Clopper–Pearson upper bound of the error at ``delta``, per run and over all."""
    per_run: dict[str, AuditRunCounts] = {}
    for v in verdicts:
        counts = per_run.setdefault(v.run_id, AuditRunCounts())
        counts.audited += 1
        counts.reviewed += int(v.correct is not None)
        counts.correct += int(bool(v.correct))
    reviewed = sum(c.reviewed for c in per_run.values())
    correct = sum(c.correct for c in per_run.values())
    precision = correct / reviewed if reviewed else None
    log.info("audit: %d flagged, %d reviewed, precision %s", len(verdicts), reviewed, precision)
    return AuditPrecision(
        runs=len(per_run),
        audited=len(verdicts),
        reviewed=reviewed,
        correct=correct,
        precision=precision,
        error_bound=clopper_pearson_upper(reviewed - correct, reviewed, delta),
        delta=delta,
        per_run=per_run,
        measured=datetime.now(timezone.utc),
    )


def measure_audit_precision(
    fmt: ProjectFormat, *, delta: float = 0.1, items: Iterable[Item] | None = None
) -> AuditPrecision:
    """Audit precision over every committed run of the project with audited items
    (:func:`audit_verdicts`, :func:`summarize_audit`)."""
    return summarize_audit(audit_verdicts(fmt, items), delta=delta)

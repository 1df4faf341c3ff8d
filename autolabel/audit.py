"""Human audit of auto-labels: which items to audit, and the precision measured so far.

Each auto-label run flags a share of the items it writes for human audit.  The choice is
deterministic given the run id (a hash of run id and item id, lowest first), so it can
be recomputed and checked, and it is independent of difficulty and correctness: the
audited items are a uniform random sample of what was written.

The run manifest's ``meta["audit"]`` keeps the flagged item ids and the labels written
for them.  Once a person has reviewed an audited item — its status is ``reviewed``, or
its label now reads as a human label (a file edited since the write: sha256 mismatch) —
the written label is judged against the current one by the review rule of
:mod:`difficulty.matching`.  Audit precision = share of reviewed audited items whose
auto-label was right; the Clopper–Pearson upper bound of its error goes with it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
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


def measure_audit_precision(fmt: ProjectFormat, *, delta: float = 0.1) -> AuditPrecision:
    """Audit precision over every committed run of the project with audited items.

    ``runs`` (runs with audits), ``audited`` (items flagged), ``reviewed`` (flagged items
    a person has reviewed since), ``correct``, ``precision`` (``None`` before any
    review), ``error_bound`` (one-sided Clopper–Pearson at ``delta``) and ``per_run``
    counts (see :class:`difficulty.runrecord.AuditPrecision`).
    """
    flagged: dict[str, tuple[str, list[Annotation], dict[str, Any]]] = {}
    per_run: dict[str, dict[str, int]] = {}
    for manifest in list_runs(fmt.project):
        audit = (
            manifest.meta.get("audit")
            if manifest.stage == "committed" and not manifest.dry_run
            else None
        )
        if not isinstance(audit, dict) or not audit.get("item_ids"):
            continue
        per_run[manifest.run_id] = {"audited": 0, "reviewed": 0, "correct": 0}
        labels = audit.get("labels", {})
        for item_id in audit["item_ids"]:
            anns = [Annotation.model_validate(a) for a in labels.get(item_id, [])]
            flagged[item_id] = (manifest.run_id, anns, audit)  # a later run's flag wins
    for run_id, _, _ in flagged.values():
        per_run[run_id]["audited"] += 1

    reviewed = correct = 0
    if flagged:
        for item in fmt.iter_items():
            entry = flagged.get(item.item_id)
            if entry is None or not _reviewed(item):
                continue
            run_id, anns, audit = entry
            pred = Prediction(item_id=item.item_id, annotations=anns, source=run_id)
            ok = item_correct(
                item,
                pred,
                LabelMap(ignore=tuple(audit.get("ignore", ()))),
                task=str(audit.get("task", "detection")),
                iou_threshold=float(audit.get("iou_threshold", 0.5)),
            )
            reviewed += 1
            correct += int(ok)
            per_run[run_id]["reviewed"] += 1
            per_run[run_id]["correct"] += int(ok)
    precision = correct / reviewed if reviewed else None
    log.info("audit: %d flagged, %d reviewed, precision %s", len(flagged), reviewed, precision)
    return AuditPrecision(
        runs=len(per_run),
        audited=len(flagged),
        reviewed=reviewed,
        correct=correct,
        precision=precision,
        error_bound=clopper_pearson_upper(reviewed - correct, reviewed, delta),
        delta=delta,
        per_run={k: AuditRunCounts(**v) for k, v in per_run.items()},
        measured=datetime.now(timezone.utc),
    )

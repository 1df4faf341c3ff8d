"""The plan a project manager works with: hours per tier, hours saved, forecast, assignment.

Given a difficulty table (:mod:`difficulty.table`) and, when the auto-label gate ran, its
run record (:class:`difficulty.runrecord.GateRecord`):

* **Remaining work** — items still ``unlabeled``, per tier, minus the items the gate
  wrote labels for in this run.  Items that could not be scored (``error`` set) still
  need a person; they are planned as ``unscored`` at the ``medium`` rate.  Written items
  flagged for audit still need a person's review: they are planned as ``audit`` at the
  rate of their tier.
* **Seconds per item per tier** — the median ``annotation_seconds`` of the items of that
  tier that have one (platform timing history), when at least ``min_history`` of them
  do; otherwise the configured default (:attr:`PlanSettings.seconds_per_tier`).
* **Hours saved** — only from what the gate did: at stage ``autolabel`` the hours of the
  written items minus their audit (``auto_label.kind = "written"``); at stage
  ``shadow`` the same for the items it *would* write, with ``audit_share`` of them
  audited (``"would"``: nothing was written, the remaining work is unchanged).  No gate,
  a refused calibration or nothing easy: no savings are claimed.
* **Forecast** — ``days = hours / (team_size × hours_per_day)`` (working days round up);
  in shadow also the forecast if the would-be labels were written.
* **Assignment** — annotators are sorted by ``experience`` (highest first); the remaining
  items are sorted hardest first and cut into consecutive blocks, one per annotator, so
  that each annotator's planned hours are proportional to their ``hours_per_day``: the
  most experienced person gets the hardest items and everyone finishes together.
  Without configured annotators the team is ``team_size`` generic people: the first
  third (at least one) ``senior``, the next third ``mid``, the rest ``junior``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from connectors.csvsafe import csv_text
from connectors.storage import ProjectFS
from difficulty.runrecord import GateRecord

PLAN_TIERS = ("easy", "medium", "hard", "unscored")
LEVELS = {"senior": 3, "mid": 2, "junior": 1}


class Annotator(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    experience: int = Field(default=1, ge=0, description="higher = more experienced")
    hours_per_day: float | None = Field(
        default=None, gt=0, le=24, description="defaults to the plan's hours_per_day"
    )


class PlanSettings(BaseModel):
    """Planning inputs (defaults match ``autolabel.config.PlanningConfig``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    team_size: int = Field(default=1, ge=1)
    hours_per_day: float = Field(default=8.0, gt=0, le=24)
    seconds_per_tier: dict[str, float] = Field(
        default_factory=lambda: {"easy": 30.0, "medium": 60.0, "hard": 120.0}
    )
    min_history: int = Field(
        default=5,
        ge=1,
        description="timed items a tier needs before its median replaces the default",
    )
    audit_share: float = Field(
        default=0.1, ge=0.0, le=1.0, description="share of auto-labeled items a person still audits"
    )
    annotators: list[Annotator] = Field(default_factory=list)

    @field_validator("annotators", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        """Plain names are listed most experienced first: ``["ann", "bo"]`` → 2, 1."""
        if isinstance(value, list) and any(isinstance(v, str) for v in value):
            n = len(value)
            return [
                {"name": v, "experience": n - i} if isinstance(v, str) else v
                for i, v in enumerate(value)
            ]
        return value

    @field_validator("seconds_per_tier")
    @classmethod
    def _complete(cls, value: dict[str, float]) -> dict[str, float]:
        missing = [t for t in ("easy", "medium", "hard") if t not in value]
        bad = [k for k, v in value.items() if not v > 0]
        if missing or bad:
            raise ValueError(
                f"seconds_per_tier needs positive easy, medium and hard (missing {missing}, not positive {bad})"
            )
        return value

    def team(self) -> list[Annotator]:
        """The configured annotators, or ``team_size`` generic ones; most experienced first."""
        people = list(self.annotators)
        if not people:
            n = self.team_size
            seniors = max(1, math.ceil(n / 3))
            mids = min(n - seniors, math.ceil(n / 3))
            for i in range(n):
                level = "senior" if i < seniors else "mid" if i < seniors + mids else "junior"
                people.append(Annotator(name=f"{level}-{i + 1}", experience=LEVELS[level]))
        return sorted(people, key=lambda a: -a.experience)


def seconds_per_tier(df: pd.DataFrame, settings: PlanSettings) -> dict[str, dict[str, Any]]:
    """Per tier: ``seconds`` per item and where it came from (``history`` or ``default``)."""
    out: dict[str, dict[str, Any]] = {}
    secs = (
        df["annotation_seconds"]
        if "annotation_seconds" in df.columns
        else pd.Series(np.nan, index=df.index)
    )
    for tier in ("easy", "medium", "hard"):
        timed = secs[(df["tier"] == tier) & secs.notna() & (secs > 0)]
        if len(timed) >= settings.min_history:
            out[tier] = {
                "seconds": float(timed.median()),
                "source": "history",
                "timed_items": len(timed),
            }
        else:
            out[tier] = {
                "seconds": float(settings.seconds_per_tier[tier]),
                "source": "default",
                "timed_items": len(timed),
            }
    out["unscored"] = {**out["medium"], "source": f"{out['medium']['source']} (medium rate)"}
    return out


def _plan_tier(df: pd.DataFrame) -> pd.Series:
    tier = df["tier"].astype(object).where(df["tier"].notna(), None)
    return tier.where(tier.notna(), "unscored")


def _hours(ids: set[str], df: pd.DataFrame, tier: pd.Series, rates: dict[str, Any]) -> float:
    mask = df["item_id"].astype(str).isin(ids).to_numpy()
    return float(sum(rates[t]["seconds"] for t in tier[mask]) / 3600.0)


def compute_plan(
    df: pd.DataFrame, settings: PlanSettings = PlanSettings(), gate: GateRecord | None = None
) -> dict[str, Any]:
    """The plan for a difficulty table and the gate's record (see the module docstring);
    plain JSON-able data."""
    rates = seconds_per_tier(df, settings)
    tier = _plan_tier(df)
    ids = df["item_id"].astype(str)
    outcome = gate.outcome if gate is not None else None
    written = set(gate.written) if gate is not None and outcome == "written" else set()
    audit = set(gate.audit) & written if gate is not None else set()
    would = set(gate.selected) if gate is not None and outcome == "would_write" else set()
    unlabeled = df["status"] == "unlabeled"
    done = ids.isin(written)
    remaining = unlabeled & ~done
    rows = []
    for t in PLAN_TIERS:
        total = int((tier == t).sum())
        left = int(((tier == t) & remaining).sum())
        if t == "unscored" and total == 0:
            continue
        rows.append(
            {
                "tier": t,
                "items": total,
                "remaining": left,
                "auto_labeled": int(((tier == t) & unlabeled & done).sum()),
                "seconds_per_item": rates[t]["seconds"],
                "seconds_source": rates[t]["source"],
                "hours": left * rates[t]["seconds"] / 3600.0,
            }
        )
    audit_hours = _hours(audit, df, tier, rates)
    total_hours = sum(r["hours"] for r in rows) + audit_hours
    auto: dict[str, Any] = {"kind": None, "items": 0, "audit_items": 0, "hours_saved": 0.0}
    if written:
        auto = {
            "kind": "written",
            "items": len(written),
            "audit_items": len(audit),
            "hours_saved": _hours(written, df, tier, rates) - audit_hours,
        }
    elif would and gate is not None:
        n_audit = min(len(would), math.ceil(gate.audit_share * len(would)))
        per_item = _hours(would, df, tier, rates) / len(would)
        auto = {
            "kind": "would",
            "items": len(would),
            "audit_items": n_audit,
            "hours_saved": per_item * (len(would) - n_audit),
        }
    team = settings.team()
    capacity = sum(a.hours_per_day or settings.hours_per_day for a in team)
    days = total_hours / capacity
    days_if = (total_hours - auto["hours_saved"]) / capacity if auto["kind"] == "would" else None
    assignment = assign(df[remaining], rates, settings)
    per_person = []
    for a in team:
        mine = assignment[assignment["assignee"] == a.name]
        counts = mine["tier"].value_counts()
        per_person.append(
            {
                "name": a.name,
                "experience": a.experience,
                "hours_per_day": a.hours_per_day or settings.hours_per_day,
                "items": len(mine),
                "hours": float(mine["hours"].sum()),
                **{t: int(counts.get(t, 0)) for t in PLAN_TIERS},
            }
        )
    return {
        "tiers": rows,
        "remaining_items": int(remaining.sum()),
        "audit_items": len(audit),
        "audit_hours": audit_hours,
        "remaining_hours": total_hours,
        "auto_label": auto,
        "audit_share": gate.audit_share if gate is not None else settings.audit_share,
        "team": [a.model_dump() for a in team],
        "team_size": len(team),
        "hours_per_day": settings.hours_per_day,
        "team_hours_per_day": capacity,
        "forecast_days": days,
        "working_days": _working_days(days),
        "forecast_days_if_auto_labeled": days_if,
        "working_days_if_auto_labeled": None if days_if is None else _working_days(days_if),
        "assignment": per_person,
    }


def _working_days(days: float) -> int:
    return math.ceil(days - 1e-9) if days > 0 else 0


def assign(
    remaining: pd.DataFrame, rates: dict[str, dict[str, Any]], settings: PlanSettings
) -> pd.DataFrame:
    """Items hardest first, cut into consecutive blocks by the annotators' capacities.

    Returns ``item_id``, ``tier``, ``score``, ``hours`` (planned for the item) and
    ``assignee`` per remaining item; unscored items come last (after the easiest).
    """
    tier = _plan_tier(remaining)
    score = (
        remaining["score"].to_numpy(dtype=np.float64, na_value=np.nan)
        if len(remaining)
        else np.zeros(0)
    )
    hours = np.array([rates[t]["seconds"] / 3600.0 for t in tier], dtype=np.float64)
    key = np.where(np.isfinite(score), -score, np.inf)
    order = np.argsort(key, kind="stable")
    team = settings.team()
    share = np.array([a.hours_per_day or settings.hours_per_day for a in team], dtype=np.float64)
    bounds = np.cumsum(share / share.sum())  # each person's upper share of the total hours
    cum = np.cumsum(hours[order])
    total = cum[-1] if cum.size else 0.0
    # the item whose mid-point falls in a person's share of the hours goes to that person
    mid = (cum - hours[order] / 2.0) / total if total > 0 else np.zeros_like(cum)
    who = np.minimum(np.searchsorted(bounds, mid, side="right"), len(team) - 1)
    out = pd.DataFrame(
        {
            "item_id": remaining["item_id"].to_numpy()[order],
            "tier": tier.to_numpy()[order],
            "score": score[order],
            "hours": hours[order],
            "assignee": [team[i].name for i in who],
        }
    )
    return out


def plan_table(plan: dict[str, Any]) -> pd.DataFrame:
    """``plan.csv``: one row per tier, an ``audit`` row when written labels await review,
    and a ``total`` row.  ``hours_saved`` holds hours saved by labels written in this run;
    ``hours_would_save`` what a shadow run's labels would save."""
    auto = plan["auto_label"]
    saved = auto["hours_saved"] if auto["kind"] == "written" else 0.0
    would = auto["hours_saved"] if auto["kind"] == "would" else 0.0
    rows = [dict(r) for r in plan["tiers"]]
    for r in rows:
        r["hours_saved"] = saved if r["tier"] == "easy" else 0.0
        r["hours_would_save"] = would if r["tier"] == "easy" else 0.0
        r["assigned_to"] = " ".join(
            p["name"] for p in plan["assignment"] if p.get(r["tier"], 0) > 0
        )
    if plan["audit_items"]:
        rows.append(
            {
                "tier": "audit",
                "items": plan["audit_items"],
                "remaining": plan["audit_items"],
                "auto_labeled": 0,
                "hours": plan["audit_hours"],
                "hours_saved": 0.0,
                "hours_would_save": 0.0,
            }
        )
    rows.append(
        {
            "tier": "total",
            "items": sum(r["items"] for r in plan["tiers"]),
            "remaining": plan["remaining_items"],
            "auto_labeled": auto["items"] if auto["kind"] == "written" else 0,
            "seconds_per_item": None,
            "seconds_source": None,
            "hours": plan["remaining_hours"],
            "hours_saved": saved,
            "hours_would_save": would,
            "assigned_to": " ".join(p["name"] for p in plan["assignment"]),
            "forecast_days": plan["forecast_days"],
            "forecast_days_if_auto_labeled": plan["forecast_days_if_auto_labeled"],
        }
    )
    return pd.DataFrame(rows)


def write_plan(
    plan: dict[str, Any], out_dir: str, storage_options: dict[str, Any] | None = None
) -> str:
    """Atomically write ``out_dir/plan.csv``; returns its full path."""
    text = csv_text(plan_table(plan), float_format="%.4g")
    return ProjectFS(out_dir, storage_options).write_text("plan.csv", text)

"""Planning numbers on a hand-computed example."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from difficulty.plan import (
    PlanSettings,
    assign,
    compute_plan,
    plan_table,
    seconds_per_tier,
    write_plan,
)
from difficulty.runrecord import GateRecord


def _table() -> pd.DataFrame:
    # 4 easy (2 labeled, timed 600 s and 1200 s), 3 medium (1 labeled, timed), 3 hard, 1 unscored
    rows = [
        ("e1", "easy", 0.05, "labeled", 600.0),
        ("e2", "easy", 0.10, "labeled", 1200.0),
        ("e3", "easy", 0.15, "unlabeled", np.nan),
        ("e4", "easy", 0.20, "unlabeled", np.nan),
        ("m1", "medium", 0.40, "labeled", 5000.0),
        ("m2", "medium", 0.50, "unlabeled", np.nan),
        ("m3", "medium", 0.60, "unlabeled", np.nan),
        ("h1", "hard", 0.80, "unlabeled", np.nan),
        ("h2", "hard", 0.90, "unlabeled", np.nan),
        ("h3", "hard", 0.95, "unlabeled", np.nan),
        ("x1", None, np.nan, "unlabeled", np.nan),
    ]
    return pd.DataFrame(rows, columns=["item_id", "tier", "score", "status", "annotation_seconds"])


SETTINGS = PlanSettings(
    team_size=2,
    hours_per_day=2.0,
    seconds_per_tier={"easy": 360.0, "medium": 1800.0, "hard": 3600.0},
    min_history=2,
    audit_share=0.1,
)


def test_rates_from_history_or_defaults() -> None:
    rates = seconds_per_tier(_table(), SETTINGS)
    assert rates["easy"] == {
        "seconds": 900.0,
        "source": "history",
        "timed_items": 2,
    }  # median(600, 1200)
    assert (
        rates["medium"]["seconds"] == 1800.0 and rates["medium"]["source"] == "default"
    )  # 1 timed < 2
    assert rates["hard"]["seconds"] == 3600.0 and rates["hard"]["source"] == "default"
    assert rates["unscored"]["seconds"] == 1800.0


def test_hand_computed_plan() -> None:
    plan = compute_plan(_table(), SETTINGS)
    by_tier = {r["tier"]: r for r in plan["tiers"]}
    # remaining: easy 2 × 900 s = 0.5 h; medium 2 × 1800 s = 1 h; hard 3 × 3600 s = 3 h; unscored 1 × 1800 s = 0.5 h
    assert by_tier["easy"]["remaining"] == 2 and by_tier["easy"]["hours"] == pytest.approx(0.5)
    assert by_tier["medium"]["hours"] == pytest.approx(1.0)
    assert by_tier["hard"]["hours"] == pytest.approx(3.0)
    assert by_tier["unscored"]["hours"] == pytest.approx(0.5)
    assert plan["remaining_items"] == 8
    assert plan["remaining_hours"] == pytest.approx(5.0)
    # no gate ran: no savings are claimed
    assert plan["auto_label"] == {"kind": None, "items": 0, "audit_items": 0, "hours_saved": 0.0}
    # team: 2 people × 2 h/day = 4 h/day
    assert plan["team_hours_per_day"] == pytest.approx(4.0)
    assert plan["forecast_days"] == pytest.approx(1.25)
    assert plan["forecast_days_if_auto_labeled"] is None
    assert plan["working_days"] == 2


def _gate(stage: str, selected: list[str], written: list[str], audit: list[str]) -> GateRecord:
    return GateRecord(
        run_id="g1",
        stage=stage,  # type: ignore[arg-type]
        epsilon=0.05,
        delta=0.1,
        audit_share=0.5,
        threshold=0.2,
        selected=selected,
        written=written,
        audit=audit,
    )


def test_written_items_leave_the_remaining_work_and_save_their_hours() -> None:
    gate = _gate("autolabel", ["e3", "e4"], ["e3", "e4"], ["e4"])
    plan = compute_plan(_table(), SETTINGS, gate)
    by_tier = {r["tier"]: r for r in plan["tiers"]}
    assert by_tier["easy"]["remaining"] == 0 and by_tier["easy"]["auto_labeled"] == 2
    assert plan["remaining_items"] == 6  # 8 unlabeled − 2 written
    # e4 still needs its audit (900 s); the 2 written saved 2 × 900 s minus that audit
    assert plan["audit_items"] == 1 and plan["audit_hours"] == pytest.approx(0.25)
    assert plan["remaining_hours"] == pytest.approx(5.0 - 0.5 + 0.25)
    assert plan["auto_label"]["kind"] == "written"
    assert plan["auto_label"]["hours_saved"] == pytest.approx(0.25)
    assert plan["forecast_days_if_auto_labeled"] is None
    csv = plan_table(plan)
    assert list(csv["tier"]) == ["easy", "medium", "hard", "unscored", "audit", "total"]
    assert csv.loc[csv["tier"] == "total", "hours_saved"].iloc[0] == pytest.approx(0.25)


def test_shadow_would_save_without_changing_the_remaining_work() -> None:
    gate = _gate("shadow", ["e3", "e4"], [], [])
    plan = compute_plan(_table(), SETTINGS, gate)
    assert plan["remaining_items"] == 8 and plan["remaining_hours"] == pytest.approx(5.0)
    # 2 would-be labels × 900 s, half of them (ceil) audited: 0.25 h would be saved
    assert plan["auto_label"] == {
        "kind": "would",
        "items": 2,
        "audit_items": 1,
        "hours_saved": pytest.approx(0.25),
    }
    assert plan["forecast_days_if_auto_labeled"] == pytest.approx((5.0 - 0.25) / 4.0)
    csv = plan_table(plan)
    total = csv[csv["tier"] == "total"].iloc[0]
    assert total["hours_saved"] == 0.0 and total["hours_would_save"] == pytest.approx(0.25)


def test_a_refused_gate_claims_nothing() -> None:
    gate = _gate("autolabel", [], [], []).model_copy(update={"threshold": None})
    plan = compute_plan(_table(), SETTINGS, gate)
    assert plan["auto_label"]["kind"] is None and plan["remaining_items"] == 8


def test_hard_items_go_to_the_most_experienced() -> None:
    plan = compute_plan(_table(), SETTINGS)
    people = {p["name"]: p for p in plan["assignment"]}
    assert list(people) == ["senior-1", "mid-2"]
    # hardest first, cut at half of the 5 h: h3, h2 (2 h) and h1 (mid-point 2.5 h) … the senior's share is [0, 2.5 h)
    assert (
        people["senior-1"]["hard"] == 2
        and people["senior-1"]["medium"] == 0
        and people["senior-1"]["easy"] == 0
    )
    assert (
        people["mid-2"]["hard"] == 1
        and people["mid-2"]["easy"] == 2
        and people["mid-2"]["unscored"] == 1
    )
    table = assign(
        _table()[_table()["status"] == "unlabeled"], seconds_per_tier(_table(), SETTINGS), SETTINGS
    )
    assert list(table["item_id"][:3]) == ["h3", "h2", "h1"]
    assert table["item_id"].iloc[-1] == "x1"  # unscored last
    assert list(table.loc[table["assignee"] == "senior-1", "item_id"]) == ["h3", "h2"]


def test_configured_annotators_by_name_are_most_experienced_first() -> None:
    s = PlanSettings.model_validate({"annotators": ["ann", "bo", "cy"]})
    team = s.team()
    assert [a.name for a in team] == ["ann", "bo", "cy"]
    assert [a.experience for a in team] == [3, 2, 1]
    explicit = PlanSettings.model_validate(
        {
            "annotators": [
                {"name": "new", "experience": 1},
                {"name": "lead", "experience": 5, "hours_per_day": 4},
            ]
        }
    )
    assert explicit.team()[0].name == "lead"


def test_generic_team_levels() -> None:
    names = [a.name for a in PlanSettings(team_size=5).team()]
    assert names == ["senior-1", "senior-2", "mid-3", "mid-4", "junior-5"]
    assert [a.name for a in PlanSettings(team_size=1).team()] == ["senior-1"]


def test_capacity_weights_the_blocks() -> None:
    df = pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(8)],
            "tier": ["medium"] * 8,
            "score": np.linspace(0.9, 0.4, 8),
            "status": ["unlabeled"] * 8,
            "annotation_seconds": [np.nan] * 8,
        }
    )
    s = PlanSettings.model_validate(
        {
            "annotators": [
                {"name": "full", "experience": 2, "hours_per_day": 6},
                {"name": "part", "experience": 1, "hours_per_day": 2},
            ]
        }
    )
    plan = compute_plan(df, s)
    people = {p["name"]: p for p in plan["assignment"]}
    assert people["full"]["items"] == 6 and people["part"]["items"] == 2
    assert plan["team_hours_per_day"] == 8.0


def test_settings_are_validated() -> None:
    with pytest.raises(ValidationError):
        PlanSettings(seconds_per_tier={"easy": 10.0, "medium": 20.0})
    with pytest.raises(ValidationError):
        PlanSettings(team_size=0)
    with pytest.raises(ValidationError):
        PlanSettings(audit_share=1.5)


def test_nothing_left_is_zero_days() -> None:
    df = _table().assign(status="labeled")
    plan = compute_plan(df, SETTINGS)
    assert plan["remaining_hours"] == 0 and plan["forecast_days"] == 0 and plan["working_days"] == 0


def test_plan_csv(tmp_path: Path) -> None:
    plan = compute_plan(_table(), SETTINGS)
    path = write_plan(plan, str(tmp_path))
    csv = pd.read_csv(path)
    assert list(csv["tier"]) == ["easy", "medium", "hard", "unscored", "total"]
    total = csv[csv["tier"] == "total"].iloc[0]
    assert total["hours"] == pytest.approx(5.0)
    assert total["forecast_days"] == pytest.approx(1.25)
    assert csv.loc[csv["tier"] == "easy", "hours_saved"].iloc[0] == 0.0
    assert "senior-1" in csv.loc[csv["tier"] == "hard", "assigned_to"].iloc[0]
    assert not math.isnan(plan_table(plan)["hours"].sum())

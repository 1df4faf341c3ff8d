"""Tiers from the combined score: quantiles, thresholds, ties, missing scores."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from difficulty.tiers import TierConfig, assign_tiers, tier_thresholds, tiers_from_thresholds


def test_quantile_tiers_split_by_share() -> None:
    score = np.arange(10) / 9.0
    tiers = assign_tiers(score, TierConfig(easy=0.3, hard=0.7))
    assert list(tiers) == ["easy"] * 3 + ["medium"] * 4 + ["hard"] * 3


def test_quantile_thresholds_are_absolute_scores() -> None:
    score = np.linspace(0.0, 1.0, 101)
    easy_max, hard_min = tier_thresholds(score, TierConfig(easy=0.2, hard=0.9))
    assert easy_max == pytest.approx(0.2) and hard_min == pytest.approx(0.9)


def test_threshold_mode_uses_score_values() -> None:
    score = np.array([0.05, 0.1, 0.5, 0.8, 0.95])
    tiers = assign_tiers(score, TierConfig(mode="thresholds", easy=0.1, hard=0.8))
    assert list(tiers) == ["easy", "easy", "medium", "hard", "hard"]
    assert tier_thresholds(score, TierConfig(mode="thresholds", easy=0.1, hard=0.8)) == (0.1, 0.8)


def test_ties_at_a_cut_go_to_the_outer_tier() -> None:
    score = np.array([0.1, 0.2, 0.3, 0.4] + [0.9] * 6)  # 60 % tied at the top
    tiers = assign_tiers(score, TierConfig(easy=0.2, hard=0.5))  # hard cut = 0.9 exactly
    assert list(tiers[:4]) == ["easy", "easy", "medium", "medium"]
    assert set(tiers[4:]) == {"hard"}  # not an empty hard tier


def test_coinciding_cuts_give_easy() -> None:
    assert list(tiers_from_thresholds(np.array([0.5, 0.6]), 0.5, 0.5)) == ["easy", "hard"]


def test_missing_scores_have_no_tier() -> None:
    score = np.array([np.nan, 0.0, 1.0, np.nan])
    tiers = assign_tiers(score)
    assert tiers[0] is None and tiers[3] is None
    assert list(tiers[1:3]) == ["easy", "hard"]
    assert all(t is None for t in assign_tiers(np.array([np.nan, np.nan])))


def test_config_is_validated() -> None:
    with pytest.raises(ValidationError):
        TierConfig(easy=0.8, hard=0.2)
    with pytest.raises(ValidationError):
        TierConfig(mode="percent")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        TierConfig(hard=1.5)

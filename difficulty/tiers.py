"""Difficulty tiers: ``easy``, ``medium``, ``hard`` from the combined score.

Two modes (:class:`TierConfig`):

* ``quantiles`` (default) — ``easy`` and ``hard`` are shares of the scored items: with
  ``easy=0.3, hard=0.7`` the 30 % lowest scores are easy, the 30 % highest hard.  The
  cut points become absolute score thresholds (``np.quantile`` of this run's scores,
  linear interpolation) that are stored with the run, so a later run scored against it
  as reference reuses the same thresholds and its tier counts can move.
* ``thresholds`` — ``easy`` and ``hard`` are combined-score values directly.

An item is ``easy`` when ``score ≤ easy_max``, else ``hard`` when ``score ≥ hard_min``,
else ``medium``: items tied at a cut go to the outer tier (a scorer that gives many items
the same extreme value — every image without a detection, say — puts them all in one
tier instead of leaving the tier empty), and ``easy`` wins where the two cuts coincide.
An item without a score (NaN) has no tier (``None``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

TIERS = ("easy", "medium", "hard")


class TierConfig(BaseModel):
    """Where the tiers are cut: shares of items (``quantiles``) or score values (``thresholds``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["quantiles", "thresholds"] = "quantiles"
    easy: float = Field(default=0.3, ge=0.0, le=1.0)
    hard: float = Field(default=0.7, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> TierConfig:
        if self.easy > self.hard:
            raise ValueError(f"tier cut points out of order: easy={self.easy} > hard={self.hard}")
        return self


def tier_thresholds(score: np.ndarray, config: TierConfig = TierConfig()) -> tuple[float, float]:
    """Absolute ``(easy_max, hard_min)`` score thresholds for ``score`` ``(N,)``.

    In ``quantiles`` mode from the finite scores (NaN ignored); ``(nan, nan)`` when there
    is no finite score.
    """
    if config.mode == "thresholds":
        return float(config.easy), float(config.hard)
    s = np.asarray(score, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return float("nan"), float("nan")
    easy_max, hard_min = np.quantile(s, [config.easy, config.hard])
    return float(easy_max), float(hard_min)


def tiers_from_thresholds(score: np.ndarray, easy_max: float, hard_min: float) -> np.ndarray:
    """``(N,)`` object array of ``"easy"``/``"medium"``/``"hard"``, ``None`` for NaN scores."""
    s = np.asarray(score, dtype=np.float64)
    out = np.full(s.shape, None, dtype=object)
    ok = np.isfinite(s)
    out[ok & (s <= easy_max)] = "easy"
    out[ok & (s > easy_max) & (s < hard_min)] = "medium"
    out[ok & (s > easy_max) & (s >= hard_min)] = "hard"
    return out


def assign_tiers(score: np.ndarray, config: TierConfig = TierConfig()) -> np.ndarray:
    """Tiers of ``score`` ``(N,)`` under ``config`` (see the module docstring)."""
    easy_max, hard_min = tier_thresholds(score, config)
    return tiers_from_thresholds(score, easy_max, hard_min)

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

**Calibrated tiers.**  Where labels allow calibrating the auto-label gate (rollout stages
``shadow`` and ``autolabel``), the easy tier's upper boundary *is* the calibrated
threshold on the same combined score (:func:`calibrated_cuts`): "easy" means "the model
labels it with error ≤ ε at confidence 1 − δ".  Medium and hard split the rest: in
``quantiles`` mode in the configured proportion (``easy=0.3, hard=0.7`` → 40 : 30), in
``thresholds`` mode at the configured hard score.

The combined score breaks ties between items with its continuous scorers
(:mod:`difficulty.combine`), so quantile cuts hold their shares; items tied in every scorer that counts
can still make a tier larger than its share, and :func:`largest_tie` says by how much.
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


def calibrated_cuts(
    score: np.ndarray, threshold: float, config: TierConfig = TierConfig()
) -> tuple[float, float]:
    """``(easy_max, hard_min)`` with the easy boundary at a calibrated ``threshold``.

    The items above ``threshold`` are split into medium and hard: in ``quantiles`` mode
    the hardest ``(1 − hard) / (1 − easy)`` of them are hard (the configured medium : hard
    proportion), in ``thresholds`` mode ``hard_min`` is the configured hard score (no
    medium when the threshold lies above it).
    """
    if config.mode == "thresholds":
        return float(threshold), float(config.hard)
    s = np.asarray(score, dtype=np.float64)
    rest = s[np.isfinite(s) & (s > threshold)]
    if rest.size == 0:
        return float(threshold), float(threshold)
    hard_share = (1.0 - config.hard) / (1.0 - config.easy) if config.easy < 1.0 else 0.0
    hard_min = float(np.quantile(rest, 1.0 - hard_share))
    return float(threshold), max(hard_min, float(threshold))


def largest_tie(score: np.ndarray) -> tuple[float | None, int]:
    """The score value shared by the most items, and how many share it (``(None, 0)``
    without finite scores)."""
    s = np.asarray(score, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None, 0
    values, counts = np.unique(s, return_counts=True)
    i = int(np.argmax(counts))
    return float(values[i]), int(counts[i])

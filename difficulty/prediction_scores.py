"""Difficulty from predictions the user brings: per-image scores from box confidences.

Every scorer here takes ``box_scores`` — a list with one ``np.ndarray`` ``(B_i,)`` per
image, the confidences in ``[0, 1]`` of that image's predicted boxes (after the label
map, so only boxes of project classes count) — and returns ``np.ndarray`` ``(N,)``
float64, **higher = harder**.  Box coordinates play no part.

An image with **no box** gets an explicit, documented value per scorer: either "fully
uncertain" (the detector found nothing it believes in, which on a project with objects
usually means a miss) or "nothing there" (zero objects expected).

=========================  =========================================================
scorer                      value per image
=========================  =========================================================
``box_least_confidence``    ``1 − max_b c_b``: the image's best detection is weak.
                            No box: ``1.0``.
``box_uncertain_share``     share of boxes with ``low ≤ c_b ≤ high`` (default
                            ``[0.2, 0.6]``). No box: ``1.0``.
``box_margin``              ``1 − max_b |2·c_b − 1|``: how close the most uncertain
                            box is to a coin flip (0.5 → 1, 0 or 1 → 0). No box: ``1.0``.
``box_expected_count``      ``Σ_b c_b``: the expected number of objects (more objects,
                            more work). No box: ``0.0``.
``box_count_variance``      ``Σ_b c_b (1 − c_b)``: variance of the object count when
                            every box is an independent Bernoulli(``c_b``) — how unsure
                            the detector is about *how many* objects there are.
                            No box: ``0.0``.
``box_count``               number of boxes with ``c_b ≥ min_score`` (default 0.25).
                            No box: ``0.0``.
=========================  =========================================================

Where a model gives per-box class probabilities (``box_probs``), the ``det_*`` strategies
of :mod:`difficulty.strategies` apply as well.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from difficulty.registry import register_scorer


def _per_image(box_scores: list[np.ndarray], empty: float, fn: object) -> np.ndarray:
    out = np.empty(len(box_scores), dtype=np.float64)
    for i, s in enumerate(box_scores):
        c = np.asarray(s, dtype=np.float64).reshape(-1)
        out[i] = empty if c.size == 0 else fn(c)  # type: ignore[operator]
    return out


@register_scorer(
    "box_least_confidence",
    needs={"box_scores"},
    description="1 − the highest box confidence of the image (no box: 1.0)",
    tags={"detection", "predictions"},
)
def box_least_confidence(box_scores: list[np.ndarray]) -> np.ndarray:
    """``1 − max_b c_b`` per image; ``1.0`` for an image with no box."""
    return _per_image(box_scores, 1.0, lambda c: 1.0 - float(c.max()))


class UncertainBand(BaseModel):
    """The confidence band ``[low, high]`` in which a box counts as uncertain."""

    model_config = ConfigDict(extra="forbid")

    low: float = Field(default=0.2, ge=0.0, le=1.0)
    high: float = Field(default=0.6, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> UncertainBand:
        if self.low > self.high:
            raise ValueError(f"uncertain band low={self.low} is above high={self.high}")
        return self


@register_scorer(
    "box_uncertain_share",
    needs={"box_scores"},
    description="share of boxes whose confidence lies in the uncertain band [low, high] (no box: 1.0)",
    settings=UncertainBand,
    tags={"detection", "predictions"},
)
def box_uncertain_share(
    box_scores: list[np.ndarray], low: float = 0.2, high: float = 0.6
) -> np.ndarray:
    """Share of an image's boxes with ``low ≤ c_b ≤ high``; ``1.0`` for no box."""
    return _per_image(box_scores, 1.0, lambda c: float(np.mean((c >= low) & (c <= high))))


@register_scorer(
    "box_margin",
    needs={"box_scores"},
    description="1 − the smallest distance of a box confidence from 0.5, doubled (no box: 1.0)",
    tags={"detection", "predictions"},
)
def box_margin(box_scores: list[np.ndarray]) -> np.ndarray:
    """``1 − min_b |2·c_b − 1|`` per image; ``1.0`` for no box."""
    return _per_image(box_scores, 1.0, lambda c: 1.0 - float(np.abs(2.0 * c - 1.0).min()))


@register_scorer(
    "box_expected_count",
    needs={"box_scores"},
    description="expected number of objects, Σ box confidences (no box: 0.0)",
    tags={"detection", "predictions"},
)
def box_expected_count(box_scores: list[np.ndarray]) -> np.ndarray:
    """``Σ_b c_b`` per image; ``0.0`` for no box."""
    return _per_image(box_scores, 0.0, lambda c: float(c.sum()))


@register_scorer(
    "box_count_variance",
    needs={"box_scores"},
    description="variance of the object count, Σ c(1 − c) over boxes (no box: 0.0)",
    tags={"detection", "predictions"},
)
def box_count_variance(box_scores: list[np.ndarray]) -> np.ndarray:
    """``Σ_b c_b (1 − c_b)`` per image (Poisson-binomial count variance); ``0.0`` for no box."""
    return _per_image(box_scores, 0.0, lambda c: float((c * (1.0 - c)).sum()))


class MinScore(BaseModel):
    """Boxes below ``min_score`` are not counted."""

    model_config = ConfigDict(extra="forbid")

    min_score: float = Field(default=0.25, ge=0.0, le=1.0)


@register_scorer(
    "box_count",
    needs={"box_scores"},
    description="number of boxes with confidence ≥ min_score (no box: 0.0)",
    settings=MinScore,
    tags={"detection", "predictions"},
)
def box_count(box_scores: list[np.ndarray], min_score: float = 0.25) -> np.ndarray:
    """Number of boxes with ``c_b ≥ min_score`` per image; ``0.0`` for no box."""
    return _per_image(box_scores, 0.0, lambda c: float((c >= min_score).sum()))

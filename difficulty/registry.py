"""The scorer registry: every difficulty scorer and query strategy, by name.

A scorer is a plain function from arrays to one float per item, **higher = harder / more
informative**.  It declares what it needs, so an orchestrator can feed it without
``isinstance`` special cases:

=================  ==================================================================
need               what the orchestrator passes (keyword argument of the same name)
=================  ==================================================================
``images``         ``torch.Tensor`` ``(N, H, W)`` float32 grayscale in ``[0, 1]``
``probs``          ``np.ndarray`` ``(N, C)`` class probabilities (rows sum to 1)
``committee``      ``np.ndarray`` ``(M, N, C)`` probabilities of ``M`` committee members
``features``       ``np.ndarray`` ``(N, D)`` penultimate-layer features
``predicted_loss`` ``np.ndarray`` ``(N,)`` output of a loss-prediction module
``box_scores``     ``list[np.ndarray]`` per item, the confidences of its predicted boxes
``box_probs``      ``list[np.ndarray]`` per item, ``(B_i, C)`` class probabilities per box
``box_committee``  ``list[np.ndarray]`` per item, ``(M, B_i, C)`` committee probabilities per box
``box_features``   ``list[np.ndarray]`` per item, ``(B_i, D)`` classification-layer inputs per box
``rng``            ``np.random.Generator`` (for ``random``)
``n``              ``int``, the number of items (for scorers that read no array, ``random``)
=================  ==================================================================

Extra settings are keyword arguments validated by the scorer's own small pydantic
model (``ScorerSpec.settings``), configured under the scorer's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from connectors.registry import Registry

NEEDS = frozenset(
    {
        "images",
        "probs",
        "committee",
        "features",
        "predicted_loss",
        "box_scores",
        "box_probs",
        "box_committee",
        "box_features",
        "rng",
        "n",
    }
)


class NoSettings(BaseModel):
    pass


@dataclass(frozen=True)
class ScorerSpec:
    name: str
    fn: Callable[..., Any]
    needs: frozenset[str]
    description: str
    settings: type[BaseModel] = NoSettings
    tags: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        unknown = self.needs - NEEDS
        if unknown:
            raise ValueError(
                f"scorer {self.name!r} declares unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}"
            )


SCORERS: Registry[ScorerSpec] = Registry("scorer")


def register_scorer(
    name: str,
    *,
    needs: set[str] | frozenset[str],
    description: str,
    settings: type[BaseModel] = NoSettings,
    tags: set[str] | frozenset[str] = frozenset(),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as scorer ``name`` (duplicates are refused)."""

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        SCORERS.add(
            name, ScorerSpec(name, fn, frozenset(needs), description, settings, frozenset(tags))
        )
        return fn

    return decorator

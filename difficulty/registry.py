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

Tags say what else a scorer is; the name lists of the query strategies are derived
from them (:func:`scorer_names`), never kept by hand:

=================  ==================================================================
tag                meaning
=================  ==================================================================
``strategy``       a query strategy (``labeltriage select``, the active-learning cycle)
``batch``          a batch strategy: the batch is chosen at once (:mod:`difficulty.hybrid`)
``detection``      works on per-box outputs of a detector
``classification`` works on class probabilities of a classifier
``select``         ``labeltriage select`` accepts it although it is no query strategy
``difficulty``     a difficulty scorer of ``labeltriage score`` (no extra meaning)
=================  ==================================================================

A detection strategy that is the per-box form of a classification strategy names it in
``detection_of`` (``det_margin`` → ``margin``), so ``--strategy margin`` on a detector
runs it.

The registry is complete on its first read, whatever was imported before: it imports
:data:`SCORER_MODULES` and the plugins (:mod:`connectors.plugins`) first.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from connectors.plugins import load_plugins
from connectors.registry import Registry

SCORER_MODULES = (
    "difficulty.fourier",
    "difficulty.strategies",
    "difficulty.prediction_scores",
    "difficulty.hybrid",
)
"""The package's modules whose import registers scorers."""

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
    detection_of: str | None = None

    def __post_init__(self) -> None:
        unknown = self.needs - NEEDS
        if unknown:
            raise ValueError(
                f"scorer {self.name!r} declares unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}"
            )


def load_scorers() -> None:
    """Import every module that registers scorers, and the plugins (importing again is free)."""
    for name in SCORER_MODULES:
        importlib.import_module(name)
    load_plugins()


SCORERS: Registry[ScorerSpec] = Registry("scorer", load_scorers)


def register_scorer(
    name: str,
    *,
    needs: set[str] | frozenset[str],
    description: str,
    settings: type[BaseModel] = NoSettings,
    tags: set[str] | frozenset[str] = frozenset(),
    detection_of: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as scorer ``name`` (duplicates are refused)."""

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = ScorerSpec(
            name, fn, frozenset(needs), description, settings, frozenset(tags), detection_of
        )
        SCORERS.add(name, spec)
        return fn

    return decorator


def scorer_names(*tags: str, without: Iterable[str] = ()) -> tuple[str, ...]:
    """Names of the scorers tagged with every one of ``tags`` and none of ``without``,
    in the order they were registered."""
    want, refuse = set(tags), set(without)
    return tuple(
        name
        for name in SCORERS.in_order()
        if want <= SCORERS[name].tags and not refuse & SCORERS[name].tags
    )

"""Query strategies of the active-learning cycle, as plain functions.

Every function maps arrays to ``np.ndarray`` float64 ``(N,)``, finite, **higher = more
informative** (the item to label first).  They are registered in
:data:`difficulty.registry.SCORERS` with what they need.

Classification (``probs`` ``(N, C)`` rows summing to 1):

=====================  =================================================================
``random``             uniform draws from ``rng`` (needs ``rng`` and ``n``)
``least_confidence``   ``1 − max_c p_c``
``margin``             ``1 − (p_(1) − p_(2))``, one minus the gap of the two best classes
``entropy``            ``−Σ_c p_c log p_c``
``vote_entropy``       entropy of the committee's *hard* votes (share of members whose
                       arg-max is ``c``), from ``committee`` ``(M, N, C)``
``consensus_entropy``  entropy of the committee's *mean* probabilities (soft)
``egl``                expected gradient length at the last layer, in closed form (below)
``learning_loss``      the loss-prediction module's output (also registered as
                       ``predicted_loss``, the difficulty scorer of the same function)
=====================  =================================================================

**The committee** ``(M, N, C)`` comes from :func:`difficulty.inference.infer` with
``committee=M`` and is built in one of two ways, chosen when the model is trained
(``committee_kind``, ``labeltriage train --committee-kind``; :mod:`difficulty.committee`):

* ``dropout`` (default) — MC dropout (Gal & Ghahramani 2016): ``M`` forward passes of the
  one trained model with its dropout layer active (classification: dropout before the
  last FC; detection: dropout on the classification head's input).  One trained model, so
  the committee costs ``M`` cheap passes rather than ``M`` trainings;
* ``bootstrap`` (classification) — query by bagging (Abe & Mamitsuka 1998): after the
  main training, each of ``M`` members starts from the trained classifier and trains a
  short schedule (5 epochs by default, cross-entropy, the main learning rate then a tenth
  of it for the last epoch) on its own bootstrap resample of the training items (``n``
  drawn with replacement, seeded by ``(seed, member)``).  The members are stored in the
  checkpoint; when it has them, ``committee=M`` uses its first ``M`` members (all of them
  if it has fewer) instead of MC dropout.  Costs ``M`` short trainings, ``M`` copies of
  the model on disk and ``M`` full forward passes per item.

**EGL in closed form.**  For a softmax cross-entropy last layer ``z = W h + b``, the
gradient for label ``y`` is ``∂L/∂W = (p − e_y) ⊗ h`` and ``∂L/∂b = p − e_y``, so its norm
is ``‖p − e_y‖ · sqrt(‖h‖² + 1)`` (``‖h‖`` alone without a bias), and the expected length
over the model's own label distribution is ``Σ_y p_y ‖p − e_y‖ · sqrt(‖h‖² + 1)`` with
``‖p − e_y‖² = Σ_c p_c² − 2 p_y + 1``: one forward pass, no autograd.

Detection (``box_probs``: per image an array ``(B_i, C)``; ``C`` includes the background
class, so "is this box an object at all" counts as uncertainty):  the detection variants
are registered as ``det_<name>``; each box gets the classification value and the boxes of
an image are reduced by ``reduction`` (``max`` — the image is as informative as its most
informative box, the default; ``mean``; ``sum`` — favours images with many uncertain
boxes).  **An image with no box** gets ``empty``: ``"max"`` (default) is the largest value
the measure can take for ``C`` classes — with the low score threshold used for
uncertainty, a detector that finds no hypothesis at all in an image knows nothing about it
and a miss is the costliest detection error, so such an image is queried first;
``"zero"`` treats it as confidently empty; a number sets the value.  For ``det_egl``,
whose maximum depends on the features, ``"max"`` is the largest value among the images
of the same call (``0`` when every image is empty).  :func:`strategy_for_task` maps a
strategy name to the variant for the task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from connectors.errors import UsageError
from difficulty.registry import SCORERS, ScorerSpec, register_scorer, scorer_names

_EPS = 1e-12


def _entropy_rows(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(np.maximum(p, _EPS)), 0.0)
    return np.maximum(terms.sum(axis=-1), 0.0)


# -- classification -------------------------------------------------------------------


@register_scorer(
    "random",
    needs={"rng", "n"},
    description="uniform random values (the baseline)",
    tags={"strategy"},
)
def random(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` uniform draws in ``[0, 1)`` from ``rng``: a random ranking."""
    return rng.random(int(n)).astype(np.float64)


@register_scorer(
    "least_confidence",
    needs={"probs"},
    description="1 − the top class probability",
    tags={"strategy", "classification"},
)
def least_confidence(probs: np.ndarray) -> np.ndarray:
    """``1 − max_c p_c`` per row of ``probs`` ``(N, C)``; in ``[0, 1 − 1/C]``."""
    p = np.asarray(probs, dtype=np.float64)
    return 1.0 - p.max(axis=1)


@register_scorer(
    "margin",
    needs={"probs"},
    description="1 − (best − second best class probability)",
    tags={"strategy", "classification"},
)
def margin(probs: np.ndarray) -> np.ndarray:
    """``1 − (p_(1) − p_(2))`` per row of ``probs`` ``(N, C)``; in ``[0, 1]``."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[1] < 2:
        return np.zeros(p.shape[0])
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


@register_scorer(
    "entropy",
    needs={"probs"},
    description="Shannon entropy of the class probabilities",
    tags={"strategy", "classification"},
)
def entropy(probs: np.ndarray) -> np.ndarray:
    """``−Σ_c p_c log p_c`` (nats) per row of ``probs`` ``(N, C)``; in ``[0, log C]``."""
    return _entropy_rows(probs)


def _vote_shares(committee: np.ndarray) -> np.ndarray:
    """``(M, N, C)`` member probabilities → ``(N, C)`` share of hard votes per class."""
    c = np.asarray(committee, dtype=np.float64)
    m, n, k = c.shape
    votes = c.argmax(axis=2)  # (M, N)
    shares = np.zeros((n, k))
    for member in votes:
        shares[np.arange(n), member] += 1.0
    return shares / max(m, 1)


@register_scorer(
    "vote_entropy",
    needs={"committee"},
    description="entropy of the committee's hard votes",
    tags={"strategy", "classification", "committee"},
)
def vote_entropy(committee: np.ndarray) -> np.ndarray:
    """Entropy of the vote shares of ``committee`` ``(M, N, C)``; in ``[0, log min(M, C)]``."""
    return _entropy_rows(_vote_shares(committee))


@register_scorer(
    "consensus_entropy",
    needs={"committee"},
    description="entropy of the committee's mean probabilities",
    tags={"strategy", "classification", "committee"},
)
def consensus_entropy(committee: np.ndarray) -> np.ndarray:
    """Entropy of the mean over members of ``committee`` ``(M, N, C)``; in ``[0, log C]``."""
    return _entropy_rows(np.asarray(committee, dtype=np.float64).mean(axis=0))


class EGLSettings(BaseModel):
    """``bias``: the last layer has a bias (it does in every model here)."""

    model_config = ConfigDict(extra="forbid")

    bias: bool = True


def _egl(p: np.ndarray, h: np.ndarray, bias: bool) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    sq = (p * p).sum(axis=1, keepdims=True)  # (N, 1)
    dist = np.sqrt(np.maximum(sq - 2.0 * p + 1.0, 0.0))  # ‖p − e_y‖ for every y, (N, C)
    h_norm = np.sqrt((h * h).sum(axis=1) + (1.0 if bias else 0.0))
    return (p * dist).sum(axis=1) * h_norm


@register_scorer(
    "egl",
    needs={"probs", "features"},
    description="expected gradient length at the last layer (closed form)",
    settings=EGLSettings,
    tags={"strategy", "classification"},
)
def egl(probs: np.ndarray, features: np.ndarray, bias: bool = True) -> np.ndarray:
    """``Σ_y p_y ‖p − e_y‖ · sqrt(‖h‖² + 1)`` with ``probs`` ``(N, C)``, ``features`` ``(N, D)``.

    ``features`` are the inputs ``h`` of the last linear layer; ``bias=False`` drops the
    ``+ 1`` for a layer without bias.
    """
    return _egl(probs, features, bias)


def _predicted(predicted_loss: np.ndarray) -> np.ndarray:
    """The loss-prediction module's output ``(N,)`` as float64 (higher = larger loss)."""
    return np.asarray(predicted_loss, dtype=np.float64).reshape(-1)


register_scorer(
    "learning_loss",
    needs={"predicted_loss"},
    description="loss predicted by the loss-prediction module",
    tags={"strategy", "model"},
)(_predicted)
register_scorer(
    "predicted_loss",
    needs={"predicted_loss"},
    description="loss predicted by the loss-prediction module (Yoo & Kweon 2019)",
    tags={"difficulty", "model", "select"},
)(_predicted)
learning_loss = _predicted
predicted_loss = _predicted


# -- detection ------------------------------------------------------------------------


class BoxAggregation(BaseModel):
    """How per-box values become one value per image.

    ``reduction``: ``max`` (default), ``mean`` or ``sum`` over the image's boxes.
    ``empty``: the value of an image with no box — ``"max"`` (the measure's largest
    value, default), ``"zero"``, or a number.
    """

    model_config = ConfigDict(extra="forbid")

    reduction: Literal["max", "mean", "sum"] = "max"
    empty: Literal["max", "zero"] | float = "max"


def _reduce(
    values: list[np.ndarray], reduction: str, empty: str | float, measure_max: float | None
) -> np.ndarray:
    out = np.empty(len(values), dtype=np.float64)
    is_empty = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if v.size == 0:
            is_empty[i] = True
            continue
        out[i] = v.max() if reduction == "max" else v.mean() if reduction == "mean" else v.sum()
    if is_empty.any():
        if empty == "zero":
            fill = 0.0
        elif empty == "max":
            if measure_max is not None:
                fill = measure_max
            else:
                fill = float(out[~is_empty].max()) if (~is_empty).any() else 0.0
        else:
            fill = float(empty)
        out[is_empty] = fill
    return out


def _num_classes(arrays: list[np.ndarray]) -> int:
    for a in arrays:
        if a.ndim >= 2 and a.shape[-1] > 0:
            return int(a.shape[-1])
    return 1


def _per_box(
    box_arrays: list[np.ndarray],
    fn: Callable[[np.ndarray], np.ndarray],
    measure_max: Callable[[int], float] | None,
    reduction: str,
    empty: str | float,
) -> np.ndarray:
    arrays = [np.asarray(a, dtype=np.float64) for a in box_arrays]
    values = [fn(a) if a.size else np.zeros(0) for a in arrays]
    top = measure_max(_num_classes(arrays)) if measure_max is not None else None
    return _reduce(values, reduction, empty, top)


def _per_box_committee(
    box_committee: list[np.ndarray],
    fn: Callable[[np.ndarray], np.ndarray],
    measure_max: Callable[[list[np.ndarray]], float],
    reduction: str,
    empty: str | float,
) -> np.ndarray:
    """``fn`` of each image's committee ``(M, B_i, C)`` (``(B_i,)`` values), reduced per image."""
    arrays = [np.asarray(c, dtype=np.float64) for c in box_committee]
    values = [fn(a) if a.ndim == 3 and a.shape[1] > 0 else np.zeros(0) for a in arrays]
    return _reduce(values, reduction, empty, measure_max(arrays))


def _vote_entropy_max(arrays: list[np.ndarray]) -> float:
    m = next((a.shape[0] for a in arrays if a.ndim == 3 and a.shape[1] > 0), 1)
    return float(np.log(max(1, min(m, _num_classes(arrays)))))


_DET_TAGS = {"strategy", "detection", "model"}


@register_scorer(
    "det_least_confidence",
    needs={"box_probs"},
    description="least confidence per box, reduced per image",
    settings=BoxAggregation,
    tags=_DET_TAGS,
    detection_of="least_confidence",
)
def det_least_confidence(
    box_probs: list[np.ndarray], reduction: str = "max", empty: str | float = "max"
) -> np.ndarray:
    """:func:`least_confidence` of each box ``(B_i, C)``, reduced per image."""
    return _per_box(box_probs, least_confidence, lambda c: 1.0 - 1.0 / c, reduction, empty)


@register_scorer(
    "det_margin",
    needs={"box_probs"},
    description="margin per box, reduced per image",
    settings=BoxAggregation,
    tags=_DET_TAGS,
    detection_of="margin",
)
def det_margin(
    box_probs: list[np.ndarray], reduction: str = "max", empty: str | float = "max"
) -> np.ndarray:
    """:func:`margin` of each box ``(B_i, C)``, reduced per image."""
    return _per_box(box_probs, margin, lambda c: 1.0, reduction, empty)


@register_scorer(
    "det_entropy",
    needs={"box_probs"},
    description="class entropy per box, reduced per image",
    settings=BoxAggregation,
    tags=_DET_TAGS,
    detection_of="entropy",
)
def det_entropy(
    box_probs: list[np.ndarray], reduction: str = "max", empty: str | float = "max"
) -> np.ndarray:
    """:func:`entropy` of each box ``(B_i, C)``, reduced per image."""
    return _per_box(box_probs, _entropy_rows, lambda c: float(np.log(c)), reduction, empty)


@register_scorer(
    "det_vote_entropy",
    needs={"box_committee"},
    description="vote entropy per box, reduced per image",
    settings=BoxAggregation,
    tags=_DET_TAGS | {"committee"},
    detection_of="vote_entropy",
)
def det_vote_entropy(
    box_committee: list[np.ndarray], reduction: str = "max", empty: str | float = "max"
) -> np.ndarray:
    """:func:`vote_entropy` per box; ``box_committee`` per image ``(M, B_i, C)``."""
    return _per_box_committee(box_committee, vote_entropy, _vote_entropy_max, reduction, empty)


@register_scorer(
    "det_consensus_entropy",
    needs={"box_committee"},
    description="consensus entropy per box, reduced per image",
    settings=BoxAggregation,
    tags=_DET_TAGS | {"committee"},
    detection_of="consensus_entropy",
)
def det_consensus_entropy(
    box_committee: list[np.ndarray], reduction: str = "max", empty: str | float = "max"
) -> np.ndarray:
    """:func:`consensus_entropy` per box; ``box_committee`` per image ``(M, B_i, C)``."""
    return _per_box_committee(
        box_committee,
        consensus_entropy,
        lambda arrays: float(np.log(_num_classes(arrays))),
        reduction,
        empty,
    )


class DetEGLSettings(BoxAggregation):
    bias: bool = True


@register_scorer(
    "det_egl",
    needs={"box_probs", "box_features"},
    description="expected gradient length per box at the classification layer, reduced per image",
    settings=DetEGLSettings,
    tags=_DET_TAGS,
    detection_of="egl",
)
def det_egl(
    box_probs: list[np.ndarray],
    box_features: list[np.ndarray],
    reduction: str = "max",
    empty: str | float = "max",
    bias: bool = True,
) -> np.ndarray:
    """:func:`egl` per box: ``box_probs`` ``(B_i, C)`` and ``box_features`` ``(B_i, D)``.

    ``box_features`` are the inputs of the detector's classification layer at each box
    (Faster R-CNN: the box head's output; SSDlite: the input of the last 1×1 conv at
    the box's anchor location).
    """
    values = [
        _egl(p, h, bias) if np.asarray(p).size else np.zeros(0)
        for p, h in zip(box_probs, box_features, strict=True)
    ]
    return _reduce(values, reduction, empty, None)


def query_strategies() -> tuple[str, ...]:
    """The query strategies: scorers tagged ``strategy`` that are neither batch strategies
    nor the detection form of another (registration order)."""
    return tuple(n for n in scorer_names("strategy", without={"batch"}) if not _is_variant(n))


def _is_variant(name: str) -> bool:
    return SCORERS[name].detection_of is not None


def select_strategies() -> tuple[str, ...]:
    """What ``labeltriage select --strategy`` ranks by: the query strategies and the
    scorers tagged ``select`` (``predicted_loss``)."""
    extra = [n for n in scorer_names("select") if n not in query_strategies()]
    return (*query_strategies(), *extra)


def detection_variants() -> dict[str, str]:
    """Strategy name → its detection form (``random`` and ``learning_loss`` serve both tasks)."""
    return {str(SCORERS[n].detection_of): n for n in scorer_names("strategy") if _is_variant(n)}


_DERIVED: dict[str, Callable[[], Any]] = {
    "STRATEGIES": query_strategies,
    "SELECT_STRATEGIES": select_strategies,
    "DETECTION_VARIANTS": detection_variants,
}


def __getattr__(name: str) -> Any:
    """``STRATEGIES``, ``SELECT_STRATEGIES``, ``DETECTION_VARIANTS``: derived from the
    registry's tags when read (so a plugin's strategy is in them)."""
    if name in _DERIVED:
        return _DERIVED[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def strategy_for_task(name: str, task: str) -> ScorerSpec:
    """The registered scorer for strategy ``name`` on ``task`` (``classification``/``detection``).

    Raises :class:`~connectors.errors.UsageError` for an unknown name.
    """
    if name not in SCORERS:
        choices = ", ".join(query_strategies())
        raise UsageError(f"unknown strategy {name!r}; choose one of: {choices}")
    variants = detection_variants()
    if task == "detection" and name in variants:
        return SCORERS[variants[name]]
    return SCORERS[name]

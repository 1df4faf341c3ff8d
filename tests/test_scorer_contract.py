"""The contract every registered scorer keeps, checked for each one in the registry.

A scorer added to :data:`difficulty.registry.SCORERS` (in the package or by a plugin, see
README "Extending") is picked up here without an edit: fed synthetic inputs for exactly
what it declares in ``needs``, it returns one finite float per item, the same values
for the same inputs, and its settings model accepts no settings (defaults only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difficulty.registry import NEEDS, SCORERS

N, C, M, D = 6, 4, 3, 5
BOXES = [3, 0, 1, 4, 2, 5]


def _probs(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.random((*shape, C)) + 1e-3
    return x / x.sum(axis=-1, keepdims=True)


def inputs(seed: int = 0) -> dict[str, object]:
    """One synthetic value for every need (see :data:`difficulty.registry.NEEDS`)."""
    rng = np.random.default_rng(seed)
    out: dict[str, object] = {
        "images": torch.from_numpy(rng.random((N, 32, 32), dtype=np.float32)),
        "probs": _probs(rng, N),
        "committee": _probs(rng, M, N),
        "features": rng.normal(size=(N, D)),
        "predicted_loss": rng.normal(size=N),
        "box_scores": [rng.random(b) for b in BOXES],
        "box_probs": [_probs(rng, b) for b in BOXES],
        "box_committee": [_probs(rng, M, b) for b in BOXES],
        "box_features": [rng.normal(size=(b, D)) for b in BOXES],
        "rng": np.random.default_rng(seed),
        "n": N,
    }
    assert set(out) == NEEDS
    return out


def run(name: str, seed: int = 0) -> np.ndarray:
    spec = SCORERS[name]
    given = inputs(seed)
    settings = spec.settings().model_dump()
    return np.asarray(spec.fn(**{k: given[k] for k in spec.needs}, **settings))


@pytest.mark.parametrize("name", list(SCORERS))
def test_scorer_gives_one_finite_float_per_item(name: str) -> None:
    spec = SCORERS[name]
    assert spec.name == name and spec.description and spec.needs <= NEEDS
    values = run(name)
    assert values.shape == (N,), values.shape
    assert np.issubdtype(values.dtype, np.floating)
    assert np.all(np.isfinite(values)), values


@pytest.mark.parametrize("name", list(SCORERS))
def test_scorer_is_deterministic(name: str) -> None:
    np.testing.assert_array_equal(run(name), run(name))

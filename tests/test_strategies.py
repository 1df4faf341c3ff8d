"""Query strategies: closed forms against autograd, hand-made committees, and one contract for all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.errors import UsageError
from difficulty import strategies as S
from difficulty.diversity import kcenter_greedy, select
from difficulty.registry import SCORERS


def _probs(rng: np.random.Generator, n: int, c: int, sharp: float = 3.0) -> np.ndarray:
    z = rng.normal(size=(n, c)) * sharp
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


# -- EGL ------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_egl_closed_form_equals_expected_autograd_gradient_norm(bias: bool) -> None:
    torch.manual_seed(0)
    n, d, c = 7, 5, 4
    layer = torch.nn.Linear(d, c, bias=bias).double()
    h = torch.randn(n, d, dtype=torch.float64) * 2.0
    p = F.softmax(layer(h), dim=1).detach()
    expected = np.zeros(n)
    for i in range(n):
        for y in range(c):
            layer.zero_grad()
            F.cross_entropy(layer(h[i : i + 1]), torch.tensor([y])).backward()
            sq = layer.weight.grad.pow(2).sum()
            if bias:
                sq = sq + layer.bias.grad.pow(2).sum()
            expected[i] += float(p[i, y]) * float(sq.sqrt())
    got = S.egl(p.numpy(), h.numpy(), bias=bias)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_det_egl_reduces_per_box_egl() -> None:
    rng = np.random.default_rng(1)
    p = [_probs(rng, 3, 4), _probs(rng, 2, 4)]
    h = [rng.normal(size=(3, 6)), rng.normal(size=(2, 6))]
    per_box = [S.egl(a, b) for a, b in zip(p, h, strict=True)]
    np.testing.assert_allclose(S.det_egl(p, h, reduction="sum"), [v.sum() for v in per_box])
    np.testing.assert_allclose(S.det_egl(p, h, reduction="max"), [v.max() for v in per_box])


# -- committees -----------------------------------------------------------------------


def test_vote_entropy_on_hand_made_committee() -> None:
    one = np.eye(3)
    # members x items x classes: item 0 unanimous, item 1 split 2:1, item 2 three-way split
    committee = np.stack(
        [
            np.stack([one[0], one[0], one[0]]),
            np.stack([0.6 * one[0] + 0.4 * one[1], one[0], one[1]]),
            np.stack([one[0], 0.3 * one[0] + 0.7 * one[1], one[2]]),
        ]
    )
    got = S.vote_entropy(committee)
    two_one = -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))
    np.testing.assert_allclose(got, [0.0, two_one, np.log(3)], atol=1e-12)


def test_consensus_entropy_is_entropy_of_mean_and_differs_from_votes() -> None:
    # both members vote class 0, but softly disagree: hard votes see no disagreement
    committee = np.array([[[0.55, 0.45]], [[0.9, 0.1]]])
    mean = np.array([0.725, 0.275])
    np.testing.assert_allclose(S.consensus_entropy(committee), [-(mean * np.log(mean)).sum()])
    np.testing.assert_allclose(S.vote_entropy(committee), [0.0])


def test_hand_made_uncertainty_values() -> None:
    p = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(S.least_confidence(p), [0.3, 2 / 3])
    np.testing.assert_allclose(S.margin(p), [0.5, 1.0])
    np.testing.assert_allclose(S.entropy(p), [-(p[0] * np.log(p[0])).sum(), np.log(3)])


# -- the contract every strategy keeps ---------------------------------------------------

CLASSIFICATION = list(S.SELECT_STRATEGIES)
DETECTION = list(S.DETECTION_VARIANTS.values())


def _classification_inputs(n: int, c: int, m: int = 5, seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    return {
        "probs": _probs(rng, n, c),
        "committee": np.stack([_probs(rng, n, c) for _ in range(m)]),
        "features": rng.normal(size=(n, 8)),
        "predicted_loss": rng.normal(size=n),
        "rng": np.random.default_rng(seed),
        "n": n,
    }


def _detection_inputs(seed: int = 0, c: int = 4, m: int = 4) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    sizes = [3, 0, 1, 5]
    return {
        "box_probs": [_probs(rng, b, c) for b in sizes],
        "box_committee": [
            np.stack([_probs(rng, b, c) for _ in range(m)]) if b else np.zeros((m, 0, c))
            for b in sizes
        ],
        "box_features": [rng.normal(size=(b, 6)) for b in sizes],
    }


def _call(name: str, inputs: dict[str, object], **kw: object) -> np.ndarray:
    spec = SCORERS[name]
    return spec.fn(**{k: inputs[k] for k in spec.needs}, **kw)


@pytest.mark.parametrize("name", CLASSIFICATION)
@pytest.mark.parametrize("n", [1, 17])
def test_classification_strategy_contract(name: str, n: int) -> None:
    values = _call(name, _classification_inputs(n, 5))
    assert isinstance(values, np.ndarray) and values.dtype == np.float64
    assert values.shape == (n,)
    assert np.all(np.isfinite(values))


@pytest.mark.parametrize("name", DETECTION)
@pytest.mark.parametrize("reduction", ["max", "mean", "sum"])
def test_detection_strategy_contract(name: str, reduction: str) -> None:
    values = _call(name, _detection_inputs(), reduction=reduction)
    assert values.dtype == np.float64 and values.shape == (4,)
    assert np.all(np.isfinite(values))


@pytest.mark.parametrize("name", ["least_confidence", "margin", "entropy", "egl"])
def test_uncertain_item_ranks_above_confident_one(name: str) -> None:
    probs = np.array([[0.98, 0.01, 0.01], [0.34, 0.33, 0.33]])
    inputs = {"probs": probs, "features": np.ones((2, 4))}
    values = _call(name, inputs)
    assert values[1] > values[0]


@pytest.mark.parametrize("name", ["vote_entropy", "consensus_entropy"])
def test_disagreeing_committee_ranks_above_agreeing_one(name: str) -> None:
    agree = np.array([[0.9, 0.05, 0.05]] * 4)
    disagree = np.array(
        [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9], [0.9, 0.05, 0.05]]
    )
    committee = np.stack([agree, disagree], axis=1)  # (M=4, N=2, C=3)
    values = _call(name, {"committee": committee})
    assert values[1] > values[0]


def test_learning_loss_ranks_by_predicted_loss_and_random_is_seeded() -> None:
    np.testing.assert_array_equal(S.learning_loss(np.array([0.1, 3.0, -1.0])), [0.1, 3.0, -1.0])
    a = S.random(np.random.default_rng(3), 10)
    b = S.random(np.random.default_rng(3), 10)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0.0 and a.max() < 1.0
    assert SCORERS["predicted_loss"].fn is SCORERS["learning_loss"].fn


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 20),
    c=st.integers(2, 8),
    sharp=st.floats(0.0, 30.0),
    seed=st.integers(0, 2**16),
)
def test_uncertainty_values_stay_in_their_ranges(n: int, c: int, sharp: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = _probs(rng, n, c, sharp)
    for fn, top in ((S.least_confidence, 1 - 1 / c), (S.margin, 1.0), (S.entropy, np.log(c))):
        v = fn(p)
        assert np.all(np.isfinite(v)) and np.all(v >= -1e-12) and np.all(v <= top + 1e-9)
    committee = np.stack([_probs(rng, n, c, sharp) for _ in range(3)])
    assert np.all(S.vote_entropy(committee) <= np.log(3) + 1e-9)
    assert np.all(S.consensus_entropy(committee) <= np.log(c) + 1e-9)


# -- detection: reduction and the empty image ---------------------------------------------


def test_detection_reductions_on_hand_made_boxes() -> None:
    boxes = [np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([[0.8, 0.2]])]
    lc = [np.array([0.5, 0.0]), np.array([0.2])]
    np.testing.assert_allclose(S.det_least_confidence(boxes, reduction="max"), [0.5, 0.2])
    np.testing.assert_allclose(S.det_least_confidence(boxes, reduction="mean"), [lc[0].mean(), 0.2])
    np.testing.assert_allclose(S.det_least_confidence(boxes, reduction="sum"), [0.5, 0.2])


def test_image_without_boxes_gets_the_configured_value() -> None:
    boxes = [np.array([[0.9, 0.05, 0.05]]), np.zeros((0, 3))]
    assert S.det_entropy(boxes)[1] == pytest.approx(np.log(3))  # default "max": maximally uncertain
    assert S.det_least_confidence(boxes)[1] == pytest.approx(2 / 3)
    assert S.det_entropy(boxes, empty="zero")[1] == 0.0
    assert S.det_margin(boxes, empty=0.25)[1] == 0.25
    comm = [np.stack([boxes[0]] * 3), np.zeros((3, 0, 3))]
    assert S.det_vote_entropy(comm)[1] == pytest.approx(np.log(3))
    # EGL has no fixed maximum: "max" is the largest value among the other images
    h = [np.ones((1, 4)), np.zeros((0, 4))]
    egl = S.det_egl(boxes, h)
    assert egl[1] == egl[0]
    assert np.all(S.det_entropy([np.zeros((0, 3))] * 2) == np.log(3))


def test_strategy_for_task_maps_detection_variants_and_refuses_unknown_names() -> None:
    assert S.strategy_for_task("entropy", "detection").name == "det_entropy"
    assert S.strategy_for_task("entropy", "classification").name == "entropy"
    assert S.strategy_for_task("learning_loss", "detection").name == "learning_loss"
    with pytest.raises(UsageError, match="unknown strategy"):
        S.strategy_for_task("entropie", "classification")


# -- selection ---------------------------------------------------------------------------


def test_select_takes_the_highest_values_in_rank_order() -> None:
    ranked = select(np.array([0.1, 0.9, 0.5, 0.9]), ["a", "b", "c", "d"], 3)
    assert ranked == [("b", 0.9), ("d", 0.9), ("c", 0.5)]


def test_kcenter_diversity_avoids_near_duplicates() -> None:
    # six near-copies of one image score highest; two distinct images score a bit lower
    feats = (
        np.array([[0, 0]] * 6 + [[10, 0], [0, 10]], dtype=float) + np.linspace(0, 1e-3, 8)[:, None]
    )
    values = np.array([1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.9, 0.85])
    ids = [f"i{k}" for k in range(8)]
    plain = [i for i, _ in select(values, ids, 3)]
    diverse = [i for i, _ in select(values, ids, 3, features=feats, diversity="kcenter")]
    assert plain == ["i0", "i1", "i2"]
    assert diverse[0] == "i0" and set(diverse[1:]) == {"i6", "i7"}
    assert kcenter_greedy(np.zeros((3, 2)), 3) == [0, 1, 2]

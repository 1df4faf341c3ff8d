"""The active-learning cycle on digits, the batch strategies and the benchmark's helpers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from difficulty import hybrid
from difficulty.active_learning import (
    STRATEGY_NAMES,
    CycleSettings,
    TrainSettings,
    labels_to_reach,
    run_active_learning,
)
from difficulty.registry import SCORERS

TINY = CycleSettings(
    initial=20,
    step=10,
    cycles=2,
    committee=4,
    train=TrainSettings(width=8, epochs=1, min_steps=6, batch_size=16),
)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return x[:200], y[:200], x[1500:1600], y[1500:1600]


@pytest.mark.parametrize(
    "strategy",
    [
        "random",
        "margin",
        "vote_entropy",
        "learning_loss_subset",
        "badge",
        "margin_coreset",
        "combined",
        "fourier",
    ],
)
def test_cycle_grows_the_labeled_set_by_the_step_and_never_relabels(digits, strategy: str) -> None:
    xp, yp, xt, yt = digits
    run = run_active_learning(
        xp,
        yp,
        xt,
        yt,
        strategy=strategy,
        seed=3,
        settings=TINY,
        classes=[str(i) for i in range(10)],
    )
    assert [r.labels for r in run.records] == [20, 30, 40]
    assert len(run.order) == 40 and len(set(run.order)) == 40  # every pick is a new item
    assert all(0.0 <= r.accuracy <= 1.0 for r in run.records)


def test_run_is_reproducible_from_its_seed_and_shares_the_start(digits) -> None:
    xp, yp, xt, yt = digits
    a = run_active_learning(xp, yp, xt, yt, strategy="margin", seed=5, settings=TINY)
    b = run_active_learning(xp, yp, xt, yt, strategy="margin", seed=5, settings=TINY)
    c = run_active_learning(xp, yp, xt, yt, strategy="random", seed=5, settings=TINY)
    assert a.order == b.order
    np.testing.assert_array_equal(a.accuracy, b.accuracy)
    assert a.order[:20] == c.order[:20]  # the same initial labels for every strategy
    assert a.accuracy[0] == c.accuracy[0]  # hence the same first model


def test_uncertainty_picks_items_the_model_gets_wrong_more_often_than_random(digits) -> None:
    xp, yp, xt, yt = digits
    settings = CycleSettings(
        initial=40,
        step=40,
        cycles=1,
        train=TrainSettings(width=16, epochs=1, min_steps=40, batch_size=20),
    )
    margin = run_active_learning(xp, yp, xt, yt, strategy="margin", seed=0, settings=settings)
    rand = run_active_learning(xp, yp, xt, yt, strategy="random", seed=0, settings=settings)
    from difficulty.training import infer_arrays, train_on_arrays

    first = train_on_arrays(
        xp[margin.order[:40]],
        yp[margin.order[:40]],
        classes=[str(i) for i in range(10)],
        width=16,
        epochs=1,
        min_steps=40,
        batch_size=20,
        seed=0,
        lossnet=settings.train.lossnet,
    )
    wrong = {
        s: float(
            (
                np.asarray(infer_arrays(first, xp[r.order[40:]]).probs).argmax(1)
                != yp[r.order[40:]]
            ).mean()
        )
        for s, r in (("margin", margin), ("random", rand))
    }
    assert wrong["margin"] > wrong["random"]


def test_unknown_strategy_is_refused_with_the_choices(digits) -> None:
    xp, yp, xt, yt = digits
    with pytest.raises(ValueError, match="choose one of: random"):
        run_active_learning(xp, yp, xt, yt, strategy="nope", settings=TINY)


def test_labels_to_reach_interpolates_between_cycles() -> None:
    labels = np.array([50, 100, 150])
    acc = np.array([0.8, 0.9, 0.95])
    assert labels_to_reach(labels, acc, 0.85) == pytest.approx(75.0)
    assert labels_to_reach(labels, acc, 0.7) == 50.0
    assert np.isnan(labels_to_reach(labels, acc, 0.99))


def test_kmeanspp_seeding_starts_at_the_largest_norm_and_spreads() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.01, (50, 2)) + c for c in ([0, 0], [5, 0], [0, 5])])
    x[7] = [0.0, 20.0]
    picked = hybrid.kmeanspp_seeding(x, 3, np.random.default_rng(1))
    assert picked[0] == 7
    assert len(set(picked)) == 3


def test_gradient_embedding_norm_is_the_registered_badge_value() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=6)
    h = rng.normal(size=(6, 5))
    g = hybrid.gradient_embedding(p, h)
    assert g.shape == (6, 4 * 6)
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), SCORERS["badge"].fn(probs=p, features=h))


def test_coreset_pick_fills_the_region_farthest_from_the_labeled_items() -> None:
    feats = np.array([[0.0], [0.1], [10.0], [10.1], [5.0]])
    values = np.ones(5)
    picked = hybrid.coreset_pick(values, feats, np.array([[0.0], [10.0]]), 1, candidate_factor=5)
    assert list(picked) == [4]


def test_cluster_pick_takes_one_uncertain_item_per_cluster() -> None:
    feats = np.array([[0.0], [0.1], [0.2], [9.0], [9.1]])
    values = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    picked = hybrid.cluster_pick(values, feats, 2, np.random.default_rng(0), candidate_factor=3)
    assert sorted(picked.tolist()) == [0, 3]


def test_combined_refits_its_weights_from_revealed_losses() -> None:
    rng = np.random.default_rng(0)
    state = hybrid.CombinedState(parts=("margin", "entropy", "fourier"), min_labeled=10)
    for _ in range(2):
        p = rng.dirichlet(np.ones(3) * 0.5, size=40)
        arrays = {"probs": p, "images": __import__("torch").rand(40, 8, 8)}
        values = state.values(arrays)
        assert values.shape == (40,) and np.all((values >= 0) & (values <= 1))
        picked = np.argsort(-values)[:20]
        state.observe(picked, 1.0 - p[picked].max(axis=1) + rng.normal(0, 0.01, 20))
    assert state.method in ("single", "rho", "rho2")
    assert state.weights["fourier"] < max(state.weights["margin"], state.weights["entropy"])


def test_every_strategy_name_is_registered_or_batch() -> None:
    for name in STRATEGY_NAMES:
        assert name in SCORERS or name == "combined"


def _bench() -> Any:
    path = Path(__file__).resolve().parents[1] / "bench" / "active_learning.py"
    spec = importlib.util.spec_from_file_location("bench_active_learning", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_mean_ap_is_one_for_perfect_boxes_and_drops_with_a_false_positive_first() -> None:
    bench = _bench()
    truth = {"a": [("stop", (0.0, 0.0, 10.0, 10.0))], "b": [("stop", (5.0, 5.0, 20.0, 20.0))]}
    perfect = {
        "a": [("stop", (0.0, 0.0, 10.0, 10.0), 0.9)],
        "b": [("stop", (5.0, 5.0, 20.0, 20.0), 0.8)],
    }
    m, per_class = bench.mean_ap(truth, perfect, ["stop", "speedlimit"])
    assert m == pytest.approx(1.0) and set(per_class) == {"stop"}
    noisy = {
        "a": [("stop", (50.0, 50.0, 60.0, 60.0), 0.99), ("stop", (0.0, 0.0, 10.0, 10.0), 0.9)],
        "b": [],
    }
    m2, _ = bench.mean_ap(truth, noisy, ["stop"])
    assert m2 == pytest.approx(0.25)  # recall 0.5 reached at precision 0.5

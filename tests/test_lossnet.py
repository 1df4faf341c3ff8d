"""The loss-prediction module: its ranking loss, the stopped gradient, and that it learns to rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from difficulty.inference import infer_arrays
from difficulty.models.classification import (
    HookedClassifier,
    LossPredictionClassifier,
    SmallCNN,
    build_classifier,
)
from difficulty.models.lossnet import LossNet, LossNetConfig, LossPredLoss, loss_pred_loss
from difficulty.training import train_on_arrays


def test_ranking_loss_pairs_i_with_b_minus_1_minus_i() -> None:
    pred = torch.tensor([2.0, 0.0, 0.5, 1.0])
    true = torch.tensor([5.0, 1.0, 3.0, 4.0])
    # pairs (0, 3): true 5 > 4, pred diff 1.0 → max(0, 1 - 1.0) = 0
    #       (1, 2): true 1 < 3 (sign -1), pred diff -0.5 → max(0, 1 - 0.5) = 0.5
    assert float(loss_pred_loss(pred, true, margin=1.0)) == pytest.approx(0.25)
    assert float(LossPredLoss(margin=2.0)(pred, true)) == pytest.approx((1.0 + 1.5) / 2)


def test_ranking_loss_leaves_out_the_middle_item_and_handles_tiny_batches() -> None:
    pred = torch.tensor([0.0, 100.0, 0.0])
    true = torch.tensor([1.0, -50.0, 2.0])
    # only the pair (0, 2): true 1 < 2, pred diff 0 → 1.0; item 1 is ignored
    assert float(loss_pred_loss(pred, true)) == pytest.approx(1.0)
    single = torch.tensor([1.0], requires_grad=True)
    loss = loss_pred_loss(single, torch.tensor([3.0]))
    assert float(loss.detach()) == 0.0
    loss.backward()


def test_ranking_loss_does_not_backpropagate_into_the_true_losses() -> None:
    true = torch.tensor([1.0, 2.0], requires_grad=True)
    pred = torch.tensor([0.0, 0.0], requires_grad=True)
    loss_pred_loss(pred, true).backward()
    assert true.grad is None and pred.grad is not None


def test_lossnet_reads_maps_of_any_size_and_pooled_vectors() -> None:
    net = LossNet([4, 8], hidden=16)
    out = net([torch.randn(3, 4, 7, 5), torch.randn(3, 8, 2, 2)])
    assert out.shape == (3,)
    assert net([torch.randn(3, 4), torch.randn(3, 8)]).shape == (3,)


def test_small_cnn_has_three_taps_for_8px_and_32px_images() -> None:
    for size in (8, 32):
        model = build_classifier("small_cnn", 10, in_channels=1, image_size=size)
        out = model(torch.randn(2, 1, size, size))
        assert (
            len(out.taps) == 3
            and out.logits.shape == (2, 10)
            and out.embedding.shape == (2, model.embed_dim)
        )


def test_resnet18_taps_layer1_to_layer4() -> None:
    model = build_classifier("resnet18", 3, in_channels=3, image_size=32)
    out = model(torch.randn(2, 3, 32, 32))
    assert [t.shape[1] for t in out.taps] == [64, 128, 256, 512]


def test_detached_taps_stop_the_module_gradient_at_the_backbone() -> None:
    torch.manual_seed(0)
    model = LossPredictionClassifier(SmallCNN(3, in_channels=1, width=4), LossNetConfig())
    x = torch.randn(4, 1, 8, 8)
    model(x, detach_taps=True).predicted_loss.sum().backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert all(p.grad is not None for p in model.lossnet.parameters())
    model.zero_grad(set_to_none=True)
    model(x, detach_taps=False).predicted_loss.sum().backward()
    assert model.target.blocks[0][0].weight.grad is not None


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _true_losses(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12))


def test_loss_module_ranks_held_out_per_item_losses_on_digits() -> None:
    x, y = _digits()
    perm = np.random.default_rng(0).permutation(len(y))
    train, held_out = perm[:500], perm[500:]
    ckpt = train_on_arrays(
        x[train], y[train], epochs=10, batch_size=64, lr=0.1, seed=0, min_steps=0
    )
    out = infer_arrays(ckpt, x[held_out])
    rho = spearmanr(out.predicted_loss, _true_losses(out.probs, y[held_out])).correlation
    # measured 0.82 at this seed (0.68 with 300 items / 8 epochs); the gradient was stopped
    # after 60% of the epochs as in the paper
    assert rho > 0.5
    history = ckpt.meta["training"]["history"]
    assert [h["detached"] for h in history] == [0.0] * 6 + [1.0] * 4


def test_module_alone_on_a_users_frozen_model() -> None:
    x, y = _digits()
    torch.manual_seed(1)
    user = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    )
    # the user's model was trained elsewhere; a few steps of plain training stand in for that
    opt = torch.optim.Adam(user.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x[:600, None]), torch.from_numpy(y[:600])
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(user(xt), yt).backward()
        opt.step()
    before = {k: v.clone() for k, v in user.state_dict().items()}
    target = HookedClassifier(user, taps=["1", "3"], fc="6", example=xt[:1])
    ckpt = train_on_arrays(
        x[600:1200],
        y[600:1200],
        target=target,
        freeze_target=True,
        epochs=15,
        batch_size=64,
        lr=0.05,
        seed=0,
        min_steps=0,
    )
    for k, v in user.state_dict().items():
        assert torch.equal(v, before[k]), f"frozen weight {k} changed"
    out = infer_arrays(ckpt, x[1200:])
    rho = spearmanr(out.predicted_loss, _true_losses(out.probs, y[1200:])).correlation
    assert rho > 0.3

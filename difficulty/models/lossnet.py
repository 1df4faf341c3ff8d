"""The loss-prediction module and its margin ranking loss (Yoo & Kweon, CVPR 2019).

The module reads several intermediate feature maps of the target model.  Each map
``(N, C_k, H_k, W_k)`` goes through global average pooling → FC(``C_k`` → ``hidden``) →
ReLU; the ``K`` vectors are concatenated ``(N, K·hidden)`` and one FC maps them to the
predicted loss ``(N,)`` (one scalar per item, unbounded, on the scale of the ranking
loss rather than of the target loss).

Training follows the paper: the batch is split in halves and item ``i`` is paired with
item ``B-1-i``; for each pair the sign of the *true* loss difference says which of the
two should be predicted higher, and the hinge ``max(0, -sign·(l̂_i - l̂_j) + ξ)`` is
averaged over the pairs.  The total objective is ``L_target + λ·L_loss`` with margin
``ξ = 1`` and ``λ = 1`` by default.  The gradient from the module into the target model
is stopped after ``stop_grad_share`` of the epochs (the paper: after 120 of 200 epochs,
a share of 0.6), so that the module cannot keep pulling the features away from the
target task late in training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class LossNetConfig(BaseModel):
    """Settings of the loss-prediction module and of its part in training.

    ``margin`` is ξ, ``weight`` is λ.  ``stop_grad_share`` in ``[0, 1]``: the share of the
    epochs after which the module's gradient no longer reaches the target model
    (``1.0`` never stops it, ``0.0`` stops it from the start).  ``hidden`` is the width of
    the per-map FC layer (128 in the paper).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    margin: float = Field(default=1.0, gt=0)
    weight: float = Field(default=1.0, ge=0)
    hidden: int = Field(default=128, ge=1)
    stop_grad_share: float = Field(default=0.6, ge=0.0, le=1.0)


class LossNet(nn.Module):
    """Predicts the target loss of each item from ``K`` intermediate feature maps.

    ``in_channels[k]`` is the channel count of the ``k``-th tapped map.  ``forward`` takes
    a sequence of ``K`` tensors ``(N, C_k, H_k, W_k)`` (any spatial size; a 2-D tensor
    ``(N, C_k)`` is taken as already pooled) and returns ``(N,)``.
    """

    def __init__(self, in_channels: Sequence[int], hidden: int = 128) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("the loss-prediction module needs at least one feature map")
        self.in_channels = [int(c) for c in in_channels]
        self.fcs = nn.ModuleList(nn.Linear(c, hidden) for c in self.in_channels)
        self.out = nn.Linear(hidden * len(self.in_channels), 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = []
        for fmap, fc in zip(features, self.fcs, strict=True):
            vec = fmap.mean(dim=(2, 3)) if fmap.dim() == 4 else fmap
            pooled.append(F.relu(fc(vec)))
        return self.out(torch.cat(pooled, dim=1)).squeeze(1)


def loss_pred_loss(
    predicted: torch.Tensor, target: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """The paper's margin ranking loss on pairs ``(i, B-1-i)`` of a batch.

    ``predicted`` and ``target`` are ``(B,)``; ``target`` (the true per-item losses) is
    detached here.  With an odd ``B`` the middle item has no partner and is left out.
    Returns a scalar: the mean hinge over the ``B // 2`` pairs (0 when ``B < 2``).
    """
    half = predicted.shape[0] // 2
    if half == 0:
        return predicted.sum() * 0.0
    target = target.detach()
    pred_diff = (predicted - predicted.flip(0))[:half]
    true_diff = (target - target.flip(0))[:half]
    sign = 2.0 * torch.sign(torch.clamp(true_diff, min=0)) - 1.0  # +1 when l_i > l_j, else -1
    return torch.clamp(margin - sign * pred_diff, min=0).mean()


class LossPredLoss(nn.Module):
    """:func:`loss_pred_loss` as a module with a fixed margin ξ."""

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_pred_loss(predicted, target, self.margin)

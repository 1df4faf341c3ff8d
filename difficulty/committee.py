"""Committees for query by committee: MC dropout (default) or stored bootstrap members.

``committee_kind``:

* ``dropout`` — nothing is trained or stored; at inference ``M`` passes of the one model
  with its dropout active form the committee (:mod:`difficulty.inference`);
* ``bootstrap`` (classification) — after the main training, ``members`` copies of the
  trained target classifier are each trained further on a **bootstrap resample** of the
  training items (``n`` items drawn with replacement, seeded by ``(seed, member)``), with
  cross-entropy only (the loss-prediction module is not part of a member).  The schedule is
  short because members start from the trained model: ``epochs`` epochs (default 5;
  raised, like the main schedule, to at least ``min_steps // 5`` optimizer steps), SGD
  momentum 0.9, weight decay 5e-4, at the main learning rate, divided by 10 for the last
  epoch.  The members' state dicts are stored in the checkpoint (its ``committee`` list,
  see :mod:`difficulty.checkpoint`) and :func:`difficulty.inference.infer` uses them, in
  place of MC dropout, whenever a committee is asked for.

Members differ through their resamples (each leaves out about 1/e ≈ 37% of the items and
repeats others) and their shuffling; the cost is ``M`` short trainings, ``M`` times the
target model's size on disk and ``M`` forward passes per item at inference.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

log = logging.getLogger(__name__)

RESAMPLE_RULE = (
    "n of the n training items drawn with replacement, numpy default_rng((seed, member))"
)


class CommitteeConfig(BaseModel):
    """How the committee of the committee strategies is built (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dropout", "bootstrap"] = "dropout"
    members: int = Field(default=5, ge=2)
    epochs: int = Field(default=5, ge=1)


def bootstrap_indices(n: int, member: int, seed: int) -> np.ndarray:
    """``n`` indices into ``range(n)`` drawn with replacement for ``member`` (int64 ``(n,)``)."""
    return np.random.default_rng((seed, member)).integers(0, n, size=n)


def member_epochs(epochs: int, steps_per_epoch: int, min_steps: int) -> int:
    """``epochs``, raised so that a member makes at least ``min_steps // 5`` steps."""
    floor = min_steps // 5
    if floor <= 0 or steps_per_epoch <= 0:
        return epochs
    return max(epochs, math.ceil(floor / steps_per_epoch))


Batches = Callable[[int, int], Iterable[tuple[torch.Tensor, torch.Tensor]]]
"""``(member, epoch) → batches (x (B, C, H, W), y (B,))`` of that member's resample."""


def train_members(
    target: nn.Module,
    batches: Batches,
    *,
    members: int,
    epochs: int,
    lr: float,
    seed: int,
    device: str = "cpu",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> list[dict[str, torch.Tensor]]:
    """Train ``members`` copies of the classifier ``target`` (left unchanged); their state dicts.

    ``target`` maps ``(B, C, H, W)`` to an output with ``logits`` ``(B, K)``.  Member ``m``
    trains on ``batches(m, epoch)`` for ``epochs`` epochs at ``lr`` (``lr / 10`` in the last
    epoch when there are several).  Returned tensors are on the CPU.
    """
    states = []
    for m in range(members):
        torch.manual_seed(seed * 1009 + m + 1)  # the member's dropout masks
        member = copy.deepcopy(target).to(device)
        for p in member.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(
            member.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        loss_sum, n = 0.0, 0
        for epoch in range(epochs):
            if epochs > 1 and epoch == epochs - 1:
                for group in optimizer.param_groups:
                    group["lr"] = lr / 10
            member.train()
            for x, y in batches(m, epoch):
                loss = F.cross_entropy(member(x).logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum, n = loss_sum + float(loss.detach()) * len(y), n + len(y)
        member.eval()
        log.debug("committee member %d: mean training loss %.4f", m, loss_sum / max(n, 1))
        states.append({k: v.detach().cpu().clone() for k, v in member.state_dict().items()})
    return states

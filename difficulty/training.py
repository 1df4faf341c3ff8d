"""Training a target model jointly with its loss-prediction module (Yoo & Kweon, CVPR 2019).

**Objective** (per batch of ``B`` items): ``mean_i L_target(i) + λ · L_loss``, where
``L_target(i)`` is the *per-item* target loss (classification: cross-entropy of item ``i``;
detection: see :mod:`difficulty.models.detection`) and ``L_loss`` is the margin ranking loss
on the pairs ``(i, B-1-i)`` (:func:`~difficulty.models.lossnet.loss_pred_loss`, margin ξ).
After ``stop_grad_share`` of the epochs the module's gradient stops at the taps (the module
still trains, the target model no longer sees it).

**Schedule.**  As in the paper: SGD, momentum 0.9, weight decay 5e-4, the learning rate
divided by 10 after 80% of the epochs (paper: 160 of 200), λ = 1, ξ = 1, the module's
gradient stopped after 60% (120 of 200).  Changed for this project, and why:

* the paper re-trains on 1,000–10,000 labels with batches of 128 for 200 epochs; a labeling
  project's pool is often tens to hundreds of items, where 200 epochs of 1 step teach
  nothing.  ``min_steps`` raises the epoch count so that training makes at least that many
  optimizer steps (the share-based milestones follow the raised count), and the batch is
  never larger than the pool;
* **warm start** across cycles (``init``): the next cycle starts from the previous model
  instead of from scratch, so each cycle needs far fewer epochs (the paper re-trains);
* detection uses lr 0.001 (the paper's SSD setting is lr 0.001 too) and clips the gradient
  norm at 10, which keeps from-scratch detectors from diverging in their first steps.

**The calibration split.**  :func:`train_model` holds out every labeled item whose
``sha256(item_id)`` falls below ``calibration_share`` (as a fraction of 2⁶⁴): stable
across cycles (an item never moves between the splits when the pool grows) and never
trained on.  Its ids go into the checkpoint (``calibration_ids``) for the calibrated
auto-labeling.

**A user's own model.**  ``target_weights`` starts the target model from a plain torchvision
``state_dict`` (or a labeltriage checkpoint) of a supported architecture
(:mod:`difficulty.models.user_weights`); with ``freeze_target`` only the loss module trains
and the target's weights, BatchNorm statistics included, stay bit-identical (a frozen
detector stays in train mode, which torchvision needs for its losses, with every
BatchNorm and dropout layer in eval mode).

**A pretrained backbone** (``backbone``: arch ``fcos`` for detection, ``backbone`` for
classification).  The backbone's weights are resolved once
(:func:`difficulty.models.backbones.resolve_weights`) and recorded with their sha256 in
``meta["backbone"]``.  The ``fcos`` detector trains on cached features
(:func:`fill_feature_cache`: the frozen maps of every training image computed once, in
batches of :data:`BACKBONE_BATCH`), with AdamW (weight decay 1e-4), a cosine learning-rate
schedule over the epochs and the gradient norm clipped at 10; flips are done on the cached
maps.  The loss module's gradient stops after ``stop_grad_share`` as for every model.

**Committee.**  ``committee_kind="bootstrap"`` trains committee members after the main
model (:mod:`difficulty.committee`); the default ``dropout`` trains nothing extra.

**Determinism**: ``seed`` fixes initialisation, shuffling and augmentation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from connectors.errors import InputError, UsageError
from connectors.model import Item
from connectors.storage import ProjectFS
from difficulty.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from difficulty.committee import (
    RESAMPLE_RULE,
    CommitteeConfig,
    bootstrap_indices,
    member_epochs,
    train_members,
)
from difficulty.datasets import ItemDataset, ItemStream, Sample, collate_samples
from difficulty.featurecache import DEFAULT_MEMORY_BYTES, FeatureCache, cache_key
from difficulty.inference import infer_arrays
from difficulty.items import project_fs as _project_fs
from difficulty.models.build import ARCHS, BACKBONE_ARCH, DEFAULT_ARCH, TASKS, model_from_meta
from difficulty.models.classification import LossPredictionClassifier, TappedClassifier
from difficulty.models.fcos import FeatureDetector
from difficulty.models.lossnet import LossNetConfig, loss_pred_loss
from difficulty.models.user_weights import load_target_weights, read_target_weights
from difficulty.options import Options

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LR",
    "calibration_fraction",
    "data_hash",
    "infer_arrays",
    "is_calibration",
    "train_model",
    "train_on_arrays",
]

DEFAULT_LR = {"classification": 0.1, "detection": 0.001, "fcos": 0.002, "backbone": 0.01}
"""Per task, and per arch where it differs (``fcos`` trains with AdamW)."""
DEFAULT_IMAGE_SIZE = {"classification": 32, "detection": 320, "backbone": 128}
CALIBRATION_RULE = "sha256(item_id) as a fraction of 2**64 < share"


# -- the calibration split -----------------------------------------------------------


def calibration_fraction(item_id: str) -> float:
    """A stable pseudo-uniform number in ``[0, 1)`` from the item id."""
    return int(hashlib.sha256(item_id.encode("utf-8")).hexdigest()[:16], 16) / 2.0**64


def is_calibration(item_id: str, share: float) -> bool:
    """True when ``item_id`` belongs to the held-out calibration split of ``share``."""
    return calibration_fraction(item_id) < share


def data_hash(pairs: Iterable[tuple[str, Any]]) -> str:
    """sha256 over sorted ``(item_id, label)`` pairs (labels as JSON)."""
    h = hashlib.sha256()
    for item_id, label in sorted(
        (str(i), json.dumps(lab, sort_keys=True, default=str)) for i, lab in pairs
    ):
        h.update(item_id.encode())
        h.update(b"\0")
        h.update(label.encode())
        h.update(b"\n")
    return h.hexdigest()


def _ids_hash(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


# -- the loop ------------------------------------------------------------------------


Step = Callable[[nn.Module, Any, bool], tuple[torch.Tensor, torch.Tensor]]
"""``(model, batch, detach_taps) → (per-item target loss (B,), predicted loss (B,))``."""


def _target_module(model: nn.Module) -> nn.Module:
    if isinstance(model, LossPredictionClassifier):
        return model.target
    if isinstance(model, FeatureDetector):
        return _FcosTarget(model)
    return model.detector  # type: ignore[return-value]


class _FcosTarget(nn.Module):
    """The target part of a :class:`FeatureDetector`: everything but its loss module."""

    def __init__(self, model: FeatureDetector) -> None:
        super().__init__()
        self.parts = nn.ModuleList([model.backbone, model.neck, model.head])


def _hold_frozen(target: nn.Module) -> None:
    """Put a frozen target model in the mode that computes its losses without changing it.

    A classifier (and the ``fcos`` detector) runs in eval mode.  A torchvision detector
    computes its losses (and samples anchors/proposals) only in train mode, so it stays
    there with every BatchNorm and dropout layer in eval mode: running statistics never move.
    """
    if isinstance(target, TappedClassifier | _FcosTarget):
        target.eval()
        return
    target.train()
    for m in target.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout):
            m.eval()


def _fit(
    model: nn.Module,
    batches: Callable[[int], Iterable[Any]],
    step: Step,
    *,
    epochs: int,
    lr: float,
    lossnet: LossNetConfig,
    freeze_target: bool,
    progress: bool,
    desc: str,
    clip: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    optimizer_name: str = "sgd",
) -> list[dict[str, float]]:
    target = _target_module(model)
    if freeze_target:
        for p in target.parameters():
            p.requires_grad_(False)
        params = [p for p in model.lossnet.parameters()]  # type: ignore[union-attr]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    else:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        milestone = max(1, round(0.8 * epochs))
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[milestone] if epochs >= 5 else [], gamma=0.1
        )
    stop_epoch = round(lossnet.stop_grad_share * epochs)
    history: list[dict[str, float]] = []
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        if freeze_target:
            _hold_frozen(target)
        detach = freeze_target or epoch >= stop_epoch
        sums = {"target": 0.0, "ranking": 0.0, "n": 0.0}
        for batch in batches(epoch):
            target_loss, predicted = step(model, batch, detach)
            ranking = loss_pred_loss(predicted, target_loss, lossnet.margin)
            loss = (
                lossnet.weight * ranking
                if freeze_target
                else target_loss.mean() + lossnet.weight * ranking
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            n = float(target_loss.shape[0])
            sums["target"] += float(target_loss.detach().sum())
            sums["ranking"] += float(ranking.detach()) * n
            sums["n"] += n
        scheduler.step()
        n = max(sums["n"], 1.0)
        record = {
            "epoch": float(epoch),
            "target_loss": sums["target"] / n,
            "ranking_loss": sums["ranking"] / n,
            "detached": float(detach),
        }
        history.append(record)
        bar.set_postfix(loss=f"{record['target_loss']:.3f}", rank=f"{record['ranking_loss']:.3f}")
        log.debug(
            "%s epoch %d: target %.4f ranking %.4f%s",
            desc,
            epoch,
            record["target_loss"],
            record["ranking_loss"],
            " (taps detached)" if detach else "",
        )
    model.eval()
    return history


def _classification_step(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], detach: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    out = model(x, detach_taps=detach)
    return F.cross_entropy(out.logits, y, reduction="none"), out.predicted_loss


def _detection_step(
    model: nn.Module, batch: tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]], detach: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = batch
    out = model(images, targets, detach_taps=detach)
    return out.loss, out.predicted_loss


def _effective_epochs(epochs: int, steps_per_epoch: int, min_steps: int) -> int:
    if min_steps <= 0 or steps_per_epoch <= 0:
        return epochs
    return max(epochs, math.ceil(min_steps / steps_per_epoch))


def _version(arch: str, hash_: str, created: str) -> str:
    return f"{arch}-{hash_[:8]}-{created.replace(':', '').replace('-', '')[:15]}"


def _warm_start(model: nn.Module, init: Checkpoint, meta: dict[str, Any]) -> None:
    for key in ("task", "arch", "classes"):
        if init.meta.get(key) != meta.get(key):
            raise UsageError(
                f"--init checkpoint {init.path or '(in memory)'} has {key} {init.meta.get(key)!r}, this training has {meta.get(key)!r}"
            )
    model.load_state_dict(init.state_dict)


def _committee_config(kind: str, size: int, epochs: int, task: str, arch: str) -> CommitteeConfig:
    try:
        config = CommitteeConfig(kind=kind, members=size, epochs=epochs)
    except ValueError as exc:  # pydantic ValidationError
        raise UsageError(f"bad committee settings: {exc}") from exc
    if config.kind == "bootstrap" and (task != "classification" or arch not in ARCHS[task]):
        raise UsageError(
            f"a bootstrap committee is for the built-in classifiers ({', '.join(ARCHS['classification'])}); "
            f"this is {task} / {arch}: use committee_kind='dropout'"
        )
    return config


def _committee_meta(config: CommitteeConfig, epochs: int, lr: float, seed: int) -> dict[str, Any]:
    return {
        "kind": config.kind,
        "members": config.members,
        "epochs": epochs,
        "lr": lr,
        "seed": seed,
        "resample": RESAMPLE_RULE,
    }


# -- in-memory arrays (the active-learning benchmark) ---------------------------------


def _as_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as ``(N, C, H, W)`` float32 and ``y`` as ``(N,)`` int64 tensors."""
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if xt.dim() == 3:
        xt = xt.unsqueeze(1)
    if xt.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W) or (N, H, W), got shape {tuple(xt.shape)}")
    yt = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    if yt.shape != (xt.shape[0],):
        raise ValueError(f"y must be ({xt.shape[0]},), got {tuple(yt.shape)}")
    return xt, yt


def _array_batches(
    xt: torch.Tensor, yt: torch.Tensor, bs: int, drop_last: bool, seed: int, device: str
) -> Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]:
    """The shuffled batches of one epoch of the arrays, as a function of the epoch (one
    generator, seeded once, across the epochs)."""
    n = int(xt.shape[0])
    gen = torch.Generator().manual_seed(seed)

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n - bs + 1 if drop_last else n, bs):
            idx = order[start : start + bs]
            yield xt[idx], yt[idx]

    return batches


def _array_committee(
    model: nn.Module,
    meta: dict[str, Any],
    committee: CommitteeConfig,
    xt: torch.Tensor,
    yt: torch.Tensor,
    bs: int,
    drop_last: bool,
    steps: int,
    min_steps: int,
    lr: float,
    seed: int,
    device: str,
) -> Any:
    """Train the bootstrap committee of ``model``'s target on the arrays; recorded in ``meta``."""
    n = int(xt.shape[0])
    m_epochs = member_epochs(committee.epochs, steps, min_steps)

    def member_batches(member: int, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(bootstrap_indices(n, member, seed)).to(device)
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(seed * 7919 + member * 131 + epoch)
        ).to(device)
        for start in range(0, n - bs + 1 if drop_last else n, bs):
            chosen = idx[order[start : start + bs]]
            yield xt[chosen], yt[chosen]

    members = train_members(
        model.target,  # type: ignore[arg-type]
        member_batches,
        members=committee.members,
        epochs=m_epochs,
        lr=lr,
        seed=seed,
        device=device,
    )
    meta["committee"] = _committee_meta(committee, m_epochs, lr, seed)
    return members


def train_on_arrays(
    x: np.ndarray,
    y: np.ndarray,
    *,
    classes: list[str] | None = None,
    arch: str = "small_cnn",
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 0.1,
    seed: int = 0,
    lossnet: LossNetConfig = LossNetConfig(),
    init: str | Checkpoint | None = None,
    freeze_target: bool = False,
    target: TappedClassifier | None = None,
    min_steps: int = 100,
    width: int = 32,
    dropout: float = 0.2,
    ids: Sequence[str] | None = None,
    device: str = "cpu",
    progress: bool = False,
    committee_kind: str = "dropout",
    committee_size: int = 5,
    committee_epochs: int = 5,
) -> Checkpoint:
    """Train a classifier + loss module on arrays, in memory, with the CLI's model code.

    ``x``: ``(N, C, H, W)`` or ``(N, H, W)`` float images (scaled as the caller likes,
    e.g. digits / 16); ``y``: ``(N,)`` class indices into ``classes`` (default
    ``["0", …, str(max(y))]``).  ``init``: warm start from an earlier result.
    ``target`` + ``freeze_target``: train only the module on a user's own frozen model
    (see :class:`~difficulty.models.classification.HookedClassifier`).  No calibration
    split is held out here (the caller owns its splits).  ``committee_kind="bootstrap"``
    also trains ``committee_size`` members on bootstrap resamples for ``committee_epochs``
    (:mod:`difficulty.committee`), kept in ``Checkpoint.committee``.  Returns an in-memory
    :class:`Checkpoint` (``path=None``) for :func:`infer_arrays` or :func:`save_checkpoint`
    (pass ``committee=ckpt.committee`` to store the members).
    """
    xt, yt = _as_tensors(x, y)
    classes = list(classes) if classes is not None else [str(i) for i in range(int(yt.max()) + 1)]
    committee = _committee_config(
        committee_kind, committee_size, committee_epochs, "classification",
        arch if target is None else "user",
    )  # fmt: skip
    torch.manual_seed(seed)
    init_ckpt = load_checkpoint(init) if init is not None else None
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ids_list = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(yt))]
    hash_ = data_hash(zip(ids_list, yt.tolist(), strict=True))
    meta: dict[str, Any] = {
        "task": "classification",
        "arch": arch if target is None else "user",
        "classes": classes,
        "model": {
            "in_channels": int(xt.shape[1]), "image_size": int(xt.shape[2]),
            "width": width, "dropout": dropout,
        },
        "lossnet": lossnet.model_dump(),
        "data_hash": hash_,
        "calibration": {"rule": "none (arrays)", "share": 0.0, "ids_hash": _ids_hash([]), "count": 0},
        "calibration_ids": [],
        "created": created,
    }  # fmt: skip
    if target is not None:
        model: nn.Module = LossPredictionClassifier(target, lossnet)
    else:
        model = model_from_meta(meta)
    if init_ckpt is not None:
        _warm_start(model, init_ckpt, meta)
    model.to(device)
    xt, yt = xt.to(device), yt.to(device)
    n = int(xt.shape[0])
    bs = max(2, min(batch_size, n))
    drop_last = n > bs
    steps = n // bs if drop_last else 1
    total_epochs = _effective_epochs(epochs, steps, min_steps)
    history = _fit(
        model, _array_batches(xt, yt, bs, drop_last, seed, device), _classification_step,
        epochs=total_epochs, lr=lr, lossnet=lossnet, freeze_target=freeze_target,
        progress=progress, desc="train",
    )  # fmt: skip
    meta["version"] = meta["model_version"] = _version(meta["arch"], hash_, created)
    meta["training"] = {
        "epochs": total_epochs, "epochs_asked": epochs, "batch_size": bs, "lr": lr,
        "seed": seed, "init": (init_ckpt.version if init_ckpt is not None else None),
        "freeze_target": freeze_target, "items": n, "history": history,
    }  # fmt: skip
    members = None
    if committee.kind == "bootstrap":
        members = _array_committee(
            model, meta, committee, xt, yt, bs, drop_last, steps, min_steps, lr, seed, device
        )
    model.to("cpu")
    return Checkpoint(
        meta=meta,
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        path=None,
        model=model,
        committee=members,
    )


# -- the fcos detector on cached features ------------------------------------------------


BACKBONE_BATCH = 4
"""Images per backbone pass when filling the cache (small batches run faster on a CPU)."""


def fill_feature_cache(
    model: FeatureDetector,
    items: Sequence[Item],
    project: ProjectFS | None,
    cache: FeatureCache,
    *,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, str]:
    """Compute and cache the frozen maps of every item not cached yet; ``{item_id: error}``
    for the items whose image could not be read."""
    todo = [it for it in items if it.item_id not in cache]
    errors: dict[str, str] = {}
    if not todo:
        return errors
    stream = ItemStream(todo, project, task="detection", image_size=model.image_size)
    loader = DataLoader(
        stream, batch_size=BACKBONE_BATCH, collate_fn=collate_samples, num_workers=num_workers
    )
    was = model.training
    model.eval()
    for samples in tqdm(loader, desc="features", unit="batch", disable=not progress, leave=False):
        ok = [s for s in samples if s.error is None and s.image is not None]
        errors.update({s.item_id: str(s.error) for s in samples if s.error is not None})
        if not ok:
            continue
        maps = model.frozen_features([s.image for s in ok if s.image is not None])
        for j, s in enumerate(ok):
            cache.put(s.item_id, [m[j] for m in maps], s.size or (0, 0))
    model.train(was)
    return errors


def _train_feature_detector(
    model: FeatureDetector, run: _Training, feature_cache: FeatureCache | None
) -> Checkpoint:
    """Train the fcos detector on its cached frozen features; save it."""
    import time

    o, meta = run.o, run.meta
    key = cache_key(meta)
    if feature_cache is not None and feature_cache.key != key:
        raise ValueError(f"the feature cache is for {feature_cache.key}, this model needs {key}")
    cache = (
        feature_cache
        if feature_cache is not None
        else FeatureCache(key, memory_bytes=o.cache_memory_bytes)
    )
    try:
        start = time.perf_counter()
        errors = fill_feature_cache(
            model, run.items, run.fs, cache, num_workers=o.num_workers, progress=run.progress
        )
        feature_seconds = time.perf_counter() - start
        records = _cached_records(model, run.items, list(o.classes or ()), cache, errors)
        n = len(records)
        bs = max(2, min(o.batch_size, n))
        steps = max(1, n // bs) if n > bs else 1
        total_epochs = _effective_epochs(o.epochs, steps, o.min_steps)
        start = time.perf_counter()
        history = _fit(
            model,
            _feature_batches(model, records, cache, bs, o),
            _detection_step,
            epochs=total_epochs,
            lr=run.lr,
            lossnet=o.lossnet,
            freeze_target=o.freeze_target,
            progress=run.progress,
            desc="train fcos",
            clip=10.0,
            weight_decay=1e-4,
            optimizer_name="adamw",
        )
        fit_seconds = time.perf_counter() - start
        meta["box_confidence"] = _training_box_confidence(
            model, meta, [it for it in run.items if it.item_id not in errors], cache, o.device
        )
        stats = cache.stats.to_dict()
    finally:
        if feature_cache is None:
            cache.close()
    meta["version"] = meta["model_version"] = _version(
        meta["arch"], meta["data_hash"], meta["created"]
    )
    meta["training"] = {
        "epochs": total_epochs, "epochs_asked": o.epochs, "batch_size": bs, "lr": run.lr,
        "optimizer": "adamw, cosine schedule", "seed": o.seed, "init": run.init_version,
        "target_weights": None, "freeze_target": o.freeze_target, "augment": o.augment,
        "items": len(records), "skipped_items": sorted(errors), "history": history,
        "feature_seconds": feature_seconds, "fit_seconds": fit_seconds, "feature_cache": stats,
    }  # fmt: skip
    model.to("cpu")
    ckpt = save_checkpoint(run.out, model, meta, storage_options=run.storage_options)
    log.info(
        "trained fcos on %d items (%d held out for calibration; features %.0f s, fit %.0f s) → %s",
        len(records), run.calibration_count, feature_seconds, fit_seconds, run.out,
    )  # fmt: skip
    return ckpt


def _cached_records(
    model: FeatureDetector,
    items: list[Item],
    classes: list[str],
    cache: FeatureCache,
    errors: dict[str, str],
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(item_id, boxes, labels)`` of the items with cached features, boxes at the model's
    scale; an item whose label cannot be used goes to ``errors``, with a warning."""
    from difficulty.datasets import detection_target

    records: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for item in items:
        if item.item_id in errors:
            log.warning("skipping item %s: %s", item.item_id, errors[item.item_id])
            continue
        width, height = cache.size_of(item.item_id)
        try:
            target = detection_target(item, classes, width, height)
        except InputError as exc:
            errors[item.item_id] = str(exc)
            log.warning("skipping item %s: %s", item.item_id, exc)
            continue
        boxes = model.scale_boxes(target["boxes"], width, height)
        records.append((item.item_id, boxes, target["labels"]))
    if not records:
        raise UsageError("no readable labeled items to train on")
    return records


def _feature_batches(
    model: FeatureDetector,
    records: list[tuple[str, torch.Tensor, torch.Tensor]],
    cache: FeatureCache,
    bs: int,
    o: TrainOptions,
) -> Callable[[int], Iterable[Any]]:
    """The batches of one epoch of cached maps and their targets (randomly flipped with
    ``o.augment``), as a function of the epoch."""
    from difficulty.models.fcos import flip_boxes, flip_maps

    n, size = len(records), model.image_size

    def batches(epoch: int) -> Iterable[Any]:
        rng = np.random.default_rng((o.seed, epoch))
        order = rng.permutation(n)
        for begin in range(0, n, bs):
            chosen = order[begin : begin + bs]
            if len(chosen) < 2 and n > 1:  # a lone item has no pair for the ranking loss
                continue
            maps, targets = [], []
            for i in chosen:
                item_id, boxes, labels = records[int(i)]
                cached = cache.get(item_id)
                if cached is None:
                    raise RuntimeError(f"features of item {item_id} left the cache")
                if o.augment and rng.random() < 0.5:
                    cached, boxes = flip_maps(cached), flip_boxes(boxes, size)
                maps.append(cached)
                targets.append({"boxes": boxes.to(o.device), "labels": labels.to(o.device)})
            yield [torch.stack(level).to(o.device) for level in zip(*maps, strict=True)], targets

    return batches


def _training_box_confidence(
    model: FeatureDetector,
    meta: dict[str, Any],
    items: list[Item],
    cache: FeatureCache,
    device: str,
) -> dict[str, Any]:
    """The box confidence the gate keeps for this model, chosen on its training ``items``
    from their cached maps (:mod:`difficulty.boxconfidence`)."""
    from difficulty.boxconfidence import DEFAULT_BOX_CONFIDENCES, choose_box_confidence
    from difficulty.inference import predict_cached

    preds = predict_cached(
        Checkpoint(meta={**meta, "version": "training"}, state_dict={}, model=model),
        [it.item_id for it in items],
        cache,
        box_score_min=min(DEFAULT_BOX_CONFIDENCES),
        device=device,
    )
    chosen = choose_box_confidence(items, preds)
    log.info("box confidence %g (%s)", chosen["value"], chosen["rule"])
    return chosen


# -- a project (the CLI) ---------------------------------------------------------------


class TrainOptions(Options):
    """The settings of one training (:func:`train_model`).

    ``task``: ``detection`` or ``classification``; ``arch`` (default: the ``init``
    checkpoint's, else the task's default); ``classes``: the project's classes (default:
    the ``init`` checkpoint's, else the sorted labels seen); ``lr`` defaults to 0.1
    (classification) / 0.001 (detection); ``calibration_share``: the share of labeled items
    held out (:func:`is_calibration`); ``target_weights``: start the target model from a
    user's own weights file (:mod:`difficulty.models.user_weights`); ``freeze_target``:
    train only the loss module on the ``init`` or ``target_weights`` model;
    ``committee_*``: a bootstrap committee (classification, :mod:`difficulty.committee`);
    ``backbone``/``backbone_weights``/``finetune_last_stage``: a pretrained backbone
    (:mod:`difficulty.models.backbones`); ``cache_memory_bytes``: memory of the fcos
    detector's feature cache; ``augment`` (default: on for ``fcos`` only): random flips.
    """

    task: str
    arch: str | None = None
    classes: list[str] | None = None
    epochs: int = 30
    batch_size: int = 32
    lr: float | None = None
    seed: int = 0
    lossnet: LossNetConfig = LossNetConfig()
    calibration_share: float = 0.2
    freeze_target: bool = False
    target_weights: str | None = None
    device: str = "cpu"
    image_size: int | None = None
    min_steps: int = 0
    num_workers: int = 0
    augment: bool | None = None
    committee_kind: str = "dropout"
    committee_size: int = 5
    committee_epochs: int = 5
    backbone: str | None = None
    backbone_weights: str | None = None
    finetune_last_stage: bool = False
    cache_memory_bytes: int = DEFAULT_MEMORY_BYTES


def _training_label(item: Item, task: str) -> Any:
    if task == "classification":
        return item.class_label
    return [[a.label, *(a.box or ())] for a in item.annotations if a.box is not None]


def train_model(
    items: Iterable[Item],
    project: ProjectFS | Any,
    options: TrainOptions | None = None,
    *,
    out: str,
    init: str | Checkpoint | None = None,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
    feature_cache: FeatureCache | None = None,
    **keywords: Any,
) -> Checkpoint:
    """Train a target model + loss module on the human-labeled items of a project; save to ``out``.

    ``keywords`` are fields of :class:`TrainOptions` laid over ``options`` (``task`` is
    required when no ``options`` are given).  Only items with a human label and no
    ``error`` are used; the calibration split is held out and recorded in the checkpoint
    as ``calibration_ids``.  ``init``: warm start (same task, arch and classes).  Items
    whose image cannot be read are skipped with a warning naming them.  A backbone arch
    (``fcos`` for detection, ``backbone`` for classification, the default arch when a
    backbone is named) keeps its pretrained backbone frozen except, with
    ``finetune_last_stage``, its stride-32 stage; the detector trains on cached frozen
    features (:mod:`difficulty.featurecache`: ``feature_cache`` to share one across
    trainings, else a cache of its own) with AdamW and a cosine schedule.
    Raises :class:`UsageError` when nothing is left to train on.
    """
    o, init_ckpt, user = _resolve_training(
        TrainOptions.of(options, keywords), init, storage_options
    )
    train_items, calibration_ids = _training_split(items, o)
    classes, train_items = _training_classes(o, train_items, calibration_ids, init_ckpt, user)
    meta, weights = _training_meta(o, classes, train_items, calibration_ids, init_ckpt, user)
    torch.manual_seed(o.seed)
    model = model_from_meta(meta)
    if init_ckpt is not None:
        _warm_start(model, init_ckpt, meta)
    if user is not None:
        load_target_weights(model, user, classes=list(classes))
    if weights is not None:
        from difficulty.models.backbones import load_backbone_weights

        load_backbone_weights(
            model.backbone if isinstance(model, FeatureDetector) else model.target.backbone,  # type: ignore[union-attr,arg-type]
            weights,
        )
    model.to(o.device)
    assert o.arch is not None
    o = o.model_copy(
        update={
            "classes": list(classes),
            "lr": o.lr if o.lr is not None else DEFAULT_LR.get(o.arch, DEFAULT_LR[o.task]),
        }
    )
    run = _Training(
        o, meta, train_items, _project_fs(project), out, progress, storage_options,
        init_ckpt.version if init_ckpt is not None else None, len(calibration_ids),
    )  # fmt: skip
    if isinstance(model, FeatureDetector):
        return _train_feature_detector(model, run, feature_cache)
    return _train_on_images(model, run, user)


def _resolve_training(
    o: TrainOptions, init: str | Checkpoint | None, storage_options: dict[str, Any] | None
) -> tuple[TrainOptions, Checkpoint | None, Any]:
    """Check ``o``; ``(o with arch and augment decided, the init checkpoint, the user's
    target weights)``."""
    task = o.task
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if not 0.0 <= o.calibration_share < 1.0:
        raise UsageError(f"calibration share {o.calibration_share} must be in [0, 1)")
    if init is not None and o.target_weights is not None:
        raise UsageError(
            "give either --init CHECKPOINT (warm start) or --target-weights FILE, not both"
        )
    init_ckpt = load_checkpoint(init, storage_options=storage_options) if init is not None else None
    if o.freeze_target and init_ckpt is None and o.target_weights is None:
        raise UsageError(
            "training the loss module alone (freeze_target) needs the frozen model: "
            "--init CHECKPOINT or --target-weights FILE"
        )
    user = (
        read_target_weights(
            o.target_weights, task=task, arch=o.arch, storage_options=storage_options
        )
        if o.target_weights is not None
        else None
    )
    arch = user.arch if user is not None else o.arch
    if o.backbone is not None and arch is None and init_ckpt is None:
        arch = BACKBONE_ARCH[task]
    arch = arch or (init_ckpt.arch if init_ckpt is not None else DEFAULT_ARCH[task])
    on_backbone = arch == BACKBONE_ARCH[task]
    if (o.backbone_weights is not None or o.finetune_last_stage) and not on_backbone:
        raise UsageError(
            f"--backbone-weights and --finetune-last-stage are for the {BACKBONE_ARCH[task]} arch "
            f"(give --backbone NAME), not {arch}"
        )
    if on_backbone and init_ckpt is not None:
        recorded = init_ckpt.meta.get("model", {}).get("backbone")
        if (o.backbone or recorded) != recorded:
            raise UsageError(f"--init checkpoint has backbone {recorded!r}, not {o.backbone!r}")
    if arch not in ARCHS[task]:
        raise UsageError(f"unknown {task} arch {arch!r}; choose one of: {', '.join(ARCHS[task])}")
    augment = o.augment if o.augment is not None else arch == "fcos"
    _committee_config(o.committee_kind, o.committee_size, o.committee_epochs, task, arch)
    return o.model_copy(update={"arch": arch, "augment": augment}), init_ckpt, user


def _training_split(items: Iterable[Item], o: TrainOptions) -> tuple[list[Item], list[str]]:
    """The human-labeled items to train on, and the ids held out for calibration (sorted)."""
    train_items: list[Item] = []
    calibration_ids: list[str] = []
    skipped = 0
    for item in items:
        if item.error is not None or not item.has_human_label:
            continue
        if o.task == "classification" and item.class_label is None:
            skipped += 1
            continue
        if is_calibration(item.item_id, o.calibration_share):
            calibration_ids.append(item.item_id)
        else:
            train_items.append(item)
    if skipped:
        log.warning(
            "%d labeled items have no single class label and are not used for classification",
            skipped,
        )
    return train_items, sorted(calibration_ids)


def _training_classes(
    o: TrainOptions,
    train_items: list[Item],
    calibration_ids: list[str],
    init_ckpt: Checkpoint | None,
    user: Any,
) -> tuple[list[str], list[Item]]:
    """The classes of the model, and the training items whose labels are among them."""
    classes = o.classes
    if classes is None:
        if init_ckpt is not None:
            classes = init_ckpt.classes
        elif user is not None and user.classes:
            classes = user.classes
        elif o.task == "classification":
            classes = sorted({str(i.class_label) for i in train_items})
        else:
            classes = sorted(
                {a.label for i in train_items for a in i.annotations if a.box is not None}
            )
    if o.task == "classification":
        unknown = sorted({str(i.class_label) for i in train_items} - set(classes))
        if unknown:
            log.warning(
                "labels %s are not among the classes %s; their items are skipped", unknown, classes
            )
            train_items = [i for i in train_items if i.class_label in classes]
    if not train_items:
        raise UsageError(
            f"no human-labeled items to train on (after holding out {len(calibration_ids)} for calibration)"
        )
    if not classes:
        raise UsageError("no classes: the labeled items have no labels; give the project's classes")
    if user is not None and user.classes and list(classes) != user.classes:
        raise UsageError(
            f"--target-weights {o.target_weights} has classes {user.classes}, this training has {list(classes)}"
        )
    return list(classes), train_items


def _training_meta(
    o: TrainOptions,
    classes: list[str],
    train_items: list[Item],
    calibration_ids: list[str],
    init_ckpt: Checkpoint | None,
    user: Any,
) -> tuple[dict[str, Any], Any]:
    """The checkpoint metadata of the model to train, and the backbone weights to load."""
    arch = str(o.arch)
    on_backbone = arch == BACKBONE_ARCH[o.task]
    settings = dict(init_ckpt.meta.get("model") or {}) if init_ckpt is not None else {}
    if user is not None:
        settings.update(user.settings)
        if int(settings.get("in_channels", 3)) != 3:
            raise UsageError(
                f"--target-weights {o.target_weights}: its first layer takes "
                f"{settings['in_channels']} channels; project images are read as RGB (3)"
            )
    size = o.image_size or int(
        settings.get("image_size", DEFAULT_IMAGE_SIZE.get(arch, DEFAULT_IMAGE_SIZE[o.task]))
    )
    settings.update({"in_channels": 3, "image_size": size})
    weights = None
    if on_backbone:
        if init_ckpt is None:
            from difficulty.models.backbones import LITE0, resolve_weights

            settings["backbone"] = o.backbone or LITE0
            settings["finetune_last_stage"] = o.finetune_last_stage
            weights = resolve_weights(settings["backbone"], o.backbone_weights)
        if arch == "fcos":
            settings.setdefault("width", 48)
            settings.setdefault("head_convs", 2)
    settings.setdefault("width", 32)
    settings.setdefault("dropout", 0.2)
    meta: dict[str, Any] = {
        "task": o.task,
        "arch": arch,
        "classes": list(classes),
        "model": settings,
        "lossnet": o.lossnet.model_dump(),
        "data_hash": data_hash((i.item_id, _training_label(i, o.task)) for i in train_items),
        "calibration": {
            "rule": CALIBRATION_RULE,
            "share": o.calibration_share,
            "ids_hash": _ids_hash(calibration_ids),
            "count": len(calibration_ids),
        },
        "calibration_ids": calibration_ids,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if weights is not None:
        meta["backbone"] = {"name": settings["backbone"], **weights.record()}
    elif on_backbone and init_ckpt is not None:
        meta["backbone"] = init_ckpt.meta.get("backbone")
    return meta, weights


@dataclass
class _Training:
    """One training's resolved options (``classes``, ``arch``, ``lr`` and ``augment``
    decided), its checkpoint metadata, its items and where the checkpoint goes."""

    o: TrainOptions
    meta: dict[str, Any]
    items: list[Item]
    fs: ProjectFS
    out: str
    progress: bool
    storage_options: dict[str, Any] | None
    init_version: str | None
    calibration_count: int

    @property
    def lr(self) -> float:
        assert self.o.lr is not None
        return self.o.lr


def _train_on_images(model: nn.Module, run: _Training, user: Any) -> Checkpoint:
    """Train ``model`` on the images of ``run.items`` (and a bootstrap committee); save it."""
    o, meta = run.o, run.meta
    dataset = ItemDataset(
        run.items, run.fs, task=o.task, classes=list(o.classes or ()),
        image_size=int(meta["model"]["image_size"]), augment=bool(o.augment), seed=o.seed,
    )  # fmt: skip
    bs = max(1, min(o.batch_size, len(dataset)))
    drop_last = len(dataset) > bs and len(dataset) % bs == 1  # no lone item: it has no pair
    loader = _loader(dataset, bs, drop_last, o.num_workers, o.seed)
    samples = _GoodSamples()

    def batches(epoch: int) -> Iterable[Any]:
        dataset.epoch = epoch
        for batch in loader:
            ok = samples.good(batch)
            if ok:
                yield _to_device(ok, o.task, o.device)

    total_epochs = _effective_epochs(o.epochs, len(loader), o.min_steps)
    history = _fit(
        model,
        batches,
        _classification_step if o.task == "classification" else _detection_step,
        epochs=total_epochs,
        lr=run.lr,
        lossnet=o.lossnet,
        freeze_target=o.freeze_target,
        progress=run.progress,
        desc=f"train {o.arch}",
        clip=10.0 if o.task == "detection" else None,
    )
    meta["version"] = meta["model_version"] = _version(
        str(o.arch), meta["data_hash"], meta["created"]
    )
    meta["training"] = {
        "epochs": total_epochs, "epochs_asked": o.epochs, "batch_size": bs, "lr": run.lr,
        "seed": o.seed, "init": run.init_version,
        "target_weights": user.record() if user is not None else None,
        "freeze_target": o.freeze_target, "items": len(run.items),
        "skipped_items": sorted(samples.reported), "history": history,
    }  # fmt: skip
    committee = _committee_config(
        o.committee_kind, o.committee_size, o.committee_epochs, o.task, str(o.arch)
    )
    members = None
    if committee.kind == "bootstrap":
        members = _image_committee(model, run, committee, dataset, bs, drop_last, samples, loader)
    model.to("cpu")
    ckpt = save_checkpoint(
        run.out, model, meta, committee=members, storage_options=run.storage_options
    )
    log.info(
        "trained %s on %d items (%d held out for calibration) → %s",
        o.arch, len(run.items), run.calibration_count, run.out,
    )  # fmt: skip
    return ckpt


def _loader(dataset: Any, bs: int, drop_last: bool, num_workers: int, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=bs,
        shuffle=True,
        drop_last=drop_last,
        collate_fn=collate_samples,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


class _GoodSamples:
    """Drops the samples whose image could not be read, warning once per item."""

    def __init__(self) -> None:
        self.reported: set[str] = set()

    def good(self, samples: list[Sample]) -> list[Sample]:
        ok = []
        for s in samples:
            if s.error is None:
                ok.append(s)
            elif s.item_id not in self.reported:
                self.reported.add(s.item_id)
                log.warning("skipping item %s: %s", s.item_id, s.error)
        return ok


def _to_device(ok: list[Sample], task: str, device: str) -> Any:
    """A training batch of ``ok`` on ``device``: ``(images, targets)``."""
    images = [s.image for s in ok if s.image is not None]
    if task == "classification":
        return (
            torch.stack(images).to(device),
            torch.tensor([s.target for s in ok], device=device),
        )
    targets = [{k: v.to(device) for k, v in s.target.items()} for s in ok]
    return [im.to(device) for im in images], targets


def _image_committee(
    model: nn.Module,
    run: _Training,
    committee: CommitteeConfig,
    dataset: Any,
    bs: int,
    drop_last: bool,
    samples: _GoodSamples,
    loader: DataLoader,
) -> Any:
    """Train the bootstrap committee of ``model``'s target; records it in ``run.meta``."""
    o = run.o
    m_epochs = member_epochs(committee.epochs, len(loader), o.min_steps)

    def member_batches(member: int, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        resample = Subset(dataset, bootstrap_indices(len(dataset), member, o.seed).tolist())
        member_loader = DataLoader(
            resample,
            batch_size=bs,
            shuffle=True,
            drop_last=drop_last,
            collate_fn=collate_samples,
            num_workers=o.num_workers,
            generator=torch.Generator().manual_seed(o.seed * 7919 + member * 131 + epoch),
        )
        for batch in member_loader:
            ok = samples.good(batch)
            if ok:
                yield (
                    torch.stack([s.image for s in ok if s.image is not None]).to(o.device),
                    torch.tensor([s.target for s in ok], device=o.device),
                )

    members = train_members(
        model.target,  # type: ignore[arg-type]
        member_batches,
        members=committee.members,
        epochs=m_epochs,
        lr=run.lr,
        seed=o.seed,
        device=o.device,
    )
    run.meta["committee"] = _committee_meta(committee, m_epochs, run.lr, o.seed)
    return members

"""Running a checkpoint over items: everything the strategies and scorers need, per batch.

:func:`infer` streams :class:`InferenceBatch` es over any iterable of items (decoded by a
torch ``DataLoader``, with workers if asked); :func:`infer_arrays` does the same for
in-memory arrays (the active-learning benchmark).

Classification: ``probs`` ``(n, C)``; ``features`` ``(n, D)`` = the input of the last FC
(EGL, k-center); ``committee`` ``(M, n, C)``: when the checkpoint stores a bootstrap
committee (:mod:`difficulty.committee`), the class probabilities of its first ``M``
members (all of them when it has fewer); otherwise ``M`` MC-dropout samples of the last
layer (dropout before ``fc`` is the only stochastic layer, so the backbone runs once and
only ``fc(dropout(h))`` is sampled); ``predictions``: the arg-max class with its
probability as score and the whole ``probs`` dict.

Detection: per image ``box_probs`` ``(B_i, K+1)`` (column 0 = background) and
``box_scores`` ``(B_i,)`` of every kept detection (score > 0.01, after NMS, at most 100:
the low threshold is for uncertainty, which lives in the weak boxes), ``box_features``
``(B_i, D)`` and ``box_committee`` ``(M, B_i, K+1)``; ``features`` ``(n, E)`` = the pooled
backbone maps; ``predictions``: boxes (pixel ``xyxy`` in the original image, clipped) with
score ``≥ box_score_min`` (default 0.25) and class names.

``predicted_loss`` ``(n,)`` is the loss-prediction module's output for both tasks.
Items that carry ``error`` or whose image cannot be read are left out of the arrays and
listed in ``errors`` (``item_id → message``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from connectors.model import Annotation, Item, Prediction
from connectors.storage import ProjectFS
from difficulty.checkpoint import Checkpoint, load_checkpoint, load_checkpoint_meta
from difficulty.datasets import ItemStream, Sample, collate_samples
from difficulty.featurecache import FeatureCache, cache_key
from difficulty.items import project_fs as _project_fs
from difficulty.models.fcos import FeatureDetector

log = logging.getLogger(__name__)

__all__ = ["InferenceBatch", "infer", "infer_arrays", "load_checkpoint", "load_checkpoint_meta"]


@dataclass
class InferenceBatch:
    """Model outputs for the readable items of one batch (see the module docstring)."""

    item_ids: list[str]
    features: np.ndarray
    predicted_loss: np.ndarray
    probs: np.ndarray | None = None
    box_probs: list[np.ndarray] | None = None
    box_scores: list[np.ndarray] | None = None
    box_features: list[np.ndarray] | None = None
    box_committee: list[np.ndarray] | None = None
    committee: np.ndarray | None = None
    predictions: list[Prediction] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.item_ids)


@torch.no_grad()
def _classify(
    ckpt: Checkpoint,
    model: torch.nn.Module,
    x: torch.Tensor,
    ids: list[str],
    committee: int,
    errors: dict[str, str],
) -> InferenceBatch:
    out = model(x)
    probs = F.softmax(out.logits, dim=1)
    comm = None
    stored = ckpt.build_committee() if committee > 0 else []
    if stored:
        comm = torch.stack(
            [F.softmax(member.to(x.device)(x).logits, dim=1) for member in stored[:committee]]
        )
    elif committee > 0:
        target: Any = model.target
        target.dropout.train()
        try:
            comm = torch.stack(
                [
                    F.softmax(target.fc(target.dropout(out.embedding)), dim=1)
                    for _ in range(committee)
                ]
            )
        finally:
            target.dropout.eval()
    probs_np = probs.cpu().double().numpy()
    classes = ckpt.classes
    preds = []
    for item_id, p in zip(ids, probs_np, strict=True):
        best = int(p.argmax())
        preds.append(
            Prediction(
                item_id=item_id,
                annotations=[
                    Annotation(label=classes[best], score=float(min(1.0, max(0.0, p[best]))))
                ],
                probs={c: float(v) for c, v in zip(classes, p, strict=True)},
                model_version=ckpt.version,
                source=f"checkpoint:{ckpt.arch}",
            )
        )
    return InferenceBatch(
        item_ids=ids,
        features=out.embedding.cpu().double().numpy(),
        predicted_loss=out.predicted_loss.cpu().double().numpy(),
        probs=probs_np,
        committee=comm.cpu().double().numpy() if comm is not None else None,
        predictions=preds,
        errors=errors,
    )


@torch.no_grad()
def _detect(
    ckpt: Checkpoint,
    model: torch.nn.Module,
    samples: list[Sample],
    committee: int,
    errors: dict[str, str],
    box_score_min: float,
    device: str,
    feature_cache: FeatureCache | None = None,
) -> InferenceBatch:
    if feature_cache is not None and isinstance(model, FeatureDetector):
        missing = [s for s in samples if s.item_id not in feature_cache]
        if missing:
            maps = model.frozen_features([s.image.to(device) for s in missing])  # type: ignore[union-attr]
            for j, s in enumerate(missing):
                feature_cache.put(s.item_id, [m[j] for m in maps], s.size or (0, 0))
        cached = [feature_cache.get(s.item_id) or [] for s in samples]
        frozen = [torch.stack(level).to(device) for level in zip(*cached, strict=True)]
        outs = model.predict_frozen(
            frozen, [s.size or (0, 0) for s in samples], committee=committee
        )
    else:
        outs = model.predict([s.image.to(device) for s in samples], committee=committee)  # type: ignore[operator,union-attr]
    classes = ckpt.classes
    preds, box_probs, box_scores, box_feats, box_comm = [], [], [], [], []
    for s, o in zip(samples, outs, strict=True):
        width, height = s.size  # type: ignore[misc]
        boxes = o.boxes.cpu().double().numpy()
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        scores = o.scores.cpu().double().numpy()
        labels = o.labels.cpu().numpy()
        anns = [
            Annotation(
                label=classes[int(lab) - 1],
                box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
                score=float(min(1.0, sc)),
            )
            for b, sc, lab in zip(boxes, scores, labels, strict=True)
            if sc >= box_score_min and b[2] > b[0] and b[3] > b[1]
        ]
        preds.append(
            Prediction(
                item_id=s.item_id,
                annotations=anns,
                model_version=ckpt.version,
                source=f"checkpoint:{ckpt.arch}",
            )
        )
        box_probs.append(o.probs.cpu().double().numpy())
        box_scores.append(scores)
        box_feats.append(o.box_features.cpu().double().numpy())
        if o.committee is not None:
            box_comm.append(o.committee.cpu().double().numpy())
    return InferenceBatch(
        item_ids=[s.item_id for s in samples],
        features=torch.stack([o.embedding for o in outs]).cpu().double().numpy(),
        predicted_loss=np.array([o.predicted_loss for o in outs], dtype=np.float64),
        box_probs=box_probs,
        box_scores=box_scores,
        box_features=box_feats,
        box_committee=box_comm if committee > 0 else None,
        predictions=preds,
        errors=errors,
    )


def infer(
    checkpoint: str | Checkpoint,
    items: Iterable[Item],
    project: ProjectFS | Any,
    *,
    batch_size: int = 32,
    committee: int = 0,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = False,
    box_score_min: float = 0.25,
    storage_options: dict[str, Any] | None = None,
    feature_cache: FeatureCache | None = None,
) -> Iterator[InferenceBatch]:
    """Stream model outputs over ``items`` in batches of up to ``batch_size``.

    ``checkpoint``: a path/URL or a loaded :class:`Checkpoint`; ``project``: the
    :class:`ProjectFS` the item URIs are relative to (or a format object carrying it as
    ``.project``).  ``committee``: the number ``M`` of committee members (0: none) — the
    checkpoint's stored bootstrap members when it has them, else MC-dropout passes.
    ``feature_cache``: for an ``fcos`` checkpoint, frozen backbone maps are read from it
    (and the missing ones added), so a pool scored every cycle is run through the
    backbone once; its key must match the checkpoint (:func:`difficulty.featurecache.cache_key`).
    A batch whose items all failed to decode is still yielded (empty arrays, ``errors`` set).
    """
    ckpt = load_checkpoint(checkpoint, storage_options=storage_options)
    model = ckpt.build_model().to(device)
    task = ckpt.task
    if feature_cache is not None and feature_cache.key != cache_key(ckpt.meta):
        raise ValueError(
            f"the feature cache is for {feature_cache.key}, not for checkpoint {ckpt.version}"
        )
    settings = ckpt.meta.get("model") or {}
    stream = ItemStream(
        items,
        _project_fs(project),
        task=task,
        image_size=int(settings.get("image_size", 32)),
        channels=int(settings.get("in_channels", 3)),
    )
    loader = DataLoader(
        stream, batch_size=batch_size, collate_fn=collate_samples, num_workers=num_workers
    )
    for samples in tqdm(loader, desc="infer", unit="batch", disable=not progress, leave=False):
        errors = {s.item_id: str(s.error) for s in samples if s.error is not None}
        good = [s for s in samples if s.error is None]
        if not good:
            yield _empty(task, errors)
            continue
        if task == "classification":
            x = torch.stack([s.image for s in good]).to(device)
            yield _classify(ckpt, model, x, [s.item_id for s in good], committee, errors)
        else:
            yield _detect(
                ckpt, model, good, committee, errors, box_score_min, device, feature_cache
            )


def _empty(task: str, errors: dict[str, str]) -> InferenceBatch:
    if task == "classification":
        return InferenceBatch(
            item_ids=[],
            features=np.zeros((0, 0)),
            predicted_loss=np.zeros(0),
            probs=np.zeros((0, 0)),
            errors=errors,
        )
    return InferenceBatch(
        item_ids=[],
        features=np.zeros((0, 0)),
        predicted_loss=np.zeros(0),
        box_probs=[],
        box_scores=[],
        box_features=[],
        errors=errors,
    )


def infer_arrays(
    checkpoint: str | Checkpoint,
    x: np.ndarray,
    *,
    batch_size: int = 512,
    committee: int = 0,
    ids: list[str] | None = None,
    device: str = "cpu",
) -> InferenceBatch:
    """:func:`infer` for in-memory classification images ``x`` ``(N, C, H, W)`` or ``(N, H, W)``.

    Returns one :class:`InferenceBatch` for all ``N`` items (ids ``"0"…`` unless given).
    """
    ckpt = load_checkpoint(checkpoint)
    if ckpt.task != "classification":
        raise ValueError("infer_arrays serves classification checkpoints")
    model = ckpt.build_model().to(device)
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if xt.dim() == 3:
        xt = xt.unsqueeze(1)
    ids = [str(i) for i in (ids if ids is not None else range(xt.shape[0]))]
    parts = [
        _classify(
            ckpt, model, xt[s : s + batch_size].to(device), ids[s : s + batch_size], committee, {}
        )
        for s in range(0, xt.shape[0], batch_size)
    ]
    return InferenceBatch(
        item_ids=ids,
        features=np.concatenate([p.features for p in parts]),
        predicted_loss=np.concatenate([p.predicted_loss for p in parts]),
        probs=np.concatenate([p.probs for p in parts if p.probs is not None]),
        committee=np.concatenate([p.committee for p in parts if p.committee is not None], axis=1)
        if committee > 0
        else None,
        predictions=[q for p in parts for q in p.predictions],
    )


def predict_cached(
    ckpt: Checkpoint,
    item_ids: Iterable[str],
    feature_cache: FeatureCache,
    *,
    box_score_min: float = 0.25,
    batch_size: int = 32,
    device: str = "cpu",
) -> dict[str, Prediction]:
    """``item_id → Prediction`` of an ``fcos`` checkpoint from frozen maps already in
    ``feature_cache`` (no image is read); every id must be in the cache."""
    model = ckpt.build_model().to(device)
    ids = list(item_ids)
    missing = [i for i in ids if i not in feature_cache]
    if missing:
        raise ValueError(f"{len(missing)} items are not in the feature cache, e.g. {missing[0]}")
    out: dict[str, Prediction] = {}
    for begin in range(0, len(ids), batch_size):
        samples = [
            Sample(item_id=i, size=feature_cache.size_of(i))
            for i in ids[begin : begin + batch_size]
        ]
        batch = _detect(ckpt, model, samples, 0, {}, box_score_min, device, feature_cache)
        out.update((p.item_id, p) for p in batch.predictions)
    return out

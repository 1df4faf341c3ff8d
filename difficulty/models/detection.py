"""Detection target models with a loss-prediction module: torchvision SSDlite and Faster R-CNN.

Architectures (all from scratch: ``weights=None, weights_backbone=None``; ``num_classes`` is
the number of project classes **+ 1** for the background, label ``0``):

==========================  ===========================================================
``ssdlite``                 ``ssdlite320_mobilenet_v3_large``; taps: the six SSD feature maps
``fasterrcnn_mobilenet``    ``fasterrcnn_mobilenet_v3_large_fpn``; taps: the FPN levels
``fasterrcnn_resnet50``     ``fasterrcnn_resnet50_fpn``; taps: the FPN levels
==========================  ===========================================================

Every image is resized to ``image_size``×``image_size`` (``transform.fixed_size``; SSDlite
does this natively at 320), so the maps the module reads have the same shape in training
and inference and no padding enters the pooled features.

**Input**: a list of ``(3, H, W)`` float tensors in ``[0, 1]``; targets as torchvision wants
them: ``boxes`` ``(B, 4)`` pixel ``xyxy`` in the original image, ``labels`` ``(B,)`` int64 in
``1..K``.

**Per-image losses.**  torchvision detectors return batch-level losses, but the module is
trained on per-item losses, so:

* SSDlite runs the batch once (batched BatchNorm statistics as usual) and the loss is
  reduced per image with torchvision's own terms: smooth-L1 box loss over the image's
  matched anchors plus cross-entropy over its positives and its hard negatives (3:1), both
  divided by that image's number of matched anchors (torchvision divides the batch sums by
  the batch's total).  The detector is trained on the mean of these per-image losses.
* Faster R-CNN runs the detector once per image of the batch (anchor and proposal sampling
  are per image anyway), so each image's loss is exactly torchvision's loss for that image
  (RPN objectness + RPN box + classifier + box regression); the detector is trained on their
  mean.  BatchNorm then sees one image per pass; that works because every image is
  resized to ``image_size`` a side, so even the deepest map has several positions
  (SSDlite's last maps are 1×1, which is why it is not run image by image).

**Inference** keeps, for every kept detection, which anchor (SSD) or proposal (Faster
R-CNN) it came from, so each box carries the full softmax over ``K + 1`` classes
(``box_probs``), the input of the classification layer at that box (``box_features``, for
EGL; SSD levels have different widths and are zero-padded to the widest, which keeps the
norm) and, for a committee, the class probabilities of ``M`` MC-dropout passes of the head
on the same boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import boxes as box_ops

from difficulty.models.lossnet import LossNet, LossNetConfig

DETECTION_ARCHS = ("ssdlite", "fasterrcnn_mobilenet", "fasterrcnn_resnet50")


def build_detector(
    arch: str,
    num_classes: int,
    *,
    image_size: int = 320,
    score_thresh: float = 0.01,
    detections_per_img: int = 100,
) -> nn.Module:
    """A torchvision detector from scratch; ``num_classes`` includes the background."""
    from torchvision.models import detection as tvd

    if arch == "ssdlite":
        model = tvd.ssdlite320_mobilenet_v3_large(
            weights=None,
            weights_backbone=None,
            num_classes=num_classes,
            score_thresh=score_thresh,
            detections_per_img=detections_per_img,
        )
    elif arch in ("fasterrcnn_mobilenet", "fasterrcnn_resnet50"):
        builder = (
            tvd.fasterrcnn_mobilenet_v3_large_fpn
            if arch == "fasterrcnn_mobilenet"
            else tvd.fasterrcnn_resnet50_fpn
        )
        model = builder(
            weights=None,
            weights_backbone=None,
            num_classes=num_classes,
            min_size=image_size,
            max_size=image_size,
            box_score_thresh=score_thresh,
            box_detections_per_img=detections_per_img,
        )
    else:
        raise ValueError(
            f"unknown detection arch {arch!r}; choose one of: {', '.join(DETECTION_ARCHS)}"
        )
    model.transform.min_size = (image_size,)
    model.transform.max_size = image_size
    model.transform.fixed_size = (image_size, image_size)
    return model


@dataclass
class DetectionStep:
    """Training pass: ``loss`` ``(B,)`` per-image detector loss, ``predicted_loss`` ``(B,)``."""

    loss: torch.Tensor
    predicted_loss: torch.Tensor


@dataclass
class DetectionOutput:
    """Inference for one image; boxes pixel ``xyxy`` in the original image.

    ``boxes`` ``(B, 4)``, ``scores`` ``(B,)``, ``labels`` ``(B,)`` in ``1..K``, ``probs``
    ``(B, K+1)`` (column 0 = background), ``box_features`` ``(B, D)``, ``committee``
    ``(M, B, K+1)`` or ``None``, ``predicted_loss`` scalar, ``embedding`` ``(E,)`` (pooled taps).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    probs: torch.Tensor
    box_features: torch.Tensor
    committee: torch.Tensor | None
    predicted_loss: float
    embedding: torch.Tensor


def _pool(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [f.mean(dim=(2, 3)) for f in features]


class LossPredictionDetector(nn.Module):
    """A torchvision detector plus a :class:`LossNet` on its backbone feature maps."""

    detector: Any  # a torchvision SSD or FasterRCNN (dynamic attributes)

    def __init__(
        self,
        arch: str,
        num_classes: int,
        lossnet: LossNetConfig,
        *,
        image_size: int = 320,
        committee_dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.image_size = image_size
        self.committee_dropout = committee_dropout
        self.detector = build_detector(arch, num_classes, image_size=image_size)
        self.is_ssd = arch == "ssdlite"
        self._taps: list[torch.Tensor] = []
        self.detector.backbone.register_forward_hook(self._keep_taps)
        self.tap_channels = self._probe_channels()
        self.lossnet = LossNet(self.tap_channels, hidden=lossnet.hidden)

    def _keep_taps(self, module: nn.Module, inputs: object, output: object) -> None:
        feats = list(output.values()) if isinstance(output, dict) else [output]
        self._taps = feats  # type: ignore[assignment]

    @torch.no_grad()
    def _probe_channels(self) -> list[int]:
        was_training = self.detector.training
        self.detector.eval()
        size = self.image_size
        self.detector.backbone(torch.zeros(1, 3, size, size))
        self.detector.train(was_training)
        return [int(t.shape[1]) for t in self._taps]

    # -- training ----------------------------------------------------------------------
    def forward(
        self,
        images: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        *,
        detach_taps: bool = False,
    ) -> DetectionStep:
        """Per-image losses and predicted losses for a batch (the detector must be in train mode)."""
        if self.is_ssd:
            loss, pooled = self._ssd_losses(images, targets)
        else:
            losses, pooled_per_image = [], []
            for image, target in zip(images, targets, strict=True):
                loss_dict = self.detector([image], [target])
                losses.append(sum(loss_dict.values()))
                pooled_per_image.append(_pool(self._taps))
            loss = torch.stack(losses)
            pooled = [torch.cat(level, dim=0) for level in zip(*pooled_per_image, strict=True)]
        if detach_taps:
            pooled = [p.detach() for p in pooled]
        return DetectionStep(loss=loss, predicted_loss=self.lossnet(pooled))

    def _ssd_losses(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        ssd = self.detector
        batch, targets = ssd.transform(images, targets)
        features = list(ssd.backbone(batch.tensors).values())
        head = ssd.head(features)
        anchors = ssd.anchor_generator(batch, features)
        per_image = []
        cls_all = head["cls_logits"]
        for i, (target, anchors_i) in enumerate(zip(targets, anchors, strict=True)):
            if target["boxes"].numel() == 0:
                matched = torch.full(
                    (anchors_i.size(0),), -1, dtype=torch.int64, device=anchors_i.device
                )
            else:
                matched = ssd.proposal_matcher(box_ops.box_iou(target["boxes"], anchors_i))
            fg = torch.where(matched >= 0)[0]
            fg_matched = matched[fg]
            num_fg = fg.numel()
            reg_target = ssd.box_coder.encode_single(target["boxes"][fg_matched], anchors_i[fg])
            bbox_loss = F.smooth_l1_loss(
                head["bbox_regression"][i, fg], reg_target, reduction="sum"
            )
            cls_target = torch.zeros(anchors_i.size(0), dtype=torch.int64, device=anchors_i.device)
            cls_target[fg] = target["labels"][fg_matched]
            cls_loss = F.cross_entropy(cls_all[i], cls_target, reduction="none")
            positive = cls_target > 0
            negative_loss = cls_loss.clone()
            negative_loss[positive] = -float("inf")
            _, order = negative_loss.sort(descending=True)
            hard_negative = order.sort()[1] < ssd.neg_to_pos_ratio * num_fg
            per_image.append(
                (bbox_loss + cls_loss[positive].sum() + cls_loss[hard_negative].sum())
                / max(1, num_fg)
            )
        return torch.stack(per_image), _pool(features)

    # -- inference ---------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: list[torch.Tensor], *, committee: int = 0) -> list[DetectionOutput]:
        """Detections with per-box class probabilities (the model must be in eval mode)."""
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch, _ = self.detector.transform(images)
        features_od = self.detector.backbone(batch.tensors)
        features = list(features_od.values()) if isinstance(features_od, dict) else [features_od]
        pooled = _pool(features)
        predicted = self.lossnet(pooled)
        embedding = torch.cat(pooled, dim=1)
        if self.is_ssd:
            raw = self._ssd_detect(batch, features, committee)
        else:
            raw = self._rcnn_detect(batch, features_od, committee)
        sized = self.detector.transform.postprocess(
            [{"boxes": r[0]} for r in raw], batch.image_sizes, original_sizes
        )
        outs = []
        for i, (r, s) in enumerate(zip(raw, sized, strict=True)):
            _, scores, labels, probs, feats, comm = r
            outs.append(
                DetectionOutput(
                    s["boxes"],
                    scores,
                    labels,
                    probs,
                    feats,
                    comm,
                    float(predicted[i]),
                    embedding[i],
                )
            )
        return outs

    def _ssd_detect(
        self, batch: object, features: list[torch.Tensor], committee: int
    ) -> list[tuple]:
        ssd = self.detector
        last_inputs: list[torch.Tensor] = []
        handles = [
            block[-1].register_forward_pre_hook(lambda m, inp: last_inputs.append(inp[0]))
            for block in ssd.head.classification_head.module_list
        ]
        try:
            head = ssd.head(features)
        finally:
            for h in handles:
                h.remove()
        anchors = ssd.anchor_generator(batch, features)
        probs_all = F.softmax(head["cls_logits"], dim=-1)
        widths = [t.shape[1] for t in last_inputs]
        per_loc = [
            ssd.anchor_generator.num_anchors_per_location()[k] for k in range(len(last_inputs))
        ]
        level_sizes = [
            t.shape[2] * t.shape[3] * a for t, a in zip(last_inputs, per_loc, strict=True)
        ]
        offsets = torch.tensor([0, *level_sizes]).cumsum(0)
        members = []
        for _ in range(committee):
            dropped = [F.dropout(f, self.committee_dropout, training=True) for f in features]
            members.append(F.softmax(ssd.head.classification_head(dropped), dim=-1))
        out = []
        for i, image_shape in enumerate(batch.image_sizes):  # type: ignore[attr-defined]
            boxes_all = box_ops.clip_boxes_to_image(
                ssd.box_coder.decode_single(head["bbox_regression"][i], anchors[i]), image_shape
            )
            keep_boxes, keep_scores, keep_labels, keep_idx = [], [], [], []
            scores = probs_all[i]
            for label in range(1, scores.size(-1)):
                score = scores[:, label]
                idx = torch.where(score > ssd.score_thresh)[0]
                top = min(ssd.topk_candidates, idx.numel())
                s, order = score[idx].topk(top)
                idx = idx[order]
                keep_boxes.append(boxes_all[idx])
                keep_scores.append(s)
                keep_labels.append(torch.full_like(idx, label))
                keep_idx.append(idx)
            b, s, lab, idx = (
                torch.cat(v) for v in (keep_boxes, keep_scores, keep_labels, keep_idx)
            )
            keep = box_ops.batched_nms(b, s, lab, ssd.nms_thresh)[: ssd.detections_per_img]
            idx = idx[keep]
            level = torch.bucketize(idx, offsets[1:], right=True)
            feats = torch.zeros(idx.numel(), max(widths))
            for k in range(len(last_inputs)):
                sel = torch.where(level == k)[0]
                if sel.numel() == 0:
                    continue
                local = (idx[sel] - offsets[k]) // per_loc[k]
                w = last_inputs[k].shape[3]
                feats[sel, : widths[k]] = last_inputs[k][i, :, local // w, local % w].T
            comm = torch.stack([m[i, idx] for m in members]) if members else None
            out.append((b[keep], s[keep], lab[keep], probs_all[i, idx], feats, comm))
        return out

    def _rcnn_detect(
        self, batch: object, features: dict[str, torch.Tensor], committee: int
    ) -> list[tuple]:
        rcnn = self.detector
        heads = rcnn.roi_heads
        proposals, _ = rcnn.rpn(batch, features)
        image_sizes = batch.image_sizes  # type: ignore[attr-defined]
        rep = heads.box_head(heads.box_roi_pool(features, proposals, image_sizes))
        class_logits, box_regression = heads.box_predictor(rep)
        members = [
            F.softmax(
                heads.box_predictor(F.dropout(rep, self.committee_dropout, training=True))[0], -1
            )
            for _ in range(committee)
        ]
        counts = [p.shape[0] for p in proposals]
        decoded = heads.box_coder.decode(box_regression, proposals).split(counts)
        probs_split = F.softmax(class_logits, -1).split(counts)
        rep_split = rep.split(counts)
        member_split = [m.split(counts) for m in members]
        out = []
        for i, (boxes, probs, image_shape) in enumerate(
            zip(decoded, probs_split, image_sizes, strict=True)
        ):
            k = probs.shape[1]
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)[:, 1:].reshape(-1, 4)
            scores = probs[:, 1:].reshape(-1)
            labels = torch.arange(1, k).repeat(probs.shape[0])
            prop = torch.arange(probs.shape[0]).repeat_interleave(k - 1)
            sel = torch.where(scores > heads.score_thresh)[0]
            boxes, scores, labels, prop = boxes[sel], scores[sel], labels[sel], prop[sel]
            sel = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels, prop = boxes[sel], scores[sel], labels[sel], prop[sel]
            keep = box_ops.batched_nms(boxes, scores, labels, heads.nms_thresh)[
                : heads.detections_per_img
            ]
            prop = prop[keep]
            comm = torch.stack([m[i][prop] for m in member_split]) if member_split else None
            out.append(
                (boxes[keep], scores[keep], labels[keep], probs[prop], rep_split[i][prop], comm)
            )
        return out


def build_detection_model(
    arch: str, classes: list[str], lossnet: LossNetConfig, *, image_size: int = 320
) -> LossPredictionDetector:
    """The detector for project ``classes`` (``num_classes = len(classes) + 1``)."""
    return LossPredictionDetector(arch, len(classes) + 1, lossnet, image_size=image_size)

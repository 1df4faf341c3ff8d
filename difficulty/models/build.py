"""Build a model (target + loss-prediction module) from plain checkpoint metadata."""

from __future__ import annotations

from typing import Any

from torch import nn

from difficulty.models.classification import (
    CLASSIFICATION_ARCHS,
    LossPredictionClassifier,
    build_classifier,
)
from difficulty.models.detection import DETECTION_ARCHS, build_detection_model
from difficulty.models.lossnet import LossNetConfig

TASKS = ("classification", "detection")
DEFAULT_ARCH = {"classification": "small_cnn", "detection": "ssdlite"}
ARCHS = {"classification": CLASSIFICATION_ARCHS, "detection": (*DETECTION_ARCHS, "fcos")}
BACKBONE_ARCH = {"classification": "backbone", "detection": "fcos"}
"""The architecture built on a pretrained backbone (``--backbone``), per task."""


def model_from_meta(meta: dict[str, Any]) -> nn.Module:
    """The untrained model that ``meta`` (checkpoint metadata) describes.

    Classification: :class:`~difficulty.models.classification.LossPredictionClassifier`;
    detection: :class:`~difficulty.models.detection.LossPredictionDetector`.
    """
    task, arch, classes = meta["task"], meta["arch"], list(meta["classes"])
    settings = dict(meta.get("model") or {})
    lossnet = LossNetConfig(**(meta.get("lossnet") or {}))
    if task == "classification":
        target = build_classifier(
            arch,
            len(classes),
            in_channels=int(settings.get("in_channels", 3)),
            image_size=int(settings.get("image_size", 32)),
            width=int(settings.get("width", 32)),
            dropout=float(settings.get("dropout", 0.2)),
            small_input=(
                bool(settings["small_input"]) if settings.get("small_input") is not None else None
            ),
            backbone=settings.get("backbone"),
            finetune_last_stage=bool(settings.get("finetune_last_stage", False)),
        )
        return LossPredictionClassifier(target, lossnet)
    if task == "detection" and arch == "fcos":
        from difficulty.models.fcos import FeatureDetector

        return FeatureDetector(
            len(classes) + 1,
            lossnet,
            backbone=str(settings.get("backbone", "efficientnet_lite0")),
            image_size=int(settings.get("image_size", 320)),
            width=int(settings.get("width", 48)),
            head_convs=int(settings.get("head_convs", 2)),
            finetune_last_stage=bool(settings.get("finetune_last_stage", False)),
        )
    if task == "detection":
        return build_detection_model(
            arch, classes, lossnet, image_size=int(settings.get("image_size", 320))
        )
    raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")

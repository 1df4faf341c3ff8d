"""Classification target models with tapped intermediate blocks.

Both models map images ``(N, C_in, H, W)`` float32 in ``[0, 1]`` to
:class:`ClassifierOutput`: ``logits`` ``(N, K)``, ``taps`` (the feature maps the
loss-prediction module reads, ``(N, C_k, H_k, W_k)``) and ``embedding`` ``(N, D)``, the
input of the last linear layer ``fc`` (used by EGL and by k-center diversity).

* ``small_cnn`` — three conv blocks (each tapped) for tiny images (8×8 digits, 32×32),
  global average pooling, dropout, ``fc``;
* ``resnet18`` — torchvision ResNet-18 (``weights=None``) with taps on ``layer1``…``layer4``;
  for inputs of 64 px or less the stem is the CIFAR one (3×3 stride-1 conv, no max-pool),
  as in the paper's CIFAR-10 experiments;
* ``backbone`` — a pretrained :class:`~difficulty.models.backbones.FeatureBackbone`
  (``efficientnet_lite0`` or a torchvision model, frozen; optionally its stride-32 stage
  fine-tuned) with taps on its stride 8/16/32 maps, global average pooling of the last,
  dropout, ``fc`` — the same backbone the ``fcos`` detector uses.

Dropout before ``fc`` (``dropout`` > 0) is what the MC-dropout committee samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from difficulty.models.lossnet import LossNet, LossNetConfig

CLASSIFICATION_ARCHS = ("small_cnn", "resnet18", "backbone")


@dataclass
class ClassifierOutput:
    """``logits`` ``(N, K)``, ``taps`` list of ``(N, C_k, H_k, W_k)``, ``embedding`` ``(N, D)``."""

    logits: torch.Tensor
    taps: list[torch.Tensor]
    embedding: torch.Tensor


class TappedClassifier(nn.Module):
    """Base: subclasses set ``tap_channels``, ``embed_dim``, ``fc`` and ``dropout``."""

    tap_channels: list[int]
    embed_dim: int
    fc: nn.Linear
    dropout: nn.Dropout

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        taps, embedding = self.features(x)
        logits = self.fc(self.dropout(embedding))
        return ClassifierOutput(logits=logits, taps=taps, embedding=embedding)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(TappedClassifier):
    """Three conv blocks of width ``w, 2w, 4w``; 2×2 max-pool after the first two."""

    def __init__(
        self, num_classes: int, in_channels: int = 3, width: int = 32, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [_block(in_channels, width), _block(width, 2 * width), _block(2 * width, 4 * width)]
        )
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.tap_channels = [width, 2 * width, 4 * width]
        self.embed_dim = 4 * width
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.embed_dim, num_classes)

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            taps.append(x)
            if i < len(self.blocks) - 1:
                x = self.pool(x)
        return taps, x.mean(dim=(2, 3))


class ResNet18Tapped(TappedClassifier):
    """torchvision ResNet-18 from scratch with taps on ``layer1``…``layer4``."""

    def __init__(
        self, num_classes: int, in_channels: int = 3, small_input: bool = True, dropout: float = 0.2
    ) -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None, num_classes=num_classes)
        if small_input:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.tap_channels = [64, 128, 256, 512]
        self.embed_dim = 512
        self.dropout = nn.Dropout(dropout)
        self.fc = net.fc

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self.stem(x)
        taps = []
        for layer in self.layers:
            x = layer(x)
            taps.append(x)
        return taps, x.mean(dim=(2, 3))


class BackboneClassifier(TappedClassifier):
    """A pretrained :class:`~difficulty.models.backbones.FeatureBackbone` with a linear head."""

    def __init__(
        self,
        num_classes: int,
        backbone: str,
        *,
        finetune_last_stage: bool = False,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        from difficulty.models.backbones import FeatureBackbone

        self.backbone = FeatureBackbone(backbone, finetune_last_stage=finetune_last_stage)
        self.tap_channels = list(self.backbone.channels)
        self.embed_dim = self.tap_channels[-1]
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.embed_dim, num_classes)

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        taps = self.backbone(x)
        return taps, taps[-1].mean(dim=(2, 3))


def build_classifier(
    arch: str,
    num_classes: int,
    *,
    in_channels: int = 3,
    image_size: int = 32,
    width: int = 32,
    dropout: float = 0.2,
    small_input: bool | None = None,
    backbone: str | None = None,
    finetune_last_stage: bool = False,
) -> TappedClassifier:
    """A classification target model by name (see :data:`CLASSIFICATION_ARCHS`).

    ``small_input`` (ResNet-18): the CIFAR stem; default ``image_size <= 64``.  Weights
    brought from a plain torchvision ResNet-18 have the ImageNet stem (7×7 conv, max-pool)
    and set it to ``False``.  ``backbone`` (arch ``backbone``): its name; the pretrained
    weights are loaded by the caller (:func:`~difficulty.models.backbones.load_backbone_weights`).
    """
    if arch == "small_cnn":
        return SmallCNN(num_classes, in_channels=in_channels, width=width, dropout=dropout)
    if arch == "resnet18":
        return ResNet18Tapped(
            num_classes,
            in_channels=in_channels,
            small_input=image_size <= 64 if small_input is None else small_input,
            dropout=dropout,
        )
    if arch == "backbone":
        if backbone is None:
            raise ValueError("arch 'backbone' needs the backbone's name")
        return BackboneClassifier(
            num_classes, backbone, finetune_last_stage=finetune_last_stage, dropout=dropout
        )
    raise ValueError(
        f"unknown classification arch {arch!r}; choose one of: {', '.join(CLASSIFICATION_ARCHS)}"
    )


@dataclass
class ClassificationStep:
    """One forward pass: ``logits`` ``(N, K)``, ``embedding`` ``(N, D)``, ``predicted_loss`` ``(N,)``."""

    logits: torch.Tensor
    embedding: torch.Tensor
    predicted_loss: torch.Tensor


class LossPredictionClassifier(nn.Module):
    """A tapped classifier plus a :class:`LossNet` reading its taps.

    ``forward(x, detach_taps=...)``: with ``detach_taps`` the module's gradient does not
    reach the target model (late epochs, or a frozen target model).
    """

    def __init__(self, target: TappedClassifier, lossnet: LossNetConfig) -> None:
        super().__init__()
        self.target = target
        self.lossnet = LossNet(target.tap_channels, hidden=lossnet.hidden)

    def forward(self, x: torch.Tensor, *, detach_taps: bool = False) -> ClassificationStep:
        out = self.target(x)
        taps = [t.detach() for t in out.taps] if detach_taps else out.taps
        return ClassificationStep(out.logits, out.embedding, self.lossnet(taps))


class HookedClassifier(TappedClassifier):
    """A user's own classifier (any ``nn.Module`` returning logits) seen as a tapped one.

    ``taps``: names of submodules (``dict(model.named_modules())`` keys) whose outputs
    ``(N, C_k, H_k, W_k)`` the loss-prediction module reads; ``fc``: the name of the last
    ``nn.Linear`` (its input is the embedding).  ``tap_channels`` are found with one
    forward pass on ``example`` ``(1, C, H, W)``.  Meant for training the module alone on
    top of the frozen model (``freeze_target=True``); the dropout committee does not apply
    (``dropout`` is identity).
    """

    def __init__(self, model: nn.Module, taps: list[str], fc: str, example: torch.Tensor) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        missing = [n for n in [*taps, fc] if n not in modules]
        if missing:
            raise ValueError(
                f"modules {missing} not found in the model; it has: {', '.join(n for n in modules if n)}"
            )
        last = modules[fc]
        if not isinstance(last, nn.Linear):
            raise ValueError(f"module {fc!r} is a {type(last).__name__}, expected nn.Linear")
        self.model = model
        self.fc = last
        self.dropout = nn.Dropout(0.0)
        self._outputs: dict[str, torch.Tensor] = {}
        self._embedding: torch.Tensor | None = None
        self.tap_names = list(taps)
        for name in taps:
            modules[name].register_forward_hook(self._keeper(name))
        last.register_forward_pre_hook(self._keep_embedding)
        with torch.no_grad():
            was = model.training
            model.eval()
            model(example)
            model.train(was)
        self.tap_channels = [int(self._outputs[n].shape[1]) for n in taps]
        self.embed_dim = int(last.in_features)

    def _keeper(self, name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            self._outputs[name] = output

        return keep

    def _keep_embedding(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._embedding = inputs[0]

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        logits = self.model(x)
        if self._embedding is None:
            raise RuntimeError("the last linear layer was not called in the forward pass")
        return ClassifierOutput(
            logits=logits,
            taps=[self._outputs[n] for n in self.tap_names],
            embedding=self._embedding,
        )

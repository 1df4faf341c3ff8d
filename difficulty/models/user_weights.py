"""A user's own trained target model as the starting weights (``--target-weights FILE``).

The file is either

* a plain ``state_dict`` — ``torch.save(model.state_dict(), FILE)`` — of one of the
  supported architectures built for the project's classes:

  ==========================  ================================================================
  ``resnet18``                ``torchvision.models.resnet18(num_classes=K)`` (ImageNet stem:
                              7×7 conv + max-pool; a 3×3 ``conv1`` is taken as the CIFAR stem)
  ``small_cnn``               :class:`~difficulty.models.classification.SmallCNN` (width and
                              input channels are read from the weights)
  ``ssdlite``                 ``ssdlite320_mobilenet_v3_large(num_classes=K + 1)``
  ``fasterrcnn_mobilenet``    ``fasterrcnn_mobilenet_v3_large_fpn(num_classes=K + 1)``
  ``fasterrcnn_resnet50``     ``fasterrcnn_resnet50_fpn(num_classes=K + 1)``
  ==========================  ================================================================

  (a ``{"state_dict": …}`` or ``{"model": …}`` wrapper and a ``module.`` prefix from
  ``DataParallel`` are accepted); or
* a labeltriage checkpoint, whose target model is taken (its loss module is not).

The weights must fit the architecture exactly: every parameter and buffer present with
the same shape (only BatchNorm's ``num_batches_tracked`` counters may be missing, as in
models saved with frozen BatchNorm).  Otherwise :class:`~connectors.errors.UsageError`
names the missing, unexpected and mis-shaped keys.  The file is read with
``torch.load(weights_only=True)``: it never runs code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from connectors.errors import InputError, UsageError
from difficulty.checkpoint import FORMAT
from difficulty.models.classification import CLASSIFICATION_ARCHS, LossPredictionClassifier
from difficulty.models.detection import DETECTION_ARCHS
from difficulty.torchfile import is_state_dict, read_torch_file

TARGET_PREFIX = {"classification": "target.", "detection": "detector."}
"""Where the target model's weights sit in a labeltriage model's ``state_dict``."""

_ARCHS = {"classification": CLASSIFICATION_ARCHS, "detection": DETECTION_ARCHS}
_SHOWN = 4  # keys named per kind of problem


@dataclass
class TargetWeights:
    """Target-model weights read from a file, keyed as the target module expects them.

    ``state``: classification → keys of the tapped classifier (``model.target``);
    detection → keys of the torchvision detector (``model.detector``).  ``settings``:
    model settings the weights imply (checkpoint ``meta["model"]`` entries such as
    ``width``, ``in_channels``, ``small_input``).  ``kind``: ``state_dict`` or ``checkpoint``.
    """

    path: str
    arch: str
    state: dict[str, torch.Tensor]
    settings: dict[str, Any] = field(default_factory=dict)
    kind: str = "state_dict"
    sha256: str = ""
    classes: list[str] | None = None

    def record(self) -> dict[str, Any]:
        """Plain data for the checkpoint's metadata."""
        return {"file": self.path, "kind": self.kind, "sha256": self.sha256, "arch": self.arch}


def _unwrap(blob: Any) -> Any:
    if isinstance(blob, dict) and not is_state_dict(blob):
        for key in ("state_dict", "model", "model_state_dict"):
            if is_state_dict(blob.get(key)):
                return blob[key]
    return blob


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def guess_arch(task: str, keys: set[str]) -> str | None:
    """The architecture whose characteristic keys ``keys`` has, or ``None``."""
    if task == "classification":
        if "blocks.2.3.weight" in keys:
            return "small_cnn"
        if "layer4.1.conv2.weight" in keys or "layers.3.1.conv2.weight" in keys:
            return "resnet18"
        return None
    if any(k.startswith("head.classification_head.") for k in keys):
        return "ssdlite"
    if "backbone.body.layer4.2.conv3.weight" in keys:
        return "fasterrcnn_resnet50"
    if any(k.startswith("rpn.head.") for k in keys) and "backbone.body.0.0.weight" in keys:
        return "fasterrcnn_mobilenet"
    return None


_RESNET_RENAMES = (
    ("conv1.", "stem.0."),
    ("bn1.", "stem.1."),
    *[(f"layer{i}.", f"layers.{i - 1}.") for i in range(1, 5)],
)


def _from_torchvision_resnet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ResNet-18 keys (``conv1``, ``bn1``, ``layer1``…) → :class:`ResNet18Tapped` keys."""
    out = {}
    for key, value in state.items():
        for old, new in _RESNET_RENAMES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def _implied_settings(arch: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    if arch == "small_cnn" and "blocks.0.0.weight" in state:
        w = state["blocks.0.0.weight"]
        return {"width": int(w.shape[0]), "in_channels": int(w.shape[1])}
    if arch == "resnet18" and "stem.0.weight" in state:
        w = state["stem.0.weight"]
        return {"in_channels": int(w.shape[1]), "small_input": int(w.shape[-1]) == 3}
    return {}


def read_target_weights(
    path: str,
    *,
    task: str,
    arch: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> TargetWeights:
    """Read ``path`` (a plain ``state_dict`` or a labeltriage checkpoint) as target weights.

    ``arch``: the architecture (default: the checkpoint's, else guessed from the keys).
    Raises :class:`UsageError` when the file does not exist, is for another task or
    architecture, or the architecture cannot be told; :class:`InputError` when it is not
    a weights file at all.  Whether the weights fit is checked by :func:`load_target_weights`.
    """
    blob, data = read_torch_file(path, storage_options=storage_options, what="target weights")
    sha = hashlib.sha256(data).hexdigest()
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        meta = blob.get("meta") or {}
        if meta.get("task") != task:
            raise UsageError(
                f"--target-weights {path} is a {meta.get('task')} checkpoint, not {task}"
            )
        if arch is not None and meta.get("arch") != arch:
            raise UsageError(
                f"--target-weights {path} is a {meta.get('arch')} checkpoint, not {arch}"
            )
        ckpt_arch = str(meta.get("arch"))
        if ckpt_arch not in _ARCHS[task]:
            raise UsageError(
                f"--target-weights {path}: its model ({ckpt_arch}) cannot be rebuilt from a file"
            )
        settings = {
            k: v
            for k, v in dict(meta.get("model") or {}).items()
            if k in ("in_channels", "width", "dropout", "small_input", "image_size")
        }
        if ckpt_arch == "resnet18" and "small_input" not in settings:
            settings["small_input"] = int(settings.get("image_size", 32)) <= 64
        return TargetWeights(
            path=path,
            arch=ckpt_arch,
            state=_strip(blob["state_dict"], TARGET_PREFIX[task]),
            settings=settings,
            kind="checkpoint",
            sha256=sha,
            classes=[str(c) for c in meta.get("classes") or []],
        )
    state = _unwrap(blob)
    if not is_state_dict(state):
        raise InputError(
            "not a state_dict (expected torch.save(model.state_dict()): a dict of tensors)",
            file=path,
        )
    if all(k.startswith("module.") for k in state):
        state = _strip(state, "module.")
    keys = set(state)
    if arch is None:
        arch = guess_arch(task, keys)
        if arch is None:
            raise UsageError(
                f"--target-weights {path}: cannot tell the architecture from its keys; give --arch "
                f"({', '.join(_ARCHS[task])})"
            )
    elif arch not in _ARCHS[task]:
        raise UsageError(f"unknown {task} arch {arch!r}; choose one of: {', '.join(_ARCHS[task])}")
    if arch == "resnet18" and "conv1.weight" in keys:
        state = _from_torchvision_resnet(state)
    return TargetWeights(
        path=path, arch=arch, state=dict(state), settings=_implied_settings(arch, state), sha256=sha
    )


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return f"{shown} (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else shown


def target_module(model: nn.Module) -> nn.Module:
    """The target part of a labeltriage model (the classifier, or the torchvision detector)."""
    return model.target if isinstance(model, LossPredictionClassifier) else model.detector  # type: ignore[return-value]


def load_target_weights(model: nn.Module, weights: TargetWeights, *, classes: list[str]) -> None:
    """Copy ``weights`` into ``model``'s target part, refusing any that do not fit exactly.

    Raises :class:`UsageError` naming (briefly) the missing, unexpected and mis-shaped keys.
    """
    target = target_module(model)
    expected = target.state_dict()
    missing = [
        k for k in expected if k not in weights.state and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in weights.state if k not in expected]
    misshaped = [
        f"{k} {tuple(weights.state[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in weights.state and weights.state[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        if misshaped:
            outputs = f"{len(classes)} classes" + (
                "" if isinstance(model, LossPredictionClassifier) else " + background"
            )
            problems.append(
                f"shape mismatch: {_listing(misshaped)} (the model has {outputs}: {', '.join(classes)})"
            )
        raise UsageError(
            f"--target-weights {weights.path} does not fit {weights.arch}: {'; '.join(problems)}"
        )
    state = {k: v for k, v in expected.items() if k not in weights.state}  # BatchNorm counters
    state.update(weights.state)
    target.load_state_dict(state, strict=True)

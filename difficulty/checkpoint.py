"""Checkpoints: weights plus plain-data metadata, loadable with ``torch.load(weights_only=True)``.

A checkpoint file is ``torch.save`` of a dict with only tensors and JSON-able values::

    {"format": "labeltriage-checkpoint", "format_version": 1,
     "meta": {...}, "state_dict": {name: tensor},
     "committee": [{name: tensor}, ...]}          # only with a stored committee

``committee`` (optional; readers that do not know it ignore it) holds the state dicts of
the members of a bootstrap committee: each is a whole target classifier of the same
architecture as ``state_dict``'s ``target.`` part, keyed as that part without the prefix
(see :mod:`difficulty.committee`); ``meta["committee"]`` describes how they were trained.

``meta`` holds everything needed to rebuild the model and to trust its outputs:

=====================  ===============================================================
``task``               ``classification`` or ``detection``
``arch``               model name (:data:`~difficulty.models.classification.CLASSIFICATION_ARCHS`,
                       :data:`~difficulty.models.detection.DETECTION_ARCHS`)
``classes``            project class names (detection label ``i`` = ``classes[i-1]``)
``model``              constructor settings: ``in_channels``, ``image_size``, ``width``, ``dropout``,
                       ``small_input`` (ResNet-18 stem; absent = ``image_size <= 64``); on a
                       pretrained backbone (arch ``fcos`` / ``backbone``) also ``backbone``
                       (its name), ``finetune_last_stage`` and (``fcos``) ``head_convs``
``backbone``           only on a pretrained backbone: ``name``, ``source`` of the weights
                       (``package:NAME==VERSION``, ``torchvision:ENUM``, ``file:PATH`` or
                       ``none``) and their file's ``sha256``; the weights themselves are in
                       ``state_dict`` (the checkpoint needs no weights package to load)
``lossnet``            :class:`~difficulty.models.lossnet.LossNetConfig` as a dict
``data_hash``          sha256 over the sorted (item id, label) pairs trained on
``calibration_ids``    the held-out items never trained on (sorted), with ``calibration``
                       giving the rule, share and a hash of the ids
``version``            ``<arch>-<data_hash[:8]>-<created>``; also as ``model_version``
``created``            UTC ISO time
``training``           epochs, batch size, lr, seed, init, freeze_target, per-epoch losses,
                       ``target_weights`` (the user's weights file the target came from, or null);
                       ``fcos`` adds ``feature_seconds``, ``fit_seconds`` and ``feature_cache``
                       (items and bytes in memory and on disk)
``committee``          only with a stored committee: ``kind`` (``bootstrap``), ``members``,
                       ``epochs``, ``lr``, ``seed``, ``resample``
=====================  ===============================================================

Files are written atomically (temporary object, then move) on any fsspec URL.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from connectors.errors import InputError, UsageError
from connectors.storage import ProjectFS
from difficulty.torchfile import is_state_dict, read_torch_file, split_url

FORMAT = "labeltriage-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded (or in-memory) checkpoint: ``meta`` (plain data) and ``state_dict``.

    ``model`` caches the built model (:meth:`build_model`); a checkpoint made in memory
    around a user's own model (a frozen target) carries it here, since its architecture
    cannot be rebuilt from metadata.
    """

    meta: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    path: str | None = None
    model: nn.Module | None = field(default=None, repr=False)
    committee: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    _members: list[nn.Module] | None = field(default=None, repr=False)

    @property
    def task(self) -> str:
        return str(self.meta["task"])

    @property
    def arch(self) -> str:
        return str(self.meta["arch"])

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.meta["classes"]]

    @property
    def version(self) -> str:
        return str(self.meta["version"])

    def build_model(self) -> nn.Module:
        """The model with these weights, in eval mode (built once, then cached)."""
        if self.model is None:
            from difficulty.models.build import model_from_meta

            model = model_from_meta(self.meta)
            model.load_state_dict(self.state_dict)
            self.model = model
        self.model.eval()
        return self.model

    def build_committee(self) -> list[nn.Module]:
        """The stored committee's members (target classifiers), in eval mode; ``[]`` if none.

        Each member is a copy of the target model with the member's weights (built once,
        then cached).
        """
        if not self.committee:
            return []
        if self._members is None:
            import copy

            target: Any = self.build_model().target
            members: list[nn.Module] = []
            for state in self.committee:
                member = copy.deepcopy(target)
                member.load_state_dict(state)
                members.append(member)
            self._members = members
        for m in self._members:
            m.eval()
        return self._members


def _check_json(meta: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(meta))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint metadata must be plain JSON-able data: {exc}") from exc


def save_checkpoint(
    path: str,
    model: nn.Module | dict[str, torch.Tensor],
    meta: dict[str, Any],
    *,
    committee: list[dict[str, torch.Tensor]] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Checkpoint:
    """Write ``model``'s weights (or a state dict) and ``meta`` to ``path`` atomically.

    ``committee``: state dicts of stored committee members (see the module docstring).
    ``path`` is a local path or an fsspec URL; an existing file is replaced.
    """

    def cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    state = cpu(model if isinstance(model, dict) else model.state_dict())
    members = [cpu(m) for m in committee] if committee else None
    clean = _check_json(meta)
    blob: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": clean,
        "state_dict": state,
    }
    if members:
        blob["committee"] = members
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    parent, name = split_url(path)
    ProjectFS(parent, storage_options).write_bytes(name, buffer.getvalue())
    return Checkpoint(
        meta=clean,
        state_dict=state,
        path=path,
        model=None if isinstance(model, dict) else model,
        committee=members,
    )


def _read(path: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    blob, _ = read_torch_file(path, storage_options=storage_options)
    if is_state_dict(blob):
        raise UsageError(
            f"{path} is a plain state_dict, not a {FORMAT} file; to train on top of these "
            "weights give them as --target-weights FILE (with --arch)"
        )
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise InputError(f"not a {FORMAT} file", file=path)
    if int(blob.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(
            f"checkpoint format version {blob['format_version']} is newer than this labeltriage ({FORMAT_VERSION})",
            file=path,
        )
    return blob


def load_checkpoint(
    path: str | Checkpoint, *, storage_options: dict[str, Any] | None = None
) -> Checkpoint:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (a ``Checkpoint`` passes through)."""
    if isinstance(path, Checkpoint):
        return path
    blob = _read(path, storage_options)
    committee = blob.get("committee")
    if committee is not None and not (
        isinstance(committee, list) and all(is_state_dict(m) for m in committee)
    ):
        raise InputError("'committee' is not a list of state dicts", file=path)
    return Checkpoint(
        meta=blob["meta"], state_dict=blob["state_dict"], path=path, committee=committee or None
    )


def load_checkpoint_meta(
    path: str | Checkpoint, *, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Only the metadata of a checkpoint (see the module docstring for its keys)."""
    return load_checkpoint(path, storage_options=storage_options).meta

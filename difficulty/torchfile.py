"""Reading torch files from any fsspec URL, safely (``weights_only``).

Shared by checkpoints (:mod:`difficulty.checkpoint`) and user weights
(:mod:`difficulty.models.user_weights`, :mod:`difficulty.models.backbones`).
"""

from __future__ import annotations

import io
import os
import posixpath
from typing import Any

import torch

from connectors.errors import InputError, UsageError
from connectors.storage import ProjectFS


def split_url(path: str) -> tuple[str, str]:
    """The folder (local path or URL) holding ``path``, and its name."""
    if "://" in path:
        protocol, rest = path.split("://", 1)
        parent, name = posixpath.split(rest)
        return f"{protocol}://{parent}", name
    parent, name = os.path.split(os.path.abspath(path))
    return parent, name


def read_torch_file(
    path: str, *, storage_options: dict[str, Any] | None = None, what: str = "checkpoint"
) -> tuple[Any, bytes]:
    """``torch.load(weights_only=True)`` of the file at ``path`` (any fsspec URL), and its bytes.

    Raises :class:`UsageError` when it does not exist, :class:`InputError` (naming the
    file) when torch cannot read it safely.
    """
    parent, name = split_url(path)
    try:
        data = ProjectFS(parent, storage_options).read_bytes(name)
    except FileNotFoundError as exc:
        raise UsageError(f"{what} {path} not found") from exc
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (
        Exception
    ) as exc:  # torch raises many kinds for a bad file (UnpicklingError, RuntimeError, …)
        raise InputError(f"not a readable {what}: {type(exc).__name__}: {exc}", file=path) from exc
    return blob, data


def is_state_dict(blob: Any) -> bool:
    """True for a plain ``model.state_dict()``: a non-empty dict of tensors keyed by name."""
    return (
        isinstance(blob, dict)
        and bool(blob)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob.items())
    )

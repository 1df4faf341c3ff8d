"""Frozen backbone features per item, computed once and kept for every epoch.

A model whose backbone is frozen sees the same backbone maps for an item in every epoch,
so :class:`FeatureCache` keeps them: in memory (as float16, half the bytes of float32)
up to ``memory_bytes``, then in files under a folder of its own (a fresh temporary folder
unless ``directory`` is given), which it removes on :meth:`FeatureCache.close`.  A cache
serves one ``key`` — the backbone, its weights' sha256, the input size and the split
point — so features of one backbone are never served to another.

Entries are lists of tensors ``(C_k, H_k, W_k)`` (one item, no batch dimension).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BYTES = 1 << 30
"""1 GiB of cached maps in memory; the rest goes to disk."""


def cache_key(meta: dict[str, Any]) -> str:
    """What a feature cache must match: backbone, its weights, input size, split point."""
    settings = meta.get("model") or {}
    return json.dumps(
        {
            "backbone": settings.get("backbone"),
            "sha256": (meta.get("backbone") or {}).get("sha256"),
            "image_size": settings.get("image_size"),
            "finetune_last_stage": bool(settings.get("finetune_last_stage", False)),
        },
        sort_keys=True,
    )


@dataclass
class CacheStats:
    """Items and bytes held in memory and on disk, and how often an entry was served."""

    items: int = 0
    memory_items: int = 0
    memory_bytes: int = 0
    disk_items: int = 0
    disk_bytes: int = 0
    hits: int = 0
    misses: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class FeatureCache:
    """Per-item frozen features for one ``key``; memory-bounded, spilling to disk."""

    def __init__(
        self,
        key: str,
        *,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        directory: str | None = None,
    ) -> None:
        self.key = key
        self.memory_limit = int(memory_bytes)
        self._memory: dict[str, list[torch.Tensor]] = {}
        self._disk: dict[str, str] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        self._own_dir = directory is None
        self._dir = directory
        self.stats = CacheStats()

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._memory or item_id in self._disk

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    def _folder(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="labeltriage-features-")
        os.makedirs(self._dir, exist_ok=True)
        return self._dir

    def size_of(self, item_id: str) -> tuple[int, int]:
        """The original ``(width, height)`` of the cached item's image."""
        return self._sizes[item_id]

    def put(self, item_id: str, maps: list[torch.Tensor], size: tuple[int, int]) -> None:
        """Keep ``maps`` (float16 copies) of the ``size`` = ``(width, height)`` image of
        ``item_id``; on disk once memory is full."""
        if item_id in self:
            return
        self._sizes[item_id] = (int(size[0]), int(size[1]))
        stored = [m.detach().to("cpu", torch.float16).contiguous().clone() for m in maps]
        nbytes = sum(m.numel() * m.element_size() for m in stored)
        self.stats.items += 1
        if self.stats.memory_bytes + nbytes <= self.memory_limit:
            self._memory[item_id] = stored
            self.stats.memory_items += 1
            self.stats.memory_bytes += nbytes
            return
        name = hashlib.sha256(f"{self.key}\0{item_id}".encode()).hexdigest()[:32] + ".pt"
        path = os.path.join(self._folder(), name)
        tmp = path + ".tmp"
        torch.save(stored, tmp)
        os.replace(tmp, path)
        self._disk[item_id] = path
        self.stats.disk_items += 1
        self.stats.disk_bytes += os.path.getsize(path)

    def get(self, item_id: str) -> list[torch.Tensor] | None:
        """The float32 maps of ``item_id``, or ``None`` when it is not cached."""
        stored = self._memory.get(item_id)
        if stored is None and item_id in self._disk:
            stored = torch.load(self._disk[item_id], weights_only=True)
        if stored is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return [m.float() for m in stored]

    def close(self) -> None:
        """Forget every entry and remove the cache's own folder."""
        self._memory.clear()
        self._disk.clear()
        self._sizes.clear()
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown nothing is reliable
            self.close()

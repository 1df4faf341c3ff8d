"""Argument lists for ``labeltriage train``/``select``, a tiny digits image-folder project, and
a counter of the passes a command makes over a VOC project's items."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image


def train_args(project: Path, fmt: str, task: str, out: Path | str, *extra: str) -> list[str]:
    """``labeltriage train`` arguments for ``project`` in format ``fmt``, then ``extra``."""
    return [
        "train",
        "--source",
        str(project),
        "--format",
        fmt,
        "--task",
        task,
        "--out",
        str(out),
        *extra,
    ]


def select_args(
    project: Path, fmt: str, strategy: str, budget: int, out: Path | str, *extra: str
) -> list[str]:
    """``labeltriage select`` arguments for ``project`` in format ``fmt``, then ``extra``."""
    return [
        "select",
        "--source",
        str(project),
        "--format",
        fmt,
        "--strategy",
        strategy,
        "--budget",
        str(budget),
        "--out",
        str(out),
        *extra,
    ]


def write_digits_folder(root: Path, count: int, labeled: int) -> Path:
    """An imagefolder project at ``root``: the first ``count`` scikit-learn digits of
    classes 0–2 as 16×16 RGB PNGs, the first ``labeled`` in their class folder, the others
    in ``_unlabeled/``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.where(d.target < 3)[0][:count]
    for k, i in enumerate(keep):
        folder = root / (str(d.target[i]) if k < labeled else "_unlabeled")
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((16, 16))
        img.convert("RGB").save(folder / f"{k:03d}.png")
    return root


def count_voc_item_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """A counter whose ``"items"`` goes up each time a VOC project's items are read."""
    from connectors.formats.voc import VocFormat

    passes: Counter[str] = Counter()
    iter_items = VocFormat.iter_items

    def counted(self: VocFormat, *args: Any, **kwargs: Any) -> Any:
        passes["items"] += 1
        yield from iter_items(self, *args, **kwargs)

    monkeypatch.setattr(VocFormat, "iter_items", counted)
    return passes

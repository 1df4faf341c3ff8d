"""torch Datasets over project items, read through :class:`~connectors.storage.ProjectFS`.

Each sample is a :class:`Sample`; a sample whose image cannot be read (or whose label does
not fit) carries ``error`` instead of tensors, so one bad item never stops a run: the
collate function :func:`collate_samples` keeps good samples and bad ones apart.

* Classification: the image is decoded with Pillow (EXIF orientation applied), converted
  to RGB (``channels=3``) or grey (``channels=1``) and resized to ``image_size``×``image_size``
  (aspect ratio not kept); ``(C, S, S)`` float32 in ``[0, 1]``.  The target is the index of
  ``item.class_label`` in ``classes``.
* Detection: the image is decoded at its full size as RGB ``(3, H, W)`` float32 in
  ``[0, 1]`` (the detector resizes it); the target holds ``boxes`` ``(B, 4)`` pixel
  ``xyxy`` and ``labels`` ``(B,)`` int64 = index in ``classes`` + 1 (0 is background).
  Boxes of classes outside ``classes`` (e.g. KITTI ``DontCare``) are left out; boxes are
  clipped to the image; a box that is empty after clipping is an error for the item.

Augmentation is minimal and off unless asked: a random horizontal flip
(``augment=True``), which is label-preserving for road scenes and most photos, not for
digits or text.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from connectors.errors import InputError
from connectors.model import Item
from connectors.storage import ProjectFS
from difficulty.imageio import read_image_bytes


@dataclass
class Sample:
    """One decoded item: ``image`` ``(C, H, W)``, ``target`` (class index, box dict or ``None``)."""

    item_id: str
    image: torch.Tensor | None = None
    target: Any = None
    size: tuple[int, int] | None = None  # original (width, height)
    error: str | None = None


def decode_image(
    item: Item, project: ProjectFS | None, *, channels: int = 3, size: int | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(C, H, W)`` float32 in ``[0, 1]`` (resized to ``size``×``size`` when given) and the original ``(width, height)``.

    Raises :class:`InputError` naming the file and the item.
    """
    data = read_image_bytes(item.uri, project, item=item.item_id)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            image = ImageOps.exif_transpose(image)
            original = image.size
            image = image.convert("RGB" if channels == 3 else "L")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise InputError(
            f"cannot decode image: {type(exc).__name__}: {exc}", file=item.uri, item=item.item_id
        ) from exc
    tensor = torch.from_numpy(array.astype(np.float32) / 255.0)
    tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    return tensor.contiguous(), original


def detection_target(
    item: Item, classes: Sequence[str], width: int, height: int
) -> dict[str, torch.Tensor]:
    """torchvision target of ``item``'s boxes (pixel ``xyxy``) for a ``width``×``height`` image."""
    index = {c: i + 1 for i, c in enumerate(classes)}
    boxes, labels = [], []
    for ann in item.annotations:
        if ann.box is None or ann.label not in index:
            continue
        x1, y1, x2, y2 = ann.box
        x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
        if x2 - x1 < 1e-3 or y2 - y1 < 1e-3:
            raise InputError(
                f"box {list(ann.box)} of class {ann.label!r} is empty inside the {width}×{height} image",
                file=item.uri,
                item=item.item_id,
            )
        boxes.append((x1, y1, x2, y2))
        labels.append(index[ann.label])
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def load_sample(
    item: Item,
    project: ProjectFS | None,
    *,
    task: str,
    classes: Sequence[str] | None,
    image_size: int,
    channels: int = 3,
    with_target: bool = True,
    augment: bool = False,
    rng: np.random.Generator | None = None,
) -> Sample:
    """Decode one item into a :class:`Sample` (never raises for bad input: sets ``error``)."""
    if item.error is not None:
        return Sample(item.item_id, error=item.error)
    try:
        if task == "classification":
            image, original = decode_image(item, project, channels=channels, size=image_size)
            index: int | None = None
            if with_target:
                label = item.class_label
                if classes is None or label is None or label not in classes:
                    raise InputError(
                        f"class {label!r} is not one of the model's classes",
                        file=item.uri,
                        item=item.item_id,
                    )
                index = list(classes).index(label)
            if augment and rng is not None and rng.random() < 0.5:
                image = image.flip(-1)
            return Sample(item.item_id, image, index, original)
        image, original = decode_image(item, project, channels=3)
        target = (
            detection_target(item, classes or [], original[0], original[1]) if with_target else None
        )
        if augment and rng is not None and rng.random() < 0.5 and target is not None:
            image = image.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = original[0] - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        return Sample(item.item_id, image, target, original)
    except InputError as exc:
        return Sample(item.item_id, error=str(exc))


class ItemDataset(Dataset[Sample]):
    """Map-style dataset over a list of items (training: the labeled pool)."""

    def __init__(
        self,
        items: Sequence[Item],
        project: ProjectFS | None,
        *,
        task: str,
        classes: Sequence[str] | None,
        image_size: int,
        channels: int = 3,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.items = list(items)
        self.project = project
        self.task = task
        self.classes = list(classes) if classes is not None else None
        self.image_size = image_size
        self.channels = channels
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng((self.seed, self.epoch, index)) if self.augment else None
        return load_sample(
            self.items[index],
            self.project,
            task=self.task,
            classes=self.classes,
            image_size=self.image_size,
            channels=self.channels,
            augment=self.augment,
            rng=rng,
        )


class ItemStream(IterableDataset[Sample]):
    """Iterable dataset over a stream of items (inference); with workers, item ``k`` goes to worker ``k mod W``."""

    def __init__(
        self,
        items: Iterable[Item],
        project: ProjectFS | None,
        *,
        task: str,
        image_size: int,
        channels: int = 3,
    ) -> None:
        self.items = items
        self.project = project
        self.task = task
        self.image_size = image_size
        self.channels = channels

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, item in enumerate(self.items):
            if k % workers == worker:
                yield load_sample(
                    item,
                    self.project,
                    task=self.task,
                    classes=None,
                    image_size=self.image_size,
                    channels=self.channels,
                    with_target=False,
                )


def collate_samples(samples: list[Sample]) -> list[Sample]:
    """Keep the list as is (images of a detection batch differ in size; errors ride along)."""
    return samples

"""The format contract: every project format reads items as a stream and writes them back.

A format is a class registered in :data:`FORMATS` under its name.  It is built on a
:class:`~connectors.storage.ProjectFS` (the project root) and options, and provides:

* ``detect(project)`` — a cheap check used by ``--format auto``;
* ``iter_items()`` — a *stream* of :class:`~connectors.model.Item`: never the whole
  project in memory; a bad item is yielded with ``error`` set, never raised;
* ``write_items(items, classes)`` — write a whole project (round trips, exports);
* ``write_labels(item, annotations, provenance)`` — write auto-labels for one item that
  has no human label, atomically, refusing (``HumanLabelConflict``) when a human label
  exists *at write time*; returns :class:`WrittenRecord` entries that
  ``remove_written`` can undo exactly (used by run manifests and rollback).

Item ids: for file formats the image path relative to the format's image folder,
without extension, POSIX separators (``images/a/b.jpg`` → ``a/b``); for Label Studio the
task id.  Prediction readers produce the same ids so predictions join on ``item_id``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from connectors.model import Annotation, Item, Prediction
from connectors.registry import Registry
from connectors.storage import ProjectFS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class Provenance(BaseModel):
    """Where an auto-label came from; stored with every write."""

    run_id: str
    model_version: str
    score: float | None = None
    tier: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class WrittenRecord(BaseModel):
    """One thing a write created, precisely enough to remove it and nothing else.

    ``kind="file"``: ``path`` (relative to the root) was created, with ``sha256`` of its
    content.  ``kind="entry"``: entries with ``entry_ids`` were added inside the shared
    file ``path`` (COCO JSON, Label Studio export).
    """

    kind: str
    path: str
    item_id: str
    sha256: str | None = None
    entry_ids: list[str] = Field(default_factory=list)


class ProjectFormat(abc.ABC):
    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]] = ("detection",)

    def __init__(self, project: ProjectFS, **options: Any) -> None:
        self.project = project
        self.options = options

    @classmethod
    @abc.abstractmethod
    def detect(cls, project: ProjectFS) -> bool:
        """True when the project root looks like this format (cheap: a few listings)."""

    @abc.abstractmethod
    def iter_items(self) -> Iterator[Item]:
        """Stream the project's items in a stable order; bad items carry ``error``."""

    @abc.abstractmethod
    def write_items(self, items: Iterable[Item], classes: list[str] | None = None) -> None:
        """Write a whole project in this format (labels; images are referenced, not copied)."""

    @abc.abstractmethod
    def write_labels(self, item: Item, annotations: list[Annotation], provenance: Provenance) -> list[WrittenRecord]:
        """Write auto-labels for one item with no human label; atomic; never over a human label."""

    @abc.abstractmethod
    def remove_written(self, record: WrittenRecord) -> None:
        """Undo one record of :meth:`write_labels` (and nothing else)."""


FORMATS: Registry[type[ProjectFormat]] = Registry("format")


class PredictionSource(abc.ABC):
    """Predictions a user brings, looked up per item (lazily where the format allows)."""

    @abc.abstractmethod
    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        """The prediction for one item (``item`` gives image size when boxes are normalised)."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Prediction]:
        """Every prediction, streamed."""


PREDICTION_FORMATS: Registry[type[PredictionSource]] = Registry("predictions format")

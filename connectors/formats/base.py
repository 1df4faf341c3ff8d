"""The format contract: every project format reads items as a stream and writes them back.

A format is a class registered in :data:`FORMATS` under its name.  It is built on a
:class:`~connectors.storage.ProjectFS` (the project root) and options, and provides:

* ``detect(project)`` — a cheap check used by ``--format auto`` on a folder, asked in the
  order of ``detect_priority``; ``looked_for`` says what it looks for (in the error when no
  format matches); ``detect_file(project, name)`` — the same for a project given as one
  file (by default: its suffix is one of ``file_suffixes``);
* ``iter_items()`` — a *stream* of :class:`~connectors.model.Item`: never the whole
  project in memory; a bad item is yielded with ``error`` set, never raised;
* ``write_items(items, classes)`` — write a whole project (round trips, exports);
* ``write_labels(writes)`` — write auto-labels for a batch of items that have no human
  label, atomically per file, skipping (and reporting) any item that has a human label
  *at write time*; returns :class:`WrittenRecord` entries that ``remove_written`` can
  undo exactly (used by run manifests and rollback).  File formats also leave a sidecar
  record per item (:func:`~connectors.sidecars.sidecar_path`) so readers know the label is an auto-label;
* optionally ``publish_scores(table, meta)`` — a platform that can show scores next to its
  items (FiftyOne) gets each scoring run's difficulty table and metadata.

Item ids: for file formats the image path relative to the format's image folder,
without extension, POSIX separators (``images/a/b.jpg`` → ``a/b``); for Label Studio the
task id.  Prediction readers produce the same ids so predictions join on ``item_id``.
"""

from __future__ import annotations

import abc
import importlib
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from connectors.model import Annotation, Item, Prediction
from connectors.plugins import load_plugins
from connectors.registry import Registry
from connectors.sidecars import AUTO_SIDECAR_DIR as AUTO_SIDECAR_DIR  # the formats' contract
from connectors.sidecars import Provenance, WrittenRecord
from connectors.sidecars import sidecar_path as sidecar_path
from connectors.storage import ProjectFS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class LabelWrite(BaseModel):
    """One auto-label to write: the item (as read), its new annotations, their provenance."""

    item: Item
    annotations: list[Annotation]
    provenance: Provenance


class WriteOutcome(BaseModel):
    """What a batch write did: records to undo it, and items refused (with why)."""

    records: list[WrittenRecord] = Field(default_factory=list)
    refused: dict[str, str] = Field(default_factory=dict)


class ProjectFormat(abc.ABC):
    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]] = ("detection",)
    detect_priority: ClassVar[int] = 100
    """Where ``--format auto`` asks :meth:`detect` (lower first, ties by name)."""
    looked_for: ClassVar[str] = "its own layout"
    """What :meth:`detect` looks for (named when no format matches a folder)."""
    file_suffixes: ClassVar[tuple[str, ...]] = ()
    """Suffixes of a project given as one file that :meth:`detect_file` accepts."""

    def __init__(self, project: ProjectFS, **options: Any) -> None:
        self.project = project
        self.options = options

    @classmethod
    @abc.abstractmethod
    def detect(cls, project: ProjectFS) -> bool:
        """True when the project root looks like this format (cheap: a few listings)."""

    @classmethod
    def detect_file(cls, project: ProjectFS, name: str) -> bool:
        """True when the file ``name`` in ``project`` is a whole project in this format."""
        return posixpath.splitext(name)[1].lower() in cls.file_suffixes

    @abc.abstractmethod
    def iter_items(self) -> Iterator[Item]:
        """Stream the project's items in a stable order; bad items carry ``error``."""

    @abc.abstractmethod
    def write_items(self, items: Iterable[Item], classes: list[str] | None = None) -> None:
        """Write a whole project in this format (labels; images are referenced, not copied)."""

    @abc.abstractmethod
    def write_labels(self, writes: list[LabelWrite]) -> WriteOutcome:
        """Write auto-labels for items with no human label; atomic; never over a human label.

        The human-label check happens here, at write time: an item that gained a human
        label since it was read is refused (listed in ``WriteOutcome.refused``), not written.
        """

    @abc.abstractmethod
    def remove_written(self, records: list[WrittenRecord]) -> list[str]:
        """Undo records of :meth:`write_labels` and nothing else.

        A file whose content changed since it was written (sha256 differs: a person
        edited it) is kept; the reasons for everything kept are returned.
        """


def _load_formats() -> None:
    """Import the built-in formats and the plugins (see :mod:`connectors.plugins`)."""
    importlib.import_module("connectors.formats")
    load_plugins()


FORMATS: Registry[type[ProjectFormat]] = Registry("format", _load_formats)


class PredictionSource(abc.ABC):
    """Predictions a user brings, looked up per item (lazily where the format allows)."""

    @abc.abstractmethod
    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        """The prediction for one item (``item`` gives image size when boxes are normalised)."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Prediction]:
        """Every prediction, streamed."""


PREDICTION_FORMATS: Registry[type[PredictionSource]] = Registry("predictions format", _load_formats)

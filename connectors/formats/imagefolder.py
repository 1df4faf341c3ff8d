"""Image folder (classification): one folder per class, unlabeled images in ``_unlabeled/``.

Layout::

    ROOT/<class>/<name>.jpg|png       labeled: the folder names the class (any depth below)
    ROOT/_unlabeled/<name>.jpg        unlabeled (folder name: option ``unlabeled_dir``)

The item id is the image path relative to the root without extension (``cat/001``); the
class folder is part of it, so ``cat/001`` and ``dog/001`` are different items.  Each
labeled item has one :class:`~connectors.model.Annotation` with ``box=None``.  Images
directly in the root and folders starting with ``.`` are not items.

Auto-labels (:meth:`ImageFolderFormat.write_labels`) never move or delete a file: the
image is *copied* into its class folder (exclusive create) and a sidecar records the
copy under the item's original id.  While that copy exists unchanged, the reader yields
the item once, under its original id (``_unlabeled/001``), as ``auto_labeled`` from the
copy, and hides the original.  Removing the copy (rollback) brings the original back
as unlabeled.
"""

from __future__ import annotations

import itertools
import logging
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

from connectors.errors import HumanLabelConflict, InputError, UsageError
from connectors.formats._filebased import (
    RemovesFiles,
    auto_label_meta,
    error_item,
    is_image_name,
    read_image_bytes,
    readable_items,
    sha256_hex,
)
from connectors.formats.base import FORMATS, LabelWrite, ProjectFormat, WriteOutcome
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus
from connectors.sidecars import read_auto_label_index, write_auto_file
from connectors.storage import BOOKKEEPING_DIR, ProjectFS

log = logging.getLogger(__name__)

DEFAULT_UNLABELED_DIR = "_unlabeled"
_NOT_IMAGEFOLDER_ROOT_SUFFIXES = (".json", ".parquet", ".yaml", ".yml")


@FORMATS.register("imagefolder")
class ImageFolderFormat(RemovesFiles, ProjectFormat):
    """Classification project laid out as ``CLASS/*.jpg``; option ``unlabeled_dir``."""

    name = "imagefolder"
    tasks = ("classification",)
    detect_priority = 90
    looked_for = "one folder of images per class (CLASS/*.jpg)"

    def __init__(self, project: ProjectFS, **options: Any) -> None:
        super().__init__(project, **options)
        if options.get("file") is not None:
            raise UsageError(
                f"imagefolder: expected a project folder, got the file {options['file']!r} in {project.url}"
            )
        self.unlabeled_dir = str(options.get("unlabeled_dir") or DEFAULT_UNLABELED_DIR)
        if "/" in self.unlabeled_dir or self.unlabeled_dir in (".", ".."):
            raise UsageError(
                f"imagefolder: unlabeled_dir {self.unlabeled_dir!r} must be one folder name"
            )

    @classmethod
    def detect(cls, project: ProjectFS) -> bool:
        """No ``images/`` folder and no JSON/Parquet/YAML at the root, and the first
        non-hidden sub-folder holds an image directly."""
        entries = project.fs.ls(project.root, detail=True)
        folders = []
        for entry in entries:
            name = posixpath.basename(str(entry["name"]).rstrip("/"))
            if entry.get("type") == "directory":
                if name == "images":
                    return False
                if not name.startswith("."):
                    folders.append(name)
            elif name.lower().endswith(_NOT_IMAGEFOLDER_ROOT_SUFFIXES):
                return False
        for folder in sorted(folders)[:1]:
            return any(is_image_name(n) for n in project.listdir(folder))
        return False

    @property
    def classes(self) -> list[str]:
        """Class names: the non-hidden top-level folders other than the unlabeled one."""
        return [
            n
            for n in self.project.listdir(".")
            if self.project.isdir(n) and not n.startswith(".") and n != self.unlabeled_dir
        ]

    # -- reading -------------------------------------------------------------------
    def _auto_copies(self) -> tuple[dict[str, tuple[str, dict[str, Any]]], set[str]]:
        """``{copy path: (original item id, sidecar entry)}`` for intact copies, and the
        original item ids they stand for."""
        copies: dict[str, tuple[str, dict[str, Any]]] = {}
        for item_id, entry in read_auto_label_index(self.project).items():
            path = entry.get("path")
            if not isinstance(path, str):
                continue
            try:
                data = self.project.read_bytes(path)
            except (FileNotFoundError, InputError):
                continue
            if sha256_hex(data) == entry.get("sha256"):
                copies[path] = (item_id, entry)
        return copies, {item_id for item_id, _ in copies.values()}

    def iter_items(self) -> Iterator[Item]:
        copies, hidden = self._auto_copies()
        for folder, paths in itertools.groupby(self.project.walk_files("."), key=posixpath.dirname):
            top = folder.split("/", 1)[0]
            if not folder or folder == "." or top.startswith(".") or top == BOOKKEEPING_DIR:
                continue
            stems: set[str] = set()
            for rel in paths:
                if not is_image_name(rel):
                    continue
                item_id = posixpath.splitext(rel)[0]
                if item_id in stems:
                    yield error_item(
                        item_id,
                        rel,
                        InputError(
                            f"another image with item id {item_id!r} exists in {folder}/", file=rel
                        ),
                    )
                    continue
                stems.add(item_id)
                if item_id in hidden:
                    continue
                yield self._item(item_id, rel, top, copies)

    def _item(
        self, item_id: str, rel: str, top: str, copies: dict[str, tuple[str, dict[str, Any]]]
    ) -> Item:
        try:
            self.project.resolve(rel, item=item_id)
        except InputError as exc:
            return error_item(item_id, rel, exc)
        if top == self.unlabeled_dir:
            return Item(item_id=item_id, uri=rel)
        annotations = [Annotation(label=top)]
        if rel in copies:
            original, entry = copies[rel]
            return Item(
                item_id=original,
                uri=rel,
                status=ItemStatus.AUTO_LABELED,
                source=AnnotationSource.AUTO,
                annotations=annotations,
                meta=auto_label_meta(entry),
            )
        return Item(
            item_id=item_id,
            uri=rel,
            status=ItemStatus.LABELED,
            source=AnnotationSource.HUMAN,
            annotations=annotations,
        )

    # -- writing -------------------------------------------------------------------
    def _target(self, item: Item, folder: str) -> str:
        ext = posixpath.splitext(item.uri)[1] or ".jpg"
        head = item.item_id.split("/", 1)
        if len(head) == 2 and head[0] == folder:
            return f"{item.item_id}{ext}"
        return f"{folder}/{posixpath.basename(item.item_id)}{ext}"

    def write_items(
        self,
        items: Iterable[Item],
        classes: list[str] | None = None,
        *,
        image_root: ProjectFS | None = None,
    ) -> None:
        """Copy each item's image into its class folder (or the unlabeled folder).

        Images are read from ``item.uri`` (a full URL, or relative to ``image_root``, or
        to this project).  Nothing is overwritten: an existing target raises
        :class:`HumanLabelConflict`.  ``classes`` folders are created only as they fill.
        """
        for item in readable_items(items):
            label = item.class_label if item.is_labeled else None
            if item.is_labeled and label is None:
                raise UsageError(
                    f"imagefolder: item {item.item_id!r} needs exactly one class label without a box"
                )
            target = self._target(item, label if label is not None else self.unlabeled_dir)
            data = read_image_bytes(item, self.project, image_root)
            if data is None:
                data = self.project.read_bytes(item.uri)
            try:
                self.project.write_bytes(target, data, overwrite=False)
            except FileExistsError as exc:
                raise HumanLabelConflict(
                    f"{target}: exists already; it was not overwritten"
                ) from exc

    def write_labels(self, writes: list[LabelWrite]) -> WriteOutcome:
        """Copy each unlabeled image into the folder of its predicted class.

        An item is refused when it has a human label, when it is not in the unlabeled
        folder, when the prediction is not exactly one class of this project, or when
        the target file exists.
        """
        outcome = WriteOutcome()
        classes = set(self.classes)
        for w in writes:
            item = w.item
            if item.has_human_label or item.is_labeled:
                outcome.refused[item.item_id] = f"{item.uri}: item is labeled already; not written"
                continue
            if not item.uri.startswith(self.unlabeled_dir + "/"):
                outcome.refused[item.item_id] = (
                    f"{item.uri}: not in {self.unlabeled_dir}/; not written"
                )
                continue
            if len(w.annotations) != 1 or w.annotations[0].box is not None:
                outcome.refused[item.item_id] = (
                    f"{item.uri}: an image-folder label is exactly one class without a box"
                )
                continue
            label = w.annotations[0].label
            if label not in classes:
                outcome.refused[item.item_id] = (
                    f"{item.uri}: class {label!r} is not a folder of this project"
                )
                continue
            target = f"{label}/{posixpath.basename(item.uri)}"
            try:
                data = self.project.read_bytes(item.uri)
            except (InputError, FileNotFoundError) as exc:
                outcome.refused[item.item_id] = f"{item.uri}: cannot copy: {exc}"
                continue
            provenance = w.provenance.model_copy(
                update={"extra": {**w.provenance.extra, "copied_from": item.uri}}
            )
            # the sidecar goes first, so the copy never reads as a human label
            record = write_auto_file(self.project, item.item_id, target, data, provenance)
            if isinstance(record, str):
                outcome.refused[item.item_id] = record
                continue
            outcome.records.append(record)
        return outcome

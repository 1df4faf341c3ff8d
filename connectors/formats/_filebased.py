"""Shared machinery of the file-per-image formats (YOLO, Pascal VOC, KITTI).

Layout: images under ``images/`` (any depth), one label file per image under a label
folder with the same relative path and stem (``images/a/b.jpg`` ↔ ``labels/a/b.txt``).
The item id is the image path relative to ``images/`` without extension (``a/b``).

Reading streams: the image folder is walked one folder at a time; for each image folder
the matching label folder is listed once, and each label file is opened as its image
comes by.  Memory holds one folder's names, never the whole project.

* an image with no label file → ``unlabeled``;
* an image with a label file (even an empty one) → ``labeled`` by a human, unless the
  auto-label sidecar index records that exact file (same path and sha256), then
  ``auto_labeled`` with source ``auto``;
* a bad label file, a label file with no image, a duplicate image stem or a path that
  leaves the root → an item with ``error`` set whose message names the file (and line).

Writing auto-labels (:meth:`LabelFileFormat.write_labels`) creates a label file only
where none exists, with an exclusive atomic create, *after* its sidecar
(:func:`connectors.sidecars.write_auto_file`): at no instant is there an auto-written
label file without the sidecar that marks it.  :meth:`LabelFileFormat.remove_written`
deletes exactly those files, and only while their content is unchanged.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import itertools
import logging
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import fsspec
from PIL import Image, UnidentifiedImageError

from connectors.errors import HumanLabelConflict, InputError, UsageError
from connectors.formats.base import (
    AUTO_SIDECAR_DIR,
    IMAGE_EXTENSIONS,
    LabelWrite,
    ProjectFormat,
    WriteOutcome,
    WrittenRecord,
    sidecar_path,
)
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus
from connectors.sidecars import read_auto_label_index, read_sidecar, write_auto_file
from connectors.storage import ProjectFS
from connectors.writeback import runs_in_flight

log = logging.getLogger(__name__)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def image_size(fs: ProjectFS, rel: str, *, item: str | None = None) -> tuple[int, int]:
    """``(width, height)`` of the image at ``rel``, read from its header only.

    ``PIL.Image.open`` is lazy: it parses the header and does not decode pixels, so this
    costs one small read per image (a ranged read on object stores).
    """
    try:
        with fs.open(rel, "rb") as f, Image.open(f) as im:
            width, height = im.size
    except FileNotFoundError as exc:
        raise InputError("image not found", file=rel, item=item) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read image header: {exc}", file=rel, item=item) from exc
    return int(width), int(height)


def error_item(
    item_id: str,
    uri: str,
    exc: InputError,
    *,
    status: ItemStatus = ItemStatus.UNLABELED,
) -> Item:
    """An item that could not be read.

    ``error`` reads ``FILE[:LINE]: WHAT``; ``meta["error_file"]`` holds ``FILE[:LINE]`` so
    reports can split the two without parsing.
    """
    where = exc.file or uri
    if exc.line is not None:
        where = f"{where}:{exc.line}"
    return Item(
        item_id=item_id,
        uri=uri,
        status=status,
        meta={"error_file": where},
        error=f"{where}: {exc.message}",
    )


def readable_items(items: Iterable[Item]) -> Iterator[Item]:
    """``items`` without those that carry an ``error`` (each skipped with a warning)."""
    for item in items:
        if item.error is not None:
            log.warning("%s: skipped item with an error: %s", item.item_id, item.error)
            continue
        yield item


def format_number(value: float) -> str:
    """Shortest exact text for a coordinate: ``12`` for 12.0, ``12.5`` for 12.5."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def recheck_sidecars(project: ProjectFS) -> bool:
    """Whether a reader should look for the sidecar of a label file missing from the index.

    The index is read once, when a stream starts; a run writing meanwhile adds sidecars
    (each before its label).  On a local disk the extra look-up is one ``stat`` of a
    label without sidecar, so it is always made; on object stores (a request each) only
    while a run is in flight.
    """
    return project.is_local or bool(runs_in_flight(project))


def auto_label_meta(entry: dict[str, Any]) -> dict[str, Any]:
    return {"auto_label": {"run_id": entry.get("run_id"), "provenance": entry.get("provenance")}}


def matches_sidecar(entry: dict[str, Any], label_rel: str, data: bytes) -> bool:
    """True when the sidecar ``entry`` records exactly this label file and content."""
    return entry.get("path") == label_rel and entry.get("sha256") == sha256_hex(data)


def read_image_bytes(item: Item, project: ProjectFS, image_root: ProjectFS | None) -> bytes | None:
    """The bytes of ``item``'s image from a full URL or from ``image_root``; None if neither."""
    if "://" in item.uri:
        with fsspec.open(item.uri, "rb") as f:
            data: bytes = f.read()
            return data
    if image_root is not None:
        return image_root.read_bytes(item.uri)
    return None


class RemovesFiles:
    """Undo for formats whose every write is a whole file (see :func:`remove_file_records`)."""

    project: ProjectFS

    def remove_written(self, records: list[WrittenRecord]) -> list[str]:
        return [why for why in remove_file_records(self.project, records) if why is not None]

    def remove_written_each(self, records: list[WrittenRecord]) -> list[str | None]:
        """Like :meth:`remove_written`, with one outcome per record (``None`` = removed)."""
        return remove_file_records(self.project, records)


class LabelFileFormat(RemovesFiles, ProjectFormat):
    """Base of formats with ``images/`` and one label file per image.

    Subclasses set :attr:`labels_dir` and :attr:`label_ext` and implement
    :meth:`parse_label` and :meth:`render_label`.
    """

    images_dir: ClassVar[str] = "images"
    labels_dir: ClassVar[str] = "labels"
    label_ext: ClassVar[str] = ".txt"
    _recheck: bool = False

    def __init__(self, project: ProjectFS, **options: Any) -> None:
        super().__init__(project, **options)
        if options.get("file") is not None and not self.accepts_file(str(options["file"])):
            raise UsageError(
                f"{self.name}: expected a project folder, got the file {options['file']!r} in {project.url}"
            )

    @classmethod
    def has_folders(cls, project: ProjectFS) -> bool:
        """True when ``project`` has both the image folder and the label folder."""
        return project.isdir(cls.images_dir) and project.isdir(cls.labels_dir)

    def accepts_file(self, name: str) -> bool:
        """Whether a single-file ``source`` (option ``file``) means something to this format."""
        return False

    # -- paths ---------------------------------------------------------------------
    def label_path(self, item_id: str) -> str:
        return f"{self.labels_dir}/{item_id}{self.label_ext}"

    def item_id_of_image(self, image_rel: str) -> str:
        inside = image_rel[len(self.images_dir) + 1 :]
        return posixpath.splitext(inside)[0]

    def find_image(self, item_id: str) -> str | None:
        """Relative path of the image of ``item_id`` (one folder listing), or None."""
        folder = posixpath.dirname(f"{self.images_dir}/{item_id}")
        stem = posixpath.basename(item_id)
        for name in self.project.listdir(folder):
            if posixpath.splitext(name)[0] == stem and is_image_name(name):
                return f"{folder}/{name}"
        return None

    # -- reading -------------------------------------------------------------------
    @abc.abstractmethod
    def parse_label(self, item: Item, label_rel: str, data: bytes) -> Item:
        """Return ``item`` with its annotations (and size) from the label file's bytes.

        Raises :class:`InputError` naming ``label_rel`` (and the line) for bad content.
        """

    def iter_items(self) -> Iterator[Item]:
        if not self.project.isdir(self.images_dir):
            raise UsageError(
                f"{self.project.url}: no {self.images_dir}/ folder (layout of format {self.name!r})"
            )
        index = read_auto_label_index(self.project)
        self._recheck = recheck_sidecars(self.project)
        visited: set[str] = set()
        groups = itertools.groupby(self.project.walk_files(self.images_dir), key=posixpath.dirname)
        for image_folder, paths in groups:
            sub = image_folder[len(self.images_dir) :].lstrip("/")
            label_folder = posixpath.join(self.labels_dir, sub) if sub else self.labels_dir
            visited.add(label_folder)
            try:
                label_names = {
                    n for n in self.project.listdir(label_folder) if n.endswith(self.label_ext)
                }
            except InputError as exc:  # e.g. a symlink to a folder outside the project
                yield from self._unreadable_folder(paths, exc)
                continue
            stems: set[str] = set()
            for image_rel in paths:
                name = posixpath.basename(image_rel)
                if not is_image_name(name):
                    log.debug("%s: not an image, skipped", image_rel)
                    continue
                item_id = self.item_id_of_image(image_rel)
                stem = posixpath.splitext(name)[0]
                if stem in stems:
                    yield error_item(
                        item_id,
                        image_rel,
                        InputError(
                            f"another image with item id {item_id!r} exists in {image_folder}/",
                            file=image_rel,
                        ),
                    )
                    continue
                stems.add(stem)
                label_name = stem + self.label_ext
                label_rel = posixpath.join(label_folder, label_name)
                has_label = label_name in label_names
                yield self._read_item(item_id, image_rel, label_rel if has_label else None, index)
            for orphan in sorted(label_names - {s + self.label_ext for s in stems}):
                yield self._orphan_item(posixpath.join(label_folder, orphan))
        if self.project.isdir(self.labels_dir):
            for label_rel in self.project.walk_files(self.labels_dir):
                if (
                    label_rel.endswith(self.label_ext)
                    and posixpath.dirname(label_rel) not in visited
                ):
                    yield self._orphan_item(label_rel)

    def _unreadable_folder(self, image_paths: Iterable[str], exc: InputError) -> Iterator[Item]:
        """The images of a folder whose label folder cannot be read: each an error item."""
        for image_rel in image_paths:
            if is_image_name(posixpath.basename(image_rel)):
                item_id = self.item_id_of_image(image_rel)
                yield error_item(item_id, image_rel, exc, status=ItemStatus.LABELED)

    def _orphan_item(self, label_rel: str) -> Item:
        item_id = posixpath.splitext(label_rel[len(self.labels_dir) + 1 :])[0]
        exc = InputError(f"label file with no image in {self.images_dir}/", file=label_rel)
        return error_item(item_id, label_rel, exc, status=ItemStatus.LABELED)

    def _read_item(
        self, item_id: str, image_rel: str, label_rel: str | None, index: dict[str, dict[str, Any]]
    ) -> Item:
        try:
            self.project.resolve(image_rel, item=item_id)
            if label_rel is None:
                return Item(item_id=item_id, uri=image_rel)
            data = self.project.read_bytes(label_rel)  # resolved there, escapes refused
            item = Item(
                item_id=item_id,
                uri=image_rel,
                status=ItemStatus.LABELED,
                source=AnnotationSource.HUMAN,
            )
            item = self.parse_label(item, label_rel, data)
        except InputError as exc:
            status = ItemStatus.UNLABELED if label_rel is None else ItemStatus.LABELED
            return error_item(item_id, image_rel, exc, status=status)
        except OSError as exc:
            where = label_rel or image_rel
            return error_item(
                item_id,
                image_rel,
                InputError(f"cannot read: {exc}", file=where),
                status=ItemStatus.LABELED,
            )
        entry = index.get(item_id)
        if (
            (entry is None or not matches_sidecar(entry, label_rel, data))
            and self._recheck
            and self.project.may_exist(sidecar_path(item_id))
        ):
            entry = read_sidecar(self.project, item_id)  # written since the index was read?
        if entry is not None and matches_sidecar(entry, label_rel, data):
            meta = {**item.meta, **auto_label_meta(entry)}
            item = item.model_copy(
                update={
                    "status": ItemStatus.AUTO_LABELED,
                    "source": AnnotationSource.AUTO,
                    "meta": meta,
                }
            )
        return item

    def image_size_of(self, item: Item) -> tuple[int, int]:
        """``(width, height)`` from the item when known, else from its image header."""
        if item.width is not None and item.height is not None:
            return item.width, item.height
        image_rel = item.uri if "://" not in item.uri else self.find_image(item.item_id)
        if image_rel is None or not self.project.exists(image_rel):
            image_rel = self.find_image(item.item_id)
        if image_rel is None:
            raise InputError(
                f"no image for item in {self.images_dir}/",
                file=self.label_path(item.item_id),
                item=item.item_id,
            )
        return image_size(self.project, image_rel, item=item.item_id)

    # -- writing -------------------------------------------------------------------
    @abc.abstractmethod
    def render_label(
        self, item: Item, annotations: list[Annotation], classes: list[str] | None = None
    ) -> bytes:
        """The label file's bytes for ``annotations`` on ``item`` (raises InputError)."""

    def write_items(
        self,
        items: Iterable[Item],
        classes: list[str] | None = None,
        *,
        image_root: ProjectFS | None = None,
    ) -> None:
        """Write label files for every labeled item; never replace an existing file.

        Images are expected under ``images/`` already; an image that is missing there is
        copied when ``item.uri`` is a full URL or ``image_root`` (the project the items
        were read from) is given.  Unlabeled items get no label file; items with
        ``error`` are skipped with a warning.  Raises :class:`HumanLabelConflict` if a
        label file already exists (nothing is overwritten).
        """
        self.prepare_write(classes)
        for item in readable_items(items):
            ext = posixpath.splitext(item.uri)[1] or ".jpg"
            image_rel = f"{self.images_dir}/{item.item_id}{ext}"
            if not self.project.exists(image_rel):
                data = read_image_bytes(item, self.project, image_root)
                if data is not None:
                    self.project.write_bytes(image_rel, data, overwrite=False)
                else:
                    log.warning(
                        "%s: image %s is not in this project and no image root was given",
                        item.item_id,
                        image_rel,
                    )
            if not item.is_labeled:
                continue
            local = item.model_copy(update={"uri": image_rel})
            content = self.render_label(local, list(item.annotations), classes)
            label_rel = self.label_path(item.item_id)
            try:
                self.project.write_bytes(label_rel, content, overwrite=False)
            except FileExistsError as exc:
                raise HumanLabelConflict(
                    f"{label_rel}: a label file exists already; it was not overwritten"
                ) from exc

    def prepare_write(self, classes: list[str] | None) -> None:
        """Hook run once before :meth:`write_items` (YOLO writes ``classes.txt``)."""

    def write_labels(self, writes: list[LabelWrite]) -> WriteOutcome:
        outcome = WriteOutcome()
        for w in writes:
            item_id = w.item.item_id
            label_rel = self.label_path(item_id)
            if w.item.has_human_label:
                outcome.refused[item_id] = f"{label_rel}: item has a human label; not written"
                continue
            try:
                self.project.resolve(label_rel, item=item_id)
                content = self.render_label(w.item, list(w.annotations))
            except InputError as exc:
                outcome.refused[item_id] = str(exc)
                continue
            written = write_auto_file(self.project, item_id, label_rel, content, w.provenance)
            if isinstance(written, str):
                outcome.refused[item_id] = written
                continue
            outcome.records.append(written)
        return outcome

    def write_targets(self, item_ids: Iterable[str]) -> list[str]:
        """Files a write of ``item_ids`` creates (recovery looks for temporaries next to them)."""
        return [self.label_path(i) for i in item_ids]


def _current_sha(project: ProjectFS, rel: str) -> str | None:
    try:
        return sha256_hex(project.read_bytes(rel))
    except FileNotFoundError:
        return None


def remove_file_records(project: ProjectFS, records: list[WrittenRecord]) -> list[str | None]:
    """Remove files created by a write, each only while its sha256 still matches.

    Returns, per record, ``None`` when the file is gone (removed now, or already) or why
    it was kept.  A label file whose content changed (a person edited it) is kept.  The
    item's sidecar is removed when it describes exactly this write (same path and
    sha256), so a kept, edited file reads as a human label from then on.
    """
    outcome: list[str | None] = []
    for r in records:
        if r.kind != "file":
            outcome.append(f"{r.path}: kept, record kind {r.kind!r} is not a file of this format")
            continue
        current = _current_sha(project, r.path)
        if current is None:
            log.info("%s: already gone", r.path)
            outcome.append(None)
        elif r.sha256 is not None and current != r.sha256:
            outcome.append(
                f"{r.path}: kept, its content changed since it was written (sha256 differs)"
            )
        else:
            project.remove(r.path)
            outcome.append(None)
        if r.path.startswith(AUTO_SIDECAR_DIR + "/"):
            continue
        body = read_sidecar(project, r.item_id)
        if body is not None and body.get("path") == r.path and body.get("sha256") == r.sha256:
            with contextlib.suppress(FileNotFoundError):
                project.remove(sidecar_path(r.item_id))
    return outcome

"""YOLO: ``images/``, ``labels/*.txt`` and ``classes.txt`` or ``data.yaml``.

Layout::

    ROOT/images/<id>.jpg        any depth; the item id is the path without extension
    ROOT/labels/<id>.txt        one line per box: ``class_id cx cy w h``
    ROOT/classes.txt            one class name per line (line index = class id), or
    ROOT/data.yaml              ``names: [a, b]`` or ``names: {0: a, 1: b}``

Box convention: YOLO lines hold the box centre and size **normalised** to ``[0, 1]`` by
the image's width and height.  Inside labeltriage boxes are pixel ``xyxy``, so the
image size is needed: it is read from the image header only (``PIL.Image.open(...).size``
parses the header and decodes no pixels), once per image that has a non-empty label
file.  Label files stay 5 columns; an auto-label's score lives in its sidecar record.

Predictions (:class:`YoloPredictions`, registered as ``yolo`` in
:data:`~connectors.formats.base.PREDICTION_FORMATS`): a folder of ``<id>.txt`` with
``class_id cx cy w h conf`` lines and a ``classes.txt`` (or ``data.yaml``) at its root.
"""

from __future__ import annotations

import logging
import math
import posixpath
from collections.abc import Iterator
from typing import Any, NoReturn

import yaml

from connectors.errors import InputError, UsageError
from connectors.formats._filebased import LabelFileFormat, image_size
from connectors.formats.base import FORMATS, PREDICTION_FORMATS, PredictionSource, ProjectFormat
from connectors.model import Annotation, Item, Prediction, check_box_in_image
from connectors.storage import ProjectFS

log = logging.getLogger(__name__)

CLASS_FILES = ("classes.txt", "data.yaml", "data.yml")


def parse_classes(text: str, rel: str) -> list[str]:
    """Class names from ``classes.txt`` (one per line) or a YOLO ``data.yaml`` (``names``)."""
    if rel.endswith((".yaml", ".yml")):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"{rel}: malformed YAML: {exc}") from exc
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            try:
                ids = sorted(int(k) for k in names)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"{rel}: 'names' keys must be class ids 0..n-1") from exc
            if ids != list(range(len(ids))):
                raise UsageError(f"{rel}: 'names' keys must be class ids 0..n-1, got {ids}")
            by_id = {int(k): v for k, v in names.items()}
            return [str(by_id[i]) for i in ids]
        if isinstance(names, list):
            return [str(n) for n in names]
        raise UsageError(f"{rel}: expected 'names' as a list or a mapping of class id to name")
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise UsageError(f"{rel}:{number}: empty class name")
    return [line.strip() for line in lines]


def load_classes(
    fs: ProjectFS, candidates: tuple[str, ...] = CLASS_FILES
) -> tuple[list[str], str] | None:
    """Class names and the file they came from: the first of ``candidates`` that exists."""
    for rel in candidates:
        if fs.exists(rel):
            return parse_classes(fs.read_text(rel), rel), rel
    return None


def parse_line(
    line: str,
    *,
    n_fields: int,
    classes: list[str],
    size: tuple[int, int],
    file: str,
    number: int,
    item: str | None = None,
) -> Annotation:
    """One YOLO line → an :class:`Annotation` with a pixel ``xyxy`` box.

    ``n_fields`` is 5 (``cls cx cy w h``, labels) or 6 (``… conf``, predictions);
    ``size`` is ``(width, height)`` in pixels.  Raises :class:`InputError` naming
    ``file:number``.
    """
    parts = line.split()
    if len(parts) != n_fields:
        raise InputError(
            f"expected {n_fields} fields, got {len(parts)}", file=file, line=number, item=item
        )
    try:
        class_id = int(parts[0])
    except ValueError:
        raise InputError(
            f"class id {parts[0]!r} is not an integer", file=file, line=number, item=item
        ) from None
    try:
        values = [float(text) for text in parts[1:]]
    except ValueError:
        _raise_bad_number(parts, file=file, number=number, item=item)
    if not all(map(math.isfinite, values)):
        _raise_bad_number(parts, file=file, number=number, item=item)
    if not 0 <= class_id < len(classes):
        raise InputError(
            f"unknown class id {class_id} ({len(classes)} classes are known)",
            file=file,
            line=number,
            item=item,
        )
    width, height = size
    cx, cy, w, h = values[:4]
    box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
    problem = check_box_in_image(box, width, height)
    if problem is not None:
        raise InputError(problem, file=file, line=number, item=item)
    score = None
    if n_fields == 6:
        score = values[4]
        if not 0.0 <= score <= 1.0:
            raise InputError(
                f"confidence {score} is outside [0, 1]", file=file, line=number, item=item
            )
    return Annotation(label=classes[class_id], box=box, score=score)


def _raise_bad_number(parts: list[str], *, file: str, number: int, item: str | None) -> NoReturn:
    """Raise for the first of ``parts[1:]`` that is not a finite number."""
    for position, text in enumerate(parts[1:], start=2):
        try:
            value = float(text)
        except ValueError:
            raise InputError(
                f"field {position} {text!r} is not a number", file=file, line=number, item=item
            ) from None
        if not math.isfinite(value):
            raise InputError(
                f"field {position} {text!r} is not a finite number",
                file=file,
                line=number,
                item=item,
            )
    raise AssertionError(f"no bad number among {parts[1:]}")  # the callers checked there is one


def render_line(annotation: Annotation, class_id: int, width: int, height: int) -> str:
    """``class_id cx cy w h`` (normalised, 6 decimals as YOLO writes them) for a pixel
    ``xyxy`` box."""
    if annotation.box is None:
        raise ValueError("YOLO detection labels need a box")
    x1, y1, x2, y2 = annotation.box
    cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
    w, h = (x2 - x1) / width, (y2 - y1) / height
    return f"{class_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


@FORMATS.register("yolo")
class YoloFormat(LabelFileFormat):
    """YOLO detection project.  Options: ``file`` (the classes file, when the source
    named ``classes.txt`` or a ``data.yaml``), ``classes`` (names, overriding files)."""

    name = "yolo"
    detect_priority = 50
    looked_for = "images/ + labels/*.txt + classes.txt or data.yaml"
    file_suffixes = (".yaml", ".yml", ".txt")
    labels_dir = "labels"
    label_ext = ".txt"

    def __init__(self, project: ProjectFS, **options: Any) -> None:
        super().__init__(project, **options)
        self._classes: list[str] | None = (
            list(options["classes"]) if options.get("classes") else None
        )
        self._classes_file: str | None = None

    def accepts_file(self, name: str) -> bool:
        return name.endswith((".yaml", ".yml", ".txt"))

    @classmethod
    def detect(cls, project: ProjectFS) -> bool:
        return cls.has_folders(project) and any(project.exists(f) for f in CLASS_FILES)

    @property
    def classes(self) -> list[str]:
        """Class names by id, from option ``classes``, option ``file``, ``classes.txt`` or ``data.yaml``."""
        if self._classes is None:
            candidates = (str(self.options["file"]),) if self.options.get("file") else CLASS_FILES
            found = load_classes(self.project, candidates)
            if found is None:
                raise UsageError(
                    f"{self.project.url}: YOLO project has no {' or '.join(candidates)} naming its classes"
                )
            self._classes, self._classes_file = found
        return self._classes

    def parse_label(self, item: Item, label_rel: str, data: bytes) -> Item:
        classes = self.classes
        size: tuple[int, int] | None = None
        annotations = []
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            if size is None:
                size = image_size(self.project, item.uri, item=item.item_id)
            annotations.append(
                parse_line(
                    line, n_fields=5, classes=classes, size=size, file=label_rel, number=number
                )
            )
        update: dict[str, Any] = {"annotations": annotations}
        if size is not None:
            update["width"], update["height"] = size
        return item.model_copy(update=update)

    def prepare_write(self, classes: list[str] | None) -> None:
        if classes is None:
            return
        if self.project.exists("classes.txt") or self.project.exists("data.yaml"):
            if self.classes != list(classes):
                raise UsageError(
                    f"{self.project.url}: existing class list {self.classes} differs from {list(classes)}"
                )
            return
        self.project.write_text("classes.txt", "".join(f"{c}\n" for c in classes), overwrite=False)
        self._classes = list(classes)

    def render_label(
        self, item: Item, annotations: list[Annotation], classes: list[str] | None = None
    ) -> bytes:
        names = list(classes) if classes is not None else self.classes
        ids = {name: i for i, name in enumerate(names)}
        lines = []
        width = height = 0
        if annotations:
            width, height = self.image_size_of(item)
        for a in annotations:
            if a.label not in ids:
                raise InputError(
                    f"class {a.label!r} is not in the project's class list",
                    file=self.label_path(item.item_id),
                    item=item.item_id,
                )
            if a.box is None:
                raise InputError(
                    "YOLO labels need boxes; got a classification label",
                    file=self.label_path(item.item_id),
                    item=item.item_id,
                )
            lines.append(render_line(a, ids[a.label], width, height))
        return "".join(f"{line}\n" for line in lines).encode()


@PREDICTION_FORMATS.register("yolo")
class YoloPredictions(PredictionSource):
    """A folder of ``<id>.txt`` prediction files, ``class_id cx cy w h conf`` per line.

    Boxes are normalised, so each file needs its image's size: from the ``item`` passed
    to :meth:`get`, else read from the image header in ``project``.  A line that cannot
    be read turns the whole item's prediction into one with ``error`` set.  Options:
    ``classes`` (names), ``model_version``.  A root ``classes.txt`` (or ``data.yaml``) is
    the class list, never an item.
    """

    def __init__(
        self, fs: ProjectFS, *, project: ProjectFormat | None = None, **options: Any
    ) -> None:
        if options.get("file") is not None:
            raise UsageError(
                f"yolo predictions: expected a folder of .txt files, got the file {options['file']!r} in {fs.url}"
            )
        self.fs = fs
        self.project = project
        self.model_version: str | None = options.get("model_version")
        if options.get("classes"):
            self.classes = [str(c) for c in options["classes"]]
            self.classes_file: str | None = None
        else:
            found = load_classes(fs)
            if found is None:
                raise UsageError(
                    f"{fs.url}: YOLO predictions need a {' or '.join(CLASS_FILES)} naming the classes"
                )
            self.classes, self.classes_file = found

    def _size(self, item_id: str, item: Item | None) -> tuple[int, int]:
        if item is not None and item.width is not None and item.height is not None:
            return item.width, item.height
        if self.project is None:
            raise InputError(
                "image size unknown: give the item with its size, or the project",
                file=f"{item_id}.txt",
                item=item_id,
            )
        image_rel = item.uri if item is not None and "://" not in item.uri else None
        if image_rel is None and isinstance(self.project, LabelFileFormat):
            image_rel = self.project.find_image(item_id)
        if image_rel is None:
            raise InputError(
                "no image found for this prediction in the project",
                file=f"{item_id}.txt",
                item=item_id,
            )
        return image_size(self.project.project, image_rel, item=item_id)

    def _parse(self, item_id: str, rel: str, text: str, item: Item | None) -> Prediction:
        annotations = []
        size: tuple[int, int] | None = None
        try:
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                if size is None:
                    size = self._size(item_id, item)
                annotations.append(
                    parse_line(
                        line, n_fields=6, classes=self.classes, size=size, file=rel, number=number
                    )
                )
        except InputError as exc:
            where = exc.file if exc.line is None else f"{exc.file}:{exc.line}"
            return Prediction(
                item_id=item_id,
                source=rel,
                model_version=self.model_version,
                error=f"{where}: {exc.message}",
            )
        return Prediction(
            item_id=item_id, annotations=annotations, source=rel, model_version=self.model_version
        )

    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        rel = f"{item_id}.txt"
        try:
            text = self.fs.read_text(rel)
        except FileNotFoundError:
            return None
        except InputError as exc:
            return Prediction(item_id=item_id, source=rel, error=str(exc))
        except (OSError, UnicodeDecodeError) as exc:
            return Prediction(item_id=item_id, source=rel, error=f"{rel}: cannot read: {exc}")
        return self._parse(item_id, rel, text, item)

    def __iter__(self) -> Iterator[Prediction]:
        for rel in self.fs.walk_files():
            if not rel.endswith(".txt") or rel == self.classes_file:
                continue
            item_id = posixpath.splitext(rel)[0]
            prediction = self.get(item_id)
            if prediction is not None:
                yield prediction

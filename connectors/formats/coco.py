"""COCO: one JSON file with ``images``, ``annotations`` and ``categories``.

Box convention at this edge: COCO ``bbox`` is ``[x, y, w, h]`` in pixels (top-left corner
plus size); inside labeltriage it becomes pixel ``xyxy`` = ``(x, y, x + w, y + h)``.

Layout and ids:

* the JSON file is the ``file`` option (relative to the project root), else
  ``annotations.json``, else the only ``*.json`` in the root, else the only one in
  ``annotations/``;
* images are found under ``image_root`` (relative to the project root): the option, else
  ``info.labeltriage.image_root`` written by :meth:`CocoFormat.write_items`, else
  ``images/`` next to the JSON (or at the root) when that folder exists, else the JSON's
  folder;
* ``item_id`` is ``file_name`` without its extension; ``uri`` is ``image_root/file_name``.

Reading: the JSON is parsed once (COCO is one document), then annotations are indexed by
``image_id`` and items are built lazily, image by image.  Bad input — an annotation of an
unknown category, a box of negative size or outside its image, a ``file_name`` that leaves
the project root, an annotation of an unknown ``image_id`` (yielded as its own item
``annotation:<id>``) — gives an item with ``error`` naming the file and item; the others
continue.  Image files are *not* checked for existence here (one request per image is too
slow on object stores): a missing image is reported by the image loader when it is read.

Status: an image with annotations is ``labeled`` by a human; one whose annotations all
carry the ``labeltriage`` provenance dict (written by :meth:`CocoFormat.write_labels`) is
``auto_labeled``; one without annotations is ``unlabeled`` (COCO cannot tell "no objects"
from "not labeled yet").

Write-back adds annotations with ``score`` and ``labeltriage`` = ``{run_id,
model_version, tier, score}`` only to images that have no annotation at write time, and
rewrites the file atomically (see :func:`connectors.formats._jsonfile.rewrite_json`).
"""

from __future__ import annotations

import logging
import posixpath
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from connectors.errors import InputError, PathEscapeError, UsageError
from connectors.formats._entries import entry_record
from connectors.formats._jsonfile import (
    JsonFileFormat,
    dump_json,
    entries_sha256,
    find_json,
    json_int,
    load_json,
    problems_error,
    rewrite_json,
)
from connectors.formats.base import (
    FORMATS,
    PREDICTION_FORMATS,
    LabelWrite,
    PredictionSource,
    ProjectFormat,
    WriteOutcome,
    WrittenRecord,
)
from connectors.model import (
    Annotation,
    AnnotationSource,
    Item,
    ItemStatus,
    Prediction,
    check_box_in_image,
)
from connectors.storage import ProjectFS

log = logging.getLogger(__name__)

DEFAULT_FILE = "annotations.json"
PROVENANCE_KEY = "labeltriage"
_IMAGE_KEYS = ("id", "file_name", "width", "height")
BoxXYXY = tuple[float, float, float, float]


def item_id_of(file_name: str) -> str:
    """``file_name`` without extension, POSIX separators (``a/b.jpg`` → ``a/b``)."""
    return posixpath.splitext(posixpath.normpath(file_name.replace("\\", "/")))[0]


def xywh_to_xyxy(bbox: Any) -> BoxXYXY:
    """COCO ``[x, y, w, h]`` → ``(x1, y1, x2, y2)``; ValueError when not four numbers."""
    if (
        not isinstance(bbox, list | tuple)
        or len(bbox) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
    ):
        raise ValueError(f"bbox {bbox!r} is not four numbers [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise ValueError(f"bbox {list(bbox)} has negative width or height")
    return (x, y, x + w, y + h)


def xyxy_to_xywh(box: BoxXYXY) -> list[float]:
    """A COCO ``bbox`` from pixel ``xyxy``, in COCO's convention of 2 decimals."""
    x1, y1, x2, y2 = box
    return [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]


class CocoIndex:
    """A parsed COCO document with annotations indexed by image: the lazy-item builder."""

    def __init__(self, data: Any, url: str) -> None:
        if not isinstance(data, dict):
            raise InputError(
                f"expected a COCO object with 'images', got a JSON {type(data).__name__}", file=url
            )
        images = data.get("images")
        if not isinstance(images, list):
            raise InputError("COCO file has no 'images' list", file=url)
        annotations = data.get("annotations") or []
        categories = data.get("categories") or []
        if not isinstance(annotations, list) or not isinstance(categories, list):
            raise InputError("COCO 'annotations' and 'categories' must be lists", file=url)
        self.url = url
        self.data = data
        self.images: list[Any] = images
        self.annotations: list[Any] = annotations
        self.categories: dict[Any, str] = {}
        for cat in categories:
            if isinstance(cat, dict) and "id" in cat and isinstance(cat.get("name"), str):
                self.categories[cat["id"]] = cat["name"]
            else:
                log.warning("%s: skipping malformed category %r", url, cat)
        self.image_ids: set[Any] = {im.get("id") for im in images if isinstance(im, dict)}
        self.by_image: dict[Any, list[int]] = defaultdict(list)
        self.orphans: list[int] = []
        for pos, ann in enumerate(annotations):
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            if image_id in self.image_ids:
                self.by_image[image_id].append(pos)
            else:
                self.orphans.append(pos)

    def category_id(self, name: str) -> Any | None:
        for cid, cname in self.categories.items():
            if cname == name:
                return cid
        return None

    def next_annotation_id(self) -> int:
        ids = [
            a["id"]
            for a in self.annotations
            if isinstance(a, dict) and isinstance(a.get("id"), int)
        ]
        return max(ids, default=0) + 1

    def parse_annotation(self, ann: Any, width: int | None, height: int | None) -> Annotation:
        """One COCO annotation as a pixel-``xyxy`` :class:`Annotation`; ValueError names why not."""
        if not isinstance(ann, dict):
            raise ValueError(f"annotation {ann!r} is not an object")
        ann_id = ann.get("id")
        cat = ann.get("category_id")
        if cat not in self.categories:
            raise ValueError(f"annotation {ann_id}: unknown category_id {cat!r}")
        try:
            box = xywh_to_xyxy(ann.get("bbox"))
        except ValueError as exc:
            raise ValueError(f"annotation {ann_id}: {exc}") from None
        why = check_box_in_image(box, width, height)
        if why is not None:
            raise ValueError(f"annotation {ann_id}: {why}")
        score = ann.get("score")
        if score is not None and not (
            isinstance(score, int | float) and 0.0 <= float(score) <= 1.0
        ):
            raise ValueError(f"annotation {ann_id}: score {score!r} is not in [0, 1]")
        return Annotation(
            label=self.categories[cat], box=box, score=None if score is None else float(score)
        )

    def image_annotations(
        self, image: dict[str, Any]
    ) -> tuple[list[Annotation], list[str], list[dict[str, Any]]]:
        """(valid annotations, problems, raw annotation dicts) of one image."""
        width, height = json_int(image.get("width")), json_int(image.get("height"))
        raws = [self.annotations[pos] for pos in self.by_image.get(image.get("id"), [])]
        good: list[Annotation] = []
        problems: list[str] = []
        for ann in raws:
            try:
                good.append(self.parse_annotation(ann, width, height))
            except ValueError as exc:
                problems.append(str(exc))
        return good, problems, raws


@FORMATS.register("coco")
class CocoFormat(JsonFileFormat):
    """A COCO project: one JSON file plus an image folder (see the module docstring).

    Options: ``file`` (the JSON, relative to the root), ``image_root`` (relative to the root).
    """

    name = "coco"
    tasks = ("detection",)
    title = "COCO"
    missing = f"no COCO JSON found ({DEFAULT_FILE}, or one *.json in the root or annotations/)"
    detect_priority = 30
    looked_for = "a COCO JSON with images/categories"
    opens_with = b"{"

    # -- locating ------------------------------------------------------------------------
    @staticmethod
    def find_file(project: ProjectFS) -> str | None:
        return find_json(
            project, preferred=(DEFAULT_FILE,), folders=(".", "annotations"), what="COCO file"
        )

    @classmethod
    def looks_like(cls, head: str) -> bool:
        return head.startswith("{") and any(
            f'"{k}"' in head for k in ("images", "annotations", "categories")
        )

    def image_root(self, data: dict[str, Any]) -> str:
        """Folder of the images, relative to the project root ("" = the root)."""
        if self.options.get("image_root") is not None:
            return str(self.options["image_root"]).strip("/")
        info = data.get("info")
        if isinstance(info, dict) and isinstance(info.get(PROVENANCE_KEY), dict):
            hinted = info[PROVENANCE_KEY].get("image_root")
            if isinstance(hinted, str):
                return hinted.strip("/")
        json_dir = posixpath.dirname(self.file)
        for candidate in (posixpath.join(json_dir, "images"), "images"):
            if self.project.isdir(candidate):
                return candidate
        return json_dir

    def load(self) -> tuple[CocoIndex, bytes]:
        data, raw = load_json(self.project, self.file)
        return CocoIndex(data, self.url), raw

    # -- reading -------------------------------------------------------------------------
    def iter_items(self) -> Iterator[Item]:
        index, _ = self.load()
        image_root = self.image_root(index.data)
        seen_ids: set[Any] = set()
        seen_items: set[str] = set()
        for pos, image in enumerate(index.images):
            yield self._item(index, pos, image, image_root, seen_ids, seen_items)
        for pos in index.orphans:
            ann = index.annotations[pos]
            ann_id = ann.get("id", pos) if isinstance(ann, dict) else pos
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            item_id = f"annotation:{ann_id}"
            err = InputError(
                f"annotation {ann_id} refers to unknown image_id {image_id!r}",
                file=self.url,
                item=item_id,
            )
            log.warning("%s", err)
            yield Item(item_id=item_id, uri="", meta={"error_file": self.url}, error=str(err))

    def _item(
        self,
        index: CocoIndex,
        pos: int,
        image: Any,
        image_root: str,
        seen_ids: set[Any],
        seen_items: set[str],
    ) -> Item:
        bad = self.invalid_item
        if (
            not isinstance(image, dict)
            or not isinstance(image.get("file_name"), str)
            or "id" not in image
        ):
            return bad(f"image:{pos}", "", f"image entry {pos} needs 'id' and 'file_name'")
        file_name = image["file_name"]
        item_id = item_id_of(file_name)
        uri = (
            posixpath.normpath(posixpath.join(image_root, file_name))
            if image_root
            else posixpath.normpath(file_name)
        )
        good, problems, raws = index.image_annotations(image)
        status, source = _status_of(raws)
        try:
            self.project.resolve(uri, item=item_id)
            if file_name.startswith("/") or "://" in file_name:
                raise PathEscapeError(
                    f"file_name {file_name!r} is not a relative path", file=self.url, item=item_id
                )
        except PathEscapeError as exc:
            return bad(item_id, file_name, f"file_name {file_name!r}: {exc.message}", status)
        if image["id"] in seen_ids:
            return bad(item_id, uri, f"duplicate image id {image['id']!r}", status)
        if item_id in seen_items:
            return bad(
                item_id,
                uri,
                f"another image has the same item id {item_id!r} ({file_name})",
                status,
            )
        seen_ids.add(image["id"])
        seen_items.add(item_id)
        meta = {k: v for k, v in image.items() if k not in _IMAGE_KEYS}
        error = self.item_error(problems, item_id, meta)
        if status is ItemStatus.AUTO_LABELED:
            prov = raws[0].get(PROVENANCE_KEY) or {}
            meta["auto_label"] = {"run_id": prov.get("run_id"), "provenance": prov}
        return Item(
            item_id=item_id,
            uri=uri,
            width=json_int(image.get("width")),
            height=json_int(image.get("height")),
            status=status,
            source=source,
            annotations=good,
            meta=meta,
            error=error,
        )

    # -- writing a whole project ---------------------------------------------------------
    def write_items(self, items: Iterable[Item], classes: list[str] | None = None) -> None:
        """Write ``items`` as a COCO JSON (``file``, default ``annotations.json``).

        Categories get ids ``1..N`` in the order of ``classes`` (else sorted names).  Items
        with ``error`` are skipped (logged); a class label without box or an item whose
        ``uri`` is a full URL cannot be expressed in COCO and raise :class:`UsageError`.
        Image-level extras come from ``item.meta``; an auto-label's provenance from
        ``item.meta["auto_label"]["provenance"]``.
        """
        rel = self._file or DEFAULT_FILE
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        pending: list[tuple[int, str, BoxXYXY, float | None, dict[str, Any] | None]] = []
        labels: set[str] = set()
        uris: list[str] = []
        for item in items:
            if item.error is not None:
                log.warning("not writing item %r to COCO: %s", item.item_id, item.error)
                continue
            if "://" in item.uri:
                raise UsageError(
                    f"item {item.item_id!r}: COCO file_name cannot hold the URL {item.uri!r}"
                )
            image_id = len(images) + 1
            extras = {
                k: v
                for k, v in item.meta.items()
                if k not in _IMAGE_KEYS and k not in ("auto_label", "error_file")
            }
            images.append(
                {
                    "id": image_id,
                    "file_name": item.uri,
                    "width": item.width,
                    "height": item.height,
                    **extras,
                }
            )
            uris.append(item.uri)
            prov = None
            if item.status is ItemStatus.AUTO_LABELED:
                prov = dict(
                    (item.meta.get("auto_label") or {}).get("provenance") or {"run_id": None}
                )
            for a in item.annotations:
                if a.box is None:
                    raise UsageError(
                        f"item {item.item_id!r}: COCO holds boxes, not the class label {a.label!r}"
                    )
                labels.add(a.label)
                pending.append((image_id, a.label, a.box, a.score, prov))
        if classes is not None:
            unknown = sorted(labels - set(classes))
            if unknown:
                raise UsageError(f"labels {unknown} are not in the given classes {classes}")
            names = list(classes)
        else:
            names = sorted(labels)
        cat_ids = {name: i + 1 for i, name in enumerate(names)}
        for ann_id, (image_id, label, box, score, prov) in enumerate(pending, start=1):
            bbox = xyxy_to_xywh(box)
            entry: dict[str, Any] = {
                "id": ann_id,
                "image_id": image_id,
                "category_id": cat_ids[label],
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
            }
            if score is not None:
                entry["score"] = score
            if prov is not None:
                entry[PROVENANCE_KEY] = prov
            annotations.append(entry)
        image_root = self._write_image_root(uris)
        for image in images:
            if image_root:
                image["file_name"] = posixpath.relpath(image["file_name"], image_root)
        doc = {
            "info": {PROVENANCE_KEY: {"image_root": image_root}},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": cat_ids[n], "name": n} for n in names],
        }
        self.project.write_bytes(rel, dump_json(doc))
        self._file = rel
        log.info(
            "wrote %d images, %d boxes to %s",
            len(images),
            len(annotations),
            self.project.url_of(rel),
        )

    def _write_image_root(self, uris: list[str]) -> str:
        if self.options.get("image_root") is not None:
            root = str(self.options["image_root"]).strip("/")
            outside = [u for u in uris if root and not u.startswith(root + "/")]
            if outside:
                raise UsageError(f"image {outside[0]!r} is not under image_root {root!r}")
            return root
        if uris and all(u.startswith("images/") for u in uris):
            return "images"
        return ""

    # -- write-back ----------------------------------------------------------------------
    def write_labels(self, writes: list[LabelWrite]) -> WriteOutcome:
        """Add scored annotations for images with no annotation *at write time* (atomic)."""
        rel = self.file

        def change(data: Any) -> tuple[bool, WriteOutcome]:
            index = CocoIndex(data, self.url)
            outcome = WriteOutcome()
            by_item: dict[str, dict[str, Any]] = {}
            for image in index.images:
                if isinstance(image, dict) and isinstance(image.get("file_name"), str):
                    by_item.setdefault(item_id_of(image["file_name"]), image)
            next_id = index.next_annotation_id()
            for w in writes:
                item_id = w.item.item_id
                image = by_item.get(item_id)
                if image is None:
                    outcome.refused[item_id] = f"no image with this item id in {self.url}"
                    continue
                raws = [index.annotations[p] for p in index.by_image.get(image.get("id"), [])]
                status, _ = _status_of(raws)
                if status is ItemStatus.LABELED:
                    outcome.refused[item_id] = (
                        f"has a human label ({len(raws)} annotations) at write time"
                    )
                    continue
                if status is ItemStatus.AUTO_LABELED:
                    run = (raws[0].get(PROVENANCE_KEY) or {}).get("run_id")
                    outcome.refused[item_id] = f"already auto-labeled by run {run}"
                    continue
                entries, why = self._entries(index, image, w, next_id)
                if why is not None:
                    outcome.refused[item_id] = why
                    continue
                next_id += len(entries)
                index.annotations.extend(entries)
                index.by_image[image.get("id")].extend(
                    range(len(index.annotations) - len(entries), len(index.annotations))
                )
                outcome.records.append(
                    entry_record(
                        rel, item_id, entries_sha256(entries), [str(e["id"]) for e in entries]
                    )
                )
            if outcome.records:
                data["annotations"] = index.annotations
            return bool(outcome.records), outcome

        outcome = rewrite_json(self.project, rel, change)
        for item_id, why in outcome.refused.items():
            log.info("%s: not writing item %r: %s", self.url, item_id, why)
        return outcome

    def _entries(
        self, index: CocoIndex, image: dict[str, Any], w: LabelWrite, next_id: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        if not w.annotations:
            return [], "no boxes to write (COCO cannot record an empty label)"
        width, height = json_int(image.get("width")), json_int(image.get("height"))
        prov: dict[str, Any] = {
            "run_id": w.provenance.run_id,
            "model_version": w.provenance.model_version,
            "tier": w.provenance.tier,
            "score": w.provenance.score,
        }
        if w.provenance.extra:
            prov["extra"] = w.provenance.extra
        entries = []
        for k, a in enumerate(w.annotations):
            if a.box is None:
                return [], f"COCO holds boxes, not the class label {a.label!r}"
            cat = index.category_id(a.label)
            if cat is None:
                return [], f"class {a.label!r} is not a category of {self.url}"
            why = check_box_in_image(a.box, width, height)
            if why is not None:
                return [], why
            bbox = xyxy_to_xywh(a.box)
            entry: dict[str, Any] = {
                "id": next_id + k,
                "image_id": image.get("id"),
                "category_id": cat,
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
                PROVENANCE_KEY: prov,
            }
            if a.score is not None:
                entry["score"] = a.score
            entries.append(entry)
        return entries, None

    def drop_entries(
        self, data: Any, records: list[WrittenRecord], positions: list[int]
    ) -> tuple[bool, list[tuple[int, str | None]]]:
        """Remove written annotations whose content is unchanged."""
        anns = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(anns, list):
            return False, [(i, "the file has no annotations list any more") for i in positions]
        by_id = {str(a.get("id")): a for a in anns if isinstance(a, dict)}
        drop: set[int] = set()
        results: list[tuple[int, str | None]] = []
        for i in positions:
            r = records[i]
            current = [by_id.get(e) for e in r.entry_ids]
            if any(c is None for c in current):
                results.append((i, "its annotations are no longer in the file"))
            elif entries_sha256(current) != r.sha256:
                results.append(
                    (
                        i,
                        "its annotations were edited since they were written (kept as a human label)",
                    )
                )
            else:
                drop.update(id(c) for c in current)
                results.append((i, None))
        if drop:
            data["annotations"] = [a for a in anns if id(a) not in drop]
        return bool(drop), results

    def records_of_run(self, run_id: str) -> list[WrittenRecord]:
        """Records of the annotations that run ``run_id`` left in the file (recovery)."""
        if not self.has_file():
            return []
        index, _ = self.load()
        images = {im.get("id"): im for im in index.images if isinstance(im, dict)}
        grouped: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for ann in index.annotations:
            if isinstance(ann, dict) and (ann.get(PROVENANCE_KEY) or {}).get("run_id") == run_id:
                grouped[ann.get("image_id")].append(ann)
        records = []
        for image_id, entries in grouped.items():
            image = images.get(image_id) or {}
            item_id = item_id_of(str(image.get("file_name", f"image:{image_id}")))
            records.append(
                entry_record(
                    self.file, item_id, entries_sha256(entries), [str(e["id"]) for e in entries]
                )
            )
        return records


def _status_of(raws: list[Any]) -> tuple[ItemStatus, AnnotationSource | None]:
    if not raws:
        return ItemStatus.UNLABELED, None
    if all(isinstance(a, dict) and isinstance(a.get(PROVENANCE_KEY), dict) for a in raws):
        return ItemStatus.AUTO_LABELED, AnnotationSource.AUTO
    return ItemStatus.LABELED, AnnotationSource.HUMAN


# -- predictions -------------------------------------------------------------------------


@PREDICTION_FORMATS.register("coco")
class CocoPredictions(PredictionSource):
    """COCO detections: a full COCO-like object (``images``/``categories``/``annotations``
    with ``score``) or a results list ``[{image_id, category_id, bbox, score}, ...]``.

    A results list names images by id only: the images and categories come from the
    ``project`` (a :class:`CocoFormat`) or the ``images_file`` option (a COCO JSON relative
    to ``fs``).  Item ids are ``file_name`` without extension, as for :class:`CocoFormat`.
    Boxes: COCO ``[x, y, w, h]`` pixels → pixel ``xyxy``.  A bad box or unknown category
    gives a :class:`Prediction` with ``error`` set.
    """

    def __init__(
        self, fs: ProjectFS, *, project: ProjectFormat | None = None, **options: Any
    ) -> None:
        self.fs = fs
        self.options = options
        file = options.get("file") or CocoFormat.find_file(fs)
        if file is None:
            raise UsageError(f"{fs.url}: no COCO predictions JSON found; name the file")
        self.file = str(file)
        self.url = fs.url_of(self.file)
        self.model_version: str | None = options.get("model_version")
        data, _ = load_json(fs, self.file)
        if isinstance(data, list):
            data = {"annotations": data, **self._images_and_categories(project)}
        elif isinstance(data, dict):
            info = data.get("info")
            if (
                self.model_version is None
                and isinstance(info, dict)
                and isinstance(info.get("model_version"), str)
            ):
                self.model_version = info["model_version"]
        self.index = CocoIndex(data, self.url)
        self.by_item: dict[str, dict[str, Any]] = {}
        for image in self.index.images:
            if isinstance(image, dict) and isinstance(image.get("file_name"), str):
                self.by_item.setdefault(item_id_of(image["file_name"]), image)
        for pos in self.index.orphans[:5]:
            log.warning(
                "%s: prediction %r refers to an unknown image",
                self.url,
                self.index.annotations[pos],
            )

    def _images_and_categories(self, project: ProjectFormat | None) -> dict[str, Any]:
        if self.options.get("images_file"):
            data, _ = load_json(self.fs, str(self.options["images_file"]))
            source = self.fs.url_of(str(self.options["images_file"]))
        elif isinstance(project, CocoFormat):
            data, _ = load_json(project.project, project.file)
            source = project.url
        else:
            raise UsageError(
                f"{self.url}: a COCO results list names images by id only; use it with a COCO project or pass images_file=<COCO json with images and categories>"
            )
        if not isinstance(data, dict):
            raise InputError("expected a COCO object with 'images' and 'categories'", file=source)
        return {"images": data.get("images") or [], "categories": data.get("categories") or []}

    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        image = self.by_item.get(item_id)
        if image is None:
            return None
        good, problems, _ = self.index.image_annotations(image)
        error = problems_error(problems, self.url, item_id)
        return Prediction(
            item_id=item_id,
            annotations=good,
            model_version=self.model_version,
            source=self.url,
            error=error,
        )

    def __iter__(self) -> Iterator[Prediction]:
        for item_id in self.by_item:
            prediction = self.get(item_id)
            if prediction is not None:
                yield prediction

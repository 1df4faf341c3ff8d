"""KITTI object detection (``label_2``): ``images/`` and ``labels/*.txt``.

Layout::

    ROOT/images/<id>.png|jpg    any depth; the item id is the path without extension
    ROOT/labels/<id>.txt        one object per line, 15 space-separated columns

Columns: ``type truncated occluded alpha x1 y1 x2 y2 h w l x y z ry``; the 2-D box
``x1 y1 x2 y2`` is pixel ``xyxy``, as inside labeltriage.  ``DontCare`` lines are kept
as annotations with label ``DontCare``; whether they are ignore regions is decided later
by a label map's ``ignore`` list.  The other columns (truncation, occlusion, 3-D box)
are kept per item in ``meta["kitti"]`` (one list of 10 strings per annotation) so that a
round trip writes them back unchanged; auto-labels get KITTI's placeholders.

The image size (for the box check) is read from the image header only, once per image
with a non-empty label file.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

from connectors.errors import InputError
from connectors.formats._filebased import LabelFileFormat, image_size
from connectors.formats.base import FORMATS
from connectors.model import Annotation, Item, check_box_in_image
from connectors.storage import ProjectFS

log = logging.getLogger(__name__)

N_FIELDS = 15
PLACEHOLDER_FIELDS = ("0.00", "0", "-10", "-1", "-1", "-1", "-1000", "-1000", "-1000", "-10")
"""truncated occluded alpha h w l x y z ry for an object with no 3-D information."""


def _looks_like_kitti(line: str) -> bool:
    parts = line.split()
    if len(parts) != N_FIELDS:
        return False
    try:
        float(parts[0])
    except ValueError:
        return True
    return False


@FORMATS.register("kitti")
class KittiFormat(LabelFileFormat):
    """KITTI ``label_2`` detection project (``images/`` + ``labels/*.txt``, 15 columns)."""

    name = "kitti"
    detect_priority = 60
    looked_for = "images/ + labels/*.txt with 15-column KITTI lines"
    labels_dir = "labels"
    label_ext = ".txt"

    @classmethod
    def detect(cls, project: ProjectFS) -> bool:
        """``images/`` and ``labels/`` without YOLO class files, and the first non-empty
        line among the first few label files has 15 columns starting with a class name."""
        if not cls.has_folders(project):
            return False
        if any(project.exists(f) for f in ("classes.txt", "data.yaml", "data.yml")):
            return False
        label_files = (p for p in project.walk_files(cls.labels_dir) if p.endswith(cls.label_ext))
        for rel in itertools.islice(label_files, 5):
            for line in project.read_text(rel).splitlines():
                if line.strip():
                    return _looks_like_kitti(line)
        return False

    def parse_label(self, item: Item, label_rel: str, data: bytes) -> Item:
        size: tuple[int, int] | None = None
        annotations = []
        extras = []
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != N_FIELDS:
                raise InputError(
                    f"expected {N_FIELDS} fields, got {len(parts)}", file=label_rel, line=number
                )
            for position, text in enumerate(parts[1:], start=2):
                try:
                    value = float(text)
                except ValueError:
                    raise InputError(
                        f"field {position} {text!r} is not a number", file=label_rel, line=number
                    ) from None
                if value != value or value in (float("inf"), float("-inf")):
                    raise InputError(
                        f"field {position} {text!r} is not a finite number",
                        file=label_rel,
                        line=number,
                    )
            box = (float(parts[4]), float(parts[5]), float(parts[6]), float(parts[7]))
            if size is None:
                size = image_size(self.project, item.uri, item=item.item_id)
            problem = check_box_in_image(box, *size)
            if problem is not None:
                raise InputError(problem, file=label_rel, line=number)
            annotations.append(Annotation(label=parts[0], box=box))
            extras.append(parts[1:4] + parts[8:])
        update: dict[str, Any] = {"annotations": annotations}
        if size is not None:
            update["width"], update["height"] = size
        if extras:
            update["meta"] = {**item.meta, "kitti": extras}
        return item.model_copy(update=update)

    def render_label(
        self, item: Item, annotations: list[Annotation], classes: list[str] | None = None
    ) -> bytes:
        extras = item.meta.get("kitti")
        keep = (
            isinstance(extras, list)
            and len(extras) == len(annotations)
            and annotations == list(item.annotations)
        )
        lines = []
        for index, a in enumerate(annotations):
            if a.box is None:
                raise InputError(
                    "KITTI labels need boxes; got a classification label",
                    file=self.label_path(item.item_id),
                    item=item.item_id,
                )
            if " " in a.label or not a.label:
                raise InputError(
                    f"class {a.label!r} cannot be written as a KITTI type (no spaces)",
                    file=self.label_path(item.item_id),
                    item=item.item_id,
                )
            other = [str(v) for v in extras[index]] if keep else list(PLACEHOLDER_FIELDS)  # type: ignore[index]
            coords = [f"{v:.2f}" for v in a.box]  # label_2 writes pixels with 2 decimals
            lines.append(" ".join([a.label, *other[:3], *coords, *other[3:]]))
        return "".join(f"{line}\n" for line in lines).encode()

"""Pascal VOC: ``images/`` and ``annotations/*.xml``.

Layout::

    ROOT/images/<id>.jpg          any depth; the item id is the path without extension
    ROOT/annotations/<id>.xml     one VOC file per image

Each ``<object>`` has ``<name>`` and ``<bndbox>`` with ``xmin ymin xmax ymax`` in pixels
(VOC's 1-based pixel coordinates are kept as they are; ``xyxy`` pixels inside
labeltriage).  The image size comes from ``<size>``; when it is missing or zero it is
read from the image header.  ``<filename>`` is written, and read only for a log line when
it disagrees with the image.

XML is parsed safely: a document with a DTD or entity declarations is refused (no
entity expansion, no external resources).  Most documents take a fast path through the
C parser of :mod:`xml.etree.ElementTree`; the rest go through ``defusedxml``
(:func:`parse_voc_xml`):

* The fast path takes a document only when its bytes contain no ``<!`` and no NUL byte
  and do not start with a UTF-16 byte-order mark.  A DTD starts with ``<!DOCTYPE``, and
  entities can only be declared inside a DTD, so such a document has no declarations: the
  parser can expand only the five predefined entities and character references, and
  reads nothing but the bytes given (ElementTree processes no XInclude).  Without NUL
  bytes or a UTF-16 mark, expat reads the document as UTF-8, Latin-1, ASCII or a declared
  single-byte encoding, and expat accepts a single-byte encoding only where every
  character of XML's markup (``<`` and ``!`` among them) is its ASCII byte; so a
  ``<!DOCTYPE`` cannot hide in other bytes.
* Anything else (comments and CDATA sections, which also start with ``<!``, UTF-16
  documents, and every document that declares something) is parsed by ``defusedxml``
  with DTDs, entities and external references forbidden, which refuses the hostile ones
  with its own message.
"""

from __future__ import annotations

import itertools
import logging
import math
import posixpath
import xml.etree.ElementTree as ET

import defusedxml
from defusedxml import ElementTree as SafeET

from connectors.errors import InputError
from connectors.formats._filebased import LabelFileFormat, image_size
from connectors.formats.base import FORMATS
from connectors.model import Annotation, Item, check_box_in_image
from connectors.storage import ProjectFS

log = logging.getLogger(__name__)

_BOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")
_UTF16_MARKS = (b"\xfe\xff", b"\xff\xfe")


def _declares_nothing(data: bytes) -> bool:
    """True when ``data`` cannot hold a DTD or a declaration (see the module docstring)."""
    return b"<!" not in data and b"\x00" not in data and not data.startswith(_UTF16_MARKS)


def parse_voc_xml(data: bytes, rel: str) -> ET.Element:
    """The root element of a VOC document; refuses DTDs and entities (see the module
    docstring for the two paths)."""
    try:
        if _declares_nothing(data):
            root = ET.fromstring(data)
        else:
            root = SafeET.fromstring(
                data, forbid_dtd=True, forbid_entities=True, forbid_external=True
            )
    except ET.ParseError as exc:
        line = exc.position[0] if getattr(exc, "position", None) else None
        raise InputError(f"malformed XML: {exc}", file=rel, line=line) from exc
    except defusedxml.DefusedXmlException as exc:
        raise InputError(f"refused XML: {exc}", file=rel) from exc
    if root.tag != "annotation":
        raise InputError(f"expected a VOC <annotation> root element, got <{root.tag}>", file=rel)
    return root


def _number(element: ET.Element | None, field: str, where: str, rel: str) -> float:
    text = element.findtext(field) if element is not None else None
    if text is None or not text.strip():
        raise InputError(f"{where}: missing <{field}>", file=rel)
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: <{field}> {text.strip()!r} is not a number", file=rel) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise InputError(f"{where}: <{field}> {text.strip()!r} is not a finite number", file=rel)
    return value


def integer_box(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """VOC's integer pixels, rounded outward so the box still contains ``box``: ``xmin``,
    ``ymin`` down, ``xmax``, ``ymax`` up (a coordinate within 10⁻⁶ of an integer is that
    integer, so float noise does not grow a box by a pixel)."""
    x1, y1, x2, y2 = box
    return (
        math.floor(x1 + 1e-6),
        math.floor(y1 + 1e-6),
        math.ceil(x2 - 1e-6),
        math.ceil(y2 - 1e-6),
    )


@FORMATS.register("voc")
class VocFormat(LabelFileFormat):
    """Pascal VOC detection project (``images/`` + ``annotations/*.xml``)."""

    name = "voc"
    detect_priority = 40
    looked_for = "images/ + annotations/*.xml"
    labels_dir = "annotations"
    label_ext = ".xml"

    @classmethod
    def detect(cls, project: ProjectFS) -> bool:
        """``images/`` and an ``annotations/`` folder whose first files include an ``.xml``."""
        if not cls.has_folders(project):
            return False
        first = itertools.islice(project.walk_files(cls.labels_dir), 20)
        return any(rel.endswith(cls.label_ext) for rel in first)

    def parse_label(self, item: Item, label_rel: str, data: bytes) -> Item:
        root = parse_voc_xml(data, label_rel)
        size = root.find("size")
        width = height = None
        if size is not None and (size.findtext("width") or "").strip():
            width = int(_number(size, "width", "<size>", label_rel))
            height = int(_number(size, "height", "<size>", label_rel))
        if not width or not height:
            width, height = image_size(self.project, item.uri, item=item.item_id)
        filename = (root.findtext("filename") or "").strip()
        if filename and filename != posixpath.basename(item.uri):
            log.debug("%s: <filename> %r differs from the image %s", label_rel, filename, item.uri)
        annotations = []
        for index, obj in enumerate(root.iter("object"), start=1):
            where = f"object {index}"
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise InputError(f"{where}: missing <name>", file=label_rel)
            bndbox = obj.find("bndbox")
            if bndbox is None:
                raise InputError(f"{where} ({name}): missing <bndbox>", file=label_rel)
            x1, y1, x2, y2 = (
                _number(bndbox, f, f"{where} ({name})", label_rel) for f in _BOX_FIELDS
            )
            problem = check_box_in_image((x1, y1, x2, y2), width, height)
            if problem is not None:
                raise InputError(f"{where} ({name}): {problem}", file=label_rel)
            annotations.append(Annotation(label=name, box=(x1, y1, x2, y2)))
        return item.model_copy(
            update={"annotations": annotations, "width": width, "height": height}
        )

    def render_label(
        self, item: Item, annotations: list[Annotation], classes: list[str] | None = None
    ) -> bytes:
        width, height = self.image_size_of(item)
        root = ET.Element("annotation")
        ET.SubElement(root, "folder").text = self.images_dir
        ET.SubElement(root, "filename").text = posixpath.basename(item.uri)
        size = ET.SubElement(root, "size")
        for tag, value in (("width", width), ("height", height), ("depth", 3)):
            ET.SubElement(size, tag).text = str(value)
        ET.SubElement(root, "segmented").text = "0"
        for a in annotations:
            if a.box is None:
                raise InputError(
                    "VOC labels need boxes; got a classification label",
                    file=self.label_path(item.item_id),
                    item=item.item_id,
                )
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = a.label
            for tag, text in (("pose", "Unspecified"), ("truncated", "0"), ("difficult", "0")):
                ET.SubElement(obj, tag).text = text
            bndbox = ET.SubElement(obj, "bndbox")
            for tag, coord in zip(_BOX_FIELDS, integer_box(a.box), strict=True):
                ET.SubElement(bndbox, tag).text = str(coord)
        ET.indent(root)
        return ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"

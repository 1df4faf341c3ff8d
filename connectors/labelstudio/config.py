"""The parts of a Label Studio label config (XML) that labeltriage needs.

The XML is parsed by ``label-studio-sdk``'s :class:`LabelInterface` (imported on first
use: it is slow to import).  labeltriage needs the ``<Image value="$key">`` object (which
task ``data`` field holds the image) and the ``<RectangleLabels>`` or ``<Choices>`` control
that labels it (the ``from_name`` of written regions, and the class names).  A config
with a DTD or entity declarations is refused before parsing (Label Studio never writes
them; they are how XML bombs work).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from connectors.errors import InputError, UsageError
from connectors.labelstudio.regions import RegionNames

_DECLARATION = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


@dataclass(frozen=True)
class LabelConfig:
    """What labeltriage needs from a project's XML label config."""

    image_key: str
    """The task ``data`` field holding the image (``$image`` → ``image``)."""
    image_name: str
    boxes_from: str | None
    choices_from: str | None
    labels: tuple[str, ...]

    @property
    def task(self) -> str:
        return "detection" if self.boxes_from else "classification"

    @property
    def names(self) -> RegionNames:
        return RegionNames(
            boxes_from=self.boxes_from, choices_from=self.choices_from, to_name=self.image_name
        )


def parse_label_config(xml: str, *, where: str = "<label config>") -> LabelConfig:
    """The image object and its ``RectangleLabels``/``Choices`` control (see the module docstring).

    Raises :class:`InputError` for XML that cannot be parsed and :class:`UsageError` for a
    config without an image or without a box or class control for it.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise UsageError(f"{where}: the project has no label config")
    if _DECLARATION.search(xml):
        raise InputError("label config with a DTD or entity declaration refused", file=where)
    return _parse(xml, where)


@functools.lru_cache(maxsize=32)
def _parse(xml: str, where: str) -> LabelConfig:
    from label_studio_sdk.label_interface import LabelInterface

    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises its own classes, lxml's and ValueError
        raise InputError(f"malformed label config: {exc}", file=where) from exc
    images = [o for o in interface.objects if o.tag == "Image"]
    image = next((o for o in images if str(o.value or "").startswith("$")), None)
    if image is None:
        raise UsageError(
            f'{where}: the label config has no <Image value="$..."> tag; labeltriage needs images'
        )
    controls = [c for c in interface.controls if image.name in (c.to_name or [])]
    boxes = next((c for c in controls if c.tag == "RectangleLabels"), None)
    choices = next((c for c in controls if c.tag == "Choices"), None)
    if boxes is None and choices is None:
        raise UsageError(
            f"{where}: the label config has neither <RectangleLabels> nor <Choices> for image "
            f"{image.name!r}"
        )
    labeling = boxes if boxes is not None else choices
    labels = tuple(str(v) for v in (getattr(labeling, "labels", None) or []) if v)
    return LabelConfig(
        image_key=str(image.value)[1:],
        image_name=str(image.name),
        boxes_from=None if boxes is None else str(boxes.name),
        choices_from=None if choices is None else str(choices.name),
        labels=labels,
    )


__all__ = ["LabelConfig", "parse_label_config"]

"""FiftyOne datasets as labeltriage projects: ``fiftyone://DATASET``.

A FiftyOne dataset (https://docs.voxel51.com) is a project like any other: ``--source
fiftyone://DATASET`` (or a config ``source`` of that form) reads its samples, and
``--predictions fiftyone://DATASET`` reads a predictions field of the same (or another)
dataset.  The format lives in :mod:`connectors.formats.fiftyone.dataset`, which imports
FiftyOne; this module holds what needs no FiftyOne: the URL form, the box conventions
and the names of what labeltriage writes.

FiftyOne's conventions, and how they map to labeltriage's:

* one **sample** is one item; ``item_id`` is the sample id (``str(sample.id)``), ``uri``
  is the sample's ``filepath`` as a ``file://`` URL (a ``filepath`` that is already a URL,
  such as ``s3://…``, is kept);
* human labels are the label field ``ground_truth`` (option ``label_field``), a
  ``Detections`` (or a single ``Detection``) field for detection, a ``Classification``
  field for classification; a sample whose label field is ``None`` is unlabeled, an empty
  ``Detections`` is a label that says "nothing to mark";
* FiftyOne boxes are **relative** ``[x, y, w, h]``: the top-left corner and the size, each
  in ``[0, 1]`` as a share of the image's width or height.  labeltriage boxes are pixel
  ``xyxy`` (:mod:`connectors.model`), so the image size is needed: the sample's
  ``metadata.width``/``height``, or, when the metadata is missing, the image header
  (read, not saved into the dataset);
* predictions are a label field too (``predictions`` by default, option ``field``), with
  each label's ``confidence`` as its score.

What labeltriage writes into a dataset, all under its own names (``lt_`` by default,
option ``prefix``) and never into a human label field:

* after scoring, per sample: ``lt_difficulty`` (the combined score, 0..1), ``lt_tier``,
  ``lt_<scorer>`` for each scorer, ``lt_score_run`` (the run id) and ``lt_error`` (why a
  sample could not be scored), plus one sample tag ``lt_easy``/``lt_medium``/``lt_hard``;
* at stage ``autolabel``, the auto-labels in the field ``lt_autolabel`` (option
  ``autolabel_field``), with the provenance (:data:`PROVENANCE_ATTRIBUTES`) on the field's
  label and on each detection; ``labeltriage rollback RUN_ID`` sets it back to ``None``.
"""

from __future__ import annotations

import hashlib
import json
import math
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from connectors.errors import UsageError
from connectors.model import check_box_in_image

SCHEME = "fiftyone://"
DEFAULT_LABEL_FIELD = "ground_truth"
DEFAULT_PREDICTIONS_FIELD = "predictions"
DEFAULT_PREFIX = "lt_"
TIERS = ("easy", "medium", "hard")

RUN_ID_ATTRIBUTE = "lt_run_id"
"""The label attribute that names the run which wrote an auto-label."""
PROVENANCE_ATTRIBUTES = (
    RUN_ID_ATTRIBUTE,
    "lt_tier",
    "lt_model_version",
    "lt_score",
    "lt_difficulty",
    "lt_audit",
)
"""Attributes of every label labeltriage writes (each detection carries the first two)."""

PROJECT_OPTIONS = ("label_field", "autolabel_field", "prefix", "publish_scores")
PREDICTION_OPTIONS = ("field", "model_version")


@dataclass(frozen=True)
class DatasetURL:
    """``fiftyone://NAME[?option=value&…]``: a dataset name and options from the query."""

    name: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return SCHEME + urllib.parse.quote(self.name, safe="")


def is_dataset_url(source: str) -> bool:
    return source.strip().lower().startswith(SCHEME)


def parse_dataset_url(source: str, allowed: Sequence[str] = ()) -> DatasetURL:
    """``fiftyone://NAME?key=value`` → :class:`DatasetURL`.

    The name is URL-unquoted (``%20`` for a space).  Query keys must be in ``allowed``;
    anything else is a :class:`UsageError` naming the source.
    """
    text = source.strip()
    if not is_dataset_url(text):
        raise UsageError(f"{source!r} is not a FiftyOne dataset URL; expected fiftyone://DATASET")
    rest = text[len(SCHEME) :]
    raw_name, _, query = rest.partition("?")
    name = urllib.parse.unquote(raw_name.rstrip("/"))
    if not name:
        raise UsageError(f"{source!r} names no dataset; expected fiftyone://DATASET")
    options: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            known = ", ".join(allowed) or "none"
            raise UsageError(f"{source}: unknown option {key!r} (known: {known})")
        options[key] = value
    return DatasetURL(name=name, options=options)


def as_bool(value: Any, option: str) -> bool:
    """An option given as a bool or as text (``true``/``false``, ``1``/``0``, ``yes``/``no``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise UsageError(f"option {option} must be true or false, not {value!r}")


def check_field_name(name: str, option: str) -> str:
    """A top-level FiftyOne field name: not empty, no ``.``, not starting with ``_`` or ``$``."""
    if not name or "." in name or name.startswith(("_", "$")):
        raise UsageError(
            f"option {option}: {name!r} is not a field name (no '.', not starting with '_' or '$')"
        )
    return name


def relative_to_xyxy(
    bbox: Sequence[float] | None, width: int | None, height: int | None
) -> tuple[float, float, float, float]:
    """FiftyOne's relative ``[x, y, w, h]`` → pixel ``xyxy`` for a ``width``×``height`` image.

    Raises :class:`ValueError` saying why when the box is not four finite numbers, has no
    positive size, does not fit the image (one pixel of slack), or the size is unknown.
    """
    if bbox is None or len(bbox) != 4:
        raise ValueError(f"bounding_box {bbox!r} is not [x, y, w, h]")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bounding_box {list(bbox)!r} is not four numbers") from exc
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"bounding_box {[x, y, w, h]} has a non-finite value")
    if not width or not height:
        raise ValueError("the image size is unknown (no metadata, and the image cannot be read)")
    box = (x * width, y * height, (x + w) * width, (y + h) * height)
    why = check_box_in_image(box, width, height)
    if why is not None:
        raise ValueError(f"bounding_box {[x, y, w, h]} on a {width}x{height} image: {why}")
    return box


def xyxy_to_relative(
    box: tuple[float, float, float, float], width: int | None, height: int | None
) -> list[float]:
    """Pixel ``xyxy`` → FiftyOne's relative ``[x, y, w, h]``, clipped to the image.

    Raises :class:`ValueError` when the size is unknown or the box does not fit the image.
    """
    if not width or not height:
        raise ValueError("the image size is unknown")
    why = check_box_in_image(box, width, height)
    if why is not None:
        raise ValueError(why)
    x1, y1, x2, y2 = box
    x1, x2 = max(0.0, x1), min(float(width), x2)
    y1, y2 = max(0.0, y1), min(float(height), y2)
    return [x1 / width, y1 / height, (x2 - x1) / width, (y2 - y1) / height]


def content_sha256(raw: Mapping[str, Any]) -> str:
    """Checksum of a label as stored (its database form): any edit changes it."""
    text = json.dumps(raw, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def score_field_names(prefix: str, scorers: Sequence[str]) -> dict[str, str]:
    """Table column → sample field for the scores that go back to the dataset."""
    names = {
        "score": f"{prefix}difficulty",
        "tier": f"{prefix}tier",
        "error": f"{prefix}error",
    }
    fixed = set(names.values())
    for scorer in scorers:
        safe = "".join(c if c.isalnum() or c == "_" else "_" for c in scorer)
        name = f"{prefix}{safe}"
        names[scorer] = name if name not in fixed else f"{prefix}scorer_{safe}"
    return names


__all__ = [
    "DEFAULT_LABEL_FIELD",
    "DEFAULT_PREDICTIONS_FIELD",
    "DEFAULT_PREFIX",
    "PROVENANCE_ATTRIBUTES",
    "RUN_ID_ATTRIBUTE",
    "SCHEME",
    "DatasetURL",
    "content_sha256",
    "is_dataset_url",
    "parse_dataset_url",
    "relative_to_xyxy",
    "score_field_names",
    "xyxy_to_relative",
]

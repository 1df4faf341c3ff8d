"""Label maps: model classes → project classes, plus classes to ignore.

On the command line both come in one file (YAML or JSON)::

    {"map": {"stop sign": "stop", "traffic light": "trafficlight"}, "ignore": ["DontCare"]}

With an empty ``map`` every model class keeps its name.  With a non-empty ``map``,
unmapped model classes are dropped.  ``ignore`` names *project* classes whose regions
count neither as misses nor make an overlapping prediction wrong (KITTI ``DontCare``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.errors import InputError
from connectors.model import Annotation


class LabelMap(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    map: dict[str, str] = Field(default_factory=dict)
    ignore: tuple[str, ...] = ()

    def apply(self, annotations: Iterable[Annotation]) -> list[Annotation]:
        """Rename model classes to project classes; drop unmapped ones when a map is set."""
        if not self.map:
            return list(annotations)
        return [
            a.model_copy(update={"label": self.map[a.label]})
            for a in annotations
            if a.label in self.map
        ]

    def is_ignored(self, label: str) -> bool:
        return label in self.ignore


def load_label_map(path: str | None, storage_options: dict[str, Any] | None = None) -> LabelMap:
    """Read a label-map file (YAML or JSON, any fsspec URL); ``None`` gives the identity."""
    if path is None:
        return LabelMap()
    import fsspec

    try:
        with fsspec.open(path, "rt", **(storage_options or {})) as f:
            text = f.read()
    except FileNotFoundError as exc:
        raise InputError("label map file not found", file=path) from exc
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"malformed label map: {exc}", file=path) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError("label map must be a mapping with keys 'map' and 'ignore'", file=path)
    try:
        return LabelMap.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise InputError(f"invalid label map field {loc!r}: {first['msg']}", file=path) from exc

"""Label maps: model classes → project classes, plus classes to ignore.

On the command line both come in one file (YAML or JSON)::

    {"map": {"stop sign": "stop", "traffic light": "trafficlight"}, "ignore": ["DontCare"]}

With an empty ``map`` every model class keeps its name.  With a non-empty ``map``,
unmapped model classes are dropped.  ``ignore`` names *project* classes whose regions
count neither as misses nor make an overlapping prediction wrong (KITTI ``DontCare``).

:func:`check_label_map` compares a label map with the classes that really occur (model
classes in the predictions, project classes in the labels) and says when it connects
nothing, or leaves most of the project's labels without a source;
:func:`suggest_label_map` proposes a map by matching class names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

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


# -- checking a label map against the classes that really occur ------------------------------


def _words(name: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+", name.lower())
    return [w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words]


def _matches(predicted: str, project: str) -> bool:
    """Whether a model class and a project class name the same thing by their words:
    ``traffic light`` / ``trafficlight`` (same letters), ``stop sign`` / ``stop`` (the
    project class's words within the model class's), ``cars`` / ``Car`` (plural)."""
    p, q = _words(predicted), _words(project)
    if not p or not q:
        return False
    if "".join(p) == "".join(q):
        return True
    return set(q) <= set(p) or set(p) <= set(q)


def suggest_label_map(predicted: Iterable[str], project: Iterable[str]) -> dict[str, str]:
    """A map from model classes to project classes proposed by matching their names.

    Each model class goes to the project class it matches (see :func:`_matches`); when
    several match, the one whose name is closest in length.  Unmatched classes are left
    out (a label map drops them).
    """
    targets = sorted(set(project))
    out: dict[str, str] = {}
    for p in sorted(set(predicted)):
        hits = [q for q in targets if _matches(p, q)]
        if hits:
            flat = "".join(_words(p))
            out[p] = min(hits, key=lambda q: (abs(len("".join(_words(q))) - len(flat)), q))
    return out


class LabelMapCheck(BaseModel):
    """How a label map connects the predicted classes with the project's classes.

    ``predicted``: model class → boxes seen; ``project``: project class → labels seen
    (ignored classes left out); ``mapped``: model class → the project class it becomes,
    for those that arrive at one; ``without_source``: project classes no model class
    maps to; ``suggestion``: a map proposed by matching names.  :attr:`warning` says
    what is wrong, if anything.
    """

    FILENAME: ClassVar[str] = "label_map_check.json"

    predicted: dict[str, int] = Field(default_factory=dict)
    project: dict[str, int] = Field(default_factory=dict)
    mapped: dict[str, str] = Field(default_factory=dict)
    without_source: list[str] = Field(default_factory=list)
    suggestion: dict[str, str] = Field(default_factory=dict)
    items_seen: int = 0

    @property
    def warning(self) -> str | None:
        if not self.predicted or not self.project:
            return None
        if not self.mapped:
            hint = (
                f"; a map by class names would be {json.dumps(self.suggestion)}"
                " (labeltriage suggest-map prints it as YAML)"
                if self.suggestion
                else "; no class names match: write a label map"
            )
            return (
                f"no predicted class maps to a project class (predicted: "
                f"{', '.join(sorted(self.predicted)[:8])}{' …' if len(self.predicted) > 8 else ''}; "
                f"project: {', '.join(sorted(self.project))}): every prediction is dropped and "
                f"every labeled object counts as missed{hint}"
            )
        labels = sum(self.project.values())
        missing = sum(self.project[c] for c in self.without_source)
        if labels and missing / labels > 0.5:
            listed = ", ".join(f"{c} ({self.project[c]})" for c in self.without_source)
            return (
                f"most project labels ({missing} of {labels}) are of classes no predicted class "
                f"maps to: {listed}; predictions cannot label them"
            )
        return None


def check_label_map(
    predicted: Mapping[str, int], project: Mapping[str, int], label_map: LabelMap
) -> LabelMapCheck:
    """Check ``label_map`` against the model classes and project classes seen (counts)."""
    wanted = {c: n for c, n in project.items() if not label_map.is_ignored(c)}
    mapped = {}
    for p in predicted:
        target = label_map.map.get(p) if label_map.map else p
        if target is not None and target in wanted:
            mapped[p] = target
    reached = set(mapped.values())
    return LabelMapCheck(
        predicted=dict(sorted(predicted.items(), key=lambda kv: (-kv[1], kv[0]))),
        project=dict(sorted(wanted.items(), key=lambda kv: (-kv[1], kv[0]))),
        mapped=mapped,
        without_source=sorted((c for c in wanted if c not in reached), key=lambda c: -wanted[c]),
        suggestion=suggest_label_map(predicted, wanted),
    )

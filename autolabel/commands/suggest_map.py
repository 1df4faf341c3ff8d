"""``labeltriage suggest-map``: a label map proposed by matching class names, as YAML."""

from __future__ import annotations

import click
import yaml

from autolabel.commands._common import (
    label_map_option,
    open_inputs,
    parse_storage_options,
    predictions_options,
    project_options,
    storage_options_option,
)
from connectors.errors import UsageError


def _listed(counts: dict[str, int], names: list[str]) -> str:
    return ", ".join(f"{n} ({counts[n]})" for n in names) or "none"


@click.command("suggest-map")
@project_options
@predictions_options("Predictions whose classes are mapped (folder or file).")
@label_map_option("A label map to check against the classes (its ignore list is kept).")
@storage_options_option()
def suggest_map(
    source: str,
    fmt: str,
    predictions: str | None,
    predictions_format: str,
    label_map: str | None,
    storage_options: str | None,
) -> None:
    """Print a label map (YAML) from the predicted classes to the project's classes,
    proposed by matching their names (`stop sign` → `stop`, `traffic light` →
    `trafficlight`).  Reads every item's labels and predictions once."""
    from connectors.labelmap import LabelMap, load_label_map
    from connectors.stats import label_map_check

    if not predictions:
        raise UsageError("give --predictions: their classes are what the map maps")
    options = parse_storage_options(storage_options)
    project, source_obj = open_inputs(source, fmt, options, predictions, predictions_format)
    if source_obj is None:
        raise UsageError(f"{predictions}: no predictions could be opened")
    given = load_label_map(label_map, options) if label_map else LabelMap()
    check = label_map_check(project, source_obj, given, limit=None, warn=False)
    proposal = LabelMap(map=check.suggestion, ignore=given.ignore)
    reached = set(proposal.map.values())
    dropped = [c for c in check.predicted if c not in proposal.map]
    orphans = [c for c in check.project if c not in reached]
    header = [
        f"# label map proposed from class names by labeltriage suggest-map ({check.items_seen} items)",
        "# check it, then pass it as --label-map FILE (or the config's label_map)",
        f"# predicted classes left out (a map drops them): {_listed(check.predicted, dropped)}",
        f"# project classes no predicted class maps to: {_listed(check.project, orphans)}",
    ]
    if label_map and check.warning:
        header.append(f"# the given map {label_map}: {check.warning}")
    body = yaml.safe_dump(
        {"map": dict(proposal.map), "ignore": list(proposal.ignore)},
        sort_keys=False,
        allow_unicode=True,
    )
    click.echo("\n".join(header) + "\n" + body, nl=False)

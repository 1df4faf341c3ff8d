"""``labeltriage stats``: count items, labels, classes and bad items; print one JSON object."""

from __future__ import annotations

import json

import click

from autolabel.commands._common import (
    label_map_from,
    label_map_option,
    open_inputs,
    predictions_options,
    project_options,
    storage_options_from,
    storage_options_option,
)


@click.command("stats")
@project_options
@storage_options_option()
@predictions_options(
    "Predictions to count (folder or file).", "Predictions format (yolo, coco) or auto."
)
@label_map_option("YAML/JSON label map applied to predictions before counting.")
def stats(
    source: str,
    fmt: str,
    storage_options: str | None,
    predictions: str | None,
    predictions_format: str,
    label_map: str | None,
) -> None:
    """Print counts of a project as one JSON object: items, labeled, unlabeled, boxes,
    classes, predictions (when given) and errors (bad items do not fail the command)."""
    from connectors.stats import compute_stats

    options = storage_options_from(storage_options)
    project, prediction_source = open_inputs(source, fmt, options, predictions, predictions_format)
    mapping = label_map_from(label_map, options)
    result = compute_stats(project, prediction_source, label_map=mapping)
    click.echo(json.dumps(result, indent=2, sort_keys=False))

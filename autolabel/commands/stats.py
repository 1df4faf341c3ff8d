"""``labeltriage stats``: count items, labels, classes and bad items; print one JSON object."""

from __future__ import annotations

import json
from typing import Any

import click

from connectors.errors import UsageError


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """``--storage-options`` is a JSON object (e.g. ``{"anon": true}``)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"--storage-options is not valid JSON: {exc.msg} (column {exc.colno})"
        ) from exc
    if not isinstance(value, dict):
        raise UsageError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return value


@click.command("stats")
@click.option("--source", "-s", required=True, help="Project folder or file (any fsspec URL).")
@click.option(
    "--format", "-f", "fmt", default="auto", show_default=True, help="Project format, or auto."
)
@click.option("--storage-options", default=None, help="fsspec storage options as a JSON object.")
@click.option("--predictions", default=None, help="Predictions to count (folder or file).")
@click.option(
    "--predictions-format",
    default="auto",
    show_default=True,
    help="Predictions format (yolo, coco) or auto.",
)
@click.option(
    "--label-map", default=None, help="YAML/JSON label map applied to predictions before counting."
)
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
    from connectors.labelmap import load_label_map
    from connectors.project import open_predictions, open_project
    from connectors.stats import compute_stats

    options = parse_storage_options(storage_options)
    project = open_project(source, fmt, options)
    prediction_source = (
        open_predictions(predictions, predictions_format, options, project=project)
        if predictions
        else None
    )
    mapping = load_label_map(label_map, options) if label_map else None
    result = compute_stats(project, prediction_source, label_map=mapping)
    click.echo(json.dumps(result, indent=2, sort_keys=False))

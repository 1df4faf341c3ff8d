"""``labeltriage score``: score every item's difficulty; write difficulty.parquet and summary.json."""

from __future__ import annotations

import json
from typing import Any

import click

from connectors.errors import UsageError


def parse_scorer_settings(text: str | None) -> dict[str, dict[str, Any]] | None:
    """``--scorer-settings`` is a JSON object of per-scorer objects."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"--scorer-settings is not valid JSON: {exc.msg} (column {exc.colno})"
        ) from exc
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise UsageError(
            '--scorer-settings must be a JSON object of objects, e.g. \'{"box_uncertain_share": {"low": 0.3}}\''
        )
    return value


@click.command("score")
@click.option("--source", "-s", required=True, help="Project folder or file (any fsspec URL).")
@click.option(
    "--format", "-f", "fmt", default="auto", show_default=True, help="Project format, or auto."
)
@click.option("--predictions", default=None, help="Predictions you bring (folder or file).")
@click.option(
    "--predictions-format",
    default="auto",
    show_default=True,
    help="Predictions format (yolo, coco, ...) or auto.",
)
@click.option(
    "--model",
    "model",
    default=None,
    help="A labeltriage checkpoint to predict with (instead of --predictions).",
)
@click.option(
    "--label-map",
    default=None,
    help="YAML/JSON file: {map: {model class: project class}, ignore: [classes]}.",
)
@click.option(
    "--scorers",
    default=None,
    help="Comma-separated scorer names (default: fourier + what the inputs support).",
)
@click.option(
    "--scorer-settings",
    default=None,
    help='Per-scorer settings as JSON, e.g. \'{"fourier": {"cutoff": 0.3}}\'.',
)
@click.option(
    "--storage-options",
    default=None,
    help="fsspec storage options as a JSON object (project and --out).",
)
@click.option(
    "--reference",
    default=None,
    help="An earlier run folder: reuse its reference distributions, weights and tier thresholds.",
)
@click.option(
    "--tier-mode",
    type=click.Choice(["quantiles", "thresholds"]),
    default=None,
    help="Cut tiers by shares of items or by score values.",
)
@click.option(
    "--easy",
    type=float,
    default=None,
    help="Easy cut: share of items (quantiles, default 0.3) or score (thresholds).",
)
@click.option(
    "--hard",
    type=float,
    default=None,
    help="Hard cut: share of items (quantiles, default 0.7) or score (thresholds).",
)
@click.option(
    "--error-min-score",
    type=float,
    default=0.25,
    show_default=True,
    help="Predictions below this confidence are dropped when measuring their true error.",
)
@click.option(
    "--signed-weights",
    is_flag=True,
    help="Let scorers that rank the true error backwards take part, reversed.",
)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images decoded and scored per batch.")
@click.option(
    "--num-workers", type=int, default=2, show_default=True, help="Image-decoding worker processes."
)
@click.option("--run-id", default=None, help="Run id (default: time-based).")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar (default: when stderr is a terminal).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    help="Run folder for difficulty.parquet and summary.json (any fsspec URL).",
)
def score(
    source: str,
    fmt: str,
    predictions: str | None,
    predictions_format: str,
    model: str | None,
    label_map: str | None,
    scorers: str | None,
    scorer_settings: str | None,
    storage_options: str | None,
    reference: str | None,
    tier_mode: str | None,
    easy: float | None,
    hard: float | None,
    error_min_score: float,
    signed_weights: bool,
    batch_size: int,
    num_workers: int,
    run_id: str | None,
    progress: bool | None,
    out_dir: str,
) -> None:
    """Score every item's difficulty and sort items into easy / medium / hard tiers."""
    from pydantic import ValidationError

    from autolabel.commands._common import want_progress
    from autolabel.commands.stats import parse_storage_options
    from connectors.labelmap import load_label_map
    from connectors.project import open_predictions, open_project
    from difficulty.scoring import score_project
    from difficulty.tiers import TierConfig

    if predictions and model:
        raise UsageError("give --predictions or --model, not both")
    options = parse_storage_options(storage_options)
    tier_fields: dict[str, Any] = {
        k: v for k, v in {"mode": tier_mode, "easy": easy, "hard": hard}.items() if v is not None
    }
    try:
        tiers = TierConfig.model_validate(tier_fields)
    except ValidationError as exc:
        raise UsageError(f"tiers: {exc.errors()[0]['msg']}") from exc
    project = open_project(source, fmt, options)
    prediction_source = (
        open_predictions(predictions, predictions_format, options, project=project)
        if predictions
        else None
    )
    names = [s.strip() for s in scorers.split(",") if s.strip()] if scorers else None
    result = score_project(
        project,
        predictions=prediction_source,
        checkpoint=model,
        label_map=load_label_map(label_map, options),
        scorers=names,
        settings=parse_scorer_settings(scorer_settings),
        tiers=tiers,
        reference=reference,
        out_dir=out_dir,
        storage_options=options,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=want_progress(progress),
        run_id=run_id,
        error_min_score=error_min_score,
        signed_weights=signed_weights,
    )
    s = result.summary
    comb = s["combination"]
    click.echo(
        f"scored {s['scored']} of {s['items']} items ({s['errors']} not scored) with {', '.join(s['scorers'])}"
    )
    click.echo(
        f"tiers: easy {s['tiers']['easy']}, medium {s['tiers']['medium']}, hard {s['tiers']['hard']}"
    )
    click.echo(f"combination: {comb['method']} ({comb['reason']})")
    click.echo(f"wrote {result.paths['difficulty']} and {result.paths['summary']}")

"""``labeltriage score``: score every item's difficulty; write difficulty.parquet and summary.json."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from autolabel.commands._common import (
    configured_project,
    label_map_from,
    label_map_option,
    model_option,
    open_inputs,
    parse_json_object,
    predictions_options,
    progress_option,
    project_options,
    storage_options_from,
    storage_options_option,
    want_progress,
)
from connectors.errors import UsageError
from difficulty.options import ScoreOptions

if TYPE_CHECKING:
    from connectors.formats.base import PredictionSource, ProjectFormat
    from connectors.labelmap import LabelMap
    from connectors.stats import LabelMapTally

DEFAULT_MAP = click.core.ParameterSource.DEFAULT_MAP


def parse_scorer_settings(text: str | None) -> dict[str, dict[str, Any]] | None:
    """``--scorer-settings`` is a JSON object of per-scorer objects."""
    return parse_json_object(
        text,
        "--scorer-settings",
        '\'{"box_uncertain_share": {"low": 0.3}}\'',
        of_objects=True,
    )


def score_options(
    scorers: str | None,
    scorer_settings: str | None,
    tier_mode: str | None,
    easy: float | None,
    hard: float | None,
    **fields: Any,
) -> ScoreOptions:
    """The scoring options of the command line; scorers and their settings not given there
    come from the configured project (:func:`configured_project`); ``fields``: the other
    options of :class:`ScoreOptions`."""
    from pydantic import ValidationError

    from difficulty.tiers import TierConfig

    project = configured_project()
    names = [s.strip() for s in scorers.split(",") if s.strip()] if scorers else None
    settings = parse_scorer_settings(scorer_settings)
    if project is not None:
        names = names or project.scorers or None
        settings = settings or project.scorer_settings or None
    tier_fields: dict[str, Any] = {
        k: v for k, v in {"mode": tier_mode, "easy": easy, "hard": hard}.items() if v is not None
    }
    try:
        tiers = TierConfig.model_validate(tier_fields)
    except ValidationError as exc:
        raise UsageError(f"tiers: {exc.errors()[0]['msg']}") from exc
    return ScoreOptions(scorers=names, settings=settings, tiers=tiers, **fields)


@click.command("score")
@project_options
@predictions_options("Predictions you bring (folder or file).")
@model_option()
@label_map_option()
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
@storage_options_option("fsspec storage options as a JSON object (project and --out).")
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
    default=None,
    help="Predictions below this confidence are dropped when measuring their true error "
    "(default: the checkpoint's box confidence, else 0.25).",
)
@click.option(
    "--signed-weights",
    is_flag=True,
    help="Let scorers that rank the true error backwards take part, reversed.",
)
@click.option(
    "--batch-size",
    type=int,
    default=64,
    show_default=True,
    help="Images decoded and scored per batch.",
)
@click.option(
    "--num-workers",
    type=int,
    default=2,
    show_default=True,
    help="Image-decoding worker processes of the local engine (Dask workers decode in their own process).",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "dask"]),
    default="local",
    show_default=True,
    help="Where scoring runs: this process, or Dask tasks over partitions of the project.",
)
@click.option(
    "--scheduler",
    default=None,
    help="With --engine dask: a running Dask scheduler, tcp://HOST:PORT "
    "(default: start a local cluster on 127.0.0.1).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="With --engine dask and no --scheduler: worker processes of the local cluster.",
)
@click.option(
    "--staging",
    default=None,
    help="With --engine dask: URL where the project's partitions are written for the workers "
    "to read, removed after the run (default: a temporary folder for a local cluster; "
    "OUT/.labeltriage-staging with --scheduler).",
)
@click.option(
    "--partition-size",
    type=click.IntRange(min=1),
    default=None,
    help="With --engine dask: items per partition, one Dask task each [default: 256].",
)
@click.option("--run-id", default=None, help="Run id (default: time-based).")
@progress_option("Progress bar (default: when stderr is a terminal).")
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
    error_min_score: float | None,
    signed_weights: bool,
    batch_size: int,
    num_workers: int,
    engine: str,
    scheduler: str | None,
    workers: int,
    staging: str | None,
    partition_size: int | None,
    run_id: str | None,
    progress: bool | None,
    out_dir: str,
) -> None:
    """Score every item's difficulty and sort items into easy / medium / hard tiers."""
    from difficulty.workerstart import start_workers_early

    start_workers_early(num_workers if engine != "dask" else 0)  # torch loads meanwhile
    from autolabel.engine_dask import Opener, ReopenablePredictions, score_project_with_engine
    from connectors.labelmap import LabelMap

    if predictions and model:
        raise UsageError("give --predictions or --model, not both")
    if engine != "dask":
        ctx = click.get_current_context()
        for name, value in (
            ("scheduler", scheduler),
            ("staging", staging),
            ("partition_size", partition_size),
        ):
            if value is not None and ctx.get_parameter_source(name) is not DEFAULT_MAP:
                raise UsageError(f"--{name.replace('_', '-')} needs --engine dask")
        # the config's Dask settings, with --engine local on the command line, are unused
        scheduler = staging = partition_size = None
    options = storage_options_from(storage_options)
    project, prediction_source = open_inputs(source, fmt, options, predictions, predictions_format)
    if engine == "dask" and predictions and prediction_source is not None:
        # each Dask worker opens the predictions from their source, with these storage options
        prediction_source = ReopenablePredictions(
            Opener(predictions, predictions_format, options),
            project=Opener(source, project.name, options),
            opened=prediction_source,
        )
    mapping = label_map_from(label_map, options) or LabelMap()
    tally, inputs = _counted_inputs(project, prediction_source, engine)
    result = score_project_with_engine(
        project,
        score_options(
            scorers,
            scorer_settings,
            tier_mode,
            easy,
            hard,
            error_min_score=error_min_score,
            signed_weights=signed_weights,
            batch_size=batch_size,
            num_workers=num_workers,
        ),
        engine=engine,
        scheduler=scheduler or None,
        n_workers=workers,
        staging=staging,
        partition_size=partition_size,
        **inputs,
        checkpoint=model,
        label_map=mapping,
        reference=reference,
        out_dir=out_dir,
        storage_options=options,
        progress=want_progress(progress),
        run_id=run_id,
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
    if tally is not None:  # a map that connects nothing is warned about (stderr)
        _write_label_map_check(tally, mapping, out_dir, options)


def _counted_inputs(
    project: ProjectFormat, predictions: PredictionSource | None, engine: str
) -> tuple[LabelMapTally | None, dict[str, Any]]:
    """The label-map check's tally (None without predictions) and the ``items`` and
    ``predictions`` of the scoring run, passing through it: the check counts the run's own
    stream instead of reading the items again.  Dask workers look predictions up in their
    own processes; the tally looks those of its items up itself at the end."""
    from connectors.stats import LabelMapTally

    if predictions is None:
        return None, {"items": None, "predictions": None}
    tally = LabelMapTally(predictions)
    counted = tally.predictions if engine != "dask" else predictions
    return tally, {"items": tally.items(project.iter_items()), "predictions": counted}


def _write_label_map_check(
    tally: LabelMapTally, mapping: LabelMap, out_dir: str, options: dict[str, Any] | None
) -> None:
    """Make the label-map check from the tally (its warning logged) and write it to the run."""
    from connectors.storage import ProjectFS

    check = tally.check(mapping)
    ProjectFS(out_dir, options).write_text(check.FILENAME, check.model_dump_json(indent=1))

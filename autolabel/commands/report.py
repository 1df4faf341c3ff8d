"""``labeltriage report DIR``: report.html, summary.json, plan.csv for a scored run."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from autolabel.commands._common import predictions_options, storage_options_option

if TYPE_CHECKING:
    from difficulty.plan import PlanSettings


@click.command("report")
@click.argument("run_dir")
@click.option(
    "--team-size",
    type=int,
    default=None,
    help="Annotators on the project (default 1, or the plan config's).",
)
@click.option(
    "--hours-per-day",
    type=float,
    default=None,
    help="Annotation hours per person per day (default 8).",
)
@click.option(
    "--plan-config",
    default=None,
    help="YAML/JSON planning settings: seconds_per_tier, annotators, audit_share, ...",
)
@click.option(
    "--history",
    multiple=True,
    help="An earlier run folder to show in the trend (repeatable; default: the run's sibling folders).",
)
@predictions_options("Predictions to draw on the thumbnails (the ones the run was scored with).")
@storage_options_option("fsspec storage options as a JSON object (for RUN_DIR and the project).")
def report(
    run_dir: str,
    team_size: int | None,
    hours_per_day: float | None,
    plan_config: str | None,
    history: tuple[str, ...],
    predictions: str | None,
    predictions_format: str,
    storage_options: str | None,
) -> None:
    """Write RUN_DIR/report.html (self-contained), summary.json, plan.csv and assignment.csv.

    Run it after the gate (`labeltriage autolabel`) so that the report shows what the gate
    did; `labeltriage run` does both in that order."""
    from autolabel.commands._common import open_inputs, parse_storage_options
    from difficulty.report import write_report
    from difficulty.table import read_difficulty

    options = parse_storage_options(storage_options)
    settings = _load_plan_settings(plan_config) if plan_config else None
    if team_size is not None and team_size < 1:
        raise click.BadParameter("must be at least 1", param_hint="--team-size")
    if hours_per_day is not None and not 0 < hours_per_day <= 24:
        raise click.BadParameter("must be in (0, 24]", param_hint="--hours-per-day")
    project = source = None
    if predictions:  # drawn on the thumbnails; they need the project the run scored
        _, meta = read_difficulty(run_dir, options)
        project, source = open_inputs(
            str(meta["source"]), str(meta.get("format") or "auto"), options, predictions,
            predictions_format,
        )  # fmt: skip
    paths = write_report(
        run_dir,
        team_size=team_size,
        hours_per_day=hours_per_day,
        plan_settings=settings,
        history=list(history) or None,
        project=project,
        predictions=source,
        storage_options=options,
    )
    for name, path in paths.items():
        click.echo(f"{name}: {path}")


def _load_plan_settings(path: str) -> PlanSettings:
    import json

    import fsspec
    import yaml
    from pydantic import ValidationError

    from connectors.errors import UsageError
    from difficulty.plan import PlanSettings

    try:
        with fsspec.open(path, "rt") as f:
            text = f.read()
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        return PlanSettings.model_validate(data or {})
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: plan config not found") from exc
    except (ValueError, yaml.YAMLError) as exc:
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise UsageError(f"{path}: invalid plan setting {loc!r}: {first['msg']}") from exc
        raise UsageError(f"{path}: malformed plan config: {exc}") from exc

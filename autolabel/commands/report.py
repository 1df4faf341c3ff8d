"""``labeltriage report DIR``: report.html, summary.json, plan.csv for a scored run."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from autolabel.commands._common import storage_options_option

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
@storage_options_option("fsspec storage options as a JSON object (for RUN_DIR).")
def report(
    run_dir: str,
    team_size: int | None,
    hours_per_day: float | None,
    plan_config: str | None,
    history: tuple[str, ...],
    storage_options: str | None,
) -> None:
    """Write RUN_DIR/report.html (self-contained), summary.json, plan.csv and assignment.csv."""
    from autolabel.commands._common import parse_storage_options
    from difficulty.report import write_report

    options = parse_storage_options(storage_options)
    settings = _load_plan_settings(plan_config) if plan_config else None
    if team_size is not None and team_size < 1:
        raise click.BadParameter("must be at least 1", param_hint="--team-size")
    if hours_per_day is not None and not 0 < hours_per_day <= 24:
        raise click.BadParameter("must be in (0, 24]", param_hint="--hours-per-day")
    paths = write_report(
        run_dir,
        team_size=team_size,
        hours_per_day=hours_per_day,
        plan_settings=settings,
        history=list(history) or None,
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

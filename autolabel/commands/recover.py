"""``labeltriage recover``: finish or undo auto-label runs that were cut short."""

from __future__ import annotations

import json

import click

from autolabel.commands._common import (
    project_options,
    storage_options_from,
    storage_options_option,
)


@click.command("recover")
@project_options
@storage_options_option()
@click.pass_context
def recover(ctx: click.Context, source: str, fmt: str, storage_options: str | None) -> None:
    """Roll back (or complete, if it had committed) every auto-label run of the project
    whose process died while writing, and remove the temporaries it left.

    Any command that opens the project does this too; `recover` says what it did, as
    JSON.  Runs still writing are left alone (outcome in_progress).  With a config
    (labeltriage --config F recover), run records the project's dead runs left
    `running` in the report store are marked failed as well.
    """
    from autolabel.store import recover_run_records
    from connectors.project import open_project
    from connectors.writeback import recover as recover_runs

    project = open_project(source, fmt, storage_options_from(storage_options), recover=False)
    runs = recover_runs(project)
    out: dict[str, object] = {"runs": [r.model_dump() for r in runs]}
    obj = ctx.find_root().obj or {}
    cfg = obj.get("config")
    if cfg is not None:
        name, _ = cfg.project(obj.get("project"))
        out["records"] = [
            {"run_id": r.run_id, "status": r.status, "error": r.error}
            for r in recover_run_records(cfg, name)
        ]
    if not runs:
        click.echo("nothing to recover: no auto-label run was cut short", err=True)
    for r in runs:
        click.echo(r.message, err=True)
    click.echo(json.dumps(out, indent=1))

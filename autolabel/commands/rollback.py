"""``labeltriage rollback RUN_ID``: remove exactly what one auto-label run wrote."""

from __future__ import annotations

import json
import shlex
from typing import Any

import click

from autolabel.commands._common import (
    project_options,
    storage_options_from,
    storage_options_option,
)
from connectors.errors import UsageError


def rollback_command(
    run_id: str,
    source: str,
    fmt: str,
    config_path: str | None = None,
    project: str | None = None,
) -> str:
    """The command line that undoes run ``run_id`` (printed after every writing run)."""
    if config_path is not None:
        which = f" --project {shlex.quote(project)}" if project else ""
        return f"labeltriage --config {shlex.quote(config_path)}{which} rollback {run_id}"
    return f"labeltriage rollback {run_id} --source {shlex.quote(source)} --format {fmt}"


@click.command("rollback")
@click.argument("run_id")
@project_options
@storage_options_option()
@click.pass_context
def rollback(
    ctx: click.Context, run_id: str, source: str, fmt: str, storage_options: str | None
) -> None:
    """Remove the labels run RUN_ID wrote, and nothing else.

    Labels a person has edited since are kept (and listed).  An unknown RUN_ID exits
    with code 2 and lists the project's runs.  A live Label Studio project is its own
    record of what a run stored, so this works from any machine; with a config, the run's
    folder in the report store is marked rolled back too, and `serve` stops serving it."""
    from connectors.project import open_project
    from connectors.writeback import rollback as rollback_run

    cfg, name = _configured(ctx, source)
    options: dict[str, Any] = dict(cfg.projects[name].options) if cfg is not None else {}
    project = open_project(source, fmt, storage_options_from(storage_options), **options)
    restore = getattr(project, "restore_manifest", None)
    if callable(restore) and restore(run_id):
        click.echo(f"run {run_id}: its manifest was rebuilt from the project", err=True)
    result = rollback_run(project, run_id)
    click.echo(result.message)
    if cfg is not None:
        _mark_run_folder(cfg, name, run_id, {"removed": result.removed, "kept": result.kept})
    click.echo(
        json.dumps(
            {"run_id": result.run_id, "removed": result.removed, "kept": result.kept}, indent=1
        )
    )


def _configured(ctx: click.Context, source: str) -> tuple[Any, str]:
    """The group's config and project when the source is that project's (else ``None, ""``)."""
    root = ctx.find_root().obj or {}
    cfg = root.get("config")
    if cfg is None or not cfg.projects:
        return None, ""
    try:
        name, p = cfg.project(root.get("project"))
    except UsageError:
        return None, ""
    return (cfg, name) if p.source == source else (None, "")


def _mark_run_folder(cfg: Any, project: str, run_id: str, outcome: dict[str, Any]) -> None:
    """Leave ``rollback.json`` in the run's report folder, if the report store has it."""
    from autolabel.store import ReportStore, mark_rolled_back

    store = ReportStore(cfg.report_store, cfg.report_store_options or None)
    marked = mark_rolled_back(store, project, run_id, outcome)
    if marked is not None:
        click.echo(f"run {run_id}: marked rolled back in {marked}", err=True)

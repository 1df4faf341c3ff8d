"""``labeltriage rollback RUN_ID``: remove exactly what one auto-label run wrote."""

from __future__ import annotations

import json

import click

from autolabel.commands._common import (
    parse_storage_options,
    project_options,
    storage_options_option,
)


@click.command("rollback")
@click.argument("run_id")
@project_options
@storage_options_option()
def rollback(run_id: str, source: str, fmt: str, storage_options: str | None) -> None:
    """Remove the labels run RUN_ID wrote, and nothing else.

    Labels a person has edited since are kept (and listed).  An unknown RUN_ID exits
    with code 2 and lists the project's runs."""
    from connectors.project import open_project
    from connectors.writeback import rollback as rollback_run

    project = open_project(source, fmt, parse_storage_options(storage_options))
    result = rollback_run(project, run_id)
    click.echo(result.message)
    click.echo(
        json.dumps(
            {"run_id": result.run_id, "removed": result.removed, "kept": result.kept}, indent=1
        )
    )

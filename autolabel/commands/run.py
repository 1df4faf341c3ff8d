"""``labeltriage run``: one full run of each configured project at its stage."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import click

from autolabel.commands._common import config_from, config_option, want_progress
from autolabel.commands.rollback import rollback_command
from autolabel.store import record_json
from connectors.errors import UsageError


@click.command("run")
@config_option
@click.option(
    "-p", "--project", "projects", multiple=True,
    help="Run only this project (repeat for several); default: every project in the config.",
)  # fmt: skip
@click.option(
    "--progress/--no-progress", default=None,
    help="Show progress bars on long steps (default: when stderr is a terminal).",
)  # fmt: skip
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print each run record as one JSON line instead of a summary.",
)
@click.pass_context
def run(
    ctx: click.Context,
    config_path: str | None,
    projects: tuple[str, ...],
    progress: bool | None,
    as_json: bool,
) -> None:
    """One full run of each project at its stage: stats, score, report, then shadow or autolabel.

    Each run writes <report_store>/<project>/<run_id>/ with its outputs and run.json (its
    record).  A run of a project that is already running elsewhere (scheduler, another
    `labeltriage run`) is skipped and recorded as skipped.  Exit code 1 when a run failed.
    """
    from autolabel.pipeline import run_locked

    def terminate(signum: int, frame: FrameType | None) -> None:
        # SIGTERM (a container or CronJob being stopped) ends the run like Ctrl-C does:
        # the run is recorded as failed ("interrupted") and its project lock released.
        raise SystemExit(128 + signum)

    cfg, cfg_path = config_from(ctx, config_path)
    names = list(projects) or list(cfg.projects)
    if not names:
        raise UsageError("the config has no projects")
    for name in names:
        cfg.project(name)  # unknown names are a usage error before anything runs
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if in_main else None
    failed = []
    try:
        for name in names:
            record = run_locked(cfg, name, trigger="manual", progress=want_progress(progress))
            if as_json:
                click.echo(record_json(record))
            else:
                line = f"{name}: {record.status} (run {record.run_id}, stage {record.stage})"
                if record.error:
                    line += f": {record.error}"
                click.echo(line)
                gate = record.counts.get(record.stage)
                if isinstance(gate, dict) and gate.get("verdict"):
                    click.echo(f"  {record.stage}: {gate['verdict']}")
                if "report" in record.outputs:
                    click.echo(f"  report: {record.outputs['report']}")
            written = (record.counts.get("autolabel") or {}).get("written") or 0
            if written:
                several = name if len(cfg.projects) > 1 else None
                undo = rollback_command(record.run_id, "", "", cfg_path, several)
                click.echo(f"  {written} labels written; undo: {undo}", err=as_json)
            if record.status == "failed":
                failed.append(name)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    if failed:
        ctx.exit(1)

"""``labeltriage schedule``: the scheduler daemon, or ``--list`` of its jobs."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from autolabel.commands._common import config_from, config_option


@click.command("schedule")
@config_option
@click.option(
    "--list",
    "list_only",
    is_flag=True,
    help="Show the jobs, their next run times and last outcome, then exit.",
)
@click.option("--json", "as_json", is_flag=True, help="With --list: one JSON object per job.")
@click.pass_context
def schedule(ctx: click.Context, config_path: str | None, list_only: bool, as_json: bool) -> None:
    """Run every project on its cron schedule until SIGTERM or Ctrl-C.

    Jobs and run history live in the job store (scheduler.job_store; by default
    scheduler.sqlite in a local report store) and survive restarts: a run missed while
    the daemon was down starts on restart (once, however many were missed) if it is
    within scheduler.misfire_grace_seconds.  SIGTERM lets the run in progress finish.
    """
    from autolabel.scheduler import list_jobs, serve

    cfg, path = config_from(ctx, config_path)
    if list_only:
        jobs = list_jobs(cfg)
        if as_json:
            for job in jobs:
                click.echo(
                    json.dumps(
                        {
                            **job.__dict__,
                            "next_run": job.next_run.isoformat() if job.next_run else None,
                        }
                    )
                )
            return
        click.echo(f"{'project':<20} {'schedule':<16} {'next run':<26} last outcome")
        for job in jobs:
            next_run = job.next_run.isoformat(timespec="seconds") if job.next_run else "-"
            last = (
                f"{job.last_status} {job.last_run_id} {job.last_finished or ''}".strip()
                if job.last_status
                else "-"
            )
            if job.last_error:
                last += f" ({job.last_error})"
            click.echo(f"{job.project:<20} {job.schedule or '-':<16} {next_run:<26} {last}")
        return

    def started(scheduler: Any, actions: dict[str, str]) -> None:
        for name, action in sorted(actions.items()):
            job = scheduler.get_job(name)
            next_run = (
                job.next_run_time.isoformat(timespec="seconds")
                if job and job.next_run_time
                else "-"
            )
            click.echo(f"{name}: {action}, next run {next_run}")
        click.echo(
            "scheduler running; SIGTERM or Ctrl-C stops it after the run in progress", err=True
        )

    serve(cfg, os.path.abspath(path), on_started=started)

"""The ``labeltriage`` command line: the composition root.

Commands are thin: they parse options, call library functions and turn errors into exit
codes (0 success, 1 a run that failed, 2 bad usage or bad config).  Each command lives in
``autolabel/commands/<name>.py`` and is imported only when invoked, so ``--help`` is fast.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module:attribute, one-line help)
    "stats": ("autolabel.commands.stats:stats", "Count items, labels, classes and bad items of a project."),
    "score": ("autolabel.commands.score:score", "Score every item's difficulty; write difficulty.parquet."),
    "report": ("autolabel.commands.report:report", "Write report.html, summary.json and plan.csv for a scored run."),
    "train": ("autolabel.commands.train:train", "Train a model with a loss-prediction module on the labeled pool."),
    "select": ("autolabel.commands.select:select", "Select the next items to label with a query strategy."),
    "autolabel": ("autolabel.commands.autolabel_cmd:autolabel", "Auto-label the calibrated easy tier (never over a human label)."),
    "rollback": ("autolabel.commands.rollback:rollback", "Remove exactly what one auto-label run wrote."),
    "run": ("autolabel.commands.run:run", "One full run of each configured project at its stage."),
    "schedule": ("autolabel.commands.schedule:schedule", "The scheduler daemon: cron runs of every configured project."),
    "demo": ("autolabel.commands.demo:demo", "The whole job on the bundled sample project."),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        target, _ = COMMANDS[cmd_name]
        module_name, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module_name), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in COMMANDS.items()])


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(level=max(logging.DEBUG, min(logging.ERROR, level)), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", count=True, help="Less log output (errors only with -q).")
@click.version_option(package_name="labeltriage")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int) -> None:
    """labeltriage: difficulty triage, planning and guarded auto-labeling for labeling projects."""
    configure_logging(1 + verbose - 2 * quiet if quiet else verbose)
    ctx.ensure_object(dict)


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point: library errors become exit codes here, and only here."""
    from connectors.errors import InputError, LabelTriageError, UsageError

    try:
        return cli.main(args=argv, prog_name="labeltriage", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UsageError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (InputError, LabelTriageError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

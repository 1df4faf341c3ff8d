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
    "stats": (
        "autolabel.commands.stats:stats",
        "Count items, labels, classes and bad items of a project.",
    ),
    "score": (
        "autolabel.commands.score:score",
        "Score every item's difficulty; write difficulty.parquet.",
    ),
    "report": (
        "autolabel.commands.report:report",
        "Write report.html, summary.json and plan.csv for a scored run.",
    ),
    "train": (
        "autolabel.commands.train:train",
        "Train a model with a loss-prediction module on the labeled pool.",
    ),
    "select": (
        "autolabel.commands.select:select",
        "Select the next items to label with a query strategy.",
    ),
    "autolabel": (
        "autolabel.commands.autolabel_cmd:autolabel",
        "Auto-label the calibrated easy tier (never over a human label).",
    ),
    "audit": (
        "autolabel.commands.audit:audit",
        "List an auto-label run's audit sample; measure audit precision.",
    ),
    "suggest-map": (
        "autolabel.commands.suggest_map:suggest_map",
        "Propose a label map (YAML) by matching class names.",
    ),
    "rollback": (
        "autolabel.commands.rollback:rollback",
        "Remove exactly what one auto-label run wrote.",
    ),
    "recover": (
        "autolabel.commands.recover:recover",
        "Finish or undo auto-label runs that were cut short.",
    ),
    "run": ("autolabel.commands.run:run", "One full run of each configured project at its stage."),
    "schedule": (
        "autolabel.commands.schedule:schedule",
        "The scheduler daemon: cron runs of every configured project.",
    ),
    "demo": ("autolabel.commands.demo:demo", "The whole job on the bundled sample project."),
    "serve": (
        "autolabel.commands.serve:serve",
        "Serve the calibrated easy tier to Label Studio as an ML backend.",
    ),
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

    def invoke(self, ctx: click.Context) -> Any:
        """Library errors become click exceptions with the documented exit codes."""
        from connectors.errors import InputError, LabelTriageError, UsageError

        try:
            return super().invoke(ctx)
        except UsageError as exc:
            raise ExitError(str(exc), 2) from exc
        except (InputError, LabelTriageError) as exc:
            raise ExitError(str(exc), 1) from exc


class ExitError(click.ClickException):
    """A one-line error message with an exit code (2 usage/config, 1 failed run)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # per instance: 1 or 2

    def format_message(self) -> str:
        return self.message

    def show(self, file: Any = None) -> None:
        from connectors.storage import redact_url

        click.echo(f"error: {redact_url(self.message)}", err=True)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """Writes to whatever ``sys.stderr`` is at the time of the record (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override,unused-ignore]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _RedactingFormatter(logging.Formatter):
    """Log lines never show the password of a ``scheme://user:password@`` URL."""

    def format(self, record: logging.LogRecord) -> str:
        from connectors.storage import redact_url

        return redact_url(super().format(record))


def configure_logging(verbosity: int) -> None:
    """WARNING by default; each -v one level more (INFO, DEBUG), -q errors only."""
    level = max(logging.DEBUG, min(logging.ERROR, logging.WARNING - 10 * verbosity))
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)


def _option_keys(command: click.Command) -> dict[str, str]:
    """Every name an option may have in the config → its click parameter name.

    ``--predictions-format`` may be written ``predictions_format`` or ``predictions-format``;
    the parameter's own name (``fmt`` for ``--format``) works too.
    """
    keys: dict[str, str] = {}
    for param in command.params:
        if param.name is None:
            continue
        keys[param.name] = param.name
        for opt in (*param.opts, *param.secondary_opts):
            if opt.startswith("--"):
                keys[opt[2:]] = keys[opt[2:].replace("-", "_")] = param.name
    return keys


def _apply_config(ctx: click.Context, config_path: str, project: str | None) -> None:
    """Load the config once; its values become every subcommand's option defaults, and the
    chosen project's settings (storage options, label map, scorers) reach the commands as
    objects (:func:`autolabel.commands._common.configured_project`)."""
    from autolabel.config import ConfigError, command_defaults, load_config

    cfg = load_config(config_path)
    derived = command_defaults(cfg, project)
    group = ctx.command
    assert isinstance(group, click.Group)
    problems = []
    default_map: dict[str, dict[str, Any]] = {}
    for command_name in COMMANDS:
        command = group.get_command(ctx, command_name)
        if command is None:
            continue
        keys = _option_keys(command)
        options = default_map.setdefault(command_name, {})
        for key, value in derived.get(command_name, {}).items():
            if key in keys:  # options a command does not have are simply not its defaults
                options[keys[key]] = value
        for key, value in cfg.commands.get(command_name, {}).items():
            if key not in keys:
                known = sorted(
                    o for param in command.params for o in param.opts if o.startswith("--")
                )
                problems.append(
                    (
                        f"commands.{command_name}.{key}",
                        f"unknown option of {command_name}; it has: {', '.join(known)}",
                    )
                )
            else:
                options[keys[key]] = value
    for command_name in cfg.commands:
        if command_name not in COMMANDS:
            problems.append(
                (
                    f"commands.{command_name}",
                    f"unknown command; choose one of: {', '.join(COMMANDS)}",
                )
            )
    if problems:
        raise ConfigError(config_path, problems)
    ctx.obj["config"] = cfg
    ctx.obj["config_path"] = config_path
    if project is not None or len(cfg.projects) == 1:  # its settings reach commands as objects
        ctx.obj["project_config"] = cfg.project(project)[1]
    ctx.default_map = {**(ctx.default_map or {}), **default_map}


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", count=True, help="Less log output (errors only with -q).")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="LABELTRIAGE_CONFIG",
    help="YAML config (also $LABELTRIAGE_CONFIG): every option of every command takes its default from it.",
)
@click.option(
    "-p",
    "--project",
    "project",
    default=None,
    help="Which project of the config fills the options (default: the only one).",
)
@click.version_option(package_name="labeltriage")
@click.pass_context
def cli(
    ctx: click.Context, verbose: int, quiet: int, config_path: str | None, project: str | None
) -> None:
    """labeltriage: difficulty triage, planning and guarded auto-labeling for labeling projects.

    Exit codes: 0 success, 1 a run that failed, 2 bad usage or bad config.
    """
    configure_logging(verbose - quiet)
    ctx.ensure_object(dict)
    ctx.obj["project"] = project
    if config_path is not None:
        _apply_config(ctx, config_path, project)


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
    sys.exit(main())

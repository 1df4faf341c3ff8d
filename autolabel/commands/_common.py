"""Helpers shared by the operator commands (run, schedule, demo)."""

from __future__ import annotations

import sys

import click

from autolabel.config import AppConfig, load_config
from connectors.errors import UsageError


def config_from(ctx: click.Context, config_path: str | None) -> tuple[AppConfig, str]:
    """The command's ``--config`` if given, else the group-level one; usage error without either."""
    obj = ctx.find_root().obj or {}
    if config_path is None:
        if "config" in obj:
            return obj["config"], obj["config_path"]
        raise UsageError("no config: give --config FILE (or labeltriage --config FILE COMMAND)")
    if obj.get("config_path") == config_path:
        return obj["config"], config_path
    return load_config(config_path), config_path


def want_progress(flag: bool | None) -> bool:
    """Progress bars by default only when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag

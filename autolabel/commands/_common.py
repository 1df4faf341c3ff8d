"""Options and option parsing shared by the commands.

The option decorators keep one spelling of the options several commands take
(``--source``/``--format``, ``--storage-options``, ``--predictions``/``--predictions-format``,
``--model``, ``--label-map``, ``--progress``, ``--config`` of the operator commands, and
``--batch-size``/``--device``/``--num-workers`` of the model commands); a command whose
help text says more passes its own ``help``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import click

from connectors.errors import UsageError

if TYPE_CHECKING:
    from autolabel.config import AppConfig, ProjectConfig
    from connectors.formats.base import PredictionSource, ProjectFormat
    from connectors.labelmap import LabelMap

F = TypeVar("F", bound=Callable[..., Any])

STORAGE_OPTIONS_HELP = "fsspec storage options as a JSON object."
PREDICTIONS_FORMAT_HELP = "Predictions format (yolo, coco, ...) or auto."
MODEL_HELP = "A labeltriage checkpoint to predict with (instead of --predictions)."
LABEL_MAP_HELP = "YAML/JSON file: {map: {model class: project class}, ignore: [classes]}."
PROGRESS_HELP = "Progress bars (default: when stderr is a terminal)."


def _apply(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """One decorator applying ``decorators`` so that their options list in the given order."""

    def decorator(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f

    return decorator


def project_options(f: F) -> F:
    """``--source/-s`` (required) and ``--format/-f`` (default ``auto``) → ``source``, ``fmt``."""
    return _apply(
        click.option(
            "--source", "-s", required=True, help="Project folder or file (any fsspec URL)."
        ),
        click.option(
            "--format",
            "-f",
            "fmt",
            default="auto",
            show_default=True,
            help="Project format, or auto.",
        ),
    )(f)


def storage_options_option(help: str = STORAGE_OPTIONS_HELP) -> Callable[[F], F]:
    """``--storage-options`` → ``storage_options`` (JSON text; see :func:`parse_storage_options`)."""
    return click.option("--storage-options", default=None, help=help)


def predictions_options(help: str, format_help: str = PREDICTIONS_FORMAT_HELP) -> Callable[[F], F]:
    """``--predictions`` and ``--predictions-format`` (default ``auto``)."""
    return _apply(
        click.option("--predictions", default=None, help=help),
        click.option("--predictions-format", default="auto", show_default=True, help=format_help),
    )


def model_option(help: str = MODEL_HELP) -> Callable[[F], F]:
    """``--model`` → ``model`` (a checkpoint path, or ``None``)."""
    return click.option("--model", "model", default=None, help=help)


def label_map_option(help: str = LABEL_MAP_HELP) -> Callable[[F], F]:
    """``--label-map`` → ``label_map`` (a file, or ``None``)."""
    return click.option("--label-map", default=None, help=help)


def progress_option(help: str = PROGRESS_HELP) -> Callable[[F], F]:
    """``--progress/--no-progress`` → ``progress`` (``None`` = decide with :func:`want_progress`)."""
    return click.option("--progress/--no-progress", default=None, help=help)


def batch_size_option(help: str) -> Callable[[F], F]:
    """``--batch-size`` of a model command (at least 1, default 32)."""
    return click.option(
        "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help=help
    )


def device_option(help: str) -> Callable[[F], F]:
    """``--device``: the torch device of a model command (default ``cpu``)."""
    return click.option("--device", default="cpu", show_default=True, help=help)


def num_workers_option(help: str) -> Callable[[F], F]:
    """``--num-workers`` of a model command (image-decoding processes, default 0)."""
    return click.option(
        "--num-workers", type=click.IntRange(min=0), default=0, show_default=True, help=help
    )


def config_option(f: F) -> F:
    """``-c/--config`` → ``config_path`` (resolve it with :func:`config_from`)."""
    return click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="YAML config of the deployment (default: the one given to labeltriage --config).",
    )(f)


def parse_json_object(
    text: str | None, option: str, example: str, *, of_objects: bool = False
) -> dict[str, Any] | None:
    """The JSON object given to ``option`` (``None`` when not given).

    ``of_objects``: every value must be an object too.  Raises :class:`UsageError` naming
    ``option`` and showing ``example`` when the text is not such an object.
    """
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{option} is not valid JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(value, dict) or (
        of_objects and not all(isinstance(v, dict) for v in value.values())
    ):
        kind = "a JSON object of objects" if of_objects else "a JSON object"
        raise UsageError(f"{option} must be {kind}, e.g. {example}")
    return value


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """``--storage-options`` is a JSON object (e.g. ``{"anon": true}``)."""
    return parse_json_object(text, "--storage-options", "'{\"anon\": true}'")


def configured_project() -> ProjectConfig | None:
    """The project of ``labeltriage --config`` whose settings fill the command's options
    (the one named by ``--project``, or the config's only one); ``None`` without."""
    ctx = click.get_current_context(silent=True)
    return None if ctx is None else (ctx.find_root().obj or {}).get("project_config")


def storage_options_from(text: str | None) -> dict[str, Any] | None:
    """``--storage-options`` when given, else the configured project's storage options."""
    options = parse_storage_options(text)
    project = configured_project() if options is None else None
    return dict(project.storage_options) or None if project is not None else options


def label_map_from(path: str | None, options: dict[str, Any] | None) -> LabelMap | None:
    """``--label-map FILE`` when given, else the configured project's label map (its file
    with the inline ``map``/``ignore`` on top) when it has one, else ``None``."""
    from connectors.labelmap import load_label_map

    if path:
        return load_label_map(path, options)
    project = configured_project()
    if project is None:
        return None
    from autolabel.pipeline import build_label_map

    mapping = build_label_map(project)
    return mapping if mapping.map or mapping.ignore else None


def open_inputs(
    source: str,
    fmt: str,
    options: dict[str, Any] | None,
    predictions: str | None = None,
    predictions_format: str = "auto",
) -> tuple[ProjectFormat, PredictionSource | None]:
    """The project, and its predictions (``None`` when not given); ``options`` are the
    parsed storage options."""
    from connectors.project import open_predictions, open_project

    project = open_project(source, fmt, options)
    prediction_source = (
        open_predictions(predictions, predictions_format, options, project=project)
        if predictions
        else None
    )
    return project, prediction_source


def config_from(ctx: click.Context, config_path: str | None) -> tuple[AppConfig, str]:
    """The command's ``--config`` if given, else the group-level one; usage error without either."""
    from autolabel.config import load_config

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


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` inside the block, as Ctrl-C raises
    ``KeyboardInterrupt``: a write-back in progress rolls itself back before the process
    ends (a stopped container), instead of leaving the work to recovery."""

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

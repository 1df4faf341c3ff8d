"""``labeltriage serve``: the Label Studio ML backend for the calibrated easy tier."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

from autolabel.commands._common import config_option
from connectors.errors import UsageError

PASSWORD_ENV = "LABELTRIAGE_BACKEND_PASSWORD"
TOKEN_ENV = "LABELTRIAGE_BACKEND_TOKEN"


@click.command("serve")
@config_option
@click.option(
    "--run", "run_url", default=None,
    help="A scored and calibrated run folder, or a report-store project folder (its newest "
    "calibrated run that was not rolled back is used, re-read when it changes). "
    "Default with a config: <report_store>/<project>.",
)  # fmt: skip
@click.option(
    "--source", "-s", default=None,
    help="The project (a Label Studio URL http://HOST:PORT/projects/ID): predictions are "
    "opened with it and image sizes read from it (token: $LABEL_STUDIO_TOKEN). Default: the config's.",
)  # fmt: skip
@click.option("--format", "-f", "fmt", default="auto", show_default=True, help="Project format.")
@click.option(
    "--predictions", default=None, help="The predictions whose labels are served (folder or file)."
)
@click.option(
    "--predictions-format", default="auto", show_default=True, help="Predictions format, or auto."
)
@click.option(
    "--label-map", "label_map_arg", default=None,
    help='Label map file (YAML/JSON), or inline JSON: \'{"map": {"stop sign": "stop"}}\'.',
)  # fmt: skip
@click.option(
    "--host", default="127.0.0.1", show_default=True,
    help="Address to bind (127.0.0.1: this machine only; any other needs auth).",
)  # fmt: skip
@click.option("--port", type=int, default=9090, show_default=True, help="TCP port to listen on.")
@click.option(
    "--events", "events_url", default=None,
    help="JSONL file (any fsspec URL) where webhook events go. "
    "Default with a config: <report_store>/<project>/labelstudio_events.jsonl.",
)  # fmt: skip
@click.option(
    "--basic-auth-user", default=None,
    help=f"Require basic auth with this user; the password comes from ${PASSWORD_ENV}.",
)  # fmt: skip
@click.option(
    "--token-env", default=TOKEN_ENV, show_default=True,
    help="Environment variable holding a token that clients may send as 'Bearer TOKEN' "
    "(required when the variable is set).",
)  # fmt: skip
@click.option("--max-body-mb", type=float, default=8.0, show_default=True, help="Largest body.")
@click.option(
    "--max-json-depth", type=click.IntRange(min=2), default=64, show_default=True,
    help="Deepest JSON nesting accepted in a body.",
)  # fmt: skip
@click.option(
    "--read-timeout", type=click.FloatRange(min=0.1), default=15.0, show_default=True,
    help="Seconds a connection may take to send a whole request.",
)  # fmt: skip
@click.option(
    "--keepalive", type=click.FloatRange(min=1), default=5.0, show_default=True,
    help="Seconds an idle keep-alive connection stays open.",
)  # fmt: skip
@click.option(
    "--workers", type=click.IntRange(min=1), default=8, show_default=True,
    help="Threads answering requests.",
)  # fmt: skip
@click.option(
    "--limit-concurrency", type=click.IntRange(min=1), default=256, show_default=True,
    help="Connections served at once (503 beyond).",
)  # fmt: skip
@click.option(
    "--shutdown-timeout", type=click.FloatRange(min=1), default=10.0, show_default=True,
    help="Seconds requests in flight may take to finish on SIGTERM/Ctrl-C.",
)  # fmt: skip
@click.option(
    "--refresh", type=click.FloatRange(min=0), default=30.0, show_default=True,
    help="Seconds between checks for a new calibration or a rollback of the served run.",
)  # fmt: skip
@click.option(
    "--access-log/--no-access-log", default=True, show_default=True,
    help="One JSON line per request on stderr.",
)  # fmt: skip
@click.pass_context
def serve(
    ctx: click.Context,
    config_path: str | None,
    run_url: str | None,
    source: str | None,
    fmt: str,
    predictions: str | None,
    predictions_format: str,
    label_map_arg: str | None,
    host: str,
    port: int,
    events_url: str | None,
    basic_auth_user: str | None,
    token_env: str,
    max_body_mb: float,
    max_json_depth: int,
    read_timeout: float,
    keepalive: float,
    workers: int,
    limit_concurrency: int,
    shutdown_timeout: float,
    refresh: float,
    access_log: bool,
) -> None:
    """Serve /health, /setup, /predict and /webhook for Label Studio.

    Unlabeled tasks of the calibrated easy tier get the label of their prediction, with
    labeltriage's provenance; every other task gets no prediction.  Only a run made at
    stage autolabel and not rolled back is served.  With --config (or labeltriage --config
    F serve) the run folder, project, predictions, label map and events file come from
    the config's project.  Label Studio asks an ML backend only about tasks without
    predictions: use "Retrieve predictions" in the Data Manager for existing tasks.
    """
    try:
        from autolabel import mlbackend, mlserver
    except ImportError as exc:
        raise UsageError(
            f"serve needs FastAPI and uvicorn (pip install 'labeltriage[labelstudio]'): {exc}"
        ) from exc
    settings: dict[str, Any] = {}
    storage_options: dict[str, Any] = {}
    label_map = _label_map(label_map_arg)
    config = _config(ctx, config_path)
    if config is not None:
        cfg, name = config
        settings = _from_config(cfg, name)
        storage_options = dict(cfg.report_store_options)
        run_url = run_url or settings["run_url"]
        events_url = events_url or settings["events_url"]
        if label_map_arg is None:
            label_map = settings["label_map"]
    if run_url is None:
        raise UsageError("give --run RUN_DIR (or a --config whose project has runs)")
    run_dir = mlbackend.find_run_dir(run_url, storage_options)  # fail now, not on a request
    tier = mlbackend.load_easy_tier(run_dir, storage_options)
    if tier.rolled_back:
        raise UsageError(f"{run_dir}: run {tier.run_id} was rolled back; it is not served")
    if tier.reason is not None:
        click.echo(f"warning: nothing will be served: {tier.reason}", err=True)
    project, prediction_source = _inputs(settings, source, fmt, predictions, predictions_format)
    basic_auth = None
    if basic_auth_user:
        password = os.environ.get(PASSWORD_ENV)
        if not password:
            raise UsageError(f"--basic-auth-user needs the password in ${PASSWORD_ENV}")
        basic_auth = (basic_auth_user, password)
    size_of = None
    if project is not None and hasattr(project, "image_size"):
        size_of = mlbackend.label_studio_size_lookup(project)
    backend_config = mlbackend.BackendConfig(
        run_url=run_url,
        predictions=prediction_source,
        label_map=label_map,
        storage_options=storage_options,
        events_url=events_url,
        size_of=size_of,
        basic_auth=basic_auth,
        token=os.environ.get(token_env) or None,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_json_depth=max_json_depth,
        read_timeout_s=read_timeout,
        keepalive_s=keepalive,
        workers=workers,
        limit_concurrency=limit_concurrency,
        shutdown_timeout_s=shutdown_timeout,
        refresh_s=refresh,
    )
    if access_log:
        _log_requests()
    try:
        server = mlserver.make_server(backend_config, host, port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc}") from exc
    click.echo(
        f"labeltriage ML backend on {server.url} (run {run_dir}, model version {tier.version}); "
        "Ctrl-C stops"
    )
    server.serve()
    click.echo("stopped")


def _inputs(
    settings: dict[str, Any],
    source: str | None,
    fmt: str,
    predictions: str | None,
    predictions_format: str,
) -> tuple[Any, Any]:
    """The project (``None`` without a source) and the predictions, opened with it."""
    from connectors.project import open_predictions, open_project

    project = None
    source = source or settings.get("source")
    if source is not None:
        project = open_project(
            source, fmt if fmt != "auto" else settings.get("format", "auto"),
            settings.get("storage_options"), **settings.get("options", {}),
        )  # fmt: skip
    if predictions is not None:
        return project, open_predictions(predictions, predictions_format, project=project)
    if "predictions" in settings:
        p = settings["predictions"]
        return project, open_predictions(
            p.source, p.format, p.storage_options or None, project=project, **p.options
        )
    raise UsageError("give --predictions (or a --config whose project has predictions)")


def _config(ctx: click.Context, config_path: str | None) -> tuple[Any, str] | None:
    """The config and the project name, when a config was given (here or to the group)."""
    from autolabel.commands._common import config_from

    root = ctx.find_root().obj or {}
    if config_path is None and "config" not in root:
        return None
    cfg, _ = config_from(ctx, config_path)
    name, _ = cfg.project(root.get("project"))
    return cfg, name


def _from_config(cfg: Any, name: str) -> dict[str, Any]:
    """The serve settings of project ``name``; refuses a project below stage autolabel."""
    from autolabel.mlbackend import EVENTS_FILENAME
    from autolabel.pipeline import build_label_map

    p = cfg.projects[name]
    if p.stage != "autolabel":
        raise UsageError(
            f"project {name} is at stage {p.stage}: serve pre-annotates only at stage autolabel "
            "(promote it in the config first)"
        )
    folder = f"{cfg.report_store.rstrip('/')}/{name}"
    settings: dict[str, Any] = {
        "run_url": folder,
        "events_url": f"{folder}/{EVENTS_FILENAME}",
        "label_map": build_label_map(p),
        "source": p.source,
        "format": p.format,
        "storage_options": p.storage_options or None,
        "options": dict(p.options),
    }
    if p.predictions is not None:
        settings["predictions"] = p.predictions
    return settings


def _label_map(arg: str | None) -> Any:
    """A label map from a file, or from inline JSON (``{"map": {...}, "ignore": [...]}``)."""
    from connectors.labelmap import LabelMap, load_label_map

    if arg is None or not arg.lstrip().startswith("{"):
        return load_label_map(arg)
    try:
        body = json.loads(arg)
        return LabelMap(map=dict(body.get("map") or {}), ignore=tuple(body.get("ignore") or ()))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise UsageError(f"--label-map is not a label map: {exc}") from exc


def _log_requests() -> None:
    """The access log (JSON lines) to stderr, whatever the -v/-q level."""
    logger = logging.getLogger("labeltriage.access")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)

"""``labeltriage serve``: the Label Studio ML backend for the calibrated easy tier."""

from __future__ import annotations

import os

import click

from connectors.errors import UsageError


@click.command("serve")
@click.option(
    "--run", "run_url", required=True,
    help="A scored and calibrated run folder (difficulty.parquet + autolabel.json), or a "
    "report-store project folder (its newest such run is used, re-read when it changes).",
)  # fmt: skip
@click.option(
    "--predictions", required=True, help="The predictions whose labels are served (folder or file)."
)
@click.option(
    "--predictions-format", default="auto", show_default=True, help="Predictions format, or auto."
)
@click.option(
    "--label-map",
    "label_map_path",
    default=None,
    help="Label map file (YAML/JSON): model → project classes.",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind (127.0.0.1: this machine only).",
)
@click.option("--port", type=int, default=9090, show_default=True, help="TCP port to listen on.")
@click.option(
    "--label-studio-url", default=None,
    help="Label Studio's URL, to read image sizes of tasks (token from $LABEL_STUDIO_TOKEN).",
)  # fmt: skip
@click.option(
    "--events",
    "events_url",
    default=None,
    help="JSONL file (any fsspec URL) where webhook events go.",
)
@click.option(
    "--basic-auth-user", default=None,
    help="Require basic auth with this user; the password comes from $LABELTRIAGE_BACKEND_PASSWORD.",
)  # fmt: skip
@click.option(
    "--max-body-mb",
    type=float,
    default=8.0,
    show_default=True,
    help="Largest request body accepted.",
)
def serve(
    run_url: str,
    predictions: str,
    predictions_format: str,
    label_map_path: str | None,
    host: str,
    port: int,
    label_studio_url: str | None,
    events_url: str | None,
    basic_auth_user: str | None,
    max_body_mb: float,
) -> None:
    """Serve /health, /setup, /predict and /webhook for Label Studio.

    Tasks in the calibrated easy tier get the label of their prediction; every other task
    an empty result.  Webhook events with annotations are appended to --events.
    """
    from autolabel.mlbackend import (
        BackendConfig,
        find_run_dir,
        label_studio_size_lookup,
        make_server,
    )
    from connectors.labelmap import load_label_map
    from connectors.project import open_predictions

    basic_auth = None
    if basic_auth_user:
        password = os.environ.get("LABELTRIAGE_BACKEND_PASSWORD")
        if not password:
            raise UsageError(
                "--basic-auth-user needs the password in $LABELTRIAGE_BACKEND_PASSWORD"
            )
        basic_auth = (basic_auth_user, password)
    size_of = None
    if label_studio_url:
        token = os.environ.get("LABEL_STUDIO_TOKEN")
        if not token:
            raise UsageError("--label-studio-url needs the API token in $LABEL_STUDIO_TOKEN")
        size_of = label_studio_size_lookup(label_studio_url, token)
    find_run_dir(run_url)  # fail now, not on the first request, when there is no calibrated run
    config = BackendConfig(
        run_url=run_url,
        predictions=open_predictions(predictions, predictions_format),
        label_map=load_label_map(label_map_path),
        events_url=events_url,
        size_of=size_of,
        basic_auth=basic_auth,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
    )
    try:
        server = make_server(config, host, port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc}") from exc
    click.echo(f"labeltriage ML backend on {server.url} (run {run_url}); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped")
    finally:
        server.server_close()

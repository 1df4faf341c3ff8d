"""A moto S3 server on 127.0.0.1 (a free port) for the tests that need S3."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest


@contextlib.contextmanager
def local_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any]]:
    """``(endpoint URL, boto3 client)`` of a fresh server; skips without moto/s3fs."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(key, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        yield endpoint, boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    finally:
        server.stop()


def s3_options(endpoint: str) -> dict[str, Any]:
    """fsspec storage options for the server (region from the environment: us-east-1)."""
    return {
        "client_kwargs": {"endpoint_url": endpoint},
        "key": "testing",
        "secret": "testing",
        "use_listings_cache": False,
    }

"""Projects on S3 (a local moto server on 127.0.0.1) and atomic writes on ``memory://``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from connectors.formats.base import LabelWrite, Provenance
from connectors.formats.coco import CocoFormat
from connectors.manifest import iter_manifest_items, write_manifest
from connectors.model import Annotation, Item, ItemStatus
from connectors.storage import ProjectFS
from connectors.writeback import list_runs, new_run_id, rollback, write_run

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 and a fresh bucket; yields storage options."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.delenv("AWS_PROFILE", raising=False)
    mp.delenv("AWS_ENDPOINT_URL", raising=False)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        bucket = f"lt-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=bucket)
        yield {
            "bucket": bucket,
            "options": {
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
                "key": "testing",
                "secret": "testing",
                "use_listings_cache": False,
            },
        }
    finally:
        server.stop()
        mp.undo()


@pytest.fixture
def s3_project(s3: dict[str, Any]) -> ProjectFS:
    return ProjectFS(
        f"s3://{s3['bucket']}/proj-{uuid.uuid4().hex[:8]}", storage_options=s3["options"]
    )


def items() -> list[Item]:
    return [
        Item(
            item_id="a",
            uri="images/a.jpg",
            width=64,
            height=48,
            status="labeled",
            annotations=[Annotation(label="car", box=(1, 2, 30, 40))],
        ),
        Item(item_id="b", uri="images/b.jpg", width=64, height=48),
        Item(item_id="c", uri="images/c.jpg", width=32, height=32),
    ]


def test_coco_project_write_run_and_rollback_on_s3(s3_project: ProjectFS) -> None:
    fmt = CocoFormat(s3_project)
    fmt.write_items(items())
    assert CocoFormat.detect(s3_project)
    back = list(CocoFormat(s3_project).iter_items())
    assert [(i.item_id, i.uri, i.width, i.status, i.annotations) for i in back] == [
        (i.item_id, i.uri, i.width, i.status, i.annotations) for i in items()
    ]

    original = json.loads(s3_project.read_text("annotations.json"))
    run_id = new_run_id()
    writes = [
        LabelWrite(
            item=i,
            annotations=[Annotation(label="car", box=(2, 2, 9, 9), score=0.8)],
            provenance=Provenance(run_id=run_id, model_version="m"),
        )
        for i in back
    ]
    manifest = write_run(fmt, writes, run_id, chunk_size=1)
    assert (
        manifest.stage == "committed"
        and manifest.item_ids == ["b", "c"]
        and set(manifest.refused) == {"a"}
    )
    assert [i.status for i in CocoFormat(s3_project).iter_items()] == [
        ItemStatus.LABELED,
        ItemStatus.AUTO_LABELED,
        ItemStatus.AUTO_LABELED,
    ]
    assert [r.run_id for r in list_runs(s3_project)] == [run_id]

    result = rollback(CocoFormat(s3_project), run_id)
    assert result.removed == ["b", "c"] and result.kept == {}
    assert json.loads(s3_project.read_text("annotations.json")) == original
    assert list_runs(s3_project)[0].stage == "rolled_back"
    assert not [p for p in s3_project.fs.find(s3_project.root) if p.endswith(".tmp")]


def test_manifest_round_trip_on_s3(s3_project: ProjectFS) -> None:
    many = [
        Item(item_id=f"{i:05d}", uri=f"images/{i:05d}.jpg", width=10, height=10)
        for i in range(5000)
    ]
    assert write_manifest(many, s3_project) == 5000
    assert list(iter_manifest_items(s3_project, batch_size=777)) == many


def test_write_bytes_without_overwrite_on_s3(s3_project: ProjectFS) -> None:
    s3_project.write_bytes("labels/x.txt", b"human")
    with pytest.raises(FileExistsError):
        s3_project.write_bytes("labels/x.txt", b"auto", overwrite=False)
    assert s3_project.read_bytes("labels/x.txt") == b"human"


def test_memory_write_bytes_without_overwrite() -> None:
    project = ProjectFS(f"memory://t-{uuid.uuid4().hex}")
    try:
        project.write_bytes("a/b.txt", b"first", overwrite=False)
        with pytest.raises(FileExistsError):
            project.write_bytes("a/b.txt", b"second", overwrite=False)
        assert project.read_bytes("a/b.txt") == b"first"
        project.write_bytes("a/b.txt", b"third")
        assert project.read_bytes("a/b.txt") == b"third"
        assert project.listdir("a") == ["b.txt"]  # no temporary left behind
    finally:
        project.fs.rm(project.root, recursive=True)


def test_sidecar_index_on_s3(s3_project: ProjectFS) -> None:
    from connectors.formats.base import WrittenRecord
    from connectors.sidecars import read_auto_label_index, write_sidecar

    for item_id in ("x", "deep/y"):
        record = WrittenRecord(
            kind="file", path=f"labels/{item_id}.txt", item_id=item_id, sha256="abc"
        )
        write_sidecar(s3_project, item_id, record, Provenance(run_id="r9", model_version="m"))
    index = read_auto_label_index(s3_project)
    assert set(index) == {"x", "deep/y"}
    assert index["deep/y"]["path"] == "labels/deep/y.txt" and index["x"]["run_id"] == "r9"

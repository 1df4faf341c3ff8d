"""Opening projects and prediction sources: file vs folder sources, auto-detection, routing."""

from __future__ import annotations

import json

import pytest
from _fileformat_helpers import make_project, png_bytes

from connectors.errors import UsageError
from connectors.formats.imagefolder import ImageFolderFormat
from connectors.formats.kitti import KittiFormat
from connectors.formats.voc import VocFormat
from connectors.formats.yolo import YoloFormat, YoloPredictions
from connectors.project import (
    detect_format,
    detect_order,
    open_predictions,
    open_project,
    split_source,
)

KITTI_LINE = "Car 0.00 0 -1.57 5 4 20 18 1.5 1.6 3.7 -1 1.5 20 -1.56\n"

LAYOUTS: dict[str, dict[str, bytes | str]] = {
    "voc": {"images/a.png": png_bytes(), "annotations/a.xml": "<annotation/>"},
    "yolo": {
        "images/a.png": png_bytes(),
        "labels/a.txt": "0 0.5 0.5 0.1 0.1\n",
        "classes.txt": "cat\n",
    },
    "kitti": {"images/a.png": png_bytes(), "labels/a.txt": KITTI_LINE},
    "imagefolder": {"cat/a.png": png_bytes(), "_unlabeled/b.png": png_bytes()},
    "coco": {
        "images/a.png": png_bytes(),
        "annotations.json": json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
                "annotations": [],
                "categories": [{"id": 1, "name": "cat"}],
            }
        ),
    },
    "labelstudio": {
        "export.json": json.dumps([{"id": 1, "data": {"image": "a.png"}, "annotations": []}])
    },
}


@pytest.mark.parametrize("fmt", sorted(LAYOUTS))
def test_auto_detects_each_layout(fmt: str) -> None:
    fs = make_project(LAYOUTS[fmt], f"detect-{fmt}")
    assert detect_format(fs) == fmt
    project = open_project(fs.url)
    assert project.name == fmt


def test_detect_order_is_documented_and_complete() -> None:
    assert tuple(detect_order()) == (
        "manifest",
        "labelstudio",
        "coco",
        "voc",
        "yolo",
        "kitti",
        "imagefolder",
    )


def test_no_layout_lists_what_was_looked_for() -> None:
    fs = make_project({"notes.txt": "hello"}, "detect-none")
    with pytest.raises(UsageError) as info:
        detect_format(fs)
    message = str(info.value)
    assert "no known project layout" in message
    for name in ("voc: images/ + annotations/*.xml", "yolo:", "kitti:", "imagefolder:", "coco:"):
        assert name in message


def test_several_matches_are_a_usage_error() -> None:
    files = {**LAYOUTS["voc"], **LAYOUTS["yolo"]}
    with pytest.raises(UsageError, match=r"several formats match \(voc, yolo\)"):
        open_project(make_project(files, "detect-two").url)


def test_file_source_means_its_folder_plus_file_option() -> None:
    fs = make_project({**LAYOUTS["yolo"], "data.yaml": "names: [cat]\n"}, "file-src")
    root, file = split_source(fs.url + "/data.yaml")
    assert root.root == fs.root and file == "data.yaml"
    project = open_project(fs.url + "/data.yaml")
    assert isinstance(project, YoloFormat) and project.options["file"] == "data.yaml"
    assert project.classes == ["cat"]


def test_local_paths_and_file_urls(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes())
    (tmp_path / "annotations" / "a.xml").write_text("<annotation/>")
    for source in (str(tmp_path), f"file://{tmp_path}"):
        project = open_project(source)
        assert isinstance(project, VocFormat)
        assert [i.item_id for i in project.iter_items()] == ["a"]


def test_folder_formats_refuse_a_file_source() -> None:
    fs = make_project({**LAYOUTS["voc"], "x.json": "{}"}, "voc-file")
    with pytest.raises(UsageError, match="expected a project folder"):
        open_project(fs.url + "/x.json", "voc")


def test_explicit_format_and_options() -> None:
    fs = make_project({"cat/a.png": png_bytes(), "pool/b.png": png_bytes()}, "imgf-opt")
    project = open_project(fs.url, "imagefolder", unlabeled_dir="pool")
    assert isinstance(project, ImageFolderFormat) and project.unlabeled_dir == "pool"
    assert isinstance(open_project(make_project(LAYOUTS["kitti"]).url, "kitti"), KittiFormat)


def test_unknown_format_and_missing_source() -> None:
    fs = make_project(LAYOUTS["voc"])
    with pytest.raises(UsageError, match=r"unknown format 'vocc' \(did you mean 'voc'\?\)"):
        open_project(fs.url, "vocc")
    with pytest.raises(UsageError, match="no such file or folder"):
        open_project(fs.url + "/nothing-here")
    with pytest.raises(UsageError, match="unknown predictions format"):
        open_predictions(fs.url, "yolov8")


def test_http_source_goes_to_the_live_label_studio_format(monkeypatch: pytest.MonkeyPatch) -> None:
    from connectors.formats import FORMATS

    calls = []
    cls = FORMATS["labelstudio_api"]

    def fake_from_url(source, storage_options=None, **options):
        calls.append((source, storage_options, options))
        return "opened"

    monkeypatch.setattr(cls, "from_url", staticmethod(fake_from_url))
    assert (
        open_project("http://127.0.0.1:9/projects/3", "auto", {"token": "t"}, page_size=5)
        == "opened"
    )
    assert open_project("https://127.0.0.1:9/projects/3", "labelstudio") == "opened"
    assert calls[0] == ("http://127.0.0.1:9/projects/3", {"token": "t"}, {"page_size": 5})


def test_open_predictions_yolo_folder_and_auto() -> None:
    project = open_project(make_project(LAYOUTS["yolo"], "pred-proj").url)
    preds_fs = make_project({"classes.txt": "cat\n", "a.txt": "0 0.5 0.5 0.5 0.5 0.9\n"}, "pred")
    for fmt in ("yolo", "auto"):
        preds = open_predictions(preds_fs.url, fmt, project=project)
        assert isinstance(preds, YoloPredictions)
        got = preds.get("a")
        assert got is not None and got.annotations[0].box == (10.0, 7.5, 30.0, 22.5)


def test_open_predictions_coco_file() -> None:
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "categories": [{"id": 0, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 0, "bbox": [1, 2, 3, 4], "score": 0.5}
        ],
    }
    fs = make_project({"preds.json": json.dumps(data)}, "coco-pred")
    preds = open_predictions(fs.url + "/preds.json", "auto")
    got = preds.get("a")
    assert got is not None and got.annotations[0].box == (1.0, 2.0, 4.0, 6.0)


def test_s3_project_read_and_auto_label_write() -> None:
    """A VOC project on S3 (a moto server on 127.0.0.1): detect, read, write, remove."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    from connectors.formats.base import LabelWrite, Provenance
    from connectors.model import Annotation, ItemStatus

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        creds = {
            "aws_access_key_id": "test",
            "aws_secret_access_key": "test",
            "region_name": "us-east-1",
        }
        s3 = boto3.client("s3", endpoint_url=endpoint, **creds)
        s3.create_bucket(Bucket="labels")
        s3.put_object(Bucket="labels", Key="proj/images/a.png", Body=png_bytes())
        s3.put_object(Bucket="labels", Key="proj/images/b.png", Body=png_bytes())
        xml = "<annotation><size><width>40</width><height>30</height></size><object><name>stop</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>9</xmax><ymax>8</ymax></bndbox></object></annotation>"
        s3.put_object(Bucket="labels", Key="proj/annotations/a.xml", Body=xml.encode())
        options = {
            "key": "test",
            "secret": "test",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            "skip_instance_cache": True,
        }
        project = open_project("s3://labels/proj", "auto", options)
        assert project.name == "voc"
        items = {i.item_id: i for i in project.iter_items()}
        assert items["a"].annotations[0].box == (1.0, 2.0, 9.0, 8.0)
        assert items["b"].status is ItemStatus.UNLABELED
        outcome = project.write_labels(
            [
                LabelWrite(
                    item=items[i],
                    annotations=[Annotation(label="stop", box=(2, 2, 6, 6))],
                    provenance=Provenance(run_id="r1", model_version="m"),
                )
                for i in ("a", "b")
            ]
        )
        assert [r.path for r in outcome.records] == ["annotations/b.xml"] and "a" in outcome.refused
        assert {i.item_id: i.status for i in project.iter_items()}["b"] is ItemStatus.AUTO_LABELED
        assert project.remove_written(outcome.records) == []
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="labels", Prefix="proj/")["Contents"]}
        assert keys == {"proj/images/a.png", "proj/images/b.png", "proj/annotations/a.xml"}
    finally:
        server.stop()

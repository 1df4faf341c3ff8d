"""A full ``labeltriage run`` of a project stored in S3, with the report store in S3 too.

The S3 server is moto's, on 127.0.0.1 with a free port.  The project is a slice of the
bundled sample project (real road-sign photos, Pascal VOC, restricted to the stop and
traffic-light classes that the detector knows) with its real YOLOv5n predictions; the run goes through stats, score, report and the autolabel stage, and
everything it writes — reports, run record, auto-labels, run manifest — lands in S3.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from autolabel.config import parse_config  # noqa: E402
from autolabel.pipeline import run_project  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample_project"
SAMPLE_PREDICTIONS = REPO / "examples" / "sample_project_predictions" / "yolo"
N_IMAGES = 48


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"},
    }
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    for bucket in ("projects", "reports"):
        client.create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    yield {"fs": fs, "options": options}
    server.stop()


def two_class_voc(path: Path) -> bytes:
    """The VOC file with only its stop and traffic-light boxes (the classes the detector knows)."""
    root = ET.parse(path).getroot()
    for obj in list(root.iter("object")):
        if obj.findtext("name") not in ("stop", "trafficlight"):
            root.remove(obj)
    return ET.tostring(root)


@pytest.fixture(scope="module")
def s3_project(s3: dict[str, Any]) -> str:
    if not SAMPLE.is_dir():
        pytest.skip(f"bundled sample project not found at {SAMPLE}")
    fs = s3["fs"]
    stems = sorted(p.stem for p in (SAMPLE / "images").glob("*.jpg"))[:N_IMAGES]
    for stem in stems:
        fs.put_file(str(SAMPLE / "images" / f"{stem}.jpg"), f"projects/roads/images/{stem}.jpg")
        xml = SAMPLE / "annotations" / f"{stem}.xml"
        if xml.exists():
            fs.pipe_file(f"projects/roads/annotations/{stem}.xml", two_class_voc(xml))
        pred = SAMPLE_PREDICTIONS / f"{stem}.txt"
        if pred.exists():
            fs.put_file(str(pred), f"projects/preds/{stem}.txt")
    fs.put_file(str(SAMPLE_PREDICTIONS / "classes.txt"), "projects/preds/classes.txt")
    fs.invalidate_cache()
    return "s3://projects/roads"


def test_full_run_on_s3_project_with_s3_report_store(s3: dict[str, Any], s3_project: str) -> None:
    fs, options = s3["fs"], s3["options"]
    labels_before = {p: fs.cat_file(p) for p in fs.find("projects/roads/annotations")}
    cfg = parse_config(
        {
            "report_store": "s3://reports/store",
            "report_store_options": options,
            "projects": {
                "roads": {
                    "source": s3_project,
                    "format": "voc",
                    "storage_options": options,
                    "predictions": {
                        "source": "s3://projects/preds",
                        "format": "yolo",
                        "storage_options": options,
                    },
                    "label_map": {"map": {"stop sign": "stop", "traffic light": "trafficlight"}},
                    "stage": "autolabel",
                    "epsilon": 0.3,
                    "delta": 0.1,
                    "min_count": 10,
                    "audit_share": 0.0,
                }
            },
        }
    )
    record = run_project(cfg, "roads")
    assert record.status == "ok", record.error
    fs.invalidate_cache()
    run_dir = f"reports/store/roads/{record.run_id}"
    produced = {p.rsplit("/", 1)[-1] for p in fs.ls(run_dir, detail=False)}
    assert {
        "difficulty.parquet",
        "summary.json",
        "report.html",
        "plan.csv",
        "autolabel.json",
        "run.json",
    } <= produced
    result = json.loads(fs.cat_file(f"{run_dir}/autolabel.json"))
    assert result["stage"] == "autolabel"

    # every human label is unchanged; auto-labels exist exactly for the written items
    labels_after = {p: fs.cat_file(p) for p in fs.find("projects/roads/annotations")}
    assert {p: labels_after[p] for p in labels_before} == labels_before
    new = {
        p.rsplit("/", 1)[-1].removesuffix(".xml") for p in set(labels_after) - set(labels_before)
    }
    assert new == set(result["written"])
    assert result["threshold"] is not None, f"calibration failed: {result['calibration']}"
    assert result["written"], "the calibrated easy tier is empty"
    manifest = json.loads(fs.cat_file(f"projects/roads/.labeltriage/runs/{record.run_id}.json"))
    assert manifest["stage"] == "committed"
    assert sorted({r["item_id"] for r in manifest["records"]}) == sorted(result["written"])
    # the record in the report store points at S3 outputs
    run_json = json.loads(fs.cat_file(f"{run_dir}/run.json"))
    assert run_json["status"] == "ok" and run_json["run_id"] == record.run_id

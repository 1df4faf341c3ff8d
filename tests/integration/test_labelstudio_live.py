"""labeltriage against a live Label Studio server, end to end.

A real Label Studio (its own venv, 127.0.0.1, a temporary data folder) gets a project of
120 real road-sign photos (../shared/data/road_signs; the photos of the bundled sample
project), uploaded through its import API; the 80 that the sample project has labels for get
human annotations from the VOC boxes restricted to {stop, trafficlight}.
The real YOLOv5n predictions of those photos are the predictions brought to labeltriage
(re-keyed by task id, as a COCO file).  Then ``labeltriage run`` takes the project through
its stages — report, shadow, autolabel — and the test checks what Label Studio holds:
predictions on exactly the easy unlabeled tasks that the autolabel run wrote, with
provenance, and every human annotation byte-for-byte unchanged.  Rollback removes exactly
those predictions.  The ML backend is then connected to the same server.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from PIL import Image

from tests.integration.ls_server import LabelStudioServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("stop", "trafficlight")
LABEL_MAP = {"map": {"stop sign": "stop", "traffic light": "trafficlight"}}
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image">'
    + "".join(f'<Label value="{c}"/>' for c in CLASSES)
    + "</RectangleLabels></View>"
)


def voc_boxes(xml_path: Path) -> list[tuple[str, tuple[float, float, float, float]]]:
    root = ET.parse(xml_path).getroot()
    out = []
    for obj in root.iter("object"):
        name = obj.findtext("name")
        if name not in CLASSES:
            continue
        bb = obj.find("bndbox")
        assert bb is not None
        out.append(
            (name, tuple(float(bb.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax")))
        )
    return out


def choose_images(road_signs: Path) -> tuple[list[str], list[str]]:
    """The photos of the bundled sample project (120), and those it has labels for (80).

    A calibrated easy tier needs enough labeled items for the Clopper–Pearson bound to
    reach ε = 0.3 at δ = 0.1 through the fixed-sequence test: a few dozen labels are not
    enough, 80 are.  The files themselves are read from ``road_signs``.
    """
    sample = REPO / "examples" / "sample_project"
    stems = sorted(p.stem for p in (sample / "images").glob("*.jpg"))
    labeled = [s for s in stems if (sample / "annotations" / f"{s}.xml").exists()]
    missing = [s for s in stems if not (road_signs / "images" / f"{s}.jpg").exists()]
    if not stems or missing:
        pytest.skip(f"sample project photos not found (missing {missing[:3]})")
    return stems, labeled


class LS:
    """A few Label Studio API calls used to set up and inspect the project."""

    def __init__(self, server: LabelStudioServer) -> None:
        self.url = server.url
        self.s = requests.Session()
        self.s.headers.update(server.headers)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.s.request(method, f"{self.url}{path}", timeout=60, **kwargs)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text[:300]}"
        return r.json() if r.content else None

    def tasks(self, project_id: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            r = self.s.get(
                f"{self.url}/api/tasks",
                params={"project": project_id, "page": page, "page_size": 100, "fields": "all"},
                timeout=60,
            )
            if r.status_code == 404:
                return out
            tasks = r.json()["tasks"]
            out.extend(tasks)
            if len(tasks) < 100:
                return out
            page += 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    data_dir = tmp_path_factory.mktemp("ls-data")
    srv = LabelStudioServer(data_dir=data_dir)
    with srv:
        yield srv


@pytest.fixture(scope="module")
def ls_project(
    server: LabelStudioServer, road_signs: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The project in Label Studio, and the brought predictions re-keyed by task id."""
    ls = LS(server)
    project = ls.call(
        "POST", "/api/projects", json={"title": "road signs triage", "label_config": LABEL_CONFIG}
    )
    pid = project["id"]
    stems, labeled = choose_images(road_signs)
    task_of: dict[str, int] = {}
    for stem in stems:
        with open(road_signs / "images" / f"{stem}.jpg", "rb") as f:
            ls.call(
                "POST",
                f"/api/projects/{pid}/import",
                files={"file": (f"{stem}.jpg", f, "image/jpeg")},
            )
    for task in ls.tasks(pid):
        name = task["data"]["image"].rsplit("/", 1)[-1]  # /data/upload/<pid>/<hash>-<stem>.jpg
        task_of[name.split("-", 1)[1].rsplit(".", 1)[0]] = task["id"]
    assert sorted(task_of) == sorted(stems)

    sizes = {s: Image.open(road_signs / "images" / f"{s}.jpg").size for s in stems}
    for stem in labeled:
        w, h = sizes[stem]
        result = []
        for i, (name, (x1, y1, x2, y2)) in enumerate(
            voc_boxes(road_signs / "annotations" / f"{stem}.xml")
        ):
            x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
            result.append({
                "id": f"h{i}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
                "original_width": w, "original_height": h,
                "value": {"x": 100 * x1 / w, "y": 100 * y1 / h, "width": 100 * (x2 - x1) / w,
                          "height": 100 * (y2 - y1) / h, "rotation": 0, "rectanglelabels": [name]},
            })  # fmt: skip
        ls.call(
            "POST",
            f"/api/tasks/{task_of[stem]}/annotations",
            json={"result": result, "lead_time": 20.0},
        )

    coco = json.loads((road_signs / "predictions" / "coco.json").read_text())
    by_name = {im["file_name"]: im for im in coco["images"]}
    images, anns = [], []
    for stem in stems:
        im = by_name[f"{stem}.jpg"]
        images.append({**im, "file_name": f"{task_of[stem]}.jpg"})
        anns.extend(a for a in coco["annotations"] if a["image_id"] == im["id"])
    pred_dir = tmp_path_factory.mktemp("predictions")
    (pred_dir / "predictions.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": coco["categories"]})
    )
    return {
        "id": pid,
        "url": f"{server.url}/projects/{pid}",
        "labeled": {str(task_of[s]) for s in labeled},
        "all": {str(t) for t in task_of.values()},
        "predictions": str(pred_dir / "predictions.json"),
    }


def labeltriage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "autolabel.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def annotations_of(ls: LS, project_id: int) -> dict[int, list[dict[str, Any]]]:
    """Every task's annotations as stored (``created_ago`` is display text computed per request)."""
    return {
        t["id"]: [{k: v for k, v in a.items() if k != "created_ago"} for a in t["annotations"]]
        for t in ls.tasks(project_id)
    }


def predictions_of(ls: LS, project_id: int) -> dict[str, list[dict[str, Any]]]:
    return {str(t["id"]): t["predictions"] for t in ls.tasks(project_id) if t["predictions"]}


def test_run_report_shadow_autolabel_then_rollback(
    server: LabelStudioServer, ls_project: dict[str, Any], tmp_path: Path
) -> None:
    ls = LS(server)
    pid = ls_project["id"]
    before = annotations_of(ls, pid)
    assert sum(1 for a in before.values() if a) == len(ls_project["labeled"])

    env = {
        **os.environ,
        "LABEL_STUDIO_TOKEN": server.token,
        "LABELTRIAGE_STATE_DIR": str(tmp_path / "state"),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    store = tmp_path / "reports"

    def config(stage: str) -> Path:
        cfg = {
            "report_store": str(store),
            "projects": {
                "roadsigns": {
                    "source": ls_project["url"],
                    "format": "labelstudio",
                    "predictions": {"source": ls_project["predictions"], "format": "coco"},
                    "label_map": LABEL_MAP,
                    "stage": stage,
                    "epsilon": 0.3,
                    "delta": 0.1,
                    "min_count": 25,
                    "audit_share": 0.0,
                    "num_workers": 0,
                }
            },
        }
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    records = {}
    for stage in ("report", "shadow", "autolabel"):
        out = labeltriage("run", "--config", str(config(stage)), "--json", env=env)
        record = json.loads(out.stdout.strip().splitlines()[-1])
        assert record["status"] == "ok", record
        records[stage] = record
        if stage != "autolabel":
            assert predictions_of(ls, pid) == {}, f"stage {stage} wrote to Label Studio"

    run_dir = store / "roadsigns" / records["autolabel"]["run_id"]
    assert (store / "roadsigns" / records["report"]["run_id"] / "report.html").exists()
    assert (store / "roadsigns" / records["shadow"]["run_id"] / "shadow.json").exists()
    result = json.loads((run_dir / "autolabel.json").read_text())
    import pandas as pd

    table = pd.read_parquet(run_dir / "difficulty.parquet")
    threshold = result["threshold"]
    assert threshold is not None, f"calibration failed: {result}"
    easy = table[
        (table["status"] == "unlabeled") & table["error"].isna() & (table["score"] <= threshold)
    ]
    easy_unlabeled = {str(i) for i in easy["item_id"]}
    written = set(result["written"])
    assert written, f"nothing was written: {result}"
    assert result["refused"] == {}
    assert written == easy_unlabeled  # every unlabeled task of the calibrated easy tier, no other
    assert written <= easy_unlabeled, (
        threshold,
        table[["item_id", "status", "score", "tier", "error"]].to_dict("records"),
    )
    assert written.isdisjoint(ls_project["labeled"])

    held = predictions_of(ls, pid)
    assert set(held) == written  # predictions on exactly the tasks the run wrote, nowhere else
    for preds in held.values():
        assert len(preds) == 1
        p = preds[0]
        assert p["model_version"]
        for region in p["result"]:
            prov = region["meta"]["labeltriage"]
            assert prov["run_id"] == records["autolabel"]["run_id"] and prov["tier"] == "easy"
            assert region["value"]["rectanglelabels"][0] in CLASSES
    assert annotations_of(ls, pid) == before  # every human annotation unchanged

    labeltriage(
        "rollback",
        records["autolabel"]["run_id"],
        "--source",
        ls_project["url"],
        "--format",
        "labelstudio",
        env=env,
    )
    assert predictions_of(ls, pid) == {}
    assert annotations_of(ls, pid) == before


def test_ml_backend_serves_easy_tier_to_label_studio(
    server: LabelStudioServer, ls_project: dict[str, Any], tmp_path: Path
) -> None:
    """Label Studio connects to the backend, asks it for predictions, and sends it webhooks."""
    from autolabel.mlbackend import (
        BackendConfig,
        label_studio_size_lookup,
        make_server,
        read_events,
    )
    from connectors.labelmap import LabelMap
    from connectors.project import open_predictions

    ls = LS(server)
    pid = ls_project["id"]
    before = annotations_of(ls, pid)
    reports = sorted((tmp_path.parent).glob("test_run_report_shadow_autol*/reports/roadsigns"))
    if not reports:
        pytest.skip("needs the run of test_run_report_shadow_autolabel_then_rollback")
    events = tmp_path / "events.jsonl"
    config = BackendConfig(
        run_url=str(reports[-1]),
        predictions=open_predictions(ls_project["predictions"], "coco"),
        label_map=LabelMap(**LABEL_MAP),
        events_url=str(events),
        size_of=label_studio_size_lookup(server.url, server.token),
        basic_auth=("labelstudio", "backend-secret"),
    )
    backend = make_server(config, port=0)
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    try:
        ml = ls.call("POST", "/api/ml", json={
            "url": backend.url, "project": pid, "title": "labeltriage",
            "auth_method": "BASIC_AUTH", "basic_auth_user": "labelstudio", "basic_auth_pass": "backend-secret",
        })  # fmt: skip
        assert ls.call("GET", f"/api/ml/{ml['id']}")["state"] == "CO"  # /health and /setup answered
        easy = set(backend.backend.tier().scores)
        unlabeled = sorted(ls_project["all"] - ls_project["labeled"], key=int)
        # Label Studio's "Retrieve predictions" action sends the tasks to /predict
        ls.call(
            "POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
            json={"selectedItems": {"all": False, "included": [int(t) for t in unlabeled]}},
        )  # fmt: skip
        held = predictions_of(ls, pid)
        with_regions = {t for t, preds in held.items() if any(p["result"] for p in preds)}
        assert with_regions, "the backend labeled no task"
        assert with_regions <= easy & set(unlabeled)  # regions only for easy tasks
        for preds in held.values():
            for pred in preds:
                ls.call("DELETE", f"/api/predictions/{pred['id']}")

        basic = "Basic " + base64.b64encode(b"labelstudio:backend-secret").decode()
        hook = ls.call("POST", "/api/webhooks", json={
            "project": pid, "url": f"{backend.url}/webhook", "headers": {"Authorization": basic},
            "send_payload": True, "send_for_all_actions": False, "actions": ["ANNOTATION_CREATED"],
        })  # fmt: skip
        new_task = unlabeled[0]
        created = ls.call(
            "POST", f"/api/tasks/{new_task}/annotations", json={"result": [], "lead_time": 3.0}
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not read_events(str(events)):
            time.sleep(0.5)
        recorded = read_events(str(events))
        assert any(
            e["action"] == "ANNOTATION_CREATED" and e["annotation"]["id"] == created["id"]
            for e in recorded
        ), recorded
        ls.call("DELETE", f"/api/webhooks/{hook['id']}")
        ls.call("DELETE", f"/api/annotations/{created['id']}")
    finally:
        backend.shutdown()
        backend.server_close()
        thread.join(5)
    assert annotations_of(ls, pid) == before

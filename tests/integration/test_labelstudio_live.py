"""labeltriage against a live Label Studio server, end to end.

A real Label Studio (its own venv, 127.0.0.1, a temporary data folder) gets a project of
120 real road-sign photos (../shared/data/road_signs; the photos of the bundled sample
project), uploaded through its import API; the 80 that the sample project has labels for get
human annotations from the VOC boxes restricted to {stop, trafficlight}.  The real YOLOv5n
predictions of those photos are imported into Label Studio as the platform's predictions
(``model_version`` ``yolov5n``), and the config reads them from there without pinning a
model version — the setting in which labeltriage's own stored predictions, if they were
read back, would poison the next run.

``labeltriage run`` takes the project through its stages — report, shadow, autolabel — and
the tests check what Label Studio holds after each step: labeltriage predictions on exactly
the easy unlabeled tasks the autolabel run wrote, with provenance; a second autolabel run
stacking nothing; ``labeltriage serve`` (FastAPI on uvicorn) connected through ``/api/ml``
and "Retrieve predictions" storing only marked predictions; a run after that scoring
exactly as before; rollback from a second state folder removing exactly the run's
predictions; and every human annotation byte-for-byte unchanged throughout.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from PIL import Image

from tests.integration.ls_server import LabelStudioServer, free_port

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
    names = {c["id"]: LABEL_MAP["map"].get(c["name"]) for c in coco["categories"]}
    for stem in stems:
        im = by_name[f"{stem}.jpg"]
        w, h = im["width"], im["height"]
        result, scores = [], []
        for i, a in enumerate(a for a in coco["annotations"] if a["image_id"] == im["id"]):
            if names.get(a["category_id"]) is None:
                continue
            x, y, bw, bh = a["bbox"]
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(float(w), x + bw), min(float(h), y + bh)
            scores.append(a["score"])
            result.append({
                "id": f"p{i}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
                "original_width": w, "original_height": h, "score": a["score"],
                "value": {"x": 100 * x1 / w, "y": 100 * y1 / h, "width": 100 * (x2 - x1) / w,
                          "height": 100 * (y2 - y1) / h, "rotation": 0,
                          "rectanglelabels": [names[a["category_id"]]]},
            })  # fmt: skip
        ls.call("POST", "/api/predictions", json={
            "task": task_of[stem], "result": result, "model_version": "yolov5n",
            "score": min(scores) if scores else None,
        })  # fmt: skip
    return {
        "id": pid,
        "url": f"{server.url}/projects/{pid}",
        "labeled": {str(task_of[s]) for s in labeled},
        "all": {str(t) for t in task_of.values()},
    }


def labeltriage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "autolabel.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
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


def ours(preds: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """labeltriage's predictions per task (its model_version), tasks without any left out."""
    found = {
        t: [p for p in ps if str(p.get("model_version") or "").startswith("labeltriage-")]
        for t, ps in preds.items()
    }
    return {t: ps for t, ps in found.items() if ps}


def platform(preds: dict[str, list[dict[str, Any]]]) -> dict[str, list[int]]:
    return {
        t: sorted(p["id"] for p in ps if p["model_version"] == "yolov5n") for t, ps in preds.items()
    }


class Flow:
    """One deployment: its config (stage autolabel after the first steps), env and report store."""

    def __init__(self, server: LabelStudioServer, project: dict[str, Any], tmp: Path) -> None:
        self.server, self.project, self.tmp = server, project, tmp
        self.store = tmp / "reports"
        self.env = {
            **os.environ,
            "LABEL_STUDIO_TOKEN": server.token,
            "LABELTRIAGE_STATE_DIR": str(tmp / "state"),
            "OMP_WAIT_POLICY": "PASSIVE",
        }

    def config(self, stage: str) -> Path:
        cfg = {
            "report_store": str(self.store),
            "projects": {
                "roadsigns": {
                    "source": self.project["url"],
                    "format": "labelstudio",
                    # the platform's predictions, stored in Label Studio; no model_version pinned
                    "predictions": {"source": self.project["url"], "format": "labelstudio"},
                    "label_map": {"map": {c: c for c in CLASSES}},
                    "stage": stage,
                    "epsilon": 0.3,
                    "delta": 0.1,
                    "min_count": 25,
                    "audit_share": 0.0,
                    "num_workers": 0,
                }
            },
        }
        path = self.tmp / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def run(self, stage: str) -> tuple[dict[str, Any], str]:
        out = labeltriage("--config", str(self.config(stage)), "run", "--json", env=self.env)
        record = json.loads(out.stdout.strip().splitlines()[-1])
        assert record["status"] == "ok", record
        return record, out.stderr

    def run_dir(self, record: dict[str, Any]) -> Path:
        return self.store / "roadsigns" / record["run_id"]


@pytest.mark.timeout(3600)  # six runs of the pipeline and a Label Studio round trip each
def test_the_whole_job_against_label_studio(
    server: LabelStudioServer, ls_project: dict[str, Any], tmp_path: Path
) -> None:
    import pandas as pd

    from autolabel.mlbackend import read_events
    from connectors.labelstudio.provenance import model_version_for, without_meta

    ls = LS(server)
    pid = ls_project["id"]
    before = annotations_of(ls, pid)
    assert sum(1 for a in before.values() if a) == len(ls_project["labeled"])
    platform_before = platform(predictions_of(ls, pid))
    assert len(platform_before) == len(ls_project["all"])
    flow = Flow(server, ls_project, tmp_path)

    # -- report, shadow, autolabel ---------------------------------------------------------
    records = {}
    for stage in ("report", "shadow", "autolabel"):
        records[stage], stderr = flow.run(stage)
        if stage != "autolabel":
            assert ours(predictions_of(ls, pid)) == {}, f"stage {stage} wrote to Label Studio"
    first = records["autolabel"]
    run_id = first["run_id"]
    assert f"rollback {run_id}" in stderr  # the undo command is printed
    assert (flow.run_dir(records["report"]) / "report.html").exists()
    assert (flow.run_dir(records["shadow"]) / "shadow.json").exists()
    result = json.loads((flow.run_dir(first) / "autolabel.json").read_text())
    table = pd.read_parquet(flow.run_dir(first) / "difficulty.parquet")
    threshold = result["threshold"]
    assert threshold is not None, f"calibration failed: {result}"
    easy = table[
        (table["status"] == "unlabeled") & table["error"].isna() & (table["score"] <= threshold)
    ]
    written = set(result["written"])
    assert written and result["refused"] == {}
    assert written == {str(i) for i in easy["item_id"]}  # every easy unlabeled task, no other
    assert written.isdisjoint(ls_project["labeled"])
    held = ours(predictions_of(ls, pid))
    assert set(held) == written
    for preds in held.values():
        (p,) = preds
        assert p["model_version"] == model_version_for(run_id)  # not the platform's "yolov5n"
        for region in p["result"]:
            prov = region["meta"]["labeltriage"]
            assert (prov["run_id"], prov["tier"], prov["via"]) == (run_id, "easy", "run")
            assert prov["model_version"] == "yolov5n"  # the model the label came from
            assert region["value"]["rectanglelabels"][0] in CLASSES
    assert annotations_of(ls, pid) == before
    assert platform(predictions_of(ls, pid)) == platform_before

    # -- a second autolabel run in a row stacks nothing ------------------------------------
    second, _ = flow.run("autolabel")
    again = json.loads((flow.run_dir(second) / "autolabel.json").read_text())
    assert again["written"] == []
    assert {t: len(ps) for t, ps in ours(predictions_of(ls, pid)).items()} == dict.fromkeys(
        written, 1
    )

    # -- serve, connected to Label Studio; "Retrieve predictions" ----------------------------
    # An admin deletes three of the run's predictions: Label Studio asks the backend again.
    reopened = sorted(written, key=lambda t: (not held[t][0]["result"], int(t)))[:3]
    assert held[reopened[0]][0]["result"], "no written label has a box"
    for t in reopened:
        ls.call("DELETE", f"/api/predictions/{held[t][0]['id']}")
    port = free_port()
    serve_env = {**flow.env, "LABELTRIAGE_BACKEND_PASSWORD": "backend-secret"}
    backend = subprocess.Popen(
        [sys.executable, "-m", "autolabel.cli", "--config", str(flow.config("autolabel")),
         "serve", "--run", str(flow.run_dir(first)), "--port", str(port),
         "--basic-auth-user", "labelstudio", "--refresh", "1"],
        cwd=REPO, env=serve_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    backend_url = f"http://127.0.0.1:{port}"
    auth = ("labelstudio", "backend-secret")
    try:
        deadline = time.monotonic() + 120
        while True:
            assert backend.poll() is None, backend.communicate()[1][-3000:]
            try:
                if requests.get(f"{backend_url}/health", auth=auth, timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.5)
        health = requests.get(f"{backend_url}/health", auth=auth, timeout=10).json()
        assert health["serving"] and health["model_version"] == model_version_for(run_id)
        ml = ls.call("POST", "/api/ml", json={
            "url": backend_url, "project": pid, "title": "labeltriage",
            "auth_method": "BASIC_AUTH", "basic_auth_user": auth[0], "basic_auth_pass": auth[1],
        })  # fmt: skip
        assert ls.call("GET", f"/api/ml/{ml['id']}")["state"] == "CO"  # /health and /setup answered
        ls.call(
            "POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
            json={"selectedItems": {"all": True, "excluded": []}},
        )  # fmt: skip
        after_retrieve = predictions_of(ls, pid)
        served = ours(after_retrieve)
        assert set(served) == written  # the three reopened tasks are served again, nothing else
        for t in reopened:  # served: the label the run wrote, marked as served
            (p,) = served[t]
            assert p["model_version"] == model_version_for(run_id)
            assert without_meta(p["result"]) == without_meta(held[t][0]["result"])
            assert all(r["meta"]["labeltriage"]["via"] == "serve" for r in p["result"])
        assert all(len(ps) == 1 for ps in served.values())
        assert platform(after_retrieve) == platform_before  # no unmarked prediction stored

        # -- a run after "Retrieve predictions" scores exactly as before ---------------------
        third, _ = flow.run("autolabel")
        stats = [json.loads((flow.run_dir(r) / "stats.json").read_text()) for r in (second, third)]
        assert stats[0]["predictions"] == stats[1]["predictions"]
        assert stats[0]["boxes"] == stats[1]["boxes"]
        tables = [pd.read_parquet(flow.run_dir(r) / "difficulty.parquet") for r in (second, third)]
        columns = [c for c in tables[0].columns if c not in ("status",)]
        pd.testing.assert_frame_equal(tables[0][columns], tables[1][columns])
        assert json.loads((flow.run_dir(third) / "autolabel.json").read_text())["written"] == []

        # -- webhook events are recorded for the next run ---------------------------------------
        basic = "Basic " + base64.b64encode(b"labelstudio:backend-secret").decode()
        hook = ls.call("POST", "/api/webhooks", json={
            "project": pid, "url": f"{backend_url}/webhook", "headers": {"Authorization": basic},
            "send_payload": True, "send_for_all_actions": False, "actions": ["ANNOTATION_CREATED"],
        })  # fmt: skip
        unlabeled = sorted(ls_project["all"] - ls_project["labeled"] - written, key=int)
        created = ls.call(
            "POST", f"/api/tasks/{unlabeled[0]}/annotations", json={"result": [], "lead_time": 3.0}
        )
        events = flow.store / "roadsigns" / "labelstudio_events.jsonl"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not read_events(str(events)):
            time.sleep(0.5)
        assert any(
            e["action"] == "ANNOTATION_CREATED" and e["annotation"]["id"] == created["id"]
            for e in read_events(str(events))
        )
        ls.call("DELETE", f"/api/webhooks/{hook['id']}")
        ls.call("DELETE", f"/api/annotations/{created['id']}")

        # -- rollback from another machine (a second, empty state folder) --------------------
        of_run = {
            p["id"]
            for ps in predictions_of(ls, pid).values()
            for p in ps
            if p["model_version"] == model_version_for(run_id)
        }
        elsewhere = {**flow.env, "LABELTRIAGE_STATE_DIR": str(tmp_path / "another-machine")}
        out = labeltriage(
            "--config", str(flow.config("autolabel")), "rollback", run_id, env=elsewhere
        )
        assert "rebuilt" in out.stderr and "marked rolled back" in out.stderr
        assert sorted(
            json.loads(out.stdout[out.stdout.index("{") :])["removed"], key=int
        ) == sorted(written, key=int)
        remaining = predictions_of(ls, pid)
        assert ours(remaining) == {}
        assert not of_run & {p["id"] for ps in remaining.values() for p in ps}
        assert platform(remaining) == platform_before  # exactly the run's predictions went
        assert annotations_of(ls, pid) == before
        # the backend stops serving the rolled-back run
        time.sleep(1.5)
        health = requests.get(f"{backend_url}/health", auth=auth, timeout=10).json()
        assert health["serving"] is False and "rolled back" in health["reason"]
    finally:
        backend.send_signal(signal.SIGTERM)
        try:
            _, err = backend.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            backend.kill()
            _, err = backend.communicate()
    assert backend.returncode == 0, err[-2000:]
    assert '"path": "/predict"' in err  # the access log, one JSON line per request

"""The live Label Studio connector against a small in-process stand-in of its REST API.

The stand-in answers the same endpoints, with the same JSON shapes, as Label Studio 1.23
(checked against a real server by ``tests/integration``): paged ``/api/tasks``, tasks with
``annotations``/``predictions``, ``/api/predictions`` create/get/delete, uploaded images
behind token auth.
"""

from __future__ import annotations

import io
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from connectors.errors import InputError, UsageError
from connectors.formats.base import PREDICTION_FORMATS, LabelWrite, Provenance
from connectors.formats.labelstudio_api import LabelStudioAPI, LabelStudioPredictions
from connectors.labelstudio.client import parse_project_url
from connectors.labelstudio.config import parse_label_config
from connectors.labelstudio.provenance import content_sha256, model_version_for
from connectors.labelstudio.regions import percent_to_xyxy
from connectors.model import Annotation, ItemStatus
from connectors.project import open_predictions, open_project
from connectors.writeback import rollback, write_run
from difficulty.imageio import read_image_bytes

TOKEN = "secret-token"
CONFIG = (
    '<View><Image name="img" value="$picture"/>'
    '<RectangleLabels name="box" toName="img"><Label value="stop"/><Label value="trafficlight"/></RectangleLabels>'
    "</View>"
)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _region(label: str, x: float, y: float, w: float, h: float, **extra: Any) -> dict[str, Any]:
    return {
        "id": "r", "from_name": "box", "to_name": "img", "type": "rectanglelabels",
        "original_width": 200, "original_height": 100,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}, **extra,
    }  # fmt: skip


class FakeLabelStudio:
    """Tasks 1..7 of project 5; 2 and 3 annotated (3 only with a cancelled one), 4 has a model prediction."""

    def __init__(self) -> None:
        self.tasks: dict[int, dict[str, Any]] = {}
        for i in range(1, 8):
            self.tasks[i] = {
                "id": i,
                "project": 5,
                "data": {"picture": f"/data/upload/5/{i}.png"},
                "annotations": [],
                "predictions": [],
            }
        self.tasks[2]["annotations"] = [
            {"id": 11, "result": [_region("stop", 10, 20, 30, 40)], "was_cancelled": False, "lead_time": 7.5,
             "updated_at": "2026-01-01T00:00:00Z", "ground_truth": False},
        ]  # fmt: skip
        self.tasks[3]["annotations"] = [
            {"id": 12, "result": [], "was_cancelled": True, "updated_at": "2026-01-01T00:00:00Z"}
        ]
        self.tasks[4]["predictions"] = [
            {"id": 900, "task": 4, "model_version": "yolo", "score": 0.8, "created_at": "2026-01-01T00:00:00Z",
             "result": [_region("trafficlight", 50, 50, 10, 20, score=0.7)]},
        ]  # fmt: skip
        self.next_id = 1000
        self.images = {f"/data/upload/5/{i}.png": _png(200, 100) for i in range(1, 8)}
        self.requests: list[str] = []

    def predictions(self) -> list[dict[str, Any]]:
        return [p for t in self.tasks.values() for p in t["predictions"]]


@pytest.fixture
def ls() -> Iterator[tuple[str, FakeLabelStudio]]:
    state = FakeLabelStudio()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _auth(self) -> bool:
            if self.headers.get("Authorization") != f"Token {TOKEN}":
                self._json(401, {"detail": "Authentication credentials were not provided."})
                return False
            return True

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            state.requests.append(f"GET {self.path}")
            if not self._auth():
                return
            url = urlsplit(self.path)
            path = url.path.rstrip("/") if url.path.startswith("/api/") else url.path
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if path in state.images:
                data = state.images[path]
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            elif path == "/api/projects/5":
                self._json(200, {"id": 5, "label_config": CONFIG})
            elif path == "/api/tasks":
                page, size = int(q["page"]), int(q["page_size"])
                ids = sorted(state.tasks)
                chunk = ids[(page - 1) * size : page * size]
                if not chunk:
                    self._json(404, {"detail": "Invalid page."})
                else:
                    self._json(200, {"total": len(ids), "tasks": [state.tasks[i] for i in chunk]})
            elif m := re.fullmatch(r"/api/tasks/(\d+)", path):
                task = state.tasks.get(int(m.group(1)))
                self._json(200 if task else 404, task or {"detail": "Not found."})
            elif path == "/api/predictions":
                self._json(200, state.predictions())
            elif m := re.fullmatch(r"/api/predictions/(\d+)", path):
                found = [p for p in state.predictions() if p["id"] == int(m.group(1))]
                self._json(200 if found else 404, found[0] if found else {"detail": "Not found."})
            else:
                self._json(404, {"detail": "Not found."})

        def do_POST(self) -> None:
            state.requests.append(f"POST {self.path}")
            if not self._auth():
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path.rstrip("/") == "/api/predictions":
                pred = {"id": state.next_id, "task": body["task"], "result": body["result"], "score": body.get("score"),
                        "model_version": body.get("model_version"), "created_at": "2026-02-01T00:00:00Z"}  # fmt: skip
                state.next_id += 1
                state.tasks[body["task"]]["predictions"].append(pred)
                self._json(201, pred)
            else:
                self._json(404, {"detail": "Not found."})

        def do_PATCH(self) -> None:
            state.requests.append(f"PATCH {self.path}")
            if not self._auth():
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            m = re.fullmatch(r"/api/tasks/(\d+)", self.path.rstrip("/"))
            task = state.tasks.get(int(m.group(1))) if m else None
            if task is None:
                self._json(404, {"detail": "Not found."})
                return
            task["data"] = body["data"]
            self._json(200, task)

        def do_DELETE(self) -> None:
            state.requests.append(f"DELETE {self.path}")
            if not self._auth():
                return
            m = re.fullmatch(r"/api/predictions/(\d+)", self.path.rstrip("/"))
            for task in state.tasks.values():
                for p in list(task["predictions"]):
                    if m and p["id"] == int(m.group(1)):
                        task["predictions"].remove(p)
                        self.send_response(204)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
            self._json(404, {"detail": "Not found."})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()
    thread.join(5)


def _open(url: str, tmp_path: Path, **options: Any) -> LabelStudioAPI:
    return LabelStudioAPI.from_url(
        f"{url}/projects/5", {"token": TOKEN}, state_dir=str(tmp_path / "state"), **options
    )


def test_project_url_parsing() -> None:
    loc = parse_project_url("http://127.0.0.1:8080/projects/3/data?tab=1")
    assert (loc.base_url, loc.project_id) == ("http://127.0.0.1:8080", 3)
    assert (
        parse_project_url("https://ls.example.org/label/api/projects/12/").base_url
        == "https://ls.example.org/label"
    )
    with pytest.raises(UsageError, match="not a Label Studio project URL"):
        parse_project_url("http://127.0.0.1:8080/tasks/3")


def test_percent_boxes_convert_to_pixels() -> None:
    assert percent_to_xyxy({"x": 10, "y": 20, "width": 30, "height": 40}, 200, 100) == (
        20.0,
        20.0,
        80.0,
        60.0,
    )
    x1, y1, x2, y2 = percent_to_xyxy(
        {"x": 50, "y": 0, "width": 10, "height": 10, "rotation": 90}, 100, 100
    )
    assert (x1, y1, x2, y2) == pytest.approx((40.0, 0.0, 50.0, 10.0))
    with pytest.raises(ValueError, match="ends past the image width"):
        percent_to_xyxy({"x": 95, "y": 0, "width": 20, "height": 10}, 100, 100)
    config = parse_label_config(CONFIG)
    assert (config.image_key, config.boxes_from, config.labels) == (
        "picture",
        "box",
        ("stop", "trafficlight"),
    )


def test_reads_all_pages_with_status_and_pixel_boxes(
    ls: tuple[str, FakeLabelStudio], tmp_path: Path
) -> None:
    url, state = ls
    api = _open(url, tmp_path, page_size=3)
    items = list(api.iter_items())
    assert [it.item_id for it in items] == [str(i) for i in range(1, 8)]
    assert sum(1 for r in state.requests if re.match(r"GET /api/tasks/?\?", r)) == 3
    by_id = {it.item_id: it for it in items}
    assert by_id["2"].status is ItemStatus.LABELED and by_id["2"].has_human_label
    assert by_id["2"].annotations == [Annotation(label="stop", box=(20.0, 20.0, 80.0, 60.0))]
    assert by_id["2"].annotation_seconds == 7.5 and (by_id["2"].width, by_id["2"].height) == (
        200,
        100,
    )
    assert by_id["3"].status is ItemStatus.UNLABELED  # only a cancelled (skipped) annotation
    assert by_id["1"].uri == f"{url}/data/upload/5/1.png"
    # the image reader gets through with the project's storage options (token header)
    assert (
        read_image_bytes(by_id["1"].uri, api.project, item="1")
        == state.images["/data/upload/5/1.png"]
    )


def test_broken_tasks_become_error_items_naming_the_task(
    ls: tuple[str, FakeLabelStudio], tmp_path: Path
) -> None:
    url, state = ls
    state.tasks[5]["data"] = {}  # no image
    state.tasks[6]["annotations"] = [
        {"id": 13, "result": [_region("stop", 95, 0, 20, 10)], "was_cancelled": False,
         "updated_at": "2026-01-01T00:00:00Z"},
    ]  # fmt: skip  # the box leaves the image
    items = {it.item_id: it for it in _open(url, tmp_path).iter_items()}
    assert len(items) == 7  # the broken tasks did not stop the stream
    assert items["5"].error is not None and "task=5" in items["5"].error
    assert "'picture'" in items["5"].error
    assert items["6"].error is not None and "task=6" in items["6"].error
    assert "ends past the image width" in items["6"].error
    assert all(items[i].error is None for i in ("1", "2", "3", "4", "7"))


def test_open_project_routes_urls_and_needs_a_token(
    ls: tuple[str, FakeLabelStudio], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = ls
    monkeypatch.delenv("LABEL_STUDIO_TOKEN", raising=False)
    with pytest.raises(UsageError, match="token"):
        open_project(f"{url}/projects/5", "labelstudio")
    monkeypatch.setenv("LABEL_STUDIO_TOKEN", "wrong")
    with pytest.raises(UsageError, match="refused"):
        list(open_project(f"{url}/projects/5", "auto", state_dir=str(tmp_path)).iter_items())
    monkeypatch.setenv("LABEL_STUDIO_TOKEN", TOKEN)
    assert (
        len(
            list(
                open_project(
                    f"{url}/projects/5", "labelstudio", state_dir=str(tmp_path)
                ).iter_items()
            )
        )
        == 7
    )


def test_existing_predictions_are_read_in_pixels(
    ls: tuple[str, FakeLabelStudio], tmp_path: Path
) -> None:
    url, _ = ls
    preds = LabelStudioPredictions(_open(url, tmp_path), model_version="yolo")
    p = preds.get("4")
    assert p is not None and p.model_version == "yolo"
    assert p.annotations == [
        Annotation(label="trafficlight", box=(100.0, 50.0, 120.0, 70.0), score=0.7)
    ]
    assert preds.get("1") is None


def test_open_predictions_routes_urls_to_the_stored_predictions(
    ls: tuple[str, FakeLabelStudio], tmp_path: Path
) -> None:
    url, state = ls
    assert PREDICTION_FORMATS["labelstudio_api"] is LabelStudioPredictions
    project = open_project(
        f"{url}/projects/5", "labelstudio", {"token": TOKEN}, state_dir=str(tmp_path)
    )
    for fmt in ("auto", "labelstudio", "labelstudio_api"):
        preds = open_predictions(
            f"{url}/projects/5", fmt, {"token": TOKEN}, project=project, state_dir=str(tmp_path)
        )
        assert isinstance(preds, LabelStudioPredictions)
        assert [p.item_id for p in preds] == ["4"]
        p = preds.get("4")
        assert p is not None and p.model_version == "yolo"
        assert p.annotations == [
            Annotation(label="trafficlight", box=(100.0, 50.0, 120.0, 70.0), score=0.7)
        ]
    # model_version picks one model's predictions; the token is required
    other = open_predictions(
        f"{url}/projects/5",
        "auto",
        {"token": TOKEN},
        model_version="other",
        state_dir=str(tmp_path),
    )
    assert list(other) == []
    with pytest.raises(UsageError, match="refused"):
        list(
            open_predictions(
                f"{url}/projects/5", "auto", {"token": "wrong"}, state_dir=str(tmp_path)
            )
        )
    with pytest.raises(UsageError, match="labelstudio_api reads a live Label Studio"):
        open_predictions(str(tmp_path), "labelstudio_api")
    assert sum(1 for r in state.requests if re.match(r"GET /api/tasks/?\?", r)) >= 4


def _writes(api: LabelStudioAPI, run_id: str) -> list[LabelWrite]:
    items = {it.item_id: it for it in api.iter_items()}
    prov = Provenance(run_id=run_id, model_version="yolov5n", score=0.9, tier="easy")
    box = [Annotation(label="stop", box=(20.0, 10.0, 60.0, 50.0), score=0.9)]
    return [LabelWrite(item=items[i], annotations=box, provenance=prov) for i in ("1", "2", "5")]


def test_write_predictions_for_unlabeled_only_then_rollback(
    ls: tuple[str, FakeLabelStudio], tmp_path: Path
) -> None:
    url, state = ls
    api = _open(url, tmp_path)
    annotations_before = json.dumps(
        {i: t["annotations"] for i, t in state.tasks.items()}, sort_keys=True
    )
    writes = _writes(api, "run-a")
    # task 5 gains a human annotation after it was read: refused at write time
    state.tasks[5]["annotations"] = [
        {"id": 50, "result": [], "was_cancelled": False, "updated_at": "x"}
    ]
    manifest = write_run(api, writes, "run-a")
    assert manifest.stage == "committed"
    assert set(manifest.refused) == {"2", "5"} and "human" in manifest.refused["5"]
    assert [r.item_id for r in manifest.records] == ["1"]
    written = state.tasks[1]["predictions"]
    assert len(written) == 1
    pred = written[0]
    assert pred["model_version"] == model_version_for("run-a") and pred["score"] == 0.9
    region = pred["result"][0]
    assert region["value"]["x"] == pytest.approx(10.0) and region["value"][
        "width"
    ] == pytest.approx(20.0)
    assert region["meta"]["labeltriage"] == {
        "run_id": "run-a",
        "model_version": "yolov5n",
        "tier": "easy",
        "score": 0.9,
        "via": "run",
        "sha256": content_sha256(pred["result"], pred["model_version"]),
    }
    assert "labeltriage auto-label, run run-a" in region["meta"]["text"][0]
    assert (tmp_path / "state" / ".labeltriage" / "runs" / "run-a.json").exists()
    assert api.records_of_run("run-a") == manifest.records

    result = rollback(api, "run-a")
    assert result.removed == ["1"]
    assert state.tasks[1]["predictions"] == []
    assert [p["id"] for p in state.tasks[4]["predictions"]] == [900]  # not ours: untouched
    state.tasks[5]["annotations"] = []
    assert (
        json.dumps({i: t["annotations"] for i, t in state.tasks.items()}, sort_keys=True)
        == annotations_before
    )
    assert not any(
        r.startswith(("POST /api/tasks", "DELETE /api/annotations", "PATCH"))
        for r in state.requests
    )


def test_an_empty_label_is_written_and_rolled_back(
    ls: tuple[str, FakeLabelStudio], tmp_path: Path
) -> None:
    url, state = ls
    api = _open(url, tmp_path)
    item = next(it for it in api.iter_items() if it.item_id == "6")
    prov = Provenance(run_id="run-c", model_version="yolov5n", score=None, tier="easy")
    manifest = write_run(api, [LabelWrite(item=item, annotations=[], provenance=prov)], "run-c")
    assert [p["result"] for p in state.tasks[6]["predictions"]] == [[]]
    assert rollback(api, "run-c").removed == ["6"]
    assert state.tasks[6]["predictions"] == [] and manifest.records[0].item_id == "6"


def test_a_changed_prediction_is_kept_on_removal(
    ls: tuple[str, FakeLabelStudio], tmp_path: Path
) -> None:
    url, state = ls
    api = _open(url, tmp_path)
    outcome = api.write_labels(_writes(api, "run-b")[:1])
    state.tasks[1]["predictions"][0]["result"][0]["value"]["rectanglelabels"] = ["trafficlight"]
    kept = api.remove_written(outcome.records)
    assert len(kept) == 1 and "changed" in kept[0]
    assert len(state.tasks[1]["predictions"]) == 1


def test_a_second_run_is_refused_where_labeltriage_already_wrote(
    ls: tuple[str, FakeLabelStudio], tmp_path: Path
) -> None:
    url, state = ls
    api = _open(url, tmp_path)
    write_run(api, _writes(api, "run-a")[:1], "run-a")
    again = _open(url, tmp_path)
    items = {it.item_id: it for it in again.iter_items()}
    assert items["1"].status is ItemStatus.AUTO_LABELED  # read back as labeltriage's label
    assert items["1"].meta["auto_label"]["run_id"] == "run-a"
    prov = Provenance(run_id="run-b", model_version="yolov5n", score=0.9, tier="easy")
    box = [Annotation(label="stop", box=(20.0, 10.0, 60.0, 50.0), score=0.9)]
    unlabeled = items["7"].model_copy(update={"status": ItemStatus.UNLABELED})
    stale = items["1"].model_copy(update={"status": ItemStatus.UNLABELED})  # as read before run-a
    manifest = write_run(
        again,
        [LabelWrite(item=i, annotations=box, provenance=prov) for i in (stale, unlabeled)],
        "run-b",
    )
    assert "already holds labeltriage prediction" in manifest.refused["1"]
    assert [len(state.tasks[i]["predictions"]) for i in (1, 7)] == [1, 1]  # one per task


def test_rollback_from_another_state_folder_rebuilds_the_manifest(
    ls: tuple[str, FakeLabelStudio], tmp_path: Path
) -> None:
    url, state = ls
    api = _open(url, tmp_path)
    write_run(api, _writes(api, "run-a")[:1], "run-a")
    item6 = next(it for it in api.iter_items() if it.item_id == "6")
    prov = Provenance(run_id="run-a2", model_version="yolov5n", tier="easy")
    write_run(api, [LabelWrite(item=item6, annotations=[], provenance=prov)], "run-a2")
    elsewhere = LabelStudioAPI.from_url(
        f"{url}/projects/5", {"token": TOKEN}, state_dir=str(tmp_path / "other-machine")
    )
    with pytest.raises(UsageError, match="unknown run id"):
        rollback(elsewhere, "run-a")
    assert elsewhere.restore_manifest("run-a") and not elsewhere.restore_manifest("run-a")
    assert rollback(elsewhere, "run-a").removed == ["1"]
    assert state.tasks[1]["predictions"] == [] and len(state.tasks[6]["predictions"]) == 1
    assert elsewhere.restore_manifest("run-a2")  # an empty label: found by its model_version
    assert rollback(elsewhere, "run-a2").removed == ["6"]
    assert [p["id"] for p in state.predictions()] == [900]  # the platform's own: untouched
    assert not elsewhere.restore_manifest("no-such-run")


def test_image_references_outside_label_studio_image_paths_are_refused(
    ls: tuple[str, FakeLabelStudio], tmp_path: Path
) -> None:
    url, state = ls
    state.tasks[1]["data"] = {"picture": "/data/../api/users"}
    state.tasks[2]["data"] = {"picture": "/data/%2e%2e/api/users"}
    state.tasks[3]["data"] = {"picture": "http://127.0.0.2:9/x.jpg"}
    state.tasks[4]["data"] = {"picture": "file:///etc/passwd"}
    items = {it.item_id: it for it in _open(url, tmp_path).iter_items()}
    for i in ("1", "2"):
        assert items[i].error is not None and "not" in items[i].error
    assert items["3"].error is not None and "another host" in items["3"].error
    assert items["4"].error is not None and "file" in items["4"].error
    assert items["5"].error is None
    assert not any("/api/users" in r for r in state.requests)  # the token never went there
    api = _open(url, tmp_path)
    with pytest.raises(InputError, match="image paths"):
        api.image_size("/api/users")
    assert api.image_size("/data/upload/5/5.png") == (200, 100)


def test_tier_and_difficulty_become_data_manager_columns(
    ls: tuple[str, FakeLabelStudio], tmp_path: Path
) -> None:
    url, state = ls
    assert _open(url, tmp_path).publish_difficulty([("1", "easy", 0.1)]) == 0  # opt-in
    api = _open(url, tmp_path, data_columns=True)
    rows = [("1", "easy", 0.123456), ("2", "hard", 0.9), ("404", "easy", 0.1)]
    assert api.publish_difficulty(rows) == 2
    assert state.tasks[1]["data"] == {
        "picture": "/data/upload/5/1.png", "lt_tier": "easy", "lt_difficulty": 0.1235,
    }  # fmt: skip
    assert api.publish_difficulty(rows) == 0  # unchanged values are not written again
    assert state.tasks[2]["annotations"][0]["id"] == 11  # annotations untouched
    assert api.task_url("3") == f"{url}/projects/5/data?task=3"


def test_report_links_items_to_their_tasks(ls: tuple[str, FakeLabelStudio], tmp_path: Path) -> None:
    import pandas as pd

    from difficulty.report import write_report
    from difficulty.table import write_difficulty

    url, _ = ls
    api = _open(url, tmp_path)
    df = pd.DataFrame(
        {
            "item_id": ["1", "3", "7"],
            "uri": [f"{url}/data/upload/5/{i}.png" for i in (1, 3, 7)],
            "status": ["unlabeled"] * 3,
            "fourier": [0.1, 0.5, 0.9],
            "score": [0.1, 0.5, 0.9],
            "tier": ["easy", "medium", "hard"],
            "rank": [3, 2, 1],
            "error": [None, None, None],
            "true_error": [None, None, None],
        }
    )
    run_dir = tmp_path / "run"
    meta = {
        "run_id": "r", "created": "2026-01-01T00:00:00+00:00", "scorers": ["fourier"],
        "source": f"{url}/projects/5", "format": "labelstudio_api", "task": "detection",
        "model_version": "yolov5n",
        "combination": {"method": "single", "weights": {"fourier": 1.0}, "correlations": {},
                        "n_labeled": 0, "reason": "one scorer", "combined_rho": None,
                        "cv_rho": {}},
        "reference": {"fourier": [0.0, 0.5, 1.0]},
        "tiers": {"config": {"mode": "thresholds", "easy": 0.3, "hard": 0.7},
                  "easy_max": 0.3, "hard_min": 0.7, "source": "thresholds"},
    }  # fmt: skip
    write_difficulty(df, str(run_dir), meta)
    write_report(str(run_dir), project=api)
    assignment = pd.read_csv(run_dir / "assignment.csv", dtype=str)
    assert list(assignment["task_url"]) == [
        f"{url}/projects/5/data?task={i}" for i in assignment["item_id"]
    ]
    page = (run_dir / "report.html").read_text()
    assert f'<a href="{url}/projects/5/data?task=7">7</a>' in page
    assert "data:image/jpeg;base64," in page  # thumbnails read from Label Studio with the token

"""The Label Studio ML backend: easy tier only, webhook log, auth, and refusals of bad bodies."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests

from autolabel.mlbackend import (
    BackendConfig,
    BackendServer,
    find_run_dir,
    load_easy_tier,
    make_server,
    read_events,
)
from connectors.formats.base import PredictionSource
from connectors.labelmap import LabelMap
from connectors.model import Annotation, Item, Prediction
from difficulty.runrecord import GateRecord, write_gate_record
from difficulty.table import write_difficulty

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image"><Label value="stop"/><Label value="trafficlight"/></RectangleLabels>'
    "</View>"
)


class DictPredictions(PredictionSource):
    def __init__(self, preds: dict[str, Prediction]) -> None:
        self.preds = preds

    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        return self.preds.get(item_id)

    def __iter__(self) -> Iterator[Prediction]:
        yield from self.preds.values()


def write_run(run_dir: Path, *, threshold: float | None, run_id: str = "run-1") -> None:
    df = pd.DataFrame(
        {
            "item_id": ["1", "2", "3", "4"],
            "uri": [f"http://ls/data/upload/{i}.jpg" for i in range(1, 5)],
            "status": ["unlabeled"] * 4,
            "fourier": [0.1, 0.2, 0.8, 0.05],
            "score": [0.1, 0.2, 0.8, None],
            "tier": ["easy", "easy", "hard", None],
            "rank": [3, 2, 1, None],
            "error": [None, None, None, "cannot decode image"],
        }
    )
    write_difficulty(df, str(run_dir), {"run_id": run_id, "scorers": ["fourier"]})
    record = GateRecord(  # the gate's own record type, not a hand-written shape
        run_id=run_id,
        stage="autolabel",
        task="detection",
        epsilon=0.05,
        delta=0.1,
        threshold=threshold,
        box_confidence=0.5,
        model_version="yolov5n",
    )
    write_gate_record(str(run_dir), record)


PREDS = {
    item_id: Prediction(
        item_id=item_id,
        model_version="yolov5n",
        annotations=[
            Annotation(label="stop sign", box=(40.0, 30.0, 200.0, 150.0), score=0.9),
            Annotation(label="stop sign", box=(0.0, 0.0, 10.0, 10.0), score=0.2),
            Annotation(label="car", box=(5.0, 5.0, 50.0, 50.0), score=0.95),
        ],
    )
    for item_id in ("1", "2", "3", "4")
}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "store" / "proj" / "20260101T000000Z-aaaaaa"
    d.mkdir(parents=True)
    write_run(d, threshold=0.15)
    return d


def serve(config: BackendConfig) -> tuple[BackendServer, threading.Thread]:
    server = make_server(config, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def backend(run_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    events = tmp_path / "store" / "proj" / "labelstudio_events.jsonl"
    config = BackendConfig(
        run_url=str(run_dir),
        predictions=DictPredictions(PREDS),
        label_map=LabelMap(map={"stop sign": "stop"}),
        events_url=str(events),
        size_of=lambda task: (400, 300),
        refresh_s=0.0,
    )
    server, thread = serve(config)
    yield server.url, events
    server.shutdown()
    server.server_close()
    thread.join(5)


def predict(url: str, task_ids: list[int], **kwargs: Any) -> requests.Response:
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.jpg"}} for i in task_ids]
    return requests.post(
        f"{url}/predict",
        json={"tasks": tasks, "label_config": LABEL_CONFIG, "project": "1.1"},
        timeout=10,
        **kwargs,
    )


def test_server_binds_loopback_by_default(backend: tuple[str, Path]) -> None:
    assert backend[0].startswith("http://127.0.0.1:")


def test_health_and_setup_report_the_calibrated_model_version(backend: tuple[str, Path]) -> None:
    url, _ = backend
    health = requests.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "UP"
    assert health["model_version"] == "yolov5n@run-1"
    assert health["easy_items"] == 1
    setup = requests.post(
        f"{url}/setup", json={"project": "1.1", "schema": LABEL_CONFIG}, timeout=10
    ).json()
    assert setup == {"model_version": "yolov5n@run-1"}


def test_predict_labels_easy_tasks_only(backend: tuple[str, Path]) -> None:
    url, _ = backend
    r = predict(url, [1, 2, 3, 4, 99])
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 5  # one per task, in order
    easy = results[0]
    assert [reg["value"]["rectanglelabels"] for reg in easy["result"]] == [
        ["stop"]
    ]  # car unmapped, 0.2 below c
    region = easy["result"][0]
    assert region["value"]["x"] == pytest.approx(10.0) and region["value"][
        "width"
    ] == pytest.approx(40.0)
    assert region["value"]["y"] == pytest.approx(10.0) and region["value"][
        "height"
    ] == pytest.approx(40.0)
    assert region["original_width"] == 400 and region["original_height"] == 300
    assert region["meta"]["labeltriage"]["tier"] == "easy"
    assert easy["score"] == pytest.approx(0.9)
    assert easy["model_version"] == "yolov5n@run-1"
    # score 0.2 is above the calibrated threshold 0.15 although its tier says easy; 3 is hard;
    # 4 failed scoring; 99 is unknown: all get an empty result
    assert [res["result"] for res in results[1:]] == [[], [], [], []]


def test_no_calibrated_threshold_means_no_easy_task(tmp_path: Path) -> None:
    write_run(tmp_path, threshold=None)
    tier = load_easy_tier(str(tmp_path))
    assert tier.scores == {} and not tier.is_easy("1")


def test_newest_run_folder_is_used_and_reloaded(run_dir: Path, backend: tuple[str, Path]) -> None:
    url, _ = backend
    newer = run_dir.parent / "20260102T000000Z-bbbbbb"
    newer.mkdir()
    write_run(newer, threshold=0.5, run_id="run-2")
    assert find_run_dir(str(run_dir.parent)) == str(newer)
    # the fixture's backend points at the old run folder itself, which stays in force
    assert requests.get(f"{url}/health", timeout=10).json()["model_version"] == "yolov5n@run-1"
    tier = load_easy_tier(find_run_dir(str(run_dir.parent)))
    assert set(tier.scores) == {"1", "2"}


def test_calibration_change_takes_effect_without_restart(
    run_dir: Path, backend: tuple[str, Path]
) -> None:
    url, _ = backend
    assert predict(url, [2]).json()["results"][0]["result"] == []
    write_run(run_dir, threshold=0.5, run_id="run-3")
    assert predict(url, [2]).json()["results"][0]["result"] != []


def test_webhook_records_annotations_to_jsonl(backend: tuple[str, Path]) -> None:
    url, events = backend
    event = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 1},
        "task": {"id": 3, "data": {"image": "/data/upload/1/3.jpg"}},
        "annotation": {
            "id": 7,
            "task": 3,
            "result": [{"type": "rectanglelabels"}],
            "was_cancelled": False,
        },
    }
    assert requests.post(f"{url}/webhook", json=event, timeout=10).json()["status"] == "recorded"
    ignored = requests.post(
        f"{url}/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}}, timeout=10
    )
    assert ignored.json()["status"] == "ignored"
    recorded = read_events(str(events))
    assert len(recorded) == 1
    assert (
        recorded[0]["task"] == 3
        and recorded[0]["annotation"]["id"] == 7
        and recorded[0]["project"] == 1
    )


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b"\xff\xfe", 400),
        (json.dumps({"tasks": "nope"}).encode(), 400),
        (json.dumps({"tasks": [{"no_id": 1}]}).encode(), 400),
    ],
)
def test_bad_bodies_are_400(backend: tuple[str, Path], data: bytes, status: int) -> None:
    url, _ = backend
    r = requests.post(
        f"{url}/predict", data=data, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert r.status_code == status
    assert "error" in r.json()
    assert requests.get(f"{url}/health", timeout=10).status_code == 200  # still serving


def test_oversized_body_is_413_and_server_survives(run_dir: Path) -> None:
    config = BackendConfig(
        run_url=str(run_dir), predictions=DictPredictions(PREDS), max_body_bytes=1000
    )
    server, thread = serve(config)
    try:
        r = requests.post(f"{server.url}/predict", data=b"{" + b" " * 5000 + b"}", timeout=10)
        assert r.status_code == 413
        assert requests.post(f"{server.url}/webhook", data=b"x", timeout=10).status_code == 400
        assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_unknown_path_and_wrong_method(backend: tuple[str, Path]) -> None:
    url, _ = backend
    assert requests.get(f"{url}/nope", timeout=10).status_code == 404
    assert requests.get(f"{url}/predict", timeout=10).status_code == 405


def test_basic_auth_is_required_when_configured(run_dir: Path) -> None:
    config = BackendConfig(
        run_url=str(run_dir),
        predictions=DictPredictions(PREDS),
        basic_auth=("ls", "s3cret"),
        size_of=lambda t: (400, 300),
    )
    server, thread = serve(config)
    try:
        assert requests.get(f"{server.url}/health", timeout=10).status_code == 401
        assert (
            requests.get(f"{server.url}/health", auth=("ls", "wrong"), timeout=10).status_code
            == 401
        )
        r = requests.get(f"{server.url}/health", headers={"Authorization": "Basic !!!"}, timeout=10)
        assert r.status_code == 401
        assert predict(server.url, [1]).status_code == 401
        assert (
            requests.get(f"{server.url}/health", auth=("ls", "s3cret"), timeout=10).status_code
            == 200
        )
        assert predict(server.url, [1], auth=("ls", "s3cret")).status_code == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_missing_calibration_answers_503_not_crash(tmp_path: Path) -> None:
    config = BackendConfig(run_url=str(tmp_path), predictions=DictPredictions(PREDS))
    server, thread = serve(config)
    try:
        r = requests.get(f"{server.url}/health", timeout=10)
        assert r.status_code == 503 and "autolabel.json" in r.json()["error"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_serve_command_refuses_a_folder_without_a_calibrated_run(tmp_path: Path) -> None:
    from autolabel.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--run", str(tmp_path), "--predictions", str(tmp_path)])
    assert exc.value.code == 1


def test_events_append_on_an_object_store() -> None:
    from autolabel.mlbackend import append_event

    url = "memory://labeltriage-events/proj/labelstudio_events.jsonl"
    for i in range(3):
        append_event(url, {"action": "ANNOTATION_CREATED", "task": i})
    assert [e["task"] for e in read_events(url)] == [0, 1, 2]

"""The Label Studio ML backend (FastAPI on uvicorn): easy tier only, at stage autolabel only,
never from a rolled-back run; webhook log; auth; limits, timeouts and graceful shutdown."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests

from autolabel.mlbackend import (
    ROLLBACK_FILENAME,
    BackendConfig,
    find_run_dir,
    load_easy_tier,
    read_events,
)
from autolabel.mlserver import BackendServer, make_server
from connectors.errors import UsageError
from connectors.formats.base import PredictionSource
from connectors.labelmap import LabelMap
from connectors.labelstudio.provenance import model_version_for
from connectors.model import Annotation, Item, Prediction
from connectors.project import open_predictions
from difficulty.runrecord import GateRecord, write_gate_record
from difficulty.table import write_difficulty

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image"><Label value="stop"/><Label value="trafficlight"/></RectangleLabels>'
    "</View>"
)
VERSION = model_version_for("run-1")


class DictPredictions(PredictionSource):
    def __init__(self, preds: dict[str, Prediction], delay_s: float = 0.0) -> None:
        self.preds = preds
        self.delay_s = delay_s

    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        time.sleep(self.delay_s)
        return self.preds.get(item_id)

    def __iter__(self) -> Iterator[Prediction]:
        yield from self.preds.values()


def write_run(
    run_dir: Path, *, threshold: float | None, run_id: str = "run-1", stage: str = "autolabel"
) -> None:
    df = pd.DataFrame(
        {
            "item_id": ["1", "2", "3", "4", "5"],
            "uri": [f"http://ls/data/upload/{i}.jpg" for i in range(1, 6)],
            "status": ["unlabeled"] * 4 + ["labeled"],
            "fourier": [0.1, 0.2, 0.8, 0.05, 0.01],
            "score": [0.1, 0.2, 0.8, None, 0.01],
            "tier": ["easy", "easy", "hard", None, "easy"],
            "rank": [3, 2, 1, None, 4],
            "error": [None, None, None, "cannot decode image", None],
        }
    )
    write_difficulty(df, str(run_dir), {"run_id": run_id, "scorers": ["fourier"]})
    record = GateRecord(  # the gate's own record type, not a hand-written shape
        run_id=run_id,
        stage=stage,
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
    for item_id in ("1", "2", "3", "4", "5")
}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "store" / "proj" / "20260101T000000Z-aaaaaa"
    d.mkdir(parents=True)
    write_run(d, threshold=0.15)
    return d


def config_for(run_dir: Path, **kwargs: Any) -> BackendConfig:
    base: dict[str, Any] = {
        "run_url": str(run_dir),
        "predictions": DictPredictions(PREDS),
        "label_map": LabelMap(map={"stop sign": "stop"}),
        "size_of": lambda task: (400, 300),
        "refresh_s": 0.0,
    }
    return BackendConfig(**{**base, **kwargs})


@pytest.fixture
def backend(run_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    events = tmp_path / "store" / "proj" / "labelstudio_events.jsonl"
    with make_server(config_for(run_dir, events_url=str(events)), port=0) as server:
        yield server.url, events


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


def test_an_exposed_address_needs_auth(run_dir: Path) -> None:
    with pytest.raises(UsageError, match="basic auth"):
        make_server(config_for(run_dir), host="0.0.0.0", port=0)


def test_health_and_setup_report_the_run_and_that_it_is_served(backend: tuple[str, Path]) -> None:
    url, _ = backend
    health = requests.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "UP" and health["model_version"] == VERSION
    assert health["serving"] is True and health["stage"] == "autolabel"
    assert health["easy_items"] == 1  # 5 is easy too, but labeled
    setup = requests.post(
        f"{url}/setup", json={"project": "1.1", "schema": LABEL_CONFIG}, timeout=10
    ).json()
    assert setup == {
        "model_version": VERSION,
        "stage": "autolabel",
        "serving": True,
        "reason": None,
    }
    assert requests.get(f"{url}/openapi.json", timeout=10).json()["info"]["title"]


def test_predict_labels_easy_unlabeled_tasks_only(backend: tuple[str, Path]) -> None:
    url, _ = backend
    r = predict(url, [1, 2, 3, 4, 5, 99])
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 6  # one entry per task, in order
    (easy,) = results[0]
    assert [reg["value"]["rectanglelabels"] for reg in easy["result"]] == [["stop"]]
    region = easy["result"][0]
    assert region["value"]["x"] == pytest.approx(10.0) and region["value"][
        "width"
    ] == pytest.approx(40.0)
    assert region["original_width"] == 400 and region["original_height"] == 300
    prov = region["meta"]["labeltriage"]
    assert (prov["run_id"], prov["tier"], prov["via"], prov["model_version"]) == (
        "run-1", "easy", "serve", "yolov5n",
    )  # fmt: skip
    assert easy["score"] == pytest.approx(0.9) and easy["model_version"] == VERSION
    # 2 is above the calibrated threshold although its tier says easy; 3 is hard; 4 failed
    # scoring; 5 is labeled; 99 is unknown: no prediction at all (Label Studio stores none)
    assert results[1:] == [[], [], [], [], []]


def test_tasks_with_a_human_annotation_or_a_labeltriage_prediction_get_nothing(
    backend: tuple[str, Path],
) -> None:
    url, _ = backend
    ours = {"id": 9, "model_version": VERSION, "result": []}
    tasks = [
        {"id": 1, "data": {}, "annotations": [{"id": 3, "result": [], "was_cancelled": False}]},
        {"id": 1, "data": {}, "predictions": [ours]},
        {"id": 1, "data": {}, "annotations": [{"id": 4, "result": [], "was_cancelled": True}]},
    ]
    body = {"tasks": tasks, "label_config": LABEL_CONFIG}
    results = requests.post(f"{url}/predict", json=body, timeout=10).json()["results"]
    assert results[0] == [] and results[1] == [] and len(results[2]) == 1


@pytest.mark.parametrize("stage", ["report", "shadow"])
def test_nothing_is_served_below_stage_autolabel(run_dir: Path, stage: str) -> None:
    write_run(run_dir, threshold=0.15, stage=stage)
    with make_server(config_for(run_dir), port=0) as server:
        setup = requests.post(
            f"{server.url}/setup", json={"schema": LABEL_CONFIG}, timeout=10
        ).json()
        assert setup["serving"] is False and "only at stage autolabel" in setup["reason"]
        assert predict(server.url, [1]).json()["results"] == [[]]


def test_a_rolled_back_run_is_never_served(run_dir: Path) -> None:
    with make_server(config_for(run_dir), port=0) as server:
        assert predict(server.url, [1]).json()["results"][0] != []
        (run_dir / ROLLBACK_FILENAME).write_text('{"run_id": "run-1"}')
        assert predict(server.url, [1]).json()["results"] == [[]]
        health = requests.get(f"{server.url}/health", timeout=10).json()
        assert health["serving"] is False and "rolled back" in health["reason"]
    # a project folder: the newest run that was not rolled back
    older = run_dir.parent / "20251201T000000Z-000000"
    older.mkdir()
    write_run(older, threshold=0.5, run_id="run-0")
    assert find_run_dir(str(run_dir.parent)) == str(older)


def test_yolo_predictions_are_served_with_the_task_image_size(
    run_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "yolo"
    folder.mkdir()
    (folder / "classes.txt").write_text("stop sign\n")
    (folder / "1.txt").write_text("0 0.3 0.3 0.4 0.4 0.9\n")
    preds = open_predictions(str(folder), "yolo")
    with make_server(config_for(run_dir, predictions=preds), port=0) as server:
        (easy,) = predict(server.url, [1]).json()["results"][0]
        region = easy["result"][0]
        assert region["value"]["x"] == pytest.approx(10.0) and region["original_width"] == 400


def test_no_calibrated_threshold_means_no_easy_task(tmp_path: Path) -> None:
    write_run(tmp_path, threshold=None)
    tier = load_easy_tier(str(tmp_path))
    assert tier.scores == {} and not tier.serving and "bound" in (tier.reason or "")


def test_newest_run_folder_is_used_and_reloaded(run_dir: Path, backend: tuple[str, Path]) -> None:
    url, _ = backend
    newer = run_dir.parent / "20260102T000000Z-bbbbbb"
    newer.mkdir()
    write_run(newer, threshold=0.5, run_id="run-2")
    assert find_run_dir(str(run_dir.parent)) == str(newer)
    # the fixture's backend points at the old run folder itself, which stays in force
    assert requests.get(f"{url}/health", timeout=10).json()["model_version"] == VERSION
    assert set(load_easy_tier(str(newer)).scores) == {"1", "2"}


def test_calibration_change_takes_effect_without_restart(
    run_dir: Path, backend: tuple[str, Path]
) -> None:
    url, _ = backend
    assert predict(url, [2]).json()["results"] == [[]]
    write_run(run_dir, threshold=0.5, run_id="run-3")
    (answer,) = predict(url, [2]).json()["results"][0]
    assert answer["model_version"] == model_version_for("run-3")


def test_webhook_records_annotations_to_jsonl(backend: tuple[str, Path]) -> None:
    url, events = backend
    event = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 1},
        "task": {"id": 3, "data": {"image": "/data/upload/1/3.jpg"}},
        "annotation": {"id": 7, "task": 3, "result": [{"type": "rectanglelabels"}], "was_cancelled": False},
    }  # fmt: skip
    assert requests.post(f"{url}/webhook", json=event, timeout=10).json()["status"] == "recorded"
    ignored = requests.post(
        f"{url}/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}}, timeout=10
    )
    assert ignored.json()["status"] == "ignored"
    (recorded,) = read_events(str(events))
    assert (recorded["task"], recorded["annotation"]["id"], recorded["project"]) == (3, 7, 1)


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        b"[1, 2]",
        b"\xff\xfe",
        json.dumps({"tasks": "nope"}).encode(),
        json.dumps({"tasks": [{"no_id": 1}]}).encode(),
        b'{"tasks": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",  # nested 200k deep
        json.dumps({"tasks": [{"id": 1, "data": {"a": json.loads("[" * 70 + "]" * 70)}}]}).encode(),
    ],
)
def test_bad_bodies_are_400(backend: tuple[str, Path], data: bytes) -> None:
    url, _ = backend
    r = requests.post(
        f"{url}/predict", data=data, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert r.status_code == 400
    assert "error" in r.json()
    assert requests.get(f"{url}/health", timeout=10).status_code == 200  # still serving


def test_oversized_body_is_413_and_server_survives(run_dir: Path) -> None:
    with make_server(config_for(run_dir, max_body_bytes=1000), port=0) as server:
        r = requests.post(f"{server.url}/predict", data=b"{" + b" " * 5000 + b"}", timeout=10)
        assert r.status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
            yield b"{"
            for _ in range(10):
                yield b" " * 500

        chunked = requests.post(f"{server.url}/predict", data=chunks(), timeout=10)
        assert chunked.status_code == 413
        assert requests.post(f"{server.url}/webhook", data=b"x", timeout=10).status_code == 400
        assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def test_unknown_path_and_wrong_method(backend: tuple[str, Path]) -> None:
    url, _ = backend
    assert requests.get(f"{url}/nope", timeout=10).status_code == 404
    assert requests.get(f"{url}/predict", timeout=10).status_code == 405


def test_basic_auth_or_token_is_required_when_configured(run_dir: Path) -> None:
    config = config_for(run_dir, basic_auth=("ls", "s3cret"), token="t0ken")
    with make_server(config, port=0) as server:
        url = server.url
        assert requests.get(f"{url}/health", timeout=10).status_code == 401
        assert requests.get(f"{url}/health", auth=("ls", "wrong"), timeout=10).status_code == 401
        bad = requests.get(f"{url}/health", headers={"Authorization": "Basic !!!"}, timeout=10)
        assert bad.status_code == 401
        assert predict(url, [1]).status_code == 401
        assert requests.get(f"{url}/health", auth=("ls", "s3cret"), timeout=10).status_code == 200
        assert predict(url, [1], auth=("ls", "s3cret")).status_code == 200
        token = {"Authorization": "Bearer t0ken"}
        assert requests.get(f"{url}/health", headers=token, timeout=10).status_code == 200
        wrong = {"Authorization": "Bearer nope"}
        assert requests.get(f"{url}/health", headers=wrong, timeout=10).status_code == 401


def test_missing_calibration_answers_503_not_crash(tmp_path: Path) -> None:
    config = BackendConfig(run_url=str(tmp_path), predictions=DictPredictions(PREDS))
    with make_server(config, port=0) as server:
        r = requests.get(f"{server.url}/health", timeout=10)
        assert r.status_code == 503 and "autolabel.json" in r.json()["error"]


def test_a_stalled_connection_is_closed_after_the_read_timeout(run_dir: Path) -> None:
    with make_server(config_for(run_dir, read_timeout_s=0.5), port=0) as server:
        host, port = server.address
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            start = time.monotonic()
            assert s.recv(1024) == b""  # closed by the server, nothing answered
            assert time.monotonic() - start < 4
        assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def test_each_request_is_one_json_access_log_line(
    backend: tuple[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = backend
    with caplog.at_level(logging.INFO, logger="labeltriage.access"):
        requests.get(f"{url}/nope", timeout=10)
        deadline = time.monotonic() + 5
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.01)
    line = json.loads(caplog.records[-1].getMessage())
    assert (line["method"], line["path"], line["status"]) == ("GET", "/nope", 404)
    assert line["client"].startswith("127.0.0.1:") and line["ms"] >= 0


def test_stop_lets_a_request_in_flight_finish(run_dir: Path) -> None:
    config = config_for(run_dir, predictions=DictPredictions(PREDS, delay_s=1.0))
    server: BackendServer = make_server(config, port=0).start()
    answers: list[int] = []
    thread = threading.Thread(target=lambda: answers.append(predict(server.url, [1]).status_code))
    thread.start()
    time.sleep(0.3)  # the request is being answered
    server.stop()
    thread.join(10)
    assert answers == [200]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/health", timeout=2)


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


def test_serve_takes_its_settings_from_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from autolabel.cli import main
    from autolabel.commands.serve import _from_config, _label_map
    from autolabel.config import load_config

    def config(stage: str) -> str:
        body = {
            "report_store": str(tmp_path / "store"),
            "projects": {"roads": {
                "source": str(tmp_path), "format": "voc", "stage": stage,
                "predictions": {"source": str(tmp_path / "preds"), "format": "yolo"},
                "label_map": {"map": {"stop sign": "stop"}, "ignore": ["DontCare"]},
            }},
        }  # fmt: skip
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(body))
        return str(path)

    with pytest.raises(SystemExit) as exc:
        main(["--config", config("shadow"), "serve"])
    assert exc.value.code == 2 and "only at stage autolabel" in capsys.readouterr().err
    settings = _from_config(load_config(config("autolabel")), "roads")
    assert settings["run_url"] == f"{tmp_path / 'store'}/roads"
    assert settings["events_url"].endswith("roads/labelstudio_events.jsonl")
    assert settings["label_map"] == LabelMap(map={"stop sign": "stop"}, ignore=("DontCare",))
    assert settings["predictions"].format == "yolo"
    inline = _label_map('{"map": {"stop sign": "stop"}}')
    assert inline == LabelMap(map={"stop sign": "stop"})
    with pytest.raises(UsageError, match="not a label map"):
        _label_map('{"map": [1]}')


def test_serve_stops_cleanly_on_sigterm(run_dir: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    folder = tmp_path / "yolo"
    folder.mkdir()
    (folder / "classes.txt").write_text("stop sign\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "autolabel.cli", "serve", "--run", str(run_dir),
         "--predictions", str(folder), "--port", str(port)],
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert out.strip().endswith("stopped")
    assert '"path": "/health"' in err  # the access log

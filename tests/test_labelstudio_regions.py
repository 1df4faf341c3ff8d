"""One region converter: the export file and the live project read a task the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.formats.labelstudio import LabelStudioFormat
from connectors.formats.labelstudio_api import LabelStudioAPI, _BareProjectFS
from connectors.labelstudio.config import parse_label_config
from connectors.labelstudio.provenance import (
    content_sha256,
    content_unchanged,
    is_labeltriage,
    model_version_for,
    provenance_of,
    run_id_of_version,
)
from connectors.labelstudio.regions import percent_to_xyxy, region_to_annotation
from connectors.model import Annotation, Item, ItemStatus
from connectors.storage import ProjectFS

CONFIG = parse_label_config(
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image"><Label value="car"/></RectangleLabels>'
    '<Choices name="choice" toName="image"><Choice value="cat"/></Choices></View>'
)


class _Client:
    """Just enough of a client for reading tasks that are already in hand."""

    def auth_header(self) -> str:
        return "Token test"


def _rect(x: float, y: float, w: float, h: float, *, rotation: float = 0.0) -> dict[str, Any]:
    return {
        "id": "r1", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
        "original_width": 200, "original_height": 100,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation,
                  "rectanglelabels": ["car"]},
    }  # fmt: skip


def read_both(task: dict[str, Any], tmp_path: Path) -> tuple[Item, Item]:
    """The same task through the export-file reader and through the live-project reader."""
    folder = tmp_path / f"export-{task['id']}"
    folder.mkdir()
    (folder / "export.json").write_text(json.dumps([task]))
    (from_file,) = list(LabelStudioFormat(ProjectFS(str(folder))).iter_items())
    api = LabelStudioAPI(
        _BareProjectFS("http://127.0.0.1:9/projects/1", {}),
        client=_Client(),
        state_dir=str(tmp_path / "state"),
    )
    from_api = api.task_to_item(task, CONFIG)
    return from_file, from_api


def same_label(a: Item, b: Item) -> None:
    assert (a.status, a.source, a.annotation_seconds) == (b.status, b.source, b.annotation_seconds)
    assert (a.width, a.height) == (b.width, b.height)
    assert a.annotations == b.annotations
    assert (a.error is None) == (b.error is None)
    if a.error is not None and b.error is not None:
        # the same reason, each naming its own file
        assert a.error.split(": ", 2)[-1] == b.error.split(": ", 2)[-1]


def test_a_region_rotated_30_degrees_is_refused_both_ways(tmp_path: Path) -> None:
    task = {"id": 1, "data": {"image": "/data/upload/1/a.jpg"},
            "annotations": [{"id": 5, "result": [_rect(10, 10, 20, 20, rotation=30)]}]}  # fmt: skip
    from_file, from_api = read_both(task, tmp_path)
    same_label(from_file, from_api)
    assert from_api.error is not None and "rotated by 30°" in from_api.error
    assert from_api.status is ItemStatus.LABELED  # never auto-labeled over


def test_a_box_reaching_100_7_percent_is_clipped_both_ways(tmp_path: Path) -> None:
    task = {"id": 2, "data": {"image": "/data/upload/1/b.jpg"},
            "annotations": [{"id": 6, "result": [_rect(90, 0, 10.7, 50)]}]}  # fmt: skip
    from_file, from_api = read_both(task, tmp_path)
    same_label(from_file, from_api)
    assert from_api.error is None
    assert from_api.annotations[0].box == pytest.approx((180.0, 0.0, 200.0, 50.0))


def test_rotations_by_quarter_turns_are_exact() -> None:
    value = {"x": 50, "y": 20, "width": 10, "height": 20}
    assert percent_to_xyxy(value, 100, 100) == (50.0, 20.0, 60.0, 40.0)
    assert percent_to_xyxy({**value, "rotation": 90}, 100, 100) == (30.0, 20.0, 50.0, 30.0)
    assert percent_to_xyxy({**value, "rotation": 180}, 100, 100) == (40.0, 0.0, 50.0, 20.0)
    assert percent_to_xyxy({**value, "rotation": 270}, 100, 100) == (50.0, 10.0, 70.0, 20.0)
    assert percent_to_xyxy({**value, "rotation": -90}, 100, 100) == (50.0, 10.0, 70.0, 20.0)
    with pytest.raises(ValueError, match="rotated by 45°"):
        percent_to_xyxy({**value, "rotation": 45}, 100, 100)
    with pytest.raises(ValueError, match="zero or negative size"):
        percent_to_xyxy({**value, "width": 0}, 100, 100)


def test_provenance_is_found_in_every_place_it_is_written() -> None:
    version = model_version_for("20260101T000000Z-abc")
    assert (
        version.startswith("labeltriage-") and run_id_of_version(version) == "20260101T000000Z-abc"
    )
    assert run_id_of_version("yolov5n") is None
    empty = {"model_version": version, "result": []}  # an empty label: only its model_version
    assert provenance_of(empty) == {"run_id": "20260101T000000Z-abc"}
    region = {**_rect(1, 1, 2, 2), "meta": {"labeltriage": {"run_id": "r", "via": "serve"}}}
    assert provenance_of({"model_version": "x", "result": [region]}) == {
        "run_id": "r",
        "via": "serve",
    }
    assert provenance_of({"labeltriage": {"run_id": "e"}, "result": []}) == {"run_id": "e"}
    assert not is_labeltriage({"model_version": "yolov5n", "result": [_rect(1, 1, 2, 2)]})
    sha = content_sha256([region], version)
    assert sha == content_sha256([_rect(1, 1, 2, 2)], version)  # meta is not content
    assert content_unchanged(sha, [region], version)
    assert not content_unchanged(sha, [_rect(1, 1, 3, 2)], version)


_boxes = st.tuples(
    st.floats(-2, 100), st.floats(-2, 100), st.floats(-1, 60), st.floats(-1, 60),
    st.sampled_from([0, 0, 90, 30, 180]),
)  # fmt: skip
_annotation = st.fixed_dictionaries(
    {
        "id": st.integers(1, 50),
        "was_cancelled": st.booleans(),
        "ground_truth": st.booleans(),
        "lead_time": st.one_of(st.none(), st.floats(0, 100), st.just(0)),
        "updated_at": st.sampled_from(["2026-01-01", "2026-01-02", None]),
        "result": st.lists(
            _boxes.map(lambda b: _rect(b[0], b[1], b[2], b[3], rotation=b[4])), max_size=3
        ),
    }
)
_prediction = st.fixed_dictionaries(
    {
        "id": st.integers(100, 120),
        "model_version": st.sampled_from(["yolov5n", model_version_for("r9")]),
        "score": st.floats(0, 1),
        "result": st.lists(_boxes.map(lambda b: _rect(b[0], b[1], b[2], b[3])), max_size=2),
    }
)


@settings(max_examples=60, deadline=None)
@given(annotations=st.lists(_annotation, max_size=3), predictions=st.lists(_prediction, max_size=2))
def test_any_task_reads_identically_from_the_file_and_the_api(
    annotations: list[dict[str, Any]], predictions: list[dict[str, Any]], tmp_path_factory: Any
) -> None:
    task = {"id": 7, "data": {"image": "/data/upload/1/c.jpg"},
            "annotations": annotations, "predictions": predictions}  # fmt: skip
    from_file, from_api = read_both(task, tmp_path_factory.mktemp("task"))
    same_label(from_file, from_api)


def test_a_region_reads_back_as_written() -> None:
    from connectors.labelstudio.regions import annotation_to_region

    a = Annotation(label="car", box=(12.5, 7.0, 150.25, 99.0), score=0.5)
    region = annotation_to_region(a, CONFIG.names, 200, 100, region_id="x")
    back = region_to_annotation(region)
    assert back is not None and (back.label, back.score) == ("car", 0.5)
    assert back.box == pytest.approx(a.box)

"""Label Studio JSON export: reading, predictions, round trip, write-back."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from connectors.errors import InputError
from connectors.formats.base import FORMATS, PREDICTION_FORMATS, LabelWrite, Provenance
from connectors.formats.labelstudio import (
    LabelStudioFormat,
    LabelStudioPredictions,
    uri_from_task,
    uri_to_task,
)
from connectors.labelstudio.provenance import model_version_for
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus
from connectors.storage import ProjectFS


def rect(
    x: float,
    y: float,
    w: float,
    h: float,
    label: str,
    *,
    size: tuple[int, int] = (400, 200),
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex[:6],
        "type": "rectanglelabels",
        "from_name": "bbox",
        "to_name": "img",
        "original_width": size[0],
        "original_height": size[1],
        "image_rotation": 0,
        "value": {
            "x": x,
            "y": y,
            "width": w,
            "height": h,
            "rotation": 0,
            "rectanglelabels": [label],
        },
        **extra,
    }


def export_tasks() -> list[dict[str, Any]]:
    return [
        {  # labeled, with a cancelled annotation before the real one
            "id": 11,
            "data": {"image": "/data/local-files/?d=images/a%20b.jpg"},
            "annotations": [
                {
                    "id": 1,
                    "was_cancelled": True,
                    "result": [rect(0, 0, 10, 10, "car")],
                    "lead_time": 99.0,
                },
                {
                    "id": 2,
                    "was_cancelled": False,
                    "result": [rect(10, 20, 25, 50, "stop")],
                    "lead_time": 12.5,
                },
            ],
            "predictions": [
                {
                    "id": 7,
                    "model_version": "yolo-1",
                    "score": 0.8,
                    "result": [rect(10, 20, 25, 50, "stop", score=0.75)],
                }
            ],
            "meta": {"batch": 3},
        },
        {  # only cancelled: unlabeled; a prediction without region scores
            "id": 12,
            "data": {"image": "https://example.org/img/c.jpg"},
            "annotations": [{"id": 3, "was_cancelled": True, "result": []}],
            "predictions": [
                {
                    "id": 8,
                    "model_version": "yolo-1",
                    "score": 0.4,
                    "result": [rect(0, 0, 50, 50, "car")],
                }
            ],
        },
        {"id": 13, "data": {"image": "images/d.jpg"}, "annotations": [], "predictions": []},
        {  # classification
            "id": 14,
            "data": {"image": "/data/upload/1/e.png"},
            "annotations": [
                {
                    "id": 4,
                    "result": [
                        {
                            "id": "q",
                            "type": "choices",
                            "from_name": "cls",
                            "to_name": "img",
                            "value": {"choices": ["cat"]},
                        }
                    ],
                    "lead_time": 3,
                }
            ],
        },
    ]


def make(
    mem: ProjectFS, tasks: list[Any] | None = None, name: str = "export.json"
) -> LabelStudioFormat:
    mem.write_text(name, json.dumps(export_tasks() if tasks is None else tasks, indent=1))
    return LabelStudioFormat(mem)


def by_id(items: list[Item]) -> dict[str, Item]:
    return {i.item_id: i for i in items}


def test_reads_tasks(mem: ProjectFS) -> None:
    items = by_id(list(make(mem).iter_items()))
    assert list(items) == ["11", "12", "13", "14"]
    a = items["11"]
    assert a.uri == "images/a b.jpg"
    assert a.status is ItemStatus.LABELED and a.source is AnnotationSource.HUMAN
    assert (a.width, a.height) == (400, 200)
    assert a.annotations == [Annotation(label="stop", box=(40.0, 40.0, 140.0, 140.0))]
    assert a.annotation_seconds == 12.5  # the cancelled annotation's lead time is ignored
    assert a.meta == {"batch": 3}
    # an image on another host is not read unless the project allows that host
    assert items["12"].status is ItemStatus.UNLABELED and items["12"].error is not None
    assert "allow_image_hosts" in items["12"].error and "example.org" in items["12"].error
    assert items["13"].uri == "images/d.jpg" and items["13"].width is None
    assert items["14"].annotations == [Annotation(label="cat")] and items["14"].class_label == "cat"
    assert items["14"].uri == "upload/1/e.png"
    assert all(i.error is None for k, i in items.items() if k != "12")
    allowed = by_id(list(LabelStudioFormat(mem, allow_image_hosts=["example.org"]).iter_items()))
    assert allowed["12"].error is None and allowed["12"].uri == "https://example.org/img/c.jpg"


def test_images_on_other_hosts_and_files_are_refused(mem: ProjectFS) -> None:
    tasks = [
        {"id": 1, "data": {"image": "file:///etc/passwd"}},
        {"id": 2, "data": {"image": "http://127.0.0.1:8080/data/upload/1/x.jpg"}},
        {"id": 3, "data": {"image": "/data/upload/1/x.jpg"}},
        {"id": 4, "data": {"image": "s3://bucket/x.jpg"}},
    ]
    items = by_id(list(make(mem, tasks).iter_items()))
    assert items["1"].error is not None and "file://" in items["1"].error
    assert items["2"].error is not None and "127.0.0.1:8080" in items["2"].error
    assert items["3"].error is None and items["3"].uri == "upload/1/x.jpg"
    assert items["4"].error is None  # the project's storage policy judges other schemes
    with pytest.raises(InputError, match="file://"):
        uri_from_task("file:///etc/passwd")
    assert (
        uri_from_task("http://ls:8080/a.jpg", allowed_hosts=("ls:8080",)) == "http://ls:8080/a.jpg"
    )


def test_detect_and_registry(mem: ProjectFS) -> None:
    make(mem)
    assert (
        FORMATS["labelstudio"] is LabelStudioFormat
        and PREDICTION_FORMATS["labelstudio"] is LabelStudioPredictions
    )
    assert LabelStudioFormat.detect(mem)
    assert LabelStudioFormat(mem, file="export.json").file == "export.json"


def test_uri_mapping() -> None:
    assert (
        uri_from_task("/data/local-files/?d=proj/images/x.jpg", local_files_prefix="proj")
        == "images/x.jpg"
    )
    assert uri_from_task("s3://bucket/x.jpg") == "s3://bucket/x.jpg"
    for uri in ("images/a b.jpg", "upload/3/x.png", "gs://b/x.jpg"):
        assert uri_from_task(uri_to_task(uri)) == uri


def test_bad_regions_mark_only_their_task(mem: ProjectFS) -> None:
    tasks = export_tasks()
    tasks[0]["annotations"][1]["result"].append(
        rect(90, 0, 20, 10, "car")
    )  # runs past the right edge
    tasks[2]["annotations"] = [{"id": 5, "result": [rect(0, 0, -5, 5, "car")]}]
    tasks.insert(1, {"id": 20, "data": {"image": "/data/local-files/?d=../../secret.jpg"}})
    tasks.append({"no": "id"})
    items = list(make(mem, tasks).iter_items())
    errors = {i.item_id: i.error for i in items if i.error}
    assert set(errors) == {"11", "12", "20", "13", "task:5"}  # 12: an image on another host
    assert "ends past the image width 400" in errors["11"] and "export.json" in errors["11"]
    assert "negative width" in errors["13"]
    assert "escapes the project root" in errors["20"]
    assert by_id(items)["11"].status is ItemStatus.LABELED  # still never auto-labeled over
    assert by_id(items)["14"].error is None


def test_malformed_json_names_line(mem: ProjectFS) -> None:
    mem.write_text(
        "export.json", '[\n {"id": 1,\n  "data": {"image": "a.jpg"}\n  "annotations": []}\n]'
    )
    with pytest.raises(InputError) as info:
        list(LabelStudioFormat(mem).iter_items())
    assert info.value.line == 4 and "export.json:4" in str(info.value)


def test_predictions_source(mem: ProjectFS) -> None:
    make(mem)
    source = LabelStudioPredictions(mem, file="export.json")
    p11 = source.get("11")
    assert p11 is not None and p11.model_version == "yolo-1"
    assert p11.annotations == [Annotation(label="stop", box=(40.0, 40.0, 140.0, 140.0), score=0.75)]
    p12 = source.get("12")
    assert p12 is not None and p12.annotations[0].score == 0.4  # falls back to the prediction score
    assert source.get("13") is None and source.get("nope") is None
    assert [p.item_id for p in source] == ["11", "12"]
    assert LabelStudioPredictions(mem, file="export.json", model_version="other").get("11") is None


def test_round_trip(mem: ProjectFS) -> None:
    items = [
        Item(
            item_id="1",
            uri="images/a.jpg",
            width=640,
            height=480,
            status="labeled",
            annotation_seconds=4.5,
            annotations=[Annotation(label="car", box=(10, 20, 110, 220))],
            meta={"k": 1},
        ),
        Item(item_id="2", uri="images/b.jpg"),
        Item(
            item_id="3",
            uri="http://h/x.jpg",
            status="labeled",
            annotations=[Annotation(label="dog")],
        ),
        Item(
            item_id="4",
            uri="images/c.jpg",
            width=100,
            height=100,
            status="auto_labeled",
            annotations=[Annotation(label="car", box=(0, 0, 50, 50), score=0.9)],
            meta={
                "auto_label": {
                    "run_id": "r0",
                    "provenance": {"run_id": "r0", "model_version": "m", "score": 0.9},
                }
            },
        ),
    ]
    LabelStudioFormat(mem).write_items(items)
    back = list(LabelStudioFormat(mem, allow_image_hosts=["h"]).iter_items())
    assert [i.item_id for i in back] == ["1", "2", "3", "4"]
    for got, want in zip(back, items, strict=True):
        assert (got.uri, got.status, got.source, got.annotation_seconds) == (
            want.uri,
            want.status,
            want.source,
            want.annotation_seconds,
        )
        assert [(a.label, a.score) for a in got.annotations] == [
            (a.label, a.score) for a in want.annotations
        ]
        for ga, wa in zip(got.annotations, want.annotations, strict=True):
            assert (ga.box is None) == (wa.box is None)
            if wa.box is not None:
                assert ga.box == pytest.approx(wa.box)
    assert back[0].meta == {"k": 1} and back[3].meta["auto_label"]["run_id"] == "r0"


def write(item: Item, run_id: str = "r1") -> LabelWrite:
    return LabelWrite(
        item=item,
        annotations=[Annotation(label="car", box=(0, 0, 200, 100), score=0.6)],
        provenance=Provenance(run_id=run_id, model_version="yolo-2", score=0.7, tier="easy"),
    )


def test_write_labels_adds_predictions_only(mem: ProjectFS) -> None:
    fmt = make(mem)
    items = by_id(list(fmt.iter_items()))
    before = json.loads(mem.read_text("export.json"))
    outcome = fmt.write_labels(
        [
            write(items["11"]),
            write(items["12"]),
            write(items["13"].model_copy(update={"width": 400, "height": 200})),
        ]
    )
    assert "human annotation" in outcome.refused["11"]
    assert "cancelled" in outcome.refused["12"]  # a task with annotations is left alone
    (record,) = outcome.records
    assert record.item_id == "13" and record.entry_ids == ["r1:13"]
    after = json.loads(mem.read_text("export.json"))
    for old, new in zip(before, after, strict=True):
        assert old.get("annotations") == new.get("annotations")
    pred = after[2]["predictions"][-1]
    assert pred["model_version"] == model_version_for("r1") and pred["score"] == 0.7
    assert pred["labeltriage"]["model_version"] == "yolo-2"  # the model the label came from
    assert pred["labeltriage"]["run_id"] == "r1" and pred["labeltriage"]["tier"] == "easy"
    region = pred["result"][0]
    assert region["score"] == 0.6 and region["from_name"] == "bbox" and region["to_name"] == "img"
    assert region["value"]["width"] == pytest.approx(50.0) and region["value"][
        "height"
    ] == pytest.approx(50.0)
    reread = by_id(list(LabelStudioFormat(mem).iter_items()))["13"]
    assert reread.status is ItemStatus.AUTO_LABELED and reread.source is AnnotationSource.AUTO
    assert reread.annotations == [Annotation(label="car", box=(0.0, 0.0, 200.0, 100.0), score=0.6)]
    # labeltriage's own output is never read back as the platform's predictions; a second
    # run is refused
    assert LabelStudioPredictions(mem).get("13") is None
    assert "already auto-labeled by run r1" in fmt.write_labels([write(reread, "r2")]).refused["13"]


def test_write_labels_refuses_when_unknown_size(mem: ProjectFS) -> None:
    fmt = make(mem)
    d = by_id(list(fmt.iter_items()))["13"]
    refused = fmt.write_labels([write(d)]).refused["13"]
    assert "image size unknown" in refused and "images/d.jpg" in refused  # no such image


def _png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_write_labels_reads_the_image_header_when_no_size_is_recorded(mem: ProjectFS) -> None:
    tasks = export_tasks()
    tasks.append({"id": 15, "data": {"image": "/data/local-files/?d=images/f.png"}})
    fmt = make(mem, tasks)
    mem.write_bytes("images/d.jpg", _png(400, 200))
    mem.write_bytes("images/f.png", _png(800, 100))
    items = by_id(list(fmt.iter_items()))
    assert items["13"].width is None and items["15"].width is None  # unlabeled: no size recorded
    outcome = fmt.write_labels([write(items["13"]), write(items["15"])])
    assert not outcome.refused and len(outcome.records) == 2
    after = {t["id"]: t for t in json.loads(mem.read_text("export.json"))}
    r13, r15 = after[13]["predictions"][-1]["result"][0], after[15]["predictions"][-1]["result"][0]
    assert (r13["original_width"], r13["original_height"]) == (400, 200)
    assert r13["value"]["width"] == pytest.approx(50.0) and r13["value"]["height"] == pytest.approx(
        50.0
    )
    assert (r15["original_width"], r15["original_height"]) == (800, 100)
    assert r15["value"]["width"] == pytest.approx(25.0) and r15["value"]["height"] == pytest.approx(
        100.0
    )
    reread = by_id(list(LabelStudioFormat(mem).iter_items()))
    assert reread["15"].annotations[0].box == pytest.approx((0.0, 0.0, 200.0, 100.0))
    assert (reread["15"].width, reread["15"].height) == (800, 100)


def test_write_labels_refuses_a_box_past_the_image_read_from_its_header(mem: ProjectFS) -> None:
    fmt = make(mem)
    mem.write_bytes("images/d.jpg", _png(100, 50))  # the box (0, 0, 200, 100) does not fit
    d = by_id(list(fmt.iter_items()))["13"]
    outcome = fmt.write_labels([write(d)])
    assert not outcome.records and "width 100" in outcome.refused["13"]
    mem.write_bytes("images/d.jpg", b"not an image", overwrite=True)
    assert "cannot read image header" in fmt.write_labels([write(d)]).refused["13"]


def test_annotation_added_between_read_and_write_is_respected(mem: ProjectFS) -> None:
    fmt = make(mem)
    d = by_id(list(fmt.iter_items()))["13"].model_copy(update={"width": 400, "height": 200})
    tasks = json.loads(mem.read_text("export.json"))
    tasks[2]["annotations"] = [
        {"id": 9, "result": [rect(1, 1, 5, 5, "car")], "was_cancelled": False}
    ]
    mem.write_text("export.json", json.dumps(tasks))
    outcome = fmt.write_labels([write(d)])
    assert not outcome.records and "human annotation" in outcome.refused["13"]
    assert json.loads(mem.read_text("export.json")) == tasks


def test_remove_written_exact(mem: ProjectFS) -> None:
    tasks = [
        {
            "id": i,
            "data": {"image": f"images/{i}.jpg"},
            "annotations": [],
            "predictions": [{"model_version": "theirs", "result": []}],
        }
        for i in range(1, 4)
    ]
    fmt = make(mem, tasks)
    items = [i.model_copy(update={"width": 400, "height": 200}) for i in fmt.iter_items()]
    outcome = fmt.write_labels([write(i) for i in items])
    assert len(outcome.records) == 3
    edited = json.loads(mem.read_text("export.json"))
    edited[0]["predictions"][-1]["result"][0]["value"]["x"] = 3.0  # a person moves a predicted box
    mem.write_text("export.json", json.dumps(edited))
    kept = fmt.remove_written(outcome.records)
    assert len(kept) == 1 and kept[0].startswith("1:") and "edited" in kept[0]
    final = json.loads(mem.read_text("export.json"))
    assert [len(t["predictions"]) for t in final] == [2, 1, 1]
    assert all(t["predictions"][0]["model_version"] == "theirs" for t in final)

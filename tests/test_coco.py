"""COCO format: round trips, bad input, real predictions, write-back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _fileformat_helpers import fresh_project
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.errors import InputError, UsageError
from connectors.formats.base import FORMATS, PREDICTION_FORMATS, LabelWrite, Provenance
from connectors.formats.coco import CocoFormat, CocoPredictions
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus
from connectors.storage import ProjectFS


def coco_doc(
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[str] = ("stop", "light"),
) -> dict[str, Any]:  # type: ignore[assignment]
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)],
    }


def small_project(mem: ProjectFS) -> CocoFormat:
    """Three 100x80 images: a (one stop box), b (unlabeled), c (one light box)."""
    mem.fs.makedirs(mem.resolve("images"), exist_ok=True)
    for name in ("a", "b", "c"):
        mem.write_bytes(f"images/{name}.jpg", b"jpeg")
    doc = coco_doc(
        [
            {"id": i + 1, "file_name": f"{n}.jpg", "width": 100, "height": 80}
            for i, n in enumerate("abc")
        ],
        [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 30]},
            {"id": 2, "image_id": 3, "category_id": 2, "bbox": [0, 0, 100, 80]},
        ],
    )
    mem.write_text("annotations.json", json.dumps(doc, indent=1))
    return CocoFormat(mem)


def by_id(items: list[Item]) -> dict[str, Item]:
    return {i.item_id: i for i in items}


# -- reading ---------------------------------------------------------------------------


def test_reads_boxes_as_xyxy_with_image_root(mem: ProjectFS) -> None:
    items = by_id(list(small_project(mem).iter_items()))
    assert set(items) == {"a", "b", "c"}
    a = items["a"]
    assert a.uri == "images/a.jpg"
    assert (a.width, a.height) == (100, 80)
    assert a.status is ItemStatus.LABELED and a.source is AnnotationSource.HUMAN
    assert a.annotations == [Annotation(label="stop", box=(10.0, 10.0, 30.0, 40.0))]
    assert items["b"].status is ItemStatus.UNLABELED and items["b"].annotations == []
    assert all(i.error is None for i in items.values())


def test_image_root_is_json_folder_without_images_dir(mem: ProjectFS) -> None:
    mem.write_text(
        "coco.json",
        json.dumps(coco_doc([{"id": 1, "file_name": "sub/x.png", "width": 5, "height": 5}], [])),
    )
    (item,) = CocoFormat(mem, file="coco.json").iter_items()
    assert (item.item_id, item.uri) == ("sub/x", "sub/x.png")


def test_detect_and_registry(mem: ProjectFS) -> None:
    small_project(mem)
    assert FORMATS["coco"] is CocoFormat and PREDICTION_FORMATS["coco"] is CocoPredictions
    assert CocoFormat.detect(mem)
    other = fresh_project()
    other.write_text("export.json", json.dumps([{"id": 1, "data": {"image": "x.jpg"}}]))
    assert not CocoFormat.detect(other)


def test_finds_single_json_in_annotations_folder(mem: ProjectFS) -> None:
    mem.write_text(
        "annotations/instances.json",
        json.dumps(coco_doc([{"id": 1, "file_name": "x.jpg", "width": 5, "height": 5}], [])),
    )
    assert CocoFormat(mem).file == "annotations/instances.json"
    mem.write_text("annotations/other.json", "{}")
    with pytest.raises(UsageError, match="several JSON files"):
        _ = CocoFormat(mem).file


def test_malformed_json_names_file_and_line(mem: ProjectFS) -> None:
    mem.write_text("annotations.json", '{"images": [\n  {"id": 1,, "file_name": "a.jpg"}\n]}')
    with pytest.raises(InputError) as info:
        list(CocoFormat(mem).iter_items())
    assert info.value.line == 2
    assert "annotations.json:2" in str(info.value) and "column" in str(info.value)


def write_doc(
    mem: ProjectFS, images: list[dict[str, Any]], annotations: list[dict[str, Any]]
) -> CocoFormat:
    mem.write_text("annotations.json", json.dumps(coco_doc(images, annotations)))
    return CocoFormat(mem)


IMGS = [{"id": i, "file_name": f"im{i}.jpg", "width": 100, "height": 50} for i in (1, 2, 3)]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {"id": 9, "image_id": 2, "category_id": 77, "bbox": [1, 1, 5, 5]},
            "unknown category_id 77",
        ),
        (
            {"id": 9, "image_id": 2, "category_id": 1, "bbox": [90, 10, 30, 5]},
            "past the image width 100",
        ),
        (
            {"id": 9, "image_id": 2, "category_id": 1, "bbox": [10, 10, -4, 5]},
            "negative width or height",
        ),
        ({"id": 9, "image_id": 2, "category_id": 1, "bbox": [10, 10, 5]}, "not four numbers"),
        (
            {"id": 9, "image_id": 2, "category_id": 1, "bbox": [10, 10, 5, 5], "score": 3.0},
            "not in [0, 1]",
        ),
    ],
)
def test_bad_annotation_sets_error_on_its_item_only(
    mem: ProjectFS, bad: dict[str, Any], message: str
) -> None:
    good = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 2, "image_id": 3, "category_id": 2, "bbox": [1, 1, 5, 5]},
    ]
    items = by_id(list(write_doc(mem, IMGS, [*good, bad]).iter_items()))
    assert items["im2"].error is not None
    assert message in items["im2"].error
    assert "annotations.json" in items["im2"].error and "im2" in items["im2"].error
    # a bad annotation still marks the item labeled: it is never auto-labeled over
    assert items["im2"].status is ItemStatus.LABELED
    assert items["im1"].error is None and items["im3"].error is None
    assert len(items["im1"].annotations) == 1 and len(items["im3"].annotations) == 1


def test_unknown_image_id_becomes_its_own_error_item(mem: ProjectFS) -> None:
    anns = [{"id": 5, "image_id": 99, "category_id": 1, "bbox": [1, 1, 2, 2]}]
    items = list(write_doc(mem, IMGS, anns).iter_items())
    assert [i.item_id for i in items] == ["im1", "im2", "im3", "annotation:5"]
    assert "unknown image_id 99" in (items[-1].error or "")
    assert all(i.error is None for i in items[:3])


@pytest.mark.parametrize(
    "file_name", ["../outside.jpg", "a/../../outside.jpg", "/etc/passwd", "s3://bucket/x.jpg"]
)
def test_file_name_escaping_root_is_an_error_item(mem: ProjectFS, file_name: str) -> None:
    images = [*IMGS[:1], {"id": 2, "file_name": file_name, "width": 10, "height": 10}, IMGS[2]]
    items = list(write_doc(mem, images, []).iter_items())
    assert len(items) == 3
    assert items[1].error is not None and "annotations.json" in items[1].error
    assert items[0].error is None and items[2].error is None


def test_duplicate_image_ids_and_missing_fields(mem: ProjectFS) -> None:
    images = [
        IMGS[0],
        {"id": 1, "file_name": "other.jpg", "width": 1, "height": 1},
        {"file_name": "noid.jpg"},
    ]
    items = list(write_doc(mem, images, []).iter_items())
    assert items[0].error is None
    assert "duplicate image id 1" in (items[1].error or "")
    assert items[2].item_id == "image:2" and "needs 'id'" in (items[2].error or "")


def test_items_are_built_lazily(mem: ProjectFS) -> None:
    it = write_doc(mem, IMGS, []).iter_items()
    first = next(it)
    assert first.item_id == "im1"


# -- round trip ------------------------------------------------------------------------

LABELS = st.sampled_from(["car", "stop sign", "person", "light"])


@st.composite
def coco_items(draw: st.DrawFn) -> list[Item]:
    ids = draw(
        st.lists(
            st.from_regex(r"[a-z][a-z0-9_]{0,7}(/[a-z0-9]{1,4})?", fullmatch=True),
            min_size=1,
            max_size=8,
            unique=True,
        )
    )
    items = []
    for item_id in ids:
        w, h = draw(st.integers(1, 3000)), draw(st.integers(1, 3000))
        anns = []
        for _ in range(draw(st.integers(0, 4))):
            x1 = draw(st.floats(0, w - 0.5, allow_nan=False))
            y1 = draw(st.floats(0, h - 0.5, allow_nan=False))
            x2 = draw(st.floats(x1 + 0.01, w, allow_nan=False).filter(lambda v, x1=x1: v > x1))
            y2 = draw(st.floats(y1 + 0.01, h, allow_nan=False).filter(lambda v, y1=y1: v > y1))
            score = draw(st.none() | st.floats(0, 1))
            anns.append(Annotation(label=draw(LABELS), box=(x1, y1, x2, y2), score=score))
        ext = draw(st.sampled_from([".jpg", ".png", ".JPEG"]))
        meta = draw(
            st.dictionaries(
                st.sampled_from(["license", "date_captured", "flickr"]),
                st.integers(0, 9) | st.text(max_size=5),
                max_size=2,
            )
        )
        items.append(
            Item(
                item_id=item_id,
                uri=f"images/{item_id}{ext}",
                width=w,
                height=h,
                status=ItemStatus.LABELED if anns else ItemStatus.UNLABELED,
                annotations=anns,
                meta=meta,
            )
        )
    return items


def assert_same_items(back: list[Item], items: list[Item]) -> None:
    assert [i.item_id for i in back] == [i.item_id for i in items]
    for got, want in zip(back, items, strict=True):
        assert (got.uri, got.width, got.height, got.status, got.meta, got.error) == (
            want.uri,
            want.width,
            want.height,
            want.status,
            want.meta,
            None,
        )
        assert [a.label for a in got.annotations] == [a.label for a in want.annotations]
        assert [a.score for a in got.annotations] == [a.score for a in want.annotations]
        for ga, wa in zip(got.annotations, want.annotations, strict=True):
            # COCO bboxes are written with 2 decimals: x, y, w and h each within 0.005
            assert ga.box == pytest.approx(wa.box, abs=0.01 + 1e-9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=coco_items())
def test_round_trip_items_coco_items(items: list[Item]) -> None:
    project = fresh_project()
    try:
        CocoFormat(project).write_items(items)
        assert project.exists("annotations.json")
        back = list(CocoFormat(project).iter_items())
        assert_same_items(back, items)
        # and once more: COCO → items → COCO gives the same document
        first = json.loads(project.read_text("annotations.json"))
        CocoFormat(project, file="again.json").write_items(back)
        again = json.loads(project.read_text("again.json"))
        assert again == first
    finally:
        project.fs.rm(project.root, recursive=True)


def test_write_items_refuses_what_coco_cannot_hold(mem: ProjectFS) -> None:
    with pytest.raises(UsageError, match="class label"):
        CocoFormat(mem).write_items(
            [
                Item(
                    item_id="a",
                    uri="images/a.jpg",
                    status="labeled",
                    annotations=[Annotation(label="cat")],
                )
            ]
        )
    with pytest.raises(UsageError, match="not in the given classes"):
        CocoFormat(mem).write_items(
            [
                Item(
                    item_id="a",
                    uri="a.jpg",
                    status="labeled",
                    annotations=[Annotation(label="dog", box=(0, 0, 1, 1))],
                )
            ],
            classes=["cat"],
        )
    assert not mem.exists("annotations.json")


def test_write_items_classes_give_category_ids(mem: ProjectFS) -> None:
    items = [
        Item(
            item_id="a",
            uri="images/a.jpg",
            width=10,
            height=10,
            status="labeled",
            annotations=[Annotation(label="b", box=(0, 0, 1, 1))],
        )
    ]
    CocoFormat(mem).write_items(items, classes=["a", "b", "c"])
    doc = json.loads(mem.read_text("annotations.json"))
    assert doc["categories"] == [
        {"id": 1, "name": "a"},
        {"id": 2, "name": "b"},
        {"id": 3, "name": "c"},
    ]
    assert doc["annotations"][0]["category_id"] == 2 and doc["annotations"][0]["bbox"] == [
        0,
        0,
        1,
        1,
    ]
    assert doc["images"][0]["file_name"] == "a.jpg"


# -- real predictions --------------------------------------------------------------------


def test_reads_road_signs_predictions(road_signs: Path) -> None:
    source = CocoPredictions(ProjectFS(str(road_signs / "predictions")), file="coco.json")
    preds = list(source)
    assert len(preds) == 700
    assert sum(len(p.annotations) for p in preds) == 2875
    assert sum(1 for p in preds if not p.annotations) == 125
    assert all(p.error is None for p in preds)
    one = source.get("road1")
    assert one is not None and one.annotations[0].label == "traffic light"
    assert one.annotations[0].score == pytest.approx(0.68941)
    assert one.annotations[0].box == pytest.approx((153.29, 57.9, 153.29 + 107.26, 57.9 + 225.1))
    assert one.source is not None and one.source.endswith("coco.json")
    assert source.get("not-there") is None
    # the same file read as a project: every image, no bad item
    items = list(
        CocoFormat(ProjectFS(str(road_signs / "predictions")), file="coco.json").iter_items()
    )
    assert len(items) == 700 and all(i.error is None for i in items)
    assert sum(len(i.annotations) for i in items) == 2875


def test_reads_kitti_tiny_predictions(kitti_tiny: Path) -> None:
    preds = list(CocoPredictions(ProjectFS(str(kitti_tiny / "predictions")), file="coco.json"))
    assert len(preds) == 75
    assert sum(len(p.annotations) for p in preds) == 1225
    assert {p.item_id for p in preds} == {f"{i:06d}" for i in range(75)}


def test_results_list_uses_project_images(mem: ProjectFS) -> None:
    fmt = small_project(mem)
    mem.write_text(
        "results.json",
        json.dumps(
            [
                {"image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5},
                {"image_id": 2, "category_id": 9, "bbox": [1, 2, 3, 4], "score": 0.5},
            ]
        ),
    )
    with pytest.raises(UsageError, match="results list"):
        CocoPredictions(mem, file="results.json")
    source = CocoPredictions(mem, project=fmt, file="results.json", model_version="m1")
    pred = source.get("b")
    assert pred is not None and pred.model_version == "m1"
    assert pred.annotations == [Annotation(label="stop", box=(1.0, 2.0, 4.0, 6.0), score=0.5)]
    assert "unknown category_id 9" in (pred.error or "")
    assert source.get("a") is not None and source.get("a").annotations == []  # type: ignore[union-attr]


# -- write-back --------------------------------------------------------------------------


def label_write(
    item: Item, run_id: str = "r1", box: tuple[float, float, float, float] = (1, 1, 11, 11)
) -> LabelWrite:
    return LabelWrite(
        item=item,
        annotations=[Annotation(label="light", box=box, score=0.9)],
        provenance=Provenance(run_id=run_id, model_version="yolo-1", score=0.9, tier="easy"),
    )


def test_write_labels_only_where_no_annotation(mem: ProjectFS) -> None:
    fmt = small_project(mem)
    items = by_id(list(fmt.iter_items()))
    outcome = fmt.write_labels([label_write(items["a"]), label_write(items["b"])])
    assert set(outcome.refused) == {"a"} and "human label" in outcome.refused["a"]
    (record,) = outcome.records
    assert record.item_id == "b" and record.kind == "entry" and record.path == "annotations.json"
    after = by_id(list(CocoFormat(mem).iter_items()))
    b = after["b"]
    assert b.status is ItemStatus.AUTO_LABELED and b.source is AnnotationSource.AUTO
    assert b.annotations == [Annotation(label="light", box=(1.0, 1.0, 11.0, 11.0), score=0.9)]
    assert b.meta["auto_label"]["run_id"] == "r1"
    doc = json.loads(mem.read_text("annotations.json"))
    written = [a for a in doc["annotations"] if "labeltriage" in a]
    assert written[0]["labeltriage"] == {
        "run_id": "r1",
        "model_version": "yolo-1",
        "tier": "easy",
        "score": 0.9,
    }
    assert written[0]["score"] == 0.9 and written[0]["id"] == 3
    assert after["a"].annotations == items["a"].annotations  # human label untouched
    # a second run does not write over the auto-label either
    again = CocoFormat(mem).write_labels([label_write(b, run_id="r2")])
    assert "already auto-labeled by run r1" in again.refused["b"] and not again.records


def test_write_labels_refuses_human_label_added_after_read(mem: ProjectFS) -> None:
    fmt = small_project(mem)
    items = by_id(list(fmt.iter_items()))
    assert items["b"].status is ItemStatus.UNLABELED
    doc = json.loads(mem.read_text("annotations.json"))
    doc["annotations"].append({"id": 50, "image_id": 2, "category_id": 1, "bbox": [2, 2, 3, 3]})
    mem.write_text("annotations.json", json.dumps(doc))  # a person labels b meanwhile
    outcome = fmt.write_labels([label_write(items["b"])])
    assert not outcome.records and "human label" in outcome.refused["b"]
    assert json.loads(mem.read_text("annotations.json")) == doc


def test_write_labels_refuses_unknown_class_and_misfit_box(mem: ProjectFS) -> None:
    fmt = small_project(mem)
    b = by_id(list(fmt.iter_items()))["b"]
    bad_class = LabelWrite(
        item=b,
        annotations=[Annotation(label="zebra", box=(1, 1, 2, 2))],
        provenance=Provenance(run_id="r", model_version="m"),
    )
    assert "not a category" in fmt.write_labels([bad_class]).refused["b"]
    assert (
        "past the image width"
        in fmt.write_labels([label_write(b, box=(50, 1, 150, 2))]).refused["b"]
    )
    assert "labeltriage" not in mem.read_text("annotations.json")


def test_remove_written_is_exact_and_keeps_edits(mem: ProjectFS) -> None:
    mem.write_text(
        "annotations.json",
        json.dumps(
            coco_doc(
                [
                    {"id": i, "file_name": f"{n}.jpg", "width": 100, "height": 80}
                    for i, n in enumerate("pqr", start=1)
                ],
                [],
            )
        ),
    )
    fmt = CocoFormat(mem)
    items = list(fmt.iter_items())
    outcome = fmt.write_labels([label_write(i) for i in items])
    assert len(outcome.records) == 3
    doc = json.loads(mem.read_text("annotations.json"))
    edited = next(a for a in doc["annotations"] if a["image_id"] == 2)
    edited["bbox"] = [5, 5, 5, 5]  # a person corrects q's box
    doc["annotations"].append(
        {"id": 99, "image_id": 3, "category_id": 1, "bbox": [0, 0, 3, 3]}
    )  # and adds one to r
    mem.write_text("annotations.json", json.dumps(doc))
    kept = fmt.remove_written(outcome.records)
    assert len(kept) == 1 and kept[0].startswith("q:") and "edited" in kept[0]
    final = json.loads(mem.read_text("annotations.json"))
    assert sorted(a["id"] for a in final["annotations"]) == sorted([edited["id"], 99])
    assert fmt.remove_written(outcome.records)[0].startswith(
        "p:"
    )  # already gone: reported, nothing removed


def test_written_boxes_have_two_decimals(mem: ProjectFS) -> None:
    fmt = small_project(mem)
    items = by_id(list(fmt.iter_items()))
    fmt.write_labels([label_write(items["b"], box=(1.004, 1.5, 11.3333333, 11.0))])
    doc = json.loads(mem.read_text("annotations.json"))
    (written,) = [a for a in doc["annotations"] if "labeltriage" in a]
    assert written["bbox"] == [1.0, 1.5, 10.33, 9.5]

"""YOLO format: reading, bad input, round trips, auto-label writes and predictions."""

from __future__ import annotations

import json

import pytest
from _fileformat_helpers import make_project, png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.errors import HumanLabelConflict, UsageError
from connectors.formats.base import LabelWrite, Provenance, sidecar_path
from connectors.formats.yolo import YoloFormat, YoloPredictions
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus


def yolo_project(
    labels: dict[str, str],
    images: tuple[str, ...] = ("a", "b"),
    classes: str = "cat\ndog\n",
    size: tuple[int, int] = (40, 30),
):
    files: dict[str, bytes | str] = {f"images/{stem}.png": png_bytes(*size) for stem in images}
    files.update({f"labels/{stem}.txt": text for stem, text in labels.items()})
    if classes is not None:
        files["classes.txt"] = classes
    return make_project(files, "yolo")


def by_id(fmt: YoloFormat) -> dict[str, Item]:
    return {item.item_id: item for item in fmt.iter_items()}


def test_reads_boxes_in_pixels_and_statuses() -> None:
    fs = yolo_project({"a": "0 0.5 0.5 0.5 0.5\n1 0.25 0.5 0.1 0.2\n"})
    items = by_id(YoloFormat(fs))
    a, b = items["a"], items["b"]
    assert a.status is ItemStatus.LABELED and a.source is AnnotationSource.HUMAN
    assert (a.width, a.height) == (40, 30)
    assert a.annotations[0] == Annotation(label="cat", box=(10.0, 7.5, 30.0, 22.5))
    assert a.annotations[1].label == "dog"
    assert a.annotations[1].box == pytest.approx((8.0, 12.0, 12.0, 18.0))
    assert b.status is ItemStatus.UNLABELED and b.annotations == [] and b.error is None


def test_empty_label_file_is_a_label_with_no_boxes() -> None:
    items = by_id(YoloFormat(yolo_project({"a": ""})))
    assert items["a"].status is ItemStatus.LABELED and items["a"].annotations == []


def test_nested_item_ids_and_data_yaml_names() -> None:
    files: dict[str, bytes | str] = {
        "images/sub/x.png": png_bytes(),
        "labels/sub/x.txt": "1 0.5 0.5 0.2 0.2\n",
        "data.yaml": "names:\n  0: cat\n  1: dog\n",
    }
    items = by_id(YoloFormat(make_project(files)))
    assert list(items) == ["sub/x"]
    assert items["sub/x"].annotations[0].label == "dog"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.5 0.5 0.5", "labels/a.txt:3: expected 5 fields, got 4"),
        ("0 0.5 0.5 0.5 0.5 0.9", "labels/a.txt:3: expected 5 fields, got 6"),
        ("0 0.5 abc 0.5 0.5", "labels/a.txt:3: field 3 'abc' is not a number"),
        ("x 0.5 0.5 0.5 0.5", "labels/a.txt:3: class id 'x' is not an integer"),
        ("7 0.5 0.5 0.5 0.5", "labels/a.txt:3: unknown class id 7 (2 classes are known)"),
        (
            "0 0.9 0.5 0.5 0.5",
            "labels/a.txt:3: box [26.0, 7.5, 46.0, 22.5] ends past the image width 40",
        ),
        (
            "0 0.5 0.5 -0.2 0.5",
            "labels/a.txt:3: box [24.0, 7.5, 16.0, 22.5] has zero or negative size",
        ),
        ("0 0.5 0.5 nan 0.5", "labels/a.txt:3: field 4 'nan' is not a finite number"),
        ("0 0.5 inf abc 0.5", "labels/a.txt:3: field 3 'inf' is not a finite number"),
        ("0 0.5 abc inf 0.5", "labels/a.txt:3: field 3 'abc' is not a number"),
        ("0 -inf 0.5 0.5 x", "labels/a.txt:3: field 2 '-inf' is not a finite number"),
    ],
)
def test_bad_lines_name_file_and_line(line: str, message: str) -> None:
    fs = yolo_project({"a": f"0 0.5 0.5 0.1 0.1\n\n{line}\n"})
    items = by_id(YoloFormat(fs))
    assert items["a"].error == message
    assert items["a"].status is ItemStatus.LABELED and items["a"].annotations == []
    assert items["b"].error is None  # one bad item never stops the stream


def test_label_file_without_image_is_an_error_item() -> None:
    fs = yolo_project({"a": "", "ghost": "0 0.5 0.5 0.1 0.1\n", "deep/lost": ""})
    items = by_id(YoloFormat(fs))
    assert items["ghost"].error == "labels/ghost.txt: label file with no image in images/"
    assert items["deep/lost"].error == "labels/deep/lost.txt: label file with no image in images/"
    assert items["a"].error is None


def test_duplicate_stems_and_corrupt_image() -> None:
    fs = yolo_project({"a": "0 0.5 0.5 0.1 0.1\n", "c": "0 0.5 0.5 0.1 0.1\n"}, images=("a",))
    fs.write_bytes("images/a.jpg", png_bytes())
    fs.write_bytes("images/c.png", b"not an image")
    items = list(YoloFormat(fs).iter_items())
    errors = [i.error for i in items if i.error]
    assert any("images/a.png: another image with item id 'a'" in e for e in errors)
    assert any(e.startswith("images/c.png: cannot read image header") for e in errors)


def test_missing_class_list_is_a_usage_error() -> None:
    fs = yolo_project({"a": "0 0.5 0.5 0.1 0.1\n"}, classes=None)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"classes\.txt or data\.yaml"):
        list(YoloFormat(fs).iter_items())


def test_symlink_escaping_the_root_is_an_error_item(tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    root = tmp_path / "proj"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "images" / "x.png").write_bytes(png_bytes())
    (root / "classes.txt").write_text("cat\n")
    (root / "labels" / "x.txt").symlink_to(outside / "x.txt")
    from connectors.storage import ProjectFS

    items = by_id(YoloFormat(ProjectFS(str(root))))
    assert items["x"].error is not None
    assert "labels/x.txt" in items["x"].error and "outside the project root" in items["x"].error


boxes = st.tuples(
    st.integers(0, 1),
    st.floats(0, 30, allow_nan=False),
    st.floats(0, 20, allow_nan=False),
    st.floats(1, 10, allow_nan=False),
    st.floats(1, 10, allow_nan=False),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.lists(boxes, max_size=4), min_size=1, max_size=4),
    st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_round_trip(
    per_item: list[list[tuple[int, float, float, float, float]]], labeled: list[bool]
) -> None:
    names = ["cat", "dog"]
    items = []
    for i, specs in enumerate(per_item):
        annotations = [
            Annotation(label=names[c], box=(x, y, x + w, y + h)) for c, x, y, w, h in specs
        ]
        status = ItemStatus.LABELED if labeled[i] else ItemStatus.UNLABELED
        items.append(
            Item(
                item_id=f"d/i{i}",
                uri=f"images/d/i{i}.png",
                width=40,
                height=30,
                status=status,
                annotations=annotations if labeled[i] else [],
            )
        )
    source = make_project(
        {f"images/d/i{i}.png": png_bytes() for i in range(len(items))}, "yolo-src"
    )
    target = make_project({}, "yolo-dst")
    YoloFormat(target).write_items(items, names, image_root=source)
    back = by_id(YoloFormat(target))
    assert set(back) == {i.item_id for i in items}
    for item in items:
        got = back[item.item_id]
        assert got.error is None and got.status is item.status
        assert [a.label for a in got.annotations] == [a.label for a in item.annotations]
        for a, b in zip(got.annotations, item.annotations, strict=True):
            assert a.box == pytest.approx(b.box, abs=1e-4)


def test_write_items_never_replaces_a_label() -> None:
    fs = yolo_project({"a": "1 0.5 0.5 0.1 0.1\n"})
    item = Item(
        item_id="a",
        uri="images/a.png",
        status=ItemStatus.LABELED,
        annotations=[Annotation(label="cat", box=(1, 1, 5, 5))],
    )
    with pytest.raises(HumanLabelConflict):
        YoloFormat(fs).write_items([item])
    assert fs.read_text("labels/a.txt") == "1 0.5 0.5 0.1 0.1\n"


def provenance(run_id: str = "run1") -> Provenance:
    return Provenance(run_id=run_id, model_version="m1", score=0.9, tier="easy")


def test_write_labels_auto_label_read_back_and_remove() -> None:
    fs = yolo_project({"a": "0 0.5 0.5 0.1 0.1\n"}, images=("a", "b", "c"))
    fmt = YoloFormat(fs)
    items = by_id(fmt)
    box = Annotation(label="dog", box=(4.0, 3.0, 20.0, 15.0), score=0.8)
    writes = [
        LabelWrite(item=items[i], annotations=[box], provenance=provenance())
        for i in ("a", "b", "c")
    ]
    fs.write_text("labels/c.txt", "0 0.5 0.5 0.2 0.2\n")  # a person labels c meanwhile
    outcome = fmt.write_labels(writes)
    assert [r.path for r in outcome.records] == ["labels/b.txt"]
    assert "human label" in outcome.refused["a"]
    assert "labels/c.txt" in outcome.refused["c"] and "not overwritten" in outcome.refused["c"]
    assert fs.read_text("labels/c.txt") == "0 0.5 0.5 0.2 0.2\n"
    assert (
        fs.read_text("labels/b.txt") == "1 0.300000 0.300000 0.400000 0.400000\n"
    )  # 5 columns, 6 decimals, no score
    sidecar = json.loads(fs.read_text(sidecar_path("b")))
    assert sidecar["provenance"]["score"] == 0.9 and sidecar["path"] == "labels/b.txt"

    again = by_id(fmt)
    assert (
        again["b"].status is ItemStatus.AUTO_LABELED and again["b"].source is AnnotationSource.AUTO
    )
    assert again["b"].meta["auto_label"]["run_id"] == "run1"
    assert again["a"].status is ItemStatus.LABELED and again["c"].source is AnnotationSource.HUMAN

    assert fmt.remove_written(outcome.records) == []
    assert not fs.exists("labels/b.txt") and not fs.exists(sidecar_path("b"))
    assert by_id(fmt)["b"].status is ItemStatus.UNLABELED


def test_edited_auto_label_becomes_human_and_survives_removal() -> None:
    fs = yolo_project({}, images=("b",))
    fmt = YoloFormat(fs)
    item = by_id(fmt)["b"]
    outcome = fmt.write_labels(
        [
            LabelWrite(
                item=item,
                annotations=[Annotation(label="cat", box=(4, 3, 20, 15))],
                provenance=provenance(),
            )
        ]
    )
    fs.write_text("labels/b.txt", "1 0.5 0.5 0.2 0.2\n")  # a person corrects it
    assert by_id(fmt)["b"].status is ItemStatus.LABELED
    kept = fmt.remove_written(outcome.records)
    assert len(kept) == 1 and "content changed" in kept[0]
    assert fs.read_text("labels/b.txt") == "1 0.5 0.5 0.2 0.2\n"
    assert by_id(fmt)["b"].source is AnnotationSource.HUMAN


def test_write_labels_refuses_unknown_class() -> None:
    fs = yolo_project({}, images=("b",))
    fmt = YoloFormat(fs)
    outcome = fmt.write_labels(
        [
            LabelWrite(
                item=by_id(fmt)["b"],
                annotations=[Annotation(label="bird", box=(1, 1, 5, 5))],
                provenance=provenance(),
            )
        ]
    )
    assert outcome.records == [] and "class 'bird'" in outcome.refused["b"]
    assert not fs.exists("labels/b.txt")


def predictions_folder(files: dict[str, str]):
    return make_project({"classes.txt": "cat\ndog\n", **files}, "yolo-pred")


def test_predictions_lazy_get_with_item_size() -> None:
    preds = YoloPredictions(predictions_folder({"a.txt": "1 0.5 0.5 0.5 0.5 0.75\n", "b.txt": ""}))
    item = Item(item_id="a", uri="images/a.png", width=40, height=30)
    p = preds.get("a", item)
    assert p is not None and p.error is None
    assert p.annotations == [Annotation(label="dog", box=(10.0, 7.5, 30.0, 22.5), score=0.75)]
    empty = preds.get("b", item)
    assert empty is not None and empty.annotations == []
    assert preds.get("zzz", item) is None


def test_predictions_read_image_size_from_project_and_stream() -> None:
    project = YoloFormat(yolo_project({}))
    preds = YoloPredictions(
        predictions_folder(
            {"a.txt": "0 0.5 0.5 0.5 0.5 0.5\n", "b.txt": "0 0.5 0.5 0.5 0.5 1.5\n"}
        ),
        project=project,
    )
    streamed = {p.item_id: p for p in preds}
    assert set(streamed) == {"a", "b"}
    assert streamed["a"].annotations[0].box == (10.0, 7.5, 30.0, 22.5)
    assert streamed["b"].error == "b.txt:1: confidence 1.5 is outside [0, 1]"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.5 0.5 0.5 0.5", "a.txt:1: expected 6 fields, got 5"),
        ("9 0.5 0.5 0.5 0.5 0.5", "a.txt:1: unknown class id 9 (2 classes are known)"),
        ("0 0.5 0.5 0.5 0.5 x", "a.txt:1: field 6 'x' is not a number"),
    ],
)
def test_bad_prediction_lines(line: str, message: str) -> None:
    preds = YoloPredictions(predictions_folder({"a.txt": line + "\n"}))
    p = preds.get("a", Item(item_id="a", uri="images/a.png", width=40, height=30))
    assert p is not None and p.error == message


def test_prediction_without_size_is_an_error_not_a_crash() -> None:
    preds = YoloPredictions(predictions_folder({"a.txt": "0 0.5 0.5 0.5 0.5 0.5\n"}))
    p = preds.get("a")
    assert p is not None and p.error is not None and "image size unknown" in p.error


def test_run_and_rollback_through_writeback() -> None:
    from connectors.writeback import rollback, write_run

    fs = yolo_project({"a": "0 0.5 0.5 0.1 0.1\n"}, images=("a", "b", "c"))
    fmt = YoloFormat(fs)
    items = by_id(fmt)
    ann = [Annotation(label="cat", box=(4.0, 3.0, 20.0, 15.0))]
    writes = [
        LabelWrite(item=items[i], annotations=ann, provenance=provenance("run-7"))
        for i in ("a", "b", "c")
    ]
    manifest = write_run(fmt, writes, "run-7")
    assert (
        manifest.stage == "committed"
        and manifest.item_ids == ["b", "c"]
        and "a" in manifest.refused
    )
    fs.write_text("labels/c.txt", "1 0.5 0.5 0.2 0.2\n")  # a person corrects c
    result = rollback(fmt, "run-7")
    assert result.removed == ["b"] and "content changed" in result.kept["c"]
    after = by_id(fmt)
    assert after["b"].status is ItemStatus.UNLABELED
    assert (
        after["c"].source is AnnotationSource.HUMAN and after["a"].source is AnnotationSource.HUMAN
    )


def test_written_coordinates_have_six_decimals() -> None:
    from connectors.formats.yolo import render_line

    line = render_line(Annotation(label="dog", box=(1.0, 2.0, 21.3333333, 12.0)), 3, 40, 30)
    assert line == "3 0.279167 0.233333 0.508333 0.333333"

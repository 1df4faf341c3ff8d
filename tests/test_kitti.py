"""KITTI label_2 format: 15 columns, DontCare kept, bad lines, round trips, auto-labels."""

from __future__ import annotations

import pytest
from _fileformat_helpers import make_project, png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.formats.base import LabelWrite, Provenance
from connectors.formats.kitti import KittiFormat
from connectors.model import Annotation, Item, ItemStatus

CAR = "Car 0.00 0 -1.57 5.50 4.00 20.25 18.00 1.50 1.60 3.70 -1.00 1.50 20.00 -1.56"
DONTCARE = "DontCare -1 -1 -10 30.00 2.00 39.00 10.00 -1 -1 -1 -1000 -1000 -1000 -10"


def kitti_project(labels: dict[str, str], images: tuple[str, ...] = ("a", "b")):
    files: dict[str, bytes | str] = {f"images/{s}.png": png_bytes() for s in images}
    files.update({f"labels/{s}.txt": t for s, t in labels.items()})
    return make_project(files, "kitti")


def by_id(fmt: KittiFormat) -> dict[str, Item]:
    return {i.item_id: i for i in fmt.iter_items()}


def test_reads_boxes_and_keeps_dontcare() -> None:
    items = by_id(KittiFormat(kitti_project({"a": f"{CAR}\n{DONTCARE}\n"})))
    a = items["a"]
    assert a.annotations == [
        Annotation(label="Car", box=(5.5, 4.0, 20.25, 18.0)),
        Annotation(label="DontCare", box=(30.0, 2.0, 39.0, 10.0)),
    ]
    assert (a.width, a.height) == (40, 30)
    assert a.meta["kitti"][0] == [
        "0.00",
        "0",
        "-1.57",
        "1.50",
        "1.60",
        "3.70",
        "-1.00",
        "1.50",
        "20.00",
        "-1.56",
    ]
    assert items["b"].status is ItemStatus.UNLABELED


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("Car 0 0 0 1 1 5 5", "labels/a.txt:2: expected 15 fields, got 8"),
        (CAR + " 0.9", "labels/a.txt:2: expected 15 fields, got 16"),
        (CAR.replace("-1.57", "left"), "labels/a.txt:2: field 4 'left' is not a number"),
        (
            CAR.replace("20.25", "45.00"),
            "labels/a.txt:2: box [5.5, 4.0, 45.0, 18.0] ends past the image width 40",
        ),
        (
            CAR.replace("5.50 4.00", "25.00 4.00"),
            "labels/a.txt:2: box [25.0, 4.0, 20.25, 18.0] has zero or negative size",
        ),
    ],
)
def test_bad_lines(line: str, message: str) -> None:
    items = by_id(KittiFormat(kitti_project({"a": f"{CAR}\n{line}\n", "b": CAR + "\n"})))
    assert items["a"].error == message
    assert items["b"].error is None and len(items["b"].annotations) == 1


def test_label_without_image() -> None:
    items = by_id(KittiFormat(kitti_project({"zz": CAR + "\n"})))
    assert items["zz"].error == "labels/zz.txt: label file with no image in images/"


def test_detect_tells_kitti_from_yolo() -> None:
    kitti = kitti_project({"a": CAR + "\n"})
    assert KittiFormat.detect(kitti)
    yolo_like = kitti_project({"a": "0 0.5 0.5 0.1 0.1\n"})
    assert not KittiFormat.detect(yolo_like)
    with_classes = kitti_project({"a": CAR + "\n"})
    with_classes.write_text("classes.txt", "Car\n")
    assert not KittiFormat.detect(with_classes)


def test_round_trip_keeps_3d_fields_byte_for_byte() -> None:
    text = f"{CAR}\n{DONTCARE}\n"
    source = kitti_project({"a": text})
    items = list(KittiFormat(source).iter_items())
    target = make_project({}, "kitti-dst")
    KittiFormat(target).write_items(items, image_root=source)
    assert target.read_text("labels/a.txt") == text  # 2 decimals, as KITTI writes them
    assert (
        by_id(KittiFormat(target))["a"].annotations == by_id(KittiFormat(source))["a"].annotations
    )
    assert not target.exists("labels/b.txt")  # unlabeled stays unlabeled


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Car", "Van", "DontCare"]),
            st.floats(0, 20),
            st.floats(0, 15),
            st.floats(0.5, 19),
            st.floats(0.5, 14),
        ),
        max_size=5,
    )
)
def test_round_trip_property(boxes: list[tuple[str, float, float, float, float]]) -> None:
    item = Item(
        item_id="a",
        uri="images/a.png",
        status=ItemStatus.LABELED,
        annotations=[Annotation(label=n, box=(x, y, x + w, y + h)) for n, x, y, w, h in boxes],
    )
    source = make_project({"images/a.png": png_bytes()}, "kitti-src")
    target = make_project({}, "kitti-dst")
    KittiFormat(target).write_items([item], image_root=source)
    got = by_id(KittiFormat(target))["a"]
    assert got.error is None and [a.label for a in got.annotations] == [
        a.label for a in item.annotations
    ]
    for g, a in zip(got.annotations, item.annotations, strict=True):  # 2 decimals
        assert g.box == pytest.approx(a.box, abs=0.005 + 1e-9)


def test_auto_label_gets_placeholders() -> None:
    fs = kitti_project({})
    fmt = KittiFormat(fs)
    item = by_id(fmt)["a"]
    outcome = fmt.write_labels(
        [
            LabelWrite(
                item=item,
                annotations=[Annotation(label="Car", box=(1, 2, 10, 12), score=0.5)],
                provenance=Provenance(run_id="r", model_version="m"),
            )
        ]
    )
    assert (
        fs.read_text("labels/a.txt")
        == "Car 0.00 0 -10 1.00 2.00 10.00 12.00 -1 -1 -1 -1000 -1000 -1000 -10\n"
    )
    assert by_id(fmt)["a"].status is ItemStatus.AUTO_LABELED
    assert fmt.remove_written(outcome.records) == [] and not fs.exists("labels/a.txt")


def test_written_coordinates_have_two_decimals() -> None:
    fmt = KittiFormat(kitti_project({}))
    item = by_id(fmt)["a"]
    line = fmt.render_label(item, [Annotation(label="Car", box=(1.004, 2.5, 10.3333333, 12.0))])
    assert line == b"Car 0.00 0 -10 1.00 2.50 10.33 12.00 -1 -1 -1 -1000 -1000 -1000 -10\n"

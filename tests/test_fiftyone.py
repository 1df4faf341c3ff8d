"""The FiftyOne connector without FiftyOne: URLs, box conventions, routing, the score hook.

What needs a FiftyOne database (reading samples, writing and rolling back auto-labels,
publishing scores) is in ``tests/integration/test_fiftyone_*.py``.
"""

from __future__ import annotations

import importlib.util
import io
from typing import Any

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from connectors.errors import UsageError
from connectors.formats.fiftyone import (
    content_sha256,
    parse_dataset_url,
    relative_to_xyxy,
    score_field_names,
    xyxy_to_relative,
)
from connectors.formats.imagefolder import ImageFolderFormat
from connectors.project import detect_format, open_predictions, open_project
from connectors.registry import Registry
from connectors.storage import ProjectFS
from difficulty.scoring import score_project

FIFTYONE_INSTALLED = importlib.util.find_spec("fiftyone") is not None


# -- URLs ----------------------------------------------------------------------------------------


def test_dataset_url_gives_the_name_and_the_options() -> None:
    url = parse_dataset_url("fiftyone://road%20signs?label_field=gt", ("label_field",))
    assert url.name == "road signs"
    assert url.options == {"label_field": "gt"}
    assert url.url == "fiftyone://road%20signs"
    assert parse_dataset_url("fiftyone://2026.12.03.quickstart/").name == "2026.12.03.quickstart"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("fiftyone://", "names no dataset"),
        ("fiftyone://?field=x", "names no dataset"),
        ("s3://bucket/x", "not a FiftyOne dataset URL"),
        ("fiftyone://ds?colour=red", "unknown option 'colour'"),
    ],
)
def test_a_bad_dataset_url_is_a_usage_error_naming_it(source: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_dataset_url(source, ("field",))


# -- boxes ---------------------------------------------------------------------------------------


def test_relative_xywh_becomes_pixel_xyxy() -> None:
    assert relative_to_xyxy([0.25, 0.5, 0.5, 0.25], 400, 200) == (100.0, 100.0, 300.0, 150.0)


@pytest.mark.parametrize(
    ("bbox", "size", "message"),
    [
        ([0.1, 0.1, 0.2], (10, 10), r"is not \[x, y, w, h\]"),
        (None, (10, 10), r"is not \[x, y, w, h\]"),
        ([0.1, "a", 0.2, 0.2], (10, 10), "not four numbers"),
        ([0.1, float("nan"), 0.2, 0.2], (10, 10), "non-finite"),
        ([0.5, 0.5, 0.6, 0.1], (100, 100), "ends past the image width 100"),
        ([0.5, 0.5, 0.0, 0.1], (100, 100), "zero or negative size"),
        ([-0.2, 0.1, 0.3, 0.1], (100, 100), "starts outside the image"),
        ([0.1, 0.1, 0.2, 0.2], (None, 100), "image size is unknown"),
    ],
)
def test_a_box_that_cannot_be_converted_says_why(
    bbox: Any, size: tuple[int | None, int | None], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        relative_to_xyxy(bbox, *size)


@given(
    width=st.integers(1, 4000),
    height=st.integers(1, 4000),
    a=st.floats(0, 1),
    b=st.floats(0, 1),
    c=st.floats(0, 1),
    d=st.floats(0, 1),
)
def test_pixel_and_relative_boxes_round_trip(
    width: int, height: int, a: float, b: float, c: float, d: float
) -> None:
    x1, x2 = sorted((a * width, c * width))
    y1, y2 = sorted((b * height, d * height))
    if x2 - x1 < 1e-6 or y2 - y1 < 1e-6:
        return
    rel = xyxy_to_relative((x1, y1, x2, y2), width, height)
    assert all(0.0 <= v <= 1.0 for v in rel)
    back = relative_to_xyxy(rel, width, height)
    assert back == pytest.approx((x1, y1, x2, y2), abs=1e-6)


def test_a_box_slightly_past_the_edge_is_clipped_when_written() -> None:
    assert xyxy_to_relative((90.0, 0.0, 100.5, 10.0), 100, 100) == pytest.approx(
        [0.9, 0.0, 0.1, 0.1]
    )
    with pytest.raises(ValueError, match="ends past the image width"):
        xyxy_to_relative((90.0, 0.0, 120.0, 10.0), 100, 100)


# -- names and checksums ---------------------------------------------------------------------------


def test_score_fields_carry_the_prefix_and_never_collide() -> None:
    names = score_field_names("lt_", ["fourier", "box-count", "difficulty"])
    assert names["score"] == "lt_difficulty"
    assert names["tier"] == "lt_tier"
    assert names["fourier"] == "lt_fourier"
    assert names["box-count"] == "lt_box_count"
    assert names["difficulty"] == "lt_scorer_difficulty"
    assert len(set(names.values())) == len(names)


def test_label_checksum_ignores_key_order_and_sees_any_edit() -> None:
    a = {"label": "stop", "bounding_box": [0.1, 0.2, 0.3, 0.4], "lt_run_id": "r1"}
    b = dict(reversed(list(a.items())))
    assert content_sha256(a) == content_sha256(b)
    assert content_sha256(a) != content_sha256({**a, "bounding_box": [0.1, 0.2, 0.3, 0.41]})


# -- routing ---------------------------------------------------------------------------------------


def test_a_fiftyone_source_in_another_format_is_refused() -> None:
    with pytest.raises(UsageError, match="is a FiftyOne dataset: use format fiftyone"):
        open_project("fiftyone://roads", "voc")
    with pytest.raises(UsageError, match="is a FiftyOne dataset: use format fiftyone"):
        open_predictions("fiftyone://roads", "yolo")


@pytest.mark.skipif(FIFTYONE_INSTALLED, reason="fiftyone is installed here: nothing is missing")
def test_without_fiftyone_the_source_says_how_to_install_it() -> None:
    with pytest.raises(UsageError, match=r"pip install 'labeltriage\[fiftyone\]'"):
        open_project("fiftyone://roads")
    with pytest.raises(UsageError, match=r"pip install 'labeltriage\[fiftyone\]'"):
        open_predictions("fiftyone://roads", "auto")


def _png(width: int = 24, height: int = 16, shade: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (shade, shade, shade)).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_detection_never_asks_the_fiftyone_format(
    mem: ProjectFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    mem.write_bytes("cats/a.png", _png())
    mem.write_bytes("dogs/b.png", _png())
    asked: list[str] = []
    real = Registry.__getitem__

    def spy(self: Registry[Any], name: str) -> Any:
        asked.append(name)
        return real(self, name)

    monkeypatch.setattr(Registry, "__getitem__", spy)
    assert detect_format(mem) == "imagefolder"
    assert "imagefolder" in asked and "fiftyone" not in asked  # (it would import FiftyOne)


# -- the score hook ----------------------------------------------------------------------------------


class PublishingFolder(ImageFolderFormat):
    """An image folder that records what scoring publishes to it."""

    published: list[tuple[pd.DataFrame, dict[str, Any]]]

    def publish_scores(self, table: pd.DataFrame, meta: dict[str, Any]) -> None:
        self.published.append((table.copy(), dict(meta)))


def test_scoring_publishes_the_table_to_a_format_that_can_show_it(
    mem: ProjectFS, tmp_path: Any
) -> None:
    for i in range(6):
        mem.write_bytes(f"{'cats' if i % 2 else 'dogs'}/img{i}.png", _png(shade=40 * i))
    mem.write_bytes("cats/broken.png", b"not a png")
    project = PublishingFolder(mem)
    project.published = []
    result = score_project(project, out_dir=str(tmp_path), num_workers=0, run_id="run-1")
    assert len(project.published) == 1
    table, meta = project.published[0]
    assert meta["run_id"] == "run-1"
    assert meta["scorers"] == result.meta["scorers"]
    assert list(table["item_id"]) == [it.item_id for it in project.iter_items()]
    assert table.set_index("item_id")["tier"].equals(result.table.set_index("item_id")["tier"])
    assert table.set_index("item_id").loc["cats/broken", "error"]

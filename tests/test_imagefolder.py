"""Image-folder classification format: classes from folders, unlabeled pool, copy-based auto-labels."""

from __future__ import annotations

import pytest
from _fileformat_helpers import make_project, png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.errors import UsageError
from connectors.formats.base import LabelWrite, Provenance, sidecar_path
from connectors.formats.imagefolder import ImageFolderFormat
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus


def folder_project(unlabeled_dir: str = "_unlabeled"):
    return make_project(
        {
            "cat/1.png": png_bytes(),
            "cat/2.jpg": png_bytes(8, 8),
            "dog/1.png": png_bytes(),
            "dog/notes.txt": "not an image",
            f"{unlabeled_dir}/u1.png": png_bytes(12, 12),
            f"{unlabeled_dir}/u2.png": png_bytes(13, 13),
            "readme.png": png_bytes(),  # images in the root are not items
        },
        "imgf",
    )


def by_id(fmt: ImageFolderFormat) -> dict[str, Item]:
    return {i.item_id: i for i in fmt.iter_items()}


def test_reads_classes_and_unlabeled() -> None:
    fmt = ImageFolderFormat(folder_project())
    items = by_id(fmt)
    assert sorted(items) == ["_unlabeled/u1", "_unlabeled/u2", "cat/1", "cat/2", "dog/1"]
    assert items["cat/1"].class_label == "cat" and items["cat/1"].annotations[0].box is None
    assert (
        items["dog/1"].status is ItemStatus.LABELED
        and items["dog/1"].source is AnnotationSource.HUMAN
    )
    assert (
        items["_unlabeled/u1"].status is ItemStatus.UNLABELED
        and items["_unlabeled/u1"].annotations == []
    )
    assert fmt.classes == ["cat", "dog"]


def test_unlabeled_dir_is_configurable() -> None:
    items = by_id(ImageFolderFormat(folder_project("pool"), unlabeled_dir="pool"))
    assert items["pool/u1"].status is ItemStatus.UNLABELED
    as_class = by_id(ImageFolderFormat(folder_project("pool")))
    assert as_class["pool/u1"].class_label == "pool"
    with pytest.raises(UsageError):
        ImageFolderFormat(folder_project(), unlabeled_dir="a/b")


def test_duplicate_stem_is_an_error_item() -> None:
    fs = folder_project()
    fs.write_bytes("cat/1.jpg", png_bytes())
    errors = [i.error for i in ImageFolderFormat(fs).iter_items() if i.error]
    assert len(errors) == 1 and errors[0].startswith(
        "cat/1.png: another image with item id 'cat/1'"
    )


def test_detect() -> None:
    assert ImageFolderFormat.detect(folder_project())
    voc_like = make_project({"images/a.png": png_bytes(), "annotations/a.xml": "<annotation/>"})
    assert not ImageFolderFormat.detect(voc_like)
    coco_like = make_project({"cat/a.png": png_bytes(), "coco.json": "{}"})
    assert not ImageFolderFormat.detect(coco_like)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["cat", "dog", None]), min_size=1, max_size=6))
def test_round_trip(labels: list[str | None]) -> None:
    items = []
    files: dict[str, bytes | str] = {}
    for i, label in enumerate(labels):
        folder = label or "_unlabeled"
        files[f"{folder}/im{i}.png"] = png_bytes(10 + i, 10)
        annotations = [Annotation(label=label)] if label else []
        status = ItemStatus.LABELED if label else ItemStatus.UNLABELED
        items.append(
            Item(
                item_id=f"{folder}/im{i}",
                uri=f"{folder}/im{i}.png",
                status=status,
                annotations=annotations,
            )
        )
    source = make_project(files, "imgf-src")
    target = make_project({}, "imgf-dst")
    ImageFolderFormat(target).write_items(items, image_root=source)
    back = by_id(ImageFolderFormat(target))
    assert {k: (v.status, v.class_label) for k, v in back.items()} == {
        i.item_id: (i.status, i.class_label) for i in items
    }
    for item in items:
        assert target.read_bytes(item.uri) == source.read_bytes(item.uri)


def test_auto_label_copies_hides_original_and_rolls_back() -> None:
    fs = folder_project()
    fmt = ImageFolderFormat(fs)
    items = by_id(fmt)
    prov = Provenance(run_id="r1", model_version="m", score=0.95)
    writes = [
        LabelWrite(
            item=items["_unlabeled/u1"],
            annotations=[Annotation(label="dog", score=0.9)],
            provenance=prov,
        ),
        LabelWrite(
            item=items["_unlabeled/u2"], annotations=[Annotation(label="bird")], provenance=prov
        ),
        LabelWrite(item=items["cat/1"], annotations=[Annotation(label="dog")], provenance=prov),
    ]
    outcome = fmt.write_labels(writes)
    assert [(r.path, r.item_id) for r in outcome.records] == [("dog/u1.png", "_unlabeled/u1")]
    assert (
        "class 'bird'" in outcome.refused["_unlabeled/u2"]
        and "labeled already" in outcome.refused["cat/1"]
    )
    assert fs.read_bytes("dog/u1.png") == fs.read_bytes(
        "_unlabeled/u1.png"
    )  # copied, original kept

    after = by_id(fmt)
    assert "dog/u1" not in after  # the copy stands for the original item, under the original id
    u1 = after["_unlabeled/u1"]
    assert (
        u1.status is ItemStatus.AUTO_LABELED and u1.uri == "dog/u1.png" and u1.class_label == "dog"
    )
    assert len(after) == len(items)

    assert fmt.remove_written(outcome.records) == []
    assert (
        not fs.exists("dog/u1.png")
        and fs.exists("_unlabeled/u1.png")
        and not fs.exists(sidecar_path("_unlabeled/u1"))
    )
    assert by_id(fmt)["_unlabeled/u1"].status is ItemStatus.UNLABELED


def test_target_that_exists_is_refused() -> None:
    fs = folder_project()
    fs.write_bytes("dog/u1.png", png_bytes(99, 99))
    fmt = ImageFolderFormat(fs)
    outcome = fmt.write_labels(
        [
            LabelWrite(
                item=by_id(fmt)["_unlabeled/u1"],
                annotations=[Annotation(label="dog")],
                provenance=Provenance(run_id="r", model_version="m"),
            )
        ]
    )
    assert outcome.records == [] and "exists already" in outcome.refused["_unlabeled/u1"]
    assert fs.read_bytes("dog/u1.png") == png_bytes(99, 99)

"""The image stream: order, errors, laziness, workers, and scoring through it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from connectors.errors import UsageError
from connectors.model import Item
from connectors.storage import ProjectFS
from difficulty.fourier import high_frequency_ratio, spectral_entropy
from difficulty.imageio import decode_gray
from difficulty.imagestream import (
    ImageBatch,
    ImageScores,
    fix_mmap_threshold,
    image_plan,
    iter_image_batches,
    iter_image_scores,
    score_images,
)


def _picture(seed: int, width: int = 96, height: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = Image.fromarray((40 + 150 * xx / width + 30 * yy / height).astype(np.uint8)).convert(
        "RGB"
    )
    draw = ImageDraw.Draw(image)
    for _ in range(seed % 7 + 1):
        x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.rectangle(
            [x0, y0, x0 + int(rng.integers(3, 30)), y0 + int(rng.integers(3, 30))], fill=colour
        )
    return image


@pytest.fixture()
def project(tmp_path: Path) -> tuple[ProjectFS, list[Item]]:
    """Eleven items: PNGs and JPEGs, one corrupt, one missing, one already broken, one escape,
    and one given by a full ``file://`` URL."""
    root = tmp_path / "proj"
    (root / "images").mkdir(parents=True)
    items: list[Item] = []
    for i in range(7):
        name = f"images/{i:02d}.{'png' if i % 2 else 'jpg'}"
        _picture(i).save(root / name)
        items.append(Item(item_id=f"it{i}", uri=name))
    (root / "images" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    items.insert(2, Item(item_id="corrupt", uri="images/bad.jpg"))
    items.insert(4, Item(item_id="missing", uri="images/gone.png"))
    items.insert(
        5, Item(item_id="broken", uri="images/00.jpg", error="annotations/00.xml: malformed XML")
    )
    items.append(Item(item_id="escape", uri="../outside.png"))
    outside = tmp_path / "elsewhere.png"
    _picture(99).save(outside)
    items.append(Item(item_id="url", uri=outside.as_uri()))
    fs = ProjectFS(str(root))
    fs.allow_image_hosts = (tmp_path.as_uri(),)  # the image-source policy allows it explicitly
    return fs, items


def _collect(batches: Iterator[ImageBatch]) -> list[ImageBatch]:
    return list(batches)


def test_batches_keep_input_order_and_report_errors(project: tuple[ProjectFS, list[Item]]) -> None:
    fs, items = project
    batches = _collect(iter_image_batches(items, fs, size=32, batch_size=3, num_workers=0))
    assert [len(b) for b in batches] == [3, 3, 3, 3]
    assert [i for b in batches for i in b.order] == [item.item_id for item in items]
    decoded = [i for b in batches for i in b.item_ids]
    assert decoded == [f"it{i}" for i in range(7)] + ["url"]
    errors = {k: v for b in batches for k, v in b.errors.items()}
    assert set(errors) == {"corrupt", "missing", "broken", "escape"}
    assert "images/bad.jpg" in errors["corrupt"] and "corrupt" in errors["corrupt"]
    assert "images/gone.png" in errors["missing"] and "missing" in errors["missing"]
    assert errors["broken"] == "annotations/00.xml: malformed XML"
    assert "../outside.png" in errors["escape"]
    for batch in batches:
        assert batch.images.shape == (len(batch.item_ids), 32, 32)
        assert batch.images.dtype == torch.float32


def test_decoded_pixels_are_decode_gray_of_the_file(project: tuple[ProjectFS, list[Item]]) -> None:
    fs, items = project
    batches = _collect(iter_image_batches(items, fs, size=40, batch_size=4, num_workers=0))
    rows = {i: img for b in batches for i, img in zip(b.item_ids, b.images, strict=True)}
    for item in items:
        if item.item_id in rows and "://" not in item.uri:
            expected = decode_gray(fs.read_bytes(item.uri), size=40)
            assert torch.equal(rows[item.item_id], expected)


def test_workers_give_identical_output(project: tuple[ProjectFS, list[Item]]) -> None:
    fs, items = project
    many = [
        item.model_copy(update={"item_id": f"{item.item_id}-{k}"})
        for k in range(3)
        for item in items
    ]
    serial = _collect(iter_image_batches(many, fs, size=32, batch_size=4, num_workers=0))
    parallel = _collect(iter_image_batches(iter(many), fs, size=32, batch_size=4, num_workers=2))
    assert len(serial) == len(parallel) == 9
    for a, b in zip(serial, parallel, strict=True):
        assert a.order == b.order
        assert a.item_ids == b.item_ids
        assert a.errors == b.errors
        assert torch.equal(a.images, b.images)


def test_items_are_pulled_lazily() -> None:
    pulled = 0

    def stream() -> Iterator[Item]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield Item(item_id=f"x{i}", uri=f"missing/{i}.png")

    batches = iter_image_batches(
        stream(), ProjectFS("memory://lazy-stream-test"), batch_size=8, num_workers=0
    )
    first = next(batches)
    assert len(first) == 8
    assert pulled <= 16
    batches.close()


def test_items_are_pulled_lazily_with_workers() -> None:
    pulled = 0

    def stream() -> Iterator[Item]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield Item(item_id=f"x{i}", uri=f"missing/{i}.png")

    batches = iter_image_batches(
        stream(), ProjectFS("memory://lazy-stream-test"), batch_size=8, num_workers=2
    )
    next(batches)
    # At most prefetch_factor (2) × num_workers (2) chunks in flight, plus the one returned.
    assert pulled <= 8 * 6
    batches.close()


def test_memory_project_and_all_errors_batch() -> None:
    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    _picture(3).save(buf, "PNG")
    fs.pipe_file("/mem-stream-test/a.png", buf.getvalue())
    try:
        project = ProjectFS("memory://mem-stream-test")
        items = [Item(item_id="gone", uri="nope.png"), Item(item_id="a", uri="a.png")]
        batches = _collect(iter_image_batches(items, project, size=16, batch_size=1, num_workers=0))
        assert batches[0].images.shape == (0, 16, 16) and batches[0].item_ids == []
        assert "nope.png" in batches[0].errors["gone"]
        assert batches[1].item_ids == ["a"] and batches[1].images.shape == (1, 16, 16)
    finally:
        fs.rm("/mem-stream-test", recursive=True)


def test_progress_bar_goes_to_stderr(
    project: tuple[ProjectFS, list[Item]], capsys: pytest.CaptureFixture[str]
) -> None:
    fs, items = project
    _collect(iter_image_batches(items, fs, size=16, batch_size=5, num_workers=0, progress=True))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "12img" in captured.err.replace(" ", "")


@pytest.mark.parametrize(("field", "value"), [("size", 0), ("batch_size", 0), ("num_workers", -1)])
def test_bad_stream_arguments_are_usage_errors(field: str, value: int) -> None:
    with pytest.raises(UsageError, match=str(value)):
        iter_image_batches([], None, **{field: value})


def test_score_images_matches_direct_computation(project: tuple[ProjectFS, list[Item]]) -> None:
    fs, items = project
    rows = list(
        score_images(
            items,
            fs,
            ["fourier", "fourier_entropy"],
            {"fourier": {"cutoff": 0.2}},
            batch_size=4,
            num_workers=0,
        )
    )
    assert [r[0] for r in rows] == [item.item_id for item in items]
    by_id = {item_id: (values, error) for item_id, values, error in rows}
    for item in items:
        values, error = by_id[item.item_id]
        if item.item_id in {"corrupt", "missing", "broken", "escape"}:
            assert values == {} and error
            continue
        assert error is None
        image = decode_gray(
            fsspec.open(item.uri).open().read() if "://" in item.uri else fs.read_bytes(item.uri)
        )
        assert values["fourier"] == pytest.approx(
            float(high_frequency_ratio(image[None], cutoff=0.2)[0]), abs=1e-6
        )
        assert values["fourier_entropy"] == pytest.approx(
            float(spectral_entropy(image[None])[0]), abs=1e-6
        )
        assert 0.0 <= values["fourier"] <= 1.0


def test_score_images_same_with_workers(project: tuple[ProjectFS, list[Item]]) -> None:
    fs, items = project
    serial = list(score_images(items, fs, batch_size=3, num_workers=0))
    parallel = list(score_images(items, fs, batch_size=3, num_workers=2))
    assert serial == parallel


def test_score_images_validates_scorers_and_settings(project: tuple[ProjectFS, list[Item]]) -> None:
    fs, items = project
    with pytest.raises(UsageError, match="fourirer"):
        score_images(items, fs, ["fourirer"])
    with pytest.raises(UsageError, match=r"fourier.*cutoff"):
        score_images(items, fs, ["fourier"], {"fourier": {"cutoff": 3}})
    with pytest.raises(UsageError, match="decode size"):
        sizes = {"fourier": {"size": 64}, "fourier_entropy": {"size": 32}}
        score_images(items, fs, ["fourier", "fourier_entropy"], sizes)
    with pytest.raises(UsageError, match="decode size"):
        score_images(items, fs, ["fourier"], {"fourier": {"size": 32}}, size=64)
    with pytest.raises(UsageError, match="batch size"):
        score_images(items, fs, ["fourier"], batch_size=0)
    with pytest.raises(UsageError, match="no scorers"):
        score_images(items, fs, [])


@pytest.mark.parametrize(
    ("settings", "kwargs"),
    [
        ({"fourier": {"size": 32}, "fourier_entropy": {"size": 32}}, {}),
        ({"fourier": {"size": 32}}, {}),
        (None, {"size": 32}),
    ],
)
def test_score_images_size_from_settings_or_argument(
    project: tuple[ProjectFS, list[Item]],
    settings: dict[str, dict[str, int]] | None,
    kwargs: dict[str, int],
) -> None:
    fs, items = project
    scorers = ["fourier", "fourier_entropy"]
    rows = list(score_images(items[:2], fs, scorers, settings, num_workers=0, **kwargs))
    image = decode_gray(fs.read_bytes(items[0].uri), size=32)
    expected = float(high_frequency_ratio(image[None])[0])
    assert rows[0][1]["fourier"] == pytest.approx(expected, abs=1e-6)


def test_real_road_signs_stream_through_workers(road_signs: Path) -> None:
    fs = ProjectFS(str(road_signs))
    names = sorted(p.name for p in (road_signs / "images").glob("*.jpg"))[:60]
    items = (Item(item_id=name, uri=f"images/{name}") for name in names)
    rows = list(
        score_images(items, fs, ["fourier", "fourier_entropy"], batch_size=16, num_workers=2)
    )
    assert [r[0] for r in rows] == names
    assert all(error is None for _, _, error in rows)
    ratios = np.array([values["fourier"] for _, values, _ in rows])
    assert np.all((ratios > 0) & (ratios < 1))
    assert ratios.std() > 0


# -- one set of workers, scorers in the workers, remote filesystems --------------------------


def _pid(images: torch.Tensor) -> np.ndarray:
    """The process that scored each image."""
    import os

    return np.full(len(images), float(os.getpid()))


def test_scorers_run_in_the_same_two_workers_for_the_whole_stream(
    project: tuple[ProjectFS, list[Item]],
) -> None:
    import os

    fs, items = project
    many = [
        it.model_copy(update={"item_id": f"{it.item_id}-{k}"}) for k in range(6) for it in items
    ]
    plan = [("pid", _pid, {})]
    batches = iter_image_scores(many, fs, plan, size=32, batch_size=2, num_workers=2)
    rows = [row for batch in batches for row in batch.per_item()]
    pids = {values["pid"] for _, values, error in rows if error is None}
    assert len(rows) == len(many) and len(pids) == 2 and float(os.getpid()) not in pids


def test_scores_come_back_without_pixels(project: tuple[ProjectFS, list[Item]]) -> None:
    fs, items = project
    plan, size = image_plan(["fourier"], None, 32)
    batches = list(iter_image_scores(items, fs, plan, size=size, batch_size=4, num_workers=0))
    assert all(isinstance(b, ImageScores) and not hasattr(b, "images") for b in batches)
    assert all(b.values["fourier"].shape == (len(b.item_ids),) for b in batches if b.item_ids)


def test_a_forked_worker_opens_a_remote_filesystem_anew() -> None:
    from difficulty.imagestream import _DecodeTasks

    fs = ProjectFS("memory://fork-reopen-test")
    fs.is_local = False  # stands for s3://…: its event loop cannot cross a fork
    dataset = _DecodeTasks(fs, 16, 4, None)
    assert dataset._project() is fs  # same process: the same object
    dataset._pid = -1  # as seen from a forked child
    reopened = dataset._project()
    assert reopened is not fs and reopened.url == fs.url
    local = _DecodeTasks(ProjectFS("."), 16, 4, None)
    local._pid = -1
    assert local._project() is local.project  # local files need no new filesystem


def test_mmap_threshold_is_fixed_on_linux() -> None:
    import sys

    assert fix_mmap_threshold() is sys.platform.startswith("linux")

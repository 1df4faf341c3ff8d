"""Reduced-size grayscale decoding: shapes, values, orientation, and every way to fail."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from connectors.errors import InputError
from connectors.storage import ProjectFS
from difficulty.imageio import decode_gray, decode_gray_array, read_image_bytes, read_image_size


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _halves(width: int, height: int) -> Image.Image:
    """Left half black, right half white (RGB)."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, width // 2 :] = 255
    return Image.fromarray(array)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "PNG"),
        ("RGBA", "PNG"),
        ("L", "PNG"),
        ("P", "PNG"),
        ("LA", "PNG"),
        ("RGB", "JPEG"),
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("RGB", "BMP"),
    ],
)
def test_decode_gray_shape_dtype_range(mode: str, fmt: str) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)).convert(mode)
    out = decode_gray(_encode(image, fmt), size=64)
    assert out.shape == (64, 64)
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.std()) > 0.01


def test_uniform_colour_gives_its_luma() -> None:
    r, g, b = 200, 100, 50
    image = Image.new("RGB", (40, 30), (r, g, b))
    out = decode_gray(_encode(image, "PNG"), size=16)
    luma = (299 * r + 587 * g + 114 * b) / 1000 / 255
    assert torch.allclose(out, torch.full((16, 16), luma), atol=1 / 255)


def test_sixteen_bit_png_is_scaled_to_unit_range() -> None:
    array = np.full((20, 30), 65535 // 4, dtype=np.uint16)
    array[:, 15:] = 65535
    image = Image.fromarray(array)
    out = decode_gray(_encode(image, "PNG"), size=30)
    assert float(out[:, :10].mean()) == pytest.approx(0.25, abs=0.01)
    assert float(out[:, -10:].mean()) == pytest.approx(1.0, abs=0.01)


def test_aspect_ratio_is_stretched_not_cropped() -> None:
    # A 300×100 picture whose outer thirds are white: a centre crop would lose them.
    array = np.zeros((100, 300), dtype=np.uint8)
    array[:, :100] = 255
    array[:, 200:] = 255
    out = decode_gray(_encode(Image.fromarray(array), "PNG"), size=30)
    assert float(out[:, :8].mean()) > 0.95
    assert float(out[:, 12:18].mean()) < 0.05
    assert float(out[:, -8:].mean()) > 0.95


def test_jpeg_reduced_decode_matches_full_decode() -> None:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:720, 0:1280]
    base = (np.sin(x / 37.0) + np.cos(y / 23.0)) * 60 + 128 + rng.normal(0, 5, (720, 1280))
    data = _encode(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)), "JPEG", quality=90)
    reduced = decode_gray(data, size=128)
    full = Image.open(io.BytesIO(data)).convert("L").resize((128, 128), Image.Resampling.BILINEAR)
    reference = torch.from_numpy(np.asarray(full, dtype=np.float32) / 255)
    assert float((reduced - reference).abs().mean()) < 0.02


@pytest.mark.parametrize(("width", "height", "size"), [(64, 32, 32), (1024, 512, 128)])
def test_exif_rotated_jpeg_decodes_rotated(width: int, height: int, size: int) -> None:
    # Orientation 6: the stored picture must be turned 90° clockwise for display, so the
    # black left half ends up at the top.  The large case also goes through draft().
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(_halves(width, height), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_gray(data, size=size)
    quarter = size // 4
    assert float(out[:quarter].mean()) < 0.1
    assert float(out[-quarter:].mean()) > 0.9
    assert float(out[:, :quarter].mean()) == pytest.approx(
        float(out[:, -quarter:].mean()), abs=0.05
    )
    assert read_image_size(data) == (width, height)
    assert read_image_size(data, oriented=True) == (height, width)


def test_unrotated_jpeg_keeps_left_right() -> None:
    out = decode_gray(_encode(_halves(64, 32), "JPEG", quality=95), size=32)
    assert float(out[:, :8].mean()) < 0.1
    assert float(out[:, -8:].mean()) > 0.9


@pytest.mark.parametrize("orientation", [None, 1, 3, 6, 8])
@pytest.mark.parametrize(("mode", "fmt"), [("RGB", "JPEG"), ("L", "PNG"), ("P", "PNG")])
def test_decoding_into_a_buffer_row_gives_the_same_bits(
    orientation: int | None, mode: str, fmt: str
) -> None:
    """The workers decode into rows of one batch buffer; the values must be exactly those
    :func:`decode_gray` returns, for turned and unturned pictures of every path."""
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    data = _encode(_halves(96, 40).convert(mode), fmt, exif=exif.tobytes())
    buffer = np.full((3, 32, 32), -1.0, dtype=np.float32)
    written = decode_gray_array(data, size=32, out=buffer[1])
    assert written is buffer[1] or np.shares_memory(written, buffer[1])
    expected = decode_gray(data, size=32).numpy()
    assert buffer[1].tobytes() == expected.tobytes()
    assert (buffer[0] == -1).all() and (buffer[2] == -1).all()


def test_read_image_size_from_header() -> None:
    assert read_image_size(_encode(Image.new("RGB", (123, 45)), "JPEG")) == (123, 45)
    assert read_image_size(_encode(Image.new("L", (7, 300)), "PNG")) == (7, 300)


def test_corrupt_bytes_name_file_and_item() -> None:
    with pytest.raises(InputError) as info:
        decode_gray(b"this is not an image at all", name="images/a.jpg", item="item-7")
    assert info.value.file == "images/a.jpg"
    assert info.value.item == "item-7"
    assert "images/a.jpg" in str(info.value) and "item-7" in str(info.value)


def test_truncated_jpeg_is_an_input_error() -> None:
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    data = _encode(image, "JPEG", quality=90)
    with pytest.raises(InputError, match=r"images/cut\.jpg: item 'cut'"):
        decode_gray(data[: len(data) // 2], name="images/cut.jpg", item="cut")


def test_truncated_png_is_an_input_error() -> None:
    rng = np.random.default_rng(3)
    data = _encode(Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)), "PNG")
    with pytest.raises(InputError, match=r"cut\.png"):
        decode_gray(data[: len(data) // 2], name="cut.png", item="cut")


def test_empty_bytes_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"empty\.png"):
        decode_gray(b"", name="empty.png")


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    return struct.pack(">I", len(payload)) + kind + payload + crc


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width``×``height`` grey pixels (almost no data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_from_the_header() -> None:
    data = _png_header_only(100_000, 100_000)
    with pytest.raises(InputError, match=r"bomb\.png: item 'b'.*(bomb|MAX_IMAGE_PIXELS|pixels)"):
        decode_gray(data, name="bomb.png", item="b")
    with pytest.raises(InputError, match=r"bomb\.png"):
        read_image_size(data, name="bomb.png")


def test_image_over_the_pixel_limit_is_an_error_not_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Between the limit and twice the limit Pillow only warns; here it is an error.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60 * 60)
    data = _encode(Image.new("L", (70, 70), 128), "PNG")
    with pytest.raises(InputError, match=r"70×70.*MAX_IMAGE_PIXELS"):
        decode_gray(data, name="big.png", item="big")
    small = _encode(Image.new("L", (50, 50), 128), "PNG")
    assert decode_gray(small, size=16).shape == (16, 16)


def test_missing_file_names_file_and_item(tmp_path: Path) -> None:
    project = ProjectFS(str(tmp_path))
    with pytest.raises(InputError) as info:
        read_image_bytes("images/none.jpg", project, item="n1")
    assert "images/none.jpg" in str(info.value) and "n1" in str(info.value)


def test_path_outside_project_names_item(tmp_path: Path) -> None:
    project = ProjectFS(str(tmp_path / "root"))
    with pytest.raises(InputError, match=r"item 'x'"):
        read_image_bytes("../secret.jpg", project, item="x")


def test_full_url_is_read_only_where_the_policy_allows(tmp_path: Path) -> None:
    data = _encode(Image.new("L", (8, 8), 10), "PNG")
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/imageio-test/a.png", data)
    try:
        project = ProjectFS(str(tmp_path))
        with pytest.raises(InputError, match=r"outside the project's storage.*allow_image_hosts"):
            read_image_bytes("memory://imageio-test/a.png", project, item="a")
        with pytest.raises(InputError, match=r"without a project"):
            read_image_bytes("memory://imageio-test/a.png", None)
        project.allow_image_hosts = ("memory://imageio-test/",)
        assert read_image_bytes("memory://imageio-test/a.png", project) == data
        with pytest.raises(InputError, match=r"memory://imageio-test/missing\.png"):
            read_image_bytes("memory://imageio-test/missing.png", project, item="m")
        inside = ProjectFS("memory://imageio-test")  # a full URL inside the project's own storage
        assert read_image_bytes("memory://imageio-test/a.png", inside) == data
    finally:
        fs.rm("/imageio-test", recursive=True)


def test_file_urls_and_other_hosts_are_item_errors(tmp_path: Path) -> None:
    """A task pointing at a local file or an internal server is refused, naming the item."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(_encode(Image.new("L", (8, 8), 10), "PNG"))
    root = tmp_path / "project"
    (root / "images").mkdir(parents=True)
    (root / "images" / "in.png").write_bytes(secret.read_bytes())
    project = ProjectFS(str(root))
    for uri in (
        secret.as_uri(),
        f"file://{root}/../secret.png",
        "http://127.0.0.1:9/api/users",
        "http://user:hunter2@169.254.169.254/latest/meta-data",
    ):
        with pytest.raises(InputError, match=r"item 'x'.*refused") as err:
            read_image_bytes(uri, project, item="x")
        assert "hunter2" not in str(err.value)
    assert read_image_bytes((root / "images" / "in.png").as_uri(), project) == secret.read_bytes()
    project.allow_image_hosts = (secret.parent.as_uri(),)
    assert read_image_bytes(secret.as_uri(), project) == secret.read_bytes()
    project.allow_image_hosts = ("cdn.example.com",)
    with pytest.raises(InputError, match="refused"):
        read_image_bytes(secret.as_uri(), project, item="x")


def test_real_road_signs_images_decode(road_signs: Path) -> None:
    paths = sorted((road_signs / "images").glob("*.jpg"))[:25]
    assert len(paths) == 25
    project = ProjectFS(str(road_signs))
    for path in paths:
        rel = f"images/{path.name}"
        data = read_image_bytes(rel, project, item=path.stem)
        width, height = read_image_size(data)
        assert 0 < width <= 400 and 0 < height <= 400
        out = decode_gray(data, size=128, name=rel, item=path.stem)
        assert out.shape == (128, 128)
        assert float(out.std()) > 0.02, f"{rel} decoded flat"

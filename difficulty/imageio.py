"""Reduced-size grayscale image decoding for the image scorers.

:func:`decode_gray` turns the bytes of one image file into a ``(size, size)`` float32
tensor in ``[0, 1]``, as cheaply as the format allows:

* **Reduced-size decode.**  For JPEG, ``Image.draft("L", (size, size))`` asks libjpeg to
  decode straight to luminance at 1/2, 1/4 or 1/8 scale (DCT scaling), choosing the
  smallest scale whose result is still at least ``size`` pixels on both sides, so the
  final resize only ever shrinks (or enlarges a picture that is smaller than ``size``).
  A 1280×720 JPEG is decoded at 320×180, about 10× less work than a full decode.
  Other formats (PNG, BMP, TIFF, …) are decoded in full and then reduced.
  (simplejpeg's ``decode_jpeg(colorspace="GRAY", min_width=…, min_height=…)`` was
  measured against this path on the same images: within a few per cent on 1280×720
  frames, about 15% faster on 400×300 ones, identical output; not worth a second
  decoder plus separate EXIF handling.)
* **EXIF orientation** is applied (``ImageOps.exif_transpose``) after the reduced
  decode; the orientation tag survives ``draft`` and a transpose is exact at any scale.
* **Grayscale**: 8-bit modes are converted with Pillow's ITU-R 601-2 luma
  (``L = 0.299 R + 0.587 G + 0.114 B``); alpha is dropped, palettes are expanded;
  16-bit images (``I;16*``, ``I``) are scaled by ``1/65535``, float images (``F``) are
  clipped to ``[0, 1]``.
* **Resize to ``size``×``size``, aspect ratio NOT preserved** (the picture is stretched).
  The Fourier scorers need one fixed grid per batch; a centre crop would throw away the
  clutter at the borders, and padding would add an artificial edge (a strong
  high-frequency step) inside the window.  Stretching keeps every pixel's content; it
  rescales frequencies along one axis by the aspect ratio, the same for every item of
  a project with one camera.  The filter is Pillow's antialiased bilinear.
* **Decompression-bomb guard**: an image whose header declares more than
  ``PIL.Image.MAX_IMAGE_PIXELS`` pixels is refused with an :class:`InputError` before
  any pixel is decoded (Pillow itself would only warn below twice that limit).

Every failure — unreadable bytes, an unknown format, a truncated file, a bomb, a
missing file — is a :class:`connectors.errors.InputError` that names the file and the
item.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from connectors.errors import InputError
from connectors.storage import ProjectFS, redact_url

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_SIZE = 128
"""Side of the square grid images are decoded to for the image scorers."""

_DECODE_ERRORS = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
    ValueError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    RuntimeError,
)
# Pillow's plugins surface malformed input as any of these (the image is untrusted input);
# each becomes an InputError that names the file and the item.


def _open(data: bytes, name: str, item: str | None) -> Image.Image:
    """Open ``data`` lazily (header only) and apply the decompression-bomb guard."""
    try:
        with warnings.catch_warnings():
            # Checked below, as an error: Pillow alone only warns up to twice the limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InputError(
            f"refusing a possible decompression bomb (PIL.Image.MAX_IMAGE_PIXELS): {exc}",
            file=name,
            item=item,
        ) from exc
    except _DECODE_ERRORS as exc:
        raise InputError(f"cannot read image: {_describe(exc)}", file=name, item=item) from exc
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise InputError(
            f"image is {width}×{height} = {width * height} pixels, more than the limit of "
            f"{int(limit)} (PIL.Image.MAX_IMAGE_PIXELS); refusing a possible decompression bomb",
            file=name,
            item=item,
        )
    return image


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_image_size(
    data: bytes, *, name: str = "<bytes>", item: str | None = None, oriented: bool = False
) -> tuple[int, int]:
    """``(width, height)`` of an image from its header, without decoding pixels.

    The size is the stored one; with ``oriented=True`` width and height are swapped when
    the EXIF orientation rotates the picture by 90° (tags 5–8), i.e. the size
    :func:`decode_gray` sees before its resize.  Raises :class:`InputError` (naming
    ``name`` and ``item``) for unreadable data and for decompression bombs.
    """
    image = _open(data, name, item)
    width, height = image.size
    if oriented:
        try:
            orientation = image.getexif().get(0x0112, 1)
        except _DECODE_ERRORS as exc:
            raise InputError(f"cannot read EXIF: {_describe(exc)}", file=name, item=item) from exc
        if orientation in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def decode_gray(
    data: bytes, *, size: int = DEFAULT_SIZE, name: str = "<bytes>", item: str | None = None
) -> torch.Tensor:
    """Decode image bytes to a ``(size, size)`` float32 grayscale tensor in ``[0, 1]``.

    Reduced-size JPEG decode, EXIF orientation applied, luma grayscale, stretched to
    ``size``×``size`` (aspect ratio not preserved) — see the module docstring for why.
    ``name`` (the file) and ``item`` (the item id) only label errors: any problem raises
    :class:`InputError` ``"NAME: item 'ITEM': cannot decode image: …"``.
    """
    array = decode_gray_array(data, size=size, name=name, item=item)
    import torch  # here, not at the top: reading image bytes (the report) needs no torch

    return torch.from_numpy(array)


def decode_gray_array(
    data: bytes,
    *,
    size: int = DEFAULT_SIZE,
    name: str = "<bytes>",
    item: str | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`decode_gray` as a NumPy array, written into ``out`` (a C-contiguous
    ``(size, size)`` float32 array, e.g. a row of a batch buffer) when given; ``out`` is
    returned then.  On an error ``out`` may hold part of a picture."""
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    image = _open(data, name, item)
    try:
        if image.format == "JPEG":
            image.draft("L", (size, size))
        ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
        return _to_gray_array(image, size, out)
    except InputError:
        raise
    except _DECODE_ERRORS as exc:
        raise InputError(f"cannot decode image: {_describe(exc)}", file=name, item=item) from exc


_BYTE_SCALE = np.float32(1.0 / 255.0)


def _to_gray_array(image: Image.Image, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """``(size, size)`` float32 in ``[0, 1]`` from an opened (possibly drafted) image, in
    ``out`` when given."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        gray = image if mode == "I" else image.convert("I")
        gray = gray.convert("F").resize((size, size), Image.Resampling.BILINEAR)
        return np.clip(np.asarray(gray, dtype=np.float32) / 65535.0, 0.0, 1.0, out=out)
    if mode == "F":
        gray = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.clip(np.asarray(gray, dtype=np.float32), 0.0, 1.0, out=out)
    if mode != "L":
        if mode == "P" or mode == "PA":
            image = image.convert("RGBA")
        image = image.convert("L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    # the bytes as float32, times 1/255 in float32 (as ``astype`` then ``*`` would)
    return np.multiply(array, _BYTE_SCALE, out=out, dtype=np.float32)


def read_image_bytes(uri: str, project: ProjectFS | None, *, item: str | None = None) -> bytes:
    """The bytes of an item's image, from where the project's image-source policy allows.

    ``uri`` is relative to ``project`` (read through :meth:`ProjectFS.read_bytes`, which
    refuses paths that leave the root) or a full URL.  A full URL is read only when it
    lies in the project's own storage (then through the project, like a relative path),
    is on the host of an ``http(s)`` project (a Label Studio server; with the project's
    storage options, its token), or is listed in ``project.allow_image_hosts``
    (:meth:`ProjectFS.foreign_url_refusal`); anything else — ``file://`` paths elsewhere,
    other hosts — is an :class:`InputError` for that item, as are missing and unreadable
    files.  Without a project, full URLs are refused.
    """
    try:
        if "://" in uri:
            return _read_url(uri, project, item)
        if project is None:
            raise InputError("relative image path without a project root", file=uri, item=item)
        return project.read_bytes(uri)
    except InputError as exc:
        if exc.item is None and item is not None:
            raise type(exc)(exc.message, file=exc.file or uri, item=item, line=exc.line) from exc
        raise
    except FileNotFoundError as exc:
        raise InputError("image file not found", file=redact_url(uri), item=item) from exc
    except (OSError, ValueError) as exc:
        raise InputError(
            f"cannot read image file: {_describe(exc)}", file=redact_url(uri), item=item
        ) from exc


def _read_url(uri: str, project: ProjectFS | None, item: str | None) -> bytes:
    if project is None:
        raise InputError(
            "full image URL without a project: refused (images are read from a project's storage)",
            file=redact_url(uri),
            item=item,
        )
    rel = project.inside(uri)
    if rel is not None:
        return project.read_bytes(rel)
    why = project.foreign_url_refusal(uri)
    if why is not None:
        raise InputError(why, file=redact_url(uri), item=item)
    options: dict[str, Any] = {}
    if project.same_origin(uri) or (
        uri.split("://", 1)[0] in _protocols(project) and not uri.startswith(("http:", "https:"))
    ):
        options = project.storage_options  # the project's own server or object store only
    with fsspec.open(uri, "rb", **options) as f:
        data: bytes = f.read()
        return data


def _protocols(project: ProjectFS) -> tuple[str, ...]:
    protocol = project.fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)

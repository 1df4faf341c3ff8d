"""Tiny synthetic projects for the file-format tests: fresh ``memory://`` roots, small PNGs."""

from __future__ import annotations

import functools
import io
import uuid

import fsspec
from PIL import Image

from connectors.storage import ProjectFS


def fresh_url(tag: str) -> str:
    """A ``memory://`` root that no other test uses."""
    return f"memory://{tag}-{uuid.uuid4().hex}"


def fresh_project() -> ProjectFS:
    """An empty project on a fresh ``memory://`` root."""
    return ProjectFS(fresh_url("t"))


@functools.lru_cache(maxsize=64)
def png_bytes(width: int = 40, height: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 60, 30)).save(buf, format="PNG")
    return buf.getvalue()


def make_project(files: dict[str, bytes | str], tag: str = "proj") -> ProjectFS:
    """A project on a fresh memory root holding ``files`` (relative path → content)."""
    url = fresh_url(tag)
    fs = fsspec.filesystem("memory")
    root = url.split("://", 1)[1]
    fs.makedirs(root, exist_ok=True)
    for rel, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        fs.pipe_file(f"{root}/{rel}", data)
    return ProjectFS(url)

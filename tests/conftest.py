"""Shared fixtures.  Tests that need ``../shared/data`` skip with a clear reason without it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _fileformat_helpers import fresh_project

from connectors.storage import ProjectFS

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LABELTRIAGE_SHARED_DATA", REPO.parent / "shared" / "data"))


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(
            f"real data set {name!r} not found at {path} (set LABELTRIAGE_SHARED_DATA to its parent)"
        )
    return path


@pytest.fixture(scope="session")
def road_signs() -> Path:
    """../shared/data/road_signs: 700 VOC images, 992 boxes, with YOLOv5n predictions."""
    return _shared("road_signs")


@pytest.fixture(scope="session")
def kitti_tiny() -> Path:
    """../shared/data/kitti_tiny: 75 KITTI frames with DontCare regions and predictions."""
    return _shared("kitti_tiny")


@pytest.fixture
def mem() -> Iterator[ProjectFS]:
    """An empty project on a fresh ``memory://`` root, removed afterwards."""
    project = fresh_project()
    yield project
    if project.fs.exists(project.root):
        project.fs.rm(project.root, recursive=True)

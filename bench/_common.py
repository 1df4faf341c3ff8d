"""The real projects of ``../shared/data`` as the benchmarks build them.

* ``road_signs_2cls`` — road_signs (VOC) restricted to {stop, trafficlight}, label map
  ``stop sign→stop``, ``traffic light→trafficlight``;
* ``road_signs_4cls`` — the full four-class road_signs project, same label map;
* ``kitti_tiny`` — label map ``car→Car``, ``person→Pedestrian``, ``bicycle→Cyclist``,
  ``truck→Truck``, ``train→Tram``; ``DontCare`` regions ignored.

Each comes with its real YOLOv5n predictions (``predictions/yolo``).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from connectors.formats.base import LabelWrite, ProjectFormat, WriteOutcome, WrittenRecord
from connectors.formats.kitti import KittiFormat
from connectors.formats.voc import VocFormat
from connectors.formats.yolo import YoloPredictions
from connectors.labelmap import LabelMap
from connectors.model import Item, ItemStatus
from connectors.storage import ProjectFS

PROJECTS = ("road_signs_2cls", "road_signs_4cls", "kitti_tiny")
ROAD_MAP = LabelMap(map={"stop sign": "stop", "traffic light": "trafficlight"})
KITTI_MAP = LabelMap(
    map={
        "car": "Car",
        "person": "Pedestrian",
        "bicycle": "Cyclist",
        "truck": "Truck",
        "train": "Tram",
    },
    ignore=("DontCare",),
)


@dataclass
class RealProject:
    """One benchmark project: the format, its predictions, the label map, and the classes
    whose annotations are kept (``None``: all)."""

    name: str
    project: ProjectFormat
    predictions: YoloPredictions
    label_map: LabelMap
    keep: set[str] | None


def real_project(name: str, data: Path) -> RealProject:
    """The project ``name`` (one of :data:`PROJECTS`) under the data folder ``data``."""
    if name.startswith("road_signs"):
        root = data / "road_signs"
        project: ProjectFormat = VocFormat(ProjectFS(str(root)))
        label_map = ROAD_MAP
        keep = {"stop", "trafficlight"} if name == "road_signs_2cls" else None
    else:
        root = data / "kitti_tiny"
        project = KittiFormat(ProjectFS(str(root)))
        label_map = KITTI_MAP
        keep = None
    predictions = YoloPredictions(ProjectFS(str(root / "predictions" / "yolo")), project=project)
    return RealProject(name, project, predictions, label_map, keep)


class ProjectView(ProjectFormat):
    """A read-only view of a project: keep only some classes, hide some items' labels."""

    name = "view"

    def __init__(
        self, base: ProjectFormat, *, keep: set[str] | None = None, hide: set[str] | None = None
    ) -> None:
        super().__init__(base.project)
        self.base = base
        self.name = base.name  # type: ignore[misc]
        self.keep = keep
        self.hide = hide or set()

    @classmethod
    def detect(cls, project: ProjectFS) -> bool:
        return False

    def iter_items(self) -> Iterator[Item]:
        for item in self.base.iter_items():
            if self.keep is not None:
                item = item.model_copy(
                    update={"annotations": [a for a in item.annotations if a.label in self.keep]}
                )
            if item.item_id in self.hide:
                item = item.model_copy(
                    update={"annotations": [], "status": ItemStatus.UNLABELED, "source": None}
                )
            yield item

    def write_items(self, items: Iterable[Item], classes: list[str] | None = None) -> None:
        raise NotImplementedError("read-only view")

    def write_labels(self, writes: list[LabelWrite]) -> WriteOutcome:
        raise NotImplementedError("read-only view")

    def remove_written(self, records: list[WrittenRecord]) -> list[str]:
        raise NotImplementedError("read-only view")


def machine_line() -> str:
    """One line naming the machine a benchmark ran on: CPU, cores, memory, Python, torch,
    GPU, date, and the 1-minute load average when it was called (other work shows there)."""
    import torch

    cpu, mem_gib = platform.machine(), float("nan")
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
        with open("/proc/meminfo") as f:
            kib = next((int(ln.split()[1]) for ln in f if ln.startswith("MemTotal")), 0)
        mem_gib = kib / 1024 / 1024
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none used"
    return (
        f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical CPUs, "
        f"{mem_gib:.1f} GiB, Python {platform.python_version()}, torch {torch.__version__}, "
        f"GPU: {gpu}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"1-minute load average {os.getloadavg()[0]:.2f}"
    )


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium() -> str:
    """The headless browser the report screenshots are taken with."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("chromium not found: apt-get install -y chromium")


def chromium_png(page: Path, png: Path, *, height: int) -> None:
    """Screenshot ``page`` at 1280 px wide in headless Chromium, cut the empty background
    below the content, and save a palette PNG (a fraction of the size)."""
    import subprocess
    import tempfile

    import numpy as np
    from PIL import Image

    raw = png.with_suffix(".raw.png")
    subprocess.run(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tempfile.mkdtemp()}",
            f"--screenshot={raw}",
            f"--window-size=1280,{height}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    with Image.open(raw) as im:
        rgb = np.asarray(im.convert("RGB")).astype(np.int16)
    background = rgb[-1, -1]
    used = np.flatnonzero(np.abs(rgb - background).sum(axis=2).max(axis=1) > 8)
    bottom = int(used[-1]) + 40 if used.size else rgb.shape[0]
    Image.fromarray(rgb[:bottom].astype(np.uint8)).quantize(colors=256).save(png, optimize=True)
    raw.unlink()

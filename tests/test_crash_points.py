"""A write-back killed at every step it takes, in every file format: nothing is ever lost.

A forked child runs one auto-label run (:func:`connectors.writeback.write_run`) on a tiny
project and dies at its N-th file-changing system call (``write``, ``fsync``, ``link``,
``replace``, ``rename``, ``unlink`` and the atomic exchange), for every N the run has:
by SIGKILL (nothing runs after it) or by ``SystemExit`` raised right there (what SIGTERM
becomes in ``labeltriage run``; the run's own rollback then runs).  After each death:

* the human labels are byte-identical, and reading the project *before* any recovery
  counts exactly the human labels as human (an auto-label never reads as human);
* opening the project recovers it: the project is byte for byte what it was, with no
  temporary and no journal left, and the run's manifest says ``rolled_back``
  (``interrupted``) — or, killed after its commit mark, ``committed``, and
  ``rollback`` then restores the project byte for byte.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import connectors.storage as storage
from connectors.formats import FORMATS
from connectors.formats.base import LabelWrite, ProjectFormat, Provenance
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus
from connectors.project import open_project
from connectors.storage import ProjectFS
from connectors.writeback import list_runs, new_run_id, rollback, write_run

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

NAMES = [f"img{i}" for i in range(7)]
LABELED = {"img0": "car", "img3": "bike"}
SOURCE_FILE = {
    "coco": "annotations.json",
    "labelstudio": "export.json",
    "manifest": "items.parquet",
}
STEPS = ("write", "fsync", "link", "replace", "rename", "unlink", "remove")


def _items(root: Path) -> list[Item]:
    rng = np.random.default_rng(0)
    items = []
    for name in NAMES:
        image = f"images/{name}.png"
        (root / "images").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / image)
        label = LABELED.get(name)
        items.append(
            Item(
                item_id=name,
                uri=image,
                width=64,
                height=48,
                status=ItemStatus.LABELED if label else ItemStatus.UNLABELED,
                source=AnnotationSource.HUMAN if label else None,
                annotations=[Annotation(label=label, box=(4, 4, 30, 30))] if label else [],
            )
        )
    return items


def build(fmt: str, root: Path) -> str:
    """A tiny project of ``fmt`` at ``root``; returns its source (folder or file)."""
    items = _items(root)
    name = SOURCE_FILE.get(fmt)
    options = {"file": name} if name else {}
    if fmt == "imagefolder":
        for cls in ("car", "bike"):
            (root / cls).mkdir()
        os.rename(root / "images", root / "_unlabeled")
        for name_, label in LABELED.items():
            os.rename(root / "_unlabeled" / f"{name_}.png", root / label / f"{name_}.png")
        return str(root)
    FORMATS[fmt](ProjectFS(str(root)), **options).write_items(items, ["car", "bike"])
    return str(root / name) if name else str(root)


def planned_writes(fmt: ProjectFormat, run_id: str) -> list[LabelWrite]:
    writes = []
    for item in fmt.iter_items():
        if item.error is None and item.status is ItemStatus.UNLABELED:
            if fmt.name == "imagefolder":
                annotations = [Annotation(label="car")]
            else:
                annotations = [Annotation(label="car", box=(2, 2, 20, 20), score=0.9)]
            provenance = Provenance(run_id=run_id, model_version="m", score=0.9, tier="easy")
            writes.append(LabelWrite(item=item, annotations=annotations, provenance=provenance))
    return writes


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".labeltriage" not in p.relative_to(root).parts
    }


def leftovers(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.name.endswith((".tmp", ".journal")) or ".conflict-" in p.name
    )


def human_view(fmt: ProjectFormat) -> dict[str, Any]:
    """The items that read as human-labeled, with their annotations."""
    return {
        i.item_id: [a.model_dump() for a in i.annotations]
        for i in fmt.iter_items()
        if i.status is ItemStatus.LABELED
    }


class _Dies(Exception):
    pass


def _count_steps(before: Callable[[], None]) -> Callable[[], None]:
    """Wrap the file-changing calls of ``os`` and the exchange so that ``before`` runs first."""
    saved = {name: getattr(os, name) for name in STEPS}
    exchange = storage._renameat2()

    def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            before()
            return real(*args, **kwargs)

        return wrapper

    for name, real in saved.items():
        setattr(os, name, wrap(real))
    if exchange is not None:
        storage._renameat2 = lambda: wrap(exchange)  # type: ignore[assignment]

    def restore() -> None:
        for name, real in saved.items():
            setattr(os, name, real)
        storage._renameat2 = _ORIGINAL_RENAMEAT2

    return restore


_ORIGINAL_RENAMEAT2 = storage._renameat2


def run_child(fmt_name: str, source: str, run_id: str, die_at: int, how: str) -> int:
    """Fork; the child writes and dies at step ``die_at`` (0: never); returns its steps/status."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            fmt = open_project(source, fmt_name, recover=False)
            writes = planned_writes(fmt, run_id)
            counter = itertools.count(1)

            def before() -> None:
                if next(counter) == die_at:
                    if how == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise SystemExit(143)

            _count_steps(before)
            try:
                write_run(fmt, writes, run_id, chunk_size=2)
            except SystemExit:
                code = 3
            steps = next(counter) - 1
            code = code or min(steps, 250)
        except BaseException:
            code = 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def count_steps(fmt_name: str, source: str) -> int:
    status = run_child(fmt_name, source, new_run_id(), 0, "kill")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) not in (0, 255), status
    return os.WEXITSTATUS(status)


def check_after_death(
    fmt_name: str, source: str, root: Path, before: dict[str, bytes], human: Any
) -> str:
    unrecovered = open_project(source, fmt_name, recover=False)
    assert human_view(unrecovered) == human, (
        "an auto-label reads as human, or a human label changed"
    )
    now = snapshot(root)
    shared = {Path(source).name} if fmt_name in SOURCE_FILE else set()  # holds auto entries too
    changed = [rel for rel, data in before.items() if rel not in shared and now.get(rel) != data]
    assert not changed, f"files changed before recovery: {changed}"
    fmt = open_project(source, fmt_name)  # recovers
    assert human_view(fmt) == human
    (manifest,) = list_runs(fmt.project) or [None]
    stage = manifest.stage if manifest is not None else "none"
    if manifest is not None and manifest.stage == "committed":
        rollback(fmt, manifest.run_id)
    elif manifest is not None:
        assert manifest.stage == "rolled_back", manifest
    assert snapshot(root) == before, "not restored byte for byte"
    assert leftovers(root) == []
    return stage


FORMAT_NAMES = ("voc", "yolo", "coco", "labelstudio", "imagefolder", "manifest")


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("how", ["kill", "exit"])
@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
def test_death_at_every_step_loses_nothing(tmp_path: Path, fmt_name: str, how: str) -> None:
    die_at_steps(tmp_path, fmt_name, how, sample=None)


@pytest.mark.parametrize("how", ["kill", "exit"])
@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
def test_death_at_sampled_steps_loses_nothing(tmp_path: Path, fmt_name: str, how: str) -> None:
    """The quick subset of the above: eight steps spread over the run, and its last."""
    die_at_steps(tmp_path, fmt_name, how, sample=8)


def die_at_steps(tmp_path: Path, fmt_name: str, how: str, sample: int | None) -> None:
    template = tmp_path / "template"
    source = build(fmt_name, template)
    n = count_steps(fmt_name, _copy(template, tmp_path / "count", source))
    assert n >= 8
    steps = list(range(1, n + 1))
    if sample is not None:
        steps = sorted({*np.linspace(1, n, sample).round().astype(int).tolist(), n - 1, n})
    stages: dict[str, int] = {}
    for step in steps:
        root = tmp_path / f"{how}{step}"
        src = _copy(template, root, source)
        before = snapshot(root)
        human = human_view(open_project(src, fmt_name, recover=False))
        status = run_child(fmt_name, src, new_run_id(), step, how)
        if how == "kill":
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        else:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3, (step, status)
        try:
            stage = check_after_death(fmt_name, src, root, before, human)
        except AssertionError as exc:
            raise AssertionError(f"{fmt_name}: died ({how}) at step {step} of {n}: {exc}") from exc
        stages[stage] = stages.get(stage, 0) + 1
    assert stages.get("rolled_back", 0) > 0, stages
    if how == "kill":  # killed after the commit mark: recovery completes the run
        assert stages.get("committed", 0) > 0, stages


def _copy(template: Path, dest: Path, source: str) -> str:
    import shutil

    shutil.copytree(template, dest)
    return str(dest / Path(source).relative_to(template)) if source != str(template) else str(dest)


def test_steps_are_counted(tmp_path: Path) -> None:
    """The harness itself: a run with no death commits and counts its steps."""
    source = build("voc", tmp_path / "p")
    n = count_steps("voc", source)
    fmt = open_project(source, "voc")
    (manifest,) = list_runs(fmt.project)
    assert manifest.stage == "committed" and len(manifest.records) == len(NAMES) - len(LABELED)
    assert n > 4 * (len(NAMES) - len(LABELED))
    assert json.loads(
        (tmp_path / "p" / ".labeltriage" / "runs" / f"{manifest.run_id}.json").read_text()
    )

"""Stream the images of a project through one pool of worker processes, decoded and scored there.

:func:`iter_image_scores` reads an iterable of :class:`~connectors.model.Item` once, in
the calling process, and cuts it into tasks of ``batch_size`` ``(item_id, uri, error)``
tuples.  Each task goes to a worker process, which reads the files
(``ProjectFS.read_bytes`` for paths relative to the project, ``fsspec.open`` for full
URLs), decodes them with :func:`difficulty.imageio.decode_gray_array` into a
``(batch_size, size, size)`` buffer it keeps for the whole stream, runs the image
scorers on the batch (e.g. both Fourier scorers, on one spectrum per image) and sends
back only their values: a few floats per item.  :func:`iter_image_batches` sends the
pixels back instead, for callers that want the images themselves.

One stream, one pool.  A whole project is one stream: the workers start once and decode
ahead while the calling process reads the next items and works on the results already
back, so reading, decoding and scoring overlap.  Results come back in input order, so
**the output is the same for any ``num_workers``** (0 decodes and scores in the calling
process).  Every value is computed per image (a scorer's value for an image does not
depend on the other images of its batch), so it does not depend on ``batch_size``
either.

Only the small tuples and the values cross process boundaries, and the item stream is
read exactly once, by the calling process (a generator over an open manifest file could
not be shared with forked workers).  Memory is bounded whatever the project size: items
are pulled from the iterable only as results are taken (at most
``prefetch_factor × num_workers`` tasks in flight), and nothing is listed or kept.

torch is imported where it computes.  The workers are forked from a fork server that
imports torch once, while the calling process already reads items; the calling process,
which only reads items and combines scores, never loads it (with ``num_workers=0`` it
computes, and imports torch, itself).  A process that has loaded torch anyway forks its
workers directly (see :func:`difficulty.workerstart.worker_context`).
:func:`fix_mmap_threshold` keeps large blocks out of the glibc heap, which the per-batch
arrays of a long stream would otherwise fragment.

Workers on remote storage: an fsspec filesystem that runs an event loop (``s3fs``,
``gcsfs``) cannot be used in a forked child.  A worker started by the fork server gets
the project by pickle, which opens its filesystem anew; a worker forked directly opens it
anew (same URL and storage options) on its first task.

Bad items never stop the stream: an item whose ``error`` is already set, a missing
file, a path outside the project or an undecodable image is reported in the batch's
``errors`` with a message naming the file and the item.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from connectors.errors import InputError, UsageError
from connectors.model import Item
from connectors.storage import ProjectFS
from difficulty import fourier as _fourier  # noqa: F401  (registers the image scorers)
from difficulty.imageio import DEFAULT_SIZE, decode_gray_array, read_image_bytes
from difficulty.registry import SCORERS
from difficulty.workerstart import worker_context

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_Task = tuple[str, str, str | None]
"""``(item_id, uri, error)`` — all a worker needs to know about an item."""

ImagePlan = list[tuple[str, Any, dict[str, Any]]]
"""``(scorer name, scorer function, its keyword arguments)`` for each image scorer."""

MMAP_THRESHOLD = 128 * 1024
"""Blocks of at least this many bytes are mapped and returned to the system when freed."""
_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


@dataclass
class ImageBatch:
    """One chunk of the item stream, decoded.

    ``item_ids``: the ids that decoded, in input order; row ``i`` of ``images``
    (``(n, size, size)`` float32 in ``[0, 1]``) belongs to ``item_ids[i]``.  ``errors``:
    item id → message naming the file, for the items that did not decode (or arrived with
    ``error`` set).  ``order``: every item id of the chunk, in input order.
    """

    item_ids: list[str]
    images: torch.Tensor
    errors: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.order)


@dataclass
class ImageScores:
    """One chunk of the item stream, decoded and scored.

    ``order``: every item id of the chunk, in input order; ``item_ids``: those that
    decoded, in input order; ``values``: scorer name → ``(len(item_ids),)`` float64, row
    ``i`` belonging to ``item_ids[i]``; ``errors``: item id → message, for the others.
    """

    order: list[str]
    item_ids: list[str]
    values: dict[str, np.ndarray]
    errors: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.order)

    def per_item(self) -> Iterator[tuple[str, dict[str, float], str | None]]:
        """``(item_id, {scorer: value}, error)`` for every item of the chunk, in order."""
        position = 0
        n = len(self.item_ids)
        for item_id in self.order:
            if position < n and self.item_ids[position] == item_id:
                yield item_id, {k: float(v[position]) for k, v in self.values.items()}, None
                position += 1
            else:
                yield item_id, {}, self.errors[item_id]


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process (and the processes it forks later).

    glibc raises its threshold each time a mapped block is freed (up to 32 MB), after
    which the large per-batch arrays come from the heap, which they fragment: a long
    stream then grows the resident size with the item count.  A fixed threshold keeps
    large blocks mapped and returns them to the system when freed.  Returns ``False``
    where there is no glibc ``mallopt`` (other C libraries, other systems).
    """
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


class _TaskSampler:
    """Iterates the item stream once, yielding tasks of ``batch_size`` items."""

    def __init__(self, items: Iterable[Item], batch_size: int) -> None:
        self.items = items
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[_Task, ...]]:
        task: list[_Task] = []
        for item in self.items:
            task.append((item.item_id, item.uri, item.error))
            if len(task) == self.batch_size:
                yield tuple(task)
                task = []
        if task:
            yield tuple(task)


@dataclass
class _Done:
    """What a worker sends back: pixels (``(n, size, size)`` float32) or scorer values."""

    order: list[str]
    item_ids: list[str]
    errors: dict[str, str]
    pixels: np.ndarray | None = None
    values: dict[str, np.ndarray] = field(default_factory=dict)


class _DecodeTasks:
    """Decodes (and scores) one task; one instance lives in each worker process.

    With a ``plan`` the scorers run on the decoded batch and only their values are
    returned; without one, the pixels.
    """

    def __init__(
        self, project: ProjectFS | None, size: int, batch_size: int, plan: ImagePlan | None
    ) -> None:
        self.project = project
        self.size = size
        self.batch_size = batch_size
        self.plan = plan
        self._pid = os.getpid()
        self._buffer: torch.Tensor | None = None

    def _project(self) -> ProjectFS | None:
        """The project's filesystem, opened anew once in each forked worker (fsspec's
        event-loop filesystems cannot be used across ``fork``)."""
        pid = os.getpid()
        if pid != self._pid:
            if self.project is not None and not self.project.is_local:
                self.project = ProjectFS(self.project.url, self.project.storage_options)
            self._pid = pid
        return self.project

    def __call__(self, task: tuple[_Task, ...]) -> _Done:
        import torch

        project = self._project()
        if self._buffer is None:
            self._buffer = torch.empty((self.batch_size, self.size, self.size))
        buffer = self._buffer
        rows = buffer.numpy()  # the same memory: each image is decoded into its row
        order: list[str] = []
        ids: list[str] = []
        errors: dict[str, str] = {}
        for item_id, uri, error in task:
            order.append(item_id)
            if error is not None:
                errors[item_id] = error
                continue
            try:
                data = read_image_bytes(uri, project, item=item_id)
                decode_gray_array(data, size=self.size, name=uri, item=item_id, out=rows[len(ids)])
            except InputError as exc:
                errors[item_id] = str(exc)
                continue
            ids.append(item_id)
        images = buffer[: len(ids)]
        if self.plan is None:
            return _Done(order, ids, errors, pixels=images.numpy().copy())
        values: dict[str, np.ndarray] = {}
        if ids:
            for name, fn, kwargs in self.plan:
                values[name] = np.asarray(fn(images=images, **kwargs), dtype=np.float64).reshape(-1)
        return _Done(order, ids, errors, values=values)


_worker_tasks: _DecodeTasks | None = None
"""The task runner of this worker process (set by :func:`_start_worker`)."""


def _start_worker(tasks: _DecodeTasks) -> None:
    global _worker_tasks
    _worker_tasks = tasks
    import torch  # preloaded by the fork server (or inherited): the main process need not

    torch.set_num_threads(1)  # the workers are the parallelism


def _run_task(task: tuple[_Task, ...]) -> _Done:
    if _worker_tasks is None:
        raise RuntimeError("image stream worker used before it was started")
    return _worker_tasks(task)


SCORES_PREFETCH = 8
"""Tasks in flight per worker when only scores come back (a few numbers per image): enough
to keep the workers busy while this process finishes a chunk (parsing labels, matching)."""


def _check_stream_arguments(
    size: int, batch_size: int, num_workers: int, prefetch_factor: int
) -> None:
    if size < 1:
        raise UsageError(f"image size must be a positive number of pixels, got {size}")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise UsageError(f"num_workers must be 0 or more, got {num_workers}")
    if prefetch_factor < 1:
        raise UsageError(f"prefetch_factor must be at least 1, got {prefetch_factor}")


def _stream(
    items: Iterable[Item],
    project: ProjectFS | None,
    plan: ImagePlan | None,
    size: int,
    batch_size: int,
    num_workers: int,
    progress: bool,
    prefetch_factor: int,
) -> Iterator[_Done]:
    """One pool of workers over the whole item stream, results in input order.

    At most ``prefetch_factor × num_workers`` tasks are in flight; the next task is cut
    from the item stream (here, in the calling process) when a result is taken.
    """
    fix_mmap_threshold()
    tasks = _DecodeTasks(project, size, batch_size, plan)
    with tqdm(
        unit="img", desc="decode", file=sys.stderr, disable=not progress, dynamic_ncols=True
    ) as bar:
        for done in _run(tasks, _TaskSampler(items, batch_size), num_workers, prefetch_factor):
            for item_id, message in done.errors.items():
                log.debug("image not decoded: %s (%s)", item_id, message)
            bar.update(len(done.order))
            yield done


def _run(
    tasks: _DecodeTasks,
    sampler: Iterable[tuple[_Task, ...]],
    num_workers: int,
    prefetch_factor: int,
) -> Iterator[_Done]:
    if num_workers == 0:
        yield from map(tasks, sampler)
        return
    pool = ProcessPoolExecutor(
        num_workers, mp_context=worker_context(), initializer=_start_worker, initargs=(tasks,)
    )
    in_flight: deque[Future[_Done]] = deque()
    try:
        for task in sampler:
            in_flight.append(pool.submit(_run_task, task))
            if len(in_flight) >= prefetch_factor * num_workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_image_batches(
    items: Iterable[Item],
    project: ProjectFS | None,
    *,
    size: int = DEFAULT_SIZE,
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = False,
    prefetch_factor: int = 2,
) -> Iterator[ImageBatch]:
    """Decode the images of ``items`` in batches, in input order.

    Each :class:`ImageBatch` covers the next ``batch_size`` items (the last may be
    shorter); its ``images`` are ``(n, size, size)`` float32 in ``[0, 1]`` for the ``n``
    items that decoded.  ``num_workers`` decoding processes (0: decode here); output is the
    same for any value.  ``progress`` shows a tqdm bar (images) on stderr.  ``project``
    may be ``None`` when every uri is a full fsspec URL.
    """
    _check_stream_arguments(size, batch_size, num_workers, prefetch_factor)
    import torch

    return (
        ImageBatch(
            item_ids=done.item_ids,
            images=torch.from_numpy(done.pixels)
            if done.pixels is not None
            else torch.empty((0, size, size)),
            errors=done.errors,
            order=done.order,
        )
        for done in _stream(
            items, project, None, size, batch_size, num_workers, progress, prefetch_factor
        )
    )


def iter_image_scores(
    items: Iterable[Item],
    project: ProjectFS | None,
    plan: ImagePlan,
    *,
    size: int = DEFAULT_SIZE,
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = False,
    prefetch_factor: int = SCORES_PREFETCH,
) -> Iterator[ImageScores]:
    """Decode and score the images of ``items`` in batches, in input order.

    ``plan``: ``(name, function, keyword arguments)`` of each image scorer, already
    validated (see :func:`score_images` for the checked entry point).  The scorers run
    where the images are decoded (in the workers), on each batch of ``batch_size`` items;
    only their values come back.  Each :class:`ImageScores` covers the next ``batch_size``
    items.
    """
    _check_stream_arguments(size, batch_size, num_workers, prefetch_factor)
    if not plan:
        raise UsageError("no image scorers to run")
    return (
        ImageScores(
            order=done.order, item_ids=done.item_ids, values=done.values, errors=done.errors
        )
        for done in _stream(
            items, project, plan, size, batch_size, num_workers, progress, prefetch_factor
        )
    )


def image_plan(
    scorers: Sequence[str], settings: Mapping[str, Mapping[str, Any]] | None, size: int | None
) -> tuple[ImagePlan, int]:
    """Validate image scorer names and settings; the plan and the common decode size."""
    if not scorers:
        raise UsageError("no scorers given; choose one or more of the image scorers, e.g. fourier")
    plan: ImagePlan = []
    sizes: dict[str, int] = {}
    for name in scorers:
        spec = SCORERS[name]
        if spec.needs != {"images"}:
            raise UsageError(
                f"scorer {name!r} needs {sorted(spec.needs)}; score_images can only feed images"
            )
        raw = dict((settings or {}).get(name, {}))
        try:
            config = spec.settings.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']} (got {e.get('input')!r})"
                for e in exc.errors()
            )
            raise UsageError(f"bad settings for scorer {name!r}: {problems}") from exc
        kwargs = config.model_dump()
        if "size" in config.model_fields_set:
            sizes[name] = int(kwargs["size"])
        plan.append((name, spec.fn, kwargs))
    if size is not None:
        sizes["size argument"] = size
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise UsageError(
            f"image scorers disagree on the decode size ({listed}); set one size for all"
        )
    common = next(iter(sizes.values()), DEFAULT_SIZE)
    for _, _, kwargs in plan:
        if "size" in kwargs:
            kwargs["size"] = common
    return plan, common


def score_images(
    items: Iterable[Item],
    project: ProjectFS | None,
    scorers: Sequence[str] = ("fourier",),
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    **stream_kwargs: Any,
) -> Iterator[tuple[str, dict[str, float], str | None]]:
    """Score every item with image scorers: ``(item_id, {scorer: value}, error)`` in input order.

    ``scorers`` are names from :data:`difficulty.registry.SCORERS` that need only
    ``images``; ``settings`` maps a scorer name to its settings (validated by the scorer's
    settings model).  The decode size is the ``size`` set in the settings or given as a
    keyword argument (default 128); where several are set they must agree.  Items that
    could not be decoded come back with empty values and ``error`` set.  Remaining keyword
    arguments go to :func:`iter_image_scores`.  Names, settings and stream arguments are
    checked when this is called (:class:`UsageError`), before any item is read.
    """
    plan, size = image_plan(scorers, settings, stream_kwargs.pop("size", None))
    batches = iter_image_scores(items, project, plan, size=size, **stream_kwargs)
    return (row for batch in batches for row in batch.per_item())

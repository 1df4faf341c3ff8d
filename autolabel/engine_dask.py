"""The Dask engine: scoring and prediction as Dask tasks over partitions of the manifest.

The local engine (:func:`difficulty.scoring.score_project`) streams the project's items in
chunks through the pure per-chunk function :func:`difficulty.scoring.score_chunk`.  This
engine runs the very same function, one Dask task per chunk, on a Dask cluster:

1. the project's items are streamed into a Parquet manifest, one file per partition
   (``part-00000.parquet``, … under ``work_url``, schema
   :data:`connectors.manifest.ITEM_SCHEMA`); a task is submitted as soon as its
   partition is written, so the driver never holds the whole project;
2. each task reads its partition (:func:`connectors.manifest.iter_manifest_items`) and
   calls :func:`~difficulty.scoring.score_chunk`; a model checkpoint is loaded **once per
   worker** (a worker-global cache keyed by the checkpoint's path), brought predictions
   are sent to every worker once (``Client.scatter(..., broadcast=True)``);
3. the per-partition tables come back in partition order, so the combined table — and
   everything :func:`~difficulty.scoring.score_project` derives from it (percentiles,
   weights, tiers, ranks) — is identical to the local engine's.

Clusters: by default a ``distributed.LocalCluster`` bound to ``127.0.0.1`` (no dashboard,
``threads_per_worker=1``, ``n_workers`` processes); or an existing scheduler,
``scheduler="tcp://HOST:PORT"``.  With a remote scheduler the workers must reach both the
project's images and ``work_url`` (use shared storage such as ``s3://…``); the default
work folder is a local temporary folder, fine for a local cluster.

Install with ``pip install 'labeltriage[dask]'``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from connectors.errors import UsageError
from connectors.formats.base import PredictionSource, ProjectFormat
from connectors.manifest import ITEM_SCHEMA, items_to_batches, iter_manifest_items, write_batches
from connectors.model import Item, Prediction
from connectors.storage import ProjectFS

log = logging.getLogger(__name__)

ENGINES = ("local", "dask")
DEFAULT_WORKERS = 2


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise UsageError(
            "--engine dask needs dask.distributed: pip install 'labeltriage[dask]'"
        ) from exc
    return distributed


# -- what runs on a worker ---------------------------------------------------------------------

_CHECKPOINTS: dict[tuple[str, str], Any] = {}
_CHECKPOINTS_LOCK = threading.Lock()
LOADS: dict[str, int] = {}
"""Checkpoint loads in this process, by path (read by tests through ``Client.run``)."""


def worker_checkpoint(path: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The checkpoint at ``path``, loaded once per worker process and kept for later tasks.

    The loaded :class:`difficulty.checkpoint.Checkpoint` also caches its built model, so a
    worker builds each model once, whatever the number of partitions it scores.
    """
    from difficulty.checkpoint import load_checkpoint

    key = (path, repr(sorted((storage_options or {}).items())))
    with _CHECKPOINTS_LOCK:
        if key not in _CHECKPOINTS:
            _CHECKPOINTS[key] = load_checkpoint(path, storage_options=storage_options)
            LOADS[path] = LOADS.get(path, 0) + 1
            log.info("worker loaded checkpoint %s", path)
        return _CHECKPOINTS[key]


def checkpoint_loads() -> dict[str, int]:
    """Checkpoint loads in this process (run on every worker with ``Client.run``)."""
    return dict(LOADS)


def score_partition(
    work_url: str,
    part: str,
    *,
    work_storage_options: dict[str, Any] | None,
    project: ProjectFS,
    predictions: PredictionSource | None,
    checkpoint: str | None,
    checkpoint_storage_options: dict[str, Any] | None,
    score_kwargs: dict[str, Any],
) -> pd.DataFrame:
    """One Dask task: read partition ``part`` of the manifest and score it."""
    from difficulty.scoring import load_scorers, score_chunk

    load_scorers()
    items = list(iter_manifest_items(ProjectFS(work_url, work_storage_options), part))
    ckpt = (
        worker_checkpoint(checkpoint, checkpoint_storage_options)
        if checkpoint is not None
        else None
    )
    return score_chunk(
        items, project=project, predictions=predictions, checkpoint=ckpt, **score_kwargs
    )


def predict_partition(
    work_url: str,
    part: str,
    *,
    work_storage_options: dict[str, Any] | None,
    project: ProjectFS,
    checkpoint: str,
    checkpoint_storage_options: dict[str, Any] | None,
    batch_size: int,
) -> list[Prediction]:
    """One Dask task: the model's predictions for partition ``part`` of the manifest.

    An item that could not be decoded gets a :class:`Prediction` with ``error`` set.
    """
    from difficulty.inference import infer

    items = list(iter_manifest_items(ProjectFS(work_url, work_storage_options), part))
    ckpt = worker_checkpoint(checkpoint, checkpoint_storage_options)
    out: list[Prediction] = [
        Prediction(item_id=it.item_id, error=it.error) for it in items if it.error
    ]
    for batch in infer(ckpt, [it for it in items if not it.error], project, batch_size=batch_size):
        out.extend(batch.predictions or [])
        out.extend(Prediction(item_id=i, error=e) for i, e in batch.errors.items())
    return out


# -- the driver side ---------------------------------------------------------------------------


@dataclass
class DaskEngine:
    """A Dask client and a work folder; use as a context manager.

    ``scheduler``: ``None`` for a local cluster of ``n_workers`` processes on 127.0.0.1,
    else the address of a running scheduler (``tcp://HOST:PORT``).  ``work_url``: where the
    manifest partitions go (default: a temporary local folder, removed on exit).
    """

    scheduler: str | None = None
    n_workers: int = DEFAULT_WORKERS
    work_url: str | None = None
    work_storage_options: dict[str, Any] | None = None
    checkpoint_storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.scheduler is None and self.n_workers < 1:
            raise UsageError(f"n_workers must be at least 1, got {self.n_workers}")
        if self.scheduler is not None and not self.scheduler.startswith(
            ("tcp://", "tls://", "inproc://")
        ):
            raise UsageError(
                f"scheduler {self.scheduler!r} must be an address such as tcp://HOST:PORT"
            )
        self.client: Any = None
        self._cluster: Any = None
        self._tmp: str | None = None

    def __enter__(self) -> DaskEngine:
        distributed = _import_distributed()
        if self.scheduler is None:
            self._cluster = distributed.LocalCluster(
                host="127.0.0.1",
                n_workers=self.n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                worker_dashboard_address=None,
            )
            self.client = distributed.Client(self._cluster)
        else:
            try:
                self.client = distributed.Client(self.scheduler, timeout="30s")
            except OSError as exc:
                raise UsageError(
                    f"cannot reach the Dask scheduler at {self.scheduler}: {exc}"
                ) from exc
        if self.work_url is None:
            self._tmp = tempfile.mkdtemp(prefix="labeltriage-dask-")
            self.work_url = self._tmp
        log.info("dask engine: %s, work folder %s", self.client, self.work_url)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            if self.client is not None:
                self.client.close()
        with contextlib.suppress(Exception):
            if self._cluster is not None:
                self._cluster.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self.client = self._cluster = None

    @property
    def n_running_workers(self) -> int:
        return len(self.client.scheduler_info()["workers"]) if self.client is not None else 0

    def map_chunks(
        self,
        chunks: Iterable[Sequence[Item]],
        *,
        project: ProjectFS,
        predictions: PredictionSource | None = None,
        checkpoint: str | None = None,
        **score_kwargs: Any,
    ) -> Iterator[pd.DataFrame]:
        """Score every chunk as one Dask task; yield the tables in chunk order.

        The keyword arguments are those of :func:`difficulty.scoring.score_chunk`.
        """
        if self.client is None or self.work_url is None:
            raise RuntimeError("use DaskEngine as a context manager")
        checkpoint_path = None
        if checkpoint is not None:
            if not isinstance(checkpoint, str):
                raise UsageError(
                    "the dask engine needs the checkpoint as a path or URL, not a loaded object"
                )
            checkpoint_path = checkpoint
        shared_predictions = (
            self.client.scatter(predictions, broadcast=True, hash=False)
            if predictions is not None
            else None
        )
        yield from self._run_partitions(
            "score",
            score_partition,
            chunks,
            project=project,
            predictions=shared_predictions,
            checkpoint=checkpoint_path,
            score_kwargs=score_kwargs,
        )

    def predict_chunks(
        self,
        chunks: Iterable[Sequence[Item]],
        *,
        project: ProjectFS,
        checkpoint: str,
        batch_size: int = 32,
    ) -> Iterator[list[Prediction]]:
        """The checkpoint's predictions, one Dask task per chunk, yielded in chunk order."""
        yield from self._run_partitions(
            "predict",
            predict_partition,
            chunks,
            project=project,
            checkpoint=checkpoint,
            batch_size=batch_size,
        )

    def _run_partitions(
        self, kind: str, task: Callable[..., Any], chunks: Iterable[Sequence[Item]], **kwargs: Any
    ) -> Iterator[Any]:
        """Write each chunk as a manifest part, run ``task`` on it as one Dask task, yield
        the results in chunk order, and remove the parts (also when the caller stops early)."""
        if self.client is None or self.work_url is None:
            raise RuntimeError("use DaskEngine as a context manager")
        run = uuid.uuid4().hex[:8]
        work = ProjectFS(self.work_url, self.work_storage_options)
        futures = []
        for index, chunk in enumerate(chunks):
            part = f"{run}/part-{index:05d}.parquet"
            write_batches(items_to_batches(chunk), work, part, ITEM_SCHEMA)
            futures.append(
                self.client.submit(
                    task,
                    self.work_url,
                    part,
                    work_storage_options=self.work_storage_options,
                    checkpoint_storage_options=self.checkpoint_storage_options,
                    key=f"labeltriage-{kind}-{run}-{index:05d}",
                    pure=False,
                    **kwargs,
                )
            )
        log.info("dask engine: %d %s partitions submitted", len(futures), kind)
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
            with contextlib.suppress(FileNotFoundError, OSError):
                work.fs.rm(work.resolve(run), recursive=True)

    def checkpoint_loads(self) -> dict[str, dict[str, int]]:
        """Per worker: how many times each checkpoint was loaded there."""
        return dict(self.client.run(checkpoint_loads))


ChunkRunner = Callable[..., Iterator[pd.DataFrame]]


def score_project_with_engine(
    project: ProjectFormat,
    *,
    engine: str = "local",
    scheduler: str | None = None,
    n_workers: int = DEFAULT_WORKERS,
    work_url: str | None = None,
    **kwargs: Any,
) -> Any:
    """:func:`difficulty.scoring.score_project` on the chosen engine (``local`` or ``dask``).

    The keyword arguments are those of ``score_project``.  With ``engine="dask"`` its
    chunks run as Dask tasks (see :class:`DaskEngine`); the result is the same.
    """
    from difficulty.scoring import score_project

    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if engine == "local":
        return score_project(project, **kwargs)
    with DaskEngine(scheduler=scheduler, n_workers=n_workers, work_url=work_url) as dask_engine:
        return score_project(project, chunk_runner=dask_engine.map_chunks, **kwargs)


__all__ = [
    "ENGINES",
    "DaskEngine",
    "predict_partition",
    "score_partition",
    "score_project_with_engine",
    "worker_checkpoint",
]

"""The Dask engine: scoring and prediction as Dask tasks over partitions of the manifest.

The local engine (:func:`difficulty.scoring.score_project`) streams the project's items in
chunks through the pure per-chunk function :func:`difficulty.scoring.score_chunk`.  This
engine runs the very same function, one Dask task per chunk, on a Dask cluster whose
workers may run on other machines and see nothing of the driver's disk:

1. the driver streams the project's items into Parquet manifest partitions
   (``score-<token>/part-00000.parquet``, … schema :data:`connectors.manifest.ITEM_SCHEMA`) under
   a **staging** URL that every worker can read, and submits a task as soon as its
   partition is written, so the driver never holds the whole project.  The staged
   partitions are removed when the run ends, whether it succeeded or not;
2. each task reads its partition (:func:`connectors.manifest.iter_manifest_items`) and
   calls :func:`~difficulty.scoring.score_chunk`, decoding images in the worker's own
   process (a Dask worker is a daemonic process that cannot fork a DataLoader; the
   user's ``num_workers`` applies to the local engine).  Whatever a task reads besides
   its partition it reads from its source, with that source's storage options: the
   images from the project, a model checkpoint (kept in a small per-worker cache, see
   :func:`worker_checkpoint`), brought predictions (:class:`ReopenablePredictions`,
   opened again on the worker).  Nothing lives only in one worker's memory, so a
   worker that is lost costs the recomputation of its tasks, not the run;
3. the per-partition tables come back in partition order, so the combined table — and
   everything :func:`~difficulty.scoring.score_project` derives from it (percentiles,
   weights, tiers, ranks) — is identical to the local engine's.

Staging (:func:`default_staging`): ``staging=URL`` when given; else, for a local cluster,
a temporary folder on the driver (the workers run on the same machine); for a running
scheduler, a ``.labeltriage-staging`` folder under the run's output folder (on S3 when the
output is).

Clusters: by default a ``distributed.LocalCluster`` bound to ``127.0.0.1`` (no dashboard,
``threads_per_worker=1``, ``n_workers`` processes); or an existing scheduler,
``scheduler="tcp://HOST:PORT"``.  Whatever goes wrong on the cluster side — a scheduler
that cannot be reached, a task that raised, workers lost until Dask gives up on a task —
ends the run with one :class:`ClusterError` (the command line's ``error:`` line, exit 1).

labeltriage's log lines on a worker go to that worker's log (its stderr and
``Client.get_worker_logs``), at INFO unless the worker's logging config says otherwise.

Install with ``pip install 'labeltriage[dask]'``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import posixpath
import shutil
import socket
import sys
import tempfile
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from connectors.errors import LabelTriageError, UsageError
from connectors.formats.base import PredictionSource, ProjectFormat
from connectors.manifest import ITEM_SCHEMA, items_to_batches, iter_manifest_items, write_batches
from connectors.model import Item, Prediction
from connectors.storage import ProjectFS, open_fs
from difficulty.options import ScoreOptions

log = logging.getLogger(__name__)

ENGINES = ("local", "dask")
DEFAULT_WORKERS = 2
DEFAULT_PARTITION_SIZE = 256
"""Items per partition (one Dask task) unless ``partition_size`` says otherwise."""
STAGING_DIR = ".labeltriage-staging"
"""The staging folder made under the run's output folder for a running scheduler."""
WORKER_CACHE_SIZE = 2
"""Loaded checkpoints (and opened prediction sources) a worker keeps for later tasks."""
CONNECT_TIMEOUT_S = 10.0
"""How long connecting to a running scheduler may take before the run fails."""
_DEFAULT_SCHEDULER_PORT = 8786


class ClusterError(LabelTriageError):
    """The Dask cluster could not run the work: the run failed (exit code 1)."""


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise UsageError(
            "--engine dask needs dask.distributed: pip install 'labeltriage[dask]'"
        ) from exc
    return distributed


def _one_line(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- what runs on a worker ---------------------------------------------------------------------


class _LRU:
    """A bounded per-process cache: past ``size`` entries the least recently used is dropped.

    Dropped values are garbage-collected and freed heap pages handed back to the system,
    so that a long-lived worker's memory does not grow with every checkpoint it ever saw.
    """

    def __init__(self, size: int, what: str) -> None:
        self.size = size
        self.what = what
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, load: Callable[[], Any]) -> Any:
        evicted = []
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            value = load()
            self._entries[key] = value
            while len(self._entries) > self.size:
                evicted.append(self._entries.popitem(last=False)[0])
        if evicted:
            log.info("worker dropped %s from its cache: %s", self.what, ", ".join(evicted))
            gc.collect()
            _release_free_memory()
        return value

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        gc.collect()


def _release_free_memory() -> None:
    """Give freed heap pages back to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_CHECKPOINTS = _LRU(WORKER_CACHE_SIZE, "checkpoint")
_PREDICTIONS = _LRU(WORKER_CACHE_SIZE, "predictions")
LOADS: dict[str, int] = {}
"""Checkpoint loads in this process, by path (read by tests through ``Client.run``)."""


def _fingerprint(path: str, storage_options: dict[str, Any] | None) -> str:
    """What tells one version of the file at ``path`` from another (fsspec ``ukey``)."""
    try:
        fs, full = open_fs(path, storage_options)
        return str(fs.ukey(full))
    except (OSError, ValueError, LabelTriageError) as exc:
        return f"unreadable: {exc}"  # load_checkpoint then raises its own clear error


def worker_checkpoint(path: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The checkpoint at ``path``, loaded once per worker process and kept for later tasks.

    The cache holds :data:`WORKER_CACHE_SIZE` checkpoints, keyed by path, storage options
    and the file's version (a checkpoint rewritten at the same path is loaded again); the
    least recently used one is dropped and its memory released.  The loaded
    :class:`difficulty.checkpoint.Checkpoint` also caches its built model, so a worker
    builds each model once, whatever the number of partitions it scores.
    """
    from difficulty.checkpoint import load_checkpoint

    options = json.dumps(storage_options or {}, sort_keys=True, default=str)
    key = f"{path} {options} {_fingerprint(path, storage_options)}"

    def load() -> Any:
        ckpt = load_checkpoint(path, storage_options=storage_options)
        LOADS[path] = LOADS.get(path, 0) + 1
        log.info("worker loaded checkpoint %s", path)
        return ckpt

    return _CHECKPOINTS.get(key, load)


def checkpoint_loads() -> dict[str, int]:
    """Checkpoint loads in this process (run on every worker with ``Client.run``)."""
    return dict(LOADS)


def cached_checkpoints() -> list[str]:
    """The keys of the checkpoints this process keeps (run on workers with ``Client.run``)."""
    return _CHECKPOINTS.keys()


@dataclass(frozen=True)
class Opener:
    """The arguments that open a project or predictions again elsewhere.

    ``open_project(source, format, storage_options, **options)`` or
    ``open_predictions(source, format, storage_options, project=…, **options)`` of
    :mod:`connectors.project`.
    """

    source: str
    format: str = "auto"
    storage_options: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "://" not in self.source:  # a worker's working folder is not the driver's
            object.__setattr__(self, "source", os.path.abspath(self.source))

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)


class ReopenablePredictions(PredictionSource):
    """Brought predictions that a Dask worker opens again from their source.

    On the driver it answers from ``opened`` (already opened there); pickled into a
    task it carries only how to open the predictions (and their project, which some
    formats need: YOLO for image sizes, a COCO results list for its images), so no task
    ships the predictions themselves and no worker depends on another's memory.  A
    worker keeps the sources it opened in a small cache (:data:`WORKER_CACHE_SIZE`).
    """

    def __init__(
        self,
        predictions: Opener,
        project: Opener | None = None,
        opened: PredictionSource | None = None,
    ) -> None:
        self.predictions = predictions
        self.project = project
        self._opened = opened

    def __getstate__(self) -> dict[str, Any]:
        return {"predictions": self.predictions, "project": self.project, "_opened": None}

    def opened(self) -> PredictionSource:
        """The prediction source: the driver's, or this worker's (opened on first use)."""
        if self._opened is None:
            recipe = f"{self.predictions.key()} {self.project.key() if self.project else ''}"
            self._opened = _PREDICTIONS.get(recipe, self._open)
        return self._opened

    def _open(self) -> PredictionSource:
        from connectors.project import open_predictions, open_project

        p, project = self.predictions, None
        if self.project is not None:
            q = self.project
            project = open_project(q.source, q.format, q.storage_options, **q.options)
        log.info("worker opened predictions %s", p.source)
        return open_predictions(p.source, p.format, p.storage_options, project=project, **p.options)

    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        return self.opened().get(item_id, item)

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.opened())

    # where the predictions come from, as the opened source says (run metadata)
    @property
    def fs(self) -> Any:
        return getattr(self.opened(), "fs", None)

    @property
    def project_fs(self) -> Any:
        return getattr(self.opened(), "project_fs", None)

    @property
    def source(self) -> Any:
        return getattr(self.opened(), "source", None)


_LOG_PACKAGES = ("autolabel", "difficulty", "connectors")
_worker_prepared = False


class _WorkerLogHandler(logging.Handler):
    """Hands labeltriage's records to the worker's own logger, ``distributed.worker``:
    the worker's log (``Client.get_worker_logs``, the dashboard) and its stderr, at the
    level the worker logs at."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger("distributed.worker")
        if target.isEnabledFor(record.levelno):
            target.handle(record)


def _prepare_worker() -> None:
    """Once per worker process: labeltriage's log lines go to the worker's log, and large
    allocations come from the heap again (see :func:`_heap_for_large_allocations`)."""
    global _worker_prepared
    if _worker_prepared:
        return
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:  # not in a worker (a task run in the client process)
        return
    handler = _WorkerLogHandler()
    quiet_root = not logging.getLogger().handlers
    for name in _LOG_PACKAGES:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        if quiet_root:  # else Python's last-resort handler would print warnings twice
            logger.propagate = False
    _heap_for_large_allocations()
    _worker_prepared = True


MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc's mmap threshold in Dask workers: the ceiling its own dynamic threshold grows to."""


def _heap_for_large_allocations() -> None:
    """Undo the side effect of Dask's ``MALLOC_TRIM_THRESHOLD_`` on large allocations.

    A Dask nanny starts its worker with ``MALLOC_TRIM_THRESHOLD_=65536``; setting it also
    freezes glibc's mmap threshold at 128 KiB, so every tensor above that is a fresh
    ``mmap``/``munmap`` with its page faults.  Measured on model inference (SSDlite, one
    thread): 2–3× slower than the same process without it.  The mmap threshold is raised to
    :data:`MMAP_THRESHOLD` (trimming stays as Dask set it; a dropped checkpoint is trimmed
    at once) when ``MALLOC_TRIM_THRESHOLD_`` is set and ``MALLOC_MMAP_THRESHOLD_`` is not
    (an operator's own choice stays).
    """
    if (
        not sys.platform.startswith("linux")
        or "MALLOC_TRIM_THRESHOLD_" not in os.environ
        or "MALLOC_MMAP_THRESHOLD_" in os.environ
    ):
        return
    import ctypes

    m_mmap_threshold = -3  # mallopt parameter number (malloc.h)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, MMAP_THRESHOLD)


def _read_partition(staging: ProjectFS, part: str) -> list[Item]:
    from connectors.errors import InputError

    try:
        return list(iter_manifest_items(staging, part))
    except (OSError, InputError) as exc:
        raise ClusterError(
            f"a worker cannot read the staged partition {staging.url_of(part)} ({exc}); the "
            "staging folder must be on storage every worker can read: give --staging URL "
            "(config dask_staging), e.g. on s3://"
        ) from exc


def score_partition(
    staging: ProjectFS,
    part: str,
    *,
    project: ProjectFS,
    predictions: PredictionSource | None,
    checkpoint: str | None,
    checkpoint_storage_options: dict[str, Any] | None,
    score_kwargs: dict[str, Any],
) -> pd.DataFrame:
    """One Dask task: read partition ``part`` of the staged manifest and score it.

    Images are decoded in this process (``num_workers=0``).
    """
    _prepare_worker()
    from difficulty.scoring import load_scorers, score_chunk

    load_scorers()
    items = _read_partition(staging, part)
    ckpt = (
        worker_checkpoint(checkpoint, checkpoint_storage_options)
        if checkpoint is not None
        else None
    )
    return score_chunk(
        items,
        project=project,
        predictions=predictions,
        checkpoint=ckpt,
        **{**score_kwargs, "num_workers": 0},
    )


def predict_partition(
    staging: ProjectFS,
    part: str,
    *,
    project: ProjectFS,
    checkpoint: str,
    checkpoint_storage_options: dict[str, Any] | None,
    batch_size: int,
) -> list[Prediction]:
    """One Dask task: the model's predictions for partition ``part`` of the staged manifest.

    An item that could not be decoded gets a :class:`Prediction` with ``error`` set.
    """
    _prepare_worker()
    from difficulty.inference import infer

    items = _read_partition(staging, part)
    ckpt = worker_checkpoint(checkpoint, checkpoint_storage_options)
    out: list[Prediction] = [
        Prediction(item_id=it.item_id, error=it.error) for it in items if it.error
    ]
    for batch in infer(ckpt, [it for it in items if not it.error], project, batch_size=batch_size):
        out.extend(batch.predictions or [])
        out.extend(Prediction(item_id=i, error=e) for i, e in batch.errors.items())
    return out


# -- the driver side ---------------------------------------------------------------------------


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def default_staging(out_dir: str, scheduler: str | None) -> str | None:
    """Where partitions are staged when no staging URL is given.

    A local cluster (``scheduler`` ``None``): ``None``, a temporary folder on this machine.
    A running scheduler: ``<out_dir>/.labeltriage-staging`` (absolute when local), so the
    partitions are wherever the run's outputs are — on S3 when those are.
    """
    if scheduler is None:
        return None
    base = os.path.abspath(out_dir) if "://" not in out_dir else out_dir.rstrip("/")
    return f"{base}/{STAGING_DIR}"


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast on a refused or unresolvable ``tcp://``/``tls://`` scheduler address."""
    if not address.startswith(("tcp://", "tls://")):
        return
    rest = address.split("://", 1)[1].rstrip("/")
    if rest.startswith("["):  # [IPv6]:PORT
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port = rest.partition(":")
    if port and not port.isdigit():
        return  # not an address this check understands: the client says what is wrong
    try:
        with socket.create_connection((host, int(port or _DEFAULT_SCHEDULER_PORT)), timeout):
            pass
    except OSError as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc


def _quiet_dask_logs() -> dict[str, int]:
    """Dask's own log lines in this process — with tracebacks of what the run reports as
    one :class:`ClusterError` — only when it logs at INFO or below (``labeltriage -v``).

    Returns the levels it changed, by logger name, to restore afterwards.
    """
    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        return {}
    loggers = logging.Logger.manager.loggerDict
    names = ["distributed"] + [
        name
        for name, logger in loggers.items()
        if name.startswith("distributed.")
        and isinstance(logger, logging.Logger)
        and logger.level != logging.NOTSET
    ]
    changed = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return changed


@dataclass
class DaskEngine:
    """A Dask client and a staging folder; use as a context manager.

    ``scheduler``: ``None`` for a local cluster of ``n_workers`` processes on 127.0.0.1,
    else the address of a running scheduler (``tcp://HOST:PORT``).  ``staging``: the URL
    under which partitions are written for the workers to read (``staging_options``: its
    fsspec options); ``None``: a temporary folder on this machine, removed on exit (fit
    for a local cluster only).  ``checkpoint_storage_options``: fsspec options for
    reading a checkpoint, when the task's own arguments do not carry them.
    ``progress``: a bar counting the items of finished partitions.
    """

    scheduler: str | None = None
    n_workers: int = DEFAULT_WORKERS
    staging: str | None = None
    staging_options: dict[str, Any] | None = None
    checkpoint_storage_options: dict[str, Any] | None = None
    progress: bool = False

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
        self._dask_log_levels = _quiet_dask_logs()
        try:
            if self.scheduler is None:
                with warnings.catch_warnings():  # the HTTP port of the scheduler's health checks
                    warnings.filterwarnings("ignore", message="Port .* is already in use")
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
                _check_reachable(self.scheduler, timeout=CONNECT_TIMEOUT_S / 2)
                self.client = distributed.Client(self.scheduler, timeout=CONNECT_TIMEOUT_S)
        except LabelTriageError:
            self.__exit__()
            raise
        except Exception as exc:
            self.__exit__()
            where = self.scheduler or "a local cluster"
            raise ClusterError(
                f"cannot start the Dask client for {where}: {_one_line(exc)}"
            ) from exc
        if self.scheduler is not None and not self.client.scheduler_info().get("workers"):
            log.warning(
                "the Dask scheduler %s has no workers yet; tasks wait for one", self.scheduler
            )
        if self.staging is None:
            self._tmp = tempfile.mkdtemp(prefix="labeltriage-dask-")
            self.staging = self._tmp
            if self.scheduler is not None:
                log.warning(
                    "partitions are staged on this machine (%s): workers elsewhere cannot read "
                    "them; give a staging URL they can read",
                    self._tmp,
                )
        log.info("dask engine: %s, staging %s", self.client, self.staging)
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
            self.staging = self._tmp = None
        self.client = self._cluster = None
        for name, level in getattr(self, "_dask_log_levels", {}).items():
            logging.getLogger(name).setLevel(level)
        self._dask_log_levels = {}

    def map_chunks(
        self,
        chunks: Iterable[Sequence[Item]],
        *,
        project: ProjectFS,
        predictions: PredictionSource | None = None,
        checkpoint: str | None = None,
        checkpoint_storage_options: dict[str, Any] | None = None,
        **score_kwargs: Any,
    ) -> Iterator[pd.DataFrame]:
        """Score every chunk as one Dask task; yield the tables in chunk order.

        The keyword arguments are those of :func:`difficulty.scoring.score_chunk`;
        ``num_workers`` is 0 on the workers (they decode in their own process).
        ``predictions`` travel with every task: make them :class:`ReopenablePredictions`
        so that each worker opens them from their source instead.
        """
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise UsageError(
                "the dask engine needs the checkpoint as a path or URL, not a loaded object"
            )
        yield from self._run_partitions(
            "score",
            score_partition,
            chunks,
            project=project,
            predictions=predictions,
            checkpoint=checkpoint,
            checkpoint_storage_options=checkpoint_storage_options
            or self.checkpoint_storage_options,
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
            checkpoint_storage_options=self.checkpoint_storage_options,
            batch_size=batch_size,
        )

    def _run_partitions(
        self, kind: str, task: Callable[..., Any], chunks: Iterable[Sequence[Item]], **kwargs: Any
    ) -> Iterator[Any]:
        """Stage each chunk as a manifest part, run ``task`` on it as one Dask task, yield
        the results in chunk order, and remove the parts (also when the caller stops early
        or the run fails)."""
        if self.client is None or self.staging is None:
            raise RuntimeError("use DaskEngine as a context manager")
        from tqdm import tqdm

        token = uuid.uuid4().hex[:12]
        folder = f"{kind}-{token}"
        staging = ProjectFS(self.staging, self.staging_options)
        futures: list[Any] = []
        bar = tqdm(
            desc=kind, unit="item", file=sys.stderr, disable=not self.progress, dynamic_ncols=True
        )

        def count(n: int) -> Callable[[Any], None]:
            def done(future: Any) -> None:
                if future.status == "finished":
                    bar.update(n)

            return done

        try:
            for index, chunk in enumerate(chunks):
                part = f"{folder}/part-{index:05d}.parquet"
                try:
                    write_batches(items_to_batches(chunk), staging, part, ITEM_SCHEMA)
                except OSError as exc:
                    raise ClusterError(
                        f"cannot stage partition {staging.url_of(part)}: {_one_line(exc)}"
                    ) from exc
                key = f"labeltriage-{kind}-{token}-{index:05d}"
                try:
                    future = self.client.submit(task, staging, part, key=key, pure=False, **kwargs)
                except Exception as exc:
                    raise ClusterError(
                        f"cannot submit {key} to the Dask cluster: {_one_line(exc)}"
                    ) from exc
                future.add_done_callback(count(len(chunk)))
                futures.append(future)
            log.info("dask engine: %d %s partitions submitted", len(futures), kind)
            for index, future in enumerate(futures):
                yield self._result(future)
                futures[index] = None  # the worker may forget the result now
        finally:
            bar.close()
            pending = [f for f in futures if f is not None and not f.done()]
            if pending:
                with contextlib.suppress(Exception):
                    self.client.cancel(pending)
            self._remove_staged(staging, folder)

    def _result(self, future: Any) -> Any:
        try:
            return future.result()
        except ClusterError:
            raise
        except (Exception, CancelledError) as exc:
            from distributed.comm.core import CommClosedError

            # a closed connection is the scheduler lost, even before the client has noticed
            if (
                isinstance(exc, CommClosedError)
                or getattr(self.client, "status", "running") != "running"
            ):
                where = self.scheduler or "of the local cluster"
                raise ClusterError(
                    f"lost the connection to the Dask scheduler {where} while waiting for "
                    f"task {future.key}: {_one_line(exc)}"
                ) from exc
            raise ClusterError(f"Dask task {future.key} failed: {_one_line(exc)}") from exc

    def _remove_staged(self, staging: ProjectFS, folder: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            staging.fs.rm(staging.resolve(folder), recursive=True)
        if staging.is_local and posixpath.basename(staging.root.rstrip("/")) == STAGING_DIR:
            with contextlib.suppress(OSError):
                os.rmdir(staging.root)  # only when empty: other runs may stage here too

    def checkpoint_loads(self) -> dict[str, dict[str, int]]:
        """Per worker: how many times each checkpoint was loaded there."""
        return dict(self.client.run(checkpoint_loads))


def _as_url(path: str, out_dir: str, storage_options: dict[str, Any] | None) -> str:
    """A written file's full path as a URL (``s3://bucket/…`` keeps its protocol)."""
    out = ProjectFS(out_dir, storage_options)
    if out.is_local:
        return path
    with contextlib.suppress(LabelTriageError):
        return out.url_of(out.relative(path))
    return path


def score_project_with_engine(
    project: ProjectFormat,
    options: ScoreOptions | None = None,
    *,
    engine: str = "local",
    scheduler: str | None = None,
    n_workers: int = DEFAULT_WORKERS,
    staging: str | None = None,
    partition_size: int | None = None,
    **kwargs: Any,
) -> Any:
    """:func:`difficulty.scoring.score_project` on the chosen engine (``local`` or ``dask``).

    ``options`` and the keyword arguments are those of ``score_project``.  With ``engine="dask"`` its
    chunks run as Dask tasks of ``partition_size`` items (default
    :data:`DEFAULT_PARTITION_SIZE`), staged under ``staging`` (default:
    :func:`default_staging`; it is read and written with ``storage_options``, like the
    output folder); the result is the same.  ``progress`` then counts the items of
    finished partitions.  The result's ``paths`` are URLs.
    """
    from difficulty.scoring import score_project

    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    kwargs["options"] = options
    if partition_size is not None and partition_size < 1:
        raise UsageError(f"partition size must be at least 1, got {partition_size}")
    if engine == "local":
        result = score_project(project, **kwargs)
    else:
        if partition_size is not None or (
            "chunk_size" not in kwargs
            and "chunk_size" not in getattr(options, "model_fields_set", ())
        ):
            kwargs["chunk_size"] = partition_size or DEFAULT_PARTITION_SIZE
        options = kwargs.get("storage_options")
        with DaskEngine(
            scheduler=scheduler,
            n_workers=n_workers,
            staging=staging or default_staging(kwargs["out_dir"], scheduler),
            staging_options=options,
            checkpoint_storage_options=options,
            progress=bool(kwargs.pop("progress", False)),
        ) as dask_engine:
            result = score_project(project, chunk_runner=dask_engine.map_chunks, **kwargs)
    result.paths = {
        k: _as_url(str(v), kwargs["out_dir"], kwargs.get("storage_options"))
        for k, v in result.paths.items()
    }
    return result


__all__ = [
    "ENGINES",
    "ClusterError",
    "DaskEngine",
    "Opener",
    "ReopenablePredictions",
    "default_staging",
    "predict_partition",
    "score_partition",
    "score_project_with_engine",
    "worker_checkpoint",
]

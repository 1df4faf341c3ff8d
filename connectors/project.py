"""Open a project (and a prediction source) from a URL and a format name.

``source`` is any fsspec URL or local path.  When it names a **file** (a COCO JSON, a
Label Studio export, a Parquet manifest, a YOLO ``data.yaml``), the project root is the
file's folder and the format gets the option ``file=<basename>``; when it names a
**folder**, that folder is the root.

``fmt="auto"`` decides the format:

* for a folder, each registered format's ``detect`` runs in :func:`detect_order`; exactly
  one must match, else a :class:`~connectors.errors.UsageError` lists what was looked
  for (none matched) or which formats matched (several);
* for a file, each format's ``detect_file`` in the same order (by suffix: ``.parquet`` →
  ``manifest``, ``.yaml``/``.yml``/``.txt`` → ``yolo``, ``.json`` → ``labelstudio`` when
  the document is a JSON list (an export of tasks), ``coco`` when it is an object);
* an ``http://`` or ``https://`` source (with ``fmt`` ``auto`` or ``labelstudio``) is a live
  Label Studio server: format ``labelstudio_api``, opened with its
  ``from_url(url, storage_options=..., **options)``;
* a ``fiftyone://NAME`` source is a FiftyOne dataset: format ``fiftyone``, opened the same way.

Opening a project also recovers it: an auto-label run that was cut short (its process
killed in the middle of the write-back) is rolled back, or completed if it had
committed, before anything reads the project (:func:`connectors.writeback.recover`).
A recovery that fails is logged and the project opens anyway: an interrupted run's
labels still carry their sidecars or run ids, so they read as auto-labels.

The option ``allow_image_hosts`` (a list) is the project's image-source policy: item
images are read from the project's own storage only, unless their URL starts with one
of these prefixes or is on one of these hosts (see :func:`difficulty.imageio.read_image_bytes`).
"""

from __future__ import annotations

import itertools
import logging
import posixpath
from typing import Any

from connectors.errors import LabelTriageError, UsageError
from connectors.formats import FORMATS, PREDICTION_FORMATS
from connectors.formats.base import PredictionSource, ProjectFormat
from connectors.storage import ProjectFS, open_fs

log = logging.getLogger(__name__)


def _is_remote_api(source: str) -> bool:
    return source.startswith(("http://", "https://"))


URL_FORMATS = ("labelstudio_api", "fiftyone")
"""Formats opened from a URL of their own, never by looking at a folder."""
FIFTYONE_SCHEME = "fiftyone://"


def _open_fiftyone(registry: Any, source: str, fmt: str, **kwargs: Any) -> Any:
    """A ``fiftyone://`` project or prediction source (``fmt`` must be ``auto`` or ``fiftyone``)."""
    if fmt not in ("auto", "fiftyone"):
        raise UsageError(
            f"{source} is a FiftyOne dataset: use format fiftyone (or auto), not {fmt}"
        )
    return registry["fiftyone"].from_url(source, **kwargs)


def split_source(
    source: str, storage_options: dict[str, Any] | None = None
) -> tuple[ProjectFS, str | None]:
    """The project root of ``source`` and, when ``source`` is a file, its basename."""
    if not source:
        raise UsageError("no source given: pass a project folder or file (--source)")
    fs, path = open_fs(source, storage_options)
    try:
        is_file = bool(fs.isfile(path))
        exists = is_file or bool(fs.isdir(path))
    except OSError as exc:
        raise UsageError(f"{source}: cannot be read: {exc}") from exc
    if not exists:
        raise UsageError(f"{source}: no such file or folder")
    if not is_file:
        return ProjectFS(source, storage_options), None
    protocol, sep, rest = source.rpartition("://")
    head, name = posixpath.split(rest.rstrip("/"))
    root = f"{protocol}://{head}" if sep else (head or ".")
    return ProjectFS(root, storage_options), name


def detect_order() -> list[str]:
    """The formats ``--format auto`` asks about a folder, in order: by each format's
    ``detect_priority``, then by name (URL formats are never detected from a folder)."""
    names = [n for n in FORMATS if n not in URL_FORMATS]
    return sorted(names, key=lambda n: (FORMATS[n].detect_priority, n))


def detect_format(project: ProjectFS) -> str:
    """The one registered format whose ``detect`` accepts the folder ``project``.

    Formats are asked in :func:`detect_order`.  Raises :class:`UsageError` when none or
    several match, naming what each format looked for (its ``looked_for``).
    """
    names = detect_order()
    matches = []
    for name in names:
        try:
            if FORMATS[name].detect(project):
                matches.append(name)
        except (LabelTriageError, OSError, ValueError) as exc:
            log.debug("%s: format %s could not check the folder: %s", project.url, name, exc)
    if len(matches) == 1:
        log.info("%s: detected format %s", project.url, matches[0])
        return matches[0]
    if not matches:
        looked = "; ".join(f"{n}: {FORMATS[n].looked_for}" for n in names)
        raise UsageError(
            f"{project.url}: no known project layout found (looked for {looked}); pass --format"
        )
    raise UsageError(
        f"{project.url}: several formats match ({', '.join(matches)}); pass --format to choose one"
    )


def detect_file_format(project: ProjectFS, name: str) -> str:
    """The first format (in :func:`detect_order`) whose ``detect_file`` accepts ``name``."""
    names = detect_order()
    for fmt in names:
        if FORMATS[fmt].detect_file(project, name):
            return fmt
    suffixes = sorted({s for n in names for s in FORMATS[n].file_suffixes})
    raise UsageError(
        f"{project.url_of(name)}: cannot tell the format of this file (looked for {', '.join(suffixes)}); pass --format"
    )


def open_project(
    source: str,
    fmt: str = "auto",
    storage_options: dict[str, Any] | None = None,
    *,
    recover: bool = True,
    **options: Any,
) -> ProjectFormat:
    """The project at ``source`` in format ``fmt`` (``"auto"`` detects it), recovered
    from any interrupted auto-label run unless ``recover`` is false.

    Raises :class:`UsageError` for an unknown format, a missing source, or an
    undetectable layout.
    """
    image_hosts = _image_hosts(options.pop("allow_image_hosts", None))
    if source.startswith(FIFTYONE_SCHEME):
        project: ProjectFormat = _open_fiftyone(
            FORMATS, source, fmt, storage_options=storage_options, **options
        )
    elif _is_remote_api(source) and fmt in ("auto", "labelstudio", "labelstudio_api"):
        cls = FORMATS["labelstudio_api"]
        from_url = getattr(cls, "from_url", None)
        if from_url is None:
            raise UsageError(f"format labelstudio_api cannot open {source}: it has no from_url")
        project = from_url(source, storage_options=storage_options, **options)
    else:
        if fmt != "auto":
            FORMATS[fmt]
        root, file = split_source(source, storage_options)
        if file is not None:
            options = {**options, "file": file}
        if fmt == "auto":
            fmt = detect_file_format(root, file) if file is not None else detect_format(root)
        project = FORMATS[fmt](root, **options)
    fs = getattr(project, "project", None)
    if isinstance(fs, ProjectFS):
        fs.allow_image_hosts = image_hosts
        if recover:
            recover_project(project)
    return project


def _image_hosts(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise UsageError(
            f"allow_image_hosts must be a list of hosts or URL prefixes, not {value!r}"
        )
    return tuple(value)


def recover_project(project: ProjectFormat) -> None:
    """Roll back or complete the project's interrupted auto-label runs (logged, never raised)."""
    from connectors.writeback import recover

    try:
        recover(project)
    except (LabelTriageError, OSError, ValueError) as exc:
        log.warning(
            "%s: could not recover an interrupted auto-label run (%s); run `labeltriage recover`",
            project.project.url,
            exc,
        )


def open_predictions(
    source: str,
    fmt: str,
    storage_options: dict[str, Any] | None = None,
    *,
    project: ProjectFormat | None = None,
    **options: Any,
) -> PredictionSource:
    """Predictions a user brings, at ``source`` in prediction format ``fmt``.

    Same file/folder rule as :func:`open_project`; the source class is built as
    ``cls(root, project=project, **options)`` (plus ``file=`` for a file source).
    ``fmt="auto"``: a ``.json`` file is ``coco``, a folder with ``.txt`` files is ``yolo``.
    An ``http(s)://`` source (``fmt`` ``auto`` or ``labelstudio``) reads the predictions
    stored in a live Label Studio project; a ``fiftyone://NAME`` source reads a predictions
    field of a FiftyOne dataset.
    """
    if source.startswith(FIFTYONE_SCHEME):
        fo_predictions: PredictionSource = _open_fiftyone(
            PREDICTION_FORMATS,
            source,
            fmt,
            storage_options=storage_options,
            project=project,
            **options,
        )
        return fo_predictions
    if _is_remote_api(source) and fmt in ("auto", "labelstudio", "labelstudio_api"):
        remote_cls: Any = PREDICTION_FORMATS["labelstudio_api"]
        remote: PredictionSource = remote_cls.from_url(
            source, storage_options=storage_options, **options
        )
        return remote
    if fmt == "labelstudio_api":
        raise UsageError(
            f"{source}: predictions format labelstudio_api reads a live Label Studio project; "
            "give its URL, http(s)://HOST:PORT/projects/ID"
        )
    if fmt != "auto":
        PREDICTION_FORMATS[fmt]
    root, file = split_source(source, storage_options)
    if file is not None:
        options = {**options, "file": file}
    if fmt == "auto":
        if file is not None and file.lower().endswith(".json"):
            fmt = "coco"
        elif file is None and any(
            p.endswith(".txt") for p in itertools.islice(root.walk_files(), 100)
        ):
            fmt = "yolo"
        else:
            raise UsageError(
                f"{source}: cannot tell the predictions format (looked for a COCO .json file or a folder of YOLO .txt files); pass --predictions-format"
            )
    # Prediction sources are built as (root, *, project, **options).
    source_cls: Any = PREDICTION_FORMATS[fmt]
    predictions: PredictionSource = source_cls(root, project=project, **options)
    return predictions

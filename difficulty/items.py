"""Small rules over items and scored rows that scoring, gating, calibration, training and
the ML backend share (one place each):

* :func:`chunks` — a stream of items cut into lists of at most ``size``;
* :func:`task_of` — the task a project is scored and gated as, from its format;
* :func:`project_fs` — the project root of a format object (or a root given as is);
* :func:`usable_scores` — the rows of a difficulty table whose score can be used.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar, overload

import numpy as np
import pandas as pd

from connectors.storage import ProjectFS

T = TypeVar("T")


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter), read lazily."""
    if size < 1:
        raise ValueError(f"chunk size {size} is not positive")
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def task_of(project: Any) -> str:
    """``detection`` when the project's format reads detection labels, else its first task.

    A format declares its tasks in ``tasks`` (``("detection",)`` when it says nothing).
    """
    tasks = tuple(getattr(project, "tasks", None) or ("detection",))
    return "detection" if "detection" in tasks else str(tasks[0])


@overload
def project_fs(project: None) -> None: ...
@overload
def project_fs(project: Any) -> ProjectFS: ...
def project_fs(project: Any) -> ProjectFS | None:
    """The :class:`ProjectFS` of ``project``: a root as is, a format object's ``.project``
    (``None`` stays ``None``); :class:`TypeError` for anything else."""
    if project is None or isinstance(project, ProjectFS):
        return project
    inner = getattr(project, "project", None)
    if isinstance(inner, ProjectFS):
        return inner
    raise TypeError(f"expected a ProjectFS or a project format, got {type(project).__name__}")


def usable_scores(
    table: pd.DataFrame, *, unlabeled_only: bool = False, at_most: float | None = None
) -> dict[str, float]:
    """``item_id → score`` of the rows without ``error`` and with a finite score.

    ``unlabeled_only``: only rows whose ``status`` is ``unlabeled`` (when the table has
    that column); ``at_most``: only scores ``≤`` it (the easy tier below a threshold).
    """
    score = table["score"].to_numpy(dtype=np.float64, na_value=np.nan)
    keep = np.isfinite(score)
    if "error" in table.columns:
        keep &= table["error"].isna().to_numpy()
    if unlabeled_only and "status" in table.columns:
        keep &= (table["status"] == "unlabeled").to_numpy()
    if at_most is not None:
        keep &= score <= float(at_most)
    ids = table["item_id"].astype(str).to_numpy()[keep]
    return dict(zip(ids.tolist(), score[keep].tolist(), strict=True))

"""What labeltriage stores in a Label Studio project, and how it is recognised again.

Every prediction labeltriage stores in Label Studio — written by an auto-label run, or
answered by ``labeltriage serve`` and stored by Label Studio ("Retrieve predictions") —
carries its provenance in two places:

* ``model_version`` = ``labeltriage-<package version>/<run_id>`` (:func:`model_version_for`).
  Label Studio keeps it on every prediction, an empty one included, and shows it on the
  prediction's tab in the labeling UI, so a labeler tells labeltriage's tab from the
  platform model's.  The ML backend reports the same string for the run it serves from:
  Label Studio then never asks it again about a task that already holds that run's
  prediction.
* every region's ``meta``: ``meta["labeltriage"]`` = ``{run_id, model_version (the model
  the label came from), tier, score, via ("run" or "serve"), sha256, …}`` for machines and
  ``meta["text"]`` = one line the labeling UI shows (:func:`provenance_meta`).

The export-file format also keeps the dict at the prediction's top level under
``"labeltriage"`` (Label Studio's import drops unknown keys there; the ``model_version``
survives).  :func:`provenance_of` reads any of the three marks; a prediction that has one
is labeltriage's: never read as input (the platform's predictions), never counted as a
human label, and removed only by the rollback of its run.

``sha256`` (:func:`content_sha256`) is a checksum of the prediction's regions without their
``meta`` plus its ``model_version``: a prediction whose content changed since it was
written (someone edited it through the API) is kept by rollback.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connectors.formats.base import Provenance

META_KEY = "labeltriage"
"""Key of the provenance in a region's ``meta`` (and at an exported prediction's top level)."""
MODEL_VERSION_PREFIX = "labeltriage-"


@functools.cache
def package_version() -> str:
    """labeltriage's installed version (``0`` when it runs from a source tree not installed)."""
    try:
        return importlib.metadata.version("labeltriage")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def model_version_for(run_id: str | None) -> str:
    """``labeltriage-<version>/<run_id>``: the ``model_version`` of what run ``run_id`` stores."""
    return f"{MODEL_VERSION_PREFIX}{package_version()}/{run_id or 'unknown'}"


def run_id_of_version(model_version: Any) -> str | None:
    """The run id inside a labeltriage ``model_version``, or ``None`` for any other string."""
    if not isinstance(model_version, str) or not model_version.startswith(MODEL_VERSION_PREFIX):
        return None
    _, sep, run_id = model_version.partition("/")
    return run_id if sep and run_id else None


def provenance_meta(
    provenance: Provenance, *, via: str = "run", sha256: str | None = None
) -> dict[str, Any]:
    """A region's ``meta``: the provenance for machines and one line for the labeling UI."""
    body: dict[str, Any] = {
        "run_id": provenance.run_id,
        "model_version": provenance.model_version,
        "tier": provenance.tier,
        "score": provenance.score,
        "via": via,
        **provenance.extra,
    }
    if sha256 is not None:
        body["sha256"] = sha256
    what = "auto-label" if via == "run" else "pre-annotation"
    text = (
        f"labeltriage {what}, run {provenance.run_id}, tier {provenance.tier or '?'}, "
        f"model {provenance.model_version}"
    )
    return {META_KEY: body, "text": [text]}


def provenance_of(prediction: Any) -> dict[str, Any] | None:
    """The labeltriage provenance of a stored prediction, or ``None`` when it is not ours.

    Looked for at the prediction's top level (export files), in its regions' ``meta``, then
    in its ``model_version``; the first found wins (``run_id`` filled in from the
    ``model_version`` where the others lack it).
    """
    if not isinstance(prediction, dict):
        return None
    from_version = run_id_of_version(prediction.get("model_version"))
    found: dict[str, Any] | None = None
    top = prediction.get(META_KEY)
    if isinstance(top, dict):
        found = dict(top)
    else:
        for region in prediction.get("result") or []:
            meta = region.get("meta") if isinstance(region, dict) else None
            if isinstance(meta, dict) and isinstance(meta.get(META_KEY), dict):
                found = dict(meta[META_KEY])
                break
    if found is None:
        return None if from_version is None else {"run_id": from_version}
    if not found.get("run_id") and from_version is not None:
        found["run_id"] = from_version
    return found


def is_labeltriage(prediction: Any) -> bool:
    """True for a prediction labeltriage stored (see :func:`provenance_of`)."""
    return provenance_of(prediction) is not None


def without_meta(result: Any) -> list[Any]:
    """The regions of ``result`` without their ``meta`` (what a checksum covers)."""
    if not isinstance(result, list):
        return []
    return [
        {k: v for k, v in r.items() if k != "meta"} if isinstance(r, dict) else r for r in result
    ]


def _sha(payload: dict[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def content_sha256(result: Any, model_version: Any) -> str:
    """Checksum of a prediction's content: its regions without ``meta``, and its model version."""
    return _sha({"result": without_meta(result), "model_version": model_version})


def content_unchanged(recorded: str | None, result: Any, model_version: Any) -> bool:
    """True when a prediction still has the content a record's checksum ``recorded`` says.

    Records written by labeltriage 0.1 hashed the regions with their ``meta``; both
    checksums are accepted.
    """
    if recorded is None:
        return True
    return recorded in (
        content_sha256(result, model_version),
        _sha({"result": result, "model_version": model_version}),
    )


__all__ = [
    "META_KEY",
    "MODEL_VERSION_PREFIX",
    "content_sha256",
    "content_unchanged",
    "is_labeltriage",
    "model_version_for",
    "package_version",
    "provenance_meta",
    "provenance_of",
    "run_id_of_version",
    "without_meta",
]

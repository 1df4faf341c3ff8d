"""The manager's report: ``report.html`` (one self-contained file), ``summary.json``, ``plan.csv``.

:func:`write_report` reads a run folder — the difficulty table (``difficulty.parquet``)
and, when the auto-label gate ran, its run record (``autolabel.json``,
:class:`difficulty.runrecord.GateRecord`) — computes the plan (:mod:`difficulty.plan`)
from what the gate actually did, and writes, into the same folder:

* ``report.html`` — opens offline: the CSS is inline, the plots are inline PNG
  (``data:image/png;base64``) drawn with matplotlib, the thumbnails inline JPEG drawn
  with Pillow (labels and predictions as boxes).  Sections (element ids): ``tiers``
  (counts, thresholds and what "easy" means), ``distributions`` (combined score by tier
  and each scorer's raw values), ``hardest`` / ``easiest`` (thumbnails in score order,
  with a "why hard" line), ``agreement`` (each scorer's agreement with the true error
  of the predictions, the chosen weights, the cross-validated candidates, the true error
  per tier), ``plan`` (hours per tier, hours saved by what the gate wrote, forecast,
  assignment), ``trend`` (tier counts and remaining hours across the earlier runs) and
  ``autolabel`` (the gate's verdict in one sentence, its counts, the risk–coverage curve
  of the calibration with ε and the threshold, thumbnails of the written — in shadow:
  would-be — labels and of the audit sample, audit precision);
* ``summary.json`` — the scoring summary plus ``plan``, ``trend`` and ``autolabel``;
* ``plan.csv`` — one row per tier and a total (see :func:`difficulty.plan.plan_table`);
* ``assignment.csv`` — ``item_id, tier, score, hours, assignee`` per remaining item.

Earlier runs (``history``): run folders of the same project in the report store.  By
default the siblings of ``run_dir`` (the store keeps ``<project>/<run_id>/``) that hold a
``difficulty.parquet`` of the same source created before this run.

Boxes on thumbnails: the project's labels (read for the shown items only) and, when
``predictions`` are given, the predictions after the run's label map.  Rendering needs
no torch: images are decoded with Pillow at reduced size.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import posixpath
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from connectors.csvsafe import csv_text
from connectors.errors import InputError, LabelTriageError
from connectors.formats.base import PredictionSource, ProjectFormat
from connectors.labelmap import LabelMap, LabelMapCheck
from connectors.model import Annotation, Item, ItemStatus
from connectors.storage import ProjectFS
from difficulty.combine import ecdf_midrank
from difficulty.plan import PlanSettings, assign, compute_plan, seconds_per_tier, write_plan
from difficulty.runrecord import GateRecord, read_gate_record
from difficulty.table import FILENAME, read_difficulty, scorer_columns
from difficulty.tiers import TIERS, largest_tie

log = logging.getLogger(__name__)

TEMPLATE = "report.html"
TIER_COLORS = {"easy": "#2f9e62", "medium": "#e0a31f", "hard": "#d1453b", "unscored": "#9aa3ad"}
LABEL_COLOR = "#00a6d6"
"""Boxes of the project's labels on thumbnails."""
PREDICTION_COLOR = "#ff2d95"
"""Boxes of predictions (and of written or would-be auto-labels) on thumbnails."""
THUMB_BOX = (320, 200)
SHARE_TOLERANCE = 0.05
"""How far a quantile tier may be from its configured share before the report says why."""
SECTIONS = (
    "tiers",
    "distributions",
    "hardest",
    "easiest",
    "agreement",
    "plan",
    "trend",
    "autolabel",
)
WHY = {
    "fourier": "busy image: much fine detail",
    "fourier_entropy": "cluttered image: spread-out spectrum",
    "box_least_confidence": "the surest box is unsure",
    "box_margin": "boxes near 50 % confidence",
    "box_uncertain_share": "many boxes of middling confidence",
    "box_expected_count": "many objects expected",
    "box_count_variance": "many uncertain boxes",
    "box_count": "many boxes",
    "predicted_loss": "high predicted loss",
    "learning_loss": "high predicted loss",
    "least_confidence": "low top-class probability",
    "margin": "top two classes close",
    "entropy": "class probabilities spread out",
    "vote_entropy": "the committee disagrees",
    "consensus_entropy": "the committee is unsure",
    "egl": "large expected gradient",
}
"""The plain-language reason a scorer gives for a high value (the "why hard" line)."""


# -- plots ---------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white", pil_kwargs={"compress_level": 1})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(w: float, h: float, **margins: float) -> Any:
    """A figure with fixed margins (in figure fractions): no layout engine to run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    fig.subplots_adjust(**{"left": 0.1, "right": 0.97, "bottom": 0.18, "top": 0.9, **margins})
    return fig


def _style(ax: Any) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.spines["left"].set_color("#b8bfc7")
    ax.spines["bottom"].set_color("#b8bfc7")
    ax.tick_params(colors="#44505c", labelsize=9)
    ax.grid(axis="y", color="#e6e9ed", linewidth=0.8)
    ax.set_axisbelow(True)


def plot_tiers(counts: dict[str, int]) -> str:
    fig = _figure(5.2, 2.6, left=0.14, bottom=0.12)
    ax = fig.add_subplot()
    names = [t for t in (*TIERS, "unscored") if t in counts]
    values = [counts[t] for t in names]
    bars = ax.bar(names, values, color=[TIER_COLORS[t] for t in names], width=0.6)
    for b, v in zip(bars, values, strict=True):
        ax.annotate(
            f"{v:,}",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
            color="#1f2a36",
        )
    ax.set_ylabel("items", fontsize=9, color="#44505c")
    _style(ax)
    return _png(fig)


def plot_score_distribution(df: pd.DataFrame, thresholds: tuple[float, float]) -> str:
    fig = _figure(7.0, 2.8, left=0.08, bottom=0.17, top=0.84)
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 41)
    data = [df.loc[df["tier"] == t, "score"].dropna().to_numpy() for t in TIERS]
    ax.hist(
        data,
        bins=bins,
        stacked=True,
        color=[TIER_COLORS[t] for t in TIERS],
        label=list(TIERS),
        histtype="stepfilled",
        linewidth=0,
    )
    for row, (x, name) in enumerate(zip(thresholds, ("easy ≤", "hard ≥"), strict=True)):
        if np.isfinite(x):
            ax.axvline(x, color="#1f2a36", linestyle="--", linewidth=1)
            ax.annotate(
                f"{name} {x:.2f}",
                (x, ax.get_ylim()[1]),
                xytext=(3, -12 - 12 * row),
                textcoords="offset points",
                fontsize=8,
                color="#1f2a36",
            )
    ax.set_xlabel(
        "combined difficulty score (0 = easiest, 1 = hardest)", fontsize=9, color="#44505c"
    )
    ax.set_ylabel("items", fontsize=9, color="#44505c")
    ax.legend(frameon=False, fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, 1.2))
    _style(ax)
    return _png(fig)


def scorer_histograms(
    df: pd.DataFrame,
    scorers: Sequence[str],
    weights: dict[str, float],
    dropped: Iterable[str],
    *,
    bins: int = 30,
) -> list[dict[str, Any]]:
    """Each scorer's raw values as a small inline SVG histogram (no plotting library: a
    few rectangles per scorer), with its weight and range."""
    gone = set(dropped)
    out = []
    width, height = 220, 56
    for name in scorers:
        v = df[name].to_numpy(dtype=np.float64, na_value=np.nan)
        v = v[np.isfinite(v)]
        w = weights.get(name) or 0.0
        color = "#9aa3ad" if name in gone or w == 0 else "#3b6ea8" if w > 0 else "#8e5ba8"
        rects = []
        if v.size:
            lo, hi = float(v.min()), float(v.max())
            counts, _ = np.histogram(
                v, bins=bins, range=(lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)
            )
            top = max(int(counts.max()), 1)
            step = width / bins
            for i, c in enumerate(counts):
                if c:
                    h = max(1.0, height * c / top)
                    rects.append(
                        f'<rect x="{i * step:.1f}" y="{height - h:.1f}" width="{step - 0.6:.1f}" '
                        f'height="{h:.1f}" fill="{color}"/>'
                    )
        svg = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="histogram of {html.escape(name)}">'
            + "".join(rects)
            + f'<line x1="0" y1="{height}" x2="{width}" y2="{height}" stroke="#b8bfc7"/></svg>'
        )
        note = (
            "dropped: constant" if name in gone else f"w = {w:.2f}{', reversed' if w < 0 else ''}"
        )
        out.append(
            {
                "name": name,
                "note": note,
                "svg": svg,  # built here from numbers and an escaped name
                "min": float(v.min()) if v.size else None,
                "median": float(np.median(v)) if v.size else None,
                "max": float(v.max()) if v.size else None,
            }
        )
    return out


def plot_agreement(rhos: dict[str, float | None], combined: float | None) -> str | None:
    items = [(k, v) for k, v in rhos.items() if v is not None]
    if not items:
        return None
    items.sort(key=lambda kv: kv[1])
    if combined is not None:
        items.append(("combined score", combined))
    longest = max(len(k) for k, _ in items)
    fig = _figure(
        6.0,
        0.32 * len(items) + 0.9,
        left=min(0.45, 0.02 + 0.012 * longest),
        bottom=0.55 / (0.32 * len(items) + 0.9),
        top=1 - 0.1 / (0.32 * len(items) + 0.9),
    )
    ax = fig.add_subplot()
    names = [k for k, _ in items]
    vals = [v for _, v in items]
    colors = [
        "#1f2a36" if k == "combined score" else ("#3b6ea8" if v > 0 else "#9aa3ad")
        for k, v in items
    ]
    ax.barh(names, vals, color=colors, height=0.62)
    for y, v in enumerate(vals):
        ax.annotate(
            f"{v:+.3f}",
            (v, y),
            xytext=(4 if v >= 0 else -4, 0),
            textcoords="offset points",
            va="center",
            ha="left" if v >= 0 else "right",
            fontsize=8,
        )
    ax.axvline(0, color="#44505c", linewidth=0.8)
    lo = min(0.0, min(vals)) - 0.1
    hi = max(0.0, max(vals)) + 0.15
    ax.set_xlim(lo, hi)
    ax.set_xlabel(
        "Spearman ρ with the true per-item error (labeled items)", fontsize=9, color="#44505c"
    )
    _style(ax)
    ax.grid(axis="x", color="#e6e9ed", linewidth=0.8)
    ax.grid(axis="y", visible=False)
    return _png(fig)


def plot_error_by_tier(df: pd.DataFrame) -> str | None:
    if df["true_error"].notna().sum() == 0:
        return None
    fig = _figure(4.2, 2.6, left=0.16, bottom=0.12)
    ax = fig.add_subplot()
    means = [df.loc[df["tier"] == t, "true_error"].mean() for t in TIERS]
    counts = [int(df.loc[df["tier"] == t, "true_error"].notna().sum()) for t in TIERS]
    bars = ax.bar(
        TIERS,
        [0 if pd.isna(m) else m for m in means],
        color=[TIER_COLORS[t] for t in TIERS],
        width=0.6,
    )
    for b, m, c in zip(bars, means, counts, strict=True):
        label = "–" if pd.isna(m) else f"{m:.2f} (n={c})"
        ax.annotate(
            label,
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("mean error of predictions", fontsize=9, color="#44505c")
    _style(ax)
    return _png(fig)


def plot_trend(trend: list[dict[str, Any]]) -> str | None:
    if len(trend) < 2:
        return None
    fig = _figure(8.0, 3.0, left=0.1, right=0.98, bottom=0.33, top=0.9, wspace=0.45)
    x = list(range(len(trend)))
    labels = [t["created"][:16].replace("T", " ") for t in trend]
    ax = fig.add_subplot(1, 2, 1)
    for tier in TIERS:
        ax.plot(
            x,
            [t["tiers"].get(tier, 0) for t in trend],
            marker="o",
            color=TIER_COLORS[tier],
            label=tier,
        )
    ax.set_title("items per tier", fontsize=9)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    _style(ax)
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.plot(x, [t["remaining_hours"] for t in trend], marker="o", color="#1f2a36")
    ax2.set_title("remaining annotation hours", fontsize=9)
    ax2.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    _style(ax2)
    return _png(fig)


def plot_risk_coverage(gate: GateRecord) -> str | None:
    """The calibration's risk–coverage curve: observed error and its bound per candidate
    threshold, ε, and the chosen threshold."""
    steps = [s for s in gate.steps if s.n > 0]
    if not steps or not gate.n_calibration:
        return None
    fig = _figure(6.4, 3.1, left=0.1, right=0.97, bottom=0.16, top=0.86)
    ax = fig.add_subplot()
    cov = np.array([s.n / gate.n_calibration for s in steps])
    risk = np.array([s.k / s.n for s in steps])
    ax.plot(cov, risk, marker="o", markersize=3, color="#3b6ea8", label="observed error")
    tested = [(c, s.bound) for c, s in zip(cov, steps, strict=True) if s.bound is not None]
    if tested:
        tc, tb = zip(*tested, strict=True)
        ax.plot(
            tc,
            tb,
            marker="s",
            markersize=3,
            color="#d1453b",
            label=f"upper bound (δ={gate.delta:g})",
        )
    ax.axhline(gate.epsilon, color="#1f2a36", linestyle=":", linewidth=1.2)
    ax.annotate(
        f"ε = {gate.epsilon:g}",
        (0.0, gate.epsilon),
        xytext=(2, 3),
        textcoords="offset points",
        fontsize=8,
    )
    if gate.threshold is not None:
        x = gate.n / gate.n_calibration
        ax.axvline(x, color="#2f9e62", linestyle="--", linewidth=1.2)
        ax.annotate(
            f"threshold {gate.threshold:.3g}\n(coverage {x:.0%})",
            (x, ax.get_ylim()[1]),
            xytext=(-4, -22),
            textcoords="offset points",
            ha="right",
            fontsize=8,
            color="#2f9e62",
        )
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, max(1e-3, min(1.0, 1.25 * max(gate.epsilon, float(risk.max())))))
    ax.set_xlabel(
        "coverage: share of labeled calibration items at or below a threshold",
        fontsize=9,
        color="#44505c",
    )
    ax.set_ylabel("auto-label error", fontsize=9, color="#44505c")
    ax.legend(frameon=False, fontsize=8, ncols=2, loc="lower left", bbox_to_anchor=(0.0, 1.0))
    _style(ax)
    return _png(fig)


# -- thumbnails -------------------------------------------------------------------------------


def _thumbnail(
    uri: str,
    item_id: str,
    fs: ProjectFS | None,
    labels: Sequence[Annotation] = (),
    predictions: Sequence[Annotation] = (),
) -> tuple[str | None, str | None]:
    """``(data URI of a JPEG thumbnail with boxes, None)`` or ``(None, why not)``.

    Boxes are pixel ``xyxy`` of the oriented image: ``labels`` in :data:`LABEL_COLOR`,
    ``predictions`` in :data:`PREDICTION_COLOR` (drawn second, dashed look by a thinner
    line).
    """
    from PIL import Image, ImageDraw, ImageOps

    from difficulty.imageio import read_image_bytes

    if fs is None:
        return None, "project not available"
    try:
        data = read_image_bytes(uri, fs, item=item_id)
        with Image.open(io.BytesIO(data)) as source:
            width, height = source.size
            orientation = source.getexif().get(0x0112, 1)
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            source.draft("RGB", (THUMB_BOX[0], THUMB_BOX[1]))
            thumb = ImageOps.exif_transpose(source).convert("RGB")
        thumb.thumbnail(THUMB_BOX)
        sx, sy = thumb.width / width, thumb.height / height
        draw = ImageDraw.Draw(thumb)
        for anns, color, line in ((labels, LABEL_COLOR, 3), (predictions, PREDICTION_COLOR, 2)):
            for a in anns:
                if a.box is None:
                    continue
                x1, y1, x2, y2 = a.box
                draw.rectangle((x1 * sx, y1 * sy, x2 * sx, y2 * sy), outline=color, width=line)
        buf = io.BytesIO()
        thumb.save(buf, format="JPEG", quality=85)
    except (InputError, OSError, ValueError) as exc:
        log.warning("no thumbnail for item %s: %s", item_id, exc)
        return None, str(exc)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), None


def _project_fs(meta: dict[str, Any], project: ProjectFormat | None) -> ProjectFS | None:
    """The project root that item uris are relative to: ``project``'s, else the recorded source."""
    if project is not None:
        return project.project
    source = meta.get("source")
    if not source:
        return None
    try:
        return ProjectFS(str(source))
    except LabelTriageError as exc:
        log.warning("project %s cannot be opened for thumbnails: %s", source, exc)
        return None


def _open_format(meta: dict[str, Any], fs: ProjectFS | None) -> ProjectFormat | None:
    """The project's format from the run's recorded source and format (for its labels)."""
    if fs is None or not meta.get("format"):
        return None
    from connectors.formats.base import FORMATS

    try:
        return FORMATS[str(meta["format"])](fs)
    except (LabelTriageError, KeyError, TypeError) as exc:
        log.info("labels of %s are not drawn: %s", fs.url, exc)
        return None


def read_items(fmt: ProjectFormat, rows: pd.DataFrame) -> dict[str, Item]:
    """The items of ``rows`` (``item_id``, ``uri``, ``status``) with their labels.

    A file-per-image format reads just those label files; any other format is streamed
    until every wanted item has come by.  Items whose label cannot be read are left out.
    """
    wanted = {str(i): str(u) for i, u in zip(rows["item_id"], rows["uri"], strict=True)}
    out: dict[str, Item] = {}
    label_path = getattr(fmt, "label_path", None)
    parse_label = getattr(fmt, "parse_label", None)
    if callable(label_path) and callable(parse_label):
        for item_id, uri in wanted.items():
            rel = label_path(item_id)
            item = Item(item_id=item_id, uri=uri)
            try:
                if fmt.project.exists(rel):
                    item = parse_label(
                        item.model_copy(update={"status": ItemStatus.LABELED}),
                        rel,
                        fmt.project.read_bytes(rel),
                    )
            except (InputError, OSError) as exc:
                log.info("%s: label not drawn: %s", item_id, exc)
                continue
            out[item_id] = item
        return out
    try:
        for item in fmt.iter_items():
            if item.item_id in wanted and item.error is None:
                out[item.item_id] = item
                if len(out) == len(wanted):
                    break
    except LabelTriageError as exc:
        log.info("labels of %s are not drawn: %s", fmt.project.url, exc)
    return out


def _predicted(
    predictions: PredictionSource | None,
    label_map: LabelMap,
    item_id: str,
    item: Item | None,
    min_score: float,
) -> list[Annotation]:
    if predictions is None:
        return []
    try:
        pred = predictions.get(item_id, item)
    except LabelTriageError as exc:
        log.info("%s: prediction not drawn: %s", item_id, exc)
        return []
    if pred is None or pred.error is not None:
        return []
    return [
        a
        for a in label_map.apply(pred.annotations)
        if a.box is not None and (a.score is None or a.score >= min_score)
    ]


def _why(row: Any, pct: dict[str, np.ndarray], position: int, names: Sequence[str]) -> str | None:
    """The scorer that ranks this item highest, in words: ``many uncertain boxes
    (box_count_variance: top 2 %)``."""
    best = max(
        (n for n in names if np.isfinite(pct[n][position])),
        key=lambda n: pct[n][position],
        default=None,
    )
    if best is None:
        return None
    top = max(1, round(100 * (1 - float(pct[best][position]))))
    return f"{WHY.get(best, 'high ' + best)} ({best}: top {top} %)"


@dataclass(frozen=True)
class BoxSources:
    """Where the boxes drawn on thumbnails come from: the project's labels (``fmt``) and
    ``predictions`` after ``label_map``, boxes below ``min_score`` left out."""

    fmt: ProjectFormat | None = None
    predictions: PredictionSource | None = None
    label_map: LabelMap = field(default_factory=LabelMap)
    min_score: float = 0.25
    written: frozenset[str] = frozenset()
    """Items whose label is this run's auto-label (drawn as predictions, not as labels)."""


def thumbnails(
    df: pd.DataFrame,
    fs: ProjectFS | None,
    *,
    hardest: bool,
    n: int,
    boxes: BoxSources = BoxSources(),
    why_from: Sequence[str] = (),
    task_url: Callable[[str], str] | None = None,
) -> list[dict[str, Any]]:
    """The ``n`` hardest (or easiest) items with thumbnails; hardest ones with a "why"."""
    scored = df[df["rank"].notna()].sort_values("rank", ascending=hardest).head(n)
    items = read_items(boxes.fmt, scored) if boxes.fmt is not None else {}
    written = boxes.written
    pct: dict[str, np.ndarray] = {}
    ok = df["score"].notna().to_numpy()
    for name in why_from if hardest else ():
        values = df[name].to_numpy(dtype=np.float64, na_value=np.nan)
        pct[name] = ecdf_midrank(values, values[ok])
    position = {v: i for i, v in enumerate(df.index)}
    out = []
    for row in scored.itertuples():
        item = items.get(str(row.item_id))
        auto = str(row.item_id) in written  # its label file is this run's auto-label
        labels = item.annotations if item is not None and not auto else []
        preds = _predicted(
            boxes.predictions, boxes.label_map, str(row.item_id), item, boxes.min_score
        )
        src, why_not = _thumbnail(str(row.uri), str(row.item_id), fs, labels, preds)
        out.append(
            {
                "item_id": row.item_id,
                "rank": int(row.rank),
                "score": float(row.score),
                "tier": row.tier,
                "status": "auto-labeled in this run" if auto else row.status,
                "true_error": None if pd.isna(row.true_error) else float(row.true_error),
                "src": src,
                "why": why_not,
                "reason": _why(row, pct, position[row.Index], list(pct)) if pct else None,
                "url": task_url(str(row.item_id)) if task_url else None,
            }
        )
    return out


def gate_thumbnails(gate: GateRecord, fs: ProjectFS | None) -> dict[str, list[dict[str, Any]]]:
    """Thumbnails of the written (would-be) labels and of the audit sample, with their boxes."""
    out: dict[str, list[dict[str, Any]]] = {"labels": [], "audit": []}
    for ex in gate.examples:
        src, why_not = _thumbnail(ex.uri, ex.item_id, fs, (), ex.annotations)
        boxes = sum(1 for a in ex.annotations if a.box is not None)
        out["audit" if ex.audit else "labels"].append(
            {
                "item_id": ex.item_id,
                "score": ex.difficulty,
                "src": src,
                "why": why_not,
                "content": ", ".join(a.label for a in ex.annotations) if boxes else "empty label",
            }
        )
    return out


# -- history ------------------------------------------------------------------------------


def _earlier_runs(run_dir: str, storage_options: dict[str, Any] | None) -> list[str]:
    parent = posixpath.dirname(run_dir.rstrip("/"))
    if not parent or parent == run_dir.rstrip("/"):
        return []
    store = ProjectFS(parent, storage_options)
    here = posixpath.basename(run_dir.rstrip("/"))
    out = []
    for name in store.listdir("."):
        if name == here or name.startswith("."):
            continue
        if store.exists(f"{name}/{FILENAME}"):
            out.append(store.url_of(name))
    return out


def _gate_of(run_dir: str, storage_options: dict[str, Any] | None) -> GateRecord | None:
    try:
        return read_gate_record(run_dir, storage_options)
    except InputError as exc:
        log.warning("%s", exc)
        return None


def trend_points(
    current: tuple[pd.DataFrame, dict[str, Any], GateRecord | None],
    runs: Sequence[str],
    settings: PlanSettings,
    storage_options: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """Tier counts and remaining hours of the earlier runs of the same source, then this run."""
    df, meta, gate = current
    points = []
    for run in runs:
        try:
            other, m = read_difficulty(run, storage_options)
        except (InputError, OSError) as exc:
            log.warning("earlier run %s is skipped: %s", run, exc)
            continue
        if (
            m.get("run_id") == meta.get("run_id")
            or m.get("source") != meta.get("source")
            or str(m.get("created")) >= str(meta.get("created"))
        ):
            continue
        points.append(_point(other, m, settings, _gate_of(run, storage_options)))
    points.sort(key=lambda p: p["created"])
    points.append(_point(df, meta, settings, gate))
    return points


def _point(
    df: pd.DataFrame, meta: dict[str, Any], settings: PlanSettings, gate: GateRecord | None
) -> dict[str, Any]:
    plan = compute_plan(df, settings, gate)
    counts = df["tier"].value_counts()
    return {
        "run_id": meta.get("run_id"),
        "created": str(meta.get("created")),
        "items": len(df),
        "tiers": {t: int(counts.get(t, 0)) for t in TIERS},
        "remaining_items": plan["remaining_items"],
        "remaining_hours": plan["remaining_hours"],
        "written": len(gate.written) if gate is not None else 0,
    }


# -- what the tiers mean ----------------------------------------------------------------------


def tier_notes(df: pd.DataFrame, meta: dict[str, Any], gate: GateRecord | None) -> dict[str, Any]:
    """What "easy" means in this run, and whether the quantile tiers hold their shares."""
    tiers = meta.get("tiers") or {}
    config = tiers.get("config") or {}
    scored = int(df["score"].notna().sum())
    calibrated = tiers.get("source") == "calibrated"
    out: dict[str, Any] = {"calibrated": calibrated, "shares": None, "tie": None}
    if calibrated:
        cal = tiers.get("calibration") or {}
        out["easy"] = (
            f"Easy means the model labels the item with error ≤ ε {cal.get('epsilon', 0):g} at "
            f"{100 * (1 - float(cal.get('delta', 0.1))):g} % confidence: its score is at or below "
            f"the threshold calibrated on labeled items ({tiers.get('easy_max', 0):.3g}). "
            "Medium and hard split the rest."
        )
        return out
    source = str(tiers.get("source") or "quantiles")
    if source.startswith("reference"):
        out["easy"] = (
            f"Easy means a score at or below {tiers.get('easy_max', 0):.3g}, the easy boundary "
            f"of the {source} (kept so that runs compare). It is a planning tier, not a promise "
            "about auto-labels"
        )
    elif config.get("mode", "quantiles") == "quantiles":
        easy, hard = float(config.get("easy", 0.3)), float(config.get("hard", 0.7))
        out["easy"] = (
            f"Easy means the {100 * easy:g} % lowest scores. It is a planning tier, not a "
            "promise about auto-labels"
        )
        if scored:
            want = {"easy": easy, "medium": hard - easy, "hard": 1.0 - hard}
            got = {t: float((df["tier"] == t).sum()) / scored for t in TIERS}
            off = {t: got[t] - want[t] for t in TIERS}
            out["shares"] = {"want": want, "got": got}
            if max(abs(v) for v in off.values()) > SHARE_TOLERANCE:
                value, count = largest_tie(df["score"].to_numpy(dtype=np.float64, na_value=np.nan))
                out["tie"] = {"value": value, "count": count, "share": count / scored}
    else:
        out["easy"] = (
            f"Easy means a score at or below {tiers.get('easy_max', 0):.3g} (configured "
            "threshold). It is a planning tier, not a promise about auto-labels"
        )
    if gate is not None and gate.threshold is None:
        out["easy"] += (
            f"; the gate found no threshold with bound ≤ ε {gate.epsilon:g}, so none of it is auto-labeled"
        )
    out["easy"] += "."
    return out


def read_label_map_check(fs: ProjectFS) -> LabelMapCheck | None:
    """The run's label-map check (``label_map_check.json``), if one was recorded."""
    if not fs.exists(LabelMapCheck.FILENAME):
        return None
    try:
        return LabelMapCheck.model_validate_json(fs.read_bytes(LabelMapCheck.FILENAME))
    except ValueError as exc:
        log.warning("%s: unreadable label-map check: %s", fs.url, exc)
        return None


# -- the report ---------------------------------------------------------------------------


def _template() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).with_name("templates"))),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = lambda v, d=1: (
        "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:,.{d}f}"
    )
    env.filters["rho"] = lambda v: "–" if v is None else f"{v:+.3f}"
    env.filters["pct"] = lambda v, d=0: "–" if v is None else f"{100 * v:.{d}f} %"
    return env.get_template(TEMPLATE)


def _settings(
    plan_settings: PlanSettings | None, team_size: int | None, hours_per_day: float | None
) -> PlanSettings:
    base = (plan_settings or PlanSettings()).model_dump()
    if team_size is not None:
        base["team_size"] = team_size
        if base["annotators"] and len(base["annotators"]) != team_size:
            log.info(
                "team size %d given: the %d configured annotators are replaced by generic ones",
                team_size,
                len(base["annotators"]),
            )
            base["annotators"] = []
    if hours_per_day is not None:
        base["hours_per_day"] = hours_per_day
    return PlanSettings.model_validate(base)


def write_report(
    run_dir: str,
    *,
    team_size: int | None = None,
    hours_per_day: float | None = None,
    plan_settings: PlanSettings | None = None,
    history: list[str] | None = None,
    project: ProjectFormat | None = None,
    predictions: PredictionSource | None = None,
    storage_options: dict[str, Any] | None = None,
    thumbnails_per_side: int = 12,
    table: tuple[pd.DataFrame, dict[str, Any]] | None = None,
) -> dict[str, str]:
    """Write ``report.html``, ``summary.json``, ``plan.csv`` and ``assignment.csv`` into ``run_dir``.

    ``team_size`` / ``hours_per_day`` override ``plan_settings``.  ``history``: earlier run
    folders (default: the siblings of ``run_dir``).  ``project`` is used for thumbnails
    and their label boxes; without it the project is opened from the run's recorded
    source and format.  ``predictions`` (optional) are drawn on the thumbnails too, after
    the run's label map.  ``table``: the run's difficulty table and metadata when the
    caller holds them already (default: read from ``run_dir``).  Returns the paths
    written, by name (``report``, ``summary``, ``plan``, ``assignment``).
    """
    df, meta = table if table is not None else read_difficulty(run_dir, storage_options)
    settings = _settings(plan_settings, team_size, hours_per_day)
    out = ProjectFS(run_dir, storage_options)
    gate = read_gate_record(run_dir, storage_options)
    scorers = scorer_columns(df)
    plan = compute_plan(df, settings, gate)
    written = set(gate.written) if gate is not None else set()
    task_url = getattr(project, "task_url", None)  # the item on its platform (Label Studio)
    assignment = _assignment(df, settings, written, task_url)
    runs = history if history is not None else _earlier_runs(run_dir, storage_options)
    trend = trend_points((df, meta, gate), runs, settings, storage_options)

    summary = _previous_summary(out, run_dir)
    from difficulty.scoring import summarize

    summary.update(summarize(df, meta))
    counts = summary["tiers"]
    unscored = int(df["tier"].isna().sum())
    combination = meta.get("combination", {})
    weights = {k: (v or 0.0) for k, v in combination.get("weights", {}).items()}
    dropped = combination.get("dropped") or {}
    fs = _project_fs(meta, project)
    fmt = project if project is not None else _open_format(meta, fs)
    settings_meta = meta.get("settings") or {}
    label_map = LabelMap.model_validate(settings_meta.get("label_map") or {})
    min_score = float(settings_meta.get("error_min_score", 0.25))
    tie_break = combination.get("tie_break") or {}
    why_from = [
        s
        for s in scorers
        if s not in dropped and (weights.get(s, 0.0) > 0 or (tie_break.get(s) or 0.0) > 0)
    ]
    gate_thumbs = gate_thumbnails(gate, fs) if gate is not None else {"labels": [], "audit": []}
    boxes = BoxSources(fmt, predictions, label_map, min_score, frozenset(written))

    context = {
        "meta": meta,
        "summary": summary,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "counts": counts,
        "unscored": unscored,
        "total": len(df),
        "tier_colors": TIER_COLORS,
        "label_color": LABEL_COLOR,
        "prediction_color": PREDICTION_COLOR,
        "has_predictions": predictions is not None,
        "tier_plot": plot_tiers({**counts, **({"unscored": unscored} if unscored else {})}),
        **_plots(df, meta, scorers, weights, trend, gate),
        "scorers": _scorer_rows(df, scorers, weights, combination),
        "dropped": dropped,
        "combination": combination,
        "tier_notes": tier_notes(df, meta, gate),
        "label_map_check": read_label_map_check(out),
        **_hardest_and_easiest(df, fs, thumbnails_per_side, why_from, boxes, task_url),
        "plan": plan,
        "trend": trend,
        "gate": gate,
        "gate_thumbs": gate_thumbs,
        "errors": summary.get("error_items", [])[:20],
        "sections": SECTIONS,
    }
    page = _template().render(**context)
    paths = {"report": out.write_text("report.html", page)}
    summary |= {
        "plan": plan,
        "trend": trend,
        "autolabel": gate.model_dump(mode="json") if gate is not None else None,
        "report": {"generated": context["generated"], "sections": list(SECTIONS)},
    }
    paths["summary"] = out.write_text("summary.json", json.dumps(summary, indent=2, default=str))
    paths["plan"] = write_plan(plan, run_dir, storage_options)
    text = csv_text(assignment, float_format="%.4g")  # no cell starts a formula
    paths["assignment"] = out.write_text("assignment.csv", text)
    log.info("report written to %s", paths["report"])
    return paths


def _plots(
    df: pd.DataFrame,
    meta: dict[str, Any],
    scorers: list[str],
    weights: dict[str, float],
    trend: list[dict[str, Any]],
    gate: GateRecord | None,
) -> dict[str, Any]:
    """The report's figures of the scores, the scorers, the trend and the gate."""
    combination = meta.get("combination", {})
    return {
        "score_plot": plot_score_distribution(
            df, (_threshold(meta, "easy_max"), _threshold(meta, "hard_min"))
        ),
        "scorer_histograms": scorer_histograms(
            df, scorers, weights, combination.get("dropped") or {}
        ),
        "agreement_plot": plot_agreement(
            combination.get("correlations", {}), combination.get("combined_rho")
        ),
        "error_plot": plot_error_by_tier(df),
        "trend_plot": plot_trend(trend),
        "risk_plot": plot_risk_coverage(gate) if gate is not None else None,
    }


def _assignment(
    df: pd.DataFrame,
    settings: PlanSettings,
    written: set[str],
    task_url: Callable[[str], str] | None,
) -> pd.DataFrame:
    """Who labels which of the items left unlabeled (after the gate wrote ``written``)."""
    left = df[(df["status"] == "unlabeled") & ~df["item_id"].astype(str).isin(written)]
    assignment = assign(left, seconds_per_tier(df, settings), settings)
    if task_url is not None and len(assignment):
        assignment.insert(1, "task_url", [task_url(str(i)) for i in assignment["item_id"]])
    return assignment


def _hardest_and_easiest(
    df: pd.DataFrame,
    fs: ProjectFS | None,
    n: int,
    why_from: Sequence[str],
    boxes: BoxSources,
    task_url: Callable[[str], str] | None,
) -> dict[str, list[dict[str, Any]]]:
    """The report's two thumbnail rows: the hardest items (with a "why") and the easiest."""
    return {
        "hardest": thumbnails(
            df, fs, hardest=True, n=n, why_from=why_from, boxes=boxes, task_url=task_url
        ),
        "easiest": thumbnails(df, fs, hardest=False, n=n, boxes=boxes, task_url=task_url),
    }


def _previous_summary(out: ProjectFS, run_dir: str) -> dict[str, Any]:
    """The run's ``summary.json`` as scoring wrote it (empty when unreadable)."""
    if out.exists("summary.json"):
        try:
            return dict(json.loads(out.read_text("summary.json")))
        except ValueError as exc:
            log.warning("%s: summary.json unreadable, rewritten: %s", run_dir, exc)
    return {}


def _scorer_rows(
    df: pd.DataFrame, scorers: list[str], weights: dict[str, float], combination: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per scorer for the report's table: weight, agreement, AURC, median, missing."""
    correlations = combination.get("correlations", {})
    dropped = combination.get("dropped") or {}
    cv_aurc = combination.get("cv_aurc") or {}
    return [
        {
            "name": s,
            "weight": weights.get(s, 0.0),
            "rho": correlations.get(s),
            "aurc": cv_aurc.get(f"single:{s}"),
            "dropped": dropped.get(s),
            "median": _median(df[s]),
            "missing": int(df.loc[df["error"].isna(), s].isna().sum()),
        }
        for s in scorers
    ]


def _threshold(meta: dict[str, Any], key: str) -> float:
    value = (meta.get("tiers") or {}).get(key)
    return float("nan") if value is None else float(value)


def _median(s: pd.Series) -> float | None:
    v = s.dropna()
    return float(v.median()) if len(v) else None

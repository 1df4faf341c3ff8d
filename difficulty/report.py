"""The manager's report: ``report.html`` (one self-contained file), ``summary.json``, ``plan.csv``.

:func:`write_report` reads a scored run folder (``difficulty.parquet``), computes the plan
(:mod:`difficulty.plan`) and writes, into the same folder:

* ``report.html`` — opens offline: the CSS is inline, the plots are inline PNG
  (``data:image/png;base64``) drawn with matplotlib, the thumbnails inline JPEG.  Sections
  (element ids): ``tiers`` (counts and thresholds), ``distributions`` (combined score by
  tier and each scorer's raw values), ``hardest`` / ``easiest`` (thumbnails in score
  order), ``agreement`` (each scorer's Spearman ρ with the true error of the predictions,
  the chosen weights, the cross-validated candidates, the true error per tier), ``plan``
  (hours per tier, hours saved by auto-labeling the easy tier, forecast, assignment),
  ``trend`` (tier counts and remaining hours across the earlier runs of the project) and
  ``autolabel`` (precision / coverage / audit precision from ``autolabel.json`` when an
  auto-label run left one in the folder; "not run" otherwise);
* ``summary.json`` — the scoring summary plus ``plan``, ``trend`` and ``autolabel``;
* ``plan.csv`` — one row per tier and a total (see :func:`difficulty.plan.plan_table`);
* ``assignment.csv`` — ``item_id, tier, score, hours, assignee`` per remaining item.

Earlier runs (``history``): run folders of the same project in the report store.  By
default the siblings of ``run_dir`` (the store keeps ``<project>/<run_id>/``) that hold a
``difficulty.parquet`` of the same source created before this run.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import posixpath
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from connectors.csvsafe import csv_text
from connectors.errors import InputError, LabelTriageError
from connectors.formats.base import ProjectFormat
from connectors.storage import ProjectFS
from difficulty.plan import PlanSettings, assign, compute_plan, seconds_per_tier, write_plan
from difficulty.table import FILENAME, read_difficulty, scorer_columns
from difficulty.tiers import TIERS

log = logging.getLogger(__name__)

TEMPLATE = "report.html"
TIER_COLORS = {"easy": "#2f9e62", "medium": "#e0a31f", "hard": "#d1453b", "unscored": "#9aa3ad"}
THUMB_BOX = (220, 110)
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


# -- plots ---------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
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
    fig = _figure(5.2, 2.6)
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
    fig = _figure(7.0, 2.8)
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 41)
    data = [df.loc[df["tier"] == t, "score"].dropna().to_numpy() for t in TIERS]
    ax.hist(
        data,
        bins=bins,
        stacked=True,
        color=[TIER_COLORS[t] for t in TIERS],
        label=list(TIERS),
        edgecolor="white",
        linewidth=0.4,
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
    ax.legend(frameon=False, fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, 1.16))
    _style(ax)
    return _png(fig)


def plot_scorers(df: pd.DataFrame, scorers: Sequence[str], weights: dict[str, float]) -> str | None:
    if not scorers:
        return None
    cols = min(4, len(scorers))
    rows = int(np.ceil(len(scorers) / cols))
    fig = _figure(2.35 * cols, 1.9 * rows)
    for i, name in enumerate(scorers):
        ax = fig.add_subplot(rows, cols, i + 1)
        v = df[name].to_numpy(dtype=np.float64, na_value=np.nan)
        v = v[np.isfinite(v)]
        w = weights.get(name) or 0.0
        ax.hist(
            v,
            bins=30,
            color="#3b6ea8" if w > 0 else "#8e5ba8" if w < 0 else "#9aa3ad",
            edgecolor="white",
            linewidth=0.3,
        )
        ax.set_title(
            f"{name}  (w={w:.2f}{', reversed' if w < 0 else ''})", fontsize=8.5, color="#1f2a36"
        )
        _style(ax)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


def plot_agreement(rhos: dict[str, float | None], combined: float | None) -> str | None:
    items = [(k, v) for k, v in rhos.items() if v is not None]
    if not items:
        return None
    items.sort(key=lambda kv: kv[1])
    if combined is not None:
        items.append(("combined score", combined))
    fig = _figure(6.0, 0.32 * len(items) + 0.9)
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
    fig = _figure(4.2, 2.6)
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
    fig = _figure(8.0, 2.8)
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
    fig.tight_layout()
    return _png(fig)


# -- thumbnails -------------------------------------------------------------------------------


def _thumbnail(uri: str, item_id: str, project: ProjectFS | None) -> tuple[str | None, str | None]:
    """``(data URI of a JPEG thumbnail, None)`` or ``(None, why not)``."""
    from PIL import Image, ImageOps

    from difficulty.imageio import read_image_bytes

    try:
        data = read_image_bytes(uri, project, item=item_id)
        with Image.open(io.BytesIO(data)) as source:
            source.draft("RGB", (THUMB_BOX[0] * 2, THUMB_BOX[1] * 2))
            thumb = ImageOps.exif_transpose(source).convert("RGB")
        thumb.thumbnail(THUMB_BOX)
        buf = io.BytesIO()
        thumb.save(buf, format="JPEG", quality=82)
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


def thumbnails(
    df: pd.DataFrame, fs: ProjectFS | None, *, hardest: bool, n: int
) -> list[dict[str, Any]]:
    scored = df[df["rank"].notna()].sort_values("rank", ascending=hardest)
    out = []
    for row in scored.head(n).itertuples():
        src, why = (
            _thumbnail(str(row.uri), str(row.item_id), fs)
            if fs is not None
            else (None, "project not available")
        )
        out.append(
            {
                "item_id": row.item_id,
                "rank": int(row.rank),
                "score": float(row.score),
                "tier": row.tier,
                "status": row.status,
                "true_error": None if pd.isna(row.true_error) else float(row.true_error),
                "src": src,
                "why": why,
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


def trend_points(
    current: tuple[pd.DataFrame, dict[str, Any]],
    runs: Sequence[str],
    settings: PlanSettings,
    storage_options: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """Tier counts and remaining hours of the earlier runs of the same source, then this run."""
    df, meta = current
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
        points.append(_point(other, m, settings))
    points.sort(key=lambda p: p["created"])
    points.append(_point(df, meta, settings))
    return points


def _point(df: pd.DataFrame, meta: dict[str, Any], settings: PlanSettings) -> dict[str, Any]:
    plan = compute_plan(df, settings)
    counts = df["tier"].value_counts()
    return {
        "run_id": meta.get("run_id"),
        "created": str(meta.get("created")),
        "items": len(df),
        "tiers": {t: int(counts.get(t, 0)) for t in TIERS},
        "remaining_items": plan["remaining_items"],
        "remaining_hours": plan["remaining_hours"],
    }


# -- auto-label -----------------------------------------------------------------------------


def _autolabel(fs: ProjectFS) -> dict[str, Any] | None:
    if not fs.exists("autolabel.json"):
        return None
    try:
        data = json.loads(fs.read_text("autolabel.json"))
    except (ValueError, OSError) as exc:
        log.warning("%s: unreadable autolabel.json: %s", fs.url, exc)
        return {"error": f"unreadable autolabel.json: {exc}"}
    return data if isinstance(data, dict) else {"error": "autolabel.json is not an object"}


def _find(data: Any, *keys: str) -> Any:
    """The first value under any of ``keys`` (dotted paths allowed) in nested ``data``."""
    for key in keys:
        node = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None and not isinstance(node, (dict, list)):
            return node
    return None


def autolabel_view(data: dict[str, Any] | None) -> dict[str, Any]:
    if data is None:
        return {"ran": False}
    flat: list[tuple[str, str]] = []

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, list):
            flat.append((prefix, f"{len(node)} entries"))
        else:
            flat.append((prefix, _fmt(node)))

    walk("", data)
    return {
        "ran": True,
        "precision": _opt(
            _find(data, "precision", "calibration.precision", "shadow.precision", "agreement")
        ),
        "coverage": _opt(_find(data, "coverage", "calibration.coverage")),
        "audit_precision": _opt(_find(data, "audit_precision", "audit.precision")),
        "written": _opt(_find(data, "written", "items_written", "count")),
        "rows": flat[:60],
    }


def _opt(v: Any) -> str | None:
    return None if v is None else _fmt(v)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


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
    storage_options: dict[str, Any] | None = None,
    thumbnails_per_side: int = 12,
) -> dict[str, str]:
    """Write ``report.html``, ``summary.json``, ``plan.csv`` and ``assignment.csv`` into ``run_dir``.

    ``team_size`` / ``hours_per_day`` override ``plan_settings``.  ``history``: earlier run
    folders (default: the siblings of ``run_dir``).  ``project`` is used for thumbnails;
    without it the project is opened from the run's recorded source.  Returns the paths
    written, by name (``report``, ``summary``, ``plan``, ``assignment``).
    """
    df, meta = read_difficulty(run_dir, storage_options)
    settings = _settings(plan_settings, team_size, hours_per_day)
    out = ProjectFS(run_dir, storage_options)
    scorers = scorer_columns(df)
    plan = compute_plan(df, settings)
    assignment = assign(df[df["status"] == "unlabeled"], seconds_per_tier(df, settings), settings)
    runs = history if history is not None else _earlier_runs(run_dir, storage_options)
    trend = trend_points((df, meta), runs, settings, storage_options)
    auto = _autolabel(out)

    summary: dict[str, Any] = {}
    if out.exists("summary.json"):
        try:
            summary = json.loads(out.read_text("summary.json"))
        except ValueError as exc:
            log.warning("%s: summary.json unreadable, rewritten: %s", run_dir, exc)
    from difficulty.scoring import summarize

    summary.update(summarize(df, meta))
    counts = summary["tiers"]
    unscored = int(df["tier"].isna().sum())
    combination = meta.get("combination", {})
    weights = {k: (v or 0.0) for k, v in combination.get("weights", {}).items()}
    correlations = combination.get("correlations", {})
    fs = _project_fs(meta, project)

    context = {
        "meta": meta,
        "summary": summary,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "counts": counts,
        "unscored": unscored,
        "total": len(df),
        "tier_colors": TIER_COLORS,
        "tier_plot": plot_tiers({**counts, **({"unscored": unscored} if unscored else {})}),
        "score_plot": plot_score_distribution(
            df, (_threshold(meta, "easy_max"), _threshold(meta, "hard_min"))
        ),
        "scorer_plot": plot_scorers(df, scorers, weights),
        "agreement_plot": plot_agreement(correlations, combination.get("combined_rho")),
        "error_plot": plot_error_by_tier(df),
        "trend_plot": plot_trend(trend),
        "scorers": [
            {
                "name": s,
                "weight": weights.get(s, 0.0),
                "rho": correlations.get(s),
                "median": _median(df[s]),
                "missing": int(df.loc[df["error"].isna(), s].isna().sum()),
            }
            for s in scorers
        ],
        "combination": combination,
        "hardest": thumbnails(df, fs, hardest=True, n=thumbnails_per_side),
        "easiest": thumbnails(df, fs, hardest=False, n=thumbnails_per_side),
        "plan": plan,
        "trend": trend,
        "autolabel": autolabel_view(auto),
        "errors": summary.get("error_items", [])[:20],
        "sections": SECTIONS,
    }
    page = _template().render(**context)
    paths = {"report": out.write_text("report.html", page)}
    summary["plan"] = plan
    summary["trend"] = trend
    summary["autolabel"] = auto
    summary["report"] = {"generated": context["generated"], "sections": list(SECTIONS)}
    paths["summary"] = out.write_text("summary.json", json.dumps(summary, indent=2, default=str))
    paths["plan"] = write_plan(plan, run_dir, storage_options)
    text = csv_text(assignment, float_format="%.4g")  # no cell starts a formula
    paths["assignment"] = out.write_text("assignment.csv", text)
    log.info("report written to %s", paths["report"])
    return paths


def _threshold(meta: dict[str, Any], key: str) -> float:
    value = (meta.get("tiers") or {}).get(key)
    return float("nan") if value is None else float(value)


def _median(s: pd.Series) -> float | None:
    v = s.dropna()
    return float(v.median()) if len(v) else None

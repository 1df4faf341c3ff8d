"""How well does the combined difficulty score rank the true error of real predictions?

Projects built from ``../shared/data`` with their real YOLOv5n predictions (YOLO txt):

* ``road_signs_2cls`` — road_signs restricted to {stop, trafficlight} (other boxes removed
  from the annotations), label map ``stop sign→stop``, ``traffic light→trafficlight``;
* ``road_signs_4cls`` — the full four-class road_signs project, same label map (COCO has
  no speed-limit or crosswalk class);
* ``kitti_tiny`` — label map ``car→Car``, ``person→Pedestrian``, ``bicycle→Cyclist``,
  ``truck→Truck``, ``train→Tram``; ``DontCare`` regions ignored.

Every item is scored once with every default scorer (``fourier``, ``fourier_entropy`` and
the box-confidence scorers of :mod:`difficulty.prediction_scores`).  The true per-item
error is :func:`difficulty.matching.item_error` (1 − F1 of the matching at IoU 0.5,
predictions with confidence ≥ 0.25).  Recorded:

* **in sample** — each scorer's Spearman ρ and risk–coverage area (AURC: the mean error
  among the k easiest items, averaged over k) with the error on all items, and the
  combined score's when the combination (:func:`difficulty.combine.fit_weights`, chosen
  by held-out AURC, ties broken by the agreeing scorers) is fit on all of them;
* **cross-validated** — ``--splits`` random half/half splits: the combination is fit on
  the labels of one half only (the other half's error hidden) and evaluated on the other
  half, next to each single scorer on the same held-out half.  "best single (chosen on
  fit half)" is the scorer a person would pick from the fit half (by ρ for the ρ column,
  by AURC for the AURC column); "best single (oracle)" picks it on the held-out half
  itself (not achievable; a ceiling);
* **tiers** — the shares of the default quantile tiers, and the largest group of items
  sharing one combined score (which no cut can split).

Then, for the report, each project is scored twice as a manager would see it, with
labels hidden for part of the items (they become ``unlabeled`` items to plan for: 80 %,
then 60 % in a later run scored against the first as reference), ``report.html`` is
written for the later run (trend across both), screenshotted in headless Chromium, and
the rendered DOM is checked for every section.

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/difficulty_quality.py``
(``--splits N``, ``--data DIR``, ``--out DIR``).  Writes
``bench/results/difficulty_quality.md`` and ``bench/results/difficulty_report_<project>.png``.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import (  # noqa: E402
    CHROMIUM_FLAGS,
    PROJECTS,
    ProjectView,
    chromium,
    chromium_png,
    machine_line,
    real_project,
)
from connectors.formats.base import ProjectFormat  # noqa: E402
from connectors.formats.yolo import YoloPredictions  # noqa: E402
from connectors.labelmap import LabelMap  # noqa: E402
from difficulty.combine import fit_weights, percentiles, risk_coverage_area, spearman  # noqa: E402
from difficulty.report import SECTIONS, write_report  # noqa: E402
from difficulty.scoring import score_project  # noqa: E402
from difficulty.tiers import largest_tie  # noqa: E402

log = logging.getLogger("bench.difficulty_quality")


def projects(data: Path) -> dict[str, tuple[ProjectFormat, YoloPredictions, LabelMap]]:
    out: dict[str, tuple[ProjectFormat, YoloPredictions, LabelMap]] = {}
    for name in PROJECTS:
        real = real_project(name, data)
        out[name] = (ProjectView(real.project, keep=real.keep), real.predictions, real.label_map)
    return out


def evaluate(table: pd.DataFrame, scorers: list[str], splits: int, seed: int) -> dict[str, Any]:
    """In-sample and cross-validated ρ and risk–coverage area (AURC) of each scorer and of
    the combined score (the combination chosen on the fit half's labels only)."""
    ok = table["error"].isna().to_numpy()
    t = table[ok].reset_index(drop=True)
    err = t["true_error"].to_numpy(dtype=np.float64, na_value=np.nan)
    pct = percentiles(t, scorers)
    single = {s: spearman(pct[s].to_numpy(), err) for s in scorers}
    single_aurc = {s: risk_coverage_area(pct[s].to_numpy(), err) for s in scorers}
    fit_all = fit_weights(pct, err, seed=seed)
    combined_all = fit_all.score(pct)
    in_sample = spearman(combined_all, err)
    in_sample_aurc = risk_coverage_area(combined_all, err)
    fit_signed = fit_weights(pct, err, seed=seed, signed=True)
    in_sample_signed = spearman(fit_signed.score(pct), err)

    rng = np.random.default_rng(seed)
    labeled = np.flatnonzero(np.isfinite(err))
    rows: list[dict[str, float]] = []
    methods: list[str] = []
    signed_methods: list[str] = []
    for _ in range(splits):
        perm = rng.permutation(labeled)
        fit_idx, test_idx = perm[: len(perm) // 2], perm[len(perm) // 2 :]
        visible = np.full(len(err), np.nan)
        visible[fit_idx] = err[fit_idx]
        fit = fit_weights(pct, visible, seed=seed)
        methods.append(fit.method)
        combined = fit.score(pct.iloc[test_idx])
        row = {s: spearman(pct[s].to_numpy()[test_idx], err[test_idx]) for s in scorers}
        row |= {
            f"aurc:{s}": risk_coverage_area(pct[s].to_numpy()[test_idx], err[test_idx])
            for s in scorers
        }
        row["combined"] = spearman(combined, err[test_idx])
        row["aurc:combined"] = risk_coverage_area(combined, err[test_idx])
        signed = fit_weights(pct, visible, seed=seed, signed=True)
        row["combined (signed)"] = spearman(signed.score(pct.iloc[test_idx]), err[test_idx])
        signed_methods.append(signed.method)
        # what a person would pick from the fit half alone: the best ρ, the best AURC there
        by_rho = max(
            scorers,
            key=lambda s: (
                -np.inf if not np.isfinite(fit.correlations.get(s, np.nan)) else fit.correlations[s]
            ),
        )
        fit_aurc = {
            s: risk_coverage_area(pct[s].to_numpy()[fit_idx], err[fit_idx]) for s in scorers
        }
        by_aurc = min(scorers, key=lambda s: fit_aurc[s] if np.isfinite(fit_aurc[s]) else np.inf)
        row["best single (chosen on fit half)"] = row[by_rho]
        row["best single (oracle)"] = max(row[s] for s in scorers if np.isfinite(row[s]))
        row["aurc:best single (chosen on fit half)"] = row[f"aurc:{by_aurc}"]
        row["aurc:best single (oracle)"] = min(
            row[f"aurc:{s}"] for s in scorers if np.isfinite(row[f"aurc:{s}"])
        )
        rows.append(row)
    cv = pd.DataFrame(rows)
    return {
        "n": len(t),
        "n_labeled": int(labeled.size),
        "mean_error": float(np.nanmean(err)),
        "single": single,
        "single_aurc": single_aurc,
        "fit": fit_all,
        "in_sample": in_sample,
        "in_sample_aurc": in_sample_aurc,
        "fit_signed": fit_signed,
        "in_sample_signed": in_sample_signed,
        "cv_methods_signed": pd.Series(signed_methods).value_counts().to_dict(),
        "cv_mean": cv.mean().to_dict(),
        "cv_sd": cv.std(ddof=1).to_dict() if len(cv) > 1 else dict.fromkeys(cv.columns, 0.0),
        "cv_methods": pd.Series(methods).value_counts().to_dict(),
        "combined_le_best_single_aurc_share": float(
            (cv["aurc:combined"] <= cv["aurc:best single (chosen on fit half)"] + 1e-12).mean()
        ),
        "tiers": table["tier"].value_counts(normalize=True).to_dict(),
        "largest_tie": largest_tie(table["score"].to_numpy(dtype=np.float64, na_value=np.nan)),
    }


def screenshot(report: Path, png: Path) -> list[str]:
    """PNG screenshot of ``report``; returns the sections missing from the rendered DOM."""
    chromium_png(report, png, height=6200)
    dom = subprocess.run(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tempfile.mkdtemp()}",
            "--dump-dom",
            report.as_uri(),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    return [s for s in SECTIONS if f'id="{s}"' not in dom]


def report_runs(
    name: str, view: ProjectFormat, preds: YoloPredictions, lm: LabelMap, work: Path, seed: int
) -> Path:
    """Two runs with 80 % then 60 % of the labels hidden; report on the second."""
    base = view.base if isinstance(view, ProjectView) else view
    ids = sorted(it.item_id for it in base.iter_items())
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(ids))
    keep = view.keep if isinstance(view, ProjectView) else None

    def scored_run(run: str, hidden_share: float, **options: Any) -> Path:
        """Score the project with the first ``hidden_share`` of ``order`` unlabeled."""
        out = work / name / run
        hide = set(order[: int(hidden_share * len(ids))])
        score_project(
            ProjectView(base, keep=keep, hide=hide),
            predictions=preds,
            label_map=lm,
            out_dir=str(out),
            num_workers=0,
            run_id=f"{name}-{run}",
            **options,
        )
        return out

    first_dir = scored_run("run1", 0.8, min_labeled=10)
    time.sleep(1.1)  # the runs' created stamps have one-second resolution
    second_dir = scored_run("run2", 0.6, reference=str(first_dir))
    write_report(str(second_dir), team_size=3, hours_per_day=6.0, project=view, predictions=preds)
    return second_dir / "report.html"


def fmt_rho(v: float) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:+.3f}"


def _criterion(r: dict[str, Any]) -> str:
    best_in = min(v for v in r["single_aurc"].values() if np.isfinite(v))
    gap_in = r["in_sample_aurc"] - best_in
    gap_cv = r["cv_mean"]["aurc:combined"] - r["cv_mean"]["aurc:best single (chosen on fit half)"]
    tol = 5e-4  # differences below this are rounding, not a ranking

    def verdict(gap: float) -> str:
        return "yes" if gap <= tol else "NO"

    return (
        f"**Combined at most the best single scorer's risk–coverage area (within {tol:g})?** "
        f"in sample: {verdict(gap_in)} ({gap_in:+.5f}); held out, vs the best single scorer "
        f"chosen on the same fit half: {verdict(gap_cv)} ({gap_cv:+.5f})."
    )


def markdown(
    results: dict[str, dict[str, Any]], shots: dict[str, list[str]], splits: int, seconds: float
) -> str:
    lines = [
        "# Difficulty score quality on real predictions",
        "",
        "Produced by `bench/difficulty_quality.py` (see its docstring for the method). True per-item error:",
        "`difficulty.matching.item_error` = 1 − F1 of the box matching (IoU ≥ 0.5, predictions with",
        "confidence ≥ 0.25, label-mapped, ignore classes ignored). Two measures of how a score ranks that",
        "error: Spearman ρ (the whole ranking; higher is better) and the risk–coverage area, AURC (the mean",
        "error among the k easiest items, averaged over k; lower is better). The combination is chosen by",
        "held-out AURC, the measure of what the easy tier and the auto-label gate need: little error at",
        "the easy end. Cross-validated: "
        f"{splits} random half/half splits, combination fit on one half's labels, measured on the other",
        f"half (mean ± sd). Total bench time {seconds:.0f} s.",
        "",
        f"Machine: {machine_line()}.",
        "",
    ]
    for name, r in results.items():
        scorers = list(r["single"])
        fit = r["fit"]
        tie_value, tie_count = r["largest_tie"]
        lines += [
            f"## {name}",
            "",
            f"{r['n']} items, {r['n_labeled']} with a true error (mean error {r['mean_error']:.3f}).",
            f"Combination fit on all labeled items: **{fit.method}** — {fit.reason}.",
            "",
            "| scorer | ρ in sample | ρ held out (mean ± sd) | AURC in sample | AURC held out (mean ± sd) | weight (all labels) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for s in sorted(
            scorers,
            key=lambda s: r["single_aurc"][s] if np.isfinite(r["single_aurc"][s]) else 9,
        ):
            dropped = " (dropped: constant)" if s in fit.dropped else ""
            lines.append(
                f"| `{s}`{dropped} | {fmt_rho(r['single'][s])} | {fmt_rho(r['cv_mean'][s])} ± {r['cv_sd'][s]:.3f} "
                f"| {r['single_aurc'][s]:.4f} | {r['cv_mean'][f'aurc:{s}']:.4f} ± {r['cv_sd'][f'aurc:{s}']:.4f} "
                f"| {fit.weights.get(s, 0.0):.3f} |"
            )
        lines += [
            f"| **combined** | **{fmt_rho(r['in_sample'])}** | **{fmt_rho(r['cv_mean']['combined'])} ± {r['cv_sd']['combined']:.3f}** "
            f"| **{r['in_sample_aurc']:.4f}** | **{r['cv_mean']['aurc:combined']:.4f} ± {r['cv_sd']['aurc:combined']:.4f}** | |",
            f"| best single (chosen on fit half: by ρ / by AURC) | | {fmt_rho(r['cv_mean']['best single (chosen on fit half)'])} ± {r['cv_sd']['best single (chosen on fit half)']:.3f} "
            f"| | {r['cv_mean']['aurc:best single (chosen on fit half)']:.4f} ± {r['cv_sd']['aurc:best single (chosen on fit half)']:.4f} | |",
            f"| best single (oracle, held-out half) | | {fmt_rho(r['cv_mean']['best single (oracle)'])} ± {r['cv_sd']['best single (oracle)']:.3f} "
            f"| | {r['cv_mean']['aurc:best single (oracle)']:.4f} ± {r['cv_sd']['aurc:best single (oracle)']:.4f} | |",
            f"| combined, signed weights (opt-in) | {fmt_rho(r['in_sample_signed'])} | {fmt_rho(r['cv_mean']['combined (signed)'])} ± {r['cv_sd']['combined (signed)']:.3f} | | | |",
            "",
            f"Signed weights (`--signed-weights`: scorers with ρ < 0 take part reversed), fit on all labels: "
            f"**{r['fit_signed'].method}**, weights {', '.join(f'`{k}` {v:+.2f}' for k, v in r['fit_signed'].weights.items() if v)}; "
            f"methods across the splits: {', '.join(f'{k} ×{v}' for k, v in r['cv_methods_signed'].items())}.",
            "",
            f"Methods chosen across the splits: {', '.join(f'{k} ×{v}' for k, v in r['cv_methods'].items())}. "
            f"Combined AURC ≤ the best single scorer chosen on the fit half (by AURC) in "
            f"{100 * r['combined_le_best_single_aurc_share']:.0f} % of the splits.",
            "",
            _criterion(r),
            "",
            f"Tiers at the default quantile cuts (30 % / 70 %), ties broken by the agreeing scorers: "
            f"easy {100 * r['tiers'].get('easy', 0):.1f} %, medium {100 * r['tiers'].get('medium', 0):.1f} %, "
            f"hard {100 * r['tiers'].get('hard', 0):.1f} %; the largest group of items sharing one "
            f"combined score (tied in every scorer that counts or breaks ties) holds {tie_count} "
            f"items ({100 * tie_count / r['n']:.1f} %, score {tie_value:.4f}).",
            "",
        ]
    lines += ["## Report rendering (headless Chromium)", ""]
    for name, missing in shots.items():
        status = "all sections present" if not missing else f"MISSING: {', '.join(missing)}"
        lines.append(
            f"- `{name}`: `bench/results/difficulty_report_{name}.png` — {', '.join(SECTIONS)}: {status}"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--splits", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-report", action="store_true", help="skip the report runs and screenshots"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.time()
    results: dict[str, dict[str, Any]] = {}
    shots: dict[str, list[str]] = {}
    work = Path(tempfile.mkdtemp(prefix="difficulty_quality_"))
    for name, (view, preds, lm) in projects(args.data).items():
        t0 = time.time()
        result = score_project(
            view, predictions=preds, label_map=lm, out_dir=str(work / "full" / name), num_workers=0
        )
        scorers = list(result.meta["scorers"])
        results[name] = evaluate(result.table, scorers, args.splits, args.seed)
        r = results[name]
        print(
            f"{name}: {r['n']} items in {time.time() - t0:.1f} s; combined ρ in sample {r['in_sample']:+.3f}, "
            f"held out {r['cv_mean']['combined']:+.3f} vs best single (fit half) {r['cv_mean']['best single (chosen on fit half)']:+.3f}"
        )
        if not args.no_report and name != "road_signs_4cls":
            report = report_runs(name, view, preds, lm, work / "store", args.seed)
            png = args.out / f"difficulty_report_{name}.png"
            shots[name] = screenshot(report, png)
            print(f"  report {report} → {png}; missing sections: {shots[name] or 'none'}")
    text = markdown(results, shots, args.splits, time.time() - start)
    (args.out / "difficulty_quality.md").write_text(text)
    print(f"wrote {args.out / 'difficulty_quality.md'}")


if __name__ == "__main__":
    main()

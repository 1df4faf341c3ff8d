"""The project's own detector on road_signs: accuracy, training time, and whether its difficulty counts.

``../shared/data/road_signs`` (Pascal VOC, 700 photos, 4 classes) is split by item-id hash
(:func:`difficulty.training.calibration_fraction` < 0.25: the held-out quarter, 175 items;
exactly the checkpoint's calibration split).  The detector is trained the way
``labeltriage train --task detection --backbone efficientnet_lite0`` trains it
(:func:`difficulty.training.train_model`: ``fcos`` on cached frozen EfficientNet-Lite0
features, flips of the cached maps), then measured on the held-out quarter only:

* **mAP@0.5** and per-class AP (VOC all-point interpolation, ``bench/active_learning.py``'s
  :func:`mean_ap`), with every detection above the model's 0.05 score floor;
* **training time** (feature extraction + fitting, wall clock, with ``uptime``'s load) and
  the **feature cache**'s memory;
* **difficulty**: ``labeltriage score`` with the checkpoint over the held-out items
  (:func:`difficulty.scoring.score_project`: Fourier, uncertainty, committee, EGL and the
  predicted loss), Spearman ρ of each scorer with the model's true per-item error
  (1 − F1 of its boxes at the checkpoint's box confidence, IoU 0.5) and of the
  combination — in sample, and over random half/half splits where the weights are fit
  on one half and ρ measured on the other (``bench/difficulty_quality.py``'s
  :func:`evaluate`);
* **the gate** at δ = 0.1, ε ∈ {0.1, 0.05}: over ``--splits`` random calibration/target
  halves of the held-out items, the combination's weights are fit on the calibration half
  only, the gate (:func:`autolabel.calibrate.calibrate_with_confidence`) is calibrated
  there and applied to the target half: coverage and the share of splits whose realised
  error exceeds ε (``bench/autolabel_guarantee.py``'s procedure).

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/detector.py`` (``--epochs``,
``--splits``, ``--data``, ``--keep DIR`` to keep the checkpoint and
scores and redo only the analysis).  Writes ``bench/results/detector.md`` and ``detector.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
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

from autolabel.calibrate import (  # noqa: E402
    DEFAULT_BOX_CONFIDENCES,
    calibrate_with_confidence,
    min_passing_count,
)
from bench._common import machine_line  # noqa: E402
from bench.active_learning import mean_ap  # noqa: E402
from bench.difficulty_quality import evaluate  # noqa: E402
from connectors.labelmap import LabelMap  # noqa: E402
from connectors.model import Item  # noqa: E402
from connectors.project import open_project  # noqa: E402
from difficulty.boxconfidence import choose_box_confidence  # noqa: E402
from difficulty.checkpoint import load_checkpoint  # noqa: E402
from difficulty.combine import fit_weights, percentiles, risk_coverage_curve  # noqa: E402
from difficulty.inference import infer  # noqa: E402
from difficulty.matching import item_correct  # noqa: E402
from difficulty.scoring import score_project  # noqa: E402
from difficulty.table import read_difficulty  # noqa: E402
from difficulty.training import calibration_fraction, train_model  # noqa: E402

log = logging.getLogger("bench.detector")

CLASSES = ["crosswalk", "speedlimit", "stop", "trafficlight"]
HELD_OUT = 0.25
EPSILONS = (0.1, 0.05)
DELTA = 0.1
MIN_COUNT = 30
GATE_SINGLE = ("predicted_loss", "box_margin", "box_least_confidence", "det_entropy")
"""Scorers the gate is also tried with alone (the combination's parts, nothing fit)."""


class HeldOut:
    """A project format that yields only some of its items (the held-out quarter)."""

    def __init__(self, fmt: Any, ids: set[str]) -> None:
        self._fmt = fmt
        self._ids = ids

    def iter_items(self) -> Any:
        return (it for it in self._fmt.iter_items() if it.item_id in self._ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fmt, name)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def split_scores(
    pct: pd.DataFrame, error: np.ndarray, splits: int, seed: int, scorer: str | None = None
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``splits`` random calibration/target halves, each with the gate's score of every item.

    The score: the combination, its weights fit on the calibration half's ``error`` only;
    or, with ``scorer``, that one scorer's percentile (nothing fit).
    """
    rng = np.random.default_rng(seed)
    n = len(error)
    out = []
    for _ in range(splits):
        perm = rng.permutation(n)
        cal, tgt = perm[: n // 2], perm[n // 2 :]
        if scorer is not None:
            score = pct[scorer].to_numpy()
        else:
            visible = np.full(n, np.nan)
            visible[cal] = error[cal]
            score = fit_weights(pct, visible, seed=seed).score(pct)
        out.append((cal, tgt, score))
    return out


def gate_splits(
    halves: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    wrong: dict[float, np.ndarray],
    epsilon: float,
) -> dict[str, Any]:
    """Coverage and violations of the gate over calibration/target ``halves``
    (:func:`split_scores`).  ``wrong``: the auto-label errors per box confidence the gate
    may keep — the whole grid (``δ`` split over it) or the checkpoint's one confidence
    (full ``δ``), as :func:`autolabel.gate.run_autolabel` calibrates them.
    """
    violations, covs, errs, chose = 0, [], [], 0
    for cal, tgt, score in halves:
        res = calibrate_with_confidence(
            score[cal],
            {c: w[cal] for c, w in wrong.items()},
            epsilon=epsilon,
            delta=DELTA,
            min_count=MIN_COUNT,
        )
        if res.threshold is None or res.box_confidence is None:
            covs.append(0.0)
            continue
        chose += 1
        sel = tgt[score[tgt] <= res.threshold]
        covs.append(len(sel) / len(tgt))
        if len(sel):
            err = float(wrong[res.box_confidence][sel].mean())
            errs.append(err)
            violations += int(err > epsilon)
    return {
        "box_confidences": sorted(wrong),
        "level": DELTA / len(wrong),
        "epsilon": epsilon,
        "delta": DELTA,
        "splits": len(halves),
        "mean_coverage": float(np.mean(covs)),
        "violation_rate": violations / len(halves),
        "share_labeling_something": chose / len(halves),
        "mean_realised_error": float(np.mean(errs)) if errs else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--splits", type=int, default=1000)
    parser.add_argument("--quality-splits", type=int, default=20)
    parser.add_argument(
        "--keep",
        default=None,
        help="folder to keep the checkpoint and scores in; with both there, reuse them (analysis only)",
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    root = Path(args.data) / "road_signs"
    if not root.is_dir():
        print(f"{root} not found", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.keep or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "run.json").exists():
            train(args, root, folder)
        data = analyse(args, root, folder)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "detector.json").write_text(json.dumps(data, indent=1, default=float))
    (out / "detector.md").write_text(markdown(data))
    print(markdown(data))
    return 0


def _items(root: Path) -> tuple[Any, list[Item], list[Item]]:
    project = open_project(str(root), "voc")
    items = sorted(
        (it for it in project.iter_items() if it.error is None), key=lambda it: it.item_id
    )
    return project, items, [it for it in items if calibration_fraction(it.item_id) < HELD_OUT]


def train(args: argparse.Namespace, root: Path, folder: Path) -> None:
    """Train as the CLI does; keep the checkpoint and what the training measured in ``folder``."""
    project, items, held = _items(root)
    record: dict[str, Any] = {"machine": machine_line(), "uptime_before": uptime()}
    t0, cpu0 = time.perf_counter(), time.process_time()
    ckpt = train_model(
        items,
        project,
        task="detection",
        backbone="efficientnet_lite0",
        classes=CLASSES,
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        calibration_share=HELD_OUT,
        out=str(folder / "fcos.pt"),
    )
    record["train_seconds"] = time.perf_counter() - t0
    record["train_cpu_seconds"] = time.process_time() - cpu0
    record["uptime_after_training"] = uptime()
    record["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record["argv"] = sys.argv[1:]
    if set(ckpt.meta["calibration_ids"]) != {it.item_id for it in held}:
        raise RuntimeError("the checkpoint's calibration split is not the held-out quarter")
    (folder / "run.json").write_text(json.dumps(record, indent=1))


def analyse(args: argparse.Namespace, root: Path, folder: Path) -> dict[str, Any]:
    """mAP, difficulty agreement and the gate of the checkpoint in ``folder`` on the held-out items."""
    project, _, held = _items(root)
    ckpt_path = str(folder / "fcos.pt")
    record = json.loads((folder / "run.json").read_text())
    record["analysis_machine"], record["uptime_analysis_start"] = machine_line(), uptime()
    record["analysis_argv"] = sys.argv[1:]
    training = load_checkpoint(ckpt_path).meta["training"]
    t0 = time.perf_counter()
    truth = {
        it.item_id: [(a.label, tuple(a.box)) for a in it.annotations if a.box is not None]
        for it in held
    }
    predicted: dict[str, list[tuple[str, tuple[float, ...], float]]] = {}
    preds = {}
    for batch in infer(ckpt_path, held, project, batch_size=16, box_score_min=0.0):
        for pred in batch.predictions:
            preds[pred.item_id] = pred
            predicted[pred.item_id] = [
                (a.label, tuple(a.box), float(a.score or 0.0))
                for a in pred.annotations
                if a.box is not None
            ]
    infer_seconds = time.perf_counter() - t0
    m, per_class = mean_ap(truth, predicted, CLASSES)
    chosen = checkpoint_box_confidence(folder, root, ckpt_path, held)
    c_model = float(chosen["value"])
    scores = folder / f"scores@{c_model:g}"
    if not (scores / "difficulty.parquet").exists():
        score_project(
            HeldOut(project, {it.item_id for it in held}),  # type: ignore[arg-type]
            checkpoint=ckpt_path,
            out_dir=str(scores),
            num_workers=0,
            batch_size=16,
            seed=0,
            error_min_score=c_model,  # what scoring defaults to with a checkpoint that records it
        )
    table, _ = read_difficulty(str(scores))
    scorers = [c for c in table.columns if c not in NOT_SCORERS]
    quality = evaluate(table, scorers, splits=args.quality_splits, seed=0)
    ok = table["error"].isna().to_numpy()
    t = table[ok].reset_index(drop=True)
    err = t["true_error"].to_numpy(dtype=np.float64)
    pct = percentiles(t, scorers)
    by_id = {it.item_id: it for it in held}
    wrong = {
        c: np.array(
            [
                not item_correct(by_id[i], preds.get(i), LabelMap(), min_score=c)
                for i in t["item_id"]
            ]
        )
        for c in DEFAULT_BOX_CONFIDENCES
    }
    gate = []
    for s in (None, *GATE_SINGLE):
        halves = split_scores(pct, err, args.splits, seed=0, scorer=s)
        for grid in (wrong, {c_model: wrong[c_model]}):
            for e in EPSILONS:
                gate.append({"score": s or "combination", **gate_splits(halves, grid, e)})
    easy_half = {s: easy_half_risk(pct[s].to_numpy(), err) for s in scorers}
    easy_half["combination"] = easy_half_risk(quality["fit"].score(pct), err)
    error_free = {}
    at_model = wrong[c_model]
    for name in GATE_SINGLE:
        order = np.argsort(pct[name].to_numpy(), kind="stable")
        run = int(np.argmax(at_model[order])) if at_model[order].any() else len(order)
        error_free[name] = {"items": run, "box_confidence": c_model}
    return {
        **record,
        "box_confidence": chosen,
        "error_free_prefix": error_free,
        "easy_half_risk": easy_half,
        "items": {"train": training["items"], "held_out": len(held)},
        "feature_seconds": training["feature_seconds"],
        "fit_seconds": training["fit_seconds"],
        "epochs": training["epochs"],
        "final_loss": training["history"][-1]["target_loss"],
        "feature_cache": training["feature_cache"],
        "infer_seconds": infer_seconds,
        "map50": m,
        "per_class_ap": per_class,
        "mean_true_error": float(np.mean(err)),
        "share_correct": float((err == 0).mean()),
        "rho_single": quality["single"],
        "rho_combined_in_sample": quality["in_sample"],
        "combination": quality["fit"].to_dict(),
        "rho_cv_mean": quality["cv_mean"],
        "rho_cv_sd": quality["cv_sd"],
        "combined_le_best_single_aurc_share": quality["combined_le_best_single_aurc_share"],
        "error_min_score": c_model,
        "gate": gate,
        "wrong_share_by_box_confidence": {str(c): float(w.mean()) for c, w in wrong.items()},
        "uptime_analysis_end": uptime(),
    }


def easy_half_risk(score: np.ndarray, error: np.ndarray) -> float:
    """Mean true error among the ``k`` easiest items, averaged over ``k`` up to half the
    items: the risk–coverage area of the easy half, where the gate decides."""
    coverage, risk = risk_coverage_curve(score, error)
    return float(risk[coverage <= 0.5].mean())


def checkpoint_box_confidence(
    folder: Path, root: Path, ckpt_path: str, held: list[Item]
) -> dict[str, Any]:
    """The box confidence the gate keeps for the checkpoint (chosen on its training items).

    Recorded by training (``meta["box_confidence"]``); a checkpoint from before that
    record gets it by the same rule from its training items' predictions, kept in
    ``folder/box_confidence.json``.
    """
    recorded = load_checkpoint(ckpt_path).meta.get("box_confidence")
    if recorded:
        return {**recorded, "source": "recorded by training"}
    kept = folder / "box_confidence.json"
    if kept.exists():
        return dict(json.loads(kept.read_text()))
    held_ids = {it.item_id for it in held}
    project, items, _ = _items(root)
    train = [it for it in items if it.item_id not in held_ids]
    preds = {
        p.item_id: p
        for batch in infer(
            ckpt_path, train, project, batch_size=16, box_score_min=min(DEFAULT_BOX_CONFIDENCES)
        )
        for p in batch.predictions
    }
    chosen = {
        **choose_box_confidence(train, preds),
        "source": "checkpoint from before the record: the same rule on its training items' "
        "predictions, images re-read",
    }
    kept.write_text(json.dumps(chosen, indent=1))
    return chosen


NOT_SCORERS = {
    "item_id",
    "uri",
    "status",
    "error",
    "true_error",
    "annotation_seconds",
    "model_version",
    "score",
    "tier",
    "rank",
}


def _rho(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:+.3f}"


def markdown(d: dict[str, Any]) -> str:
    cache = d["feature_cache"]
    box = d["box_confidence"]
    lines = [
        "# The project's own detector on road_signs (4 classes)",
        "",
        "`bench/detector.py`: `fcos` (light FPN + FCOS head) on frozen, cached EfficientNet-Lite0",
        "ImageNet features, trained as `labeltriage train --task detection --backbone "
        "efficientnet_lite0` trains it, on the 75 % of road_signs whose item-id hash is ≥ 0.25; "
        "everything below is measured on the other 25 % (the checkpoint's calibration split), "
        "which it never trained on.",
        "",
        f"Training run — machine: {d['machine']}.",
        f"Load (`uptime`) before training: `{d['uptime_before']}`; after: `{d['uptime_after_training']}`.",
        f"Command: `bench/detector.py {' '.join(d['argv'])}`. The training figures below (wall "
        "and CPU time, feature cache, peak memory) are that run's, kept with its checkpoint in "
        "the `--keep` folder.",
        "",
        f"Analysis (inference, scores, ρ, gate; command `bench/detector.py "
        f"{' '.join(d.get('analysis_argv', []))}`) — {d.get('analysis_machine', d['machine'])}. "
        f"Load at its start: `{d.get('uptime_analysis_start', '')}`; at its end: "
        f"`{d.get('uptime_analysis_end', '')}`.",
        "",
        "## Accuracy and cost",
        "",
        "| measure | value |",
        "|---|---|",
        f"| items trained on / held out | {d['items']['train']} / {d['items']['held_out']} |",
        f"| training wall time (features + fit) | {d['train_seconds']:.0f} s ({d['feature_seconds']:.0f} s features + {d['fit_seconds']:.0f} s for {d['epochs']} epochs) |",
        f"| training CPU time of the process (user + system, both threads) | {d['train_cpu_seconds']:.0f} s |",
        f"| **mAP@0.5** (held-out quarter) | **{d['map50']:.3f}** |",
        *[f"| AP@0.5 {c} | {v:.3f} |" for c, v in d["per_class_ap"].items()],
        f"| feature cache | {cache['items']} items, {cache['memory_bytes'] / 2**20:.0f} MiB in memory (float16), {cache['disk_bytes'] / 2**20:.0f} MiB on disk |",
        f"| peak resident memory of the whole run | {d['peak_rss_mib']:.0f} MiB |",
        f"| inference on the held-out items | {d['infer_seconds']:.0f} s |",
        f"| mean true error (1 − F1 at box score ≥ {d.get('error_min_score', 0.25):g}) / items without error | {d['mean_true_error']:.3f} / {d['share_correct']:.2f} |",
        "",
        "## Does difficulty agree with the model's true error? (Spearman ρ, held-out quarter)",
        "",
        "| scorer | ρ (all held-out items) | ρ on the test half (random fit/test halves, mean ± sd) |",
        "|---|---|---|",
    ]
    for s, v in sorted(d["rho_single"].items(), key=lambda kv: -np.nan_to_num(kv[1], nan=-9)):
        lines.append(
            f"| {s} | {_rho(v)} | {_rho(d['rho_cv_mean'].get(s))} ± {d['rho_cv_sd'].get(s, 0):.3f} |"
        )
    lines += [
        f"| **combination** | {_rho(d['rho_combined_in_sample'])} (weights fit on all) | {_rho(d['rho_cv_mean']['combined'])} ± {d['rho_cv_sd']['combined']:.3f} |",
        f"| best single scorer, chosen on the fit half | | {_rho(d['rho_cv_mean']['best single (chosen on fit half)'])} |",
        "",
        f"Combination (weights fit on all held-out items): method `{d['combination'].get('method')}`, "
        "weights "
        + ", ".join(f"{k} {v:.2f}" for k, v in (d["combination"].get("weights") or {}).items() if v)
        + ". The combination's risk–coverage area on the test half is at or below that of the "
        "best single scorer (chosen on the fit half) in "
        f"{d['combined_le_best_single_aurc_share']:.0%} of the fit/test splits.",
        "",
        "## The auto-label gate on the held-out items (δ = 0.1)",
        "",
        f"Over {d['gate'][0]['splits']} random calibration/target halves of the held-out items "
        f"({d['items']['held_out'] // 2} calibration items a half; the gate's `min_count` "
        f"{MIN_COUNT}); the combination's weights are fit on the calibration half only. Two ways "
        "to fix the box confidence the labels keep: calibrated over the grid "
        f"{list(DEFAULT_BOX_CONFIDENCES)} with δ split over it (what brought predictions get), or "
        f"the checkpoint's own, chosen on its training items ({box['value']:g}), tested at the "
        "full δ (what `autolabel --model` now does). A violation: a split whose realised error on "
        "the target half exceeds ε.",
        "",
        "| gate score | box confidence (level of each test) | ε | mean coverage of the target half | splits labeling something | mean realised error | violation rate (≤ δ asked) |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in d["gate"]:
        cs = g["box_confidences"]
        how = f"grid of {len(cs)} (δ/{len(cs)})" if len(cs) > 1 else f"{cs[0]:g}, the model's (δ)"
        lines.append(
            f"| {g['score']} | {how} | {g['epsilon']} | {g['mean_coverage']:.3f} | {g['share_labeling_something']:.2f} | "
            f"{g['mean_realised_error']:.3f} | {g['violation_rate']:.3f} |"
        )
    lines += [
        "",
        f"The checkpoint's box confidence: {box['value']:g} ({box['rule']}; {box['items']} training "
        "items; " + str(box.get("source", "recorded by training")) + "). Share of items whose "
        "auto-label would be wrong, by the box confidence kept — training items: "
        + ", ".join(f"≥ {c}: {v:.2f}" for c, v in box["wrong_share"].items())
        + "; held-out items: "
        + ", ".join(f"≥ {c}: {v:.2f}" for c, v in d["wrong_share_by_box_confidence"].items())
        + ".",
        "",
        f"A threshold passes ε = 0.1 with no error among at least "
        f"{min_passing_count(0.1, DELTA)} calibration items at the full δ and "
        f"{min_passing_count(0.1, DELTA / len(DEFAULT_BOX_CONFIDENCES))} at "
        f"δ/{len(DEFAULT_BOX_CONFIDENCES)} (`autolabel.calibrate.min_passing_count`), and never "
        f"with fewer than `min_count` = {MIN_COUNT}. The longest run of error-free items from "
        f"the easy end of each scorer's ranking at box confidence ≥ {box['value']:g}, over all "
        "held-out items: "
        + ", ".join(f"{k} {v['items']}" for k, v in d.get("error_free_prefix", {}).items())
        + "; a random half holds about half of such a run.",
        "",
        "**How the coverage arises, measured.** The walk tests nothing under "
        f"`min_count` = {MIN_COUNT} calibration items, so it labels only when the "
        f"{MIN_COUNT} easiest of the {d['items']['held_out'] // 2} calibration items (by the gate "
        "score) hold at most the errors the bound allows (none at ε = 0.1 for n = 30–37); "
        "then it labels about "
        + ", ".join(
            f"{g['mean_coverage'] / g['share_labeling_something']:.0%} of the target half "
            f"({g['score']})"
            for g in d["gate"]
            if len(g["box_confidences"]) == 1
            and g["epsilon"] == 0.1
            and g["share_labeling_something"] > 0
        )
        + ". Mean coverage is that times the share of splits in which the easy end of the "
        "calibration half is clean enough (the column *splits labeling something*; for the "
        "combination with the model's box confidence: "
        + ", ".join(
            f"{g['share_labeling_something']:.0%} at ε = {g['epsilon']}"
            for g in d["gate"]
            if g["score"] == "combination" and len(g["box_confidences"]) == 1
        )
        + "). So the gate's coverage is decided by how clean the easy end of its score is. "
        "Risk over the easiest half (mean true error among the k easiest held-out items, "
        "averaged over k up to half of them; lower is cleaner): "
        + ", ".join(
            f"{k} {v:.3f}"
            for k, v in sorted(d.get("easy_half_risk", {}).items(), key=lambda kv: kv[1])
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

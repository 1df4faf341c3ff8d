"""Detection active learning with the project's own detector: which query strategy buys what?

``../shared/data/road_signs`` (Pascal VOC, 700 photos, 4 classes).  Test set: the quarter
of the items whose item-id hash is < 0.25 (177 items, never labeled or trained on); pool:
the other 523, labels hidden until selected.  For each seed, 100 random pool items start
labeled (the same 100 for every strategy at that seed), then 4 cycles of select 50 →
reveal → train (warm start from the previous cycle's model), so each curve has 5 points
(100 … 300 labels).  The detector is the product's: ``fcos`` on frozen, cached
EfficientNet-Lite0 features (:func:`difficulty.training.train_model`), and selection reads
the same per-box outputs the CLI's ``select`` does (:func:`difficulty.inference.infer`,
the registered detection strategies, per-image ``max`` over boxes).  One feature cache
serves every training and every inference, so the backbone runs once per image.

Strategies: ``random``, ``least_confidence``, ``entropy``, ``vote_entropy`` (8 MC-dropout
passes of the classification layer), ``egl``, ``learning_loss`` (the loss-prediction
module) and ``combined`` (:class:`difficulty.hybrid.CombinedState`: percentiles of
least confidence, entropy, EGL and predicted loss, weighted by their measured Spearman ρ
with the true error of the items labeled so far — each item's error under the model that
picked it, out of sample; entropy alone before any item is revealed).

Measured per cycle: mAP@0.5 on the test set (VOC all-point AP, ``bench/active_learning.py``'s
:func:`mean_ap`), and for the analysis, over the whole unlabeled pool (whose labels the
bench knows): Spearman ρ of each strategy's values with the model's true per-item error
(1 − F1 at box score ≥ 0.25) and the mean true error of the 50 items it picked.

CPU setting (the machine is shared): 256 px inputs, 10 epochs for the first model, 3 per
warm-started cycle, batch 16.  Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python
bench/active_learning_detection.py`` (``--seeds``, ``--strategies``, ``--image-size``,
``--device cuda``; ``--from-json FILE`` redoes the report).  Writes ``bench/results/active_learning_fcos.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import machine_line  # noqa: E402
from bench.active_learning import mean_ap  # noqa: E402
from connectors.labelmap import LabelMap  # noqa: E402
from connectors.model import Item  # noqa: E402
from connectors.project import open_project  # noqa: E402
from difficulty.combine import spearman  # noqa: E402
from difficulty.featurecache import FeatureCache, cache_key  # noqa: E402
from difficulty.hybrid import CombinedState  # noqa: E402
from difficulty.inference import infer  # noqa: E402
from difficulty.matching import item_error  # noqa: E402
from difficulty.models.backbones import resolve_weights  # noqa: E402
from difficulty.strategies import strategy_for_task  # noqa: E402
from difficulty.training import calibration_fraction, train_model  # noqa: E402

log = logging.getLogger("bench.active_learning_detection")

CLASSES = ["crosswalk", "speedlimit", "stop", "trafficlight"]
STRATEGIES = (
    "random",
    "least_confidence",
    "entropy",
    "vote_entropy",
    "egl",
    "learning_loss",
    "combined",
)
COMBINED_PARTS = ("det_least_confidence", "det_entropy", "det_egl", "learning_loss")
COMMITTEE = 8
FIELDS = ("box_probs", "box_features", "box_committee", "predicted_loss")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def model_outputs(
    ckpt: str, items: list[Item], project: Any, cache: FeatureCache, committee: int
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Per-need arrays over ``items`` (in order), their predictions, their ids."""
    arrays: dict[str, list[Any]] = {f: [] for f in FIELDS}
    preds: dict[str, Any] = {}
    ids: list[str] = []
    for batch in infer(
        ckpt, items, project, batch_size=32, committee=committee, feature_cache=cache
    ):
        if batch.errors:
            raise RuntimeError(f"unreadable items: {batch.errors}")
        ids += batch.item_ids
        arrays["box_probs"] += batch.box_probs or []
        arrays["box_features"] += batch.box_features or []
        arrays["box_committee"] += batch.box_committee or []
        arrays["predicted_loss"].append(batch.predicted_loss)
        preds.update({p.item_id: p for p in batch.predictions})
    merged: dict[str, Any] = {k: v for k, v in arrays.items() if k != "predicted_loss"}
    merged["predicted_loss"] = np.concatenate(arrays["predicted_loss"])
    if not committee:
        merged.pop("box_committee")
    return merged, preds, ids


def strategy_values(name: str, arrays: dict[str, Any]) -> np.ndarray:
    spec = strategy_for_task(name, "detection")
    kwargs = {need: arrays[need] for need in spec.needs}
    return np.asarray(spec.fn(**kwargs), dtype=np.float64)


def evaluate_map(
    ckpt: str, test: list[Item], project: Any, cache: FeatureCache
) -> tuple[float, dict[str, float]]:
    truth = {
        it.item_id: [(a.label, tuple(a.box)) for a in it.annotations if a.box is not None]
        for it in test
    }
    predicted = {}
    for batch in infer(ckpt, test, project, batch_size=32, box_score_min=0.0, feature_cache=cache):
        for p in batch.predictions:
            predicted[p.item_id] = [
                (a.label, tuple(a.box), float(a.score or 0.0))
                for a in p.annotations
                if a.box is not None
            ]
    return mean_ap(truth, predicted, CLASSES)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=4, help="selection cycles after the start")
    parser.add_argument("--initial", type=int, default=100)
    parser.add_argument("--step", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--epochs-warm", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--from-json", default=None, help="redo the report from a saved run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        return write(data, Path(args.out))
    strategies = [s for s in args.strategies.split(",") if s]
    project = open_project(str(Path(args.data) / "road_signs"), "voc")
    items = sorted(
        (it for it in project.iter_items() if it.error is None), key=lambda it: it.item_id
    )
    test = [it for it in items if calibration_fraction(it.item_id) < 0.25]
    pool = [it for it in items if calibration_fraction(it.item_id) >= 0.25]
    setting = {k: v for k, v in vars(args).items() if k not in ("data", "out")}
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    load = [uptime()]
    weights = resolve_weights("efficientnet_lite0", None)
    key = cache_key(
        {
            "model": {"backbone": "efficientnet_lite0", "image_size": args.image_size},
            "backbone": weights.record(),
        }
    )
    with tempfile.TemporaryDirectory() as tmp, FeatureCache(key) as cache:

        def train(labeled: list[Item], name: str, init: str | None, seed: int) -> tuple[str, float]:
            path = os.path.join(tmp, f"{name}.pt")
            t0 = time.perf_counter()
            ckpt = train_model(
                labeled,
                project,
                task="detection",
                backbone="efficientnet_lite0",
                classes=CLASSES,
                epochs=args.epochs if init is None else args.epochs_warm,
                batch_size=16,
                image_size=args.image_size,
                calibration_share=0.0,
                init=init,
                seed=seed,
                device=args.device,
                out=path,
                feature_cache=cache,
            )
            del ckpt
            return path, time.perf_counter() - t0

        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            start = sorted(int(i) for i in rng.choice(len(pool), args.initial, replace=False))
            first, first_s = train([pool[i] for i in start], f"s{seed}-c0", None, seed * 1000)
            m0, pc0 = evaluate_map(first, test, project, cache)
            print(f"seed {seed} start: mAP@0.5 {m0:.3f} ({first_s:.0f} s)", flush=True)
            for strategy in strategies:
                labeled = set(start)
                ckpt = first
                combined = (
                    CombinedState(parts=COMBINED_PARTS, default="det_entropy", seed=seed)
                    if strategy == "combined"
                    else None
                )
                rec: dict[str, Any] = {
                    "strategy": strategy,
                    "seed": seed,
                    "labels": [len(labeled)],
                    "map50": [m0],
                    "per_class": [pc0],
                    "train_seconds": [first_s],
                    "select_seconds": [],
                    "pool_rho": [],
                    "picked_error": [],
                    "pool_error": [],
                    "weights": [],
                }
                for cycle in range(1, args.cycles + 1):
                    t0 = time.perf_counter()
                    unlabeled = [pool[i] for i in range(len(pool)) if i not in labeled]
                    index = [i for i in range(len(pool)) if i not in labeled]
                    arrays, preds, ids = model_outputs(
                        ckpt,
                        unlabeled,
                        project,
                        cache,
                        COMMITTEE if strategy in ("vote_entropy", "combined") else 0,
                    )
                    error = np.array(
                        [
                            item_error(it, preds.get(it.item_id), LabelMap(), min_score=0.25)
                            for it in unlabeled
                        ]
                    )
                    if strategy == "random":
                        values = rng.random(len(ids))
                    elif combined is not None:
                        values = combined.values(arrays)
                    else:
                        values = strategy_values(strategy, arrays)
                    picked = np.argsort(-values, kind="stable")[: args.step]
                    if combined is not None:
                        combined.observe(picked, error[picked])
                        rec["weights"].append(dict(combined.weights))
                    rec["pool_rho"].append(spearman(values, error))
                    rec["picked_error"].append(float(error[picked].mean()))
                    rec["pool_error"].append(float(error.mean()))
                    rec["select_seconds"].append(time.perf_counter() - t0)
                    labeled |= {index[int(i)] for i in picked}
                    ckpt, train_s = train(
                        [pool[i] for i in sorted(labeled)],
                        f"s{seed}-{strategy}-c{cycle}",
                        ckpt,
                        seed * 1000 + cycle,
                    )
                    m, pc = evaluate_map(ckpt, test, project, cache)
                    rec["labels"].append(len(labeled))
                    rec["map50"].append(m)
                    rec["per_class"].append(pc)
                    rec["train_seconds"].append(train_s)
                    print(
                        f"seed {seed} {strategy:16s} cycle {cycle}: {len(labeled)} labels, "
                        f"mAP@0.5 {m:.3f}, pool ρ {rec['pool_rho'][-1]:+.2f}, picked error "
                        f"{rec['picked_error'][-1]:.2f} (pool {rec['pool_error'][-1]:.2f}), "
                        f"train {train_s:.0f} s",
                        flush=True,
                    )
                runs.append(rec)
                load.append(uptime())
        cache_stats = cache.stats.to_dict()
    data = {
        "machine": machine_line(),
        "uptime": load,
        "setting": setting,
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "wall_seconds": time.perf_counter() - started,
        "feature_cache": cache_stats,
        "runs": runs,
    }
    return write(data, Path(args.out))


def write(data: dict[str, Any], out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / "active_learning_fcos.json").write_text(json.dumps(data, indent=1, default=float))
    text = report(data)
    (out / "active_learning_fcos.md").write_text(text)
    plot(data["runs"], out / "active_learning_fcos.png")
    print(text)
    return 0


def curves(runs: list[dict[str, Any]], key: str = "map50") -> dict[str, np.ndarray]:
    """Strategy → ``(seeds, cycles)`` array of ``key``."""
    out: dict[str, list[list[float]]] = {}
    for r in runs:
        out.setdefault(r["strategy"], []).append(r[key])
    return {s: np.array(v, dtype=np.float64) for s, v in out.items()}


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = np.array(runs[0]["labels"])
    for s, v in curves(runs).items():
        mean = v.mean(0)
        ax.plot(labels, mean, marker="o", label=s, lw=2.5 if s == "random" else 1.5)
        ax.fill_between(labels, v.min(0), v.max(0), alpha=0.12)
    ax.set_xlabel("labeled images")
    ax.set_ylabel("mAP@0.5 (test quarter)")
    ax.set_title("road_signs detection: fcos on EfficientNet-Lite0 (band: seed min–max)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(d: dict[str, Any]) -> str:
    runs = d["runs"]
    c = curves(runs)
    labels = runs[0]["labels"]
    seeds = len(next(iter(c.values())))
    lines = [
        "# Detection active learning on road_signs with the project's own detector",
        "",
        "`bench/active_learning_detection.py` (see its docstring for the protocol): test = the "
        "items whose item-id hash is < 0.25 (a quarter); pool = the rest; start with 100 random "
        "labels (the same per seed for every strategy), +50 per cycle, warm start; "
        f"{seeds} seeds; mAP@0.5 on the test set.",
        "",
        f"Machine: {d['machine']}. Setting: `{json.dumps(d['setting'])}`. Whole run "
        f"{d['wall_seconds'] / 60:.0f} min; `uptime` at the start: `{d['uptime'][0]}`, at the "
        f"end: `{d['uptime'][-1]}`. The backbone ran once per image: feature cache "
        f"{d['feature_cache'].get('items', 0)} items, "
        f"{d['feature_cache'].get('memory_bytes', 0) / 2**20:.0f} MiB in memory.",
        "",
        "## mAP@0.5 per cycle (mean over seeds; min–max in brackets)",
        "",
        "| strategy | " + " | ".join(f"{n} labels" for n in labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for s, v in c.items():
        cells = [
            f"{v[:, k].mean():.3f} [{v[:, k].min():.3f}–{v[:, k].max():.3f}]"
            for k in range(v.shape[1])
        ]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if "random" in c:
        rand = c["random"]
        lines += [
            "",
            "## Against random, from the third cycle on (mean over seeds; Δ = strategy − random)",
            "",
            "| strategy | "
            + " | ".join(f"Δ at {n}" for n in labels[2:])
            + " | at or above random at every one |",
            "|---|" + "---|" * (len(labels) - 1),
        ]
        for s, v in c.items():
            if s == "random":
                continue
            deltas = [v[:, k].mean() - rand[:, k].mean() for k in range(2, v.shape[1])]
            lines.append(
                f"| {s} | "
                + " | ".join(f"{x:+.3f}" for x in deltas)
                + f" | {'yes' if all(x >= 0 for x in deltas) else 'no'} |"
            )
    rho = curves(runs, "pool_rho")
    picked = curves(runs, "picked_error")
    pool_err = curves(runs, "pool_error")
    lines += [
        "",
        "## Why: what each strategy picks (measured on the unlabeled pool, whose labels the bench knows)",
        "",
        "Spearman ρ of the strategy's values with the current model's true per-item error over "
        "the whole unlabeled pool, and the mean true error (1 − F1) of the 50 items it picked "
        "vs the pool's mean; averaged over seeds and the 4 selection cycles.",
        "",
        "| strategy | ρ with true error on the pool | mean error of picked items | pool mean error |",
        "|---|---|---|---|",
    ]
    for s in c:
        lines.append(
            f"| {s} | {np.nanmean(rho[s]):+.3f} | {np.mean(picked[s]):.3f} | {np.mean(pool_err[s]):.3f} |"
        )
    if "random" in c:
        below = [
            s
            for s, v in c.items()
            if s != "random"
            and any(v[:, k].mean() < c["random"][:, k].mean() for k in range(2, v.shape[1]))
        ]
        for s in below:
            lines += [
                "",
                f"`{s}` falls below random: its values rank the pool's true error at ρ "
                f"{np.nanmean(rho[s]):+.3f}, so the items it picks are no harder than the pool "
                f"(mean error {np.mean(picked[s]):.3f} vs {np.mean(pool_err[s]):.3f}); the "
                "strategies above random pick items harder than the pool (ρ > 0).",
            ]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

"""labeltriage's difficulty next to FiftyOne Brain's hardness and mistakenness, same items.

Every measure gives one value per item; each is compared, by Spearman ρ, with the true
per-item error of the predictions on the same items.  labeltriage reads the items through
its FiftyOne connector (``fiftyone://``), exactly as a FiftyOne user would run it.

* **Classification** — scikit-learn's digits (1,797 real 8×8 images, upscaled ×4 to PNG
  files).  The small model: a multinomial logistic regression on the raw pixels, trained on
  a random 10 % of the images; the other 90 % are the items, each with the model's
  ``logits`` and its arg-max class (``confidence`` = the softmax maximum) as the
  ``predictions`` field and its true class as ``ground_truth``.  True error: labeltriage's
  (1 when the arg-max class is wrong or below confidence 0.25, else 0) and, as a
  continuous loss, the cross-entropy of the true class.  FiftyOne Brain:
  ``compute_hardness`` (entropy of the softmax of the logits) and ``compute_mistakenness``
  (with ``use_logits``).  Repeated over ``--seeds`` training splits.
* **Detection** — road_signs (700 real photos, Pascal VOC) with its real YOLOv5n
  predictions, imported with FiftyOne's own VOC and YOLO importers; model classes mapped
  to project classes (``stop sign``→``stop``, ``traffic light``→``trafficlight``, others
  dropped) into the field both tools read.  Two projects: ground truth restricted to
  {stop, trafficlight} (``2cls``, what the detector can label) and all four classes
  (``4cls``).  True error: labeltriage's (1 − F1 of the matching at IoU 0.5, confidence
  ≥ 0.25).  FiftyOne Brain: ``compute_mistakenness`` — per sample the largest
  ``mistakenness`` of its ground-truth objects (no object: 0 here), and the counts of
  ``possible_missing`` and ``possible_spurious`` objects.  ``compute_hardness`` takes
  classifications only.

labeltriage is scored twice: with every item's label known (its combination weights fit
on the same items: in sample) and with the labels of a random half hidden from it (weights
fit on the other half, ρ measured on the hidden half only: held out).  Every other measure
is reported on both item sets.  Mind what each needs: ``compute_mistakenness`` reads each
item's own label (it judges the label), ``compute_hardness`` and labeltriage's scorers do
not (labeltriage uses labels only to weight its scorers).

Run with FiftyOne installed (``make test-integration`` puts it into ``.venv-fo``):
``OMP_WAIT_POLICY=PASSIVE .venv-fo/bin/python bench/fiftyone_side_by_side.py``
(``--seeds N``, ``--data DIR``, ``--out FILE``).  Writes
``bench/results/fiftyone_side_by_side.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
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

MAP = {"stop sign": "stop", "traffic light": "trafficlight"}
ROAD_CLASSES = ("stop", "trafficlight")

log = logging.getLogger("bench.fiftyone_side_by_side")


def configure_fiftyone(db_dir: str) -> Any:
    """Import FiftyOne with its database in ``db_dir`` (127.0.0.1, no tracking)."""
    os.environ.update(
        FIFTYONE_DO_NOT_TRACK="true",
        FIFTYONE_DATABASE_VALIDATION="false",
        FIFTYONE_DATABASE_DIR=db_dir,
        FIFTYONE_SHOW_PROGRESS_BARS="false",
    )
    import fiftyone as fo

    return fo


# -- labeltriage on a dataset ------------------------------------------------------------------------


def labeltriage_table(
    dataset: Any, out_dir: str, *, label_field: str = "ground_truth"
) -> tuple[pd.DataFrame, dict[str, Any], float]:
    """Score ``dataset`` through the connector; the table (by sample id), metadata, seconds."""
    from connectors.formats.fiftyone.dataset import FiftyOneDataset, FiftyOnePredictions
    from connectors.project import open_project
    from difficulty.scoring import score_project

    url = f"fiftyone://{dataset.name}?label_field={label_field}&publish_scores=false"
    project = open_project(url)
    assert isinstance(project, FiftyOneDataset)
    predictions = FiftyOnePredictions(project.dataset, "predictions")
    start = time.perf_counter()
    result = score_project(project, predictions=predictions, out_dir=out_dir, num_workers=0)
    seconds = time.perf_counter() - start
    return result.table.set_index("item_id"), result.meta, seconds


def hide_half(dataset: Any, seed: int) -> tuple[str, set[str]]:
    """A label field with the labels of a random half only; returns it and the hidden ids."""
    ids = dataset.values("id")
    rng = np.random.default_rng(seed)
    hidden = set(rng.choice(ids, size=len(ids) // 2, replace=False).tolist())
    values = [
        None if i in hidden else v for i, v in zip(ids, dataset.values("ground_truth"), strict=True)
    ]
    dataset.set_values("gt_fit", values)
    return "gt_fit", hidden


def rho(x: Any, y: Any) -> float:
    from difficulty.combine import spearman

    return spearman(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))


# -- classification ----------------------------------------------------------------------------------


def digits_dataset(fo: Any, folder: Path, seed: int) -> tuple[Any, np.ndarray]:
    """Digits as a dataset with a small model's logits; returns it and the true-class loss."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_train = len(y) // 10
    train, items = order[:n_train], order[n_train:]
    model = LogisticRegression(max_iter=2000).fit(x[train], y[train])
    logits = model.decision_function(x[items])
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    classes = [str(c) for c in model.classes_]
    samples = []
    for row, i in enumerate(items):
        path = folder / f"digit{i:04d}.png"
        if not path.exists():
            pixels = (digits.images[i] * 255.0 / 16.0).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32), Image.Resampling.NEAREST).save(path)
        k = int(np.argmax(probs[row]))
        samples.append(
            fo.Sample(
                filepath=str(path),
                ground_truth=fo.Classification(label=str(y[i])),
                predictions=fo.Classification(
                    label=classes[k], confidence=float(probs[row, k]), logits=logits[row].tolist()
                ),
            )
        )
    dataset = fo.Dataset(f"digits-{seed}-{os.getpid()}")
    dataset.default_classes = classes
    dataset.save()
    dataset.add_samples(samples, progress=False)
    true_class = np.searchsorted(model.classes_, y[items])
    loss = -np.log(np.clip(probs[np.arange(len(items)), true_class], 1e-12, 1.0))
    return dataset, loss


def classification_run(fo: Any, folder: Path, seed: int, work: str) -> dict[str, Any]:
    import fiftyone.brain as fob

    dataset, loss = digits_dataset(fo, folder, seed)
    try:
        ids = dataset.values("id")
        loss_of = dict(zip(ids, loss, strict=True))
        table, meta, lt_seconds = labeltriage_table(dataset, f"{work}/c{seed}a")
        start = time.perf_counter()
        fob.compute_hardness(dataset, "predictions", progress=False)
        hardness_s = time.perf_counter() - start
        start = time.perf_counter()
        fob.compute_mistakenness(
            dataset, "predictions", label_field="ground_truth", use_logits=True, progress=False
        )
        mistakenness_s = time.perf_counter() - start
        fit_field, hidden = hide_half(dataset, seed + 1000)
        held, held_meta, _ = labeltriage_table(dataset, f"{work}/c{seed}b", label_field=fit_field)
        measures = {
            "hardness": dict(zip(ids, dataset.values("hardness"), strict=True)),
            "mistakenness": dict(zip(ids, dataset.values("mistakenness"), strict=True)),
        }
        accuracy = float(np.mean(table.loc[ids, "true_error"] == 0.0))
        return summarize(
            ids, hidden, table, held, meta, held_meta, measures,
            targets={"error": dict(table["true_error"]), "loss": loss_of},
            extra={"accuracy": accuracy, "seconds": {
                "labeltriage score": lt_seconds, "compute_hardness": hardness_s,
                "compute_mistakenness": mistakenness_s,
            }},
        )  # fmt: skip
    finally:
        dataset.delete()


# -- detection ---------------------------------------------------------------------------------------


def road_signs_dataset(fo: Any, data: Path, keep: tuple[str, ...] | None) -> Any:
    import fiftyone.utils.yolo as fouy

    root = data / "road_signs"
    dataset = fo.Dataset.from_dir(
        dataset_type=fo.types.VOCDetectionDataset,
        data_path=str(root / "images"),
        labels_path=str(root / "annotations"),
        label_field="ground_truth",
        name=f"road-signs-{'all' if keep is None else len(keep)}-{os.getpid()}",
        progress=False,
    )
    if keep is not None:
        in_keep = fo.ViewField("label").is_in(list(keep))
        dataset.filter_labels("ground_truth", in_keep, only_matches=False).save("ground_truth")
    names = [n for n in (root / "predictions/yolo/classes.txt").read_text().split("\n") if n]
    fouy.add_yolo_labels(dataset, "yolov5n", str(root / "predictions/yolo"), names)
    mapped = []
    for value in dataset.values("yolov5n"):
        dets = [] if value is None else value.detections
        kept = [d.copy() for d in dets if d.label in MAP]
        for d in kept:
            d.label = MAP[d.label]
        mapped.append(fo.Detections(detections=kept))
    dataset.set_values("predictions", mapped)
    return dataset


def detection_run(
    fo: Any, data: Path, keep: tuple[str, ...] | None, seed: int, work: str
) -> dict[str, Any]:
    import fiftyone.brain as fob

    dataset = road_signs_dataset(fo, data, keep)
    try:
        ids = dataset.values("id")
        table, meta, lt_seconds = labeltriage_table(dataset, f"{work}/d{seed}a")
        start = time.perf_counter()
        fob.compute_mistakenness(dataset, "predictions", label_field="ground_truth", progress=False)
        mistakenness_s = time.perf_counter() - start
        fit_field, hidden = hide_half(dataset, seed)
        held, held_meta, _ = labeltriage_table(dataset, f"{work}/d{seed}b", label_field=fit_field)
        mistakenness = [0.0 if v is None else v for v in dataset.values("mistakenness")]
        missing = [v or 0 for v in dataset.values("possible_missing")]
        spurious = [v or 0 for v in dataset.values("possible_spurious")]
        measures = {
            "mistakenness (max over objects)": dict(zip(ids, mistakenness, strict=True)),
            "possible_missing": dict(zip(ids, missing, strict=True)),
            "possible_spurious": dict(zip(ids, spurious, strict=True)),
            "possible_missing + possible_spurious": dict(
                zip(ids, np.add(missing, spurious), strict=True)
            ),
        }
        return summarize(
            ids, hidden, table, held, meta, held_meta, measures,
            targets={"error": dict(table["true_error"])},
            extra={"mean_error": float(table["true_error"].mean()), "seconds": {
                "labeltriage score": lt_seconds, "compute_mistakenness": mistakenness_s,
            }},
        )  # fmt: skip
    finally:
        dataset.delete()


# -- tables ------------------------------------------------------------------------------------------


def summarize(
    ids: list[str],
    hidden: set[str],
    table: pd.DataFrame,
    held: pd.DataFrame,
    meta: dict[str, Any],
    held_meta: dict[str, Any],
    measures: dict[str, dict[str, Any]],
    *,
    targets: dict[str, dict[str, Any]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """ρ of every measure with every target, on all items and on the hidden half."""
    held_ids = [i for i in ids if i in hidden]
    rows: dict[str, dict[str, float]] = {}

    def add(name: str, values: dict[str, Any], *, all_items: bool = True) -> None:
        row = rows.setdefault(name, {})
        for target, truth in targets.items():
            if all_items:
                row[f"{target}, all"] = rho([values[i] for i in ids], [truth[i] for i in ids])
            row[f"{target}, held out"] = rho(
                [values[i] for i in held_ids], [truth[i] for i in held_ids]
            )

    add("labeltriage difficulty (in sample)", dict(table["score"]))
    add(
        "labeltriage difficulty (weights fit on the other half)",
        dict(held["score"]),
        all_items=False,
    )
    for scorer in meta["scorers"]:
        add(f"labeltriage `{scorer}`", dict(table[scorer]))
    for name, values in measures.items():
        add(f"FiftyOne Brain {name}", values)
    return {
        "rows": rows,
        "n": len(ids),
        "n_held": len(held_ids),
        "chosen": chosen(meta),
        "held_chosen": chosen(held_meta),
        **extra,
    }


def chosen(meta: dict[str, Any]) -> str:
    """The scorers the combination weighs, e.g. ``box_count`` or ``entropy 0.6 + margin 0.4``."""
    weights = {k: float(v) for k, v in meta["combination"].get("weights", {}).items() if v}
    if len(weights) == 1:
        return f"`{next(iter(weights))}`"
    return " + ".join(f"`{k}` {w:.2f}" for k, w in weights.items()) or "none"


def mean_sd(values: list[float | None]) -> str:
    """``mean ± sd``; ``n/a`` when not measured, ``constant`` when ρ is undefined."""
    if any(v is None for v in values):
        return "n/a"
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)])
    if not len(arr):
        return "constant"
    return f"{arr.mean():+.3f}" if len(arr) == 1 else f"{arr.mean():+.3f} ± {arr.std(ddof=1):.3f}"


def markdown_table(runs: list[dict[str, Any]]) -> list[str]:
    columns = list(next(iter(runs[0]["rows"].values())).keys())
    lines = ["| measure | " + " | ".join(f"ρ {c}" for c in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for name in runs[0]["rows"]:
        cells = [mean_sd([r["rows"][name].get(c) for r in runs]) for c in columns]
        bold = name.startswith("labeltriage difficulty")
        label = f"**{name}**" if bold else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, default=3, help="training splits / hidden halves")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "fiftyone_side_by_side.md"
    )
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.work is None:
        sys.exit(run_in_child())
    measure(args)


def run_in_child() -> int:
    """Measure in a child process, then remove its database once its MongoDB has stopped.

    FiftyOne stops ``mongod`` after the last process that used it has exited, so the
    folder can only go after the child is gone and ``mongod.lock`` is released (emptied).
    """
    work = Path(tempfile.mkdtemp(prefix="lt-fo-bench-"))
    try:
        return subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--work", str(work)]
        ).returncode
    finally:
        lock = work / "db" / "mongod.lock"
        deadline = time.monotonic() + 120
        while lock.exists() and lock.stat().st_size and time.monotonic() < deadline:
            time.sleep(1)
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace) -> None:
    from importlib.metadata import version

    from bench._common import machine_line

    started = time.perf_counter()
    work = str(args.work)
    fo = configure_fiftyone(f"{work}/db")
    versions = f"FiftyOne {version('fiftyone')}, FiftyOne Brain {version('fiftyone-brain')}"
    folder = args.work / "digits"
    folder.mkdir()
    classification = [classification_run(fo, folder, s, work) for s in range(args.seeds)]
    detection = {
        name: [detection_run(fo, args.data, keep, s, work) for s in range(args.seeds)]
        for name, keep in (("2cls", ROAD_CLASSES), ("4cls", None))
    }
    machine = machine_line()
    total = time.perf_counter() - started
    lines = write_markdown(classification, detection, machine, versions, args.seeds, total)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def choices_line(runs: list[dict[str, Any]]) -> str:
    """Which scorers labeltriage's combination chose, per seed, and the first seed's timings."""
    chosen = "; ".join(f"{r['chosen']} / {r['held_chosen']}" for r in runs)
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in runs[0]["seconds"].items())
    return (
        f"Scorers the combination chose per seed (all labels / fit half): {chosen}. "
        f"Seconds (first seed): {seconds}."
    )


def write_markdown(
    classification: list[dict[str, Any]],
    detection: dict[str, list[dict[str, Any]]],
    machine: str,
    versions: str,
    seeds: int,
    total: float,
) -> list[str]:
    c0 = classification[0]
    lines = [
        "# labeltriage difficulty vs FiftyOne Brain, on the same items",
        "",
        "Produced by `bench/fiftyone_side_by_side.py` (its docstring has the method). Spearman ρ of",
        "each per-item measure with the true per-item error of the predictions, higher = ranks the",
        f'error better; mean ± sd over {seeds} seeds (training split / hidden half). "all": every item;',
        '"held out": the half whose labels labeltriage did not see when it weighted its scorers.',
        f"labeltriage read every dataset through `fiftyone://`. Total bench time {total:.0f} s.",
        "",
        f"Machine: {machine}. {versions}.",
        "",
        "## Classification: digits, logistic regression on 10 % of the images",
        "",
        f"{c0['n']} items ({c0['n_held']} held out); model accuracy "
        f"{mean_sd([r['accuracy'] for r in classification])} on the items. Targets: `error` = "
        "labeltriage's 0/1 error (wrong class, or top probability below 0.25), `loss` = "
        "cross-entropy of the true class.",
        "",
        *markdown_table(classification),
        "",
        "`compute_hardness` is by definition the entropy of the softmax of the logits: the",
        "quantity of labeltriage's `entropy` scorer. `compute_mistakenness` reads each item's own",
        "label (it rates how likely that label is wrong), which the other measures never see.",
        "On a correctly classified item the cross-entropy of the true class is −log of the top",
        "probability, a monotone function of least confidence.",
        "",
        choices_line(classification),
        "",
    ]
    for name, runs in detection.items():
        r0 = runs[0]
        title = "{stop, trafficlight}" if name == "2cls" else "all four classes"
        lines += [
            f"## Detection: road_signs, ground truth {title}, real YOLOv5n predictions",
            "",
            f"{r0['n']} items ({r0['n_held']} held out); mean true error {r0['mean_error']:.3f}. "
            "`compute_hardness` does not apply (classifications only).",
            "",
            *markdown_table(runs),
            "",
            choices_line(runs),
            "",
        ]
    lines += [
        "n/a: not measured on that item set. constant: the measure has one value on every item,",
        "so ρ is undefined. Timing figures come from a shared machine (see the load average).",
    ]
    return lines


if __name__ == "__main__":
    main()

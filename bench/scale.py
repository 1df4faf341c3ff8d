"""Throughput of scoring on the Dask engine with 1 and 2 workers (and the local engine).

Scores the real road-sign photos (../shared/data/road_signs, Pascal VOC) twice: with the
real YOLOv5n predictions (light per-item work: Fourier + box-confidence scorers), and with
an untrained SSDlite checkpoint (heavy per-item work: model inference), each on:

* the local engine (one process, the chunks one after another);
* the Dask engine, a LocalCluster on 127.0.0.1 with 1 worker, then with 2 workers
  (one thread each), the same chunks as Dask tasks over manifest partitions.

Each configuration runs ``--repeats`` times; the table reports the best and the median
wall time and items per second.  Cluster start-up is not timed (it is paid once per
run of ``labeltriage``), the write of the manifest partitions is.  The script also checks
that every engine produced the same table.  Results go to ``bench/results/scale.md``.

    python bench/scale.py [--items 700] [--chunk-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autolabel.engine_dask import DaskEngine  # noqa: E402
from connectors.labelmap import LabelMap  # noqa: E402
from connectors.project import open_predictions, open_project  # noqa: E402
from difficulty.scoring import score_project  # noqa: E402

DATA = (
    Path(os.environ.get("LABELTRIAGE_SHARED_DATA", REPO.parent / "shared" / "data")) / "road_signs"
)
LABEL_MAP = LabelMap(map={"stop sign": "stop", "traffic light": "trafficlight"})


class Limited:
    """The first ``n`` items of a project (same format object otherwise)."""

    def __init__(self, fmt: Any, n: int) -> None:
        self.fmt = fmt
        self.n = n
        self.project = fmt.project
        self.name = getattr(fmt, "name", type(fmt).__name__)
        self.tasks = fmt.tasks

    def iter_items(self) -> Any:
        for i, item in enumerate(self.fmt.iter_items()):
            if i >= self.n:
                return
            yield item

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fmt, name)


def random_detector(path: str, image_size: int) -> str:
    """An untrained SSDlite checkpoint (random weights): real inference cost, no download."""
    import torch

    from difficulty.checkpoint import save_checkpoint
    from difficulty.models.build import model_from_meta

    meta = {
        "task": "detection",
        "arch": "ssdlite",
        "classes": ["stop", "trafficlight"],
        "model": {"image_size": image_size},
        "version": "ssdlite-untrained",
        "model_version": "ssdlite-untrained",
    }
    torch.manual_seed(0)
    save_checkpoint(path, model_from_meta(meta), meta)
    return path


def run_once(
    runner: Any, n: int, chunk_size: int, out: str, checkpoint: str | None
) -> tuple[float, pd.DataFrame]:
    project = Limited(open_project(str(DATA), "voc"), n)
    predictions = None
    if checkpoint is None:
        predictions = open_predictions(
            str(DATA / "predictions" / "yolo"), "yolo", project=project.fmt
        )
    start = time.perf_counter()
    result = score_project(
        project,  # type: ignore[arg-type]
        out_dir=out,
        predictions=predictions,
        checkpoint=checkpoint,
        label_map=LABEL_MAP,
        run_id="bench",
        chunk_size=chunk_size,
        num_workers=0,
        chunk_runner=runner,
    )
    return time.perf_counter() - start, result.table


def measure(
    args: argparse.Namespace, tmp: str, checkpoint: str | None
) -> tuple[list[tuple[Any, ...]], bool]:
    """Rows ``(engine, items, best, median, items/s best, items/s median)`` and whether all tables agree."""
    rows = []
    tables: dict[str, pd.DataFrame] = {}
    configs: list[tuple[str, int]] = [("local", 0), ("dask", 1), ("dask", 2)]
    for engine, workers in configs:
        label = (
            "local engine"
            if engine == "local"
            else f"dask, {workers} worker{'s' if workers != 1 else ''}"
        )
        times = []
        table = pd.DataFrame()
        with contextlib.ExitStack() as stack:
            runner = None
            if engine == "dask":
                runner = stack.enter_context(DaskEngine(n_workers=workers)).map_chunks
            for r in range(args.repeats):
                t, table = run_once(
                    runner, args.items, args.chunk_size, f"{tmp}/{engine}{workers}-{r}", checkpoint
                )
                times.append(t)
        tables[label] = table
        n = len(table)
        best, med = min(times), statistics.median(times)
        rows.append((label, n, best, med, n / best, n / med))
        print(f"{label}: best {best:.2f} s, median {med:.2f} s ({n} items)", flush=True)
    reference = tables["local engine"]
    same = all(
        t.drop(columns=["error"]).equals(reference.drop(columns=["error"]))
        and t["error"].isna().equals(reference["error"].isna())
        for t in tables.values()
    )
    return rows, same


def table_lines(rows: list[tuple[Any, ...]], same: bool) -> list[str]:
    return [
        "| engine | items | best (s) | median (s) | items/s (best) | items/s (median) |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {label} | {n} | {best:.2f} | {med:.2f} | {ips:.1f} | {ipm:.1f} |"
            for label, n, best, med, ips, ipm in rows
        ],
        "",
        f"Same table from every engine: **{'yes' if same else 'NO'}**.",
        "",
    ]


def speedup(measured: tuple[list[tuple[Any, ...]], bool]) -> float:
    """Median time of 1 Dask worker over median time of 2 workers."""
    medians = {row[0]: row[3] for row in measured[0]}
    return float(medians["dask, 1 worker"] / medians["dask, 2 workers"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=700)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--image-size", type=int, default=160, help="input size of the untrained detector"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale.md")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"road_signs data not found at {DATA}")

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        print("workload 1: brought predictions", flush=True)
        light = measure(args, tmp, None)
        print("workload 2: model inference", flush=True)
        heavy = measure(args, tmp, random_detector(f"{tmp}/ssdlite.pt", args.image_size))

    lines = [
        "# Scale: scoring throughput, local engine vs Dask with 1 and 2 workers",
        "",
        f"Measured {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `python bench/scale.py "
        f"--items {args.items} --chunk-size {args.chunk_size} --repeats {args.repeats} --image-size {args.image_size}` "
        f"on {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}.",
        "",
        f"Data: the first {args.items} road_signs photos (real JPEG, mostly 300×400). Chunks (= Dask "
        f"partitions, each written as a Parquet manifest part) of {args.chunk_size} items; Dask workers are "
        "processes of a LocalCluster on 127.0.0.1 with one thread each. Cluster start-up is not timed "
        "(paid once per run); writing the manifest partitions is. Best and median of the repeats.",
        "",
        "## 1. Brought predictions (light per-item work)",
        "",
        "Scorers: `fourier` (reduced JPEG decode + FFT) plus the box-confidence scorers on the real "
        "YOLOv5n predictions.",
        "",
        *table_lines(*light),
        "## 2. Model inference (heavy per-item work)",
        "",
        f"An untrained SSDlite detector at {args.image_size}×{args.image_size} (random weights: the "
        "inference cost is real, the scores are not meaningful), loaded once per worker; scorers: "
        "every one the checkpoint's outputs allow, plus `fourier`.",
        "",
        *table_lines(*heavy),
        "## Reading",
        "",
        "Dask workers run one thread each (Dask also sets OMP_NUM_THREADS=1 in them), while the local "
        "engine lets torch use every core, so the fair scaling comparison is 1 worker against 2 "
        f"workers: on this {os.cpu_count()}-core machine 2 workers were "
        f"{speedup(light):.2f}× as fast as 1 with brought predictions and {speedup(heavy):.2f}× with "
        "model inference (median times). With light per-item work the Dask overhead (manifest "
        "parts, scheduling, moving tables back) is of the order of the work itself. Results are "
        "identical across engines (checked above).",
        "",
        f"1-minute load average before the first measurement: {load_before:.2f}; after the last: "
        f"{os.getloadavg()[0]:.2f} (the latter includes this benchmark's own worker processes).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

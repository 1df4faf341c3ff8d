"""Throughput of scoring on the Dask engine with 1 and 2 workers (and the local engine).

Scores the real road-sign photos (../shared/data/road_signs, Pascal VOC, with the real
YOLOv5n predictions) with the Fourier scorer plus the prediction-based scorers, on:

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


def run_once(runner: Any, n: int, chunk_size: int, out: str) -> tuple[float, pd.DataFrame]:
    project = Limited(open_project(str(DATA), "voc"), n)
    predictions = open_predictions(str(DATA / "predictions" / "yolo"), "yolo", project=project.fmt)
    start = time.perf_counter()
    result = score_project(
        project,  # type: ignore[arg-type]
        out_dir=out,
        predictions=predictions,
        label_map=LABEL_MAP,
        run_id="bench",
        chunk_size=chunk_size,
        num_workers=0,
        chunk_runner=runner,
    )
    return time.perf_counter() - start, result.table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=700)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale.md")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"road_signs data not found at {DATA}")

    rows = []
    tables: dict[str, pd.DataFrame] = {}
    with tempfile.TemporaryDirectory() as tmp:
        configs: list[tuple[str, int | None]] = [("local", None), ("dask", 1), ("dask", 2)]
        for engine, workers in configs:
            label = (
                "local engine"
                if engine == "local"
                else f"dask, {workers} worker{'s' if workers != 1 else ''}"
            )
            times = []
            if engine == "local":
                for r in range(args.repeats):
                    t, table = run_once(None, args.items, args.chunk_size, f"{tmp}/{engine}{r}")
                    times.append(t)
            else:
                with DaskEngine(n_workers=int(workers or 1)) as dask_engine:
                    for r in range(args.repeats):
                        t, table = run_once(
                            dask_engine.map_chunks,
                            args.items,
                            args.chunk_size,
                            f"{tmp}/{engine}{workers}{r}",
                        )
                        times.append(t)
            tables[label] = table
            n = len(table)
            rows.append(
                (
                    label,
                    n,
                    min(times),
                    statistics.median(times),
                    n / min(times),
                    n / statistics.median(times),
                )
            )
            print(
                f"{label}: best {min(times):.2f} s, median {statistics.median(times):.2f} s ({n} items)",
                flush=True,
            )

    reference = next(iter(tables.values()))
    same = all(
        t.drop(columns=["error"]).equals(reference.drop(columns=["error"]))
        and t["error"].isna().equals(reference["error"].isna())
        for t in tables.values()
    )
    lines = [
        "# Scale: scoring throughput, local engine vs Dask with 1 and 2 workers",
        "",
        f"Measured {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `python bench/scale.py "
        f"--items {args.items} --chunk-size {args.chunk_size} --repeats {args.repeats}` on "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}.",
        "",
        f"Data: the first {args.items} road_signs photos (real, JPEG, mostly 300×400) with their real "
        "YOLOv5n predictions; scorers: `fourier` plus the prediction-based ones the inputs allow; "
        f"chunks (= Dask partitions) of {args.chunk_size} items. Cluster start-up is not timed; "
        "writing the manifest partitions is.",
        "",
        "| engine | items | best (s) | median (s) | items/s (best) | items/s (median) |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {label} | {n} | {best:.2f} | {med:.2f} | {ips:.1f} | {ipm:.1f} |"
            for label, n, best, med, ips, ipm in rows
        ],
        "",
        f"Same table from every engine: **{'yes' if same else 'NO'}**.",
        "",
        "Caveat: measured on a shared 2-core machine while other work was running; the numbers are "
        "noisy and the 2-worker speed-up is bounded by the 2 cores. Re-run on a quiet machine "
        "(and with more cores) before quoting them.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

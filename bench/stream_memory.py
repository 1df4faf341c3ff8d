"""Parquet manifest streaming: does reading stay in bounded memory as the project grows?

Run from the repository root::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/stream_memory.py [--sizes 10000 100000]

For each size N, a manifest of N detection items (3 boxes each) is written to a local
temporary folder with :func:`connectors.manifest.write_manifest` (batch by batch through
one ParquetWriter).  Then, each in a fresh subprocess so that peaks do not mix:

(a) stream — iterate :func:`connectors.manifest.iter_manifest_items` (row group by row
    group) and count items;
(b) materialise — ``list(iter_manifest_items(...))``, the all-in-memory baseline.

Each subprocess reports its Python heap peak (``tracemalloc``, started after imports)
and its peak RSS during the read (``VmHWM`` after resetting it with ``/proc/self/clear_refs``)
minus its RSS before reading.  Target: the
streaming peak for N = 100k is not ~10× the peak for 10k (bounded by the batch size);
the baseline grows with N.  Times are wall-clock seconds on whatever machine runs this.

Results go to ``bench/results/stream_memory.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from connectors.manifest import BATCH_SIZE, iter_manifest_items, write_manifest  # noqa: E402
from connectors.model import Annotation, Item, ItemStatus  # noqa: E402
from connectors.storage import ProjectFS  # noqa: E402


def make_items(n: int) -> Iterator[Item]:
    boxes = [
        Annotation(label="car", box=(1.0, 2.0, 30.0, 40.0)),
        Annotation(label="person", box=(50.0, 60.0, 70.0, 90.0)),
        Annotation(label="car", box=(5.0, 5.0, 9.0, 9.0)),
    ]
    for i in range(n):
        yield Item(
            item_id=f"{i:08d}",
            uri=f"images/{i:08d}.jpg",
            width=1280,
            height=720,
            status=ItemStatus.LABELED,
            annotations=boxes,
            meta={"batch": i // 1000},
        )


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_kib() -> int:
    hwm = _proc_status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(root: str, mode: str) -> None:
    """Read the manifest at ``root`` in ``mode`` (stream | list) and print one JSON line."""
    import gc
    import tracemalloc

    project = ProjectFS(root)
    gc.collect()
    before = _proc_status_kib("VmRSS") or 0
    if not reset_peak_rss():
        print(
            "warning: cannot reset the peak RSS mark; RSS growth includes start-up", file=sys.stderr
        )
    tracemalloc.start()
    t0 = time.perf_counter()
    if mode == "stream":
        count = sum(1 for _ in iter_manifest_items(project))
    else:
        held = list(iter_manifest_items(project))
        count = len(held)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_rss = peak_rss_kib()
    print(
        json.dumps(
            {
                "count": count,
                "seconds": seconds,
                "heap_peak_mib": peak / 2**20,
                "rss_growth_mib": max(0, peak_rss - before) / 1024,
            }
        )
    )


def run_child(root: str, mode: str) -> dict[str, float]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", root, mode],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "stream_memory.md")
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="lt-stream-") as tmp:
        for n in args.sizes:
            root = os.path.join(tmp, f"n{n}")
            os.makedirs(root)
            t0 = time.perf_counter()
            write_manifest(make_items(n), ProjectFS(root))
            write_s = time.perf_counter() - t0
            size_mib = os.path.getsize(os.path.join(root, "manifest.parquet")) / 2**20
            stream = run_child(root, "stream")
            held = run_child(root, "list")
            if stream["count"] != n or held["count"] != n:
                raise SystemExit(f"read {stream['count']}/{held['count']} items of {n}")
            rows.append(
                {"n": n, "write_s": write_s, "size_mib": size_mib, "stream": stream, "list": held}
            )
            print(
                f"N={n}: write {write_s:.1f}s; stream heap {stream['heap_peak_mib']:.1f} MiB, rss +{stream['rss_growth_mib']:.1f} MiB, {stream['seconds']:.1f}s; list heap {held['heap_peak_mib']:.1f} MiB",
                flush=True,
            )
    first, last = rows[0], rows[-1]
    growth = last["stream"]["heap_peak_mib"] / first["stream"]["heap_peak_mib"]
    list_growth = last["list"]["heap_peak_mib"] / first["list"]["heap_peak_mib"]
    lines = [
        "# Parquet manifest: streaming memory",
        "",
        f"Produced by `bench/stream_memory.py --sizes {' '.join(map(str, args.sizes))}` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs (shared with other work while measured: "
        "times are noisy; re-run on a quiet machine for timings).",
        "",
        f"Items: detection, 3 boxes each, written to a local temporary folder; read back with batch size {BATCH_SIZE}. "
        "Each read runs in a fresh subprocess; *heap peak* is tracemalloc's peak during the read, "
        "*RSS growth* the peak resident size during the read minus the size before it "
        "(it includes tracemalloc's own bookkeeping and pyarrow's buffer pool).",
        "",
        "| items | file MiB | write s | stream: heap peak MiB | stream: RSS growth MiB | stream s | items/s | list(): heap peak MiB | list(): RSS growth MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, h = r["stream"], r["list"]
        lines.append(
            f"| {r['n']:,} | {r['size_mib']:.1f} | {r['write_s']:.1f} | {s['heap_peak_mib']:.1f} | {s['rss_growth_mib']:.1f} | {s['seconds']:.1f} | {r['n'] / s['seconds']:,.0f} | {h['heap_peak_mib']:.1f} | {h['rss_growth_mib']:.1f} |"
        )
    lines += [
        "",
        f"Streaming heap peak, {last['n']:,} vs {first['n']:,} items: **{growth:.2f}×** for {last['n'] / first['n']:.0f}× the items "
        f"(target: far below {last['n'] / first['n']:.0f}×). Materialising the same items grows **{list_growth:.1f}×**.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Fourier image complexity: is scoring as fast as decoding, and is memory bounded?

Run from the repository root::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/fourier_speed.py [--quick]

Measured in one run, on the real images in ``../shared/data`` (road_signs, kitti_tiny)
and on generated 1280×720 JPEGs (quality 90; smooth gradients + random shapes + noise,
generated once into a cache folder):

(a) decode only — :func:`difficulty.imagestream.iter_image_batches`, no scorer;
(b) decode + Fourier scoring — :func:`difficulty.imagestream.score_images` with the
    registered ``fourier`` scorer (``iter_image_batches`` + the scorer, as ``labeltriage
    score`` runs it);
(c) a naive baseline — full-size PIL decode to grayscale + ``numpy.fft.fft2`` of the
    whole image + the same high-frequency share, one image at a time.

Each is repeated (``--repeats``, default 5, at least 3), interleaved a, b, c within each
repeat, and the median is reported.  Targets:
(b) ≥ 0.9 × (a) and (b) ≥ 2 × (c) in images per second.

Peak memory: a Parquet manifest of N items (``connectors.manifest``) whose uris re-use a
few real images is scored end to end in a fresh subprocess, for N = 10k and 100k; each
subprocess reads its own peak RSS (``resource.getrusage``; main process and the largest
worker process).  Target: ≤ 1.5 GB, and not growing with N.

Results go to ``bench/results/fourier_speed.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import PIL  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageOps  # noqa: E402

from connectors.model import Item  # noqa: E402
from connectors.storage import ProjectFS  # noqa: E402
from difficulty.imagestream import iter_image_batches, score_images  # noqa: E402

log = logging.getLogger("bench.fourier_speed")

SHARED_DATA = Path(os.environ.get("LABELTRIAGE_SHARED_DATA", REPO.parent / "shared" / "data"))
SYNTH_WIDTH, SYNTH_HEIGHT = 1280, 720
SYNTH_VERSION = 1  # bump when the generator changes, so that the cache is rebuilt
RSS_LIMIT_MB = 1536.0
MIN_PER_PASS = 1000


# -- generated images ------------------------------------------------------------------


def _synthetic_jpeg(index: int, path: str) -> None:
    """One 1280×720 RGB JPEG (q90): a smooth two-colour gradient, random shapes, noise."""
    rng = np.random.default_rng(10_000 + index)
    h, w = SYNTH_HEIGHT, SYNTH_WIDTH
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    base = c0 + (c1 - c0) * t[..., None]
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 150))):  # from an empty road to a busy street
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(5, 300)), y0 + int(rng.integers(5, 200))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif kind == 2:
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 8)))
        else:
            points = [
                (int(x0 + rng.integers(-80, 80)), int(y0 + rng.integers(-80, 80))) for _ in range(5)
            ]
            draw.polygon(points, fill=colour)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.standard_normal(pixels.shape, dtype=np.float32) * float(
        rng.uniform(1, 10)
    )
    tmp = f"{path}.tmp"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=90)
    os.replace(tmp, path)


def ensure_synthetic(cache: Path, count: int) -> list[str]:
    """``count`` generated JPEGs under ``cache`` (made once, re-used by later runs)."""
    folder = cache / f"synthetic_{SYNTH_WIDTH}x{SYNTH_HEIGHT}_v{SYNTH_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{i:05d}.jpg" for i in range(count)]
    todo = [(i, str(folder / n)) for i, n in enumerate(names) if not (folder / n).exists()]
    if todo:
        log.info("generating %d JPEGs into %s", len(todo), folder)
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(_synthetic_jpeg, *zip(*todo, strict=True), chunksize=16))
        log.info("generated in %.1f s", time.perf_counter() - start)
    return [str(folder / n) for n in names]


# -- the three measured paths ----------------------------------------------------------


@dataclass
class DataSet:
    name: str
    root: str
    rel_paths: list[str]
    naive_subset: int
    min_per_pass: int = 0

    def items(self) -> list[Item]:
        """The images of the set, cycled until a pass has at least ``min_per_pass`` items.

        Small sets are streamed several times over in one timed pass, so that worker
        start-up (a fixed ~0.1 s) and the last, partly filled batch do not dominate.
        """
        cycles = max(1, -(-self.min_per_pass // max(1, len(self.rel_paths))))
        return [Item(item_id=f"{p}#{k}", uri=p) for k in range(cycles) for p in self.rel_paths]


def run_decode_only(ds: DataSet, workers: int, batch_size: int) -> int:
    n = 0
    for batch in iter_image_batches(
        ds.items(), ProjectFS(ds.root), size=128, batch_size=batch_size, num_workers=workers
    ):
        n += len(batch.item_ids)
    return n


def run_scoring(ds: DataSet, workers: int, batch_size: int) -> int:
    n = 0
    for _, values, error in score_images(
        ds.items(), ProjectFS(ds.root), ["fourier"], batch_size=batch_size, num_workers=workers
    ):
        if error is None and values["fourier"] >= 0.0:
            n += 1
    return n


_NAIVE_GRIDS: dict[tuple[int, int], np.ndarray] = {}


def naive_ratio(path: str, cutoff: float = 0.25) -> float:
    """Full-size decode + full-size FFT, the obvious way: the baseline (c)."""
    with Image.open(path) as image:
        gray = ImageOps.exif_transpose(image).convert("L")
    x = np.asarray(gray, dtype=np.float64) / 255.0
    x = x - x.mean()
    power = np.abs(np.fft.fft2(x)) ** 2
    if x.shape not in _NAIVE_GRIDS:
        fy, fx = np.fft.fftfreq(x.shape[0]), np.fft.fftfreq(x.shape[1])
        _NAIVE_GRIDS[x.shape] = np.hypot(fy[:, None], fx[None, :]) > cutoff
    total = power.sum()
    return float(power[_NAIVE_GRIDS[x.shape]].sum() / total) if total > 0 else 0.0


def run_naive(ds: DataSet) -> int:
    n = 0
    for rel in ds.rel_paths[: ds.naive_subset]:
        if naive_ratio(os.path.join(ds.root, rel)) >= 0.0:
            n += 1
    return n


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    n = fn()
    return time.perf_counter() - start, n


# -- peak memory in a fresh process ----------------------------------------------------

RSS_SOURCE_IMAGES = 50


def _memory_mb(pid: int | str) -> tuple[float, float]:
    """``(resident, private)`` MB of one process, from ``/proc/PID/smaps_rollup``.

    ``private`` counts only pages no other process maps (for a forked worker:
    what it added on top of what it shares with the main process and the libraries).
    """
    values = {"Rss:": 0, "Private_Clean:": 0, "Private_Dirty:": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(maxsplit=1)[0]
                if key in values:
                    values[key] = int(line.split()[1])
    except OSError:
        return 0.0, 0.0
    return values["Rss:"] / 1024, (values["Private_Clean:"] + values["Private_Dirty:"]) / 1024


def _child_pids() -> list[str]:
    pids: list[str] = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.extend(f.read().split())
        except OSError:
            continue
    return pids


def rss_child(project_dir: str, workers: int, batch_size: int) -> None:
    """Score the project's Parquet manifest; print JSON with this process tree's peak memory."""
    import threading

    from connectors.manifest import iter_manifest_items

    project = ProjectFS(project_dir)
    baseline = _memory_mb("self")[0]
    peak_total = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            total = _memory_mb("self")[0] + sum(_memory_mb(p)[1] for p in _child_pids())
            peak_total[0] = max(peak_total[0], total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    count = scored = errors = 0
    for _, values, error in score_images(
        iter_manifest_items(project),
        project,
        ["fourier"],
        batch_size=batch_size,
        num_workers=workers,
    ):
        count += 1
        if error is None and values["fourier"] >= 0.0:
            scored += 1
        else:
            errors += 1
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {"items": count, "scored": scored, "errors": errors, "seconds": seconds}
    result.update(
        {"baseline_mb": baseline, "main_mb": own, "worker_mb": children, "tree_mb": peak_total[0]}
    )
    print(json.dumps(result))


def measure_rss(
    counts: Sequence[int], image_dir: str, workers: int, batch_size: int
) -> list[dict[str, float]]:
    """Write one manifest per count (here), then score each in a fresh subprocess."""
    from connectors.manifest import MANIFEST_NAME, write_manifest

    sources = sorted(p for p in os.listdir(image_dir) if p.endswith(".jpg"))[:RSS_SOURCE_IMAGES]
    results = []
    with tempfile.TemporaryDirectory(prefix="fourier_rss_") as tmp:
        os.mkdir(os.path.join(tmp, "images"))
        for name in sources:
            shutil.copyfile(os.path.join(image_dir, name), os.path.join(tmp, "images", name))
        for count in counts:
            project = ProjectFS(tmp)
            if project.exists(MANIFEST_NAME):
                project.remove(MANIFEST_NAME)
            items = (
                Item(item_id=f"item{i:07d}", uri=f"images/{sources[i % len(sources)]}")
                for i in range(count)
            )
            write_manifest(items, project)
            log.info("peak memory: %d items in a fresh process", count)
            cmd = [
                sys.executable,
                __file__,
                "--rss-child",
                tmp,
                "--workers",
                str(workers),
                "--batch-size",
                str(batch_size),
            ]
            env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


# -- report ----------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "ram": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "torch threads (main)": str(torch.get_num_threads()),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def median_rate(times: Sequence[float], n: int) -> tuple[float, float]:
    t = statistics.median(times)
    return t, n / t


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller run: 200 generated images, RSS at 2k vs 20k items",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="repeats per path (median reported; at least 3)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--synthetic",
        type=int,
        default=None,
        help="number of generated JPEGs (default 2000, quick 200)",
    )
    parser.add_argument(
        "--naive-synthetic",
        type=int,
        default=None,
        help="generated JPEGs for the naive baseline (default 300, quick 60)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "labeltriage-bench",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fourier_speed.md")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--rss-child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (medians of fewer runs are not reported)")

    if args.rss_child is not None:
        rss_child(args.rss_child, args.workers, args.batch_size)
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    n_synth = args.synthetic or (200 if args.quick else 2000)
    n_naive_synth = args.naive_synthetic or (60 if args.quick else 300)
    rss_counts = (2_000, 20_000) if args.quick else (10_000, 100_000)
    load_before = os.getloadavg()
    started = time.perf_counter()

    synth_paths = ensure_synthetic(args.cache, n_synth)
    synth_root = str(Path(synth_paths[0]).parent)
    datasets: list[DataSet] = []
    for name in ("road_signs", "kitti_tiny"):
        folder = SHARED_DATA / name / "images"
        if folder.is_dir():
            rel = sorted(
                f"images/{p.name}"
                for p in folder.iterdir()
                if p.suffix.lower() in (".jpg", ".jpeg", ".png")
            )
            datasets.append(DataSet(name, str(SHARED_DATA / name), rel, len(rel), MIN_PER_PASS))
        else:
            log.warning("%s not found under %s; skipped", name, SHARED_DATA)
    datasets.append(
        DataSet(
            f"generated {SYNTH_WIDTH}×{SYNTH_HEIGHT} q90",
            synth_root,
            [os.path.basename(p) for p in synth_paths],
            n_naive_synth,
            MIN_PER_PASS,
        )
    )

    rows = []
    for ds in datasets:
        log.info("%s: %d images (warm-up pass)", ds.name, len(ds.rel_paths))
        run_decode_only(ds, args.workers, args.batch_size)  # page cache, worker start-up paths
        a_times, b_times, c_times = [], [], []
        n_a = n_b = n_c = 0
        for r in range(args.repeats):
            t, n_a = timed(partial(run_decode_only, ds, args.workers, args.batch_size))
            a_times.append(t)
            t, n_b = timed(partial(run_scoring, ds, args.workers, args.batch_size))
            b_times.append(t)
            t, n_c = timed(partial(run_naive, ds))
            c_times.append(t)
            log.info(
                "%s repeat %d: a %.2fs b %.2fs c %.2fs",
                ds.name,
                r + 1,
                a_times[-1],
                b_times[-1],
                c_times[-1],
            )
        _, rate_a = median_rate(a_times, n_a)
        _, rate_b = median_rate(b_times, n_b)
        _, rate_c = median_rate(c_times, n_c)
        rows.append(
            (
                ds.name,
                n_a,
                n_c,
                rate_a,
                rate_b,
                rate_c,
                rate_b / rate_a,
                rate_b / rate_c,
                a_times,
                b_times,
                c_times,
            )
        )

    rss_rows = []
    if not args.no_rss:
        rss_images = SHARED_DATA / "road_signs" / "images"
        image_dir = str(rss_images) if rss_images.is_dir() else synth_root
        rss_rows = measure_rss(rss_counts, image_dir, args.workers, args.batch_size)
        rss_source = (
            f"{RSS_SOURCE_IMAGES} real road_signs JPEGs"
            if rss_images.is_dir()
            else f"{RSS_SOURCE_IMAGES} generated JPEGs"
        )
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - started

    text = render(
        args, rows, rss_rows, rss_source if rss_rows else "", load_before, load_after, elapsed
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


def _seconds(times: Sequence[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


def render(
    args: argparse.Namespace,
    rows: list,
    rss_rows: list,
    rss_source: str,
    load_before: tuple,
    load_after: tuple,
    elapsed: float,
) -> str:
    info = machine()
    lines = ["# Fourier scoring speed", ""]
    lines.append(
        "Command: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/fourier_speed.py"
        + (" --quick" if args.quick else "")
        + "`"
    )
    lines.append("")
    lines.append("## Machine")
    lines.append("")
    for key, value in info.items():
        lines.append(f"- {key}: {value}")
    lines.append(
        f"- load average (1/5/15 min) before: {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}, after: {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}"
    )
    lines.append(f"- whole run: {elapsed:.0f} s")
    cores = os.cpu_count() or 1
    lines.append(
        "- the load average after the run includes the benchmark's own processes "
        "(the main process and its worker processes)"
    )
    if load_before[0] > 0.5 * cores:
        lines.append("")
        lines.append(
            f"**The machine was busy when the run started** (1-minute load average "
            f"{load_before[0]:.1f} on {cores} cores before the first measurement): "
            "absolute rates may be depressed and noisy, and ratios between paths measured seconds apart "
            "carry that noise too. Re-run on a quiet machine before relying on the numbers."
        )
    lines.append("")
    lines.append(f"## Throughput (images/s, median of {args.repeats} repeats)")
    lines.append("")
    lines.append(
        f"(a) decode only through `iter_image_batches` and (b) decode + `fourier` through `score_images`: "
        f"128×128 reduced decode, {args.workers} worker processes, batches of {args.batch_size}. "
        f"Sets smaller than {MIN_PER_PASS} images are cycled within each timed pass until it has at least "
        f"{MIN_PER_PASS} (`n`: images per pass), so that worker start-up does not dominate. "
        "(c) naive: full-size PIL decode + `numpy.fft.fft2` of the full image, one process, on the first "
        "`naive n` images of the set."
    )
    lines.append("")
    lines.append(
        "| images | n | (a) decode | (b) decode + fourier | (c) naive | naive n | b/a (target ≥ 0.9) | b/c (target ≥ 2) |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, n_a, n_c, ra, rb, rc, ba, bc, *_ in rows:
        ok_ba = "✔" if ba >= 0.9 else "✘"
        ok_bc = "✔" if bc >= 2 else "✘"
        lines.append(
            f"| {name} | {n_a} | {ra:.0f} | {rb:.0f} | {rc:.1f} | {n_c} | {ba:.2f} {ok_ba} | {bc:.1f} {ok_bc} |"
        )
    lines.append("")
    lines.append(
        "How the real path gets there: JPEGs are decoded by libjpeg at 1/2, 1/4 or 1/8 scale straight "
        "to luminance (`Image.draft('L', (128, 128))`, the smallest scale still ≥ 128 px on both sides: "
        "a 1280×720 frame decodes at 320×180), in worker processes that keep running for the whole "
        "stream; in (a) the workers return the pixels as pickled NumPy arrays, in (b) they score each "
        "batch where it was decoded and return only the values: one `torch.fft.rfft2` of "
        "`(64, 128, 128)`, and the total and the high-frequency power of all images from one matrix "
        "product. The naive path decodes every pixel and transforms the full image."
    )
    lines.append("")
    lines.append("Seconds per repeat (a / b / c):")
    lines.append("")
    for name, *_, a_t, b_t, c_t in rows:
        lines.append(f"- {name}: a [{_seconds(a_t)}] · b [{_seconds(b_t)}] · c [{_seconds(c_t)}]")
    if rss_rows:
        lines.append("")
        lines.append("## Peak memory scoring a Parquet manifest (fresh process per size)")
        lines.append("")
        lines.append(
            f"Manifest rows (written beforehand with `connectors.manifest.write_manifest`) point at {rss_source} "
            "copied into a temporary project; each size is read with `connectors.manifest.iter_manifest_items` "
            f"and scored with `score_images(['fourier'])` ({args.workers} workers) in its own process. "
            "`ru_maxrss`: peak resident set of the main process and of the largest worker process "
            "(forked workers share most pages, torch's libraries above all, with the main process, so these do "
            "not add up); `main + workers`: peak of the main process's resident set plus the workers' private "
            "memory (pages no other process maps), sampled every 0.25 s from `/proc/PID/smaps_rollup`: what the "
            "run really holds. `after imports`: the main process's resident set before the first item (torch "
            f"alone is about 0.5 GB). Target: ≤ {RSS_LIMIT_MB:.0f} MB, flat in the item count."
        )
        lines.append("")
        lines.append(
            "| items | scored | errors | seconds | after imports MB | main peak MB | worker peak MB | main + workers peak MB | within 1.5 GB |"
        )
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rss_rows:
            ok = "✔" if max(r["tree_mb"], r["main_mb"]) <= RSS_LIMIT_MB else "✘"
            lines.append(
                f"| {r['items']:,} | {r['scored']:,} | {r['errors']} | {r['seconds']:.0f} | {r['baseline_mb']:.0f} | "
                f"{r['main_mb']:.0f} | {r['worker_mb']:.0f} | {r['tree_mb']:.0f} | {ok} |"
            )
        if len(rss_rows) == 2:
            lo, hi = rss_rows
            lines.append("")
            lines.append(
                f"From {lo['items']:,} to {hi['items']:,} items the main-process peak changed by "
                f"{hi['main_mb'] - lo['main_mb']:+.0f} MB, the worker peak by {hi['worker_mb'] - lo['worker_mb']:+.0f} MB "
                f"and the main + workers peak by {hi['tree_mb'] - lo['tree_mb']:+.0f} MB."
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

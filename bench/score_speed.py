"""``labeltriage score`` against the decode floor, and its memory, on large projects.

Run from the repository root (it needs the real data in ``../shared/data``)::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/score_speed.py [--sizes 10000 50000]

Projects: the 700 road-sign photos (Pascal VOC, all labeled) replicated to N items under
``--work`` (default a folder in the system temp dir, reused by later runs): images,
annotations and the real YOLOv5n predictions (YOLO txt) hard-linked under new names
(``road1_r003.jpg``), so every item is its own file.  Scored as a user would:
``labeltriage score --predictions … --predictions-format yolo --label-map …`` with the
default scorers and the default ``--num-workers 2``.

The floor: the same images decoded by PIL at 1/4 scale (``Image.draft``), nothing else,
by 2 processes (``multiprocessing.Pool``), in its own Python process.  Reported: the
floor's whole command (interpreter start, imports, pool) and its decode alone.

Per size, floor and ``score`` run one after the other, ``--repeats`` times (interleaved,
so that load from other work hits both); the tables give medians and the ratio
``score / floor`` of the medians, and every repeat's seconds.

Memory: while ``score`` runs, the resident set (``Rss``) and private memory
(``Private_Clean + Private_Dirty``: pages no other process maps) of the main process and
of each worker process are sampled every 0.05 s from ``/proc/PID/smaps_rollup``.
Reported per size (the largest over the repeats): the main process's peak, the largest
worker's peak, the peak of *main + largest worker* as resident sets (pages the two share
counted twice, so an upper bound), and the peak of the main process's resident set plus
every worker's private memory (what the run really holds).

``labeltriage run`` (stage ``shadow``) on the first size: seconds per step from the run
record (``run.json``), ``--run-repeats`` times.

Results go to ``bench/results/score_speed.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import machine_line  # noqa: E402

DATA = Path(os.environ.get("LABELTRIAGE_SHARED_DATA", REPO.parent / "shared" / "data"))
LABEL_MAP = "map:\n  stop sign: stop\n  traffic light: trafficlight\n"
SAMPLE_SECONDS = 0.05
TARGET_RATIO = 2.5
TARGET_GROWTH = 1.15
TARGET_MB = 1200

FLOOR = """
import json, os, sys, time
from multiprocessing import Pool
from PIL import Image

def decode(path):
    with Image.open(path) as image:
        image.draft("L", (image.width // 4, image.height // 4))
        image.load()
        return image.size

if __name__ == "__main__":
    folder = sys.argv[1]
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    start = time.perf_counter()
    with Pool(2) as pool:
        sizes = pool.map(decode, paths, chunksize=64)
    print(json.dumps({"images": len(sizes), "decode_s": time.perf_counter() - start}))
"""


# -- projects ----------------------------------------------------------------------------------


def build_project(n: int, work: Path) -> Path:
    """The road-sign project replicated to ``n`` items under ``work`` (made once)."""
    root = work / f"road_signs_{n}"
    done = root / ".complete"
    if done.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    source = DATA / "road_signs"
    preds = source / "predictions" / "yolo"
    for sub in ("images", "annotations", "predictions"):
        (root / sub).mkdir(parents=True)
    shutil.copy(preds / "classes.txt", root / "predictions" / "classes.txt")
    stems = sorted(p.stem for p in (source / "images").glob("*.jpg"))
    for i in range(n):
        stem = stems[i % len(stems)]
        new = f"{stem}_r{i // len(stems):03d}"
        _link(source / "images" / f"{stem}.jpg", root / "images" / f"{new}.jpg")
        for src, dst in (
            (source / "annotations" / f"{stem}.xml", root / "annotations" / f"{new}.xml"),
            (preds / f"{stem}.txt", root / "predictions" / f"{new}.txt"),
        ):
            if src.exists():
                _link(src, dst)
    (root / "label_map.yaml").write_text(LABEL_MAP)
    done.write_text(str(n))
    return root


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# -- measuring ---------------------------------------------------------------------------------


def _memory(pid: int) -> tuple[float, float] | None:
    """``(Rss, private)`` of ``pid`` in MB, or ``None`` when it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {
                k: int(v.split()[0])
                for k, v in (ln.split(":", 1) for ln in f.read().splitlines()[1:])
            }
    except (OSError, ValueError):
        return None
    private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return fields.get("Rss", 0) / 1024, private / 1024


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (workers may hang below a fork server)."""
    out, todo = [], _children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(_children(child))
    return out


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def sampled(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``; its wall time, memory peaks and CPU seconds (see the module docstring).

    A worker is any process below the command's own: the largest worker is the one with
    the largest resident set (a fork server that holds torch counts as one).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peaks = dict.fromkeys(("main", "worker", "worker_private", "pair", "held"), 0.0)
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        main = _memory(proc.pid)
        if main is not None:
            below = _descendants(proc.pid)
            workers = [m for m in map(_memory, below) if m is not None]
            largest = max((w[0] for w in workers), default=0.0)
            peaks["main"] = max(peaks["main"], main[0])
            peaks["worker"] = max(peaks["worker"], largest)
            peaks["worker_private"] = max(
                peaks["worker_private"], max((w[1] for w in workers), default=0.0)
            )
            peaks["pair"] = max(peaks["pair"], main[0] + largest)
            peaks["held"] = max(peaks["held"], main[0] + sum(w[1] for w in workers))
            for pid in [proc.pid, *below]:
                seconds = _cpu_seconds(pid)
                if seconds is not None:
                    cpu[pid] = seconds
        time.sleep(SAMPLE_SECONDS)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    main_cpu = cpu.pop(proc.pid, 0.0)
    return {
        "wall": wall,
        "stdout": out.decode(),
        "cpu_main": main_cpu,
        "cpu_others": sum(cpu.values()),
        **peaks,
    }


def run_floor(project: Path, env: dict[str, str]) -> dict[str, Any]:
    result = sampled([sys.executable, "-c", FLOOR, str(project / "images")], env)
    result.update(json.loads(result["stdout"]))
    return result


def run_score(project: Path, out: Path, env: dict[str, str]) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "autolabel.cli", "score",
        "--source", str(project), "--format", "voc",
        "--predictions", str(project / "predictions"), "--predictions-format", "yolo",
        "--label-map", str(project / "label_map.yaml"),
        "--out", str(out),
    ]  # fmt: skip
    result = sampled(cmd, env)
    summary = json.loads((out / "summary.json").read_text())
    result["scored"], result["items"] = summary["scored"], summary["items"]
    return result


def run_pipeline(project: Path, work: Path, env: dict[str, str]) -> dict[str, float]:
    """``labeltriage run`` at stage shadow; seconds per step from its run record."""
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    config = work / "config.json"
    config.write_text(
        json.dumps(
            {
                "report_store": str(store),
                "projects": {
                    "roads": {
                        "source": str(project),
                        "format": "voc",
                        "predictions": {"source": str(project / "predictions"), "format": "yolo"},
                        "label_map": str(project / "label_map.yaml"),
                        "stage": "shadow",
                        "epsilon": 0.3,
                        "delta": 0.1,
                        "min_count": 10,
                    }
                },
            }
        )
    )
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "autolabel.cli", "run", "--config", str(config)],
        env=env,
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - start
    (record,) = list(store.glob("roads/*/run.json"))
    steps = json.loads(record.read_text())["steps"]
    return {"wall": wall, **{k: float(v) for k, v in steps.items()}}


# -- report ------------------------------------------------------------------------------------


def _med(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _list(rows: list[dict[str, Any]], key: str) -> str:
    return ", ".join(f"{r[key]:.2f}" for r in rows)


def render(
    args: argparse.Namespace,
    results: dict[int, dict[str, list[dict[str, Any]]]],
    runs: list[dict[str, float]],
    loads: list[tuple[float, float, float]],
    machine: str,
    commit: str,
) -> str:
    sizes = sorted(results)
    lines = [
        "# `labeltriage score` at the speed of decoding",
        "",
        f"Command: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/score_speed.py --sizes "
        f"{' '.join(map(str, sizes))} --repeats {args.repeats} --run-repeats {args.run_repeats}` "
        f"(code at {commit}).",
        "",
        f"Machine: {machine}.",
        "",
        "Load average (1/5/15 min) at the start and after each repeat: "
        + "; ".join(f"{a:.2f}/{b:.2f}/{c:.2f}" for a, b, c in loads)
        + ". The machine is shared with other work; the load average includes this "
        "benchmark's own processes (up to 3 busy ones on 2 cores).",
        "",
        "## Wall time against the decode floor",
        "",
        "Road-sign photos replicated to N items (Pascal VOC, all labeled, real YOLOv5n "
        "predictions), `labeltriage score` with the default scorers and 2 worker processes. "
        "Floor: the same images decoded by PIL at 1/4 scale by 2 processes and nothing else; "
        "*floor* is that whole command, *decode* its decode alone. Medians of "
        f"{args.repeats} interleaved repeats.",
        "",
        f"| items | floor s | decode s | score s | score / floor (target ≤ {TARGET_RATIO}) "
        "| score / decode |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        floor, score = results[n]["floor"], results[n]["score"]
        ratio = _med(score, "wall") / _med(floor, "wall")
        mark = "✔" if ratio <= TARGET_RATIO else "✘"
        lines.append(
            f"| {n:,} | {_med(floor, 'wall'):.2f} | {_med(floor, 'decode_s'):.2f} | "
            f"{_med(score, 'wall'):.2f} | {ratio:.2f} {mark} | "
            f"{_med(score, 'wall') / _med(floor, 'decode_s'):.2f} |"
        )
    lines += [
        "",
        "CPU seconds (medians; user + system from `/proc/PID/stat`, sampled every "
        f"{SAMPLE_SECONDS} s, so the last fraction of a second of a process may be missed):",
        "",
        "| items | floor, all processes | score, main process | score, workers (and fork server) "
        "| score / floor |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        floor, score = results[n]["floor"], results[n]["score"]
        floor_cpu = statistics.median(r["cpu_main"] + r["cpu_others"] for r in floor)
        score_cpu = statistics.median(r["cpu_main"] + r["cpu_others"] for r in score)
        lines.append(
            f"| {n:,} | {floor_cpu:.2f} | {_med(score, 'cpu_main'):.2f} | "
            f"{_med(score, 'cpu_others'):.2f} | {score_cpu / floor_cpu:.2f} |"
        )
    lines += ["", "Seconds per repeat:", ""]
    for n in sizes:
        r = results[n]
        lines.append(
            f"- {n:,}: floor [{_list(r['floor'], 'wall')}] · decode [{_list(r['floor'], 'decode_s')}]"
            f" · score [{_list(r['score'], 'wall')}]"
        )
    lines += [
        "",
        "## Peak memory of `score`",
        "",
        "MB; the largest peak over the repeats. *main + largest worker (resident)* adds the "
        "two resident sets (pages they share, such as torch's libraries in both workers, "
        "counted twice: an upper bound); *held* is the main process's resident set plus "
        "every worker's private memory.",
        "",
        "| items | main | largest worker | worker private | main + largest worker (resident) "
        "| held |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    peaks = {
        n: {
            k: max(r[k] for r in results[n]["score"])
            for k in ("main", "worker", "worker_private", "pair", "held")
        }
        for n in sizes
    }
    for n in sizes:
        p = peaks[n]
        lines.append(
            f"| {n:,} | {p['main']:.0f} | {p['worker']:.0f} | {p['worker_private']:.0f} | "
            f"{p['pair']:.0f} | {p['held']:.0f} |"
        )
    if len(sizes) >= 2:
        lo, hi = peaks[sizes[0]], peaks[sizes[-1]]
        growth = hi["pair"] / lo["pair"]
        lines += [
            "",
            f"From {sizes[0]:,} to {sizes[-1]:,} items: main + largest worker ×{growth:.3f} "
            f"(target ≤ {TARGET_GROWTH}) {'✔' if growth <= TARGET_GROWTH else '✘'}, "
            f"{hi['pair']:.0f} MB at {sizes[-1]:,} (target ≤ {TARGET_MB}) "
            f"{'✔' if hi['pair'] <= TARGET_MB else '✘'}; main process ×{hi['main'] / lo['main']:.3f}, "
            f"held ×{hi['held'] / lo['held']:.3f}.",
        ]
    if runs:
        keys = [k for k in runs[0] if k != "wall"]
        floor = _med(results[sizes[0]]["floor"], "wall")
        wall = statistics.median(r["wall"] for r in runs)
        lines += [
            "",
            f"## `labeltriage run` (stage shadow), {sizes[0]:,} items",
            "",
            f"Seconds per step from the run record, median of {len(runs)} "
            f"(the command's wall time {wall:.1f} s = {wall / floor:.2f} × the floor above).",
            "",
            "| " + " | ".join(keys) + " | command |",
            "|" + "---:|" * (len(keys) + 1),
            "| "
            + " | ".join(f"{statistics.median(r[k] for r in runs):.2f}" for k in keys)
            + f" | {wall:.2f} |",
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-repeats", type=int, default=3)
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "labeltriage-score-speed"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "score_speed.md")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (medians)")
    if not (DATA / "road_signs").is_dir():
        print(f"real data not found at {DATA / 'road_signs'}", file=sys.stderr)
        return 2
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    machine = machine_line()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    args.work.mkdir(parents=True, exist_ok=True)
    projects = {n: build_project(n, args.work) for n in args.sizes}
    results: dict[int, dict[str, list[dict[str, Any]]]] = {
        n: {"floor": [], "score": []} for n in args.sizes
    }
    loads = [os.getloadavg()]
    for repeat in range(args.repeats):
        for n in args.sizes:
            floor = run_floor(projects[n], env)
            score = run_score(projects[n], args.work / "out", env)
            results[n]["floor"].append(floor)
            results[n]["score"].append(score)
            print(
                f"repeat {repeat + 1}, {n:,} items: floor {floor['wall']:.2f} s, "
                f"score {score['wall']:.2f} s, main + worker {score['pair']:.0f} MB",
                file=sys.stderr,
            )
        loads.append(os.getloadavg())
    runs = []
    for _ in range(args.run_repeats):
        runs.append(run_pipeline(projects[args.sizes[0]], args.work, env))
        print(f"run: {runs[-1]}", file=sys.stderr)
    args.out.write_text(render(args, results, runs, loads, machine, commit))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

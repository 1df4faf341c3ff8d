"""How long does ``labeltriage run`` take on the bundled sample project, before and after?

Run from the repository root::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/run_passes.py [--base main] [--repeats 3]

The earlier version is the git revision ``--base``, exported with ``git archive`` into a
temporary folder.  Each version runs ``labeltriage run`` on a fresh copy of
``examples/sample_project`` (120 road-sign photos, Pascal VOC) with its YOLOv5n predictions
and ``examples/label_map.yaml``, at stage ``shadow`` (stats, score, gate, report), with a
fresh report store each time (no reference run, no history).  The two versions alternate,
``--repeats`` times each, so that both see the same load; the wall time of the whole
command (process start included) is recorded with the 1-minute load average before and
after each run.  Results go to ``bench/results/run_passes.md``.
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

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._common import machine_line  # noqa: E402
from bench.score_identity import export, working_tree_version  # noqa: E402

EXAMPLES = REPO / "examples"


def prepare(work: Path) -> Path:
    """A fresh copy of the sample project and a config for it; the config's path."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(EXAMPLES / "sample_project", work / "project")
    config = {
        "report_store": str(work / "reports"),
        "projects": {
            "sample": {
                "source": str(work / "project"),
                "format": "voc",
                "predictions": {
                    "source": str(EXAMPLES / "sample_project_predictions" / "yolo"),
                    "format": "yolo",
                },
                "label_map": str(EXAMPLES / "label_map.yaml"),
                "stage": "shadow",
                "epsilon": 0.1,
                "delta": 0.1,
            }
        },
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def timed_run(tree: Path, config: Path) -> tuple[float, float, float, dict[str, float]]:
    """Seconds of one ``labeltriage run``, the 1-minute load before and after, and the
    seconds of each step as the run recorded them."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "autolabel.cli", "run", "--config", str(config), "--no-progress"]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or ": ok" not in done.stdout:
        raise SystemExit(f"labeltriage run failed in {tree}:\n{done.stdout}\n{done.stderr}")
    (record,) = (config.parent / "reports" / "sample").glob("*/run.json")
    steps = json.loads(record.read_text(encoding="utf-8"))["steps"]
    return seconds, load_before, os.getloadavg()[0], steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--base", default="main", help="the earlier revision (default: main; e.g. the merge base)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "run_passes.md"))
    args = parser.parse_args()
    head, dirty = working_tree_version()
    with tempfile.TemporaryDirectory(prefix="run-passes-") as tmp:
        base_tree = Path(tmp) / "base"
        base_tree.mkdir()
        base = export(args.base, base_tree)
        trees = {
            f"before ({args.base}, {base})": base_tree,
            f"after ({head}{'+' if dirty else ''})": REPO,
        }
        times: dict[str, list[tuple[float, float, float, dict[str, float]]]] = {
            name: [] for name in trees
        }
        machine = machine_line()
        for _ in range(args.repeats):
            for name, tree in trees.items():
                times[name].append(timed_run(tree, prepare(Path(tmp) / "work")))
                print(name, f"{times[name][-1][0]:.2f} s", flush=True)
    medians = {name: statistics.median(t for t, *_ in runs) for name, runs in times.items()}
    before, after = medians.values()
    lines = [
        "# `labeltriage run` on the sample project, before and after",
        "",
        "`bench/run_passes.py`: `labeltriage run` at stage shadow (stats, score, gate, report) on a",
        "fresh copy of `examples/sample_project` (120 photos, VOC) with its YOLOv5n predictions and",
        "`examples/label_map.yaml`, a fresh report store each time; the two versions alternate,",
        f"{args.repeats} runs each; wall time of the whole command, process start included.",
        "",
        f"Machine: {machine}",
        "",
        "| version | runs (s) | median (s) | 1-min load before → after each run |",
        "|---|---|---|---|",
    ]
    for name, runs in times.items():
        lines.append(
            f"| {name} | {', '.join(f'{t:.2f}' for t, *_ in runs)} | {medians[name]:.2f} | "
            + ", ".join(f"{a:.2f} → {b:.2f}" for _, a, b, _ in runs)
            + " |"
        )
    lines += ["", f"After / before (medians): {after / before:.2f}.", ""]
    steps = list(dict.fromkeys(step for runs in times.values() for *_, s in runs for step in s))
    lines += [
        "Median seconds of each step, as the runs recorded them (`run.json`):",
        "",
        f"| version | {' | '.join(steps)} |",
        "|---|" + "---|" * len(steps),
    ]
    for name, runs in times.items():
        cells = [statistics.median(s.get(step, 0.0) for *_, s in runs) for step in steps]
        lines.append(f"| {name} | {' | '.join(f'{c:.2f}' for c in cells)} |")
    lines.append("")
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

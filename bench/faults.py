"""Kill ``labeltriage autolabel`` and ``labeltriage run`` in the middle of their write-back.

On real road-sign photos (``../shared/data/road_signs``, 700 images restricted to the
{stop, trafficlight} classes that the real YOLOv5n predictions know, half of them left
unlabeled) written as Pascal VOC, YOLO, COCO and a Label Studio export, each trial
copies the project, starts the command, waits for its write-back to begin, sends SIGKILL
or SIGTERM at a random instant of it (:func:`tests._faults.draw_instant`: after a random
number of labels for VOC and YOLO, after a random share of the measured length of an
uncut write-back for COCO and Label Studio), and then checks, in order
(:mod:`tests._faults`):

1. human labels byte-identical, and no auto-label read as human, *before* any recovery;
2. ``labeltriage stats`` (which recovers the project on open) counts the same;
3. the project restored byte for byte outside ``.labeltriage/`` — by the command's own
   rollback (SIGTERM), by recovery (SIGKILL), or, for a run that had committed, by
   ``labeltriage rollback RUN_ID``;
4. no temporary and no journal left;
5. ``labeltriage run``: its record ``failed`` with ``interrupted`` (after
   ``labeltriage recover`` for SIGKILL), unless it had finished.

``--compare DIR`` runs the same ``autolabel`` trials with the code in ``DIR`` (e.g. an
export of an older commit) killed, the checks still done by this code.

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/faults.py`` (``--trials N`` per
format, command and signal, default 8: 32 kill instants per format; ``--quick``: 200
images, 2 trials).  Writes ``bench/results/faults.md`` and ``faults.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from _faults import FORMATS, build_projects, draw_instant, measure_window, run_trial  # noqa: E402

from bench._common import machine_line  # noqa: E402

log = logging.getLogger("faults")
COMMANDS = ("autolabel", "run")
SIGNALS = (signal.SIGKILL, signal.SIGTERM)


def trials_for(
    projects: dict[str, Any],
    work: Path,
    *,
    commands: tuple[str, ...],
    n: int,
    seed: int,
    code: Path | None,
    label: str,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    rows, windows = [], {}
    for fmt, project in projects.items():
        for command in commands:
            window, written = measure_window(
                project, work / f"{label}-{fmt}-{command}-measure", command=command, code=code
            )
            windows[f"{fmt}/{command}"] = {"seconds": round(window, 3), "labels": written}
            log.info("%s %s %s: write-back %.3f s, %d labels", label, fmt, command, window, written)
            if not written:  # nothing to cut short (too few labeled items to calibrate)
                continue
            rng = random.Random(f"{seed}-{fmt}-{command}")
            for sig in SIGNALS:
                for k in range(n):
                    delay, after = draw_instant(rng, fmt, window, written)
                    trial = run_trial(
                        project,
                        work / f"{label}-{fmt}-{command}-{sig.name}-{k}",
                        command=command,
                        sig=sig,
                        delay_s=delay,
                        after_labels=after,
                        code=code,
                    )
                    row = {
                        **trial.to_dict(),
                        "code": label,
                        "window_s": round(window, 3),
                        "after_labels": after,
                        "labels": written,
                    }
                    rows.append(row)
                    log.info(
                        "%s %s %s %s after %d labels +%.3fs: %s %s",
                        label, fmt, command, sig.name, after, delay,
                        "ok" if trial.ok else "PROBLEM", trial.problems or "",
                    )  # fmt: skip
                    shutil.rmtree(work / f"{label}-{fmt}-{command}-{sig.name}-{k}")
    return rows, windows


def _loads(loads: tuple[float, ...]) -> str:
    return " / ".join(f"{x:.2f}" for x in loads)


def _commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for code in dict.fromkeys(r["code"] for r in rows):
        rs = [r for r in rows if r["code"] == code]
        during = sum(r["killed_during_writes"] for r in rs)
        passed = sum(r["ok"] for r in rs)
        formats = ", ".join(dict.fromkeys(r["fmt"] for r in rs))
        lines.append(
            f"- code `{code}`: {len(rs)} kill instants ({formats}), {during} of them while "
            f"labels were being written; all checks passed in {passed}, problems in "
            f"{len(rs) - passed}."
        )
    return lines


def write_markdown(
    path: Path, rows: list[dict[str, Any]], windows: dict[str, Any], args: Any, seconds: float
) -> None:
    lines = [
        "# Faults: labeltriage killed during its write-back",
        "",
        f"Machine: {machine_line()}; load averages (1, 5, 15 min) {_loads(args.load_start)} at"
        f" the start, {_loads(os.getloadavg())} at the end (a shared machine, so the length of"
        " a write-back varies from trial to trial).",
        f"Code: commit {args.commit}.",
        f"Command: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/faults.py {' '.join(args.argv)}`"
        f" — {seconds / 60:.0f} min in all.",
        "",
        "Project: road_signs (real photos) restricted to {stop, trafficlight}, half the images "
        f"unlabeled{' (first 200 images)' if args.quick else ''}; ε = 0.3, δ = 0.1. Each trial "
        "kills the command at a random instant of its write-back — VOC and YOLO after a "
        "uniformly random number of labels (1 … all) plus 0–10 ms, COCO and Label Studio "
        "(one file rewritten per chunk of 256 items) after a uniform 0 … 1.1 × the length of "
        "an uncut write-back, measured first — and checks: human labels "
        "byte-identical and no auto-label read as human before recovery; `stats` after "
        "recovery; project restored byte for byte (by the command's rollback, by recovery, "
        "or by `rollback RUN_ID` after a committed run); no temporary or journal left; "
        "for `run`, its record `failed (interrupted)`.",
        "",
        "## Summary",
        "",
        *_summary(rows),
        "",
        "## Length of an uncut write-back",
        "",
        "| code | format / command | seconds | labels written |",
        "|---|---|---:|---:|",
    ]
    for label, table in windows.items():
        for key, w in table.items():
            lines.append(f"| {label} | {key} | {w['seconds']:.3f} | {w['labels']} |")
    lines += [
        "",
        "## Outcomes",
        "",
        "| code | format | command | signal | trials | killed while writing | labels with sidecar at the kill (min–max) | rolled back | committed, then `rollback` | all checks passed |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|",
    ]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["code"], r["fmt"], r["command"], r["signal"]), []).append(r)
    for (code, fmt, command, sig), rs in groups.items():
        written = [r["written_before_kill"] for r in rs]
        span = f"{min(written)}–{max(written)}" if fmt in ("voc", "yolo") else "—"
        lines.append(
            f"| {code} | {fmt} | {command} | {sig} | {len(rs)} | "
            f"{sum(r['killed_during_writes'] for r in rs)} | {span} | "
            f"{sum(r['manifest_stage'] == 'rolled_back' for r in rs)} | "
            f"{sum(r['manifest_stage'] == 'committed' for r in rs)} | "
            f"{sum(r['ok'] for r in rs)} |"
        )
    lines += [
        "",
        "## Every trial",
        "",
        "| code | format | command | signal | kill at | exit | killed while writing | manifest | problems |",
        "|---|---|---|---|---|---:|---|---|---|",
    ]
    for r in rows:
        if r["after_labels"]:
            at = f"label {r['after_labels']} of {r['labels']} + {r['delay_s'] * 1000:.1f} ms"
        else:
            frac = r["delay_s"] / r["window_s"] if r["window_s"] else 0.0
            at = f"{r['delay_s']:.3f} s ({frac:.2f} of the write-back)"
        problems = "; ".join(r["problems"])[:160] or "—"
        lines.append(
            f"| {r['code']} | {r['fmt']} | {r['command']} | {r['signal']} | {at} | "
            f"{r['exit_code']} | {'yes' if r['killed_during_writes'] else 'no'} | "
            f"{r['manifest_stage']} | {problems} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--commands", default=",".join(COMMANDS))
    parser.add_argument("--compare", type=Path, default=None, help="older code to kill too")
    parser.add_argument("--compare-trials", type=int, default=4)
    parser.add_argument("--compare-label", default="older", help="its name in the tables")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.load_start = os.getloadavg()
    args.commit = _commit()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.time()
    road = args.data / "road_signs"
    work = Path(tempfile.mkdtemp(prefix="labeltriage-faults-"))
    try:
        projects = build_projects(
            road,
            road / "predictions" / "yolo",
            work / "projects",
            formats=tuple(args.formats.split(",")),
            limit=200 if args.quick else None,
            unlabeled_share=0.5,
            seed=args.seed,
        )
        commands = tuple(args.commands.split(","))
        n = 2 if args.quick else args.trials
        rows, windows = trials_for(
            projects, work, commands=commands, n=n, seed=args.seed, code=None, label="this"
        )
        all_windows = {"this": windows}
        if args.compare is not None:
            old_rows, old_windows = trials_for(
                projects, work, commands=("autolabel",), n=args.compare_trials,
                seed=args.seed, code=args.compare.resolve(), label=args.compare_label,
            )  # fmt: skip
            rows += old_rows
            all_windows[args.compare_label] = old_windows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.json").write_text(json.dumps(rows, indent=1))
    write_markdown(args.out / "faults.md", rows, all_windows, args, time.time() - t0)
    bad = [r for r in rows if r["code"] == "this" and not r["ok"]]
    print(f"{len(rows)} trials, {len(bad)} with problems (this code); {args.out / 'faults.md'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Fault injection: projects in four formats, kill trials, and the checks run after each.

Used by ``tests/test_fault_trials.py`` (``make test-faults``; a quick subset in the
default run) and ``bench/faults.py`` (the recorded results).

A *fault project* is real road-sign photos (``../shared/data/road_signs``, or the bundled
sample project) restricted to the {stop, trafficlight} classes that the YOLOv5n
predictions know, with a share of the images left unlabeled, written as Pascal VOC,
YOLO, COCO or a Label Studio export by labeltriage's own writers, and scored once.
Images are hard links of the originals, so a fresh copy per trial is cheap.

A *trial* copies the project, starts ``labeltriage autolabel`` (or ``labeltriage run`` at
stage ``autolabel``), waits until the write-back begins (its journal appears under
``.labeltriage/runs/``), lets it write for a random time, and sends SIGKILL or SIGTERM.
Then, in this order:

1. without recovering anything, every human label is byte-identical to the original
   (label files; for the JSON formats each human entry), and reading the project
   (``compute_stats``) counts exactly the original human labels as human;
2. ``labeltriage stats`` (which opens, hence recovers, the project) counts the same;
3. a run that was rolled back (by the signal handler or by recovery) left the project
   byte for byte as it was, outside ``.labeltriage/``; a run that had committed is then
   undone with ``labeltriage rollback RUN_ID``, with the same result;
4. no temporary file is left anywhere, and no journal;
5. for ``labeltriage run``: its record ends ``failed`` with ``interrupted`` (after
   ``labeltriage recover`` with the config, for SIGKILL), unless it had finished.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("voc", "yolo", "coco", "labelstudio")
KEEP = ("stop", "trafficlight")
LABEL_MAP = {"map": {"stop sign": "stop", "traffic light": "trafficlight"}, "ignore": []}
EPSILON, DELTA, MIN_COUNT = 0.3, 0.1, 10


def cli_env(code: Path | None = None) -> dict[str, str]:
    """The environment of a ``labeltriage`` child: this tree's code, or ``code``'s."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(code or REPO)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def cli(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``labeltriage ARGS`` in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-m", "autolabel.cli", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"labeltriage {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
        )
    return done


# -- building the projects ---------------------------------------------------------------------


@dataclass
class FaultProject:
    """One scored project of a format, ready to be copied for a trial."""

    fmt: str
    root: Path
    source_name: str  # "" for a folder project, else the JSON file inside root
    predictions: Path
    label_map: Path
    difficulty: Path
    predictions_format: str = "yolo"

    def source(self, root: Path) -> str:
        return str(root / self.source_name) if self.source_name else str(root)


def _two_class_voc(xml: bytes) -> bytes:
    root = ET.fromstring(xml)
    for obj in list(root.iter("object")):
        if obj.findtext("name") not in KEEP:
            root.remove(obj)
    return ET.tostring(root)


def build_voc(
    data: Path, out: Path, *, limit: int | None, unlabeled_share: float, seed: int
) -> Path:
    """``out/voc``: images hard-linked, 2-class annotations for the labeled share."""
    root = out / "voc"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = sorted((data / "images").glob("*.jpg"))[:limit]
    rng = random.Random(seed)
    for image in images:
        os.link(image, root / "images" / image.name)
        xml = data / "annotations" / f"{image.stem}.xml"
        if xml.exists() and rng.random() >= unlabeled_share:
            (root / "annotations" / xml.name).write_bytes(_two_class_voc(xml.read_bytes()))
    return root


def _convert(voc_root: Path, fmt: str, out: Path) -> tuple[Path, str]:
    """The VOC project written as ``fmt`` by labeltriage's own writers."""
    from connectors.formats import FORMATS as REGISTRY
    from connectors.formats.voc import VocFormat
    from connectors.storage import ProjectFS

    root = out / fmt
    (root / "images").mkdir(parents=True)
    for image in (voc_root / "images").iterdir():
        os.link(image, root / "images" / image.name)
    items = list(VocFormat(ProjectFS(str(voc_root))).iter_items())
    name = {"coco": "annotations.json", "labelstudio": "export.json"}.get(fmt, "")
    options = {"file": name} if name else {}
    REGISTRY[fmt](ProjectFS(str(root)), **options).write_items(items, list(KEEP))
    return root, name


def _labelstudio_predictions(voc_root: Path, ls_root: Path, predictions: Path, out: Path) -> Path:
    """The YOLO predictions as a Label Studio file keyed by the export's task ids."""
    from connectors.formats.labelstudio import LabelStudioFormat, annotation_to_region
    from connectors.formats.voc import VocFormat
    from connectors.formats.yolo import YoloPredictions
    from connectors.storage import ProjectFS

    voc = VocFormat(ProjectFS(str(voc_root)))
    by_stem = {i.item_id: i for i in voc.iter_items()}
    yolo = YoloPredictions(ProjectFS(str(predictions)), project=voc)
    tasks = json.loads((ls_root / "export.json").read_bytes())
    names = LabelStudioFormat(ProjectFS(str(ls_root)), file="export.json")._names(tasks)
    for task in tasks:
        item = by_stem[Path(task["data"]["image"]).stem]
        width, height = voc.image_size_of(item)
        item = item.model_copy(update={"width": width, "height": height})
        pred = yolo.get(item.item_id, item)
        boxes = [a for a in (pred.annotations if pred is not None else []) if a.box is not None]
        regions = [
            annotation_to_region(a, names, width, height, region_id=f"p{i}")
            for i, a in enumerate(boxes)
        ]
        task["annotations"] = []
        task["predictions"] = [{"model_version": "yolov5n", "result": regions}]
    path = out / "labelstudio-predictions.json"
    path.write_text(json.dumps(tasks))
    return path


def build_projects(
    data: Path,
    predictions: Path,
    out: Path,
    *,
    formats: tuple[str, ...] = FORMATS,
    limit: int | None = None,
    unlabeled_share: float = 0.6,
    seed: int = 0,
) -> dict[str, FaultProject]:
    """Every format's project under ``out``, each scored once (``out/<fmt>-scores``)."""
    out.mkdir(parents=True, exist_ok=True)
    voc = build_voc(data, out / "base", limit=limit, unlabeled_share=unlabeled_share, seed=seed)
    label_map = out / "label_map.yaml"
    label_map.write_text(yaml.safe_dump(LABEL_MAP))
    projects = {}
    for fmt in formats:
        root, name = _convert(voc, fmt, out)
        project = FaultProject(
            fmt, root, name, predictions.resolve(), label_map, out / f"{fmt}-scores"
        )
        if fmt == "labelstudio":  # task ids, not file names: predictions keyed the same way
            project.predictions = _labelstudio_predictions(voc, root, predictions, out)
            project.predictions_format = "labelstudio"
        cli(
            "score", "-s", project.source(root), "-f", fmt,
            "--predictions", str(project.predictions),
            "--predictions-format", project.predictions_format,
            "--label-map", str(label_map), "--out", str(project.difficulty),
        )  # fmt: skip
        projects[fmt] = project
    return projects


def fresh_copy(project: FaultProject, dest: Path) -> Path:
    """A copy of the project's root (images hard-linked, everything else copied)."""

    def copy(src: str, dst: str) -> None:
        if src.endswith(".jpg"):
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(project.root, dest, copy_function=copy)
    return dest


# -- what is checked --------------------------------------------------------------------------


def files(root: Path) -> dict[str, bytes]:
    """Every file outside ``.labeltriage/`` (relative path → bytes); images by size only."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(".labeltriage/"):
            out[rel] = (
                str(path.stat().st_size).encode() if rel.endswith(".jpg") else path.read_bytes()
            )
    return out


def temporaries(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.name.endswith(".tmp") or p.name.endswith(".journal") or ".conflict-" in p.name
    )


def human_entries(fmt: str, root: Path, source_name: str) -> dict[str, bytes]:
    """The human labels as bytes: label files, or each human entry of the JSON file."""
    if fmt in ("voc", "yolo"):
        folder = "annotations" if fmt == "voc" else "labels"
        sidecars = root / ".labeltriage" / "auto"
        auto = {p.stem for p in sidecars.rglob("*.json")} if sidecars.is_dir() else set()
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted((root / folder).rglob("*"))
            if p.is_file() and p.stem not in auto and not p.name.startswith(".")
        }
    doc = json.loads((root / source_name).read_bytes())
    out = {}
    if fmt == "coco":
        for ann in doc["annotations"]:
            if "labeltriage" not in ann:
                out[f"annotation {ann['id']}"] = json.dumps(ann, sort_keys=True).encode()
    else:
        for task in doc:
            for ann in task.get("annotations") or []:
                out[f"task {task['id']} annotation {ann.get('id')}"] = json.dumps(
                    ann, sort_keys=True
                ).encode()
    return out


def read_counts(fmt: str, source: str) -> dict[str, int]:
    """``labeled``/``auto_labeled`` as the library reads them, *without* recovering."""
    from connectors.project import open_project
    from connectors.stats import compute_stats

    stats = compute_stats(open_project(source, fmt, recover=False))
    return {k: int(stats[k]) for k in ("items", "labeled", "auto_labeled", "unlabeled")}


# -- one trial ---------------------------------------------------------------------------------


@dataclass
class Trial:
    """One kill and what was found after it."""

    fmt: str
    command: str
    signal: str
    delay_s: float  # after the write-back began (its journal appeared)
    exit_code: int | None = None
    killed_during_writes: bool = False
    manifest_stage: str | None = None
    recovery: str | None = None  # outcome of recovery on the next open
    written_before_kill: int = 0  # auto-labels in the project when it was killed
    record_status: str | None = None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def draw_instant(rng: random.Random, fmt: str, window: float, written: int) -> tuple[float, int]:
    """A random kill instant: ``(delay_s, after_labels)`` for :func:`run_trial`.

    File formats write one label at a time: the kill comes after a uniformly random
    number of labels (1 … all) plus 0–10 ms, wherever that falls in the steps of the
    next label; that is independent of how loaded the machine is.  The one-file formats
    rewrite their file once per chunk: the kill comes after a uniformly random time in
    0 … 1.1 × the length of an uncut write-back (``window``).
    """
    if fmt in ("voc", "yolo") and written > 0:
        return rng.uniform(0.0, 0.01), rng.randint(1, written)
    return rng.uniform(0.0, 1.1) * window, 0


def writing(runs: Path) -> bool | None:
    """``None`` before the write-back began, then whether it is still in flight: its
    journal exists (or, for code without journals, its manifest still says pending)."""
    names = [p for p in runs.iterdir() if not p.name.startswith(".")] if runs.is_dir() else []
    if not names:
        return None
    if any(p.suffix == ".journal" for p in names):
        return True
    for p in names:
        try:
            return bool(json.loads(p.read_bytes()).get("stage") == "pending")
        except (OSError, ValueError):
            return True
    return True


def _run_config(project: FaultProject, root: Path, store: Path) -> Path:
    config = {
        "report_store": str(store),
        "projects": {
            "roads": {
                "source": project.source(root),
                "format": project.fmt,
                "predictions": {
                    "source": str(project.predictions),
                    "format": project.predictions_format,
                },
                "label_map": str(project.label_map),
                "stage": "autolabel",
                "epsilon": EPSILON,
                "delta": DELTA,
                "min_count": MIN_COUNT,
                "num_workers": 0,
            }
        },
    }
    path = root.parent / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _command(project: FaultProject, root: Path, command: str, config: Path | None) -> list[str]:
    base = [sys.executable, "-m", "autolabel.cli"]
    if command == "run":
        return [*base, "--config", str(config), "run", "--no-progress"]
    return [
        *base, "autolabel", "-s", project.source(root), "-f", project.fmt,
        "--predictions", str(project.predictions),
        "--predictions-format", project.predictions_format,
        "--label-map", str(project.label_map), "--difficulty", str(project.difficulty),
        "--out", str(root.parent / "out"), "--epsilon", str(EPSILON), "--delta", str(DELTA),
        "--min-count", str(MIN_COUNT),
    ]  # fmt: skip


def run_trial(
    project: FaultProject,
    work: Path,
    *,
    command: str,
    sig: signal.Signals,
    delay_s: float,
    after_labels: int = 0,
    start_timeout: float = 300.0,
    code: Path | None = None,
) -> Trial:
    """One trial (see the module docstring); ``work`` must not exist yet.

    The signal goes ``delay_s`` after the write-back began or, with ``after_labels``
    (file formats), as soon as that many sidecars exist.  ``code``: run the killed
    command from that source tree (an older version, for comparison); the checks always
    use this one.
    """
    t0 = time.perf_counter()
    trial = Trial(project.fmt, command, sig.name, round(delay_s, 4))
    work.mkdir(parents=True)
    root = fresh_copy(project, work / "project")
    source = project.source(root)
    original = files(root)
    humans = human_entries(project.fmt, root, project.source_name)
    counts = read_counts(project.fmt, source)
    store = work / "reports"
    config = _run_config(project, root, store) if command == "run" else None
    runs = root / ".labeltriage" / "runs"
    proc = subprocess.Popen(
        _command(project, root, command, config),
        env=cli_env(code),
        cwd=code or REPO,  # python -m imports from the working directory first
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + start_timeout
    started = False
    while time.monotonic() < deadline and proc.poll() is None:
        if writing(runs) is not None:
            started = True
            break
        time.sleep(0.002)
    sidecars = root / ".labeltriage" / "auto"
    while started and after_labels and proc.poll() is None:
        if sidecars.is_dir() and sum(1 for _ in sidecars.rglob("*.json")) >= after_labels:
            break
        time.sleep(0.001)
    if started:
        time.sleep(delay_s)
        trial.killed_during_writes = bool(writing(runs))
        trial.written_before_kill = len(list(sidecars.rglob("*.json"))) if sidecars.is_dir() else 0
        if proc.poll() is None:
            proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=600)
    trial.exit_code = proc.returncode
    if not started:
        trial.problems.append(
            f"the write-back never started (exit {proc.returncode}): {stderr[-500:]}"
        )
        trial.seconds = round(time.perf_counter() - t0, 2)
        return trial
    check_after_fault(trial, project, root, original, humans, counts, config)
    trial.seconds = round(time.perf_counter() - t0, 2)
    return trial


def measure_window(
    project: FaultProject, work: Path, *, command: str, code: Path | None = None
) -> tuple[float, int]:
    """``(seconds the write-back lasts, labels written)`` of one uncut run (journal lifetime)."""
    work.mkdir(parents=True)
    root = fresh_copy(project, work / "project")
    config = _run_config(project, root, work / "reports") if command == "run" else None
    runs = root / ".labeltriage" / "runs"
    proc = subprocess.Popen(
        _command(project, root, command, config),
        env=cli_env(code),
        cwd=code or REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    began = ended = None
    while proc.poll() is None:
        present = bool(writing(runs))
        now = time.perf_counter()
        if present and began is None:
            began = now
        if not present and began is not None:
            ended = now
            break
        time.sleep(0.001)
    proc.wait(timeout=600)
    manifests = list(runs.glob("*.json")) if runs.is_dir() else []
    written = len(json.loads(manifests[0].read_bytes())["records"]) if manifests else 0
    if began is None:
        return 0.0, written
    return (ended or time.perf_counter()) - began, written


def check_after_fault(
    trial: Trial,
    project: FaultProject,
    root: Path,
    original: dict[str, bytes],
    humans: dict[str, bytes],
    counts: dict[str, int],
    config: Path | None,
) -> None:
    """Checks 1–5 of the module docstring; problems go to ``trial.problems``."""
    source = project.source(root)
    human_now = human_entries(project.fmt, root, project.source_name)
    if human_now != humans:
        changed = sorted(
            set(humans) ^ set(human_now) | {k for k in humans if human_now.get(k) != humans[k]}
        )
        trial.problems.append(f"human labels changed before recovery: {changed[:5]}")
    seen = read_counts(project.fmt, source)
    if seen["labeled"] - seen["auto_labeled"] != counts["labeled"] - counts["auto_labeled"]:
        trial.problems.append(f"before recovery, human-labeled items read as {seen} (was {counts})")
    stats = json.loads(cli("stats", "-s", source, "-f", project.fmt).stdout)
    if stats["labeled"] - stats["auto_labeled"] != counts["labeled"] - counts["auto_labeled"]:
        trial.problems.append(
            f"stats after recovery: {stats['labeled']} labeled, {stats['auto_labeled']} auto"
        )
    manifests = sorted((root / ".labeltriage" / "runs").glob("*.json"))
    if len(manifests) != 1:
        trial.problems.append(f"{len(manifests)} run manifests")
        return
    manifest = json.loads(manifests[0].read_bytes())
    trial.manifest_stage = manifest["stage"]
    recovered = (manifest.get("meta") or {}).get("recovered")
    trial.recovery = "rolled_back" if recovered and manifest["stage"] == "rolled_back" else None
    if manifest["stage"] == "committed":
        cli("rollback", manifest["run_id"], "-s", source, "-f", project.fmt)
    elif manifest["stage"] != "rolled_back":
        trial.problems.append(f"manifest left {manifest['stage']} after recovery")
    after = files(root)
    if after != original:
        diff = sorted(
            set(after) ^ set(original) | {k for k in original if after.get(k) != original[k]}
        )
        trial.problems.append(f"not restored byte for byte: {diff[:5]}")
    left = temporaries(root)
    if left:
        trial.problems.append(f"left behind: {left[:5]}")
    if config is not None:
        cli("--config", str(config), "recover", "-s", source, "-f", project.fmt)
        records = list((root.parent / "reports" / "roads").glob("*/run.json"))
        statuses = [json.loads(r.read_bytes()) for r in records]
        trial.record_status = ",".join(
            f"{r['status']}:{(r.get('error') or '')[:40]}" for r in statuses
        )
        for r in statuses:
            if r["status"] == "running" or (
                r["status"] == "failed" and "interrupted" not in (r.get("error") or "")
            ):
                trial.problems.append(f"run record {r['status']}: {r.get('error')}")

"""``labeltriage demo``: the whole job on the bundled sample, in a fresh folder.

1. copy ``examples/sample_project`` (120 road-sign photos, Pascal VOC, 40 unlabeled) to
   ``OUT/project``; build ``OUT/road_signs``, the job of boxing stop signs and traffic
   lights: the same 120 photos plus the 150 of ``examples/sample_project_extra`` (photos
   with neither, 50 unlabeled), with only the ``stop`` and ``trafficlight`` boxes kept;
   write ``OUT/config.yaml`` from ``examples/config.yaml``;
2. project ``road_signs_model`` (on ``OUT/project``): train the project's own detector
   (``fcos`` on cached, frozen EfficientNet-Lite0 ImageNet features) with its
   loss-prediction module on the labeled items, score (predicted loss, model
   uncertainty, Fourier; a scorer constant over the items is dropped), tier, report;
3. project ``road_signs`` at stage ``shadow``: score with the platform's predictions,
   calibrate the easy tier at ε = 0.1, report what *would* be auto-labeled (nothing is
   written);
4. promote ``road_signs`` to ``autolabel`` in ``OUT/config.yaml`` and run again: the
   calibrated easy items get labels written into the copy, never over a human label;
   the report says what was written;
5. print the verdicts, where the reports are, and how to audit and undo the write-back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml

from autolabel.commands._common import progress_option, want_progress
from connectors.errors import UsageError

log = logging.getLogger(__name__)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
"""The repository's examples folder (an editable install or a source checkout)."""


def find_examples(given: str | None) -> Path:
    """``--examples``, else the repository's ``examples/``, else ``./examples`` (a container's workdir)."""
    if given:
        return Path(given).resolve()
    for candidate in (EXAMPLES, Path.cwd() / "examples"):
        if (candidate / "sample_project").is_dir():
            return candidate.resolve()
    return EXAMPLES


MARKER = ".labeltriage-demo"
PROJECT = "road_signs"
MODEL_PROJECT = "road_signs_model"
KEEP = ("stop", "trafficlight")
"""The classes of the auto-labeled project (the predictions' ``stop sign`` and ``traffic light``)."""


def keep_classes(xml: bytes, keep: tuple[str, ...]) -> bytes:
    """A Pascal VOC document with only the objects of the classes ``keep``."""
    import xml.etree.ElementTree as ET

    from connectors.formats.voc import parse_voc_xml

    root = parse_voc_xml(xml, "<sample>")
    for obj in list(root.iter("object")):
        if (obj.findtext("name") or "").strip() not in keep:
            root.remove(obj)
    return ET.tostring(root, encoding="utf-8")


def build_two_class_project(out: Path, sources: list[Path]) -> None:
    """``out`` as a VOC project: every image of ``sources``, their annotations with only
    the :data:`KEEP` classes (an item without annotation file stays unlabeled)."""
    (out / "images").mkdir(parents=True)
    (out / "annotations").mkdir()
    for source in sources:
        for image in sorted((source / "images").iterdir()):
            shutil.copy2(image, out / "images" / image.name)
        for xml in sorted((source / "annotations").glob("*.xml")):
            (out / "annotations" / xml.name).write_bytes(keep_classes(xml.read_bytes(), KEEP))


def prepare(out: Path, examples: Path) -> Path:
    """Fresh ``out`` with the sample copies and a config for them; returns the config path."""
    sample = examples / "sample_project"
    extra = examples / "sample_project_extra"
    template = examples / "config.yaml"
    for needed in (
        sample,
        extra,
        template,
        examples / "sample_project_predictions",
        examples / "label_map.yaml",
    ):
        if not needed.exists():
            raise UsageError(
                f"{needed}: missing; the demo needs the repository's examples/ folder (give --examples DIR)"
            )
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise UsageError(
                f"{out} exists and is not an earlier demo folder; choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(
        "made by labeltriage demo; removed and recreated by the next demo run\n"
    )
    shutil.copytree(sample, out / "project")
    build_two_class_project(out / PROJECT, [sample, extra])
    data = yaml.safe_load(template.read_text(encoding="utf-8"))
    data["report_store"] = "reports"
    data["projects"][MODEL_PROJECT]["source"] = "project"
    project = data["projects"][PROJECT]
    project["source"] = PROJECT
    project["predictions"]["source"] = str((examples / project["predictions"]["source"]).resolve())
    project["label_map"] = str((examples / project["label_map"]).resolve())
    project["stage"] = "shadow"
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return config


def promote(config: Path) -> None:
    """Move the project to stage ``autolabel``: only the config changes."""
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["projects"][PROJECT]["stage"] = "autolabel"
    config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def program() -> str:
    """How to call labeltriage again, as this demo was called (``.venv/bin/labeltriage``
    after ``make demo``; ``python -m autolabel.cli`` when run as a module)."""
    exe = Path(sys.argv[0])
    if exe.name != "labeltriage":
        return f"{sys.executable} -m autolabel.cli"
    if exe.parent == Path("."):
        found = shutil.which("labeltriage")
        return "labeltriage" if found and Path(found).resolve() == exe.resolve() else str(exe)
    try:
        return os.path.relpath(exe)
    except ValueError:  # another drive
        return str(exe)


def _combination(record: Any) -> dict[str, Any]:
    """The run's combination record (method, weights, dropped scorers), ``{}`` without one."""
    summary = record.outputs.get("summary")
    if not summary or not Path(summary).is_file():
        return {}
    data = json.loads(Path(summary).read_text(encoding="utf-8"))
    return dict(data.get("combination") or {})


def _summary(record: Any) -> list[str]:
    counts = record.counts
    lines = [
        f"  run {record.run_id}: {record.status} in {sum(record.steps.values()):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in record.steps.items())})"
    ]
    if "tiers" in counts:
        combination = _combination(record)
        dropped = combination.get("dropped") or {}
        used = [s for s in counts.get("scorers", []) if s not in dropped]
        note = f"; dropped, the same value for every item: {', '.join(dropped)}" if dropped else ""
        lines.append(
            f"  tiers: {', '.join(f'{k} {v}' for k, v in counts['tiers'].items())} (scorers: {', '.join(used)}{note})"
        )
        weights = {k: w for k, w in (combination.get("weights") or {}).items() if w}
        if weights:
            ranked = sorted(weights.items(), key=lambda kv: (-abs(kv[1]), kv[0]))
            lines.append(
                f"  combination ({combination.get('method')}): "
                + ", ".join(f"{k} {w:.2f}" for k, w in ranked)
            )
    gate = counts.get(record.stage)
    if isinstance(gate, dict):
        lines.append(f"  {record.stage}: {gate['verdict']}")
        if gate.get("written") or gate.get("selected"):
            lines.append(
                f"  labels: {gate['with_boxes']} with boxes, {gate['empty']} empty "
                f'("no stop sign or traffic light here")'
            )
    if record.error:
        lines.append(f"  error: {record.error}")
    return lines


@click.command("demo")
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), default="demo-out", show_default=True,
    help="Folder for the project copy, the config and the reports (an earlier demo folder is replaced).",
)  # fmt: skip
@click.option(
    "--examples", "examples_dir", type=click.Path(file_okay=False, exists=True), default=None,
    help="The examples folder with sample_project/ and config.yaml (default: the repository's).",
)  # fmt: skip
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Training epochs (default: examples/config.yaml's).",
)
@progress_option()
@click.pass_context
def demo(
    ctx: click.Context,
    out_dir: str,
    examples_dir: str | None,
    epochs: int | None,
    progress: bool | None,
) -> None:
    """The whole job on the bundled sample: train, score, tier, shadow, autolabel, report.

    Works on copies of examples/sample_project (and sample_project_extra) in --out; the
    originals are never touched.
    """
    from autolabel.config import load_config
    from autolabel.pipeline import run_project

    start = time.perf_counter()
    out = Path(out_dir).resolve()
    config = prepare(out, find_examples(examples_dir))
    if epochs is not None:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        data["projects"][MODEL_PROJECT]["train"]["epochs"] = epochs
        config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    click.echo(
        f"sample copied to {out / 'project'}; the stop-sign and traffic-light job built in "
        f"{out / PROJECT}; config {config}"
    )
    show = want_progress(progress)

    click.echo(
        f"\n[1/3] {MODEL_PROJECT}: train its own detector (pretrained backbone) with its loss-prediction module, score, tier, report"
    )
    model_run = run_project(load_config(config), MODEL_PROJECT, trigger="demo", progress=show)
    click.echo("\n".join(_summary(model_run)))

    click.echo(
        f"\n[2/3] {PROJECT} at stage shadow: score with the platform's predictions, calibrate the easy tier, report what would be written"
    )
    shadow = run_project(load_config(config), PROJECT, trigger="demo", progress=show)
    click.echo("\n".join(_summary(shadow)))

    promote(config)
    click.echo(
        f"\n[3/3] {PROJECT} promoted to stage autolabel in {config.name}: auto-label the calibrated easy tier into the copy"
    )
    final = run_project(load_config(config), PROJECT, trigger="demo", progress=show)
    click.echo("\n".join(_summary(final)))

    failed = [r for r in (model_run, shadow, final) if r.status != "ok"]
    prog = program()
    click.echo("")
    for record in (model_run, shadow, final):
        if "report" in record.outputs:
            click.echo(f"report ({record.project}, {record.stage}): {record.outputs['report']}")
    final_dir = Path(final.outputs.get("report", "")).parent
    click.echo(f"audit the written labels: {prog} audit {final_dir}")
    click.echo(f"run again:                {prog} run --config {config}")
    click.echo(
        f"undo the write-back:      {prog} rollback {final.run_id} --source {out / PROJECT} --format voc"
    )
    click.echo(f"demo finished in {time.perf_counter() - start:.0f} s")
    if failed:
        raise click.ClickException(
            "; ".join(f"{r.project} run {r.run_id} failed: {r.error}" for r in failed)
        )

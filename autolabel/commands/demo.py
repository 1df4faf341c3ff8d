"""``labeltriage demo``: the whole job on the bundled sample project, in a fresh folder.

1. copy ``examples/sample_project`` (120 road-sign photos, Pascal VOC, 40 unlabeled)
   into ``OUT/project`` and write ``OUT/config.yaml`` from ``examples/config.yaml``;
2. project ``road_signs_model``: train a small detector with its loss-prediction module
   on the labeled items, score (predicted loss, model uncertainty, Fourier), tier, report;
3. project ``road_signs``, stage ``shadow``: score with the platform's predictions, tier,
   report, calibrate the easy tier and record what would be auto-labeled (nothing is
   written to the project);
4. promote ``road_signs`` to ``autolabel`` in ``OUT/config.yaml`` and run again: scores
   compare with the shadow run, the report shows the trend, and the calibrated easy
   items get labels written into the copy, never over a human label;
5. print where the reports are and how to undo the write-back.
"""

from __future__ import annotations

import logging
import shutil
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


def prepare(out: Path, examples: Path) -> Path:
    """Fresh ``out`` with a copy of the sample project and a config for it; returns the config path."""
    sample = examples / "sample_project"
    template = examples / "config.yaml"
    for needed in (
        sample,
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
    data = yaml.safe_load(template.read_text(encoding="utf-8"))
    data["report_store"] = "reports"
    for name in (PROJECT, MODEL_PROJECT):
        data["projects"][name]["source"] = "project"
    project = data["projects"][PROJECT]
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


def _summary(record: Any) -> list[str]:
    counts = record.counts
    lines = [
        f"  run {record.run_id}: {record.status} in {sum(record.steps.values()):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in record.steps.items())})"
    ]
    if "tiers" in counts:
        lines.append(
            f"  tiers: {', '.join(f'{k} {v}' for k, v in counts['tiers'].items())} (scorers: {', '.join(counts.get('scorers', []))})"
        )
    gate = counts.get(record.stage)
    if isinstance(gate, dict):
        threshold = "none passed" if gate.get("threshold") is None else f"{gate['threshold']:.3f}"
        lines.append(
            f"  {record.stage}: calibrated threshold {threshold}, error bound {gate['bound']:.3f}, "
            f"{gate['selected']} of {gate['eligible']} unlabeled items selected, {gate['written']} written, {gate['audit']} for audit"
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
    """The whole job on the bundled sample project: train, score, tier, report, shadow, autolabel.

    Works on a copy of examples/sample_project in --out; the original is never touched.
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
    click.echo(f"sample project copied to {out / 'project'}; config {config}")
    show = want_progress(progress)

    click.echo(
        f"\n[1/3] {MODEL_PROJECT}: train a small detector with its loss-prediction module, score, tier, report"
    )
    model_run = run_project(load_config(config), MODEL_PROJECT, trigger="demo", progress=show)
    click.echo("\n".join(_summary(model_run)))

    click.echo(
        f"\n[2/3] {PROJECT} at stage shadow: score with the platform's predictions, tier, report, calibrate"
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
    click.echo("")
    for record in (model_run, shadow, final):
        if "report" in record.outputs:
            click.echo(f"report ({record.project}, {record.stage}): {record.outputs['report']}")
    click.echo(f"run again:            labeltriage run --config {config}")
    click.echo(
        f"undo the write-back:  labeltriage rollback {final.run_id} --source {out / 'project'} --format voc"
    )
    click.echo(f"demo finished in {time.perf_counter() - start:.0f} s")
    if failed:
        raise click.ClickException(
            "; ".join(f"{r.project} run {r.run_id} failed: {r.error}" for r in failed)
        )

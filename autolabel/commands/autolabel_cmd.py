"""``labeltriage autolabel``: write labels for the calibrated easy tier (never over a human label)."""

from __future__ import annotations

import json

import click

from autolabel.commands._common import (
    label_map_from,
    label_map_option,
    model_option,
    open_inputs,
    predictions_options,
    project_options,
    sigterm_as_exit,
    storage_options_from,
    storage_options_option,
)
from connectors.errors import UsageError


@click.command("autolabel")
@project_options
@predictions_options("Predictions to write (folder or file).")
@model_option()
@click.option(
    "--difficulty",
    "difficulty_dir",
    required=True,
    help="Folder of difficulty.parquet (from `labeltriage score --out`).",
)
@click.option(
    "--epsilon", type=float, required=True, help="Target auto-label error rate, in (0, 1)."
)
@click.option(
    "--delta", type=float, required=True, help="1 − confidence of the error bound, in (0, 1)."
)
@label_map_option()
@click.option(
    "--audit-share",
    type=float,
    default=0.05,
    show_default=True,
    help="Share of auto-labels flagged for human audit.",
)
@click.option(
    "--min-count",
    type=int,
    default=30,
    show_default=True,
    help="Fewest calibration items a threshold needs to be tested.",
)
@click.option(
    "--stage",
    type=click.Choice(["report", "shadow", "autolabel"]),
    default="autolabel",
    show_default=True,
    help="Rollout stage: shadow and report write nothing to the project.",
)
@click.option(
    "--out",
    "out_dir",
    default=None,
    help="Where autolabel.json goes (default: the --difficulty folder).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the audit sample.")
@click.option("--dry-run", is_flag=True, help="Write nothing; print what would be written.")
@storage_options_option()
def autolabel(
    source: str,
    fmt: str,
    predictions: str | None,
    predictions_format: str,
    model: str | None,
    difficulty_dir: str,
    epsilon: float,
    delta: float,
    label_map: str | None,
    audit_share: float,
    min_count: int,
    stage: str,
    out_dir: str | None,
    seed: int,
    dry_run: bool,
    storage_options: str | None,
) -> None:
    """Calibrate the easy tier on labeled items (Clopper–Pearson bound ≤ EPSILON with
    confidence 1 − DELTA), cut the run's easy tier there (stages shadow and autolabel),
    then write predictions as labels for the easy unlabeled items.

    Prints a JSON summary with the verdict; DIR/autolabel.json holds the full record and
    DIR/difficulty.parquet the tiers after the gate (neither with --dry-run).  Render the
    report afterwards with `labeltriage report DIR`; undo with `labeltriage rollback RUN_ID`."""
    from autolabel.commands.rollback import rollback_command
    from autolabel.gate import GateOptions, run_autolabel
    from connectors.labelmap import LabelMap

    if (predictions is None) == (model is None):
        raise UsageError("give exactly one of --predictions and --model")
    options = storage_options_from(storage_options)
    project, source_obj = open_inputs(source, fmt, options, predictions, predictions_format)
    gate_options = GateOptions(
        epsilon=epsilon, delta=delta, stage=stage, dry_run=dry_run,
        audit_share=audit_share, min_count=min_count, seed=seed,
    )  # fmt: skip
    with sigterm_as_exit():  # a stopped process rolls its write-back back first
        result = run_autolabel(
            project,
            gate_options,
            difficulty_dir=difficulty_dir,
            predictions=source_obj,
            checkpoint=model,
            label_map=label_map_from(label_map, options) or LabelMap(),
            out_dir=out_dir,
            storage_options=options,
        )
    summary = {
        "run_id": result.run_id,
        "stage": result.stage,
        "dry_run": result.dry_run,
        "verdict": result.verdict(),
        "threshold": result.threshold,
        "box_confidence": result.box_confidence,
        "bound": result.bound,
        "epsilon": epsilon,
        "delta": delta,
        "n": result.n,
        "coverage": result.coverage,
        "selected": len(result.selected),
        "written": len(result.written),
        "with_boxes": result.labels.with_boxes,
        "empty": result.labels.empty,
        "refused": result.refused,
        "audit": result.audit,
        "precision": result.precision,
        "audit_precision": result.audit_precision.precision,
        "report": result.report_path,
    }
    if dry_run:
        summary["would_write"] = [i for i in result.selected if i not in result.refused]
    click.echo(json.dumps(summary, indent=1))
    if result.written and not dry_run:
        undo = rollback_command(result.run_id, source, fmt)
        click.echo(f"{len(result.written)} labels written; undo: {undo}", err=True)

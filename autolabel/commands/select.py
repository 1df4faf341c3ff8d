"""``labeltriage select``: the next items to label, by a query strategy."""

from __future__ import annotations

import json

import click

from autolabel.commands._common import (
    batch_size_option,
    device_option,
    model_option,
    num_workers_option,
    progress_option,
    project_options,
    storage_options_from,
    storage_options_option,
    want_progress,
)
from connectors.errors import UsageError
from difficulty.hybrid import BATCH_SELECTIONS
from difficulty.strategies import SELECT_STRATEGIES

STRATEGY_CHOICES = (*SELECT_STRATEGIES, *BATCH_SELECTIONS)


@click.command("select")
@project_options
@storage_options_option()
@click.option(
    "--strategy",
    required=True,
    help=f"Query strategy: {', '.join(SELECT_STRATEGIES)}; batch strategies for "
    f"classification models (uncertain and diverse in one batch): {', '.join(BATCH_SELECTIONS)}.",
)
@click.option(
    "--budget", type=click.IntRange(min=1), required=True, help="How many items to select."
)
@model_option("Checkpoint from labeltriage train (every strategy but random needs one).")
@click.option(
    "--subset",
    type=click.IntRange(min=1),
    default=None,
    help="Score only a random subset of this many unlabeled items (the random-subset trick).",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the subset and of random."
)
@click.option(
    "--diversity",
    type=click.Choice(["kcenter"]),
    default=None,
    help="k-center greedy on the model's features among the top candidates.",
)
@click.option(
    "--reduction",
    type=click.Choice(["max", "mean", "sum"]),
    default=None,
    help="Detection: how per-box values become one per image (default max).",
)
@click.option(
    "--empty",
    default=None,
    help="Detection: value of an image with no box: max (default), zero, or a number.",
)
@click.option(
    "--committee",
    type=click.IntRange(min=2),
    default=8,
    show_default=True,
    help="Committee members for vote/consensus entropy: the model's stored bootstrap "
    "committee when it has one (at most this many members), else this many MC-dropout passes.",
)
@batch_size_option("Items per inference batch.")
@device_option("torch device for inference (cpu, cuda, cuda:1).")
@num_workers_option("Image-decoding worker processes (0 = in the main process).")
@progress_option()
@click.option(
    "--candidate-factor",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="k-center and the batch strategies choose among the FACTOR × BUDGET highest-valued items.",
)
@click.option("--out", required=True, help="Output file, .csv or .parquet: item_id, value, rank.")
def select(
    source: str,
    fmt: str,
    storage_options: str | None,
    strategy: str,
    budget: int,
    model: str | None,
    subset: int | None,
    seed: int,
    diversity: str | None,
    reduction: str | None,
    empty: str | None,
    committee: int,
    batch_size: int,
    device: str,
    num_workers: int,
    progress: bool | None,
    candidate_factor: int,
    out: str,
) -> None:
    """Rank the unlabeled items by STRATEGY and write the BUDGET best to --out; print a JSON summary.
    Labeled items are never selected."""
    from connectors.project import open_project
    from difficulty.selection import select_from_project, write_selection

    if strategy not in STRATEGY_CHOICES:
        raise UsageError(
            f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGY_CHOICES)}"
        )
    if strategy != "random" and model is None:
        raise UsageError(
            f"strategy {strategy!r} needs a trained model: give --model CHECKPOINT (labeltriage train)"
        )
    if not (out.endswith(".csv") or out.endswith(".parquet")):
        raise UsageError(f"--out {out}: expected a .csv or .parquet file")
    settings: dict[str, object] = {}
    if reduction is not None:
        settings["reduction"] = reduction
    if empty is not None:
        try:
            settings["empty"] = float(empty)
        except ValueError:
            if empty not in ("max", "zero"):
                raise UsageError(f"--empty {empty!r}: expected max, zero or a number") from None
            settings["empty"] = empty
    options = storage_options_from(storage_options)
    project = open_project(source, fmt, options)
    task = None
    if settings:
        from difficulty.checkpoint import load_checkpoint_meta

        task = (
            load_checkpoint_meta(model, storage_options=options)["task"] if model else "detection"
        )
        if task != "detection" or strategy in ("random", "learning_loss", "predicted_loss"):
            raise UsageError(
                "--reduction and --empty apply to detection strategies that read boxes"
            )
    result = select_from_project(
        project.iter_items(),
        project,
        strategy=strategy,
        budget=budget,
        checkpoint=model,
        task=task,
        subset=subset,
        seed=seed,
        diversity=diversity,
        settings=settings,
        committee=committee,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        progress=want_progress(progress),
        storage_options=options,
        candidate_factor=candidate_factor,
    )
    write_selection(result.ranked, out, storage_options=options)
    summary = {
        "out": out,
        "strategy": strategy,
        "selected": len(result.ranked),
        "scored": result.scored,
        "unlabeled": result.pool,
        "errors": len(result.errors),
        "model_version": result.model_version,
    }
    click.echo(json.dumps(summary, indent=2))

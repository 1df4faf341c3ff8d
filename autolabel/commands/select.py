"""``labeltriage select``: the next items to label, by a query strategy."""

from __future__ import annotations

import json

import click

from connectors.errors import UsageError

STRATEGY_NAMES = (
    "random",
    "least_confidence",
    "margin",
    "entropy",
    "vote_entropy",
    "consensus_entropy",
    "egl",
    "learning_loss",
    "predicted_loss",
)


@click.command("select")
@click.option("--source", "-s", required=True, help="Project folder or file (any fsspec URL).")
@click.option(
    "--format", "-f", "fmt", default="auto", show_default=True, help="Project format, or auto."
)
@click.option("--storage-options", default=None, help="fsspec storage options as a JSON object.")
@click.option("--strategy", required=True, help=f"Query strategy: {', '.join(STRATEGY_NAMES)}.")
@click.option(
    "--budget", type=click.IntRange(min=1), required=True, help="How many items to select."
)
@click.option(
    "--model",
    default=None,
    help="Checkpoint from labeltriage train (every strategy but random needs one).",
)
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
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Items per inference batch.")
@click.option("--device", default="cpu", show_default=True, help="torch device for inference (cpu, cuda, cuda:1).")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True, help="Image-decoding worker processes (0 = in the main process).")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars (default: when stderr is a terminal).",
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
    out: str,
) -> None:
    """Rank the unlabeled items by STRATEGY and write the BUDGET best to --out; print a JSON summary.
    Labeled items are never selected."""
    import sys

    from autolabel.commands.stats import parse_storage_options
    from connectors.project import open_project
    from difficulty.selection import select_from_project, write_selection
    from difficulty.strategies import STRATEGIES

    if strategy not in (*STRATEGIES, "predicted_loss"):
        raise UsageError(
            f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGY_NAMES)}"
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
    options = parse_storage_options(storage_options)
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
        progress=sys.stderr.isatty() if progress is None else progress,
        storage_options=options,
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

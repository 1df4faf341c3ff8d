"""``labeltriage train``: train a model with a loss-prediction module on the labeled pool."""

from __future__ import annotations

import json
from typing import Any

import click

from autolabel.commands._common import (
    batch_size_option,
    device_option,
    num_workers_option,
    progress_option,
    project_options,
    storage_options_from,
    storage_options_option,
    want_progress,
)
from connectors.errors import UsageError

TASKS = ("classification", "detection")


@click.command("train")
@project_options
@storage_options_option()
@click.option("--task", type=click.Choice(TASKS), required=True, help="What the model does.")
@click.option("--out", required=True, help="Checkpoint file to write (any fsspec URL).")
@click.option(
    "--arch",
    default=None,
    help="classification: small_cnn (default), resnet18, backbone; detection: ssdlite (default), "
    "fasterrcnn_mobilenet, fasterrcnn_resnet50, fcos (light FPN + FCOS head on a pretrained "
    "backbone, trained on cached features: the default with --backbone).",
)
@click.option(
    "--backbone",
    default=None,
    metavar="NAME",
    help="Pretrained backbone of the fcos / backbone arch: efficientnet_lite0 (ImageNet weights "
    "from the 'pretrained' extra) or any torchvision classification model (resnet18, "
    "mobilenet_v3_large, …).",
)
@click.option(
    "--backbone-weights",
    default=None,
    metavar="WEIGHTS",
    help="Backbone weights: DEFAULT or a torchvision weights name (downloaded into $TORCH_HOME "
    "where the network allows), a local state_dict FILE, or none (random). Default: "
    "efficientnet_lite0's pretrained weights; random for torchvision backbones.",
)
@click.option(
    "--finetune-last-stage",
    is_flag=True,
    help="Also train the backbone's stride-32 stage (on the cached stride-16 features).",
)
@click.option(
    "--cache-memory",
    type=click.IntRange(min=0),
    default=1024,
    show_default=True,
    metavar="MIB",
    help="fcos: MiB of cached backbone features kept in memory; the rest go to a temporary folder.",
)
@click.option(
    "--classes",
    default=None,
    help="Comma-separated project classes (default: the format's, else the labels seen).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Passes over the labeled training pool.",
)
@batch_size_option("Items per training step (even sizes pair up fully for the ranking loss).")
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Learning rate (default 0.1 classification, 0.001 detection).",
)
@click.option(
    "--min-steps",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Raise the epochs until training makes at least this many steps (small pools).",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=8),
    default=None,
    help="Side images are resized to (default 32 classification, 320 detection).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of initialisation, shuffling and augmentation (runs are reproducible).",
)
@click.option(
    "--calibration-share",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of labeled items held out (by item-id hash) for calibration.",
)
@click.option(
    "--init",
    "init",
    default=None,
    help="Warm start from this checkpoint (same task, arch, classes).",
)
@click.option(
    "--target-weights",
    default=None,
    metavar="FILE",
    help="Start the target model from your own weights: a plain state_dict "
    "(torch.save(model.state_dict())) of the --arch torchvision model built for the "
    "project's classes, or a labeltriage checkpoint. Architecture guessed when --arch is not given.",
)
@click.option(
    "--freeze-target",
    is_flag=True,
    help="Train only the loss-prediction module on the --init or --target-weights model, "
    "whose weights stay unchanged.",
)
@click.option(
    "--margin",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Ranking margin ξ.",
)
@click.option(
    "--loss-weight",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Weight λ of the ranking loss.",
)
@click.option(
    "--stop-grad-share",
    type=click.FloatRange(0.0, 1.0),
    default=0.6,
    show_default=True,
    help="Share of epochs after which the module's gradient stops at the backbone.",
)
@click.option(
    "--committee-kind",
    type=click.Choice(["dropout", "bootstrap"]),
    default="dropout",
    show_default=True,
    help="Committee for vote/consensus entropy: MC dropout at inference, or (classification) "
    "members trained on bootstrap resamples and stored in the checkpoint.",
)
@click.option(
    "--committee-size",
    type=click.IntRange(min=2),
    default=5,
    show_default=True,
    help="Bootstrap committee: number of members.",
)
@click.option(
    "--committee-epochs",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Bootstrap committee: epochs of each member, warm-started from the trained model.",
)
@click.option(
    "--augment/--no-augment",
    default=None,
    help="Random horizontal flips (fcos: of the cached feature maps). Default: on for fcos, "
    "off otherwise.",
)
@device_option("torch device (cpu, cuda, cuda:1).")
@num_workers_option("DataLoader worker processes.")
@progress_option()
def train(
    source: str,
    fmt: str,
    storage_options: str | None,
    task: str,
    out: str,
    arch: str | None,
    backbone: str | None,
    backbone_weights: str | None,
    finetune_last_stage: bool,
    cache_memory: int,
    classes: str | None,
    epochs: int,
    batch_size: int,
    lr: float | None,
    min_steps: int,
    image_size: int | None,
    seed: int,
    calibration_share: float,
    init: str | None,
    target_weights: str | None,
    freeze_target: bool,
    margin: float,
    loss_weight: float,
    stop_grad_share: float,
    committee_kind: str,
    committee_size: int,
    committee_epochs: int,
    augment: bool | None,
    device: str,
    num_workers: int,
    progress: bool | None,
) -> None:
    """Train a target model jointly with a loss-prediction module (Yoo & Kweon 2019) on the
    human-labeled items; print a JSON summary."""
    from connectors.project import open_project
    from difficulty.models.lossnet import LossNetConfig
    from difficulty.training import TrainOptions, train_model

    if freeze_target and init is None and target_weights is None:
        raise UsageError(
            "--freeze-target needs the frozen model: --init CHECKPOINT or --target-weights FILE"
        )
    if init is not None and target_weights is not None:
        raise UsageError("give either --init or --target-weights, not both")
    options = storage_options_from(storage_options)
    project = open_project(source, fmt, options)
    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if class_list is None and callable(getattr(project, "classes", None)):
        class_list = list(project.classes())  # type: ignore[attr-defined]
    train_options = TrainOptions(
        task=task, arch=arch, classes=class_list, epochs=epochs, batch_size=batch_size, lr=lr,
        seed=seed, calibration_share=calibration_share, target_weights=target_weights,
        freeze_target=freeze_target, device=device, image_size=image_size,
        min_steps=min_steps, num_workers=num_workers, augment=augment,
        lossnet=LossNetConfig(margin=margin, weight=loss_weight, stop_grad_share=stop_grad_share),
        committee_kind=committee_kind, committee_size=committee_size,
        committee_epochs=committee_epochs, backbone=backbone, backbone_weights=backbone_weights,
        finetune_last_stage=finetune_last_stage, cache_memory_bytes=cache_memory << 20,
    )  # fmt: skip
    ckpt = train_model(
        project.iter_items(),
        project,
        train_options,
        out=out,
        init=init,
        progress=want_progress(progress),
        storage_options=options,
    )
    click.echo(json.dumps(training_summary(ckpt.meta, out), indent=2))


def training_summary(meta: dict[str, Any], out: str) -> dict[str, Any]:
    """What `labeltriage train` prints about the checkpoint it wrote to ``out``."""
    history = meta["training"]["history"]
    summary = {
        "checkpoint": out,
        "version": meta["version"],
        "task": meta["task"],
        "arch": meta["arch"],
        "classes": meta["classes"],
        "trained_items": meta["training"]["items"],
        "calibration_items": meta["calibration"]["count"],
        "skipped_items": len(meta["training"]["skipped_items"]),
        "epochs": meta["training"]["epochs"],
        "final_target_loss": history[-1]["target_loss"] if history else None,
        "final_ranking_loss": history[-1]["ranking_loss"] if history else None,
        "committee": meta.get("committee", {"kind": "dropout"}),
    }
    if meta.get("backbone"):
        summary["backbone"] = meta["backbone"]
    for key in ("feature_seconds", "fit_seconds", "feature_cache"):
        if key in meta["training"]:
            summary[key] = meta["training"][key]
    return summary

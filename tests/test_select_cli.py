"""``labeltriage train`` and ``labeltriage select`` on a classification and a detection project."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _cli_helpers import select_args, train_args, write_digits_folder

from autolabel.cli import main
from difficulty.hybrid import BATCH_SELECTIONS
from difficulty.strategies import SELECT_STRATEGIES


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    main(args)
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def digits_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imagefolder project: 3 digit classes, 45 labeled and 30 unlabeled 16×16 images."""
    return write_digits_folder(tmp_path_factory.mktemp("digits"), 75, 45)


@pytest.fixture(scope="module")
def digits_model(digits_project: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("ckpt") / "cls.pt")
    main(
        train_args(
            digits_project,
            "imagefolder",
            "classification",
            out,
            *("--epochs", "3", "--batch-size", "16", "--image-size", "16", "--lr", "0.05"),
            "--no-progress",
        )
    )
    return out


@pytest.mark.parametrize("strategy", SELECT_STRATEGIES)
def test_select_every_strategy_on_a_classification_project(
    strategy: str, digits_project: Path, digits_model: str, tmp_path: Path, capsys
) -> None:
    capsys.readouterr()
    out = tmp_path / "picked.csv"
    summary = _run(
        select_args(
            digits_project,
            "imagefolder",
            strategy,
            5,
            out,
            *("--model", digits_model, "--committee", "4"),
        ),
        capsys,
    )
    assert summary["selected"] == 5 and summary["unlabeled"] == 30
    table = pd.read_csv(out, dtype={"item_id": str})
    assert list(table.columns) == ["item_id", "value", "rank"]
    assert list(table["rank"]) == [1, 2, 3, 4, 5]
    assert all(i.startswith("_unlabeled/") for i in table["item_id"])  # never a labeled item
    assert np.all(np.isfinite(table["value"])) and list(table["value"]) == sorted(
        table["value"], reverse=True
    )


@pytest.mark.parametrize("strategy", BATCH_SELECTIONS)
def test_select_batch_strategies_on_a_classification_project(
    strategy: str, digits_project: Path, digits_model: str, tmp_path: Path, capsys
) -> None:
    capsys.readouterr()
    out = tmp_path / "picked.csv"
    summary = _run(
        select_args(
            digits_project,
            "imagefolder",
            strategy,
            6,
            out,
            *("--model", digits_model, "--candidate-factor", "2"),
        ),
        capsys,
    )
    table = pd.read_csv(out, dtype={"item_id": str})
    assert summary["selected"] == 6 and len(set(table["item_id"])) == 6
    assert all(i.startswith("_unlabeled/") for i in table["item_id"])  # never a labeled item
    assert np.all(np.isfinite(table["value"]))
    # learning_loss_subset scores a seeded random half of the pool, the others all of it
    assert summary["scored"] == (15 if strategy == "learning_loss_subset" else 30)


def test_batch_strategy_refused_on_a_detection_model(tmp_path: Path) -> None:
    from connectors.errors import UsageError
    from difficulty.selection import select_from_project

    with pytest.raises(UsageError, match="classification model"):
        select_from_project([], tmp_path, strategy="margin_kcenter", budget=2, task="detection")


def test_select_subset_diversity_and_parquet(
    digits_project: Path, digits_model: str, tmp_path: Path, capsys
) -> None:
    capsys.readouterr()
    out = tmp_path / "picked.parquet"
    args = select_args(
        digits_project,
        "imagefolder",
        "entropy",
        4,
        out,
        *("--model", digits_model, "--subset", "10", "--seed", "3", "--diversity", "kcenter"),
    )
    summary = _run(args, capsys)
    assert summary["scored"] == 10 and summary["selected"] == 4
    first = pd.read_parquet(out)
    assert len(set(first["item_id"])) == 4
    _run(args, capsys)
    pd.testing.assert_frame_equal(first, pd.read_parquet(out))  # seeded


def test_select_without_model_is_a_usage_error_except_for_random(
    digits_project: Path, tmp_path: Path, capsys
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(select_args(digits_project, "imagefolder", "entropy", 3, tmp_path / "x.csv"))
    assert exc.value.code == 2
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(select_args(digits_project, "imagefolder", "entropie", 3, tmp_path / "x.csv"))
    assert exc.value.code == 2
    summary = _run(
        select_args(digits_project, "imagefolder", "random", 3, tmp_path / "r.csv"), capsys
    )
    assert summary["selected"] == 3


def test_train_warm_start_records_its_init(
    digits_project: Path, digits_model: str, tmp_path: Path, capsys
) -> None:
    capsys.readouterr()
    out = str(tmp_path / "warm.pt")
    summary = _run(
        train_args(
            digits_project,
            "imagefolder",
            "classification",
            out,
            *("--epochs", "1", "--init", digits_model, "--no-progress"),
        ),
        capsys,
    )
    from difficulty.checkpoint import load_checkpoint

    meta = load_checkpoint(out).meta
    assert meta["training"]["init"] == load_checkpoint(digits_model).version
    assert summary["calibration_items"] == len(meta["calibration_ids"])


@pytest.fixture(scope="module")
def sign_project(road_signs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six road_signs images in VOC: four labeled, two without annotation (unlabeled)."""
    root = tmp_path_factory.mktemp("signs")
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    stems = sorted(p.stem for p in (road_signs / "annotations").glob("*.xml"))[:6]
    for k, s in enumerate(stems):
        (root / "images" / f"{s}.jpg").write_bytes(
            (road_signs / "images" / f"{s}.jpg").read_bytes()
        )
        if k < 4:
            (root / "annotations" / f"{s}.xml").write_bytes(
                (road_signs / "annotations" / f"{s}.xml").read_bytes()
            )
    return root


@pytest.fixture(scope="module")
def sign_model(sign_project: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("det") / "det.pt")
    main(
        train_args(
            sign_project,
            "voc",
            "detection",
            out,
            *("--epochs", "1", "--batch-size", "4", "--image-size", "160"),
            *("--calibration-share", "0", "--classes", "crosswalk,speedlimit,stop,trafficlight"),
            "--no-progress",
        )
    )
    return out


@pytest.mark.parametrize("strategy", SELECT_STRATEGIES)
def test_select_every_strategy_on_a_detection_project(
    strategy: str, sign_project: Path, sign_model: str, tmp_path: Path, capsys
) -> None:
    capsys.readouterr()
    out = tmp_path / "picked.csv"
    summary = _run(
        select_args(
            sign_project, "voc", strategy, 2, out, *("--model", sign_model, "--committee", "3")
        ),
        capsys,
    )
    assert summary["unlabeled"] == 2 and summary["selected"] == 2
    table = pd.read_csv(out, dtype={"item_id": str})
    labeled = {p.stem for p in (sign_project / "annotations").glob("*.xml")}
    assert not set(table["item_id"]) & labeled
    assert np.all(np.isfinite(table["value"]))


def test_detection_reduction_and_empty_options(
    sign_project: Path, sign_model: str, tmp_path: Path, capsys
) -> None:
    capsys.readouterr()
    for reduction in ("mean", "sum"):
        _run(
            select_args(
                sign_project,
                "voc",
                "entropy",
                2,
                tmp_path / f"{reduction}.csv",
                *("--model", sign_model, "--reduction", reduction, "--empty", "zero"),
            ),
            capsys,
        )
    mean, total = pd.read_csv(tmp_path / "mean.csv"), pd.read_csv(tmp_path / "sum.csv")
    assert total["value"].max() >= mean["value"].max()
    with pytest.raises(SystemExit) as exc:
        main(
            select_args(
                sign_project,
                "voc",
                "entropy",
                2,
                tmp_path / "x.csv",
                *("--model", sign_model, "--empty", "lots"),
            )
        )
    assert exc.value.code == 2

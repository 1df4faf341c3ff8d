"""The Dask engine gives the local engine's results (library, ``labeltriage score --engine dask``
and a configured run), loads a model once per worker, binds 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

pytest.importorskip("distributed")

from click.testing import CliRunner

from autolabel.cli import cli
from autolabel.config import parse_config
from autolabel.engine_dask import DaskEngine, score_project_with_engine
from autolabel.pipeline import run_project
from connectors.errors import UsageError
from connectors.project import open_project
from difficulty.checkpoint import save_checkpoint
from difficulty.models.build import model_from_meta

CLASSES = ("blobs", "stripes")


def _image(rng: np.random.Generator, kind: str, size: tuple[int, int]) -> Image.Image:
    h, w = size
    if kind == "stripes":
        freq = rng.uniform(2, 12)
        x = np.sin(np.linspace(0, freq * np.pi, w))[None, :] * np.ones((h, 1))
    else:
        x = rng.normal(size=(h // 8 + 1, w // 8 + 1)).repeat(8, 0).repeat(8, 1)[:h, :w]
    x = (x - x.min()) / (np.ptp(x) + 1e-9)
    rgb = np.stack([x, x * 0.8, 1 - x], axis=-1) * 255
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image-folder project: 2 classes × 6 labeled images, 9 unlabeled, 1 corrupt."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(7)
    for cls in CLASSES:
        (root / cls).mkdir()
        for i in range(6):
            _image(rng, cls, (40 + 4 * i, 48)).save(root / cls / f"{cls}{i}.png")
    (root / "_unlabeled").mkdir()
    for i in range(9):
        _image(rng, CLASSES[i % 2], (36, 36 + 2 * i)).save(root / "_unlabeled" / f"u{i}.png")
    (root / "_unlabeled" / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    meta = {
        "task": "classification",
        "arch": "small_cnn",
        "classes": list(CLASSES),
        "model": {"in_channels": 3, "image_size": 32, "width": 8, "dropout": 0.2},
        "version": "small_cnn-test",
        "model_version": "small_cnn-test",
    }
    torch.manual_seed(0)
    model = model_from_meta(meta)
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pt")
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="module")
def engine() -> DaskEngine:
    with DaskEngine(n_workers=2) as e:
        yield e


def _score(project_dir: Path, out: Path, **kwargs: object) -> tuple[pd.DataFrame, dict]:
    project = open_project(str(project_dir), "imagefolder")
    result = score_project_with_engine(
        project, out_dir=str(out), run_id="same-run", chunk_size=5, num_workers=0, **kwargs
    )
    return result.table, result.meta


def _same(local: tuple[pd.DataFrame, dict], dask: tuple[pd.DataFrame, dict]) -> None:
    # Pillow's message names the in-memory buffer by its address, which differs per process.
    def normal(df: pd.DataFrame) -> pd.DataFrame:
        return df.assign(error=df["error"].str.replace(r"0x[0-9a-f]+", "0x?", regex=True))

    pd.testing.assert_frame_equal(normal(local[0]), normal(dask[0]))
    drop = {"created"}
    assert {k: v for k, v in local[1].items() if k not in drop} == {
        k: v for k, v in dask[1].items() if k not in drop
    }


def test_local_cluster_binds_loopback(engine: DaskEngine) -> None:
    info = engine.client.scheduler_info()
    assert info["address"].startswith("tcp://127.0.0.1:")
    assert len(info["workers"]) == 2
    assert all(addr.startswith("tcp://127.0.0.1:") for addr in info["workers"])


def test_fourier_scores_identical_to_local(
    project_dir: Path, tmp_path: Path, engine: DaskEngine
) -> None:
    local = _score(project_dir, tmp_path / "local", scorers=["fourier"])
    project = open_project(str(project_dir), "imagefolder")
    from difficulty.scoring import score_project

    result = score_project(
        project, out_dir=str(tmp_path / "dask"), run_id="same-run", chunk_size=5, num_workers=0,
        scorers=["fourier"], chunk_runner=engine.map_chunks,
    )  # fmt: skip
    _same(local, (result.table, result.meta))
    table = result.table
    assert len(table) == 22
    assert table.loc[table["item_id"].str.endswith("broken"), "error"].notna().all()
    assert table["error"].notna().sum() == 1


def test_model_scores_identical_and_model_loaded_once_per_worker(
    project_dir: Path, tmp_path: Path, checkpoint: str, engine: DaskEngine
) -> None:
    scorers = ["entropy", "margin", "fourier"]
    local = _score(project_dir, tmp_path / "local", checkpoint=checkpoint, scorers=scorers)
    project = open_project(str(project_dir), "imagefolder")
    from difficulty.scoring import score_project

    result = score_project(
        project, out_dir=str(tmp_path / "dask"), run_id="same-run", chunk_size=5, num_workers=0,
        checkpoint=checkpoint, scorers=scorers, chunk_runner=engine.map_chunks,
    )  # fmt: skip
    _same(local, (result.table, result.meta))
    assert result.table["entropy"].notna().sum() == 21
    loads = engine.checkpoint_loads()
    assert len(loads) == 2
    # 5 partitions over 2 workers: no worker loaded the model more than once
    assert all(counts.get(checkpoint, 0) <= 1 for counts in loads.values())
    assert sum(counts.get(checkpoint, 0) for counts in loads.values()) >= 1


def test_predictions_identical_to_local_inference(
    project_dir: Path, checkpoint: str, engine: DaskEngine
) -> None:
    from difficulty.inference import infer

    project = open_project(str(project_dir), "imagefolder")
    items = list(project.iter_items())
    local = {
        p.item_id: p
        for batch in infer(checkpoint, [it for it in items if not it.error], project.project)
        for p in batch.predictions or []
    }
    chunks = [items[i : i + 6] for i in range(0, len(items), 6)]
    dask = [
        p
        for part in engine.predict_chunks(chunks, project=project.project, checkpoint=checkpoint)
        for p in part
    ]
    assert {p.item_id for p in dask if p.error is None} == set(local)
    for p in dask:
        if p.error is None:
            assert p.probs == pytest.approx(local[p.item_id].probs)
            assert p.annotations == local[p.item_id].annotations
    assert [p.item_id for p in dask if p.error] == ["_unlabeled/broken"]


def test_existing_scheduler_by_address(
    project_dir: Path, tmp_path: Path, engine: DaskEngine
) -> None:
    address = engine.client.scheduler.address
    assert address.startswith("tcp://127.0.0.1:")
    local = _score(project_dir, tmp_path / "local", scorers=["fourier"])
    remote = _score(
        project_dir, tmp_path / "remote", scorers=["fourier"], engine="dask", scheduler=address
    )
    _same(local, remote)


def test_bad_engine_settings_are_usage_errors(project_dir: Path, tmp_path: Path) -> None:
    project = open_project(str(project_dir), "imagefolder")
    with pytest.raises(UsageError, match="unknown engine"):
        score_project_with_engine(project, engine="spark", out_dir=str(tmp_path))
    with pytest.raises(UsageError, match="tcp://"):
        DaskEngine(scheduler="localhost:8786")
    with pytest.raises(UsageError, match="at least 1"):
        DaskEngine(n_workers=0)


# -- the command line and the configured run ----------------------------------------------------


def _cli_score(project_dir: Path, out: Path, *extra: str) -> pd.DataFrame:
    args = ["score", "--source", str(project_dir), "--format", "imagefolder"]
    args += ["--scorers", "fourier", "--run-id", "same-run", "--num-workers", "0"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return pd.read_parquet(out / "difficulty.parquet")


def _same_scores(local: pd.DataFrame, dask: pd.DataFrame) -> None:
    columns = ["item_id", "score", "tier", "rank", "fourier"]
    assert set(columns) <= set(local.columns)
    pd.testing.assert_frame_equal(local[columns], dask[columns])
    pd.testing.assert_series_equal(local["error"].notna(), dask["error"].notna())


def test_cli_score_on_a_local_cluster_matches_the_local_engine(
    project_dir: Path, tmp_path: Path
) -> None:
    local = _cli_score(project_dir, tmp_path / "local")
    dask = _cli_score(project_dir, tmp_path / "dask", "--engine", "dask", "--workers", "1")
    _same_scores(local, dask)
    assert local["score"].notna().sum() == 21


def test_cli_score_on_a_running_scheduler(
    project_dir: Path, tmp_path: Path, engine: DaskEngine
) -> None:
    address = engine.client.scheduler.address
    local = _cli_score(project_dir, tmp_path / "local")
    dask = _cli_score(project_dir, tmp_path / "dask", "--engine", "dask", "--scheduler", address)
    _same_scores(local, dask)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler needs --engine dask"),
        (["--engine", "dask", "--scheduler", "127.0.0.1:8786"], "tcp://HOST:PORT"),
        (["--engine", "dask", "--workers", "0"], "--workers"),
    ],
)
def test_cli_engine_usage_errors_exit_2(
    project_dir: Path, tmp_path: Path, extra: list[str], words: str
) -> None:
    args = ["score", "--source", str(project_dir), "--out", str(tmp_path / "out"), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert not (tmp_path / "out").exists()


def test_configured_run_with_engine_dask_matches_a_local_run(
    project_dir: Path, tmp_path: Path, engine: DaskEngine
) -> None:
    tables = {}
    for name, settings in {
        "local": {},
        "dask": {"engine": "dask", "scheduler": engine.client.scheduler.address},
    }.items():
        project = {"source": str(project_dir), "format": "imagefolder", "scorers": ["fourier"]}
        data = {"report_store": name, "projects": {"p": {**project, "num_workers": 0, **settings}}}
        cfg = parse_config(data, base_dir=tmp_path)
        record = run_project(cfg, "p", run_id="20260101T000000000000Z-aaaaaa")
        assert record.status == "ok", record.error
        assert record.counts.get("engine") == settings.get("engine")
        tables[name] = pd.read_parquet(tmp_path / name / "p" / record.run_id / "difficulty.parquet")
    _same_scores(tables["local"], tables["dask"])


def test_engine_settings_come_from_the_config_and_the_command_line_wins(
    project_dir: Path, tmp_path: Path, engine: DaskEngine
) -> None:
    project = {"source": str(project_dir), "format": "imagefolder", "scorers": ["fourier"]}
    settings = {"engine": "dask", "scheduler": engine.client.scheduler.address}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"projects": {"p": {**project, **settings}}}))
    common = ["--config", str(config), "score", "--run-id", "same-run", "--num-workers", "0"]
    runner = CliRunner()
    before = sum(engine.client.run_on_scheduler(_tasks_seen).values())
    dask = runner.invoke(cli, [*common, "--out", str(tmp_path / "dask")])
    assert dask.exit_code == 0, dask.output
    after = sum(engine.client.run_on_scheduler(_tasks_seen).values())
    assert after > before  # the configured scheduler ran the partitions
    # --engine local on the command line drops the configured scheduler
    local = runner.invoke(cli, [*common, "--engine", "local", "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    assert sum(engine.client.run_on_scheduler(_tasks_seen).values()) == after
    _same_scores(
        pd.read_parquet(tmp_path / "local" / "difficulty.parquet"),
        pd.read_parquet(tmp_path / "dask" / "difficulty.parquet"),
    )


def _tasks_seen(dask_scheduler: Any) -> dict[str, int]:
    """Score tasks that finished on the scheduler so far, by key prefix (run on the scheduler)."""
    return {
        name: prefix.state_counts["memory"]
        for name, prefix in dask_scheduler.task_prefixes.items()
        if name.startswith("labeltriage-score")
    }

"""The Dask engine gives the local engine's results (library, ``labeltriage score --engine dask``
and a configured run), loads a model once per worker, binds 127.0.0.1."""

from __future__ import annotations

import itertools
import json
import math
import re
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
PER_CLASS, UNLABELED, BROKEN = 6, 9, 1
"""The project of :func:`project_dir`: labeled images per class, unlabeled, corrupt."""
ITEMS = len(CLASSES) * PER_CLASS + UNLABELED + BROKEN
READABLE = ITEMS - BROKEN
WORKERS = 2


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
    """An image-folder project: ``PER_CLASS`` labeled images per class, ``UNLABELED``
    unlabeled, ``BROKEN`` (one) corrupt."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(7)
    for cls in CLASSES:
        (root / cls).mkdir()
        for i in range(PER_CLASS):
            _image(rng, cls, (40 + 4 * i, 48)).save(root / cls / f"{cls}{i}.png")
    (root / "_unlabeled").mkdir()
    for i in range(UNLABELED):
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
    with DaskEngine(n_workers=WORKERS) as e:
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
    assert len(info["workers"]) == WORKERS
    assert all(addr.startswith("tcp://127.0.0.1:") for addr in info["workers"])


def test_fourier_scores_identical_to_local(
    project_dir: Path, tmp_path: Path, engine: DaskEngine
) -> None:
    local = _score(project_dir, tmp_path / "local", scorers=["fourier"])
    project = open_project(str(project_dir), "imagefolder")
    from difficulty.scoring import score_project

    result = score_project(
        project, out_dir=str(tmp_path / "dask"), run_id="same-run", chunk_size=5, num_workers=2,
        scorers=["fourier"], chunk_runner=engine.map_chunks,
    )  # fmt: skip
    _same(local, (result.table, result.meta))
    table = result.table
    assert len(table) == ITEMS
    assert table.loc[table["item_id"].str.endswith("broken"), "error"].notna().all()
    assert table["error"].notna().sum() == BROKEN


def test_model_scores_identical_and_model_loaded_once_per_worker(
    project_dir: Path, tmp_path: Path, checkpoint: str, engine: DaskEngine
) -> None:
    scorers = ["entropy", "margin", "fourier"]
    local = _score(project_dir, tmp_path / "local", checkpoint=checkpoint, scorers=scorers)
    project = open_project(str(project_dir), "imagefolder")
    from difficulty.scoring import score_project

    result = score_project(
        project, out_dir=str(tmp_path / "dask"), run_id="same-run", chunk_size=5, num_workers=2,
        checkpoint=checkpoint, scorers=scorers, chunk_runner=engine.map_chunks,
    )  # fmt: skip
    _same(local, (result.table, result.meta))
    assert result.table["entropy"].notna().sum() == READABLE
    loads = engine.checkpoint_loads()
    assert len(loads) == WORKERS
    # several partitions per worker: no worker loaded the model more than once
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
    args += ["--scorers", "fourier", "--run-id", "same-run"]  # default --num-workers
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
    assert local["score"].notna().sum() == READABLE


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
        (["--staging", "s3://b/stage"], "--staging needs --engine dask"),
        (["--partition-size", "8"], "--partition-size needs --engine dask"),
        (["--engine", "dask", "--partition-size", "0"], "--partition-size"),
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
        data = {"report_store": name, "projects": {"p": {**project, **settings}}}
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
    common = ["--config", str(config), "score", "--run-id", "same-run"]
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


# -- a cluster that spans machines: staging, sources read on the workers, failures ----------------

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample_project"
SAMPLE_PREDICTIONS = SAMPLE.parent / "sample_project_predictions" / "yolo"


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 photos of the bundled sample project (Pascal VOC) and their YOLOv5n predictions."""
    import shutil

    if not SAMPLE.is_dir():
        pytest.skip(f"bundled sample project not found at {SAMPLE}")
    root = tmp_path_factory.mktemp("voc")
    for sub in ("images", "annotations", "preds"):
        (root / sub).mkdir()
    shutil.copy(SAMPLE_PREDICTIONS / "classes.txt", root / "preds")
    for image in sorted((SAMPLE / "images").glob("*.jpg"))[:24]:
        shutil.copy(image, root / "images")
        for src, sub in ((SAMPLE / "annotations" / f"{image.stem}.xml", "annotations"),
                         (SAMPLE_PREDICTIONS / f"{image.stem}.txt", "preds")):  # fmt: skip
            if src.exists():
                shutil.copy(src, root / sub)
    return root


@pytest.fixture(scope="module")
def s3() -> Any:
    """A moto S3 server on 127.0.0.1 with a bucket; yields the storage options."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    ).create_bucket(Bucket="labeltriage")  # fmt: skip
    yield {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "use_listings_cache": False,
    }
    server.stop()


def _s3fs(options: dict[str, Any]) -> Any:
    import s3fs

    return s3fs.S3FileSystem(**options, skip_instance_cache=True)


def test_default_staging_follows_the_cluster_and_the_output() -> None:
    from autolabel.engine_dask import default_staging

    assert default_staging("s3://b/runs/r1", None) is None  # a local cluster: a temp folder
    assert (
        default_staging("s3://b/runs/r1/", "tcp://h:8786") == "s3://b/runs/r1/.labeltriage-staging"
    )
    assert (
        default_staging("runs/r1", "tcp://h:8786")
        == f"{Path('runs/r1').resolve()}/.labeltriage-staging"
    )


def test_reopenable_predictions_pickle_as_their_recipe(voc_dir: Path) -> None:
    import pickle

    from autolabel.engine_dask import Opener, ReopenablePredictions
    from connectors.project import open_predictions

    project = open_project(str(voc_dir), "voc")
    opened = open_predictions(str(voc_dir / "preds"), "yolo", project=project)
    wrapped = ReopenablePredictions(
        Opener(str(voc_dir / "preds"), "yolo"), project=Opener(str(voc_dir), "voc"), opened=opened
    )
    copy = pickle.loads(pickle.dumps(wrapped))
    assert copy._opened is None  # nothing of the opened source travels
    item = next(it for it in project.iter_items() if opened.get(it.item_id, it) is not None)
    assert copy.get(item.item_id, item) == opened.get(item.item_id, item)  # opened again here
    from difficulty.scoring import describe_predictions

    assert describe_predictions(wrapped) == describe_predictions(opened)


def test_brought_predictions_are_read_on_the_workers_not_shipped(
    voc_dir: Path, tmp_path: Path, engine: DaskEngine
) -> None:
    """Every task's only inputs are its own arguments (no scattered data); the workers open
    the predictions themselves; the table is the local engine's."""
    from autolabel.engine_dask import Opener, ReopenablePredictions
    from connectors.labelmap import LabelMap
    from connectors.project import open_predictions
    from difficulty.scoring import score_project

    label_map = LabelMap(map={"stop sign": "stop", "traffic light": "trafficlight"})
    tables = {}
    outside: list[str] = []
    for name in ("local", "dask"):
        project = open_project(str(voc_dir), "voc")
        predictions: Any = open_predictions(str(voc_dir / "preds"), "yolo", project=project)
        runner = None
        if name == "dask":
            predictions = ReopenablePredictions(
                Opener(str(voc_dir / "preds"), "yolo"),
                project=Opener(str(voc_dir), "voc"),
                opened=predictions,
            )

            def runner(chunks: Any, **kwargs: Any) -> Any:
                for i, table in enumerate(engine.map_chunks(chunks, **kwargs)):
                    if i == 1:  # mid-run: what does the scheduler hold?
                        outside.extend(engine.client.run_on_scheduler(_keys_not_ours))
                    yield table

        result = score_project(
            project, out_dir=str(tmp_path / name), predictions=predictions, label_map=label_map,
            scorers=["fourier", "box_uncertain_share", "box_least_confidence"],
            run_id="same-run", chunk_size=5, num_workers=0, chunk_runner=runner,
        )  # fmt: skip
        tables[name] = result.table
    pd.testing.assert_frame_equal(tables["local"], tables["dask"])
    assert tables["dask"]["box_uncertain_share"].notna().sum() > 10
    assert outside == []
    opened_on = engine.client.run(_opened_predictions)
    assert any(opened_on.values())


def _keys_not_ours(dask_scheduler: Any) -> list[str]:
    return [str(k) for k in dask_scheduler.tasks if not str(k).startswith("labeltriage-")]


def _opened_predictions() -> list[str]:
    from autolabel import engine_dask

    return engine_dask._PREDICTIONS.keys()


class Watched:
    """A project that calls ``note()`` when its ``at``-th item is read (mid-stream)."""

    def __init__(self, fmt: Any, at: int, note: Any) -> None:
        self.fmt, self.at, self.note = fmt, at, note
        self.project, self.name, self.tasks = fmt.project, fmt.name, fmt.tasks

    def iter_items(self) -> Any:
        for i, item in enumerate(self.fmt.iter_items()):
            if i == self.at:
                self.note()
            yield item


def test_partitions_are_staged_under_the_staging_url_and_removed(
    project_dir: Path, tmp_path: Path, engine: DaskEngine
) -> None:
    staging = tmp_path / "stage"
    seen: list[str] = []
    project = open_project(str(project_dir), "imagefolder")

    def note() -> None:
        seen.extend(str(p.relative_to(staging)) for p in staging.rglob("*.parquet"))

    with DaskEngine(scheduler=engine.client.scheduler.address, staging=str(staging)) as e:
        from difficulty.scoring import score_project

        result = score_project(
            Watched(project, 10, note), out_dir=str(tmp_path / "out"), scorers=["fourier"],  # type: ignore[arg-type]
            chunk_size=4, chunk_runner=e.map_chunks,
        )  # fmt: skip
    assert len(result.table) == ITEMS
    # when item 10 is read, the partitions of 4 items before it are staged
    assert len(seen) == 10 // 4 and all(p.startswith("score-") and "/part-0000" in p for p in seen)
    assert list(staging.rglob("*.parquet")) == []


def test_partition_size_sets_the_number_of_tasks(
    project_dir: Path, tmp_path: Path, engine: DaskEngine
) -> None:
    address = engine.client.scheduler.address
    before = sum(engine.client.run_on_scheduler(_tasks_seen).values())
    out = tmp_path / "dask"
    dask = _cli_score(
        project_dir, out, "--engine", "dask", "--scheduler", address, "--partition-size", "4"
    )
    tasks = sum(engine.client.run_on_scheduler(_tasks_seen).values()) - before
    assert tasks == math.ceil(ITEMS / 4)
    _same_scores(_cli_score(project_dir, tmp_path / "local"), dask)


def test_checkpoint_on_s3_is_read_with_the_storage_options_on_both_engines(
    project_dir: Path, checkpoint: str, s3: dict[str, Any], engine: DaskEngine
) -> None:
    _s3fs(s3).put_file(checkpoint, "labeltriage/models/model.pt")
    tables = {}
    for name, extra in {
        "local": [],
        "dask": ["--engine", "dask", "--scheduler", engine.client.scheduler.address],
    }.items():
        out = f"s3://labeltriage/runs/ckpt-{name}"
        args = ["score", "-s", str(project_dir), "-f", "imagefolder", "--model",
                "s3://labeltriage/models/model.pt", "--scorers", "entropy,fourier",
                "--storage-options", json.dumps(s3), "--run-id", "same-run", "--out", out, *extra]  # fmt: skip
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert f"wrote {out}/difficulty.parquet and {out}/summary.json" in result.output
        with _s3fs(s3).open(f"{out}/difficulty.parquet", "rb") as f:
            tables[name] = pd.read_parquet(f)
        assert not _s3fs(s3).find(f"{out}/.labeltriage-staging")
    assert tables["local"]["entropy"].notna().sum() == READABLE
    _same_scores(tables["local"], tables["dask"])


def test_default_staging_with_a_scheduler_is_under_a_remote_out(
    project_dir: Path, s3: dict[str, Any], engine: DaskEngine
) -> None:
    fs = _s3fs(s3)
    out = "s3://labeltriage/runs/staged"
    seen: list[str] = []
    project = open_project(str(project_dir), "imagefolder")

    def note() -> None:
        fs.invalidate_cache()
        seen.extend(fs.find(f"{out}/.labeltriage-staging"))

    result = score_project_with_engine(
        Watched(project, 12, note), engine="dask", scheduler=engine.client.scheduler.address, partition_size=5,  # type: ignore[arg-type]
        out_dir=out, storage_options=s3, scorers=["fourier"], run_id="same-run",
    )  # fmt: skip
    assert len(seen) == 12 // 5 and all("/part-0000" in p for p in seen)
    assert result.paths["difficulty"] == f"{out}/difficulty.parquet"
    fs.invalidate_cache()
    assert fs.find(f"{out}/.labeltriage-staging") == []


def test_a_partition_the_workers_cannot_read_fails_the_run_with_one_error_line(
    project_dir: Path, tmp_path: Path, engine: DaskEngine, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Partition 1 is never staged (as if written where the workers cannot see it)."""
    from autolabel import engine_dask

    real_write = engine_dask.write_batches

    def write_but_part_1(batches: Any, staging: Any, part: str, schema: Any) -> int:
        return (
            0 if part.endswith("part-00001.parquet") else real_write(batches, staging, part, schema)
        )

    monkeypatch.setattr(engine_dask, "write_batches", write_but_part_1)
    staging = tmp_path / "stage"
    args = ["score", "-s", str(project_dir), "-f", "imagefolder", "--scorers", "fourier",
            "--engine", "dask", "--scheduler", engine.client.scheduler.address,
            "--partition-size", "4", "--staging", str(staging), "--progress", "--out", str(tmp_path / "out")]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "cannot read the staged partition" in errors[0] and "part-00001" in errors[0]
    assert "--staging" in errors[0]
    assert "Traceback" not in result.output
    # the bar counts items of finished partitions: never the 4 of the one that failed
    counts = [int(n) for n in re.findall(r"score: (\d+)item", result.output)]
    assert counts and max(counts) <= ITEMS - 4
    assert list(staging.rglob("*.parquet")) == []
    assert not (tmp_path / "out").exists()


def test_progress_counts_the_items_of_finished_partitions(
    project_dir: Path, tmp_path: Path, engine: DaskEngine
) -> None:
    args = ["--engine", "dask", "--scheduler", engine.client.scheduler.address, "--progress"]
    args += ["--partition-size", "5"]
    result = CliRunner().invoke(
        cli,
        ["score", "-s", str(project_dir), "-f", "imagefolder", "--scorers", "fourier",
         "--out", str(tmp_path / "out"), *args],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    counts = [int(n) for n in re.findall(r"score: (\d+)item", result.output)]
    assert counts[-1] == ITEMS
    sizes = [5] * (ITEMS // 5) + ([ITEMS % 5] if ITEMS % 5 else [])
    whole = {sum(c) for r in range(len(sizes) + 1) for c in itertools.combinations(sizes, r)}
    assert set(counts) <= whole  # sums of whole partitions


def test_an_unreachable_scheduler_is_a_failed_run_fast(project_dir: Path, tmp_path: Path) -> None:
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    start = time.monotonic()
    result = CliRunner().invoke(
        cli,
        ["score", "-s", str(project_dir), "--engine", "dask", "--scheduler",
         f"tcp://127.0.0.1:{port}", "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:")
    assert len(result.output.strip().splitlines()) == 1
    assert time.monotonic() - start < 10
    assert not (tmp_path / "out").exists()


def test_config_dask_staging_and_partition_size(tmp_path: Path) -> None:
    from autolabel.config import command_defaults

    project = {"source": "s3://b/roads", "engine": "dask", "scheduler": "tcp://10.0.0.5:8786"}
    cfg = parse_config(
        {"projects": {"p": {**project, "dask_staging": "stage", "dask_partition_size": 64}}},
        base_dir=tmp_path,
    )
    assert cfg.projects["p"].dask_staging == str(tmp_path / "stage")
    score = command_defaults(cfg, None)["score"]
    assert (score["staging"], score["partition_size"]) == (str(tmp_path / "stage"), 64)
    with pytest.raises(UsageError, match="dask_partition_size"):
        parse_config({"projects": {"p": {**project, "dask_partition_size": 0}}})


# -- the per-worker cache and the worker logs ----------------------------------------------------


def _small_cnn(path: Path, seed: int) -> str:
    meta = {
        "task": "classification", "arch": "small_cnn", "classes": list(CLASSES),
        "model": {"in_channels": 3, "image_size": 32, "width": 8, "dropout": 0.2},
        "version": f"seed{seed}", "model_version": f"seed{seed}",
    }  # fmt: skip
    torch.manual_seed(seed)
    save_checkpoint(str(path), model_from_meta(meta), meta)
    return str(path)


def test_the_worker_checkpoint_cache_is_bounded_and_follows_rewrites(tmp_path: Path) -> None:
    import gc
    import weakref

    from autolabel import engine_dask

    engine_dask._CHECKPOINTS.clear()
    paths = [_small_cnn(tmp_path / f"m{i}.pt", i) for i in range(3)]
    first = engine_dask.worker_checkpoint(paths[0])
    assert engine_dask.worker_checkpoint(paths[0]) is first  # loaded once
    gone = weakref.ref(first.build_model())
    del first
    for p in paths[1:]:
        engine_dask.worker_checkpoint(p)
    assert len(engine_dask.cached_checkpoints()) == engine_dask.WORKER_CACHE_SIZE == 2
    gc.collect()
    assert gone() is None  # the dropped checkpoint's model is freed
    # a checkpoint rewritten at the same path is loaded again, not served stale
    before = engine_dask.worker_checkpoint(paths[2])
    _small_cnn(tmp_path / "m2.pt", 99)
    after = engine_dask.worker_checkpoint(paths[2])
    assert after is not before and after.version == "seed99"
    engine_dask._CHECKPOINTS.clear()


def test_labeltriage_log_lines_go_to_the_worker_logs(
    project_dir: Path, tmp_path: Path, engine: DaskEngine
) -> None:
    engine.client.run(_worker_logs_at_info)
    fresh = _small_cnn(tmp_path / "fresh.pt", 5)  # a path no worker has loaded yet
    _score(project_dir, tmp_path / "dask", engine="dask", scheduler=engine.client.scheduler.address,
           checkpoint=fresh, scorers=["entropy"])  # fmt: skip
    lines = [text for logs in engine.client.get_worker_logs().values() for _, text in logs]
    assert any(
        "autolabel.engine_dask" in t and f"worker loaded checkpoint {fresh}" in t for t in lines
    )


def _worker_logs_at_info() -> None:
    import logging

    logging.getLogger("distributed.worker").setLevel(logging.INFO)


@pytest.mark.parametrize(
    ("env", "called"),
    [
        ({"MALLOC_TRIM_THRESHOLD_": "65536"}, True),  # what a Dask nanny sets
        ({}, False),  # glibc's dynamic thresholds are left alone
        ({"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "131072"}, False),
    ],
)
def test_workers_take_large_allocations_from_the_heap_again(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], called: bool
) -> None:
    import ctypes
    import sys

    from autolabel import engine_dask

    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(sys, "platform", "linux")
    engine_dask._heap_for_large_allocations()
    assert calls == ([(-3, engine_dask.MMAP_THRESHOLD)] if called else [])

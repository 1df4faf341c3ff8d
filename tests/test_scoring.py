"""The scoring orchestrator on a small synthetic project, and on the real road_signs data."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from connectors.errors import UsageError
from connectors.formats.base import (
    LabelWrite,
    PredictionSource,
    ProjectFormat,
    WriteOutcome,
    WrittenRecord,
)
from connectors.labelmap import LabelMap
from connectors.model import Annotation, Item, ItemStatus, Prediction
from connectors.storage import ProjectFS
from difficulty.combine import spearman
from difficulty.registry import register_scorer
from difficulty.scoring import default_scorers, score_chunk, score_project
from difficulty.table import read_difficulty

REPO = Path(__file__).resolve().parents[1]
SEEN: dict[str, Any] = {}


@register_scorer(
    "test_scoring_probe", needs={"box_scores", "n"}, description="records its inputs (tests only)"
)
def _probe(box_scores: list[np.ndarray], n: int) -> np.ndarray:
    SEEN["box_scores"] = [np.asarray(b).copy() for b in box_scores]
    SEEN["n"] = n
    return np.array([float(len(b)) for b in box_scores])


def _pid(images: Any) -> np.ndarray:
    """The process that scored each image (registered only by the test that uses it)."""
    import os

    return np.full(len(images), float(os.getpid()))


@pytest.fixture
def pid_scorer(monkeypatch: pytest.MonkeyPatch) -> str:
    """An image scorer ``test_scoring_pid``, registered for one test only (an image
    scorer registered for good would join every later run's default scorers)."""
    from difficulty.registry import SCORERS, ScorerSpec

    spec = ScorerSpec("test_scoring_pid", _pid, frozenset({"images"}), "the scoring process")
    monkeypatch.setitem(SCORERS._entries, spec.name, spec)
    return spec.name


class FakeProject(ProjectFormat):
    name = "fake"

    def __init__(self, project: ProjectFS, items: list[Item]) -> None:
        super().__init__(project)
        self._items = items

    @classmethod
    def detect(cls, project: ProjectFS) -> bool:
        return False

    def iter_items(self) -> Iterator[Item]:
        yield from self._items

    def write_items(self, items: Iterable[Item], classes: list[str] | None = None) -> None:
        raise NotImplementedError

    def write_labels(self, writes: list[LabelWrite]) -> WriteOutcome:
        raise NotImplementedError

    def remove_written(self, records: list[WrittenRecord]) -> list[str]:
        raise NotImplementedError


class FakePredictions(PredictionSource):
    def __init__(self, preds: dict[str, Prediction]) -> None:
        self.preds = preds

    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        return self.preds.get(item_id)

    def __iter__(self) -> Iterator[Prediction]:
        yield from self.preds.values()


BOX = (10.0, 10.0, 30.0, 30.0)


def make_project(
    root: Path, n: int = 40, *, labeled: bool = True, corrupt: bool = True
) -> tuple[FakeProject, FakePredictions]:
    """``n`` 48×48 images of rising noise; item ``i``'s prediction is right for even ``i``,
    wrong (a missed box) for odd ``i`` — and the wrong ones have low confidence."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    items, preds = [], {}
    for i in range(n):
        noise = rng.random((48, 48)) * (i / n)
        pixels = (np.full((48, 48), 0.5) * (1 - i / n) + noise) * 255
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            root / "images" / f"im{i:03d}.png"
        )
        gt = [Annotation(label="car", box=BOX)]
        status = ItemStatus.LABELED if labeled else ItemStatus.UNLABELED
        items.append(
            Item(
                item_id=f"im{i:03d}",
                uri=f"images/im{i:03d}.png",
                width=48,
                height=48,
                status=status,
                annotations=gt if labeled else [],
                annotation_seconds=10.0 + i if labeled else None,
            )
        )
        conf = 0.9 - 0.3 * (i % 2) - 0.004 * i
        box = BOX if i % 2 == 0 else (0.0, 0.0, 5.0, 5.0)
        preds[f"im{i:03d}"] = Prediction(
            item_id=f"im{i:03d}",
            annotations=[Annotation(label="car", box=box, score=conf)],
            model_version="yolo-test",
        )
    if corrupt:
        (root / "images" / "bad.png").write_bytes(b"not an image")
        items.append(Item(item_id="bad", uri="images/bad.png", status=ItemStatus.UNLABELED))
        items.append(
            Item(
                item_id="unreadable",
                uri="images/none.png",
                error="labels/unreadable.xml: malformed XML",
            )
        )
    return FakeProject(ProjectFS(str(root)), items), FakePredictions(preds)


def test_writes_the_contract_with_error_rows(tmp_path: Path) -> None:
    project, preds = make_project(tmp_path / "p")
    out = tmp_path / "run"
    result = score_project(
        project, predictions=preds, out_dir=str(out), num_workers=0, min_labeled=10
    )
    df, meta = read_difficulty(str(out))
    assert list(df.columns[:3]) == ["item_id", "uri", "status"]
    assert meta["scorers"][0] == "fourier"
    assert {
        "box_least_confidence",
        "box_uncertain_share",
        "box_expected_count",
        "box_count",
    } <= set(meta["scorers"])
    for name in meta["scorers"]:
        assert df[name].dtype == np.float64
    bad = df.set_index("item_id").loc[["bad", "unreadable"]]
    assert (
        bad["error"].notna().all()
        and bad["score"].isna().all()
        and bad["tier"].isna().all()
        and bad["rank"].isna().all()
    )
    assert "bad.png" in bad.loc["bad", "error"]
    good = df[df["error"].isna()]
    assert good["score"].between(0, 1).all()
    assert sorted(good["rank"].tolist()) == list(range(1, len(good) + 1))
    assert {"easy", "hard"} <= set(good["tier"]) <= {"easy", "medium", "hard"}
    assert good["true_error"].notna().all()
    assert meta["model_version"] == "yolo-test"
    assert len(meta["reference"]["fourier"]) == 101
    assert meta["tiers"]["easy_max"] <= meta["tiers"]["hard_min"]
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["items"] == 42
        and summary["errors"] == 2
        and summary["run_id"] == result.meta["run_id"]
    )
    assert sum(summary["tiers"].values()) == 40


def test_labels_drive_the_weights(tmp_path: Path) -> None:
    project, preds = make_project(tmp_path / "p", corrupt=False)
    result = score_project(
        project, predictions=preds, out_dir=str(tmp_path / "run"), num_workers=0, min_labeled=10
    )
    comb = result.meta["combination"]
    assert comb["method"] in ("single", "rho", "rho2")
    assert comb["n_labeled"] == 40
    # the wrong predictions are the unconfident ones
    assert comb["correlations"]["box_least_confidence"] > 0.8
    rhos = {k: v for k, v in comb["correlations"].items() if v is not None}
    assert all(comb["weights"][k] == 0 for k, v in rhos.items() if v <= 0)
    # judged by held-out risk–coverage area: a part alone replaces the blend only with the
    # lowest held-out area of all
    assert comb["criterion"] == "aurc" and comb["cv_aurc"]
    if comb["method"] == "single":  # the scorer with the lowest held-out area alone
        singles = {k: v for k, v in comb["cv_aurc"].items() if k.startswith("single:")}
        chosen = max(comb["weights"], key=lambda k: comb["weights"][k])
        assert singles[f"single:{chosen}"] == min(singles.values())
    assert _aurc(result.table, "score") <= min(_aurc(result.table, k) for k in rhos) + 0.02
    hard = result.table[result.table["tier"] == "hard"]
    assert (
        hard["true_error"].mean()
        > result.table[result.table["tier"] == "easy"]["true_error"].mean()
    )


def test_no_labels_is_fourier_alone(tmp_path: Path) -> None:
    project, preds = make_project(tmp_path / "p", labeled=False, corrupt=False)
    result = score_project(project, predictions=preds, out_dir=str(tmp_path / "run"), num_workers=0)
    comb = result.meta["combination"]
    assert comb["method"] == "default" and comb["weights"]["fourier"] == 1.0
    assert sum(comb["weights"].values()) == 1.0
    df = result.table
    # the combined score ranks exactly as fourier
    assert spearman(df["score"].to_numpy(), df["fourier"].to_numpy()) == pytest.approx(1.0)


def test_chunks_are_pure_and_concatenate(tmp_path: Path) -> None:
    project, preds = make_project(tmp_path / "p")
    a = score_project(
        project,
        predictions=preds,
        out_dir=str(tmp_path / "a"),
        num_workers=0,
        chunk_size=7,
        run_id="a",
    )
    b = score_project(
        project,
        predictions=preds,
        out_dir=str(tmp_path / "b"),
        num_workers=0,
        chunk_size=1000,
        run_id="b",
    )
    pd.testing.assert_frame_equal(a.table.drop(columns="error"), b.table.drop(columns="error"))
    assert a.table["error"].isna().tolist() == b.table["error"].isna().tolist()
    scorers = {"fourier": {"cutoff": 0.25, "window": True, "size": 128}, "box_least_confidence": {}}
    items = list(project.iter_items())
    one = score_chunk(items, project=project.project, scorers=scorers, predictions=preds)
    two = pd.concat(
        [
            score_chunk(items[:5], project=project.project, scorers=scorers, predictions=preds),
            score_chunk(items[5:], project=project.project, scorers=scorers, predictions=preds),
        ],
        ignore_index=True,
    )
    pd.testing.assert_frame_equal(one.drop(columns="error"), two.drop(columns="error"))


def test_each_scorer_gets_exactly_its_needs(tmp_path: Path) -> None:
    project, preds = make_project(tmp_path / "p", n=6, corrupt=False)
    preds.preds.pop("im003")  # no prediction for one item
    lm = LabelMap(map={"car": "car"})
    df = score_chunk(
        list(project.iter_items()),
        project=project.project,
        scorers={"test_scoring_probe": {}},
        predictions=preds,
        label_map=lm,
    )
    assert SEEN["n"] == 5 and len(SEEN["box_scores"]) == 5
    assert all(b.shape == (1,) for b in SEEN["box_scores"])
    assert np.isnan(df.set_index("item_id").loc["im003", "test_scoring_probe"])
    assert df["error"].isna().all()
    # a label map that maps nothing away leaves every image without boxes
    score_chunk(
        list(project.iter_items()),
        project=project.project,
        scorers={"test_scoring_probe": {}},
        predictions=preds,
        label_map=LabelMap(map={"bus": "bus"}),
    )
    assert all(b.size == 0 for b in SEEN["box_scores"])


def test_reference_run_is_reused(tmp_path: Path) -> None:
    project, preds = make_project(tmp_path / "p", corrupt=False)
    first = score_project(
        project, predictions=preds, out_dir=str(tmp_path / "r1"), num_workers=0, min_labeled=10
    )
    second = score_project(
        project,
        predictions=preds,
        out_dir=str(tmp_path / "r2"),
        num_workers=0,
        reference=str(tmp_path / "r1"),
    )
    assert second.meta["combination"]["method"] == "reference"
    assert second.meta["combination"]["weights"] == first.meta["combination"]["weights"]
    assert second.meta["reference"] == first.meta["reference"]
    assert second.meta["tiers"]["easy_max"] == first.meta["tiers"]["easy_max"]
    np.testing.assert_allclose(second.table["score"], first.table["score"], atol=0.02)


def test_bad_usage(tmp_path: Path) -> None:
    project, preds = make_project(tmp_path / "p", n=3, corrupt=False)
    with pytest.raises(UsageError, match="unknown scorer"):
        score_project(
            project,
            predictions=preds,
            scorers=["fourrier"],
            out_dir=str(tmp_path / "x"),
            num_workers=0,
        )
    with pytest.raises(UsageError, match="needs box_scores"):
        score_project(project, scorers=["box_count"], out_dir=str(tmp_path / "x"), num_workers=0)
    with pytest.raises(UsageError, match="invalid setting"):
        score_project(
            project,
            predictions=preds,
            scorers=["box_uncertain_share"],
            settings={"box_uncertain_share": {"low": 0.9, "high": 0.1}},
            out_dir=str(tmp_path / "x"),
            num_workers=0,
        )


def test_defaults_follow_the_inputs() -> None:
    images_only = default_scorers(frozenset({"images", "rng", "n"}))
    assert (
        images_only[0] == "fourier"
        and "box_count" not in images_only
        and "random" not in images_only
    )
    with_boxes = default_scorers(frozenset({"images", "rng", "n", "box_scores"}))
    assert "box_least_confidence" in with_boxes
    import difficulty.hybrid  # noqa: F401  (registers batch-mode strategies)

    model = default_scorers(
        frozenset({"images", "rng", "n", "probs", "features", "predicted_loss"})
    )
    assert {"entropy", "egl", "predicted_loss"} <= set(model)
    assert not {"badge", "margin_kcenter", "learning_loss", "random"} & set(model)


def test_road_signs_real_predictions(road_signs: Path, tmp_path: Path) -> None:
    from connectors.formats.voc import VocFormat
    from connectors.formats.yolo import YoloPredictions

    fmt = VocFormat(ProjectFS(str(road_signs)))
    preds = YoloPredictions(ProjectFS(str(road_signs / "predictions" / "yolo")), project=fmt)
    lm = LabelMap(map={"stop sign": "stop", "traffic light": "trafficlight", "car": "speedlimit"})
    result = score_project(
        fmt, predictions=preds, label_map=lm, out_dir=str(tmp_path / "run"), num_workers=0
    )
    comb = result.meta["combination"]
    assert result.summary["items"] == 700 and result.summary["errors"] == 0
    assert comb["n_labeled"] == 700
    scorers = [k for k, v in comb["correlations"].items() if v is not None]
    assert _aurc(result.table, "score") <= min(_aurc(result.table, k) for k in scorers) + 0.01


def test_cli_score_then_report_on_kitti(
    kitti_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from autolabel.cli import main

    label_map = tmp_path / "map.yaml"
    label_map.write_text(
        "map: {car: Car, person: Pedestrian, bicycle: Cyclist}\nignore: [DontCare]\n"
    )
    out = tmp_path / "store" / "kitti" / "run1"
    main([
        "score", "--source", str(kitti_tiny), "--format", "kitti",
        "--predictions", str(kitti_tiny / "predictions" / "yolo"), "--predictions-format", "yolo",
        "--label-map", str(label_map), "--scorers", "fourier,box_least_confidence,box_count",
        "--num-workers", "0", "--no-progress", "--out", str(out),
    ])  # fmt: skip
    assert "scored 75 of 75 items" in capsys.readouterr().out
    df, meta = read_difficulty(str(out))
    assert meta["scorers"] == ["fourier", "box_least_confidence", "box_count"]
    assert meta["settings"]["label_map"]["ignore"] == ["DontCare"]
    assert df["true_error"].notna().sum() == 75
    main(["report", str(out), "--team-size", "2", "--hours-per-day", "7.5"])
    assert (out / "report.html").exists() and (out / "plan.csv").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan"]["team_size"] == 2 and summary["plan"]["hours_per_day"] == 7.5


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    from autolabel.cli import main

    make_project(tmp_path / "p", n=2, corrupt=False)
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "score",
                "--source",
                str(tmp_path / "p"),
                "--format",
                "voc",
                "--scorers",
                "nope",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "score",
                "--source",
                str(tmp_path / "p"),
                "--easy",
                "0.9",
                "--hard",
                "0.1",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "missing")])
    assert exc.value.code == 1


def test_model_checkpoint_feeds_model_scorers(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    from connectors.project import open_project
    from difficulty.training import train_model

    x, y = load_digits(return_X_y=True)
    for i in range(60):
        folder = tmp_path / "proj" / f"c{int(y[i]) % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i].reshape(8, 8) * 16).astype(np.uint8)).resize((16, 16)).save(
            folder / f"{i}.png"
        )
    fmt = open_project(str(tmp_path / "proj"), "imagefolder")
    train_model(
        list(fmt.iter_items()),
        fmt,
        task="classification",
        epochs=1,
        out=str(tmp_path / "m.pt"),
        min_steps=2,
    )
    result = score_project(
        fmt,
        checkpoint=str(tmp_path / "m.pt"),
        out_dir=str(tmp_path / "run"),
        num_workers=0,
        min_labeled=10,
    )
    names = set(result.meta["scorers"])
    assert {
        "fourier",
        "entropy",
        "margin",
        "least_confidence",
        "predicted_loss",
        "egl",
        "vote_entropy",
    } <= names
    assert "random" not in names and "learning_loss" not in names  # baseline and alias left out
    assert result.meta["model_version"] == str(tmp_path / "m.pt")
    assert result.table["true_error"].notna().sum() == 60
    assert result.table[list(names)].notna().all().all()


def _aurc(table: pd.DataFrame, column: str) -> float:
    """In-sample risk–coverage area of ``column`` against the true error (lower is better)."""
    from difficulty.combine import risk_coverage_area

    return risk_coverage_area(
        table[column].to_numpy(dtype=float, na_value=np.nan),
        table["true_error"].to_numpy(dtype=float, na_value=np.nan),
    )


# -- one image stream per run, streamed output ------------------------------------------------


def _normal(df: pd.DataFrame) -> pd.DataFrame:
    """Pillow names the in-memory buffer of an unreadable image by its address."""
    return df.assign(error=df["error"].str.replace(r"0x[0-9a-f]+", "0x?", regex=True))


def test_one_set_of_workers_scores_the_whole_project(tmp_path: Path, pid_scorer: str) -> None:
    """Image scorers run in the decoding workers, started once for all chunks."""
    import os

    project, _ = make_project(tmp_path / "p", n=40, corrupt=False)
    result = score_project(
        project,
        scorers=[pid_scorer, "fourier"],
        out_dir=str(tmp_path / "run"),
        num_workers=2,
        batch_size=2,
        chunk_size=4,  # ten chunks
    )
    pids = set(result.table[pid_scorer].astype(int))
    assert len(pids) == 2 and os.getpid() not in pids


def test_workers_chunks_and_batches_do_not_change_the_table(tmp_path: Path) -> None:
    project, preds = make_project(tmp_path / "p")
    scorers = ["fourier", "fourier_entropy", "box_least_confidence"]
    runs = [
        score_project(
            project,
            predictions=preds,
            scorers=scorers,
            out_dir=str(tmp_path / f"r{i}"),
            run_id="same",
            min_labeled=10,
            **kwargs,
        )
        for i, kwargs in enumerate(
            [
                {"num_workers": 0},
                {"num_workers": 2, "batch_size": 3, "chunk_size": 5},
                {"num_workers": 1, "batch_size": 64, "chunk_size": 1000},
            ]
        )
    ]
    for other in runs[1:]:
        pd.testing.assert_frame_equal(_normal(runs[0].table), _normal(other.table))
        assert {k: v for k, v in runs[0].meta.items() if k != "created"} == {
            k: v for k, v in other.meta.items() if k != "created"
        }


def test_items_given_by_the_run_are_scored_instead_of_read(tmp_path: Path) -> None:
    project, preds = make_project(tmp_path / "p", corrupt=False)
    items = list(project.iter_items())[:10]
    project._items = []  # the project is not read again
    result = score_project(
        project, items=iter(items), predictions=preds, out_dir=str(tmp_path / "r"), num_workers=0
    )
    assert result.table["item_id"].tolist() == [it.item_id for it in items]


def test_table_is_written_in_row_groups_and_read_back_lazily(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    import difficulty.scoring as scoring

    project, preds = make_project(tmp_path / "p")
    whole = score_project(
        project, predictions=preds, out_dir=str(tmp_path / "a"), num_workers=0, run_id="x"
    )
    monkeypatch.setattr(scoring, "ROW_GROUP_ROWS", 8)
    parts = score_project(
        project, predictions=preds, out_dir=str(tmp_path / "b"), num_workers=0, run_id="x"
    )
    assert parts._table is None  # nothing read back until asked
    assert pq.ParquetFile(tmp_path / "b" / "difficulty.parquet").num_row_groups == 6  # 42 rows
    pd.testing.assert_frame_equal(_normal(whole.table), _normal(parts.table))
    assert {k: v for k, v in whole.summary.items() if k not in ("error_items", "created")} == {
        k: v for k, v in parts.summary.items() if k not in ("error_items", "created")
    }
    first = read_difficulty(str(tmp_path / "a"))
    assert first[0].equals(whole.table)


def test_the_scoring_process_does_not_load_torch(tmp_path: Path) -> None:
    """Decoding workers import torch themselves; the process that reads items and combines
    scores stays small (torch alone is about half a gigabyte resident)."""
    import subprocess
    import sys

    make_project(tmp_path / "p", n=12, corrupt=False)
    script = f"""
import sys
from connectors.project import open_project
from difficulty.scoring import score_project
project = open_project({str(tmp_path / "p")!r}, "imagefolder")
result = score_project(
    project, out_dir={str(tmp_path / "run")!r}, num_workers=2, batch_size=4,
    scorers=["fourier", "fourier_entropy"],
)
print(result.summary["scored"], "torch" in sys.modules)
"""
    (tmp_path / "p" / "images").rename(tmp_path / "p" / "_unlabeled")
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.split() == ["12", "False"], out.stderr
    # workers from the fork server compute what this process computes itself
    from connectors.project import open_project

    here = score_project(
        open_project(str(tmp_path / "p"), "imagefolder"),
        out_dir=str(tmp_path / "here"),
        num_workers=0,
        scorers=["fourier", "fourier_entropy"],
    )
    there, _ = read_difficulty(str(tmp_path / "run"))
    pd.testing.assert_frame_equal(here.table, there)


def test_objects_are_frozen_while_a_run_streams_and_unfrozen_after() -> None:
    import gc

    from difficulty.scoring import _long_lived_frozen

    assert gc.get_freeze_count() == 0
    with _long_lived_frozen():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with _long_lived_frozen():  # a caller's freeze stands
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        with _long_lived_frozen():
            pass
        assert gc.get_freeze_count() > 0  # not unfrozen: it was not ours
    finally:
        gc.unfreeze()


def test_a_run_in_another_thread_leaves_the_collector_alone() -> None:
    """The collector's frozen set is the whole process's: a run in a server's thread
    neither freezes it nor unfreezes what the main thread froze."""
    import gc
    import threading

    from difficulty.scoring import _long_lived_frozen

    seen: list[int] = []

    def run() -> None:
        with _long_lived_frozen():
            seen.append(gc.get_freeze_count())

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert seen == [0] and gc.get_freeze_count() == 0

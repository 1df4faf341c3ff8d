"""``labeltriage autolabel`` and ``labeltriage rollback`` on real road_signs predictions."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autolabel.cli import main
from connectors.formats.voc import VocFormat
from connectors.labelmap import LabelMap
from connectors.model import Item, Prediction
from connectors.storage import ProjectFS
from difficulty.matching import item_correct
from difficulty.prediction_scores import box_count_variance
from difficulty.table import write_difficulty

KEEP = ("stop", "trafficlight")
LABEL_MAP = {"map": {"stop sign": "stop", "traffic light": "trafficlight"}, "ignore": []}
N_ITEMS, N_HELD_OUT = 300, 100


def _xml(
    filename: str,
    width: int,
    height: int,
    boxes: list[tuple[str, tuple[float, float, float, float]]],
) -> str:
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{b[0]:g}</xmin><ymin>{b[1]:g}</ymin><xmax>{b[2]:g}</xmax><ymax>{b[3]:g}</ymax></bndbox></object>"
        for n, b in boxes
    )
    return f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height><depth>3</depth></size>{objs}</annotation>"


def tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def road_project(road_signs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """300 road_signs images restricted to {stop, trafficlight}; 100 held out as unlabeled."""
    tmp = tmp_path_factory.mktemp("cli")
    root, preds_dir, report = tmp / "proj", tmp / "preds", tmp / "report"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    preds_dir.mkdir()
    shutil.copy(road_signs / "predictions" / "yolo" / "classes.txt", preds_dir / "classes.txt")
    source = VocFormat(ProjectFS(str(road_signs)))
    rng = np.random.default_rng(0)
    items = [i for i in source.iter_items() if i.error is None][:N_ITEMS]
    held_out = {items[j].item_id for j in rng.choice(len(items), N_HELD_OUT, replace=False)}
    truth = {}
    for item in items:
        shutil.copy(road_signs / item.uri, root / item.uri)
        shutil.copy(
            road_signs / "predictions" / "yolo" / f"{item.item_id}.txt",
            preds_dir / f"{item.item_id}.txt",
        )
        kept = item.model_copy(
            update={"annotations": [a for a in item.annotations if a.label in KEEP]}
        )
        truth[item.item_id] = kept
        if item.item_id not in held_out:
            boxes = [(a.label, a.box) for a in kept.annotations if a.box is not None]
            (root / "annotations" / f"{item.item_id}.xml").write_text(
                _xml(Path(item.uri).name, item.width or 0, item.height or 0, boxes)
            )
    # difficulty: a prediction-only score (variance of the object count) on mapped boxes
    from connectors.formats.yolo import YoloPredictions

    lm = LabelMap.model_validate(LABEL_MAP)
    preds = YoloPredictions(ProjectFS(str(preds_dir)), project=VocFormat(ProjectFS(str(root))))
    box_scores = []
    for item in items:
        p = preds.get(item.item_id, item)
        assert p is not None and p.error is None
        box_scores.append(np.array([a.score for a in lm.apply(p.annotations)], dtype=float))
    score = box_count_variance(box_scores)
    score = score / max(score.max(), 1e-9)
    df = pd.DataFrame(
        {
            "item_id": [i.item_id for i in items],
            "uri": [i.uri for i in items],
            "status": ["unlabeled" if i.item_id in held_out else "labeled" for i in items],
            "score": score,
            "tier": None,
            "rank": 1,
            "error": None,
        }
    )
    write_difficulty(df, str(report), {"scorers": []})
    (tmp / "map.json").write_text(json.dumps(LABEL_MAP))
    return {
        "root": root,
        "preds": preds_dir,
        "report": report,
        "map": tmp / "map.json",
        "truth": truth,
        "held_out": held_out,
    }


def _argv(p: dict[str, object], *extra: str) -> list[str]:
    return [
        "autolabel",
        "--source",
        str(p["root"]),
        "--format",
        "voc",
        "--predictions",
        str(p["preds"]),
        "--predictions-format",
        "yolo",
        "--difficulty",
        str(p["report"]),
        "--epsilon",
        "0.1",
        "--delta",
        "0.1",
        "--label-map",
        str(p["map"]),
        *extra,
    ]


def test_dry_run_then_write_then_rollback(
    road_project: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    root = road_project["root"]
    assert isinstance(root, Path)
    before = tree(root)

    main(_argv(road_project, "--dry-run"))
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] is True and dry["threshold"] is not None and dry["bound"] <= 0.1
    assert dry["would_write"] and set(dry["would_write"]) <= road_project["held_out"]  # type: ignore[operator]
    assert tree(root) == before

    main(_argv(road_project, "--audit-share", "0.1"))
    out = json.loads(capsys.readouterr().out)
    assert out["written"] == len(dry["would_write"]) and out["bound"] <= 0.1
    report = json.loads(Path(str(road_project["report"]), "autolabel.json").read_text())
    assert sorted(report["written"]) == sorted(dry["would_write"])
    assert set(report["audit"]) <= set(report["written"]) and len(report["audit"]) >= 1
    # human labels untouched; the written labels are mostly right against the held-out truth
    after = tree(root)
    assert {k: after[k] for k in before} == before
    lm = LabelMap()
    fmt = VocFormat(ProjectFS(str(root)))
    written = {i.item_id: i for i in fmt.iter_items() if i.item_id in set(report["written"])}
    assert all(i.status.value == "auto_labeled" for i in written.values())
    truth = road_project["truth"]
    assert isinstance(truth, dict)
    wrong = sum(not item_correct(truth[i], _as_prediction(w), lm) for i, w in written.items())
    assert wrong / len(written) <= 0.2

    main(["rollback", out["run_id"], "--source", str(root), "--format", "voc"])
    rolled = capsys.readouterr().out
    assert "rolled back" in rolled
    now = {k: v for k, v in tree(root).items() if not k.startswith(".labeltriage/runs/")}
    assert now == before


def _as_prediction(item: Item) -> Prediction:
    return Prediction(item_id=item.item_id, annotations=item.annotations)


def test_rollback_unknown_run_exits_2_and_lists_runs(
    road_project: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "rollback",
                "20990101T000000Z-000000",
                "--source",
                str(road_project["root"]),
                "--format",
                "voc",
            ]
        )
    assert exc.value.code == 2
    assert "known runs" in capsys.readouterr().err


def test_autolabel_needs_exactly_one_prediction_source(
    road_project: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        a
        for a in _argv(road_project)
        if a not in ("--predictions", str(road_project["preds"]), "--predictions-format", "yolo")
    ]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "--predictions" in capsys.readouterr().err


def test_bad_epsilon_exits_2(
    road_project: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _argv(road_project)
    argv[argv.index("--epsilon") + 1] = "1.5"
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "epsilon" in capsys.readouterr().err

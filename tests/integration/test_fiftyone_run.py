"""``labeltriage run`` on a FiftyOne dataset, end to end, as a FiftyOne user would set it up.

The dataset is built with FiftyOne's own importers from the real road-sign photos
(../shared/data/road_signs, 700 images): Pascal VOC ground truth restricted to
{stop, trafficlight} (the classes the detector knows), a quarter of the samples left
unlabeled, a tenth without metadata, and the real YOLOv5n predictions added with
``fiftyone.utils.yolo.add_yolo_labels``.  ``labeltriage run`` (the command line, in its own
process) then takes the project through its stages — report, shadow, autolabel — and
``labeltriage rollback`` undoes the write-back.  After every step the human side of the
dataset (file paths, tags, metadata, ground truth, predictions, the schema of those
fields) is compared with the snapshot taken before the first run, field by field.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.integration.fo_db import fiftyone_env, import_fiftyone

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["stop", "trafficlight"]
HUMAN_FIELDS = ("filepath", "tags", "metadata", "created_at", "ground_truth", "predictions")


@pytest.fixture(scope="module")
def fo(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return import_fiftyone(tmp_path_factory.mktemp("fo-db"))


@pytest.fixture(scope="module")
def dataset(fo: ModuleType, road_signs: Path) -> Iterator[Any]:
    import fiftyone.utils.yolo as fouy

    name = f"road-signs-{uuid.uuid4().hex[:6]}"
    ds = fo.Dataset.from_dir(
        dataset_type=fo.types.VOCDetectionDataset,
        data_path=str(road_signs / "images"),
        labels_path=str(road_signs / "annotations"),
        label_field="ground_truth",
        name=name,
        progress=False,
    )
    ds.persistent = True  # the command line runs in other processes
    try:
        keep = fo.ViewField("label").is_in(CLASSES)
        ds.filter_labels("ground_truth", keep, only_matches=False).save("ground_truth")
        names = (road_signs / "predictions" / "yolo" / "classes.txt").read_text().split("\n")
        fouy.add_yolo_labels(
            ds, "predictions", str(road_signs / "predictions" / "yolo"), [n for n in names if n]
        )
        ids = ds.values("id")
        ds.select(ids[::4]).set_values("ground_truth", [None] * len(ids[::4]))
        ds.select(ids[1::10]).set_values("metadata", [None] * len(ids[1::10]))
        ds.select(ids[:50]).tag_samples("checked-by-team")
        yield ds
    finally:
        fo.delete_dataset(name)


def human_side(ds: Any) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every sample's human fields (tags without labeltriage's), and their schema."""
    ds.reload()
    samples = {}
    for s in ds.iter_samples():
        row = {}
        for field in HUMAN_FIELDS:
            value = s[field]
            if field == "tags":
                value = sorted(t for t in value if not t.startswith("lt_"))
            elif hasattr(value, "to_dict"):
                value = value.to_dict()
            row[field] = value
        samples[s.id] = row
    schema = {
        k: str(v) for k, v in ds.get_field_schema(flat=True).items() if not k.startswith("lt_")
    }
    return samples, schema


def assert_unchanged(before: tuple[dict, dict], ds: Any, step: str) -> None:
    samples, schema = human_side(ds)
    assert schema == before[1], f"{step}: the schema of the human fields changed"
    assert samples.keys() == before[0].keys(), f"{step}: samples were added or removed"
    for sid, row in before[0].items():
        for field in HUMAN_FIELDS:
            assert samples[sid][field] == row[field], f"{step}: sample {sid} field {field} changed"


def labeltriage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "autolabel.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    )
    return proc


def run_stage(env: dict[str, str], config: Path, stage: str) -> dict[str, Any]:
    """One ``labeltriage run`` at ``stage``; returns its run record."""
    data = yaml.safe_load(config.read_text())
    data["projects"]["roads"]["stage"] = stage
    config.write_text(yaml.safe_dump(data))
    labeltriage(env, "--config", str(config), "run")
    store = config.parent / "reports" / "roads"
    latest = sorted(p for p in store.iterdir() if p.is_dir())[-1]
    record = json.loads((latest / "run.json").read_text())
    assert record["status"] == "ok", record
    assert record["stage"] == stage
    record["dir"] = latest
    return record


def test_run_report_shadow_autolabel_rollback_leaves_human_fields_unchanged(
    fo: ModuleType, dataset: Any, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        **fiftyone_env(Path(fo.config.database_dir)),
        "PYTHONPATH": str(REPO),
        "OMP_WAIT_POLICY": "PASSIVE",
        "HOME": str(tmp_path / "home"),
    }
    url = f"fiftyone://{dataset.name}"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "report_store": "reports",
                "projects": {
                    "roads": {
                        "source": url,
                        "predictions": {"source": url},
                        "label_map": {
                            "map": {"stop sign": "stop", "traffic light": "trafficlight"}
                        },
                        "stage": "report",
                        "epsilon": 0.1,
                        "delta": 0.1,
                        "audit_share": 0.1,
                        "num_workers": 0,
                    }
                },
            }
        )
    )
    before = human_side(dataset)
    n = len(dataset)
    unlabeled = n - dataset.count("ground_truth")

    # stage report: scores and tiers go back into the dataset; no label is written
    report = run_stage(env, config, "report")
    assert report["counts"]["items"] == n and report["counts"]["unlabeled"] == unlabeled
    assert report["counts"]["item_errors"] == 0 and report["counts"]["score_errors"] == 0
    dataset.reload()
    assert dataset.get_field("lt_autolabel") is None
    assert dataset.count("lt_difficulty") == n
    assert set(dataset.values("lt_score_run")) == {report["run_id"]}
    tiers = dataset.count_values("lt_tier")
    assert tiers == {k: v for k, v in report["counts"]["tiers"].items() if v}
    assert dataset.count_sample_tags() == {
        "checked-by-team": 50,
        **{f"lt_{t}": c for t, c in tiers.items()},
    }
    for scorer in report["counts"]["scorers"]:
        assert dataset.count(f"lt_{scorer}") == n
    hardest = dataset.sort_by("lt_difficulty", reverse=True).first()
    assert hardest.lt_tier == "hard" and "lt_hard" in hardest.tags
    assert (report["dir"] / "report.html").exists()
    assert_unchanged(before, dataset, "report")

    # stage shadow: what would be written is recorded, nothing is
    shadow = run_stage(env, config, "shadow")
    would = json.loads((shadow["dir"] / "autolabel.json").read_text())
    assert would["stage"] == "shadow" and would["selected"] and not would["written"]
    dataset.reload()
    assert dataset.get_field("lt_autolabel") is None
    assert_unchanged(before, dataset, "shadow")

    # stage autolabel: exactly the selected easy unlabeled samples get labels, with provenance
    auto = run_stage(env, config, "autolabel")
    outcome = json.loads((auto["dir"] / "autolabel.json").read_text())
    written = set(outcome["written"])
    assert written and outcome["manifest_stage"] == "committed" and not outcome["refused"]
    assert written == set(outcome["selected"])
    dataset.reload()
    labeled = dataset.exists("lt_autolabel")
    assert set(labeled.values("id")) == written
    assert labeled.count("ground_truth") == 0  # never on a human-labeled sample
    assert set(labeled.values("lt_autolabel.lt_run_id")) == {auto["run_id"]}
    assert set(labeled.values("lt_autolabel.lt_tier")) == {"easy"}
    # the gate writes at or below its calibrated threshold on the published difficulty
    assert max(labeled.values("lt_difficulty")) <= outcome["threshold"]
    assert labeled.values("lt_autolabel.lt_difficulty") == labeled.values("lt_difficulty")
    box_runs = {r for runs in labeled.values("lt_autolabel.detections.lt_run_id") for r in runs}
    assert box_runs <= {auto["run_id"]}
    assert set(labeled.distinct("lt_autolabel.detections.label")) <= set(CLASSES)
    assert sum(labeled.values("lt_autolabel.lt_audit")) == len(outcome["audit"])
    assert_unchanged(before, dataset, "autolabel")

    # a second autolabel run stacks nothing: the labeled samples read as auto-labeled
    again = run_stage(env, config, "autolabel")
    assert again["counts"]["auto_labeled"] == len(written)
    second = json.loads((again["dir"] / "autolabel.json").read_text())
    assert not set(second["written"]) & written
    dataset.reload()
    runs = dataset.exists("lt_autolabel").count_values("lt_autolabel.lt_run_id")
    assert runs[auto["run_id"]] == len(written)
    assert_unchanged(before, dataset, "second autolabel")

    # rollback of the first run, from the command line: exactly its labels go
    proc = labeltriage(env, "rollback", auto["run_id"], "--source", url)
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert set(result["removed"]) == written and result["kept"] == {}
    dataset.reload()
    assert dataset.get_field("lt_autolabel") is None
    assert_unchanged(before, dataset, "rollback")
    stats = json.loads(labeltriage(env, "stats", "--source", url).stdout)
    assert stats["auto_labeled"] == 0 and stats["unlabeled"] == unlabeled

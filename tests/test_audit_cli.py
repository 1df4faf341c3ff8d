"""The audit loop (``labeltriage audit``), ``labeltriage suggest-map`` and the label-map check."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from _cli_helpers import count_voc_item_reads
from click.testing import CliRunner
from test_gate import voc_xml
from test_report import _gate_project

from autolabel.cli import cli
from autolabel.gate import run_autolabel
from connectors.labelmap import LabelMap, check_label_map, suggest_label_map
from difficulty.report import write_report


@pytest.fixture()
def audited(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A VOC project after a real gate run that wrote labels with a 25 % audit sample."""
    fmt, preds, run, root = _gate_project(tmp_path)
    record = run_autolabel(
        fmt,
        difficulty_dir=str(run),
        predictions=preds,
        epsilon=0.1,
        delta=0.1,
        label_map=LabelMap(map={"stop sign": "stop"}),
        audit_share=0.25,
        run_id="20260101T000000000000Z-abcdef",
    )
    assert len(record.audit) >= 2
    return root, run, record.audit


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_audit_lists_the_sample_then_measures_what_reviewers_said(
    audited: tuple[Path, Path, list[str]],
) -> None:
    root, run, audit_ids = audited
    runner = CliRunner()
    result = runner.invoke(cli, ["audit", str(run)])
    assert result.exit_code == 0, result.output
    rows = _rows(result.stdout)
    assert [r["item_id"] for r in rows] == audit_ids
    assert {r["state"] for r in rows} == {"pending"} and {r["label"] for r in rows} == {"stop ×1"}
    assert "nothing reviewed yet" in result.stderr

    # a reviewer moves the box of the first audited item (the auto-label was wrong) and
    # confirms the second one as it is (saved again: the file is now a person's)
    wrong, right = audit_ids[0], audit_ids[1]
    (root / "annotations" / f"{wrong}.xml").write_text(voc_xml(wrong, [("stop", (8, 8, 16, 16))]))
    (root / "annotations" / f"{right}.xml").write_text(voc_xml(right, [("stop", (2, 2, 12, 12))]))
    result = runner.invoke(cli, ["audit", str(run), "--out", str(run / "audit.csv")])
    assert result.exit_code == 0, result.output
    states = {r["item_id"]: r["state"] for r in _rows((run / "audit.csv").read_text())}
    assert states[wrong] == "wrong" and states[right] == "right"
    assert {states[i] for i in audit_ids[2:]} <= {"pending"}
    assert "1 right of 2 reviewed (50.0 %)" in result.stderr
    # the run record keeps it, and the report shows it
    record = json.loads((run / "autolabel.json").read_text())
    assert record["audit_precision"]["reviewed"] == 2
    assert record["audit_precision"]["precision"] == 0.5
    write_report(str(run))
    page = (run / "report.html").read_text()
    section = page[page.index('id="autolabel"') :]
    assert "50.0 %" in section and "1 right of 2 reviewed" in section


def test_audit_without_a_gate_run_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["audit", str(tmp_path)])
    assert result.exit_code == 2 and "no autolabel.json" in result.output


def test_label_studio_view_of_the_audit_tasks() -> None:
    from autolabel.commands.audit import label_studio_view

    view = label_studio_view("http://127.0.0.1:8080/projects/7", ["12", "40"], "r9")
    assert view["project"] == 7 and view["data"]["title"] == "audit r9"
    items = view["data"]["filters"]["items"]
    assert view["data"]["filters"]["conjunction"] == "or"
    assert [(i["filter"], i["operator"], i["value"]) for i in items] == [
        ("filter:tasks:id", "equal", 12),
        ("filter:tasks:id", "equal", 40),
    ]


# -- label maps ----------------------------------------------------------------------------


def test_suggested_map_matches_class_names() -> None:
    got = suggest_label_map(
        ["stop sign", "traffic light", "car", "cars", "person", "clock"],
        ["stop", "trafficlight", "Car", "speedlimit"],
    )
    assert got == {
        "stop sign": "stop",
        "traffic light": "trafficlight",
        "car": "Car",
        "cars": "Car",
    }


def test_a_map_that_connects_nothing_is_a_warning() -> None:
    predicted = {"stop sign": 40, "traffic light": 90, "car": 300}
    project = {"stop": 30, "trafficlight": 80}
    nothing = check_label_map(predicted, project, LabelMap())
    assert nothing.mapped == {} and nothing.warning is not None
    assert "no predicted class maps to a project class" in nothing.warning
    assert '"stop sign": "stop"' in nothing.warning
    good = check_label_map(
        predicted, project, LabelMap(map={"stop sign": "stop", "traffic light": "trafficlight"})
    )
    assert good.warning is None and good.without_source == []
    stop_only = LabelMap(map={"stop sign": "stop"})
    most = check_label_map(predicted, {"stop": 30, "speedlimit": 600, "crosswalk": 150}, stop_only)
    assert most.mapped == {"stop sign": "stop"} and most.warning is not None
    assert "most project labels (750 of 780)" in most.warning and "speedlimit (600)" in most.warning


def _two_class_project(tmp_path: Path) -> tuple[Path, Path]:
    from PIL import Image

    root, preds = tmp_path / "p", tmp_path / "preds"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    preds.mkdir()
    (preds / "classes.txt").write_text("person\nstop sign\ntraffic light\n")
    for i in range(6):
        Image.new("RGB", (16, 16), (90, 20 * i, 20)).save(root / "images" / f"i{i}.jpg")
        (root / "annotations" / f"i{i}.xml").write_text(
            voc_xml(f"i{i}", [("stop" if i % 2 else "trafficlight", (2.0, 2.0, 12.0, 12.0))])
        )
        (preds / f"i{i}.txt").write_text(
            f"{1 + i % 2} 0.5 0.5 0.6 0.6 0.9\n0 0.2 0.2 0.1 0.1 0.8\n"
        )
    return root, preds


def test_suggest_map_prints_yaml_a_label_map_loads(tmp_path: Path) -> None:
    import yaml

    root, preds = _two_class_project(tmp_path)
    result = CliRunner().invoke(
        cli, ["suggest-map", "-s", str(root), "-f", "voc", "--predictions", str(preds)]
    )
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.stdout)
    assert LabelMap.model_validate(data).map == {
        "stop sign": "stop",
        "traffic light": "trafficlight",
    }
    assert "person (6)" in result.stdout  # left out, said so


def test_score_warns_about_a_map_that_maps_nothing_and_the_report_shows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check counts the scoring stream (LabelMapTally): the items are read once."""
    root, preds = _two_class_project(tmp_path)
    passes = count_voc_item_reads(monkeypatch)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        ["score", "-s", str(root), "-f", "voc", "--predictions", str(preds), "--out", str(out),
         "--num-workers", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "no predicted class maps to a project class" in result.stderr
    assert passes["items"] == 1
    check = json.loads((out / "label_map_check.json").read_text())
    assert check["predicted"] == {"person": 6, "stop sign": 3, "traffic light": 3}
    assert check["project"] == {"stop": 3, "trafficlight": 3} and check["items_seen"] == 6
    write_report(str(out))
    page = (out / "report.html").read_text()
    assert "Label map:" in page and "no predicted class maps to a project class" in page

"""``compute_stats`` and ``labeltriage stats``: one JSON object, bad items listed, exit codes."""

from __future__ import annotations

import json

import pytest
from _fileformat_helpers import make_project, png_bytes
from click.testing import CliRunner

from autolabel.cli import cli
from connectors.formats.imagefolder import ImageFolderFormat
from connectors.formats.yolo import YoloFormat, YoloPredictions
from connectors.labelmap import LabelMap
from connectors.stats import LabelMapTally, compute_stats, label_map_check


def yolo_files() -> dict[str, bytes | str]:
    return {
        "classes.txt": "cat\ndog\n",
        "images/a.png": png_bytes(),
        "images/b.png": png_bytes(),
        "images/c.png": png_bytes(),
        "images/d.png": png_bytes(),
        "labels/a.txt": "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n0 0.3 0.3 0.1 0.1\n",
        "labels/b.txt": "",
        "labels/c.txt": "0 0.5 0.5 0.2\n",
        "labels/orphan.txt": "",
    }


def test_compute_stats_counts_and_errors() -> None:
    stats = compute_stats(YoloFormat(make_project(yolo_files(), "stats")))
    assert stats["items"] == 5
    assert (stats["labeled"], stats["unlabeled"], stats["boxes"]) == (2, 1, 3)
    assert stats["classes"] == {"cat": 2, "dog": 1}
    assert "predictions" not in stats
    assert stats["errors"] == [
        {"file": "labels/c.txt:1", "item": "c", "message": "expected 5 fields, got 4"},
        {
            "file": "labels/orphan.txt",
            "item": "orphan",
            "message": "label file with no image in images/",
        },
    ]


def test_compute_stats_with_predictions_and_label_map() -> None:
    project = YoloFormat(make_project(yolo_files(), "stats-p"))
    preds_fs = make_project(
        {
            "classes.txt": "cat\ndog\n",
            "a.txt": "0 0.5 0.5 0.2 0.2 0.9\n1 0.5 0.5 0.2 0.2 0.4\n",
            "d.txt": "5 0.5 0.5 0.2 0.2 0.9\n",
        },
        "stats-preds",
    )
    preds = YoloPredictions(preds_fs, project=project)
    stats = compute_stats(project, preds)
    assert stats["predictions"] == 2 and stats["predicted_items"] == 1
    assert {
        "file": "d.txt:1",
        "item": "d",
        "message": "unknown class id 5 (2 classes are known)",
    } in stats["errors"]
    mapped = compute_stats(project, preds, label_map=LabelMap(map={"dog": "hound"}))
    assert mapped["predictions"] == 1


def test_classification_counts_items_per_class() -> None:
    fs = make_project(
        {
            "cat/1.png": png_bytes(),
            "cat/2.png": png_bytes(),
            "dog/1.png": png_bytes(),
            "_unlabeled/x.png": png_bytes(),
        },
        "stats-cls",
    )
    stats = compute_stats(ImageFolderFormat(fs))
    assert stats["classes"] == {"cat": 2, "dog": 1}
    assert (stats["items"], stats["labeled"], stats["unlabeled"], stats["boxes"]) == (4, 3, 1, 0)


def test_cli_prints_one_json_object_and_exits_0_with_bad_items() -> None:
    fs = make_project(yolo_files(), "stats-cli")
    result = CliRunner().invoke(cli, ["stats", "--source", fs.url, "--format", "yolo"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["items"] == 5 and len(stats["errors"]) == 2


def test_cli_auto_format_with_predictions() -> None:
    fs = make_project(yolo_files(), "stats-cli-auto")
    preds = make_project(
        {"classes.txt": "cat\ndog\n", "b.txt": "1 0.5 0.5 0.2 0.2 0.9\n"}, "stats-cli-preds"
    )
    result = CliRunner().invoke(
        cli,
        ["stats", "--source", fs.url, "--predictions", preds.url, "--predictions-format", "yolo"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["predictions"] == 1


def test_cli_usage_errors_exit_2_with_one_line() -> None:
    fs = make_project(yolo_files(), "stats-cli-bad")
    runner = CliRunner()
    for args, expected in (
        (["stats", "--source", fs.url, "--format", "yoloo"], "unknown format 'yoloo'"),
        (
            ["stats", "--source", fs.url, "--storage-options", "{bad"],
            "--storage-options is not valid JSON",
        ),
        (["stats", "--source", fs.url, "--storage-options", "[1]"], "must be a JSON object"),
        (["stats", "--source", fs.url + "/missing"], "no such file or folder"),
        (["stats"], "Missing option '--source'"),
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.stderr
        assert result.stdout == ""


def _tally_inputs(tag: str) -> tuple[YoloFormat, YoloPredictions]:
    files = yolo_files()
    files["labels/d.txt"] = "1 0.5 0.5 0.2 0.2\n"
    project = YoloFormat(make_project(files, tag))
    preds_fs = make_project(
        {
            "classes.txt": "cat\ndog\n",
            "a.txt": "0 0.5 0.5 0.2 0.2 0.9\n1 0.5 0.5 0.2 0.2 0.4\n",
            "b.txt": "1 0.5 0.5 0.2 0.2 0.3\n",
            "d.txt": "1 0.5 0.5 0.2 0.2 0.9\n",
        },
        f"{tag}-preds",
    )
    return project, YoloPredictions(preds_fs, project=project)


@pytest.mark.parametrize("limit", [None, 1, 2, 3, 10])
@pytest.mark.parametrize("looked_up", ["all", "none", "every other"])
def test_a_tally_on_the_run_stream_checks_as_label_map_check(
    limit: int | None, looked_up: str
) -> None:
    """The counts come from the run's own stream and look-ups; predictions the run did not
    look up (another process did) are looked up at the end; the result is the same."""
    project, preds = _tally_inputs(f"tally-{limit}-{looked_up.replace(' ', '')}")
    label_map = LabelMap(map={"dog": "cat"})
    expected = label_map_check(project, preds, label_map, limit=limit)
    tally = LabelMapTally(preds, limit=limit)
    read = 0
    for n, item in enumerate(tally.items(project.iter_items())):
        read += 1
        if item.error is None and (looked_up == "all" or (looked_up == "every other" and n % 2)):
            tally.predictions.get(item.item_id, item)
            tally.predictions.get(item.item_id, item)  # a second look-up is not counted again
    assert read == 5  # the whole stream passes, whatever the limit
    got = tally.check(label_map)
    assert got == expected and got.items_seen == min(limit or 5, 5)
    assert not tally.waiting

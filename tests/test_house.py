"""House rules that keep the library readable and a run cheap.

* no function of the library (``connectors``, ``difficulty``, ``autolabel``) is longer than
  100 lines;
* ``labeltriage run`` makes one pass over the project's items and renders the report once.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from _cli_helpers import count_voc_item_reads
from click.testing import CliRunner
from test_pipeline import tiny_voc  # noqa: F401  (a fixture)
from test_pipeline_gate_report import _predictions

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ("connectors", "difficulty", "autolabel")
MAX_LINES = 100


def long_functions(root: Path = REPO, max_lines: int = MAX_LINES) -> list[str]:
    """``path:line name (n lines)`` of every function of the library longer than ``max_lines``."""
    found = []
    for package in LIBRARY:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > max_lines:
                        rel = path.relative_to(root)
                        found.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_library_function_is_over_100_lines() -> None:
    assert long_functions() == []


def test_the_length_check_finds_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "difficulty").mkdir()
    (tmp_path / "difficulty" / "long.py").write_text(f"def long():\n{body}\n")
    (tmp_path / "difficulty" / "short.py").write_text("def short():\n    return 1\n")
    assert long_functions(tmp_path) == ["difficulty/long.py:1 long (101 lines)"]


def _config(tmp_path: Path, project: Path, **settings: Any) -> Path:
    """A config of the tiny VOC project with right predictions, scored with fourier."""
    import yaml

    tiny = {
        "source": str(project),
        "format": "voc",
        "scorers": ["fourier"],
        "predictions": {"source": str(_predictions(tmp_path, project)), "format": "yolo"},
        "label_map": {"map": {"stop sign": "stop", "traffic light": "trafficlight"}},
        **settings,
    }
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump({"report_store": str(tmp_path / "reports"), "projects": {"tiny": tiny}})
    )
    return path


@pytest.mark.parametrize("stage", ["shadow", "autolabel"])
def test_labeltriage_run_reads_items_and_table_once_and_renders_once(
    tmp_path: Path,
    tiny_voc: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    stage: str,
) -> None:

    import difficulty.report
    from autolabel.cli import cli

    passes = count_voc_item_reads(monkeypatch)
    template = difficulty.report._template

    def counted_template() -> Any:
        page = template()
        render = page.render

        def counted_render(*args: Any, **kwargs: Any) -> str:
            passes["renders"] += 1
            return render(*args, **kwargs)

        page.render = counted_render
        return page

    monkeypatch.setattr(difficulty.report, "_template", counted_template)
    import autolabel.gate
    import difficulty.table

    read_difficulty = difficulty.table.read_difficulty

    def counted_read(*args: Any, **kwargs: Any) -> Any:
        passes["tables"] += 1
        return read_difficulty(*args, **kwargs)

    for module in (difficulty.table, difficulty.report, autolabel.gate):
        monkeypatch.setattr(module, "read_difficulty", counted_read)
    path = _config(
        tmp_path, tiny_voc, stage=stage, epsilon=0.5, delta=0.1, min_count=3, audit_share=0.5
    )
    result = CliRunner().invoke(cli, ["--config", str(path), "run", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "tiny: ok" in result.output
    assert passes == {"items": 1, "renders": 1, "tables": 1}


def test_the_config_reaches_commands_as_objects(
    tmp_path: Path,
    tiny_voc: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The project's inline label map and scorers reach ``score`` as objects: no temporary
    label-map file, no scorer list turned into text and back."""
    import json
    import tempfile

    import pyarrow.parquet as pq

    from autolabel.cli import cli

    made: list[str] = []
    mkstemp = tempfile.mkstemp

    def recorded(*args: Any, **kwargs: Any) -> Any:
        made.append(str(kwargs.get("suffix") or ""))
        return mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", recorded)
    label_map = {"map": {"stop sign": "stop", "traffic light": "trafficlight"}, "ignore": ["cat"]}
    path = _config(tmp_path, tiny_voc, label_map=label_map)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["--config", str(path), "score", "--out", str(out), "--num-workers", "0"]
    )
    assert result.exit_code == 0, result.output
    schema = pq.read_schema(out / "difficulty.parquet")
    meta = json.loads(schema.metadata[b"labeltriage"])
    assert meta["scorers"] == ["fourier"]
    assert meta["settings"]["label_map"]["map"] == label_map["map"]
    assert list(meta["settings"]["label_map"]["ignore"]) == ["cat"]
    assert not [suffix for suffix in made if suffix.endswith(".yaml")]


def test_a_project_over_the_kept_limit_is_streamed_by_each_step_with_the_same_result(
    tmp_path: Path,
    tiny_voc: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over ``ITEMS_KEPT`` items the run holds no list of items: each step reads the
    project again (bounded memory), and the run's outcome is the same."""
    import json

    import autolabel.pipeline
    from autolabel.config import load_config

    passes = count_voc_item_reads(monkeypatch)
    outcomes = []
    for kept in (12, 5):  # the tiny project has 12 items
        monkeypatch.setattr(autolabel.pipeline, "ITEMS_KEPT", kept)
        passes.clear()
        folder = tmp_path / f"kept{kept}"
        folder.mkdir()
        path = _config(folder, tiny_voc, stage="shadow", epsilon=0.5, min_count=3)
        record = autolabel.pipeline.run_project(load_config(path), "tiny")
        assert record.status == "ok", record.error
        gate = json.loads(
            (folder / "reports" / "tiny" / record.run_id / "autolabel.json").read_text()
        )
        outcomes.append((passes["items"], gate["selected"], gate["tiers"], record.counts["tiers"]))
    (one, *held), (several, *streamed) = outcomes
    assert one == 1 and several > 1
    assert held == streamed and held[0]

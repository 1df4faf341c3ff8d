"""README "Extending": a format, a scorer and a strategy, one file each, picked up with no
other edit.  The three recipes are written into a temporary module (``tmp_path`` on
``sys.path``) and loaded as a plugin (``LABELTRIAGE_PLUGINS``); the registries' own
contract tests (tests/test_format_contract.py, test_scorer_contract.py and the strategy
contract in test_strategies.py) then run on them, and so does the command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = "toy_extension_for_tests"

TOY_FORMAT = '''
import json
from connectors.formats._filebased import LabelFileFormat
from connectors.formats.base import FORMATS
from connectors.model import Annotation, Item


@FORMATS.register("toyboxes")
class ToyBoxes(LabelFileFormat):
    """images/ + boxes/<id>.json: a JSON list of {"label": ..., "box": [x1, y1, x2, y2]}."""

    name = "toyboxes"
    labels_dir = "boxes"
    label_ext = ".json"
    looked_for = "images/ + boxes/*.json"

    @classmethod
    def detect(cls, project):
        return cls.has_folders(project)

    def parse_label(self, item, label_rel, data):
        boxes = json.loads(data)
        return item.model_copy(
            update={"annotations": [Annotation(label=b["label"], box=tuple(b["box"])) for b in boxes]}
        )

    def render_label(self, item, annotations, classes=None):
        return json.dumps([{"label": a.label, "box": list(a.box)} for a in annotations]).encode()
'''

TOY_SCORER = """
import numpy as np
from difficulty.registry import register_scorer


@register_scorer("toy_darkness", needs={"images"}, description="1 - mean brightness", tags={"difficulty"})
def toy_darkness(images):
    return 1.0 - images.mean(dim=(1, 2)).double().numpy()
"""

TOY_STRATEGY = """
import numpy as np
from difficulty.registry import register_scorer


@register_scorer(
    "toy_top2",
    needs={"probs"},
    description="1 - the sum of the two largest class probabilities",
    tags={"strategy", "classification"},
)
def toy_top2(probs):
    top = np.sort(np.asarray(probs, dtype=np.float64), axis=1)[:, -2:]
    return 1.0 - top.sum(axis=1)
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plugin")
    body = "\n".join(textwrap.dedent(part) for part in (TOY_FORMAT, TOY_SCORER, TOY_STRATEGY))
    (folder / f"{MODULE}.py").write_text(body, encoding="utf-8")
    return folder


def _env(plugin_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(plugin_dir)]),
        "LABELTRIAGE_PLUGINS": MODULE,
        "OMP_WAIT_POLICY": "PASSIVE",
    }


@pytest.fixture
def imported(plugin_dir: Path) -> Iterator[None]:
    """The toy module imported in this process (tmp_path on sys.path)."""
    from connectors.formats import FORMATS
    from difficulty.registry import SCORERS

    sys.path.insert(0, str(plugin_dir))
    try:
        __import__(MODULE)
        yield
    finally:
        sys.path.remove(str(plugin_dir))
        sys.modules.pop(MODULE, None)
        FORMATS._entries.pop("toyboxes", None)
        for name in ("toy_darkness", "toy_top2"):
            SCORERS._entries.pop(name, None)


def test_importing_the_module_registers_all_three(imported: None) -> None:
    from connectors.formats import FORMATS
    from connectors.project import detect_order
    from difficulty import strategies
    from difficulty.registry import SCORERS

    assert "toyboxes" in FORMATS and "toyboxes" in detect_order()
    assert "toy_darkness" in SCORERS
    assert "toy_top2" in strategies.STRATEGIES and "toy_top2" in strategies.SELECT_STRATEGIES


CONTRACTS = {
    "tests/test_format_contract.py": ("toyboxes",),
    "tests/test_scorer_contract.py": ("toy_darkness", "toy_top2"),
    "tests/test_strategies.py": ("toy_top2",),
}


def test_the_existing_contract_tests_pick_them_up(plugin_dir: Path) -> None:
    out = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider"),
            *("-k", "toyboxes or toy_darkness or toy_top2", *CONTRACTS),
        ],
        cwd=ROOT,
        env=_env(plugin_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    passed = [
        line for line in out.stdout.splitlines() if line.endswith("PASSED") or " PASSED " in line
    ]
    for test_file, names in CONTRACTS.items():
        for name in names:
            hits = [line for line in passed if line.startswith(test_file) and name in line]
            assert hits, f"no contract test of {test_file} ran on {name}"


def _labeltriage(plugin_dir: Path, *args: str) -> str:
    """Run the command line with the plugin named in the environment; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "autolabel.cli", *args],
        cwd=ROOT,
        env=_env(plugin_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_command_line_picks_them_up(plugin_dir: Path, tmp_path: Path) -> None:
    from _fileformat_helpers import png_bytes

    project = tmp_path / "toy"
    (project / "images").mkdir(parents=True)
    (project / "boxes").mkdir()
    for i in range(4):
        (project / "images" / f"img{i}.png").write_bytes(png_bytes())
    (project / "boxes" / "img0.json").write_text(
        json.dumps([{"label": "car", "box": [1, 1, 9, 9]}])
    )
    stats = _labeltriage(plugin_dir, "stats", "--source", str(project))
    counts = json.loads(stats)
    assert (counts["items"], counts["labeled"], counts["unlabeled"]) == (4, 1, 3), counts
    out = tmp_path / "scores"
    scorers = "fourier,toy_darkness"
    _labeltriage(
        plugin_dir, "score", "--source", str(project), "--out", str(out), "--scorers", scorers
    )
    import pandas as pd

    table = pd.read_parquet(next(out.rglob("difficulty*.parquet")))
    assert table["toy_darkness"].notna().sum() == 4

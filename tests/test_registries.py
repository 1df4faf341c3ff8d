"""The registries are complete whatever is imported first, and their name lists are derived."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FIRST_IMPORTS = (
    "difficulty.registry",
    "difficulty.fourier",
    "difficulty.strategies",
    "difficulty.prediction_scores",
    "difficulty.hybrid",
    "difficulty.selection",
    "difficulty.scoring",
)

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
from difficulty.registry import SCORERS
from difficulty import strategies, hybrid
print(json.dumps({
    "scorers": list(SCORERS),
    "strategies": list(strategies.STRATEGIES),
    "batch": list(hybrid.BATCH_STRATEGIES),
}))
"""


@pytest.fixture(scope="module")
def probes() -> dict[str, dict[str, list[str]]]:
    """What each fresh interpreter's registry holds, by the module it imported first
    (the interpreters run side by side)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("LABELTRIAGE_PLUGINS", None)
    procs = {
        first: subprocess.Popen(
            [sys.executable, "-c", PROBE, first],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for first in FIRST_IMPORTS
    }
    out = {}
    for first, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out[first] = json.loads(stdout.splitlines()[-1])
    return out


def test_scorer_registry_does_not_depend_on_import_order(
    probes: dict[str, dict[str, list[str]]],
) -> None:
    counts = {first: len(p["scorers"]) for first, p in probes.items()}
    assert len(set(counts.values())) == 1, counts
    reference = probes["difficulty.registry"]
    for first, probe in probes.items():
        assert probe == reference, first


def test_every_scorer_module_is_loaded(probes: dict[str, dict[str, list[str]]]) -> None:
    scorers = set(probes["difficulty.registry"]["scorers"])
    assert {"fourier", "margin", "det_margin", "box_margin", "badge", "margin_kcenter"} <= scorers


def test_strategy_lists_follow_the_tags() -> None:
    from difficulty import active_learning, hybrid, strategies
    from difficulty.registry import SCORERS

    for name in strategies.STRATEGIES:
        assert "strategy" in SCORERS[name].tags and "batch" not in SCORERS[name].tags
    for base, variant in strategies.DETECTION_VARIANTS.items():
        assert SCORERS[variant].detection_of == base and base in strategies.STRATEGIES
    assert set(strategies.SELECT_STRATEGIES) - set(strategies.STRATEGIES) == {"predicted_loss"}
    for name in hybrid.BATCH_STRATEGIES:
        assert {"strategy", "batch"} <= SCORERS[name].tags
    assert set(hybrid.BATCH_SELECTIONS) == set(hybrid.BATCH_STRATEGIES) - hybrid.NEEDS_LABELED
    names = active_learning.STRATEGY_NAMES
    assert len(names) == len(set(names))
    assert set(names) == {
        *strategies.STRATEGIES,
        "fourier",
        *hybrid.BATCH_STRATEGIES,
        "combined",
    }


def test_a_registry_runs_its_loader_once_before_its_first_read() -> None:
    from connectors.registry import Registry

    calls: list[int] = []
    registry: Registry[int] = Registry("thing", lambda: (calls.append(1), registry.add("b", 2)))
    registry.add("a", 1)  # registering reads nothing: the loader has not run
    assert calls == []
    assert list(registry) == ["a", "b"] and calls == [1]
    assert registry["b"] == 2 and len(registry) == 2 and "a" in registry and calls == [1]
    assert registry.in_order() == ["a", "b"]


def test_a_failing_loader_runs_again_on_the_next_read() -> None:
    from connectors.registry import Registry

    attempts: list[int] = []

    def loader() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("not yet")

    registry: Registry[int] = Registry("thing", loader)
    with pytest.raises(RuntimeError):
        len(registry)
    assert len(registry) == 0 and len(attempts) == 2


def test_a_plugin_that_cannot_be_imported_is_an_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from connectors.errors import UsageError
    from connectors.plugins import PLUGINS_ENV, load_plugins, plugin_modules

    monkeypatch.setenv(PLUGINS_ENV, " json, no_such_labeltriage_plugin ,")
    assert plugin_modules()[:2] == ["json", "no_such_labeltriage_plugin"]
    with pytest.raises(UsageError, match="no_such_labeltriage_plugin"):
        load_plugins()

"""``labeltriage autolabel`` and ``labeltriage run`` killed during their write-back.

Real road-sign photos in Pascal VOC, YOLO, COCO and Label Studio export projects
(:mod:`_faults` builds them and runs the trials): each trial kills the command with
SIGKILL or SIGTERM at a random instant of its write-back (:func:`_faults.draw_instant`)
and checks that the human
labels are byte-identical, that no auto-label reads as human (before and after
recovery), that recovery or rollback restores the project byte for byte, and that no
temporary or journal is left.

The default run has one quick pair of trials on a 200-image VOC project; the full suite
(``make test-faults``, marker ``faults``) runs ``$LABELTRIAGE_FAULT_TRIALS`` (default 8)
trials per format, command and signal on all 700 images: 32 kill instants per format.
``bench/faults.py`` runs the same trials and records them in ``bench/results/faults.md``.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
from _faults import (
    FORMATS,
    FaultProject,
    build_projects,
    draw_instant,
    measure_window,
    run_trial,
)


def _projects(
    road_signs: Path, tmp: Path, formats: tuple[str, ...], limit: int | None
) -> dict[str, FaultProject]:
    return build_projects(
        road_signs, road_signs / "predictions" / "yolo", tmp, formats=formats, limit=limit,
        unlabeled_share=0.5,
    )  # fmt: skip


def test_autolabel_stopped_mid_write_loses_nothing(road_signs: Path, tmp_path: Path) -> None:
    """The quick one: SIGTERM once ten labels are written (the command rolls back itself)."""
    (project,) = _projects(road_signs, tmp_path / "p", ("voc",), 200).values()
    trial = run_trial(
        project,
        tmp_path / "trial",
        command="autolabel",
        sig=signal.SIGTERM,
        delay_s=0.0,
        after_labels=10,
    )
    assert trial.ok, trial.problems
    assert trial.killed_during_writes and trial.written_before_kill >= 10
    assert trial.manifest_stage == "rolled_back" and trial.exit_code == 143


@pytest.fixture(scope="module")
def full_projects(
    road_signs: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, FaultProject]:
    return _projects(road_signs, tmp_path_factory.mktemp("faults"), FORMATS, None)


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("command", ["autolabel", "run"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_kills_at_random_instants_lose_nothing(
    full_projects: dict[str, FaultProject], tmp_path: Path, fmt: str, command: str
) -> None:
    project = full_projects[fmt]
    window, written = measure_window(project, tmp_path / "measure", command=command)
    assert written > 0 and window > 0, (window, written)
    rng = random.Random(f"{fmt}-{command}")
    n = int(os.environ.get("LABELTRIAGE_FAULT_TRIALS", "8"))
    failures = []
    for sig in (signal.SIGKILL, signal.SIGTERM):
        for k in range(n):
            delay, after = draw_instant(rng, fmt, window, written)
            trial = run_trial(
                project,
                tmp_path / f"{sig.name}-{k}",
                command=command,
                sig=sig,
                delay_s=delay,
                after_labels=after,
            )
            if not trial.ok:
                failures.append(trial.to_dict())
    assert not failures, failures

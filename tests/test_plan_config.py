"""``labeltriage report --plan-config``: the planning settings read from YAML or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autolabel.commands.report import _load_plan_settings
from connectors.errors import UsageError


def test_yaml_and_json_give_the_same_settings(tmp_path: Path) -> None:
    data = {
        "team_size": 3,
        "hours_per_day": 6,
        "seconds_per_tier": {"easy": 10, "medium": 20, "hard": 40},
    }
    (tmp_path / "plan.yaml").write_text(
        "team_size: 3\nhours_per_day: 6\nseconds_per_tier: {easy: 10, medium: 20, hard: 40}\n"
    )
    (tmp_path / "plan.json").write_text(json.dumps(data))
    from_yaml = _load_plan_settings(str(tmp_path / "plan.yaml"))
    assert from_yaml == _load_plan_settings(str(tmp_path / "plan.json"))
    assert (from_yaml.team_size, from_yaml.hours_per_day) == (3, 6.0)
    assert from_yaml.seconds_per_tier == {"easy": 10.0, "medium": 20.0, "hard": 40.0}


def test_an_empty_file_is_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "plan.yaml").write_text("")
    assert _load_plan_settings(str(tmp_path / "plan.yaml")).team_size == 1


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.yaml", None, "plan config not found"),
        ("bad.json", "{not json", "malformed plan config"),
        ("bad.yaml", "team_size: [1, 2\n", "malformed plan config"),
        ("wrong.yaml", "team_size: 0\n", "invalid plan setting 'team_size'"),
        ("unknown.yaml", "teamsize: 3\n", "invalid plan setting 'teamsize'"),
    ],
)
def test_bad_plan_configs_are_usage_errors_naming_the_file(
    tmp_path: Path, name: str, text: str | None, message: str
) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(UsageError, match=message) as info:
        _load_plan_settings(str(path))
    assert str(path) in str(info.value)

"""The deployment config: validated once, errors field by field, ${VAR} and relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autolabel.config import AppConfig, ConfigError, command_defaults, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: object, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def minimal(**project: object) -> dict[str, object]:
    return {
        "report_store": "reports",
        "projects": {"roads": {"source": "data/roads", "format": "voc", **project}},
    }


def problems(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return dict(exc.value.problems)


def test_example_config_is_valid() -> None:
    cfg = load_config(REPO / "examples" / "config.yaml")
    _, project = cfg.project("road_signs")
    assert project.stage in ("report", "shadow", "autolabel") and project.predictions is not None
    assert cfg.projects["road_signs_model"].train is not None
    # the demo builds the stop-sign and traffic-light project next to its reports
    assert Path(project.source) == (REPO / "demo-out" / "road_signs").resolve()
    assert Path(cfg.projects["road_signs_model"].source) == (REPO / "examples" / "sample_project")
    assert project.epsilon <= 0.1
    assert Path(project.label_map.file or "").is_file()
    assert project.schedule is not None


def test_deploy_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABEL_STUDIO_TOKEN", "secret-token")
    cfg = load_config(REPO / "deploy" / "config.example.yaml")
    assert cfg.projects and all(p.schedule for p in cfg.projects.values())


def test_minimal_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, minimal()))
    p = cfg.projects["roads"]
    assert p.source == str(tmp_path / "data" / "roads")
    assert cfg.report_store == str(tmp_path / "reports")
    assert cfg.job_store_url() == f"sqlite:///{tmp_path / 'reports' / 'scheduler.sqlite'}"
    assert (p.stage, p.epsilon, p.delta, p.tiers.mode) == ("report", 0.05, 0.05, "quantiles")


def test_remote_paths_are_left_alone(tmp_path: Path) -> None:
    data = minimal()
    data["report_store"] = "s3://bucket/reports"
    data["projects"]["roads"]["source"] = "s3://bucket/roads"  # type: ignore[index]
    cfg = load_config(write(tmp_path, data))
    assert (
        cfg.report_store == "s3://bucket/reports"
        and cfg.projects["roads"].source == "s3://bucket/roads"
    )
    assert cfg.job_store_url() is None  # a remote store needs scheduler.job_store


@pytest.mark.parametrize(
    ("project", "field", "words"),
    [
        ({"epsilon": 1.5}, "projects.roads.epsilon", "less than 1"),
        ({"delta": 0}, "projects.roads.delta", "greater than 0"),
        ({"audit_share": -0.1}, "projects.roads.audit_share", "greater than or equal to 0"),
        ({"stage": "production"}, "projects.roads.stage", "'report', 'shadow' or 'autolabel'"),
        ({"schedule": "every day"}, "projects.roads.schedule", "invalid cron string"),
        ({"tiers": {"easy": 0.8, "hard": 0.2}}, "projects.roads.tiers", "out of order"),
        ({"tiers": {"mode": "buckets"}}, "projects.roads.tiers.mode", "quantiles"),
        (
            {"planning": {"team_size": 0}},
            "projects.roads.planning.team_size",
            "greater than or equal to 1",
        ),
        ({"train": {"task": "segmentation"}}, "projects.roads.train.task", "detection"),
        (
            {"predictions": {"format": "yolo"}},
            "projects.roads.predictions.source",
            "Field required",
        ),
        ({"colour": "red"}, "projects.roads.colour", "Extra inputs are not permitted"),
        ({"stage": "autolabel"}, "projects.roads", "needs predictions, model or train"),
        ({"model": "m.pt", "train": {"task": "detection"}}, "projects.roads", "either model"),
        ({"scorers": ["fourer"]}, "projects.roads.scorers.0", "unknown scorer 'fourer'"),
        ({"score_with": "predictions"}, "projects.roads", "no predictions are configured"),
        ({"engine": "spark"}, "projects.roads.engine", "'local' or 'dask'"),
        (
            {"engine": "dask", "scheduler": "localhost:8786"},
            "projects.roads.scheduler",
            "such as tcp://HOST:PORT",
        ),
        ({"scheduler": "tcp://sched:8786"}, "projects.roads.scheduler", "only with engine: dask"),
        ({"dask_workers": 0}, "projects.roads.dask_workers", "greater than or equal to 1"),
    ],
)
def test_errors_name_the_field(
    tmp_path: Path, project: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, minimal(**project)))
    found = problems(exc)
    assert field in found, found
    assert words in found[field]
    assert field in str(exc.value)


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    data = minimal(epsilon=2, delta=-1)
    data["scheduler"] = {"timezone": "Mars/Olympus"}
    data["projects"]["bad name!"] = {"source": "x"}  # type: ignore[index]
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, data))
    found = problems(exc)
    assert {
        "projects.roads.epsilon",
        "projects.roads.delta",
        "scheduler.timezone",
        "projects.bad name!.[key]",
    } <= set(found)
    assert "unknown timezone" in found["scheduler.timezone"]


def test_scorer_settings_are_validated_by_the_scorer(tmp_path: Path) -> None:
    data = minimal(scorers=["fourier"], scorer_settings={"fourier": {"no_such_setting": 1}})
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, data))
    assert "projects.roads.scorer_settings.fourier.no_such_setting" in problems(exc)


def test_environment_variables_are_interpolated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROADS_TOKEN", "abc123")
    data = minimal(
        storage_options={"token": "${ROADS_TOKEN}", "region": "${ROADS_REGION:-eu-west-1}"}
    )
    cfg = load_config(write(tmp_path, data))
    assert cfg.projects["roads"].storage_options == {"token": "abc123", "region": "eu-west-1"}


def test_missing_environment_variable_names_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOPE_TOKEN", raising=False)
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, minimal(storage_options={"token": "${NOPE_TOKEN}"})))
    assert problems(exc) == {
        "projects.roads.storage_options.token": "environment variable NOPE_TOKEN is not set"
    }


@pytest.mark.parametrize(
    ("text", "words"),
    [("projects: [1, 2", "malformed YAML"), ("- a\n- b\n", "must be a mapping")],
)
def test_unreadable_files(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_label_map_inline_or_file(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, minimal(label_map={"map": {"stop sign": "stop"}, "ignore": ["DontCare"]}))
    )
    assert cfg.projects["roads"].label_map.map == {"stop sign": "stop"}
    cfg = load_config(write(tmp_path, minimal(label_map="maps/roads.yaml")))
    assert cfg.projects["roads"].label_map.file == str(tmp_path / "maps" / "roads.yaml")


def test_project_choice() -> None:
    cfg = parse_config(minimal())
    assert cfg.project(None)[0] == "roads"
    two = AppConfig.model_validate({"projects": {"a": {"source": "x"}, "b": {"source": "y"}}})
    with pytest.raises(ConfigError.__mro__[1], match="choose one with --project"):
        two.project(None)
    with pytest.raises(ConfigError.__mro__[1], match="unknown project 'c'"):
        two.project("c")


def test_command_defaults_come_from_the_project_and_commands_section() -> None:
    data = minimal(
        predictions={"source": "/p/yolo", "format": "yolo"},
        epsilon=0.1,
        planning={"team_size": 4},
        scorers="fourier,entropy",
    )
    data["projects"]["roads"]["storage_options"] = {"anon": True}  # type: ignore[index]
    cfg = AppConfig.model_validate(data)
    defaults = command_defaults(cfg, None)
    assert defaults["score"]["predictions_format"] == "yolo"
    assert "scorers" not in defaults["score"]  # the scorers reach `score` as a list, not text
    assert defaults["autolabel"]["epsilon"] == 0.1
    assert defaults["report"]["team_size"] == 4
    assert (
        "tier_mode" not in defaults["score"]
    )  # not configured: the reference run's tiers are reused
    both = AppConfig.model_validate(
        minimal(predictions={"source": "/p"}, model="/m.pt", score_with="model")
    )
    assert (
        "predictions" not in command_defaults(both, None)["score"]
        and command_defaults(both, None)["score"]["model"] == "/m.pt"
    )
    assert "model" not in command_defaults(both, None)["autolabel"]
    # storage options reach the commands as an object, not as JSON text
    assert defaults["stats"] == {
        "source": "data/roads", "format": "voc", "predictions": "/p/yolo", "predictions_format": "yolo",
    }  # fmt: skip
    assert "run" not in defaults
    assert command_defaults(cfg, "roads")["run"] == {"project": ["roads"]}
    assert (defaults["score"]["engine"], defaults["score"]["workers"]) == ("local", 2)
    assert "scheduler" not in defaults["score"]


def test_dask_engine_settings_become_score_options() -> None:
    cfg = AppConfig.model_validate(
        minimal(engine="dask", scheduler="tcp://10.0.0.5:8786", dask_workers=3)
    )
    score = command_defaults(cfg, None)["score"]
    assert (score["engine"], score["scheduler"], score["workers"]) == (
        "dask",
        "tcp://10.0.0.5:8786",
        3,
    )
    for address in ("tcp://[::1]:8786", "tls://scheduler.internal:8786", "tcp://dask"):
        assert AppConfig.model_validate(minimal(engine="dask", scheduler=address))


def test_kubernetes_configmap_holds_a_valid_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "x")
    monkeypatch.setenv("LABELTRIAGE_JOB_STORE", "postgresql+psycopg://u:p@db/labeltriage")
    configmap = yaml.safe_load((REPO / "deploy" / "k8s" / "configmap.yaml").read_text())
    cfg = parse_config(yaml.safe_load(configmap["data"]["config.yaml"]))
    assert cfg.job_store_url() == "postgresql+psycopg://u:p@db/labeltriage"
    cronjob = yaml.safe_load((REPO / "deploy" / "k8s" / "cronjob.yaml").read_text())
    spec = cronjob["spec"]
    assert cronjob["kind"] == "CronJob" and spec["concurrencyPolicy"] == "Forbid"
    container = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-3:] == ["run", "--config", "/etc/labeltriage/config.yaml"]
    volume = spec["jobTemplate"]["spec"]["template"]["spec"]["volumes"][0]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]


def test_compose_runs_the_scheduler_with_a_volume() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    service = compose["services"]["scheduler"]
    assert "schedule" in service["command"]
    assert (
        any(v.startswith("reports:") for v in service["volumes"])
        and "reports" in compose["volumes"]
    )
    assert (REPO / "deploy" / "Dockerfile").read_text().count("ENTRYPOINT") == 1

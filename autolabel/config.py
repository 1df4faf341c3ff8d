"""One YAML config per deployment, validated once.

The config is plain data: projects (where they live, how to read them, what to predict
with, the rollout stage, tiers, the auto-label guarantee, planning defaults, a cron
schedule), the report store and the scheduler.  Objects (projects, label maps, tier
settings) are built from it by factories elsewhere; nothing here opens a file other
than the config itself.

Rules applied while loading (:func:`load_config`):

* ``${VAR}`` and ``${VAR:-default}`` inside any string are replaced by environment
  variables (tokens and other secrets stay out of the file); a missing variable is an
  error naming the field it was used in.
* Relative local paths (``source``, ``predictions.source``, ``model``,
  ``label_map.file``, ``report_store``) are relative to the config file's folder.
* Every problem is reported field by field with its dotted path, e.g.
  ``projects.roads.epsilon: Input should be less than 1`` (:class:`ConfigError`, a
  :class:`~connectors.errors.UsageError`: exit code 2 on the command line).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from connectors.errors import UsageError
from difficulty.plan import PlanSettings
from difficulty.tiers import TierConfig

PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DASK_ADDRESS = re.compile(
    r"^(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+)(:\d{1,5})?/?$|^inproc://\S+$"
)
"""A Dask scheduler address: ``tcp://HOST:PORT`` (or ``tls://``; ``[IPv6]`` hosts; ``inproc://``)."""
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


ProjectName = Annotated[str, StringConstraints(pattern=PROJECT_NAME.pattern, max_length=100)]
"""A project name is a folder name in the report store and a job id."""


class ConfigError(UsageError):
    """The config file is invalid; ``problems`` lists ``(dotted.field, message)`` pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {loc}: {msg}" if loc else f"  {msg}" for loc, msg in problems)
        super().__init__(f"invalid config {source}:\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictionsConfig(_Strict):
    """Predictions the user brings (``labeltriage score --predictions P --predictions-format PF``)."""

    source: str = Field(description="fsspec URL or path of the predictions (folder or file)")
    format: str = Field("auto", description="predictions format name (yolo, coco, labelstudio, …)")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="options of the predictions format (e.g. model_version for a live Label Studio)",
    )


class TrainConfig(_Strict):
    """Train a model with a loss-prediction module on the labeled items before scoring."""

    task: Literal["detection", "classification"]
    arch: str | None = Field(
        None, description="architecture (detection: ssdlite, …; classification: small_cnn, …)"
    )
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float | None = Field(None, gt=0, description="default: 0.1 classification, 0.001 detection")
    image_size: int | None = Field(
        None, ge=16, description="input size of the model (default: the arch's)"
    )
    min_steps: int = Field(
        0, ge=0, description="raise epochs until training makes at least this many steps"
    )
    seed: int = 0
    calibration_share: float = Field(0.2, ge=0, lt=1)
    device: str = "cpu"
    classes: list[str] | None = Field(
        None, description="class names; default: the project's classes"
    )
    warm_start: bool = Field(
        False,
        description="start from the previous successful run's model (same classes), not from scratch",
    )
    backbone: str | None = Field(
        None, description="pretrained backbone (efficientnet_lite0, a torchvision model): arch fcos"
    )
    backbone_weights: str | None = Field(
        None, description="DEFAULT, a torchvision weights name, a state_dict file, or none"
    )
    finetune_last_stage: bool = False
    augment: bool | None = Field(None, description="random flips; default: on for fcos")


class LabelMapConfig(_Strict):
    """Model classes → project classes, plus classes to ignore; inline or from a file."""

    map: dict[str, str] = Field(default_factory=dict)
    ignore: list[str] = Field(default_factory=list)
    file: str | None = Field(
        None, description="a label-map file (YAML/JSON); merged under map/ignore"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, value: Any) -> Any:
        # ``label_map: path/to/map.yaml`` is shorthand for ``label_map: {file: path}``.
        return {"file": value} if isinstance(value, str) else value


class ProjectConfig(_Strict):
    """One labeling project and how it is run."""

    source: str = Field(description="fsspec URL or path of the project root (or export file)")
    format: str = Field("auto", description="format name, or auto")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(
        default_factory=dict, description="format options (e.g. unlabeled folder name)"
    )
    predictions: PredictionsConfig | None = None
    model: str | None = Field(None, description="checkpoint of a trained model (labeltriage train)")
    train: TrainConfig | None = None
    stage: Literal["report", "shadow", "autolabel"] = "report"
    label_map: LabelMapConfig = Field(default_factory=lambda: LabelMapConfig.model_validate({}))
    scorers: list[str] | None = Field(
        None, description="scorer names; default: every scorer the inputs allow"
    )
    scorer_settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-scorer settings under the scorer's name"
    )
    tiers: TierConfig = Field(
        default_factory=lambda: TierConfig.model_validate({}),
        description="mode quantiles|thresholds, easy, hard",
    )
    epsilon: float = Field(0.05, gt=0, lt=1, description="target auto-label error")
    delta: float = Field(0.05, gt=0, lt=1, description="1 - confidence of the error bound")
    audit_share: float = Field(
        0.05, ge=0, le=1, description="share of auto-labels routed to human audit"
    )
    min_count: int = Field(30, ge=1, description="fewest labeled easy items needed to calibrate")
    seed: int = 0
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=0)
    planning: PlanSettings = Field(
        default_factory=lambda: PlanSettings.model_validate({}),
        description="team_size, hours_per_day, seconds_per_tier, min_history, audit_share, annotators",
    )
    score_with: Literal["auto", "predictions", "model"] = Field(
        "auto",
        description="what scoring reads besides images; auto: what labels come from (label_with)",
    )
    label_with: Literal["auto", "predictions", "model"] = Field(
        "auto", description="what shadow/autolabel write; auto: the predictions when there are some"
    )
    schedule: str | None = Field(None, description="cron string (minute hour day month weekday)")
    engine: Literal["local", "dask"] = Field(
        "local", description="where scoring runs: this process, or Dask tasks"
    )
    scheduler: str | None = Field(
        None,
        description="engine dask: address of a running Dask scheduler (tcp://HOST:PORT); "
        "default: a local cluster on 127.0.0.1",
    )
    dask_workers: int = Field(
        2, ge=1, description="engine dask: worker processes of a local cluster"
    )
    allow_image_hosts: list[str] = Field(
        default_factory=list,
        description="where item images may come from besides the project's storage: hosts "
        "(cdn.example.com, host:port) or URL prefixes (file:///mnt/images/); * for any",
    )
    dask_staging: str | None = Field(
        None,
        description="engine dask: URL where partitions are staged for the workers, removed after "
        "the run; default: a temporary folder (local cluster), <run folder>/.labeltriage-staging "
        "(scheduler)",
    )
    dask_partition_size: int | None = Field(
        None, ge=1, description="engine dask: items per partition (one Dask task); default 256"
    )

    @field_validator("scorers", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return (
            [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
        )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"invalid cron string {value!r}: {exc}") from exc
        return value

    @field_validator("scheduler")
    @classmethod
    def _scheduler_address(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not DASK_ADDRESS.match(value):
            raise ValueError(f"{value!r} is not a Dask scheduler address such as tcp://HOST:PORT")
        if info.data.get("engine", "dask") != "dask":  # engine is validated before scheduler
            raise ValueError("a scheduler is used only with engine: dask")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ProjectConfig:
        if self.model is not None and self.train is not None:
            raise ValueError("give either model (a checkpoint) or train, not both")
        if (
            self.stage != "report"
            and self.predictions is None
            and self.model is None
            and self.train is None
        ):
            raise ValueError(
                f"stage {self.stage!r} needs predictions, model or train to predict with"
            )
        has_model = self.model is not None or self.train is not None
        for field, choice in (("score_with", self.score_with), ("label_with", self.label_with)):
            if choice == "predictions" and self.predictions is None:
                raise ValueError(f"{field} is predictions but no predictions are configured")
            if choice == "model" and not has_model:
                raise ValueError(f"{field} is model but neither model nor train is configured")
        unknown = set(self.scorer_settings) - set(self.scorers or self.scorer_settings)
        if unknown:
            raise ValueError(
                f"scorer_settings for scorers not in scorers: {', '.join(sorted(unknown))}"
            )
        return self


class SchedulerConfig(_Strict):
    """The scheduler daemon: job store, timezone, misfires, the project lock."""

    job_store: str | None = Field(
        None,
        description="SQLAlchemy URL; default sqlite:///<report_store>/scheduler.sqlite for a local store",
    )
    timezone: str = "UTC"
    misfire_grace_seconds: int = Field(
        3600, ge=1, description="how late a missed run may still start (then coalesced)"
    )
    lock_ttl_seconds: int = Field(
        900, ge=10, description="a lock not refreshed for this long is stale (crashed run)"
    )

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r}") from exc
        return value


class AppConfig(_Strict):
    """The whole deployment."""

    report_store: str = Field(
        "reports", description="fsspec URL or path where runs, reports and records go"
    )
    report_store_options: dict[str, Any] = Field(default_factory=dict)
    report_store_create: bool = Field(
        False, description="create the report store's bucket when it is missing (object stores)"
    )
    scheduler: SchedulerConfig = Field(default_factory=lambda: SchedulerConfig.model_validate({}))
    projects: dict[ProjectName, ProjectConfig] = Field(default_factory=dict)
    commands: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="defaults for any command's options: {command: {option_name: value}}",
    )

    def project(self, name: str | None) -> tuple[str, ProjectConfig]:
        """The named project, or the only one when ``name`` is ``None``."""
        if name is None:
            if len(self.projects) != 1:
                raise UsageError(
                    f"the config has {len(self.projects)} projects; choose one with --project ({', '.join(self.projects) or 'none'})"
                )
            name = next(iter(self.projects))
        if name not in self.projects:
            raise UsageError(
                f"unknown project {name!r}; the config has: {', '.join(self.projects) or 'none'}"
            )
        return name, self.projects[name]

    @property
    def store_is_local(self) -> bool:
        return is_local_path(self.report_store)

    def job_store_url(self) -> str | None:
        """The scheduler's SQLAlchemy URL (also where project locks and run history live)."""
        if self.scheduler.job_store:
            return self.scheduler.job_store
        if self.store_is_local:
            return f"sqlite:///{Path(local_path(self.report_store)) / 'scheduler.sqlite'}"
        return None


# -- loading ---------------------------------------------------------------------------


def is_local_path(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _interpolate(value: Any, loc: tuple[str, ...], problems: list[tuple[str, str]]) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, (*loc, str(k)), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*loc, str(i)), problems) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        problems.append((".".join(loc), f"environment variable {name} is not set"))
        return match.group(0)

    return _ENV_REF.sub(replace, value)


def _loc(parts: Iterable[Any]) -> str:
    return ".".join(str(p) for p in parts)


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """``(dotted.field, message)`` for every error of a pydantic validation error."""
    problems = []
    for err in exc.errors():
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append((_loc(err["loc"]), msg))
    return problems


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None or not is_local_path(path):
        return path
    p = Path(os.path.expanduser(local_path(path)))
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_paths(cfg: AppConfig, base: Path) -> AppConfig:
    """Make relative local paths absolute against ``base`` (the config file's folder)."""
    projects = {}
    for name, p in cfg.projects.items():
        update: dict[str, Any] = {
            "source": _resolve(p.source, base),
            "model": _resolve(p.model, base),
            "dask_staging": _resolve(p.dask_staging, base),
        }
        if p.predictions is not None:
            update["predictions"] = p.predictions.model_copy(
                update={"source": _resolve(p.predictions.source, base)}
            )
        if p.label_map.file is not None:
            update["label_map"] = p.label_map.model_copy(
                update={"file": _resolve(p.label_map.file, base)}
            )
        projects[name] = p.model_copy(update=update)
    return cfg.model_copy(
        update={"report_store": _resolve(cfg.report_store, base), "projects": projects}
    )


def parse_config(data: Any, *, source: str = "<config>", base_dir: Path | None = None) -> AppConfig:
    """Validate already-parsed YAML data (interpolating ``${VAR}``) into an :class:`AppConfig`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            source, [("", f"the config must be a mapping, not {type(data).__name__}")]
        )
    problems: list[tuple[str, str]] = []
    data = _interpolate(data, (), problems)
    try:
        cfg = AppConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(validation_problems(exc))
        raise ConfigError(source, problems) from exc
    problems.extend(scorer_problems(cfg))
    if problems:
        raise ConfigError(source, problems)
    return resolve_paths(cfg, base_dir or Path.cwd())


def scorer_problems(cfg: AppConfig) -> list[tuple[str, str]]:
    """Unknown scorer names and invalid per-scorer settings, with their dotted paths.

    Each scorer's settings are validated by that scorer's own settings model.  (Whether
    the project's inputs can feed a scorer is checked when the run starts.)
    """
    if not any(p.scorers or p.scorer_settings for p in cfg.projects.values()):
        return []
    from difficulty.registry import SCORERS
    from difficulty.scoring import load_scorers

    load_scorers()
    problems: list[tuple[str, str]] = []
    for name, p in cfg.projects.items():
        for i, scorer in enumerate(p.scorers or []):
            if scorer not in SCORERS:
                problems.append(
                    (
                        f"projects.{name}.scorers.{i}",
                        f"unknown scorer {scorer!r}; choose one of: {', '.join(SCORERS)}",
                    )
                )
        for scorer, settings in p.scorer_settings.items():
            if scorer not in SCORERS:
                continue
            try:
                SCORERS[scorer].settings.model_validate(settings)
            except ValidationError as exc:
                problems.extend(
                    (f"projects.{name}.scorer_settings.{scorer}.{loc}", msg)
                    for loc, msg in validation_problems(exc)
                )
    return problems


MAX_YAML_NODES = 100_000
"""The most nodes a config may expand to through YAML aliases (``*ref``)."""


def safe_load_bounded(text: str, max_nodes: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load`` that refuses documents whose aliases expand beyond ``max_nodes``.

    Anchors and aliases let a few lines stand for an exponential number of nodes (a
    "billion laughs" document); the node graph is measured before anything is built,
    counting each alias as the size of what it repeats.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}

        def size(n: yaml.Node) -> int:
            known = sizes.get(id(n))
            if known is not None:
                return known
            sizes[id(n)] = 1  # a recursive alias counts once
            if isinstance(n, yaml.SequenceNode):
                total = 1 + sum(size(c) for c in n.value)
            elif isinstance(n, yaml.MappingNode):
                total = 1 + sum(size(k) + size(v) for k, v in n.value)
            else:
                total = 1
            sizes[id(n)] = total = min(total, max_nodes + 1)
            return total

        if size(node) > max_nodes:
            raise yaml.YAMLError(
                f"the document expands to more than {max_nodes} nodes through aliases "
                "(an alias bomb?)"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_config(path: str | os.PathLike[str]) -> AppConfig:
    """Read, interpolate and validate a YAML config file; :class:`ConfigError` lists every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(str(path), [("", "file not found")]) from exc
    except OSError as exc:
        raise ConfigError(str(path), [("", f"cannot read: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(
            str(path),
            [
                (
                    f"line {line}",
                    f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); save the file as UTF-8",
                )
            ],
        ) from exc
    try:
        data = safe_load_bounded(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            str(path), [(where, f"malformed YAML: {getattr(exc, 'problem', exc)}")]
        ) from exc
    return parse_config(data, source=str(path), base_dir=path.resolve().parent)


# -- options for the command line ------------------------------------------------------


def _one_source(predict: dict[str, Any], choice: str) -> dict[str, Any]:
    """Commands take predictions or a model: keep one when both are configured."""
    if "model" in predict and "predictions" in predict:
        drop = ("predictions", "predictions_format") if choice == "model" else ("model",)
        return {k: v for k, v in predict.items() if k not in drop}
    return predict


def command_defaults(cfg: AppConfig, project: str | None) -> dict[str, dict[str, Any]]:
    """``ctx.default_map`` for the CLI: each command's option defaults from the config.

    Values come from the chosen project (when the config has one, or ``project`` names
    one); the CLI adds the top-level ``commands`` section on top.  Keys are long option
    names with ``_`` for ``-`` (``predictions_format``); commands ignore keys they do not
    have.
    """
    defaults: dict[str, dict[str, Any]] = {}
    if project is not None or len(cfg.projects) == 1:
        _, p = cfg.project(project)
        # storage options, the label map and the scorers reach the commands as objects
        # (autolabel.commands._common.configured_project), not as option text
        common: dict[str, Any] = {"source": p.source, "format": p.format}
        predict: dict[str, Any] = {}
        if p.predictions is not None:
            predict |= {
                "predictions": p.predictions.source,
                "predictions_format": p.predictions.format,
            }
        if p.model is not None:
            predict["model"] = p.model
        defaults["stats"] = common | {k: v for k, v in predict.items() if k != "model"}
        score: dict[str, Any] = {
            "batch_size": p.batch_size, "num_workers": p.num_workers,
            "engine": p.engine, "workers": p.dask_workers,
        }  # fmt: skip
        if p.scheduler is not None:
            score["scheduler"] = p.scheduler
        if p.dask_staging is not None:
            score["staging"] = p.dask_staging
        if p.dask_partition_size is not None:
            score["partition_size"] = p.dask_partition_size
        if "tiers" in p.model_fields_set:  # else the reference run's thresholds are reused
            score |= {"tier_mode": p.tiers.mode, "easy": p.tiers.easy, "hard": p.tiers.hard}
        defaults["score"] = common | _one_source(predict, p.score_with) | score
        defaults["report"] = {
            "team_size": p.planning.team_size,
            "hours_per_day": p.planning.hours_per_day,
        }
        if p.train is not None:
            defaults["train"] = common | {
                "task": p.train.task, "arch": p.train.arch, "epochs": p.train.epochs,
                "batch_size": p.train.batch_size, "lr": p.train.lr, "seed": p.train.seed,
                "backbone": p.train.backbone, "backbone_weights": p.train.backbone_weights,
                "finetune_last_stage": p.train.finetune_last_stage, "augment": p.train.augment,
            }  # fmt: skip
        else:
            defaults["train"] = dict(common)
        defaults["select"] = common | ({"model": p.model} if p.model else {})
        defaults["autolabel"] = common | _one_source(predict, p.label_with) | {
            "epsilon": p.epsilon, "delta": p.delta, "audit_share": p.audit_share, "min_count": p.min_count,
        }  # fmt: skip
        defaults["rollback"] = dict(common)
        defaults["recover"] = dict(common)
    if project is not None:
        defaults.setdefault("run", {})["project"] = [project]
    return defaults

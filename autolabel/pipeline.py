"""One run of one project at its stage: stats → (train) → score → shadow/autolabel → report.

A run owns the folder ``<report_store>/<project>/<run_id>/``; every step writes its
outputs there and the run's :class:`~autolabel.store.RunRecord` (``run.json``) is
written when the run starts (``running``) and again when it ends (``ok`` or ``failed``,
with the error of the step that failed).  Scores are computed against the previous
successful run of the project as reference, so that scores and tiers of scheduled runs
compare; the report receives the earlier runs as its history (trend).

The run reads the project's items once (the stats step) and every later step works on
that list; ``difficulty.parquet`` is read once after scoring, re-tiered in place by the
gate, and handed to the report, which is rendered once, after the gate.  Each step gets
its settings as one options object built from the project's config
(:func:`score_options`, :func:`gate_options`, :class:`difficulty.training.TrainOptions`).

:func:`run_locked` wraps a run in the project lock of the state database, so that no
two runs of one project overlap, whichever processes start them; a run that finds the
lock taken is recorded as ``skipped``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import sqlalchemy as sa

from autolabel.config import AppConfig, PredictionsConfig, ProjectConfig, is_local_path
from autolabel.gate import GateOptions
from autolabel.store import ReportStore, RunRecord, StateDB, new_run_id, utcnow
from connectors.errors import LabelTriageError
from connectors.labelmap import LabelMap, load_label_map
from connectors.model import Item
from connectors.owner import current as current_owner
from connectors.storage import redact_url
from difficulty.options import ScoreOptions
from difficulty.plan import PlanSettings

log = logging.getLogger(__name__)


class RunFunction(Protocol):
    def __call__(
        self,
        cfg: AppConfig,
        name: str,
        *,
        run_id: str | None = None,
        trigger: str = "manual",
        progress: bool = False,
    ) -> RunRecord: ...


def build_label_map(p: ProjectConfig) -> LabelMap:
    """The project's label map: the file's (if any) with the inline ``map``/``ignore`` on top."""
    file = p.label_map.file
    # a remote label-map file is read with the project's storage options
    options = p.storage_options if file is not None and not is_local_path(file) else None
    base = load_label_map(file, options) if file is not None else LabelMap()
    return LabelMap(
        map={**base.map, **p.label_map.map},
        ignore=tuple(dict.fromkeys([*base.ignore, *p.label_map.ignore])),
    )


def build_plan_settings(p: ProjectConfig) -> PlanSettings:
    """The planning settings; the audit share is the project's unless planning sets its own."""
    if "audit_share" in p.planning.model_fields_set:
        return p.planning
    return p.planning.model_copy(update={"audit_share": p.audit_share})


def score_options(p: ProjectConfig) -> ScoreOptions:
    """The project's scoring settings; tiers only when the project sets them (else a
    reference run's thresholds are reused)."""
    return ScoreOptions(
        scorers=p.scorers or None,
        settings=p.scorer_settings or None,
        tiers=p.tiers,
        batch_size=p.batch_size,
        num_workers=p.num_workers,
    )


def gate_options(p: ProjectConfig, **overrides: Any) -> GateOptions:
    """The project's gate settings at its stage."""
    return GateOptions(
        epsilon=p.epsilon,
        delta=p.delta,
        stage=p.stage,
        audit_share=p.audit_share,
        min_count=p.min_count,
        seed=p.seed,
    ).model_copy(update=overrides)


def score_inputs(p: ProjectConfig, checkpoint: str | None) -> tuple[bool, bool]:
    """``(use_predictions, use_model)`` for scoring: one of them (scoring takes either).

    ``auto`` scores with what labels are written from (the predictions when there are
    some, else the model): the combination weights follow the measured error of exactly
    those labels, so the easy tier is calibrated on the right thing.
    """
    choice: str = p.score_with
    if choice == "auto":
        choice = (
            "predictions"
            if p.predictions is not None
            else "model"
            if checkpoint is not None
            else "none"
        )
    return choice == "predictions", choice == "model" and checkpoint is not None


def dask_predictions(p: ProjectConfig, pc: PredictionsConfig, project: Any, opened: Any) -> Any:
    """The project's predictions as each Dask worker opens them again from their source."""
    from autolabel.engine_dask import Opener, ReopenablePredictions

    return ReopenablePredictions(
        Opener(pc.source, pc.format, pc.storage_options or None, pc.options),
        project=Opener(
            p.source, getattr(project, "name", p.format), p.storage_options or None, p.options
        ),
        opened=opened,
    )


def label_inputs(p: ProjectConfig, checkpoint: str | None) -> tuple[bool, bool]:
    """``(use_predictions, use_model)`` for shadow/autolabel: what would be written."""
    choice: str = p.label_with
    if choice == "auto":
        choice = "predictions" if p.predictions is not None else "model"
    return choice == "predictions", choice == "model" and checkpoint is not None


ITEMS_KEPT = 20_000
"""Up to this many items a run keeps what the stats step read for the later steps (one
pass over the project); a larger project is streamed by each step, in bounded memory."""


class KeptItems:
    """A stream of items that keeps what went through, up to ``limit`` items: ``items`` is
    the whole list after a complete pass, ``None`` when there were more (or the pass was
    not finished)."""

    def __init__(self, items: Iterable[Item], limit: int) -> None:
        self._source = items
        self._limit = limit
        self._kept: list[Item] | None = []
        self._done = False

    def __iter__(self) -> Iterator[Item]:
        for item in self._source:
            if self._kept is not None:
                self._kept.append(item)
                if len(self._kept) > self._limit:
                    self._kept = None
            yield item
        self._done = True

    @property
    def items(self) -> list[Item] | None:
        return self._kept if self._done else None


class _Run:
    """The state of one run while its steps execute."""

    def __init__(
        self, cfg: AppConfig, name: str, store: ReportStore, record: RunRecord, progress: bool
    ) -> None:
        self.cfg = cfg
        self.name = name
        self.p = cfg.projects[name]
        self.store = store
        self.record = record
        self.progress = progress
        self.run_dir = store.make_run_dir(name, record.run_id)
        self.project: Any = None
        self.predictions: Any = None
        self.checkpoint: str | None = None
        self.label_map = LabelMap()
        # the project's items as the stats step read them, for every later step; None
        # for a project over ITEMS_KEPT items, which each step streams again
        self.items: list[Item] | None = None
        self._table: tuple[Any, dict[str, Any]] | None = None  # difficulty.parquet, read once

    def step(self, label: str, fn: Callable[[], None]) -> None:
        log.info("%s %s: %s", self.name, self.record.run_id, label)
        start = time.perf_counter()
        try:
            fn()
        except Exception as exc:
            raise StepFailed(label, exc) from exc
        finally:
            elapsed = time.perf_counter() - start
            self.record.steps[label] = round(self.record.steps.get(label, 0.0) + elapsed, 3)

    def table(self) -> tuple[Any, dict[str, Any]]:
        """The run's difficulty table and metadata, read once after scoring; the gate
        re-tiers it in place, the report and publishing read it from here."""
        if self._table is None:
            from difficulty.table import read_difficulty

            self._table = read_difficulty(self.run_dir, self.cfg.report_store_options or None)
        return self._table

    def write_json(self, name: str, data: Any) -> None:
        rel = f"{self.store.run_rel(self.name, self.record.run_id)}/{name}"
        self.store.fs.write_text(rel, json.dumps(data, indent=2, sort_keys=True, default=str))
        self.record.outputs[name.rsplit(".", 1)[0]] = self.store.fs.url_of(rel)

    # -- steps ---------------------------------------------------------------------
    def stats(self) -> None:
        from connectors.project import open_predictions, open_project
        from connectors.stats import compute_stats

        p = self.p
        if p.engine == "local" and p.train is None:
            # the decode workers' fork server starts while the items are read (a run that
            # trains loads torch here first, and its workers are then forked from here)
            from difficulty.workerstart import start_workers_early

            start_workers_early(p.num_workers)
        self.project = open_project(
            p.source, p.format, p.storage_options or None,
            allow_image_hosts=p.allow_image_hosts, **p.options,
        )  # fmt: skip
        if p.predictions is not None:
            self.predictions = open_predictions(
                p.predictions.source,
                p.predictions.format,
                p.predictions.storage_options or None,
                project=self.project,
                **p.predictions.options,
            )
        self.label_map = build_label_map(p)
        kept = KeptItems(self.project.iter_items(), ITEMS_KEPT)
        stats = compute_stats(self.project, self.predictions, label_map=self.label_map, items=kept)
        self.items = kept.items
        self.write_json("stats.json", stats)
        if "label_map_check" in stats:  # the report shows it
            self.write_json("label_map_check.json", stats["label_map_check"])
        for key in ("items", "labeled", "auto_labeled", "unlabeled", "boxes", "predictions"):
            if isinstance(stats.get(key), int):
                self.record.counts[key] = stats[key]
        errors = stats.get("errors")
        self.record.counts["item_errors"] = len(errors) if isinstance(errors, list) else errors

    def train(self) -> None:
        from difficulty.training import TrainOptions, train_model

        t = self.p.train
        if t is None:
            self.checkpoint = self.p.model
            return
        out = f"{self.run_dir}/model.pt"
        init = self.previous_model() if t.warm_start else None
        if init is not None:
            log.info("%s: training starts from the previous run's model %s", self.name, init)
            self.record.counts["warm_start"] = init
        train_model(
            self.project.iter_items() if self.items is None else self.items,
            self.project,
            TrainOptions(**t.model_dump(exclude={"warm_start"})),
            out=out,
            init=init,
            progress=self.progress,
        )
        self.checkpoint = out
        self.record.outputs["model"] = out

    def previous_model(self) -> str | None:
        """The model trained by the latest earlier successful run, if any."""
        for earlier in reversed(self.store.earlier_runs(self.name, self.record.run_id)):
            if "model" in earlier.outputs and self.store.has_output(
                self.name, earlier.run_id, "model.pt"
            ):
                return earlier.outputs["model"]
        return None

    def reference(self) -> str | None:
        """The folder of the latest earlier successful run that has scores."""
        for earlier in reversed(self.store.earlier_runs(self.name, self.record.run_id)):
            if self.store.has_output(self.name, earlier.run_id, "difficulty.parquet"):
                return self.store.run_dir(self.name, earlier.run_id)
        return None

    def score(self) -> None:
        from autolabel.engine_dask import score_project_with_engine

        p = self.p
        reference = self.reference()
        log.info("%s: scoring against reference %s", self.name, reference or "(none: first run)")
        use_predictions, use_model = score_inputs(p, self.checkpoint)
        predictions = self.predictions if use_predictions else None
        if predictions is not None and p.engine == "dask" and p.predictions is not None:
            predictions = dask_predictions(p, p.predictions, self.project, predictions)
        result = score_project_with_engine(
            self.project,
            score_options(p),
            items=self.items,
            engine=p.engine,
            scheduler=p.scheduler,
            n_workers=p.dask_workers,
            staging=p.dask_staging,
            partition_size=p.dask_partition_size,
            predictions=predictions,
            checkpoint=self.checkpoint if use_model else None,
            label_map=self.label_map,
            reference=reference,
            out_dir=self.run_dir,
            storage_options=self.cfg.report_store_options or None,
            progress=self.progress,
            run_id=self.record.run_id,
        )
        self.record.outputs.update({k: str(v) for k, v in result.paths.items()})
        self.record.outputs.setdefault("difficulty", f"{self.run_dir}/difficulty.parquet")
        if reference:
            self.record.counts["reference"] = reference
        if p.engine != "local":
            self.record.counts["engine"] = p.engine
        summary = result.summary
        self.record.counts["scored_with"] = (
            "model" if use_model else "predictions" if use_predictions else "images"
        )
        for key in ("scored", "errors", "tiers", "scorers"):
            if key in summary:
                self.record.counts[f"score_{key}" if key in ("errors",) else key] = plain(
                    summary[key]
                )

    def report(self) -> None:
        from difficulty.report import write_report

        p = self.p
        history = [
            self.store.run_dir(self.name, r.run_id)
            for r in self.store.earlier_runs(self.name, self.record.run_id)
        ]
        outputs = write_report(
            self.run_dir,
            plan_settings=build_plan_settings(p),
            history=history,
            project=self.project,
            predictions=self.predictions,
            storage_options=self.cfg.report_store_options or None,
            table=self.table(),
        )
        self.record.outputs.update({k: str(v) for k, v in outputs.items()})

    def publish(self) -> None:
        """Each item's tier and difficulty to the platform (Label Studio Data Manager columns)."""
        import pandas as pd

        df, _ = self.table()
        rows = zip(df["item_id"].astype(str), df["tier"], df["score"], strict=True)
        self.record.counts["published"] = self.project.publish_difficulty(
            (i, t if isinstance(t, str) else None, None if pd.isna(s) else float(s))
            for i, t, s in rows
        )

    def gate(self) -> None:
        from autolabel.gate import run_autolabel

        p = self.p
        use_predictions, use_model = label_inputs(p, self.checkpoint)
        table = self.table()
        self._table = None  # until the gate is through, the table on disk is the run's
        result = run_autolabel(
            self.project,
            gate_options(p),
            items=self.items,
            table=table,
            difficulty_dir=self.run_dir,
            predictions=self.predictions if use_predictions else None,
            checkpoint=self.checkpoint if use_model else None,
            label_map=self.label_map,
            out_dir=self.run_dir,
            storage_options=self.cfg.report_store_options or None,
            run_id=self.record.run_id,
        )
        self._table = table  # re-tiered by the gate, as written
        self.record.outputs["autolabel"] = result.report_path or f"{self.run_dir}/autolabel.json"
        self.record.counts[p.stage] = plain(
            {
                "verdict": result.verdict(),
                "threshold": result.threshold,
                "bound": result.bound,
                "epsilon": result.epsilon,
                "delta": result.delta,
                "coverage": result.coverage,
                "eligible": result.n_eligible,
                "selected": len(result.selected),
                "written": len(result.written),
                "with_boxes": result.labels.with_boxes,
                "empty": result.labels.empty,
                "refused": len(result.refused),
                "audit": len(result.audit),
                "audit_precision": result.precision,
                "agreement": result.agreement.model_dump() if result.agreement else None,
            }
        )
        if result.tiers is not None:  # the easy tier is cut at the calibrated threshold
            self.record.counts["tiers"] = result.tiers.counts


def plain(value: Any) -> Any:
    """``value`` as plain JSON data (numpy scalars become numbers, other objects strings)."""

    def default(obj: Any) -> Any:
        item = getattr(obj, "item", None)
        return item() if callable(item) else str(obj)

    return json.loads(json.dumps(value, default=default))


class StepFailed(Exception):
    """A step of a run failed; the run is recorded ``failed`` with this message."""

    def __init__(self, step: str, cause: BaseException) -> None:
        self.step = step
        self.cause = cause
        super().__init__(f"{step}: {type(cause).__name__}: {cause}")


def run_project(
    cfg: AppConfig,
    name: str,
    *,
    run_id: str | None = None,
    trigger: str = "manual",
    progress: bool = False,
    store: ReportStore | None = None,
) -> RunRecord:
    """One full run of project ``name`` at its configured stage; never raises for a failed step.

    Returns the run's record (``status`` ``ok`` or ``failed``); the same record is in
    the report store at ``<project>/<run_id>/run.json``.
    """
    p = cfg.projects[name]
    record = RunRecord(
        run_id=run_id or new_run_id(),
        project=name,
        stage=p.stage,
        trigger=trigger,
        started=utcnow(),
        owner=str(current_owner()),
    )
    try:
        try:  # the report store itself can fail: unreachable, read-only, full, no bucket
            store = store or ReportStore(
                cfg.report_store, cfg.report_store_options, create=cfg.report_store_create
            )
            run = _Run(cfg, name, store, record, progress)
            store.write_record(record)
        except Exception as exc:
            raise StepFailed("report store", exc) from exc
        run.step("stats", run.stats)
        if p.train is not None or p.model is not None:
            run.step("train" if p.train is not None else "model", run.train)
        run.step("score", run.score)
        gate_failed: StepFailed | None = None
        if p.stage in ("shadow", "autolabel"):
            try:
                run.step(p.stage, run.gate)
            except StepFailed as exc:  # the report still shows what was scored
                gate_failed = exc
        run.step("report", run.report)  # once, after the gate: it shows what the gate did
        if getattr(run.project, "data_columns", False):  # opt-in: Label Studio columns
            run.step("publish", run.publish)  # after the gate: the tiers it cut
        if gate_failed is not None:
            raise gate_failed
        record.status = "ok"
    except StepFailed as exc:
        # Errors raised on purpose (bad input, bad usage) carry their own message; anything
        # else is a bug somewhere and gets its traceback.
        expected = isinstance(exc.cause, LabelTriageError | OSError)  # input or storage
        log.error(
            "run %s of project %s failed: %s",
            record.run_id,
            name,
            exc,
            exc_info=None if expected else exc.cause,
        )
        if expected:
            log.debug("traceback of %s", exc.step, exc_info=exc.cause)
        record.status = "failed"
        record.error = redact_url(str(exc))
    except (KeyboardInterrupt, SystemExit) as exc:  # SIGINT / SIGTERM: record it, then stop
        record.status = "failed"
        record.error = f"interrupted ({type(exc).__name__})"
        raise
    finally:
        record.finished = utcnow()
        _write_final_record(cfg, record, store)
    log.info("run %s of project %s: %s", record.run_id, name, record.status)
    return record


def _recover_records(store: ReportStore | None, name: str, *, lock_held: bool) -> list[RunRecord]:
    """Records left ``running`` by dead runs of ``name``, now ``failed`` (see ReportStore)."""
    if store is None:
        return []
    try:
        return store.recover_records(name, lock_held=lock_held)
    except Exception as exc:
        log.warning("project %s: could not check earlier runs' records: %s", name, exc)
        return []


def _write_final_record(cfg: AppConfig, record: RunRecord, store: ReportStore | None) -> None:
    """Write the run's last record; a report store that fails is logged in one line."""
    try:
        (store or ReportStore(cfg.report_store, cfg.report_store_options)).write_record(record)
    except Exception as exc:
        why = f"run.json not written to {redact_url(cfg.report_store)}: {type(exc).__name__}: {exc}"
        log.error("run %s of project %s: %s", record.run_id, record.project, why)
        if record.status != "failed":
            record.status = "failed"
            record.error = f"report store: {why}"


def _skipped(cfg: AppConfig, name: str, trigger: str, why: str) -> RunRecord:
    now = utcnow()
    return RunRecord(
        run_id=new_run_id(now), project=name, stage=cfg.projects[name].stage, trigger=trigger,
        started=now, finished=now, status="skipped", error=why,
    )  # fmt: skip


def run_locked(
    cfg: AppConfig,
    name: str,
    *,
    run_fn: RunFunction = run_project,
    trigger: str = "manual",
    slot: str | None = None,
    progress: bool = False,
    db: StateDB | None = None,
) -> RunRecord:
    """Run ``name`` under its project lock; a run that finds it taken is recorded ``skipped``.

    The lock and the run history live in the state database (the scheduler's job store
    URL).  ``slot`` names the scheduled time a run is for: a second run for the same slot
    (two daemons sharing one store fire the same job) is skipped too.  A remote report
    store without ``scheduler.job_store`` has no database: the run then goes ahead
    without a lock, with a warning.
    """
    try:
        store: ReportStore | None = ReportStore(
            cfg.report_store, cfg.report_store_options, create=cfg.report_store_create
        )
    except Exception as exc:  # the run records this failure itself
        log.debug("report store %s: %s", redact_url(cfg.report_store), exc)
        store = None
    url = cfg.job_store_url()
    if db is None and url is None:
        log.warning(
            "no scheduler.job_store for a remote report store: running %s without a lock", name
        )
        _recover_records(store, name, lock_held=False)
        return run_fn(cfg, name, trigger=trigger, progress=progress)
    own_db = db is None
    try:
        state = db if db is not None else StateDB(url)  # type: ignore[arg-type]
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        raise LabelTriageError(
            f"the state database {redact_url(str(url))} cannot be opened "
            f"(scheduler.job_store): {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from exc
    try:
        with state.lock(name, ttl=cfg.scheduler.lock_ttl_seconds).held() as acquired:
            if acquired:  # runs of this project that died without recording their end
                for leftover in _recover_records(store, name, lock_held=True):
                    state.add_history(leftover)
            done = state.slot_run(name, slot) if acquired and slot is not None else None
            if not acquired:
                holder = state.lock_holder(name)
                owner = holder["owner"] if holder else "lock held"
                record = _skipped(
                    cfg, name, trigger, f"a run of {name} is already in progress ({owner})"
                )
            elif done is not None:
                record = _skipped(
                    cfg, name, trigger, f"the run scheduled for {slot} already ran (run {done})"
                )
            else:
                run_id = new_run_id()
                try:
                    record = run_fn(cfg, name, run_id=run_id, trigger=trigger, progress=progress)
                except (KeyboardInterrupt, SystemExit):
                    with contextlib.suppress(Exception):
                        interrupted = store.read_record(name, run_id) if store else None
                        if interrupted is not None:
                            state.add_history(interrupted, slot=slot)
                    raise
                except Exception as exc:
                    log.exception("run %s of project %s raised", run_id, name)
                    why = redact_url(f"{type(exc).__name__}: {exc}")
                    record = _skipped(cfg, name, trigger, why)
                    record.run_id, record.status = run_id, "failed"
                    _write_final_record(cfg, record, store)
            if record.status == "skipped":
                _write_final_record(cfg, record, store)
                log.warning("project %s: skipped, %s", name, record.error)
            state.add_history(record, slot=slot)
    finally:
        if own_db:
            state.dispose()
    return record

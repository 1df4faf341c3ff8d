"""A FiftyOne dataset as a project (:class:`FiftyOneDataset`) and as predictions
(:class:`FiftyOnePredictions`); conventions in :mod:`connectors.formats.fiftyone`.

Reading streams the samples (``iter_samples`` over a view of the fields needed); a sample
that cannot be read (a box that does not fit its image, a label of a kind labeltriage does
not read, an image whose size cannot be found) is an item with ``error`` set, naming the
image file, the sample id, the field and the label.

Writing auto-labels (:meth:`FiftyOneDataset.write_labels`) sets the auto-label field of
a sample with one conditional update: it applies only while the sample's human label
field *and* the auto-label field are both empty, so a human label that appears between
reading and writing is never overwritten, and a second run never stacks labels on the
first (the sample is refused, naming the run that labeled it).  Every written label carries
its provenance as attributes (:data:`~connectors.formats.fiftyone.PROVENANCE_ATTRIBUTES`).
Rollback empties the field again, for exactly the samples a run wrote, and keeps a label
whose content changed since it was written (a person edited it).  The run manifests live
in the dataset's database (:mod:`connectors.formats.fiftyone.state`), so a rollback works
from any machine that can open the dataset.

:meth:`FiftyOneDataset.publish_scores` writes the scores of a run back as sample fields and
tier tags (``lt_difficulty``, ``lt_tier``, ``lt_<scorer>``, ``lt_easy``…), so that the
FiftyOne App can sort and filter by them.

The database is FiftyOne's: its own MongoDB, started on first use, or the one named by
``FIFTYONE_DATABASE_URI`` (see FiftyOne's configuration).
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any, ClassVar

import fiftyone as fo
import fiftyone.core.labels as fol
import numpy as np
import pandas as pd
from bson import ObjectId
from bson.errors import InvalidId
from fiftyone import ViewField as F

from connectors.errors import InputError, UsageError
from connectors.formats.base import (
    LabelWrite,
    PredictionSource,
    ProjectFormat,
    Provenance,
    WriteOutcome,
    WrittenRecord,
)
from connectors.formats.fiftyone import (
    DEFAULT_LABEL_FIELD,
    DEFAULT_PREDICTIONS_FIELD,
    DEFAULT_PREFIX,
    PREDICTION_OPTIONS,
    PROJECT_OPTIONS,
    RUN_ID_ATTRIBUTE,
    TIERS,
    DatasetURL,
    as_bool,
    check_field_name,
    content_sha256,
    parse_dataset_url,
    relative_to_xyxy,
    score_field_names,
    xyxy_to_relative,
)
from connectors.formats.fiftyone.state import DatasetStateFS, state_key
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus, Prediction
from connectors.storage import ProjectFS

log = logging.getLogger(__name__)

READ_KINDS = (fol.Detections, fol.Detection, fol.Classification)


# -- datasets ----------------------------------------------------------------------------------


def load_dataset(name: str) -> fo.Dataset:
    """The image dataset ``name``; :class:`UsageError` listing the datasets when there is none."""
    if not fo.dataset_exists(name):
        names = fo.list_datasets()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        where = fo.config.database_uri or fo.config.database_dir
        listing = ", ".join(names[:20]) if names else "none"
        raise UsageError(
            f"no FiftyOne dataset {name!r}{hint} in the database at {where}; datasets: {listing}"
        )
    dataset = fo.load_dataset(name)
    if dataset.media_type not in (None, "image"):  # None: no sample yet
        raise UsageError(
            f"FiftyOne dataset {name!r} holds {dataset.media_type} samples; labeltriage reads images"
        )
    return dataset


def media_uri(filepath: str) -> str:
    """A sample's ``filepath`` as an item uri: a local path becomes a ``file://`` URL."""
    return filepath if "://" in filepath else "file://" + filepath


def _attribute(label: Any, name: str) -> Any:
    return label.get_field(name) if label.has_field(name) else None


def _label_kind(dataset: fo.Dataset, name: str) -> type | None:
    """The label class a field holds (``None`` when the field is missing or holds no label)."""
    field = dataset.get_field(name)
    kind = getattr(field, "document_type", None)
    return kind if isinstance(kind, type) and issubclass(kind, fol.Label) else None


def _check_kind(dataset: fo.Dataset, name: str, option: str) -> type | None:
    kind = _label_kind(dataset, name)
    if dataset.get_field(name) is not None and (kind is None or not issubclass(kind, READ_KINDS)):
        found = kind.__name__ if kind is not None else type(dataset.get_field(name)).__name__
        raise UsageError(
            f"field {name!r} of FiftyOne dataset {dataset.name!r} ({option}) holds {found}; "
            "labeltriage reads Detections, Detection or Classification fields"
        )
    return kind


def image_size(sample: Any) -> tuple[int, int]:
    """``(width, height)`` from the sample's metadata, else from the image header.

    The computed metadata is not saved into the dataset.  Raises :class:`ValueError`
    saying why when the image cannot be read.
    """
    meta = sample.metadata
    width = getattr(meta, "width", None) if meta is not None else None
    height = getattr(meta, "height", None) if meta is not None else None
    if width and height:
        return int(width), int(height)
    try:
        built = fo.ImageMetadata.build_for(sample.filepath)
    except Exception as exc:  # FiftyOne raises what PIL or the filesystem raises
        raise ValueError(f"cannot read the image size: {type(exc).__name__}: {exc}") from exc
    if not built.width or not built.height:
        raise ValueError("cannot read the image size from the image header")
    return int(built.width), int(built.height)


def label_annotations(
    label: Any, width: int | None, height: int | None, *, field: str, scores: bool
) -> list[Annotation]:
    """A FiftyOne label → annotations (pixel ``xyxy`` boxes, or one class label).

    ``scores``: keep each label's ``confidence`` (predictions); human labels have none.
    Raises :class:`ValueError` naming the field and the label when one cannot be read.
    """
    if isinstance(label, fol.Classification):
        if not label.label:
            raise ValueError(f"{field}: classification {label.id} has no label")
        score = label.confidence if scores else None
        return [Annotation(label=str(label.label), score=_score(score, field, label.id))]
    if isinstance(label, fol.Detections):
        detections = list(label.detections or [])
    elif isinstance(label, fol.Detection):
        detections = [label]
    else:
        raise ValueError(
            f"{field} holds {type(label).__name__}; labeltriage reads Detections, "
            "Detection or Classification"
        )
    out = []
    for d in detections:
        if not d.label:
            raise ValueError(f"{field}: detection {d.id} has no label")
        try:
            box = relative_to_xyxy(d.bounding_box, width, height)
        except ValueError as exc:
            raise ValueError(f"{field}: detection {d.id}: {exc}") from exc
        score = d.confidence if scores else None
        out.append(Annotation(label=str(d.label), box=box, score=_score(score, field, d.id)))
    return out


def _score(value: Any, field: str, label_id: str) -> float | None:
    if value is None:
        return None
    score = float(value)
    if not (0.0 <= score <= 1.0):
        raise ValueError(f"{field}: label {label_id} has confidence {score}, outside [0, 1]")
    return score


# -- the project -------------------------------------------------------------------------------


class FiftyOneDataset(ProjectFormat):
    """A FiftyOne image dataset as a labeltriage project.

    Build it with :meth:`from_url` (``fiftyone://NAME``).  Options (also as the URL's
    query, ``fiftyone://NAME?label_field=gt``): ``label_field`` (human labels, default
    ``ground_truth``), ``prefix`` (of everything labeltriage writes, default ``lt_``),
    ``autolabel_field`` (default ``<prefix>autolabel``), ``publish_scores`` (write the
    scores back into the dataset, default true).
    """

    name: ClassVar[str] = "fiftyone"
    tasks: ClassVar[tuple[str, ...]] = ("detection", "classification")

    def __init__(self, project: ProjectFS, **options: Any) -> None:
        url = parse_dataset_url(project.url, PROJECT_OPTIONS)
        dataset = options.pop("dataset", None)
        options = {**url.options, **options}
        unknown = sorted(set(options) - set(PROJECT_OPTIONS))
        if unknown:
            raise UsageError(
                f"{project.url}: unknown option(s) {unknown} (known: {', '.join(PROJECT_OPTIONS)})"
            )
        self.dataset: fo.Dataset = dataset if dataset is not None else load_dataset(url.name)
        self.location = url
        self.prefix = str(options.get("prefix", DEFAULT_PREFIX))
        self.label_field = check_field_name(
            str(options.get("label_field", DEFAULT_LABEL_FIELD)), "label_field"
        )
        self.autolabel_field = check_field_name(
            str(options.get("autolabel_field", f"{self.prefix}autolabel")), "autolabel_field"
        )
        self.publish = as_bool(options.get("publish_scores", True), "publish_scores")
        if self.autolabel_field == self.label_field:
            raise UsageError(
                f"{project.url}: autolabel_field and label_field are both {self.label_field!r}; "
                "auto-labels never go into the human label field"
            )
        label_kind = _check_kind(self.dataset, self.label_field, "label_field")
        auto_kind = _check_kind(self.dataset, self.autolabel_field, "autolabel_field")
        self._check_autolabel_field_is_ours()
        if self.dataset.get_field(self.label_field) is None:
            log.warning(
                "FiftyOne dataset %r has no field %r: every sample reads as unlabeled "
                "(label fields: %s)",
                self.dataset.name,
                self.label_field,
                ", ".join(self._label_fields()) or "none",
            )
        kind = label_kind or auto_kind
        task = (
            "classification"
            if kind is not None and issubclass(kind, fol.Classification)
            else "detection"
        )
        # The task follows the dataset's label field: this instance's ``tasks`` is that one.
        setattr(self, "tasks", (task,))  # noqa: B010
        state = (
            project
            if isinstance(project, DatasetStateFS)
            else DatasetStateFS(url.url, state_key(self.dataset))
        )
        super().__init__(state, **options)

    @classmethod
    def from_url(
        cls, source: str, storage_options: dict[str, Any] | None = None, **options: Any
    ) -> FiftyOneDataset:
        """The dataset at ``source`` (``fiftyone://NAME[?option=value…]``)."""
        _refuse_storage_options(source, storage_options)
        url = parse_dataset_url(source, PROJECT_OPTIONS)
        dataset = load_dataset(url.name)
        state = DatasetStateFS(url.url, state_key(dataset))
        return cls(state, dataset=dataset, **{**url.options, **options})

    @classmethod
    def detect(cls, project: ProjectFS) -> bool:
        return project.url.startswith("fiftyone://")

    @property
    def task(self) -> str:
        return self.tasks[0]

    def _label_fields(self) -> list[str]:
        schema = self.dataset.get_field_schema(embedded_doc_type=fol.Label)
        return sorted(n for n in schema if not n.startswith(self.prefix))

    def _check_autolabel_field_is_ours(self) -> None:
        """Refuse an auto-label field that holds labels labeltriage did not write."""
        if self.dataset.get_field(self.autolabel_field) is None:
            return
        path = f"{self.autolabel_field}.{RUN_ID_ATTRIBUTE}"
        foreign = self.dataset.exists(self.autolabel_field).match(~F(path).exists()).count()
        if foreign:
            raise UsageError(
                f"field {self.autolabel_field!r} of FiftyOne dataset {self.dataset.name!r} holds "
                f"{foreign} label(s) that labeltriage did not write; choose another "
                "autolabel_field (or prefix)"
            )

    # -- reading ---------------------------------------------------------------------------
    def _present(self, *names: str) -> list[str]:
        return [n for n in names if self.dataset.get_field(n) is not None]

    def iter_items(self) -> Iterator[Item]:
        fields = self._present(self.label_field, self.autolabel_field)
        view = self.dataset.select_fields(fields) if fields else self.dataset
        for sample in view.iter_samples():
            yield self.sample_to_item(sample, fields)

    def sample_to_item(self, sample: Any, fields: list[str] | None = None) -> Item:
        """One sample → an :class:`Item`; a sample that cannot be read has ``error`` set."""
        fields = self._present(self.label_field, self.autolabel_field) if fields is None else fields
        sample_id = str(sample.id)
        filepath = str(sample.filepath)
        uri = media_uri(filepath)
        meta: dict[str, Any] = {"fiftyone_filepath": filepath}
        try:
            width, height = image_size(sample)
            human = sample[self.label_field] if self.label_field in fields else None
            auto = sample[self.autolabel_field] if self.autolabel_field in fields else None
            if human is None and auto is None:
                return Item(item_id=sample_id, uri=uri, width=width, height=height, meta=meta)
            if human is None:
                meta["labeltriage_run_id"] = _attribute(auto, RUN_ID_ATTRIBUTE)
            field, label = (
                (self.label_field, human) if human is not None else (self.autolabel_field, auto)
            )
            return Item(
                item_id=sample_id,
                uri=uri,
                width=width,
                height=height,
                status=ItemStatus.LABELED if human is not None else ItemStatus.AUTO_LABELED,
                source=AnnotationSource.HUMAN if human is not None else AnnotationSource.AUTO,
                annotations=label_annotations(
                    label, width, height, field=field, scores=human is None
                ),
                meta=meta,
            )
        except (ValueError, TypeError) as exc:
            error = InputError(str(exc), file=filepath, item=sample_id)
            log.warning("%s", error)
            return Item(
                item_id=sample_id, uri=uri, meta={**meta, "error_file": filepath}, error=str(error)
            )

    # -- writing a whole project -----------------------------------------------------------
    def write_items(self, items: Iterable[Item], classes: list[str] | None = None) -> None:
        """Add ``items`` as samples of the (empty) dataset, their labels in the label field.

        Human labels go into the label field, auto-labels into the auto-label field (with
        the run id of ``meta["labeltriage_run_id"]``).  Item uris must be local paths or
        ``file://`` URLs; ``classes`` become the label field's class list.
        """
        if len(self.dataset):
            raise UsageError(
                f"FiftyOne dataset {self.dataset.name!r} already has {len(self.dataset)} samples; "
                "write_items fills an empty dataset"
            )
        batch: list[fo.Sample] = []
        for item in items:
            if item.error is not None:
                log.warning("item %s not written: %s", item.item_id, item.error)
                continue
            batch.append(self._item_to_sample(item))
            if len(batch) >= 1000:
                self.dataset.add_samples(batch, progress=False)
                batch = []
        if batch:
            self.dataset.add_samples(batch, progress=False)
        if classes:
            self.dataset.classes = {**self.dataset.classes, self.label_field: list(classes)}
            self.dataset.save()

    def _item_to_sample(self, item: Item) -> fo.Sample:
        if item.uri.startswith("file://"):
            filepath = item.uri[len("file://") :]
        elif "://" in item.uri or item.uri.startswith("/"):
            filepath = item.uri
        else:
            raise UsageError(
                f"item {item.item_id!r}: uri {item.uri!r} is relative; FiftyOne needs full paths"
            )
        sample = fo.Sample(filepath=filepath)
        width, height = item.width, item.height
        if width and height:
            sample.metadata = fo.ImageMetadata(width=width, height=height)
        if not item.is_labeled:
            return sample
        if item.annotations and any(a.box is not None for a in item.annotations):
            width, height = image_size(sample)
        provenance = None
        if item.status is ItemStatus.AUTO_LABELED:
            run_id = str(item.meta.get("labeltriage_run_id") or "imported")
            provenance = Provenance(run_id=run_id, model_version="imported")
        label = self._build_label(item.annotations, width, height, provenance)
        sample[self.autolabel_field if provenance is not None else self.label_field] = label
        return sample

    def _build_label(
        self,
        annotations: list[Annotation],
        width: int | None,
        height: int | None,
        provenance: Provenance | None,
    ) -> fol.Label:
        """Annotations → a ``Detections`` or ``Classification`` (provenance as attributes)."""
        attrs = _provenance_attributes(provenance) if provenance is not None else {}
        per_box = {k: attrs[k] for k in ("lt_run_id", "lt_tier") if k in attrs}
        if self.task == "classification":
            if len(annotations) != 1 or annotations[0].box is not None:
                raise ValueError(f"a classification label is one class, not {len(annotations)}")
            a = annotations[0]
            return fol.Classification(label=a.label, confidence=a.score, **attrs)
        detections = []
        for a in annotations:
            if a.box is None:
                raise ValueError(f"class label {a.label!r} in a detection project has no box")
            detections.append(
                fol.Detection(
                    label=a.label,
                    bounding_box=xyxy_to_relative(a.box, width, height),
                    confidence=a.score,
                    **per_box,
                )
            )
        return fol.Detections(detections=detections, **attrs)

    # -- auto-labels -----------------------------------------------------------------------
    def _declare_autolabel_field(self) -> None:
        """Declare the auto-label field and its provenance attributes (for the App's filters)."""
        kind = fol.Classification if self.task == "classification" else fol.Detections
        name = self.autolabel_field
        if self.dataset.get_field(name) is None:
            self.dataset.add_sample_field(name, fo.EmbeddedDocumentField, embedded_doc_type=kind)
        for attr, ftype in _ATTRIBUTE_TYPES.items():
            if self.dataset.get_field(f"{name}.{attr}") is None:
                self.dataset.add_sample_field(f"{name}.{attr}", ftype)
        if kind is fol.Detections:
            for attr in ("lt_run_id", "lt_tier"):
                if self.dataset.get_field(f"{name}.detections.{attr}") is None:
                    self.dataset.add_sample_field(f"{name}.detections.{attr}", fo.StringField)

    def write_labels(self, writes: list[LabelWrite]) -> WriteOutcome:
        outcome = WriteOutcome()
        if not writes:
            return outcome
        self._declare_autolabel_field()
        samples = _collection(self.dataset)
        written = 0
        for w in writes:
            item_id = w.item.item_id
            if w.item.has_human_label:
                outcome.refused[item_id] = "has a human label (as read)"
                continue
            try:
                oid = ObjectId(item_id)
                width, height = w.item.width, w.item.height
                if not (width and height):
                    width, height = image_size(self.dataset[item_id])
                label = self._build_label(w.annotations, width, height, w.provenance)
            except (InvalidId, KeyError) as exc:
                outcome.refused[item_id] = f"not a sample of the dataset: {exc}"
                continue
            except (ValueError, InputError) as exc:
                outcome.refused[item_id] = f"cannot convert the labels: {exc}"
                continue
            raw = label.to_mongo()
            # One conditional update: only while neither a human label nor an auto-label is there.
            result = samples.update_one(
                {"_id": oid, self.label_field: None, self.autolabel_field: None},
                {"$set": {self.autolabel_field: raw, "last_modified_at": _now()}},
            )
            if result.modified_count != 1:
                outcome.refused[item_id] = self._why_not_written(oid)
                continue
            written += 1
            outcome.records.append(
                WrittenRecord(
                    kind="entry",
                    path=self.autolabel_field,
                    item_id=item_id,
                    sha256=content_sha256(raw),
                    entry_ids=[w.provenance.run_id],
                )
            )
        if written:
            self.dataset.reload()
        log.info(
            "FiftyOne dataset %s: %d auto-labels written into %s, %d refused",
            self.dataset.name,
            written,
            self.autolabel_field,
            len(outcome.refused),
        )
        return outcome

    def _why_not_written(self, oid: ObjectId) -> str:
        doc = _collection(self.dataset).find_one(
            {"_id": oid}, {self.label_field: 1, self.autolabel_field: 1}
        )
        if doc is None:
            return "the sample no longer exists in the dataset"
        if doc.get(self.label_field) is not None:
            return f"has a human label in field {self.label_field!r} (added since it was read)"
        auto = doc.get(self.autolabel_field)
        if isinstance(auto, dict):
            return (
                f"already auto-labeled by run {auto.get(RUN_ID_ATTRIBUTE)} in field "
                f"{self.autolabel_field!r}; roll that run back to label it again"
            )
        return "the sample changed while it was written"

    def remove_written(self, records: list[WrittenRecord]) -> list[str]:
        return [
            f"{r.item_id}: {why}"
            for r, why in zip(records, self.remove_written_each(records), strict=True)
            if why is not None
        ]

    def remove_written_each(self, records: list[WrittenRecord]) -> list[str | None]:
        """For each record: ``None`` when its auto-label is gone, else why it was kept.

        A label whose content changed since it was written is kept; so is anything that
        is not an auto-label field (a record naming the human label field is refused).
        """
        samples = _collection(self.dataset)
        outcome: list[str | None] = []
        touched: set[str] = set()
        for record in records:
            field = record.path
            if record.kind != "entry" or field == self.label_field or not field:
                outcome.append(f"record {record.kind}:{field} is not a FiftyOne auto-label")
                continue
            try:
                oid = ObjectId(record.item_id)
            except InvalidId:
                outcome.append(f"{record.item_id!r} is not a sample id")
                continue
            doc = samples.find_one({"_id": oid}, {field: 1})
            current = doc.get(field) if doc is not None else None
            if current is None:
                outcome.append(None)  # the sample or its auto-label is gone already
                continue
            if current.get(RUN_ID_ATTRIBUTE) not in record.entry_ids:
                outcome.append(
                    f"field {field!r} now holds the auto-label of run {current.get(RUN_ID_ATTRIBUTE)}"
                )
                continue
            if record.sha256 is not None and content_sha256(current) != record.sha256:
                outcome.append(f"the auto-label in field {field!r} changed since it was written")
                continue
            result = samples.update_one(
                {"_id": oid, field: current},
                {"$set": {field: None, "last_modified_at": _now()}},
            )
            touched.add(field)
            outcome.append(
                None if result.modified_count == 1 else f"field {field!r} changed while removing"
            )
        if touched:
            self.dataset.reload()
            for field in touched:
                self._drop_if_empty(field)
        return outcome

    def _drop_if_empty(self, field: str) -> None:
        """Remove an auto-label field from the schema once no sample holds a label in it."""
        if self.dataset.get_field(field) is not None and self.dataset.count(field) == 0:
            self.dataset.delete_sample_field(field)
            log.info("FiftyOne dataset %s: empty field %s removed", self.dataset.name, field)

    def records_of_run(self, run_id: str) -> list[WrittenRecord]:
        """Records of every auto-label in the dataset whose provenance names ``run_id``."""
        if self.dataset.get_field(self.autolabel_field) is None:
            return []
        field = self.autolabel_field
        cursor = _collection(self.dataset).find({f"{field}.{RUN_ID_ATTRIBUTE}": run_id}, {field: 1})
        return [
            WrittenRecord(
                kind="entry",
                path=field,
                item_id=str(doc["_id"]),
                sha256=content_sha256(doc[field]),
                entry_ids=[run_id],
            )
            for doc in cursor
        ]

    # -- scores ----------------------------------------------------------------------------
    def publish_scores(self, table: pd.DataFrame, meta: dict[str, Any]) -> dict[str, int]:
        """Write a run's scores into the dataset: sample fields and one tier tag per sample.

        Fields (see :func:`~connectors.formats.fiftyone.score_field_names`):
        ``<prefix>difficulty``, ``<prefix>tier``, ``<prefix><scorer>`` per scorer,
        ``<prefix>error``, and ``<prefix>score_run`` (the run id).  Tags: the previous
        ``<prefix>easy|medium|hard`` tags are removed and the new ones added.  Samples the
        table does not name are left as they are.  Returns counts per tier tag.
        """
        if not self.publish:
            return {}
        scorers = [str(s) for s in meta.get("scorers", [])]
        names = score_field_names(self.prefix, scorers)
        rows = table[table["item_id"].map(_is_object_id)]
        ids = rows["item_id"].astype(str).tolist()
        if not ids:
            return {}
        columns: dict[str, list[Any]] = {}
        for column, name in names.items():
            if column in rows.columns:
                columns[name] = [_plain(v) for v in rows[column]]
        columns[f"{self.prefix}score_run"] = [str(meta.get("run_id") or "")] * len(ids)
        for name, values in columns.items():
            ftype = fo.StringField if name in _string_fields(self.prefix, names) else fo.FloatField
            existing = self.dataset.get_field(name)
            if existing is None:
                self.dataset.add_sample_field(name, ftype)
            elif not isinstance(existing, ftype):
                raise UsageError(
                    f"field {name!r} of FiftyOne dataset {self.dataset.name!r} is a "
                    f"{type(existing).__name__}, not a {ftype.__name__}; choose another prefix"
                )
            self.dataset.set_values(name, dict(zip(ids, values, strict=True)), key_field="id")
        tags = [f"{self.prefix}{t}" for t in TIERS]
        self.dataset.select(ids).untag_samples(tags)
        counts: dict[str, int] = {}
        tier_column = rows["tier"] if "tier" in rows.columns else pd.Series([None] * len(ids))
        for tier, tag in zip(TIERS, tags, strict=True):
            tier_ids = [i for i, t in zip(ids, tier_column, strict=True) if t == tier]
            if tier_ids:
                self.dataset.select(tier_ids).tag_samples(tag)
            counts[tag] = len(tier_ids)
        log.info(
            "FiftyOne dataset %s: scores of run %s written to %d samples (%s)",
            self.dataset.name,
            meta.get("run_id"),
            len(ids),
            ", ".join(f"{k} {v}" for k, v in counts.items()),
        )
        return counts


_ATTRIBUTE_TYPES: dict[str, Any] = {
    "lt_run_id": fo.StringField,
    "lt_tier": fo.StringField,
    "lt_model_version": fo.StringField,
    "lt_score": fo.FloatField,
    "lt_difficulty": fo.FloatField,
    "lt_audit": fo.BooleanField,
}


def _provenance_attributes(p: Provenance) -> dict[str, Any]:
    """The attributes of a written label (see ``PROVENANCE_ATTRIBUTES``)."""
    difficulty = p.extra.get("difficulty")
    return {
        "lt_run_id": p.run_id,
        "lt_tier": p.tier,
        "lt_model_version": p.model_version,
        "lt_score": p.score,
        "lt_difficulty": float(difficulty) if isinstance(difficulty, (int, float)) else None,
        "lt_audit": bool(p.extra["audit"]) if "audit" in p.extra else None,
    }


def _string_fields(prefix: str, names: dict[str, str]) -> set[str]:
    return {names["tier"], names["error"], f"{prefix}score_run"}


def _plain(value: Any) -> Any:
    """A table cell as a plain value for the database: NaN/NA → ``None``, numpy → Python."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _is_object_id(value: Any) -> bool:
    return isinstance(value, str) and ObjectId.is_valid(value)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _collection(dataset: fo.Dataset) -> Any:
    """The dataset's sample collection, for the conditional updates FiftyOne has no call for."""
    return dataset._sample_collection


def _refuse_storage_options(source: str, storage_options: dict[str, Any] | None) -> None:
    if storage_options:
        raise UsageError(
            f"{source}: a FiftyOne dataset takes no storage options; the database is FiftyOne's "
            "(set FIFTYONE_DATABASE_URI to use another one)"
        )


# -- predictions -------------------------------------------------------------------------------


class FiftyOnePredictions(PredictionSource):
    """The predictions of a label field of a FiftyOne dataset (``predictions`` by default).

    Looked up per sample id; ``confidence`` is each label's score.  A classification with
    ``logits`` and a class list for its field (``dataset.classes`` or
    ``default_classes``) gives the full class probabilities (softmax), else the one class
    with its confidence.  Labels that labeltriage wrote (with a run id) are never read as
    predictions.  Options: ``field``, ``model_version`` (else the field's name).
    """

    def __init__(
        self, dataset: fo.Dataset, field: str = DEFAULT_PREDICTIONS_FIELD, **options: Any
    ) -> None:
        unknown = sorted(set(options) - {"model_version"})
        if unknown:
            raise UsageError(
                f"unknown FiftyOne predictions option(s) {unknown} "
                f"(known: {', '.join(PREDICTION_OPTIONS)})"
            )
        self.dataset = dataset
        self.field = check_field_name(field, "field")
        if dataset.get_field(self.field) is None:
            labels = sorted(dataset.get_field_schema(embedded_doc_type=fol.Label))
            raise UsageError(
                f"FiftyOne dataset {dataset.name!r} has no predictions field {self.field!r}; "
                f"label fields: {', '.join(labels) or 'none'}"
            )
        _check_kind(dataset, self.field, "predictions field")
        self.model_version = str(options.get("model_version") or self.field)
        self.source = f"{DatasetURL(dataset.name).url}?field={self.field}"
        self._view = dataset.select_fields(self.field)
        classes = dataset.classes.get(self.field) or dataset.default_classes
        self.classes: list[str] = [str(c) for c in classes or []]

    @classmethod
    def from_url(
        cls,
        source: str,
        storage_options: dict[str, Any] | None = None,
        *,
        project: ProjectFormat | None = None,
        **options: Any,
    ) -> FiftyOnePredictions:
        """Predictions of ``fiftyone://NAME[?field=F]`` (the project's dataset is reused)."""
        _refuse_storage_options(source, storage_options)
        url = parse_dataset_url(source, PREDICTION_OPTIONS)
        options = {**url.options, **options}
        field = str(options.pop("field", DEFAULT_PREDICTIONS_FIELD))
        if isinstance(project, FiftyOneDataset) and project.dataset.name == url.name:
            dataset = project.dataset
            if field in (project.label_field, project.autolabel_field):
                kind = "human labels" if field == project.label_field else "auto-labels"
                raise UsageError(
                    f"{source}: field {field!r} holds the project's {kind}, not predictions"
                )
        else:
            dataset = load_dataset(url.name)
        return cls(dataset, field, **options)

    def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
        if not _is_object_id(item_id):
            return None
        try:
            sample = self._view[item_id]
        except KeyError:
            return None
        return self.sample_prediction(sample, item)

    def sample_prediction(self, sample: Any, item: Item | None = None) -> Prediction | None:
        """The prediction of one sample (``None`` when its field is empty or ours)."""
        label = sample[self.field]
        if label is None or _attribute(label, RUN_ID_ATTRIBUTE) is not None:
            return None
        item_id = str(sample.id)
        try:
            if item is not None and item.width and item.height:
                width, height = item.width, item.height
            elif isinstance(label, fol.Classification):
                width, height = None, None
            else:
                width, height = image_size(sample)
            annotations = label_annotations(label, width, height, field=self.field, scores=True)
        except (ValueError, TypeError) as exc:
            error = InputError(str(exc), file=str(sample.filepath), item=item_id)
            return Prediction(item_id=item_id, source=self.source, error=str(error))
        probs = self._probs(label) if isinstance(label, fol.Classification) else None
        return Prediction(
            item_id=item_id,
            annotations=annotations,
            probs=probs,
            model_version=self.model_version,
            source=self.source,
        )

    def _probs(self, label: fol.Classification) -> dict[str, float]:
        logits = label.logits
        if logits is not None and len(self.classes) == len(logits):
            z = np.asarray(logits, dtype=np.float64)
            p = np.exp(z - z.max())
            p /= p.sum()
            return {c: float(v) for c, v in zip(self.classes, p, strict=True)}
        confidence = label.confidence
        return {str(label.label): float(confidence) if confidence is not None else 1.0}

    def __iter__(self) -> Iterator[Prediction]:
        for sample in self._view.exists(self.field).iter_samples():
            prediction = self.sample_prediction(sample)
            if prediction is not None:
                yield prediction

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.dataset.name, "field": self.field, "model_version": self.model_version}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            load_dataset(state["name"]), state["field"], model_version=state["model_version"]
        )


__all__ = ["FiftyOneDataset", "FiftyOnePredictions", "load_dataset", "media_uri"]

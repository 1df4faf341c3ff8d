"""The contract every registered folder format keeps, checked for each one in the registry.

A format added to :data:`connectors.formats.FORMATS` (in the package or by a plugin, see
README "Extending") is picked up here without an edit: the project is made by the
format's own ``write_items``; ``--format auto`` must find it (and only it); reading it
gives the items back with their status; and the write-back contract holds: an
auto-label run writes the unlabeled items only (a human label is refused, never
overwritten), the items read back as auto-labeled, and rolling the run back restores
every file byte for byte.
"""

from __future__ import annotations

import pytest
from _fileformat_helpers import make_project, png_bytes

from connectors.formats import FORMATS
from connectors.formats.base import LabelWrite, ProjectFormat, Provenance
from connectors.model import Annotation, AnnotationSource, Item, ItemStatus
from connectors.project import detect_format, detect_order
from connectors.runid import new_run_id
from connectors.storage import BOOKKEEPING_DIR, ProjectFS
from connectors.writeback import rollback, write_run

NAMES = "abcd"
HUMAN = "ab"


def _classification(cls: type[ProjectFormat]) -> bool:
    return "detection" not in cls.tasks


def _annotation(classification: bool) -> Annotation:
    return Annotation(label="car", box=None if classification else (2.0, 2.0, 20.0, 20.0))


def make_in_format(name: str) -> ProjectFormat:
    """Four items (``a``, ``b`` labeled by a person), written by the format itself."""
    cls = FORMATS[name]
    classification = _classification(cls)
    # classification formats copy their images in from elsewhere (a hidden folder here)
    folder = ".incoming" if classification else "images"
    fs = make_project({f"{folder}/{i}.png": png_bytes() for i in NAMES}, f"contract-{name}")
    items = [
        Item(
            item_id=i,
            uri=fs.url_of(f"{folder}/{i}.png") if classification else f"{folder}/{i}.png",
            width=40,
            height=30,
            status=ItemStatus.LABELED if i in HUMAN else ItemStatus.UNLABELED,
            source=AnnotationSource.HUMAN if i in HUMAN else None,
            annotations=[_annotation(classification)] if i in HUMAN else [],
        )
        for i in NAMES
    ]
    cls(fs).write_items(items, ["car"])
    return cls(fs)


def snapshot(fs: ProjectFS) -> dict[str, bytes]:
    """Every file outside the bookkeeping folder, with its content."""
    files = [fs.relative(p) for p in fs.fs.find(fs.root)]
    return {f: fs.read_bytes(f) for f in sorted(files) if not f.startswith(BOOKKEEPING_DIR)}


@pytest.mark.parametrize("name", detect_order())
def test_format_is_registered_under_its_name_and_says_what_it_looks_for(name: str) -> None:
    cls = FORMATS[name]
    assert issubclass(cls, ProjectFormat) and cls.name == name
    assert cls.looked_for != ProjectFormat.looked_for, "set looked_for for --format auto errors"
    assert not cls.detect(make_project({}, f"empty-{name}"))


@pytest.mark.parametrize("name", detect_order())
def test_format_is_detected_and_reads_back_what_it_wrote(name: str) -> None:
    fmt = make_in_format(name)
    assert detect_format(fmt.project) == name
    items = list(FORMATS[name](fmt.project).iter_items())
    assert [i.error for i in items] == [None] * len(NAMES)
    assert sorted(i.status.value for i in items) == ["labeled"] * 2 + ["unlabeled"] * 2
    for item in items:
        assert len(item.annotations) == (1 if item.is_labeled else 0)


@pytest.mark.parametrize("name", detect_order())
def test_format_keeps_the_write_back_contract(name: str) -> None:
    fmt = make_in_format(name)
    before = snapshot(fmt.project)
    items = list(fmt.iter_items())
    run_id = new_run_id()
    classification = _classification(type(fmt))
    writes = [
        LabelWrite(
            item=item,
            annotations=[_annotation(classification).model_copy(update={"score": 0.9})],
            provenance=Provenance(run_id=run_id, model_version="m1", score=0.9, tier="easy"),
        )
        for item in items
    ]
    manifest = write_run(fmt, writes, run_id)
    labeled = {i.item_id for i in items if i.is_labeled}
    assert set(manifest.refused) == labeled, "a human label must be refused, never overwritten"

    after = {i.item_id: i for i in FORMATS[name](fmt.project).iter_items()}
    auto = {k for k, i in after.items() if i.status is ItemStatus.AUTO_LABELED}
    assert len(auto) == len(items) - len(labeled)
    for item_id in labeled & set(after):
        assert after[item_id].status is ItemStatus.LABELED

    result = rollback(FORMATS[name](fmt.project), run_id)
    assert not result.kept, result.kept
    assert snapshot(fmt.project) == before

"""Someone else writes while labeltriage writes back: their work is never lost.

Three races, each repeated over many trials (``make test-faults`` runs 25 of each; the
default run has 3 trials of the first, and for S3 and COCO the worst instant made
certain by injecting the other write exactly there):

* **label files** on a local disk: another process creates human label files for
  the very items being auto-labeled;
* **S3** (moto's server on 127.0.0.1): another client PUTs human label objects during
  the write-back — the create-only PUT (``If-None-Match: *``) never replaces one;
* **a COCO file saved every few milliseconds** by another process (read, add one
  human annotation, write to a temporary and rename, as editors and tools do) while the
  write-back rewrites the same file by compare-and-swap: every saved annotation is in
  the final file.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _moto import local_s3, s3_options
from PIL import Image

from connectors.formats.base import LabelWrite, Provenance
from connectors.formats.coco import CocoFormat
from connectors.formats.voc import VocFormat
from connectors.model import Annotation, Item, ItemStatus
from connectors.storage import ProjectFS
from connectors.writeback import new_run_id, rollback, write_run

QUICK, FULL = 3, 25
N_ITEMS = 40
HUMAN_XML = "<annotation><size><width>64</width><height>48</height></size><object><name>stop</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object><!-- {tag} --></annotation>"


def _writes(items: list[Item], run_id: str) -> list[LabelWrite]:
    return [
        LabelWrite(
            item=i,
            annotations=[Annotation(label="stop", box=(2, 2, 20, 20), score=0.9)],
            provenance=Provenance(run_id=run_id, model_version="m", score=0.9, tier="easy"),
        )
        for i in items
    ]


def _voc_items() -> list[Item]:
    return [
        Item(item_id=f"i{k:03d}", uri=f"images/i{k:03d}.jpg", width=64, height=48)
        for k in range(N_ITEMS)
    ]


def _seed_voc(project: ProjectFS) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 30, 200)).save(buf, format="JPEG")
    for item in _voc_items():
        project.write_bytes(item.uri, buf.getvalue())


def _check_humans_kept(fmt: VocFormat, humans: dict[str, bytes], run_id: str) -> None:
    project = fmt.project
    assert humans, "the other writer wrote nothing during the write-back"
    for item_id, content in humans.items():
        assert project.read_bytes(f"annotations/{item_id}.xml") == content, item_id
    read = {i.item_id: i for i in fmt.iter_items()}
    assert all(read[i].status is ItemStatus.LABELED for i in humans)  # human, not auto
    rollback(fmt, run_id)
    for item_id, content in humans.items():
        assert project.read_bytes(f"annotations/{item_id}.xml") == content, item_id


# -- label files on a local disk -----------------------------------------------------------


def _human_files(root: str, ids: list[str], seed: int, out: Any) -> None:
    """Another process: creates human label files, one every 0–2 ms."""
    rng = random.Random(seed)
    written = {}
    for item_id in rng.sample(ids, len(ids) // 2):
        content = HUMAN_XML.format(tag=uuid.uuid4().hex).encode()
        path = os.path.join(root, "annotations", f"{item_id}.xml")
        with open(path, "wb") as f:  # a plain save: no labeltriage code involved
            f.write(content)
        written[item_id] = content.decode()
        time.sleep(rng.uniform(0, 0.002))
    out.put(written)


def local_file_race(tmp_path: Path, trial: int) -> None:
    root = tmp_path / f"t{trial}"
    project = ProjectFS(str(root))
    _seed_voc(project)
    (root / "annotations").mkdir()
    fmt = VocFormat(project)
    items = list(fmt.iter_items())
    run_id = new_run_id()
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    other = ctx.Process(
        target=_human_files, args=(str(root), [i.item_id for i in items], trial, out)
    )
    other.start()
    manifest = write_run(fmt, _writes(items, run_id), run_id, chunk_size=8)
    assert manifest.records, manifest.refused  # both wrote
    humans = {k: v.encode() for k, v in out.get(timeout=60).items()}
    other.join(timeout=60)
    _check_humans_kept(fmt, humans, run_id)


def test_label_files_created_during_write_back_survive(tmp_path: Path) -> None:
    for trial in range(QUICK):
        local_file_race(tmp_path, trial)


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.timeout(3600)
def test_label_files_race_many_trials(tmp_path: Path) -> None:
    for trial in range(FULL):
        local_file_race(tmp_path, trial)


# -- S3 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 with a fresh bucket."""
    mp = pytest.MonkeyPatch()
    try:
        with local_s3(mp) as (endpoint, client):
            bucket = f"race-{uuid.uuid4().hex[:10]}"
            client.create_bucket(Bucket=bucket)
            yield {"bucket": bucket, "client": client, "options": s3_options(endpoint)}
    finally:
        mp.undo()


def s3_race(s3: dict[str, Any], trial: int) -> None:
    prefix = f"p{trial}-{uuid.uuid4().hex[:6]}"
    project = ProjectFS(f"s3://{s3['bucket']}/{prefix}", s3["options"])
    _seed_voc(project)
    project.write_bytes("annotations/.keep.xml", b"")  # the folder exists on S3 once it has a key
    fmt = VocFormat(project)
    items = [i for i in fmt.iter_items() if i.error is None]
    run_id = new_run_id()
    rng = random.Random(trial)
    humans: dict[str, bytes] = {}

    def other_client() -> None:  # plain PUTs, as a labeling tool's, along the write order
        for item in [i for i in items if rng.random() < 0.5]:
            content = HUMAN_XML.format(tag=uuid.uuid4().hex).encode()
            key = f"{prefix}/annotations/{item.item_id}.xml"
            s3["client"].put_object(Bucket=s3["bucket"], Key=key, Body=content)
            humans[item.item_id] = content
            time.sleep(rng.uniform(0, 0.02))

    thread = threading.Thread(target=other_client)
    thread.start()
    manifest = write_run(fmt, _writes(items, run_id), run_id, chunk_size=8)
    thread.join(timeout=120)
    assert manifest.records, manifest.refused  # both wrote
    _check_humans_kept(VocFormat(project), humans, run_id)


def test_s3_label_put_just_before_ours_is_never_replaced(
    s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst instant, made certain: a person's PUT lands right before the request
    that creates our label object."""
    import s3fs

    prefix = f"det-{uuid.uuid4().hex[:6]}"
    project = ProjectFS(f"s3://{s3['bucket']}/{prefix}", s3["options"])
    _seed_voc(project)
    project.write_bytes("annotations/.keep.xml", b"")
    fmt = VocFormat(project)
    items = [i for i in fmt.iter_items() if i.error is None][:3]
    target = f"{prefix}/annotations/{items[1].item_id}.xml"
    human = HUMAN_XML.format(tag="person").encode()
    real = s3fs.S3FileSystem._call_s3

    async def call_s3(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if method in ("put_object", "copy_object") and kwargs.get("Key") == target:
            s3["client"].put_object(Bucket=s3["bucket"], Key=target, Body=human)
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", call_s3)
    run_id = new_run_id()
    manifest = write_run(fmt, _writes(items, run_id), run_id)
    monkeypatch.undo()
    assert project.read_bytes(f"annotations/{items[1].item_id}.xml") == human
    assert items[1].item_id in manifest.refused and len(manifest.records) == 2
    _check_humans_kept(VocFormat(project), {items[1].item_id: human}, run_id)


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.timeout(3600)
def test_s3_race_many_trials(s3: dict[str, Any]) -> None:
    for trial in range(FULL):
        s3_race(s3, trial)


# -- a COCO file saved every few milliseconds -----------------------------------------------


def _saver(path: str, image_ids: list[int], seed: int, stop: Any, out: Any) -> None:
    """Another process: read, add one human annotation, save atomically; every 1–4 ms."""
    rng = random.Random(seed)
    added = []
    next_id = 10**6 + seed * 10**4
    while not stop.is_set():
        with open(path, "rb") as f:
            doc = json.loads(f.read())
        next_id += 1
        ann = {
            "id": next_id,
            "image_id": rng.choice(image_ids),
            "category_id": 1,
            "bbox": [1, 1, 5, 5],
            "area": 25,
            "iscrowd": 0,
        }
        doc["annotations"].append(ann)
        tmp = f"{path}.saver-{next_id}"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)
        added.append(next_id)
        time.sleep(rng.uniform(0.001, 0.004))
    out.put(added)


def coco_race(tmp_path: Path, trial: int) -> int:
    root = tmp_path / f"c{trial}"
    project = ProjectFS(str(root))
    n = 2000
    images = [{"id": k + 1, "file_name": f"i{k}.jpg", "width": 64, "height": 48} for k in range(n)]
    doc = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "stop"}]}
    project.write_text("annotations.json", json.dumps(doc))
    fmt = CocoFormat(project)
    items = list(fmt.iter_items())
    run_id = new_run_id()
    ctx = multiprocessing.get_context("fork")
    stop, out = ctx.Event(), ctx.Queue()
    saver = ctx.Process(
        target=_saver,
        args=(str(root / "annotations.json"), [im["id"] for im in images], trial, stop, out),
    )
    saver.start()
    time.sleep(0.02)
    write_run(fmt, _writes(items[:400], run_id), run_id, chunk_size=10)
    time.sleep(0.02)
    stop.set()
    added = out.get(timeout=60)
    saver.join(timeout=60)
    final = json.loads((root / "annotations.json").read_bytes())
    ids = {a["id"] for a in final["annotations"]}
    lost = [i for i in added if i not in ids]
    assert not lost, f"trial {trial}: {len(lost)} of {len(added)} saved annotations lost"
    assert not [p for p in root.iterdir() if ".conflict-" in p.name or p.name.endswith(".tmp")]
    return len(added)


def test_a_coco_save_landing_while_ours_is_written_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst instant, made certain: a person saves while our new content is being
    synced to disk, after every check of the file was made."""
    project = ProjectFS(str(tmp_path))
    images = [{"id": k + 1, "file_name": f"i{k}.jpg", "width": 64, "height": 48} for k in range(4)]
    doc = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "stop"}]}
    project.write_text("annotations.json", json.dumps(doc))
    fmt = CocoFormat(project)
    items = list(fmt.iter_items())
    saved = {
        "id": 777,
        "image_id": 1,
        "category_id": 1,
        "bbox": [1, 1, 5, 5],
        "area": 25,
        "iscrowd": 0,
    }
    path = tmp_path / "annotations.json"
    armed = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if armed and not armed[0]:
            armed[0] = True
            theirs = json.loads(path.read_bytes())
            theirs["annotations"].append(saved)
            (tmp_path / "their.tmp").write_text(json.dumps(theirs))
            os.replace(tmp_path / "their.tmp", path)
        real_fsync(fd)

    real_write = fmt.write_labels

    def write_labels(writes: list[LabelWrite]) -> Any:
        armed.append(False)
        try:
            return real_write(writes)
        finally:
            armed.clear()

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(fmt, "write_labels", write_labels)
    run_id = new_run_id()
    write_run(fmt, _writes(items[1:], run_id), run_id)
    monkeypatch.undo()
    final = json.loads(path.read_bytes())
    assert saved in final["annotations"]  # their save is kept ...
    assert sum(1 for a in final["annotations"] if "labeltriage" in a) == 3  # ... and ours made it


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.timeout(3600)
def test_coco_race_many_trials(tmp_path: Path) -> None:
    saves = [coco_race(tmp_path, trial) for trial in range(FULL)]
    assert min(saves) >= 3, saves

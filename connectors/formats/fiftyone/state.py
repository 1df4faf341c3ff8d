"""The bookkeeping folder of a FiftyOne dataset, kept in the dataset's own database.

:mod:`connectors.writeback` keeps a project's run manifests under ``.labeltriage/``.  A
FiftyOne dataset has no folder, so :class:`DatasetStateFS` keeps those files in the
MongoDB database that holds the dataset (FiftyOne's own connection), in two collections
of their own:

* ``labeltriage_state``: one document per file, ``_id`` = its path (the dataset's id,
  then the relative path), with the ``version`` of its content and the number of parts;
* ``labeltriage_state_parts``: the content, in parts of at most :data:`PART_BYTES`
  (a run manifest can outgrow MongoDB's 16 MB document limit).

A write stores the new parts first and then swaps the file document in one operation,
so a reader sees the old content or the new one, never a mix; a create-only write
(``overwrite=False``) is an ``insert`` that the database refuses when the file exists.
Whoever can open the dataset can therefore roll back its runs: the manifests travel with
the database, not with the machine that wrote them.  The files are keyed by the dataset's
id, so a renamed dataset keeps them and a new dataset of an old name starts empty.

Media: the dataset's images are local files (``filepath``), so :attr:`fs` is the local
filesystem and items carry ``file://`` uris.
"""

from __future__ import annotations

import contextlib
import io
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from connectors.storage import BOOKKEEPING_DIR, ProjectFS

COLLECTION = "labeltriage_state"
PARTS_COLLECTION = "labeltriage_state_parts"
PART_BYTES = 8 * 1024 * 1024


def _default_database() -> Any:
    from fiftyone.core.odm import get_db_conn

    return get_db_conn()


class DatasetStateFS(ProjectFS):
    """A dataset's bookkeeping files in its database (see the module docstring).

    ``url`` is the dataset's ``fiftyone://NAME``; ``key`` is the dataset's id, under which
    its files are kept; ``database`` is a :mod:`pymongo` database (default: FiftyOne's).
    """

    def __init__(self, url: str, key: str, database: Any | None = None) -> None:
        self.url = url
        self.key = key
        self.storage_options = {}
        self.fs = LocalFileSystem()
        self.root = f"/{COLLECTION}/{key}"
        self.is_local = False
        self._database = database

    def __repr__(self) -> str:
        return f"DatasetStateFS({self.url!r})"

    def foreign_url_refusal(self, url: str) -> str | None:
        """A dataset's media are its samples' own ``filepath`` values, which FiftyOne itself
        reads: a ``file://`` item uri comes from the dataset, not from a task's free-form
        data, so it is read; any other URL follows the project's image-source policy."""
        if url.startswith("file://"):
            return None
        return super().foreign_url_refusal(url)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_database"] = None  # a client does not travel; the copy reconnects
        return state

    # -- the collections -------------------------------------------------------------------
    def _db(self) -> Any:
        if self._database is None:
            self._database = _default_database()
        return self._database

    @property
    def _files(self) -> Any:
        return self._db()[COLLECTION]

    @property
    def _parts(self) -> Any:
        return self._db()[PARTS_COLLECTION]

    def _under(self, full: str) -> dict[str, Any]:
        """A filter for the file documents below the folder ``full``."""
        return {"_id": {"$regex": "^" + re.escape(full.rstrip("/") + "/")}}

    # -- paths -----------------------------------------------------------------------------
    def url_of(self, rel: str) -> str:
        return f"{self.url}/{self.relative(self.resolve(rel))}"

    # -- reads -----------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        full = self.resolve(rel)
        return self._files.find_one({"_id": full}, {"_id": 1}) is not None or self.isdir(rel)

    def isdir(self, rel: str) -> bool:
        full = self.resolve(rel)
        return self._files.find_one(self._under(full), {"_id": 1}) is not None

    def read_bytes(self, rel: str) -> bytes:
        full = self.resolve(rel)
        for _ in range(3):  # a concurrent rewrite may swap the version between two reads
            head = self._files.find_one({"_id": full})
            if head is None:
                raise FileNotFoundError(self.url_of(rel))
            parts = list(
                self._parts.find({"file": full, "version": head["version"]}).sort("index", 1)
            )
            if len(parts) == head["parts"]:
                return b"".join(bytes(p["data"]) for p in parts)
        raise OSError(f"{self.url_of(rel)}: changed while it was read; try again")

    @contextlib.contextmanager
    def open(self, rel: str, mode: str = "rb") -> Iterator[Any]:
        if mode not in ("r", "rb", "rt"):
            raise ValueError("use write_bytes/write_text for writes: they are atomic")
        data = self.read_bytes(rel)
        yield io.BytesIO(data) if "b" in mode else io.StringIO(data.decode("utf-8"))

    def listdir(self, rel: str = ".") -> list[str]:
        full = self.resolve(rel).rstrip("/")
        names = set()
        for doc in self._files.find(self._under(full), {"_id": 1}):
            names.add(doc["_id"][len(full) + 1 :].split("/", 1)[0])
        return sorted(names)

    def walk_files(self, rel: str = ".") -> Iterator[str]:
        full = self.resolve(rel).rstrip("/")
        paths = sorted(doc["_id"] for doc in self._files.find(self._under(full), {"_id": 1}))
        for path in paths:
            relative = self.relative(path)
            if BOOKKEEPING_DIR not in relative.split("/"):
                yield relative

    # -- writes ----------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes, *, overwrite: bool = True) -> str:
        """Store ``data`` at ``rel``: parts first, then one swap of the file document.

        With ``overwrite=False`` the file document is inserted, which the database refuses
        (:class:`FileExistsError`) when the file exists.
        """
        from pymongo.errors import DuplicateKeyError

        full = self.resolve(rel)
        version = uuid.uuid4().hex
        chunks = [data[i : i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [b""]
        self._parts.insert_many(
            [
                {
                    "_id": f"{full}#{version}/{i}",
                    "file": full,
                    "version": version,
                    "index": i,
                    "data": c,
                }
                for i, c in enumerate(chunks)
            ]
        )
        head = {
            "_id": full,
            "version": version,
            "parts": len(chunks),
            "size": len(data),
            "updated": datetime.now(timezone.utc),
        }
        if overwrite:
            before = self._files.find_one_and_replace({"_id": full}, head, upsert=True)
            if before is not None:
                self._parts.delete_many({"file": full, "version": before["version"]})
            return full
        try:
            self._files.insert_one(head)
        except DuplicateKeyError:
            self._parts.delete_many({"file": full, "version": version})
            raise FileExistsError(self.url_of(rel)) from None
        return full

    def remove(self, rel: str) -> None:
        full = self.resolve(rel)
        if self._files.delete_one({"_id": full}).deleted_count == 0:
            raise FileNotFoundError(self.url_of(rel))
        self._parts.delete_many({"file": full})


def state_key(dataset: Any) -> str:
    """The key of a dataset's files: its id (kept across renames)."""
    doc = getattr(dataset, "_doc", None)
    ident = getattr(doc, "id", None)
    return str(ident) if ident is not None else f"name-{dataset.name}"


__all__ = ["COLLECTION", "PARTS_COLLECTION", "DatasetStateFS", "state_key"]

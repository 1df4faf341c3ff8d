"""Storage through fsspec: a project root on any filesystem, safe paths, atomic writes.

A :class:`ProjectFS` is an fsspec filesystem plus a root path.  Every relative path that
labeltriage touches goes through :meth:`ProjectFS.resolve`, which refuses paths that
would leave the root (``../``, absolute paths, another protocol).

Writes are atomic: data goes to a temporary object next to the target, which is then
moved into place.  :meth:`ProjectFS.write_bytes` with ``overwrite=False`` refuses to
replace an existing object; on a local filesystem the final step is ``os.link`` so the
check and the move are one atomic operation (no window in which a label that appeared
meanwhile could be replaced).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from connectors.errors import PathEscapeError, UsageError

log = logging.getLogger(__name__)

BOOKKEEPING_DIR = ".labeltriage"
"""Per-project folder for run manifests and other bookkeeping (like ``.git``)."""

_MAX_CHECKED_FOLDERS = 65536
"""Folders whose real location :meth:`ProjectFS.resolve` remembers (then it starts over)."""

_OPTIONAL_BACKENDS = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gcs": "gcsfs",
    "gs": "gcsfs",
    "abfs": "adlfs",
    "az": "adlfs",
}


def open_fs(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``url_to_fs`` with an install hint when an optional backend is missing."""
    try:
        return url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        package = _OPTIONAL_BACKENDS.get(protocol, "the fsspec backend")
        raise UsageError(
            f"{url}: install {package} to use {protocol}:// (pip install 'labeltriage[s3]')"
        ) from exc
    except ValueError as exc:
        raise UsageError(f"{url}: {exc}") from exc


class ProjectFS:
    """A project root on an fsspec filesystem.

    ``url`` may be a local path, ``file://``, ``memory://``, ``s3://bucket/prefix`` or any
    other fsspec URL.  Relative paths are POSIX-style and relative to the root.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, root = open_fs(url, self.storage_options)
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._real_root: str | None = None
        self._checked_folders: set[str] = set()

    def __repr__(self) -> str:
        return f"ProjectFS({self.url!r})"

    # -- paths ---------------------------------------------------------------------
    def resolve(self, rel: str, *, item: str | None = None) -> str:
        """The full path of ``rel`` inside the root; refuses anything that escapes it.

        On a local filesystem symlinks are followed: a path whose real location is outside
        the real root is refused.  The real root is resolved once, and each folder once
        (its real location is remembered for the life of this object); a path's last
        component costs one ``lstat``.
        """
        if "://" in rel:
            raise PathEscapeError(
                f"path {rel!r} names another location; expected a path relative to the project",
                file=rel,
                item=item,
            )
        rel_posix = rel.replace("\\", "/")
        if rel_posix.startswith("/") or (len(rel_posix) > 1 and rel_posix[1] == ":"):
            raise PathEscapeError(
                f"absolute path {rel!r} is outside the project root", file=rel, item=item
            )
        norm = posixpath.normpath(rel_posix)
        if norm == ".." or norm.startswith("../"):
            raise PathEscapeError(f"path {rel!r} escapes the project root", file=rel, item=item)
        full = self.root if norm == "." else posixpath.join(self.root, norm)
        if self.is_local and norm != ".":
            folder = posixpath.dirname(norm)
            if folder and folder not in self._checked_folders:
                self._check_real(folder, posixpath.join(self.root, folder), rel, item)
            if os.path.islink(full):
                self._check_real(None, full, rel, item)
        return full

    def _check_real(self, folder: str | None, full: str, rel: str, item: str | None) -> None:
        """Refuse ``full`` when its real location is outside the real root; remember an
        existing ``folder`` that passed."""
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root)
        real_root = self._real_root
        real = os.path.realpath(full)
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            raise PathEscapeError(
                f"path {rel!r} resolves outside the project root (symlink)", file=rel, item=item
            )
        if folder is not None and os.path.isdir(real):
            if len(self._checked_folders) >= _MAX_CHECKED_FOLDERS:
                self._checked_folders.clear()
            self._checked_folders.add(folder)

    def relative(self, full: str) -> str:
        """Inverse of :meth:`resolve` for paths listed by the filesystem."""
        full = self.fs._strip_protocol(full) if "://" in full else full
        root = self.root.rstrip("/")
        if full == root:
            return "."
        if not full.startswith(root + "/"):
            raise PathEscapeError(f"path {full!r} is outside the project root {root!r}", file=full)
        return full[len(root) + 1 :]

    def url_of(self, rel: str) -> str:
        """A full fsspec URL for a relative path (for items and messages)."""
        full = self.resolve(rel)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return (
            full
            if protocol in ("file", "local")
            else f"{protocol}://{full.lstrip('/') if protocol != 'memory' else full}"
        )

    # -- reads ---------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.resolve(rel)))

    def isdir(self, rel: str) -> bool:
        return bool(self.fs.isdir(self.resolve(rel)))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.resolve(rel), "rb") as f:
            return f.read()

    def read_text(self, rel: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(rel).decode(encoding)

    @contextlib.contextmanager
    def open(self, rel: str, mode: str = "rb") -> Iterator[Any]:
        if any(c in mode for c in "wa+"):
            raise ValueError("use write_bytes/write_text for writes: they are atomic")
        with self.fs.open(self.resolve(rel), mode) as f:
            yield f

    def listdir(self, rel: str = ".") -> list[str]:
        """Names (not paths) directly inside ``rel``, sorted; empty if it does not exist."""
        full = self.resolve(rel)
        if not self.fs.isdir(full):
            return []
        names = [posixpath.basename(str(p).rstrip("/")) for p in self.fs.ls(full, detail=False)]
        return sorted(n for n in names if n)

    def walk_files(self, rel: str = ".") -> Iterator[str]:
        """Relative paths of all files under ``rel`` in sorted order, streaming by folder.

        The bookkeeping folder ``.labeltriage`` is skipped.
        """
        full = self.resolve(rel)
        for dirpath, dirnames, filenames in self.fs.walk(full):
            dirnames[:] = sorted(d for d in dirnames if d != BOOKKEEPING_DIR)
            for name in sorted(filenames):
                yield self.relative(posixpath.join(dirpath, name))

    # -- writes --------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes, *, overwrite: bool = True) -> str:
        """Atomically write ``data`` at ``rel``; with ``overwrite=False`` never replace.

        Raises :class:`FileExistsError` when ``overwrite`` is false and ``rel`` exists.
        Returns the full path written.
        """
        full = self.resolve(rel)
        parent = posixpath.dirname(full)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(full)}.{uuid.uuid4().hex}.tmp")
        if self.is_local:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if overwrite:
                    os.replace(tmp, full)
                else:
                    os.link(tmp, full)  # atomic create-if-absent; FileExistsError otherwise
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return full
        if not overwrite and self.fs.exists(full):
            raise FileExistsError(full)
        self.fs.pipe_file(tmp, data)
        try:
            if not overwrite and self.fs.exists(full):
                raise FileExistsError(full)
            self.fs.mv(tmp, full)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)
        return full

    def write_text(
        self, rel: str, text: str, *, overwrite: bool = True, encoding: str = "utf-8"
    ) -> str:
        return self.write_bytes(rel, text.encode(encoding), overwrite=overwrite)

    def remove(self, rel: str) -> None:
        self.fs.rm_file(self.resolve(rel))

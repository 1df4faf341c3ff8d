"""Storage through fsspec: a project root on any filesystem, safe paths, atomic writes.

A :class:`ProjectFS` is an fsspec filesystem plus a root path.  Every relative path that
labeltriage touches goes through :meth:`ProjectFS.resolve`, which refuses paths that
would leave the root (``../``, absolute paths, another protocol).

Writes are atomic, and the conditional ones are conditional in one step, never as a
check followed by a write:

* **create-only** (``write_bytes(..., overwrite=False)``, every auto-label file): on a
  local disk a synced temporary ``.NAME.<hex>.tmp`` is hard-linked to the name
  (``link`` fails if the name exists); on S3 one ``PUT`` with ``If-None-Match: *``;
  in ``memory://`` a check and write under a process lock.  Other storages have no
  such primitive and the write is refused (:class:`~connectors.errors.UnsafeWriteRefused`);
* **compare-and-swap** (:meth:`ProjectFS.read_versioned` + :meth:`ProjectFS.replace_if`,
  the one-JSON-file formats): on a local disk an atomic exchange checked against the
  version read (device, inode, size, mtime); on S3 a ``PUT`` with ``If-Match: ETag``;
* **replace** (``overwrite=True``: manifests, sidecars, reports): a synced temporary
  renamed over the name locally, one ``PUT`` on S3 (no temporary key, no ``makedirs``:
  s3fs would create a missing bucket), temporary + move elsewhere.

A process killed in the middle of a local write leaves at most its temporary, which
:meth:`ProjectFS.remove_temporaries` deletes (run recovery does).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import functools
import hashlib
import logging
import os
import platform
import posixpath
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from connectors.errors import PathEscapeError, UnsafeWriteRefused, UsageError, VersionConflict

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

    allow_image_hosts: tuple[str, ...] = ()
    """Hosts (``cdn.example.com``, ``host:port``) or URL prefixes (``file:///mnt/imgs/``,
    ``s3://other/``) that item images may come from besides the project's own storage;
    ``*`` allows any (see :meth:`foreign_url_refusal`)."""

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

    def inside(self, url: str) -> str | None:
        """The relative path of the full URL ``url`` when it lies in this project's
        storage (same protocol, under the root), else ``None``."""
        protocol, sep, _ = url.partition("://")
        if not sep or protocol in ("http", "https") or protocol not in _protocols_of(self.fs):
            return None  # an http(s) project's files are not under its URL (same_origin)
        full = self.fs._strip_protocol(url)
        root = self.root.rstrip("/")
        norm = posixpath.normpath(full)
        if norm == root or not norm.startswith(root + "/"):
            return None
        return norm[len(root) + 1 :]

    def same_origin(self, url: str) -> bool:
        """True for an ``http(s)://`` URL on the host and port of an ``http(s)://`` project."""
        mine, theirs = urlsplit(self.url), urlsplit(url)
        return mine.scheme in ("http", "https") and (
            theirs.scheme,
            theirs.hostname,
            theirs.port,
        ) == (mine.scheme, mine.hostname, mine.port)

    def foreign_url_refusal(self, url: str) -> str | None:
        """Why the image at full URL ``url`` may not be read, or ``None`` when it may.

        Images come from the project's storage (:meth:`inside`), from the host of an
        ``http(s)`` project (a Label Studio server, :meth:`same_origin`), or from what
        :attr:`allow_image_hosts` lists: ``*``, a URL prefix, or a host (``name`` or
        ``name:port``).  Anything else — ``file://`` paths elsewhere on this machine,
        other servers — is refused, so a task cannot make labeltriage read local files
        or fetch from inside a network.
        """
        if self.inside(url) is not None or self.same_origin(url):
            return None
        if url_allowed(url, self.allow_image_hosts):
            return None
        return (
            f"image outside the project's storage ({redact_url(self.url)}); refused: list its "
            "host or URL prefix in allow_image_hosts to read it"
        )

    # -- reads ---------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.resolve(rel)))

    def isdir(self, rel: str) -> bool:
        return bool(self.fs.isdir(self.resolve(rel)))

    def may_exist(self, rel: str) -> bool:
        """A cheap probe that reads nothing: ``False`` only when nothing is at ``rel`` on a
        local disk (one ``lstat``, no symlink checks); always ``True`` elsewhere.  Reads
        still go through :meth:`resolve`."""
        if not self.is_local:
            return True
        return os.path.lexists(posixpath.join(self.root, posixpath.normpath(rel)))

    def read_bytes(self, rel: str) -> bytes:
        full = self.resolve(rel)
        if self.is_local:  # a plain read: no fsspec file object per small file
            with open(full, "rb") as f:
                return f.read()
        with self.fs.open(full, "rb") as f:
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
        if self.is_local:  # one scandir, no fsspec record (a stat) per entry
            try:
                with os.scandir(full) as entries:
                    return sorted(entry.name for entry in entries)
            except (FileNotFoundError, NotADirectoryError):
                return []
        if not self.fs.isdir(full):
            return []
        names = [posixpath.basename(str(p).rstrip("/")) for p in self.fs.ls(full, detail=False)]
        return sorted(n for n in names if n)

    def walk_files(self, rel: str = ".") -> Iterator[str]:
        """Relative paths of all files under ``rel`` in sorted order, streaming by folder.

        The bookkeeping folder ``.labeltriage`` is skipped.  Everything that is not a
        folder counts as a file, symlinks to folders included (they are not followed).
        """
        full = self.resolve(rel)
        walk = _walk_local(full) if self.is_local and os.path.isdir(full) else self.fs.walk(full)
        for dirpath, dirnames, filenames in walk:
            dirnames[:] = sorted(d for d in dirnames if d != BOOKKEEPING_DIR)
            for name in sorted(filenames):
                yield self.relative(posixpath.join(dirpath, name))

    # -- writes --------------------------------------------------------------------
    @property
    def protocol(self) -> str:
        protocol = self.fs.protocol
        return protocol if isinstance(protocol, str) else protocol[0]

    def write_bytes(self, rel: str, data: bytes, *, overwrite: bool = True) -> str:
        """Atomically write ``data`` at ``rel``; with ``overwrite=False`` never replace.

        Raises :class:`FileExistsError` when ``overwrite`` is false and ``rel`` exists,
        and :class:`UnsafeWriteRefused` for a create-only write on a storage that has no
        atomic create-if-absent primitive.  The content is synced to disk before it
        appears under its name (see :meth:`sync` for the name itself).  Returns the full
        path written.
        """
        full = self.resolve(rel)
        if self.is_local:
            _local_write(full, data, overwrite=overwrite)
        elif self.protocol in _S3:
            self._s3_put(full, data, create=not overwrite)
        elif self.protocol == "memory":
            with _MEMORY_LOCK:  # one process owns a memory filesystem: a lock makes it atomic
                if not overwrite and self.fs.exists(full):
                    raise FileExistsError(full)
                self.fs.pipe_file(full, data)
        elif not overwrite:
            raise UnsafeWriteRefused(
                f"{self.url_of(rel)}: {self.protocol}:// offers no atomic create-if-absent write, "
                "so a label created meanwhile could be replaced; refusing to write it "
                "(local disks, S3 and memory:// are supported)"
            )
        else:
            parent = posixpath.dirname(full)
            if parent:
                self.fs.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, temporary_name(posixpath.basename(full)))
            self.fs.pipe_file(tmp, data)
            try:
                self.fs.mv(tmp, full)
            finally:
                if self.fs.exists(tmp):
                    self.fs.rm_file(tmp)
        return full

    def _s3_put(
        self, full: str, data: bytes, *, create: bool = False, etag: str | None = None
    ) -> None:
        """One PUT (atomic on S3), conditional on absence (``create``) or on ``etag``.

        No ``makedirs``: object stores have no folders, and s3fs would create the bucket.
        """
        kwargs: dict[str, Any] = {"chunksize": max(len(data), 50 * 2**20)}  # never multipart
        if create:
            kwargs["mode"] = "create"  # If-None-Match: *
        if etag is not None:
            kwargs["IfMatch"] = etag
        try:
            self.fs.pipe_file(full, data, **kwargs)
        except FileExistsError:
            raise
        except OSError as exc:
            if _precondition_failed(exc):
                if create:
                    raise FileExistsError(full) from exc
                raise VersionConflict(f"{full}: changed since it was read (ETag)") from exc
            raise
        finally:
            self.fs.invalidate_cache(full)

    def write_text(
        self, rel: str, text: str, *, overwrite: bool = True, encoding: str = "utf-8"
    ) -> str:
        return self.write_bytes(rel, text.encode(encoding), overwrite=overwrite)

    def sync(self, rel: str) -> None:
        """Make the name ``rel`` durable: on a local disk, sync its folder (a power cut
        after this cannot lose the file).  Object stores are durable once a write returns."""
        if self.is_local:
            _fsync_dir(os.path.dirname(self.resolve(rel)) or ".")

    # -- compare-and-swap ------------------------------------------------------------
    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        """The content of ``rel`` and a version token of exactly that content.

        The token is what :meth:`replace_if` compares: device, inode, size and
        modification time on a local disk; the ETag on S3 (the content is read with
        ``If-Match`` on it); a checksum in ``memory://``.  Other storages raise
        :class:`UnsafeWriteRefused`.
        """
        full = self.resolve(rel)
        if self.is_local:
            with open(full, "rb") as f:
                version = _local_version(os.fstat(f.fileno()))
                return f.read(), version
        if self.protocol in _S3:
            self.fs.invalidate_cache(full)
            with self.fs.open(full, "rb") as f:
                data: bytes = f.read()
                return data, str(f.details.get("ETag", ""))
        if self.protocol == "memory":
            with _MEMORY_LOCK:
                data = self.fs.cat_file(full)
            return data, hashlib.sha256(data).hexdigest()
        raise UnsafeWriteRefused(self._no_cas(rel))

    def replace_if(self, rel: str, data: bytes, version: str) -> str:
        """Replace ``rel`` with ``data`` only if it still has ``version``; atomic.

        Raises :class:`VersionConflict` when the file changed since it was read (nothing
        of this write remains then, and the other save is in place), and
        :class:`UnsafeWriteRefused` where the storage has no such primitive.

        Local disks have no compare-and-rename, so the swap is an atomic *exchange*
        (``renameat2(RENAME_EXCHANGE)``, Linux) followed by a check of what was swapped
        out: if that is not the version that was read, someone saved in between and the
        exchange is undone at once (see :func:`_exchange_if`).  S3: a PUT with
        ``If-Match``.
        """
        full = self.resolve(rel)
        if self.is_local:
            _exchange_if(full, data, version)
        elif self.protocol in _S3:
            self._s3_put(full, data, etag=version)
        elif self.protocol == "memory":
            with _MEMORY_LOCK:
                current = hashlib.sha256(self.fs.cat_file(full)).hexdigest()
                if current != version:
                    raise VersionConflict(f"{full}: changed since it was read")
                self.fs.pipe_file(full, data)
        else:
            raise UnsafeWriteRefused(self._no_cas(rel))
        return full

    def _no_cas(self, rel: str) -> str:
        return (
            f"{self.url_of(rel)}: {self.protocol}:// offers no compare-and-swap write, so a "
            "save by someone else at the same moment could be lost; refusing to rewrite it "
            "(local disks on Linux, S3 and memory:// are supported)"
        )

    # -- removal and clean-up ----------------------------------------------------------
    def remove(self, rel: str) -> None:
        self.fs.rm_file(self.resolve(rel))

    def remove_temporaries(self, rel: str = ".", *, stems: set[str] | None = None) -> list[str]:
        """Delete the temporaries an interrupted write left in folder ``rel``.

        Temporaries are named by :func:`temporary_name`; with ``stems`` only those of
        these file names.  Returns the relative paths removed.
        """
        removed = []
        for name in self.listdir(rel):
            stem = temporary_stem(name)
            if stem is None or (stems is not None and stem not in stems):
                continue
            path = name if rel in (".", "") else f"{rel}/{name}"
            with contextlib.suppress(FileNotFoundError):
                self.remove(path)
                removed.append(path)
        return removed


# -- helpers -------------------------------------------------------------------------------

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:]*):[^@\s]*@")


def redact_url(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def url_allowed(url: str, allowed: tuple[str, ...] | list[str]) -> bool:
    """Whether ``url`` matches an entry of an ``allow_image_hosts`` list (see ProjectFS)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    path = posixpath.normpath(parts.path) if parts.path else ""  # no way out with ../
    normalised = urlunsplit(parts._replace(path=path))
    for entry in allowed:
        if entry == "*":
            return True
        if "://" in entry:
            prefix = entry if entry.endswith("/") else entry + "/"
            if normalised == entry.rstrip("/") or normalised.startswith(prefix):
                return True
        elif host and entry.lower() in (host.lower(), netloc.lower()):
            return True
    return False


def _walk_local(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """``fsspec``'s local ``walk`` (top down; a folder is one that is a folder itself, not a
    symlink to one; unreadable folders are left out), from one ``scandir`` per folder
    without a ``stat`` per entry.  The caller may prune the yielded folder names."""
    try:
        with os.scandir(top) as listing:
            entries = list(listing)
    except OSError:
        return
    dirnames: list[str] = []
    filenames: list[str] = []
    for entry in entries:
        try:
            is_folder = entry.is_dir(follow_symlinks=False)
        except OSError:  # gone meanwhile
            continue
        (dirnames if is_folder else filenames).append(entry.name)
    yield top, dirnames, filenames
    for name in dirnames:
        yield from _walk_local(posixpath.join(top, name))


def _protocols_of(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


_S3 = ("s3", "s3a")
_MEMORY_LOCK = threading.RLock()
_TEMPORARY = re.compile(r"^\.(?P<stem>.+)\.[0-9a-f]{32}\.tmp$")


def temporary_name(name: str) -> str:
    """The name of a temporary written next to ``name`` before it is moved into place."""
    return f".{name}.{uuid.uuid4().hex}.tmp"


def temporary_stem(name: str) -> str | None:
    """The file name a temporary was for, or ``None`` when ``name`` is not a temporary."""
    match = _TEMPORARY.match(name)
    return match.group("stem") if match else None


def _precondition_failed(exc: BaseException) -> bool:
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in (
            "PreconditionFailed",
            "412",
        ):
            return True
    return False


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temporary(parent: str, name: str, data: bytes) -> str:
    tmp = os.path.join(parent, temporary_name(name))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _local_write(full: str, data: bytes, *, overwrite: bool) -> None:
    parent = os.path.dirname(full) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = _write_temporary(parent, os.path.basename(full), data)
    try:
        if overwrite:
            os.replace(tmp, full)
        else:
            os.link(tmp, full)  # atomic create-if-absent; FileExistsError otherwise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _local_version(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276}


@functools.cache
def _renameat2() -> Callable[[str, str], None] | None:
    """``exchange(a, b)`` through ``renameat2(RENAME_EXCHANGE)``, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    func = getattr(libc, "renameat2", None)
    number = _SYS_RENAMEAT2.get(platform.machine())
    if func is None and number is None:
        return None

    def exchange(a: str, b: str) -> None:
        args = (_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
        result = func(*args) if func is not None else libc.syscall(number, *args)
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), a, None, b)

    return exchange


def _exchange_if(full: str, data: bytes, version: str) -> None:
    """Put ``data`` at ``full`` if what is there is still ``version`` (see replace_if).

    1. write the new content to a temporary and check the version (cheap ``stat``);
    2. exchange the temporary and ``full`` atomically: ``full`` is never missing;
    3. the temporary's name now holds what was swapped out; if that is the version read,
       delete it: done.  If not, someone saved between 1 and 2: exchange back, so their
       save is in place again, and raise :class:`VersionConflict` (the caller redoes its
       change on their content).  If even that exchange swaps out something other than
       our content (a third save landed in the microseconds between), the newest save is
       put back in place and the one it displaced is kept as
       ``NAME.conflict-<time>`` next to it, logged: nothing is deleted.
    """
    exchange = _renameat2()
    if exchange is None:
        raise UnsafeWriteRefused(
            f"{full}: this system has no atomic exchange of files (renameat2, Linux), so a "
            "save by someone else at the same moment could be lost; refusing to rewrite it"
        )
    parent = os.path.dirname(full) or "."
    tmp = _write_temporary(parent, os.path.basename(full), data)
    try:
        if _local_version(os.stat(full)) != version:
            raise VersionConflict(f"{full}: changed since it was read")
        ours = os.stat(tmp).st_ino
        try:
            exchange(tmp, full)
        except OSError as exc:
            if exc.errno in (errno_mod.EINVAL, errno_mod.ENOSYS, errno_mod.EOPNOTSUPP):
                raise UnsafeWriteRefused(
                    f"{full}: the file system does not support an atomic exchange of files "
                    f"({exc.strerror}), so a save at the same moment could be lost; "
                    "refusing to rewrite it"
                ) from exc
            if exc.errno == errno_mod.ENOENT:
                raise VersionConflict(f"{full}: removed since it was read") from exc
            raise
        if _local_version(os.stat(tmp)) == version:
            _fsync_dir(parent)
            return
        exchange(tmp, full)  # undo: the save we swapped out goes back in place
        if os.stat(tmp).st_ino != ours:
            exchange(tmp, full)  # a newer save had replaced ours: it goes back in place
            conflict = f"{full}.conflict-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
            os.link(tmp, conflict)
            log.error(
                "%s: two saves by others landed during one update; the newer is in place, "
                "the older is kept as %s",
                full,
                conflict,
            )
        raise VersionConflict(f"{full}: changed since it was read")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

"""Durable spool of received DICOM files.

A file is written to ``.tmp/`` (by :meth:`Spool.put`, or piece by piece while it is received, through
:meth:`Spool.open_incoming`), renamed into ``<aa>/<bb>/<sha256>-<token>.dcm`` and fsynced with its
directory, so after :meth:`Spool.put` or :meth:`Spool.commit` returns the bytes survive a crash or
power loss.
Names come from the content hash and a random token, never from a DICOM value, so no UID can
steer a path. The token keeps concurrent receptions of identical bytes from sharing a file, so
one reception can always remove its own file when its database commit fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import secrets
import socket
import threading
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from screener.core.errors import SpoolError, SpoolFullError

TMP_DIR = ".tmp"
SUFFIX = ".dcm"
WRITEBACK_BYTES = 4 * 1024 * 1024  # start writing a received file to disk every this many bytes
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start write-out of dirty pages, do not wait


@functools.cache
def _start_writeback() -> Callable[[int, int, int, int], int] | None:
    """Linux ``sync_file_range(2)``, or None where the C library lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return typing.cast(Callable[[int, int, int, int], int], fn)


@dataclass(frozen=True)
class SpoolEntry:
    name: str  # relative to the spool root, e.g. "3f/a2/3fa2...-9c1d0e2b.dcm"
    sha256: str
    size_bytes: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Incoming:
    """A temporary file being received into the spool: written in pieces, hashed as it is written.

    A write error is kept (not raised) and stops further writes, so the network reader that feeds it
    keeps reading the peer's PDUs and the C-STORE can still be answered 0xA700; :meth:`Spool.commit`
    raises it. The file-like surface (``name``, ``write``, ``file.flush``, ``close``) is what
    pynetdicom's chunked receive writes through.
    """

    def __init__(self, path: Path, fd: int, token: str) -> None:
        self.path = path
        self.name = str(path)
        self.token = token
        self.size = 0
        self.error: OSError | None = None
        self._fd: int | None = fd
        self._hash = hashlib.sha256()
        self._written_back = 0  # bytes already handed to the disk's write-out

    @property
    def file(self) -> Incoming:
        return self

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; returns its length even after an error (see the class docstring)."""
        n = len(data)
        if self._fd is None or self.error is not None:
            return n
        self._hash.update(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self.error = exc
            self._truncate()
            return n
        self.size += n
        if self.size - self._written_back >= WRITEBACK_BYTES:
            # Let the disk work while the rest arrives, so the final fsync waits only for the tail.
            writeback = _start_writeback()
            if writeback is not None:
                writeback(
                    self._fd, self._written_back, self.size - self._written_back, _SYNC_FILE_RANGE_WRITE
                )
            self._written_back = self.size
        return n

    def flush(self) -> None:
        """Nothing to do: writes go straight to the file descriptor."""

    def check(self) -> None:
        """Raise the write error this file met, if any, as :class:`SpoolFullError` or :class:`SpoolError`."""
        exc = self.error
        if exc is None:
            return
        spool = self.path.parent.parent
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SpoolFullError(f"spool {spool} is full: {exc.strerror}; free disk space") from exc
        raise SpoolError(f"cannot write to spool {spool}: {exc.strerror}") from exc

    def sync_and_close(self) -> None:
        """fsync the file's data and close it (raises OSError)."""
        if self._fd is None:
            raise OSError(errno.EBADF, f"temporary file {self.name} is already closed")
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close without syncing (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def discard(self) -> None:
        """Close and delete the temporary (idempotent; missing is fine)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def _truncate(self) -> None:
        # Give the space back at once; the file itself goes when the C-STORE is answered.
        with contextlib.suppress(OSError):
            if self._fd is not None:
                os.ftruncate(self._fd, 0)


class Spool:
    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = root.resolve()
        self.min_free_bytes = min_free_bytes
        self._tmp = self.root / TMP_DIR
        self._host = socket.gethostname()
        self._fresh_dirs: set[Path] = set()  # made by _make_dirs, entry not yet fsynced
        self._fresh_lock = threading.Lock()

    def ensure_layout(self) -> None:
        """Create the spool and its temporary folder (idempotent)."""
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(
                f"cannot create spool folder {self.root}: {exc.strerror}; "
                "check storage.spool_dir and its permissions"
            ) from exc

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def path(self, name: str) -> Path:
        """Absolute path of a spooled file; refuses names that would leave the spool."""
        candidate = (self.root / name).resolve()
        if not candidate.is_relative_to(self.root) or candidate.parent == self.root:
            raise SpoolError(f"spool name {name!r} does not point inside the spool {self.root}")
        return candidate

    def put(self, data: bytes, digest: str | None = None) -> SpoolEntry:
        """Store ``data`` durably and return its entry (``digest``: its sha256, if already known).

        Raises:
            SpoolFullError: free space would drop below ``min_free_bytes`` (nothing is written).
            SpoolError: the write failed; no temporary or partial file remains.
        """
        self.check_room(len(data))
        incoming = self.open_incoming()
        incoming.write(data)
        if digest is not None and digest != incoming.sha256:
            incoming.discard()
            raise SpoolError(f"spool {self.root}: the bytes to store do not match their sha256 {digest}")
        return self.commit(incoming)

    def check_room(self, size: int) -> None:
        """Raise :class:`SpoolFullError` when ``size`` more bytes would leave less than the floor free."""
        free = self.free_bytes()
        if free - size < self.min_free_bytes:
            raise SpoolFullError(
                f"spool {self.root} has {free} bytes free; storing {size} bytes would go below "
                f"storage.min_free_bytes = {self.min_free_bytes}: free disk space or lower the floor"
            )

    def open_incoming(self) -> Incoming:
        """A new temporary file in the spool's ``.tmp/`` (same file system, so :meth:`commit` renames).

        Its name carries host and pid, so :meth:`remove_stale_temporaries` can tell a dead writer's.

        Raises:
            SpoolError: the temporary file cannot be created.
        """
        token = secrets.token_hex(4)
        path = self._tmp / f"{self._host}-{os.getpid()}-{token}.part"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            raise SpoolError(f"cannot create a temporary file in spool {self.root}: {exc.strerror}") from exc
        return Incoming(path, fd, token)

    def commit(self, incoming: Incoming) -> SpoolEntry:
        """Make a fully written temporary durable under its content name and return its entry.

        The file is renamed into ``<aa>/<bb>/``, then the file and its folder are fsynced: after this
        returns, the bytes survive a crash or power loss. Renaming before the fsyncs lets the file
        system commit both in one journal transaction; a crash before they finish leaves at most a
        file no row refers to, which :meth:`remove_orphans` deletes.

        Raises:
            SpoolFullError: the disk filled up while the file was written.
            SpoolError: the write failed; neither the temporary nor a partial file remains.
        """
        try:
            incoming.check()
        except SpoolError:
            incoming.discard()
            raise
        digest = incoming.sha256
        rel = f"{digest[:2]}/{digest[2:4]}/{digest}-{incoming.token}{SUFFIX}"
        final = self.root / rel
        try:
            self._make_dirs(final.parent)
            with self._fresh_lock:
                fresh = [d for d in (final.parent, final.parent.parent) if d in self._fresh_dirs]
            incoming.path.rename(final)
            incoming.sync_and_close()
            _fsync_dir(final.parent)
            for new in fresh:  # a folder made for this file (or a concurrent one) and not yet durable
                _fsync_dir(new.parent)
                with self._fresh_lock:
                    self._fresh_dirs.discard(new)
        except OSError as exc:
            incoming.discard()
            final.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError(f"spool {self.root} is full: {exc.strerror}; free disk space") from exc
            raise SpoolError(f"cannot write to spool {self.root}: {exc.strerror}") from exc
        return SpoolEntry(name=rel, sha256=digest, size_bytes=incoming.size)

    def _make_dirs(self, directory: Path) -> None:
        """Create ``directory`` and missing parents; their entries are fsynced by :meth:`commit`.

        A new folder is listed as fresh before it exists, so a concurrent commit that finds it
        already made still fsyncs its entry before answering. The fsyncs come after the file's own:
        by then the file system has usually committed them in the same journal transaction.
        """
        missing: list[Path] = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for new in reversed(missing):
            with self._fresh_lock:
                self._fresh_dirs.add(new)
            new.mkdir(exist_ok=True)

    def remove(self, name: str) -> None:
        """Delete a spooled file (missing is fine) and make the deletion durable."""
        path = self.path(name)
        path.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            _fsync_dir(path.parent)

    def sha256_of(self, name: str) -> str:
        h = hashlib.sha256()
        with self.path(name).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def names(self) -> Iterator[tuple[str, float]]:
        """Every spooled file as (name, mtime), temporary files excluded."""
        for path in self.root.glob(f"??/??/*{SUFFIX}"):
            try:
                yield path.relative_to(self.root).as_posix(), path.stat().st_mtime
            except FileNotFoundError:
                continue

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by dead processes of this host. Returns how many."""
        removed = 0
        for tmp in self._tmp.glob("*.part"):
            parts = tmp.name.removesuffix(".part").rsplit("-", 2)
            if len(parts) != 3 or parts[0] != self._host or not parts[1].isdigit():
                continue
            pid = int(parts[1])
            if pid != os.getpid() and not pid_alive(pid):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    def remove_orphans(self, known: set[str], grace_seconds: float) -> int:
        """Delete spooled files no database row refers to, older than ``grace_seconds``.

        A file is an orphan when its process crashed between the rename and the database commit;
        the sender never got 0x0000 for it and will send it again. The grace period protects
        files that another listener sharing this spool is about to commit.
        """
        cutoff = time.time() - grace_seconds
        removed = 0
        for name, mtime in list(self.names()):
            if name not in known and mtime <= cutoff:
                self.remove(name)
                removed += 1
        return removed


def pid_alive(pid: int) -> bool:
    """Is process ``pid`` of this host alive? (Another user's process counts as alive.)"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

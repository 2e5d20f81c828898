"""Durable spool of received DICOM files.

A file is written to ``.tmp/``, fsynced, renamed into ``<aa>/<bb>/<sha256>-<token>.dcm`` and the
directory fsynced, so after :meth:`Spool.put` returns the bytes survive a crash or power loss.
Names come from the content hash and a random token, never from a DICOM value, so no UID can
steer a path. The token keeps concurrent receptions of identical bytes from sharing a file, so
one reception can always remove its own file when its database commit fails.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from screener.errors import SpoolError, SpoolFullError

TMP_DIR = ".tmp"
SUFFIX = ".dcm"


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


class Spool:
    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = root.resolve()
        self.min_free_bytes = min_free_bytes
        self._tmp = self.root / TMP_DIR
        self._host = socket.gethostname()

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
        free = self.free_bytes()
        if free - len(data) < self.min_free_bytes:
            raise SpoolFullError(
                f"spool {self.root} has {free} bytes free; storing {len(data)} bytes would go below "
                f"storage.min_free_bytes = {self.min_free_bytes}: free disk space or lower the floor"
            )
        digest = digest or hashlib.sha256(data).hexdigest()
        token = secrets.token_hex(4)
        tmp = self._tmp / f"{self._host}-{os.getpid()}-{token}.part"
        rel = f"{digest[:2]}/{digest[2:4]}/{digest}-{token}{SUFFIX}"
        final = self.root / rel
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._make_dirs(final.parent)
            tmp.rename(final)
            _fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if final.exists():
                final.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError(f"spool {self.root} is full: {exc.strerror}; free disk space") from exc
            raise SpoolError(f"cannot write to spool {self.root}: {exc.strerror}") from exc
        return SpoolEntry(name=rel, sha256=digest, size_bytes=len(data))

    def _make_dirs(self, directory: Path) -> None:
        missing: list[Path] = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for new in reversed(missing):
            new.mkdir(exist_ok=True)
            _fsync_dir(new.parent)

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

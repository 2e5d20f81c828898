"""The spool and the database know each other: one UUID, written into both when the store is created.

The spool is the record of truth; the database is an index of it that can be rebuilt
(``screener db rebuild --from-spool``). A database that is lost, new, empty or another store's must never
be taken for this spool's index: ``serve`` would then answer for a store it cannot see, and the orphan
sweep would delete every acknowledged file. So:

- :func:`bind_store` (at ``serve`` start) refuses, with :class:`StoreIdentityError`, a spool holding
  instances whose database lacks its identity, and any pair whose identities differ;
- :func:`same_store` guards every orphan sweep;
- :class:`DatabaseGuard` notices, while serving, a SQLite file deleted, replaced or made read-only, and a
  database whose identity row changed, within ``interval`` seconds: the listener then answers 0xA700 and
  ``/healthz`` names the reason.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from pathlib import Path

from sqlalchemy import Engine, func, inspect, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from screener.core.db.models import Instance, StoreIdentity
from screener.core.errors import DatabaseLostError, SpoolError, StoreIdentityError
from screener.core.logs import get_logger
from screener.core.spool import Spool

log = get_logger("screener.identity")

SPOOL_IDENTITY = "SPOOL_IDENTITY"  # at the spool's root; one line: the store's UUID
RECOVERY_HINT = (
    "if the database was lost, rebuild it from the spool: `screener db rebuild --from-spool` "
    "(docs/operations.md); otherwise point database.url and storage.spool_dir at the same store"
)


def spool_identity(spool: Spool) -> str | None:
    """The identity written at the spool's root, None when there is none (raises SpoolError if unreadable)."""
    path = spool.root / SPOOL_IDENTITY
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpoolError(f"cannot read the spool identity {path}: {exc}") from exc
    return text or None


def write_spool_identity(spool: Spool, identity: str) -> str:
    """Write ``identity`` at the spool's root unless one is there already; returns the one that is there.

    Durable (temporary file, fsync, link without replacing, folder fsync), so two processes starting at once
    can never both write theirs.
    """
    final = spool.root / SPOOL_IDENTITY
    tmp = spool.root / f".{SPOOL_IDENTITY}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, f"{identity}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, final)
        dir_fd = os.open(spool.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise SpoolError(f"cannot write the spool identity {final}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    found = spool_identity(spool)
    assert found is not None
    return found


def database_identity(engine: Engine) -> str | None:
    """The identity row of the database, None when it has none (or no such table yet)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(StoreIdentity.__tablename__):
            return None
        with Session(bind=conn) as session:
            return session.scalar(select(StoreIdentity.identity).where(StoreIdentity.id == 1))


def write_database_identity(engine: Engine, identity: str) -> str:
    """Record ``identity`` unless the database has one; returns the one it has (a concurrent starter's)."""
    try:
        with Session(engine) as session, session.begin():
            session.add(StoreIdentity(id=1, identity=identity))
    except IntegrityError:
        pass
    found = database_identity(engine)
    assert found is not None
    return found


def _spool_holds_files(spool: Spool) -> bool:
    return next(iter(spool.names()), None) is not None


def _instances_held(engine: Engine) -> int:
    with Session(engine) as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Instance).where(Instance.spool_deleted_at.is_(None))
            )
            or 0
        )


def bind_store(spool: Spool, engine: Engine) -> str:
    """Make sure ``spool`` and ``engine``'s database are one store, creating the identity where it is new.

    Returns the identity. Raises :class:`StoreIdentityError`, before anything is received or deleted, when
    the spool holds instances and the database lacks the spool's identity (lost, new, empty or another),
    when the identities differ, or when the database lists instances and the spool has neither them nor an
    identity (another or a lost spool).
    """
    on_spool = spool_identity(spool)
    in_db = database_identity(engine)
    where = f"spool {spool.root} and database {engine.url.render_as_string(hide_password=True)}"
    if on_spool is not None and in_db is not None:
        if on_spool != in_db:
            raise StoreIdentityError(
                f"{where} are not one store: the spool's identity is {on_spool}, the database's {in_db}; "
                f"{RECOVERY_HINT}"
            )
        return on_spool
    files = _spool_holds_files(spool)
    held = _instances_held(engine)
    if on_spool is not None:  # the database has no identity: new, emptied, or from before this version
        if files or held:
            raise StoreIdentityError(
                f"{where} are not one store: the spool (identity {on_spool}) holds instances but the "
                f"database does not carry it (it holds {held} instances): it is new, empty or another one; "
                f"{RECOVERY_HINT}"
            )
        identity = write_database_identity(engine, on_spool)
    elif in_db is not None:  # the spool has no identity: a new spool folder, or another one
        if files or held:
            raise StoreIdentityError(
                f"{where} are not one store: the database (identity {in_db}, {held} instances held) does not "
                f"match a spool {'holding files but ' if files else ''}without its identity file "
                f"{SPOOL_IDENTITY}; check storage.spool_dir"
            )
        identity = in_db
    else:  # neither: a new store, or one made before identities existed
        if files and not held:
            raise StoreIdentityError(
                f"{where} are not one store: the spool holds instances and the database holds none; "
                f"{RECOVERY_HINT}"
            )
        identity = write_database_identity(engine, str(uuid.uuid4()))
        if files or held:
            log.info("store.identity_adopted", identity=identity, reason="store made before identities")
    written = write_spool_identity(spool, identity)
    if written != identity:
        raise StoreIdentityError(
            f"{where}: another process wrote spool identity {written} while this one recorded {identity}"
        )
    log.info("store.identity_created", identity=identity)
    return identity


def same_store(spool: Spool, engine: Engine) -> bool:
    """Whether the spool and the database carry one identity (the orphan sweep runs only then)."""
    try:
        on_spool = spool_identity(spool)
        in_db = database_identity(engine)
    except (SpoolError, SQLAlchemyError):
        return False
    return on_spool is not None and on_spool == in_db


def _sqlite_file(engine: Engine) -> Path | None:
    database = engine.url.database
    if engine.url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return Path(database).resolve()


class DatabaseGuard:
    """Checks every ``interval`` seconds that the database is still the one this store was bound to.

    :attr:`problem` is None while it is; afterwards it stays set (a restart decides what happens next) and
    :meth:`check` raises :class:`DatabaseLostError` with it, which ``/healthz`` reports.
    """

    def __init__(self, engine: Engine, identity: str, interval: float = 1.0) -> None:
        self.engine = engine
        self.identity = identity
        self.interval = interval
        self.problem: str | None = None
        self._file = _sqlite_file(engine)
        self._inode = self._stat_key()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="database-guard", daemon=True)

    def _stat_key(self) -> tuple[int, int] | None:
        if self._file is None:
            return None
        st = self._file.stat()
        return st.st_dev, st.st_ino

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> bool:
        """True while the database is this store's; raises DatabaseLostError naming why once it is not."""
        if self.problem is not None:
            raise DatabaseLostError(self.problem)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            problem = self._find_problem()
            if problem is not None:
                self.problem = problem
                log.error("database.lost", reason=problem, hint=RECOVERY_HINT)
                return

    def _find_problem(self) -> str | None:
        if self._file is not None:
            try:
                key = self._stat_key()
            except FileNotFoundError:
                return f"database file {self._file} was deleted"
            except OSError as exc:
                return f"database file {self._file} cannot be checked ({exc.strerror})"
            if key != self._inode:
                return f"database file {self._file} was replaced by another file"
            if not os.access(self._file, os.W_OK):
                return f"database file {self._file} is no longer writable"
        try:
            found = database_identity(self.engine)
        except SQLAlchemyError:
            return None  # unreachable is the database check's business (and ingest's 0xA700), not lost
        if found != self.identity:
            return f"the database now carries identity {found}, not this store's {self.identity}"
        return None

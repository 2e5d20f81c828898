"""Engine and session factory, built from ``database`` settings (never at import time)."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from screener.core.config import DatabaseConfig
from screener.core.errors import DatabaseUnavailableError


def make_engine(config: DatabaseConfig, *, read_only: bool = False, bounded: bool = False) -> Engine:
    """An engine for SQLite (WAL, synchronous=FULL, busy timeout) or PostgreSQL (psycopg 3).

    ``read_only`` (the commands that only read): SQLite is opened through a ``mode=ro`` URI, so a missing
    file raises DatabaseUnavailableError instead of being created, and the database is never written (a
    WAL reader may make the empty ``-wal``/``-shm`` files beside it); PostgreSQL sessions are read-only
    transactions.

    ``bounded`` (the listener's own engine, used while an association waits): every wait is bounded by
    ``database.statement_timeout_seconds``: connection pool checkout, SQLite's busy timeout, PostgreSQL's
    ``statement_timeout``, ``lock_timeout`` and connect timeout. Other engines (worker, reports,
    migrations) are not, so a long report or migration is never cut short.
    """
    url = make_url(config.url)
    if read_only:
        return _make_read_only_engine(config, url)
    pool_timeout = config.statement_timeout_seconds if bounded else 30.0
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        busy = busy_timeout_ms(config) if bounded else config.busy_timeout_ms
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": busy / 1000},
            pool_size=config.pool_size,
            pool_timeout=pool_timeout,
            pool_pre_ping=True,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Durability first: every acknowledged instance must survive power loss (DESIGN contracts).
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy)}")
            cursor.close()

        return engine
    return create_engine(
        url,
        pool_size=config.pool_size,
        max_overflow=config.pool_size,
        pool_timeout=pool_timeout,
        pool_pre_ping=True,
        connect_args=(
            postgresql_connect_args(config)
            if bounded
            else {"connect_timeout": max(1, config.busy_timeout_ms // 1000)}
        ),
    )


def busy_timeout_ms(config: DatabaseConfig) -> int:
    """SQLite's lock wait: ``busy_timeout_ms``, but never past ``statement_timeout_seconds``."""
    return int(min(config.busy_timeout_ms, config.statement_timeout_seconds * 1000))


def postgresql_connect_args(config: DatabaseConfig) -> dict[str, Any]:
    """libpq settings bounding every wait on the server (``database.statement_timeout_seconds``).

    ``statement_timeout`` and ``lock_timeout`` end a statement the server runs too long or that waits for a
    lock; ``connect_timeout`` bounds a connection attempt (libpq takes whole seconds, at least 2). A server
    that is not running at all (stopped, frozen) is bounded on our side, see ``Ingest.receive_within``.
    """
    ms = max(1, int(config.statement_timeout_seconds * 1000))
    return {
        "connect_timeout": max(
            2, math.ceil(config.statement_timeout_seconds), config.busy_timeout_ms // 1000
        ),
        "options": f"-c statement_timeout={ms} -c lock_timeout={ms}",
    }


def _make_read_only_engine(config: DatabaseConfig, url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        return create_engine(
            url,
            pool_size=1,
            connect_args={
                "connect_timeout": max(1, config.busy_timeout_ms // 1000),
                "options": "-c default_transaction_read_only=on",
            },
        )
    if not url.database or url.database == ":memory:":
        raise DatabaseUnavailableError(f"database.url {config.url!r} names no database file to read")
    path = Path(url.database).resolve()
    if not path.is_file():
        raise DatabaseUnavailableError(
            f"database file {path} does not exist; this command only reads and never creates one: check "
            "database.url; create a new one with `screener db upgrade`, or, if it was lost, rebuild it with "
            "`screener db rebuild --from-spool`"
        )
    busy = config.busy_timeout_ms

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(
            f"{path.as_uri()}?mode=ro", uri=True, timeout=busy / 1000, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout={int(busy)}")
        conn.execute("PRAGMA query_only=ON")
        return conn

    return create_engine("sqlite://", creator=connect)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def ping(engine: Engine) -> bool:
    """Whether the database answers a trivial query (raises SQLAlchemyError when it cannot be reached)."""
    with engine.connect() as conn:
        return conn.execute(text("SELECT 1")).scalar() == 1


def bound_statements(conn: Connection, seconds: float) -> None:
    """In the connection's current transaction, end any statement running past ``seconds`` (PostgreSQL;
    SQLite has no statement timeout, its waits are bounded by its busy timeout)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"SET LOCAL statement_timeout = {int(seconds * 1000)}"))

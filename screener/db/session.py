"""Engine and session factory, built from ``database`` settings (never at import time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from screener.config import DatabaseConfig


def make_engine(config: DatabaseConfig) -> Engine:
    """An engine for SQLite (WAL, synchronous=FULL, busy timeout) or PostgreSQL (psycopg 3)."""
    url = make_url(config.url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": config.busy_timeout_ms / 1000},
            pool_size=config.pool_size,
            pool_pre_ping=True,
        )
        busy = config.busy_timeout_ms

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
        pool_pre_ping=True,
        connect_args={"connect_timeout": max(1, config.busy_timeout_ms // 1000)},
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)

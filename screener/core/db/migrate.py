"""Alembic, driven from code: upgrade to head, or refuse to run on a database that is not at head."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from screener.core.config import DatabaseConfig
from screener.core.db.session import make_engine
from screener.core.errors import DatabaseNotMigratedError


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(str(files("screener._migrations")))))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("no Alembic revisions found in screener._migrations")
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def open_database(config: DatabaseConfig, *, migrate: bool | None = None) -> Engine:
    """An engine at head: migrated when ``migrate`` (default ``database.auto_migrate``), else checked.

    Raises DatabaseNotMigratedError when the database is behind and migrating is not allowed.
    """
    engine = make_engine(config)
    ensure_at_head(engine, config.auto_migrate if migrate is None else migrate)
    return engine


def ensure_at_head(engine: Engine, auto_migrate: bool) -> str:
    """Migrate to head when ``auto_migrate``; otherwise raise unless already there. Returns the revision."""
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return head
    if not auto_migrate:
        raise DatabaseNotMigratedError(current, head)
    upgrade(engine)
    return head

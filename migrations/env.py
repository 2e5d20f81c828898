"""Alembic environment: run by ``screener db upgrade`` (and by ``serve`` when auto_migrate is on).

The caller passes an open connection in ``config.attributes["connection"]``; a URL in the
``sqlalchemy.url`` option works too, for running ``alembic`` by hand.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from screener.core.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.begin() as conn:
            _run(conn)
        return
    _run(connection)


def _run(connection: object) -> None:
    if connection.dialect.name == "sqlite":  # type: ignore[attr-defined]
        # Batch migrations rebuild a table and rename it back; with the reporting views on that table,
        # SQLite's modern ALTER TABLE RENAME would refuse. Legacy mode renames without re-checking views.
        connection.exec_driver_sql("PRAGMA legacy_alter_table=ON")  # type: ignore[attr-defined]
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # type: ignore[attr-defined]
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()

"""Alembic: `screener db upgrade` reaches head; `serve` refuses a stale database unless auto_migrate."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from screener.core.db.migrate import current_revision, head_revision, upgrade
from screener.core.db.models import Base
from tests.helpers import SCREENER


def _env(url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER")}
    env.update(
        {
            "SCREENER__DATABASE__URL": url,
            "SCREENER__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
            "SCREENER__LISTENER__PORT": "0",
            **extra,
        }
    )
    return env


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_upgrade_creates_the_models_schema_with_named_constraints(backend: str, tmp_path: Path, request):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    res = subprocess.run(
        [str(SCREENER), "db", "upgrade"], env=_env(url, tmp_path), capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    engine = create_engine(url)
    try:
        assert current_revision(engine) == head_revision()
        insp = inspect(engine)
        for table in Base.metadata.sorted_tables:
            cols = {c["name"] for c in insp.get_columns(table.name)}
            assert cols == {c.name for c in table.columns}, table.name
        uniques = {u["name"] for u in insp.get_unique_constraints("instances")}
        assert "uq_instances_sop_instance_uid" in uniques
        if backend == "sqlite":
            with (
                engine.connect() as conn
            ):  # WAL is persistent: set by the daemon's engine, seen by any reader
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


def test_serve_refuses_a_database_not_at_head_without_auto_migrate(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    res = subprocess.run(
        [str(SCREENER), "serve"],
        env=_env(url, tmp_path, SCREENER__DATABASE__AUTO_MIGRATE="false"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert "run `screener db upgrade`" in res.stderr
    engine = create_engine(url)
    try:
        upgrade(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_status_refuses_an_empty_database(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    res = subprocess.run([str(SCREENER), "status"], env=_env(url, tmp_path), capture_output=True, text=True)
    assert res.returncode == 1 and "screener db upgrade" in res.stderr


def test_full_downgrade_and_upgrade_round_trip_on_sqlite(tmp_path: Path):
    """Every revision's downgrade works, also where a table the reporting views read is rebuilt."""
    from alembic import command

    from screener.core.db.migrate import _alembic_config

    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        upgrade(engine)
        cfg = _alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_report_command_reads_views_and_refuses_an_unmigrated_database(tmp_path: Path):
    import json

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    env = _env(url, tmp_path)
    res = subprocess.run([str(SCREENER), "report", "daily"], env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "screener db upgrade" in res.stderr
    subprocess.run([str(SCREENER), "db", "upgrade"], env=env, check=True, capture_output=True)
    res = subprocess.run(
        [str(SCREENER), "report", "positives", "--format", "json", "--since", "2026-01-01"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["report"] == "positives"
    res = subprocess.run(
        [str(SCREENER), "report", "daily", "--since", "2026-02-02", "--until", "2026-02-01"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and "--since 2026-02-02 is after --until 2026-02-01" in res.stderr

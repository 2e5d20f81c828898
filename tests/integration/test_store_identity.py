"""Acknowledged means kept, whatever happens to the database (issue 16, finding 1).

The spool and the database carry one identity; a lost database is noticed while serving (0xA700, /healthz
503 naming why), `serve` refuses to start on a database that is not the spool's (exit 4) and deletes
nothing, read-only commands never create a database, and `screener db rebuild --from-spool` brings every
acknowledged instance back, classified once.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from screener.core.errors import EXIT_STORE_MISMATCH
from tests.helpers import SCREENER, Server, cli, free_port, rg1_pixels, small_cr, store, wait_for

FAST_WORKER = {
    "SCREENER__INFERENCE__POLL_SECONDS": "0.2",
    "SCREENER__INFERENCE__MAX_WAIT_MS": "100",
    "SCREENER__INFERENCE__PREPROCESS_WORKERS": "1",
}


def _healthz(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_lost_database_is_refused_then_rebuilt_from_the_spool(make_server, tiny_model_dir: Path):
    metrics_port = free_port()
    server: Server = make_server(SCREENER__METRICS__PORT=str(metrics_port), **FAST_WORKER).start()
    study = generate_uid()
    first = [small_cr(rg1_pixels(64), study_uid=study) for _ in range(6)]
    assert store(server.port, first) == [0x0000] * 6
    acked = {str(ds.SOPInstanceUID) for ds in first}
    assert (server.spool / "SPOOL_IDENTITY").is_file()

    database = server.workdir / "screener.db"
    database.unlink()  # as an operator's `rm` would: the -wal and -shm stay
    deleted_at = time.monotonic()

    # Read-only commands never create a database, nor touch the live WAL.
    wal_size = (server.workdir / "screener.db-wal").stat().st_size
    res = cli(server, "status", check=False)
    assert res.returncode == 1 and "does not exist" in res.stderr, res.stderr
    assert not database.exists()
    assert (server.workdir / "screener.db-wal").stat().st_size == wal_size

    # Within seconds the listener refuses (instances acknowledged before that are in the spool).
    refused_after = None
    while time.monotonic() - deleted_at < 15:
        ds = small_cr(rg1_pixels(64), study_uid=study)
        (status,) = store(server.port, [ds])
        if status == 0x0000:
            acked.add(str(ds.SOPInstanceUID))
        else:
            assert status == 0xA700
            refused_after = time.monotonic() - deleted_at
            break
        time.sleep(0.1)
    assert refused_after is not None and refused_after < 5, refused_after
    code, health = _healthz(metrics_port)
    assert code == 503 and health["failing"] == ["database"]
    assert "was deleted" in health["checks"]["database"]["error"]  # type: ignore[index]
    assert any(e["event"] == "database.lost" for e in server.log_events())
    assert server.stop() == 0

    # A restart finds a new, empty database beside a spool full of instances: it refuses, deleting nothing.
    files = server.spool_files()
    assert len(files) == len(acked)
    server.start(wait=False)
    assert server.proc is not None
    assert server.proc.wait(timeout=60) == EXIT_STORE_MISMATCH
    assert "not one store" in server.log_text() and "db rebuild --from-spool" in server.log_text()
    assert server.spool_files() == files

    # The recovery path: rebuild the index from the spool (twice: idempotent), then serve.
    for _ in range(2):
        res = cli(server, "db", "rebuild", "--from-spool")
        rows = dict(server.rows("SELECT sop_instance_uid, status FROM instances"))
        assert set(rows) == acked and set(rows.values()) == {"queued"}, res.stdout + res.stderr
    assert server.rows("SELECT count(*) FROM studies")[0][0] == 1
    cli(server, "models", "register", str(tiny_model_dir), "--activate")
    server.start()
    done = "SELECT count(*) FROM instances WHERE status = 'classified'"
    wait_for(lambda: server.rows(done)[0][0] == len(acked), 120, "every instance classified")
    per_instance = server.rows("SELECT instance_id, count(*) FROM predictions GROUP BY instance_id")
    assert len(per_instance) == len(acked) and {n for _, n in per_instance} == {1}, "classified once"
    assert server.spool_files() >= files


def test_serve_refuses_another_database_and_the_sweep_deletes_nothing(make_server, tmp_path: Path):
    """A spool bound to one database, served with another (also non-empty): exit 4, no file deleted."""
    a = make_server().start()
    assert store(a.port, [small_cr(rg1_pixels(32), study_uid=generate_uid())]) == [0x0000]
    assert a.stop() == 0
    b = make_server().start()  # a second store: its own database and spool
    assert store(b.port, [small_cr(rg1_pixels(32), study_uid=generate_uid())]) == [0x0000]
    assert b.stop() == 0
    files = a.spool_files()
    a.overrides["SCREENER__DATABASE__URL"] = b.db_url  # a's spool with b's database
    a.start(wait=False)
    assert a.proc is not None and a.proc.wait(timeout=60) == EXIT_STORE_MISMATCH
    assert "are not one store" in a.log_text()
    assert a.spool_files() == files, "nothing deleted"


READ_ONLY_COMMANDS = [
    ("status",),
    ("report", "daily"),
    ("deliveries", "list"),
    ("models", "list"),
    ("db", "current"),
]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER")}
    env["SCREENER__DATABASE__URL"] = f"sqlite:///{tmp_path / 'db' / 'screener.db'}"
    env["SCREENER__STORAGE__SPOOL_DIR"] = str(tmp_path / "spool")
    return env


@pytest.mark.parametrize("args", READ_ONLY_COMMANDS, ids=" ".join)
def test_read_only_commands_never_create_a_database(tmp_path: Path, args: tuple[str, ...]):
    env = _env(tmp_path)
    res = subprocess.run([str(SCREENER), *args], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "does not exist" in res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "db").exists(), "not even its folder"


def test_read_only_commands_write_nothing_to_an_existing_database(tmp_path: Path):
    env = _env(tmp_path)
    subprocess.run([str(SCREENER), "db", "upgrade"], env=env, check=True, capture_output=True, timeout=60)
    database = tmp_path / "db" / "screener.db"
    before = (database.stat().st_size, database.stat().st_mtime_ns)
    for args in READ_ONLY_COMMANDS:
        res = subprocess.run([str(SCREENER), *args], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, (args, res.stderr)
    # (A WAL reader may make an empty -wal and the -shm index beside it, as any SQLite reader does.)
    assert (database.stat().st_size, database.stat().st_mtime_ns) == before
    wal = database.with_name("screener.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0

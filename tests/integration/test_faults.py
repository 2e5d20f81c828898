"""Disk below its floor, database down: 0xA700, nothing half-written, recovery without a restart."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.helpers import assert_spool_consistent, rg1_pixels, small_cr, store

MiB = 1024 * 1024


@pytest.fixture
def tmpfs(tmp_path: Path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_spool_below_free_space_floor_answers_a700_then_recovers(make_server, tmpfs: Path):
    spool = tmpfs / "spool"
    server = make_server(
        SCREENER__STORAGE__SPOOL_DIR=str(spool), SCREENER__STORAGE__MIN_FREE_BYTES=str(8 * MiB)
    ).start()
    study = generate_uid()
    pixels = rg1_pixels(512)  # 0.5 MB per instance
    assert store(server.port, [small_cr(pixels, study_uid=study)]) == [0x0000]

    filler = tmpfs / "filler"
    free = shutil.disk_usage(tmpfs).free
    filler.write_bytes(b"\0" * (free - 8 * MiB - 256 * 1024))  # leaves less than the floor + one instance
    refused = small_cr(pixels, study_uid=study)
    assert store(server.port, [refused]) == [0xA700]
    assert server.rows("SELECT count(*) FROM instances")[0][0] == 1
    assert_spool_consistent(server)

    filler.unlink()
    assert store(server.port, [refused]) == [0x0000]  # the PACS retries; no restart needed
    assert server.rows("SELECT count(*) FROM instances")[0][0] == 2
    assert_spool_consistent(server)
    full = [e for e in server.log_events() if e.get("outcome") == "spool_full"]
    assert full and full[0]["status"] == "0xA700"
    assert "storage.min_free_bytes" in full[0]["detail"]


def test_sqlite_locked_by_another_writer_answers_a700_then_recovers(make_server):
    server = make_server(SCREENER__DATABASE__BUSY_TIMEOUT_MS="300").start()
    study = generate_uid()
    pixels = rg1_pixels(256)
    assert store(server.port, [small_cr(pixels, study_uid=study)]) == [0x0000]

    db_path = server.db_url.removeprefix("sqlite:///")
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        ds = small_cr(pixels, study_uid=study)
        assert store(server.port, [ds]) == [0xA700]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert_spool_consistent(server)
    assert server.rows("SELECT count(*) FROM instances")[0][0] == 1
    assert store(server.port, [ds]) == [0x0000]
    assert server.rows("SELECT count(*) FROM instances")[0][0] == 2
    down = [e for e in server.log_events() if e.get("outcome") == "database_unavailable"]
    assert down and down[0]["status"] == "0xA700"


@pytest.mark.postgres
def test_postgresql_stopped_answers_a700_then_recovers(make_server, pg_cluster):
    server = make_server(SCREENER__DATABASE__URL=pg_cluster.url, SCREENER__DATABASE__BUSY_TIMEOUT_MS="2000")
    server.start()
    study = generate_uid()
    pixels = rg1_pixels(256)
    assert store(server.port, [small_cr(pixels, study_uid=study)]) == [0x0000]

    pg_cluster.stop()
    ds = small_cr(pixels, study_uid=study)
    started = time.monotonic()
    assert store(server.port, [ds]) == [0xA700]
    assert time.monotonic() - started < 20
    pg_cluster.start()
    assert_spool_consistent(server)
    assert server.rows("SELECT count(*) FROM instances")[0][0] == 1
    assert store(server.port, [ds]) == [0x0000]
    assert server.rows("SELECT count(*) FROM instances")[0][0] == 2
    assert_spool_consistent(server)

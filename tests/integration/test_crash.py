"""kill -9 under load and SIGTERM during a transfer."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from tests.helpers import (
    Server,
    assert_spool_consistent,
    associate_result,
    reuid,
    rg1_dir,
    rg1_pixels,
    small_cr,
    store,
)


def _load(n: int) -> list[Dataset]:
    """n distinct real-pixel CR instances (0.5 MB each) in 10 studies."""
    base = rg1_pixels(512)
    studies = [generate_uid() for _ in range(10)]
    rng = random.Random(7)
    out = []
    for i in range(n):
        pixels = base.copy()
        pixels[rng.randrange(512), :] ^= 1 + (i % 7)  # distinct bytes per instance
        out.append(small_cr(pixels, study_uid=studies[i % 10]))
    return out


LOAD = 100  # the hardening suite's kill -9 rounds (tests/hardening/test_faults.py) go further


def _kill_under_load(server: Server) -> None:
    instances = _load(LOAD)
    acked: set[str] = set()
    lock = threading.Lock()
    kill_after = random.Random().randrange(LOAD // 5, LOAD * 7 // 10)

    def on_status(ds: Dataset, status: int | None) -> None:
        if status == 0x0000:
            with lock:
                acked.add(str(ds.SOPInstanceUID))
                if len(acked) == kill_after and server.proc and server.proc.poll() is None:
                    server.proc.kill()

    threads = [
        threading.Thread(target=store, args=(server.port, instances[i::4]), kwargs={"on_status": on_status})
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    server.proc.wait(timeout=30)
    assert server.proc.returncode == -signal.SIGKILL
    assert kill_after <= len(acked) < LOAD, "the kill landed outside the load"

    server.start()  # restart: reconciles the spool
    rows = {
        r[0]: r for r in server.rows("SELECT sop_instance_uid, sha256, spool_name, status FROM instances")
    }
    missing = acked - set(rows)
    assert not missing, f"{len(missing)} instances answered 0x0000 were lost"
    by_uid = {str(d.SOPInstanceUID): d for d in instances}
    for uid in acked:
        _, _, spool_name, status = rows[uid]
        assert status == "queued"
        assert dcmread(server.spool / spool_name).PixelData == by_uid[uid].PixelData
    assert_spool_consistent(server)  # hashes match, no orphans, no temporaries

    # The PACS resends everything it was not sure of: each instance ends up queued exactly once.
    statuses = store(server.port, instances)
    assert statuses == [0x0000] * LOAD
    assert server.rows("SELECT count(*), count(DISTINCT sop_instance_uid) FROM instances")[0] == (LOAD, LOAD)
    assert server.rows("SELECT count(*) FROM instance_clashes")[0][0] == 0
    assert_spool_consistent(server)


@pytest.mark.slow
def test_kill9_under_load_sqlite(make_server):
    _kill_under_load(make_server().start())


@pytest.mark.slow
@pytest.mark.postgres
def test_kill9_under_load_postgresql(make_server, pg_url):
    _kill_under_load(make_server(SCREENER__DATABASE__URL=pg_url).start())


def test_sigterm_lets_the_transfer_finish_and_refuses_new_associations(make_server, tmp_path: Path):
    server = make_server(SCREENER__LISTENER__DRAIN_SECONDS="60").start()
    study = generate_uid()
    files = [reuid(rg1_dir() / "RG1_UNCR.dcm", tmp_path / f"{i}.dcm", study_uid=study) for i in range(12)]
    signalled = threading.Event()
    after_signal: list[str] = []

    def on_status(ds: Dataset, status: int | None) -> None:
        if not signalled.is_set():
            signalled.set()
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # let the server close its listening socket
            after_signal.append(associate_result(server.port))

    statuses = store(server.port, files, on_status=on_status)
    assert statuses == [0x0000] * len(files), "the in-flight association must complete"
    assert after_signal == ["failed"], "a new association after SIGTERM must be refused"
    assert server.proc.wait(timeout=60) == 0
    assert server.rows("SELECT count(*) FROM instances")[0][0] == len(files)
    events = [e["event"] for e in server.log_events()]
    assert "listener.draining" in events and "serve.stopped" in events
    stopped = next(e for e in server.log_events() if e["event"] == "listener.stopped")
    assert stopped["aborted"] == 0

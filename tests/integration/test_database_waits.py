"""Bounded database waits (issue 16, finding 2): a frozen PostgreSQL gets every C-STORE answered in time.

A throwaway cluster (initdb) has every process SIGSTOPped mid-stream: no server-side timeout can fire, the
sockets stay open, the kernel keeps acknowledging TCP. Stores already inside a database call, and new ones,
must be answered 0xA700 within database.statement_timeout_seconds plus a margin; every 0x0000 is kept;
nothing answered 0xA700 is left half-written (a row without its file, a file without its row).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from screener.core.pynetdicom_compat import keep_responses_for_caller
from tests.helpers import ThrowawayCluster, assert_spool_consistent, rg1_pixels, small_cr, wait_for

BOUND = 2.0  # database.statement_timeout_seconds
MARGIN = 2.5  # the listener's own second, plus a loaded 2-core CI machine
FROZEN = 8.0  # seconds the database is stopped: far past BOUND + MARGIN


def _cluster_pids(cluster: ThrowawayCluster) -> list[int]:
    """The postmaster and every process it started (backends, checkpointer, WAL writer, ...)."""
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == postmaster]
    return [postmaster, *children]


def _parent(proc: Path) -> int | None:
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


@pytest.mark.postgres
def test_a_frozen_postgresql_answers_a700_within_the_bound(make_server, pg_cluster: ThrowawayCluster):
    server = make_server(
        role="listener",
        SCREENER__DATABASE__URL=pg_cluster.url,
        SCREENER__DATABASE__STATEMENT_TIMEOUT_SECONDS=str(BOUND),
    ).start()
    study = generate_uid()
    pixels = rg1_pixels(128)
    results: list[tuple[str, int | None, float, float]] = []  # (uid, status, sent at, seconds to answer)
    stop = threading.Event()

    def stream() -> None:
        ae = AE(ae_title="STREAMER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60  # we must not be the side giving up
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", server.port, ae_title="CXRSCREENER")
        assert assoc.is_established
        keep_responses_for_caller(assoc)
        try:
            while not stop.is_set():
                ds = small_cr(pixels, study_uid=study)
                sent = time.monotonic()
                rsp = assoc.send_c_store(ds)
                status = int(rsp.Status) if rsp and "Status" in rsp else None
                results.append((str(ds.SOPInstanceUID), status, sent, time.monotonic() - sent))
        finally:
            assoc.release()

    streams = [threading.Thread(target=stream) for _ in range(3)]
    for t in streams:
        t.start()
    time.sleep(1.5)
    pids = _cluster_pids(pg_cluster)
    frozen_at = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(FROZEN)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    thawed_at = time.monotonic()
    time.sleep(1.5)
    stop.set()
    for t in streams:
        t.join(timeout=60)

    assert all(status is not None for _, status, _, _ in results), "every C-STORE answered"
    slowest = max(seconds for *_, seconds in results)
    assert slowest < BOUND + MARGIN, f"a C-STORE waited {slowest:.1f} s with the bound at {BOUND} s"
    during = [status for _, status, sent, _ in results if frozen_at <= sent < thawed_at - BOUND - MARGIN]
    assert during and set(during) == {0xA700}, "refused while the database is frozen"
    assert {s for _, s, sent, seconds in results if sent + seconds < frozen_at} == {0x0000}

    # Receptions the associations stopped waiting for finish once the database is back: whole or gone.
    def settled() -> bool:
        try:
            assert_spool_consistent(server)
        except AssertionError:
            return False
        return True

    wait_for(settled, 30, "the abandoned receptions to finish")
    stored = {r[0] for r in server.rows("SELECT sop_instance_uid FROM instances")}
    acked = {uid for uid, status, _, _ in results if status == 0x0000}
    assert acked <= stored, "every 0x0000 is kept"
    assert stored <= {uid for uid, *_ in results}
    late = [e for e in server.log_events() if e["event"] == "instance.late_outcome"]
    assert late, "the stores caught inside a database call finished after their 0xA700"

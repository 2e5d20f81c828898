"""Load: many DCMTK associations at once, the association limit, the same study from several senders.

Every store a peer sends must come back 0x0000 and end as one row, one spool file and one prediction.
Real chest radiographs from pydicom-data (RG1_J2KI: 1955 x 1841 px CR, JPEG 2000, 0.68 MB) are re-UID'd
and sent by DCMTK ``storescu`` proposing JPEG 2000 (``-xw``), as a PACS forwarding them would.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.hardening.conftest import Figure, PeakSampler, full_strength, percentile, proc_status
from tests.helpers import (
    Server,
    assert_spool_consistent,
    cli,
    rg1_dir,
    rg1_pixels,
    small_cr,
    wait_for,
)

pytestmark = pytest.mark.slow

MODEL_SETTINGS = {
    "SCREENER__INFERENCE__POLL_SECONDS": "0.1",
    "SCREENER__INFERENCE__PREPROCESS_WORKERS": "1",
    "SCREENER__INFERENCE__MAX_BATCH": "32",
    "SCREENER__INFERENCE__STUDY_SETTLE_SECONDS": "2",
}
STORE_RESPONSE = re.compile(r"Received Store Response \((?P<status>[^)]*)\)")


def _radiographs(out: Path, count: int, *, per_study: int, prefix: str) -> list[Path]:
    """``count`` copies of RG1_J2KI with fresh SOP Instance UIDs, ``per_study`` to a study."""
    ds = dcmread(rg1_dir() / "RG1_J2KI.dcm")
    if 0xFFFCFFFC in ds:  # trailing padding may be dropped on the wire (PS3.5 7.5.1)
        del ds[0xFFFCFFFC]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    study = series = generate_uid()
    for i in range(count):
        if i % per_study == 0:
            study, series = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        path = out / f"{prefix}{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _storescu(port: int, files: Sequence[Path], *, calling: str) -> list[str]:
    """Send ``files`` over one DCMTK association; returns the status text of every store response."""
    res = subprocess.run(
        ["storescu", "-v", "-xw", "-aet", calling, "-aec", "CXRSCREENER", "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=600,
    )
    statuses = STORE_RESPONSE.findall(res.stdout + res.stderr)
    assert res.returncode == 0, f"storescu exited {res.returncode}:\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
    return statuses


def _serve_with_model(make_server, tiny_model_dir: Path, **overrides: str) -> Server:
    server: Server = make_server(**MODEL_SETTINGS, **overrides)
    cli(server, "db", "upgrade")
    cli(server, "models", "register", str(tiny_model_dir), "--activate")
    return server.start()


def _handler_ms(server: Server) -> list[float]:
    return [
        float(e["ms"])
        for e in server.log_events()
        if e.get("event") == "instance.received" and e.get("status") == "0x0000"
    ]


def _assert_one_of_everything(server: Server, expected: int, timeout: float) -> None:
    wait_for(
        lambda: (
            server.rows("SELECT count(*) FROM instances WHERE status IN ('classified', 'skipped', 'failed')")[
                0
            ][0]
            >= expected
        ),
        timeout,
        f"{expected} instances classified",
    )
    assert server.rows("SELECT count(*), count(DISTINCT sop_instance_uid) FROM instances")[0] == (
        expected,
        expected,
    )
    assert server.rows("SELECT status, count(*) FROM instances GROUP BY status") == [("classified", expected)]
    per_instance = server.rows("SELECT instance_id, count(*) FROM predictions GROUP BY instance_id")
    assert len(per_instance) == expected and all(n == 1 for _, n in per_instance), "one prediction each"
    assert len(server.spool_files()) == expected
    assert_spool_consistent(server)


def test_ten_dcmtk_associations_of_many_then_hundreds_of_single_instance_associations(
    make_server, tiny_model_dir: Path, tmp_path: Path, figure: Figure
):
    # Full strength (tests/hardening/run): 10 associations of 100, then 500 of one; CI: 40 and 200.
    per_association, n_single = (100, 500) if full_strength() else (20, 200)
    n_bulk = 10 * per_association
    total = n_bulk + n_single
    bulk = _radiographs(tmp_path / "bulk", n_bulk, per_study=4, prefix="b")
    singles = _radiographs(tmp_path / "single", n_single, per_study=1, prefix="s")
    server = _serve_with_model(make_server, tiny_model_dir)
    assert server.proc is not None
    with PeakSampler(server.proc.pid) as sampler:
        started = time.monotonic()
        with ThreadPoolExecutor(10) as pool:
            bulk_status = list(
                pool.map(
                    lambda k: _storescu(
                        server.port,
                        bulk[k * per_association : (k + 1) * per_association],
                        calling=f"LOAD{k}",
                    ),
                    range(10),
                )
            )
        bulk_seconds = time.monotonic() - started
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            single_status = list(pool.map(lambda f: _storescu(server.port, [f], calling="SINGLE"), singles))
        single_seconds = time.monotonic() - started
        assert [len(s) for s in bulk_status] == [per_association] * 10, "one store response per file"
        assert [len(s) for s in single_status] == [1] * n_single
        not_ok = [s for group in bulk_status + single_status for s in group if s != "Success"]
        _assert_one_of_everything(server, total, timeout=600)
    hwm_kib = proc_status(server.proc.pid).get("VmHWM", 0)
    handler = _handler_ms(server)
    figure(
        "load.instances_sent",
        total,
        "instances",
        associations=10 + n_single,
        image="RG1_J2KI 1955x1841 J2K",
    )
    figure("load.not_success", len(not_ok), "responses", examples=not_ok[:3])
    figure("load.lost", total - server.rows("SELECT count(*) FROM instances")[0][0], "instances")
    figure("load.bulk_throughput", round(n_bulk / bulk_seconds, 1), "instances/s", associations=10)
    figure("load.single_association_rate", round(n_single / single_seconds, 1), "associations/s", parallel=4)
    figure("load.cstore_handler_p50", percentile(handler, 50), "ms")
    figure("load.cstore_handler_p99", percentile(handler, 99), "ms", samples=len(handler))
    figure("load.server_peak_rss", round(hwm_kib / 1024, 1), "MiB", what="VmHWM of screener serve")
    figure("load.tree_peak_rss", round(sampler.peak_kib / 1024, 1), "MiB", what="serve + preprocess pool")
    assert not_ok == []
    assert len(handler) == total


def _hold(port: int, n: int) -> list[object]:
    """``n`` established associations held open (CR storage + verification contexts)."""
    held = []
    for i in range(n):
        ae = AE(ae_title=f"HOLD{i}")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRSCREENER")
        assert assoc.is_established, f"association {i + 1} of {n} within the limit was not accepted"
        held.append(assoc)
    return held


def test_associations_beyond_the_limit_are_rejected_transient_and_threads_return(make_server, figure: Figure):
    server = make_server(SCREENER__LISTENER__MAX_ASSOCIATIONS="4").start()
    assert server.proc is not None
    pid = server.proc.pid
    study = generate_uid()
    pixels = rg1_pixels(256)
    for assoc in _hold(server.port, 2):  # warm up the lazily started parts before the baseline
        assoc.release()  # type: ignore[attr-defined]
    time.sleep(1)
    baseline = proc_status(pid)["Threads"]

    held = _hold(server.port, 4)
    busy_threads = proc_status(pid)["Threads"]
    extras = []
    for _ in range(6):
        res = subprocess.run(
            ["echoscu", "-v", "-to", "10", "-aec", "CXRSCREENER", "127.0.0.1", str(server.port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        extras.append((res.returncode, res.stdout + res.stderr))
    rejected = [out for rc, out in extras if rc != 0 and "Association Rejected" in out]
    assert len(rejected) == 6, f"extras were not rejected: {extras[0][1]}"
    for out in rejected:  # PS3.8 9.3.4: result 2 transient, source 3 provider (presentation), reason 2
        assert "Rejected Transient" in out and "Local Limit Exceeded" in out, out

    statuses = [
        int(assoc.send_c_store(small_cr(pixels, study_uid=study)).Status)  # type: ignore[attr-defined]
        for assoc in held
    ]
    for assoc in held:
        assoc.release()  # type: ignore[attr-defined]
    assert statuses == [0x0000] * 4, "the admitted associations complete"
    threads_after: list[int] = []

    def back_to_baseline() -> bool:
        threads_after.append(proc_status(pid)["Threads"])
        return threads_after[-1] <= baseline

    wait_for(back_to_baseline, 30, f"server threads back to {baseline}")
    res = subprocess.run(
        ["echoscu", "-aec", "CXRSCREENER", "127.0.0.1", str(server.port)], capture_output=True, timeout=60
    )
    assert res.returncode == 0, "a new association is admitted once the others are gone"
    assert server.rows("SELECT count(*) FROM instances")[0][0] == 4
    figure("limit.extras_rejected", len(rejected), "associations", tried=6, max_associations=4)
    figure("limit.threads", threads_after[-1], "threads", baseline=baseline, with_4_held=busy_threads)


def test_the_same_study_from_five_senders_at_once_is_stored_and_classified_once(
    make_server, tiny_model_dir: Path, tmp_path: Path, figure: Figure
):
    study = _radiographs(tmp_path / "study", 20, per_study=20, prefix="i")
    server = _serve_with_model(make_server, tiny_model_dir)
    barrier = threading.Barrier(5)

    def sender(k: int) -> list[str]:
        barrier.wait()
        return _storescu(server.port, study, calling=f"SENDER{k}")

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(sender, range(5)))
    assert results == [["Success"] * 20] * 5, "every sender gets 0x0000 for every instance"
    _assert_one_of_everything(server, 20, timeout=180)
    assert server.rows("SELECT count(*) FROM instance_clashes")[0][0] == 0
    outcomes = [e.get("outcome") for e in server.log_events() if e.get("event") == "instance.received"]
    figure("same_study.stores", len(outcomes), "C-STOREs", senders=5, instances=20)
    figure("same_study.rows", server.rows("SELECT count(*) FROM instances")[0][0], "rows", expected=20)
    figure("same_study.duplicates_answered_success", outcomes.count("duplicate"), "C-STOREs")

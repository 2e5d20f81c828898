"""The receive path: data sets go straight into the spool's temporary folder and are renamed into place.

Byte identity of the RG1 radiographs is checked in test_ingest.py; here: a large instance, and that no
temporary file outlives a C-STORE, whatever its answer, or an association that dies mid-data-set.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.helpers import (
    assert_spool_consistent,
    dataset_offset,
    rg1_pixels,
    small_cr,
    store,
    store_file_raw,
    wait_for,
)

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def _large_dx(path: Path, side: int) -> bytes:
    """A ``side`` x ``side`` 16-bit uncompressed DX built from the real RG1 radiograph; returns its bytes."""
    tile = rg1_pixels(500)
    pixels = np.tile(tile, (side // 500 + 1, side // 500 + 1))[:side, :side]
    ds = small_cr(pixels, study_uid=generate_uid())
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_PRESENTATION
    ds.Modality = "DX"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_large_instance_is_spooled_byte_identical_with_its_hash(make_server, tmp_path: Path):
    server = make_server().start()
    sent = tmp_path / "large.dcm"
    original = _large_dx(sent, 2500)
    assert len(original) > 12_000_000
    assert store_file_raw(server.port, sent) == 0x0000
    ((name, digest, size, status),) = server.rows(
        "SELECT spool_name, sha256, size_bytes, status FROM instances"
    )
    spooled = (server.spool / name).read_bytes()
    assert status == "queued"
    assert size == len(spooled) and digest == hashlib.sha256(spooled).hexdigest()
    assert spooled[dataset_offset(spooled) :] == original[dataset_offset(original) :]
    assert_spool_consistent(server)
    received = next(e for e in server.log_events() if e["event"] == "instance.received")
    assert received["bytes"] == len(spooled)


def test_refused_and_repeated_instances_leave_no_temporary_file(make_server):
    server = make_server(SCREENER__LISTENER__ON_CONFLICT="refuse").start()
    study, sop = generate_uid(), generate_uid()
    first = small_cr(rg1_pixels(256), study_uid=study, sop_uid=sop)
    clash = small_cr(rg1_pixels(256)[::-1].copy(), study_uid=study, sop_uid=sop)
    assert store(server.port, [first, first, clash]) == [0x0000, 0x0000, 0x0111]
    assert len(server.spool_files()) == 1
    assert server.temp_files() == []
    assert_spool_consistent(server)


def test_disk_floor_answers_a700_and_leaves_nothing(make_server):
    server = make_server(SCREENER__STORAGE__MIN_FREE_BYTES=str(2**60)).start()
    ds = small_cr(rg1_pixels(256), study_uid=generate_uid())
    assert store(server.port, [ds, ds]) == [0xA700, 0xA700]
    assert server.rows("SELECT count(*) FROM instances")[0][0] == 0
    assert server.spool_files() == set()
    assert server.temp_files() == []
    full = [e for e in server.log_events() if e.get("outcome") == "spool_full"]
    assert len(full) == 2 and "storage.min_free_bytes" in full[0]["detail"]


def test_sender_dying_mid_data_set_leaves_no_temporary_file(make_server, tmp_path: Path):
    """storescu is killed while its 50 MB data set streams in; the half-received file must go."""
    server = make_server().start()
    big = tmp_path / "big.dcm"
    _large_dx(big, 5000)
    proc = subprocess.Popen(
        ["storescu", "-aec", "CXRSCREENER", "127.0.0.1", str(server.port), str(big)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tmp_dir = server.spool / ".tmp"
    deadline = time.monotonic() + 30
    partial = False
    while time.monotonic() < deadline and proc.poll() is None:
        sizes = [p.stat().st_size for p in tmp_dir.glob("*.part") if p.exists()]
        if any(0 < s < 40_000_000 for s in sizes):
            os.kill(proc.pid, 9)
            partial = True
            break
        time.sleep(0.001)
    proc.wait(timeout=30)
    assert partial, "storescu finished before a partial data set was seen"
    wait_for(lambda: server.temp_files() == [], 10, "the partial data set to be deleted")
    assert server.rows("SELECT count(*) FROM instances")[0][0] == 0
    assert server.spool_files() == set()
    assert any(e["event"] == "association.partial_discarded" for e in server.log_events())
    # The listener is unharmed: the next sender is served.
    assert store(server.port, [small_cr(rg1_pixels(128), study_uid=generate_uid())]) == [0x0000]
    assert_spool_consistent(server)


def test_large_instance_from_dcmtk_keeps_its_pixels(make_server, tmp_path: Path):
    server = make_server().start()
    sent = tmp_path / "large.dcm"
    _large_dx(sent, 2500)
    out = subprocess.run(
        ["storescu", "-aec", "CXRSCREENER", "127.0.0.1", str(server.port), str(sent)],
        capture_output=True,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert out.returncode == 0, out.stderr
    ((name,),) = server.rows("SELECT spool_name FROM instances")
    assert dcmread(server.spool / name).PixelData == dcmread(sent).PixelData
    assert_spool_consistent(server)

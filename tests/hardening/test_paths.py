"""No DICOM value steers a file path, and a stored Part 10 file never keeps a sender's preamble.

The spool names files from content hashes (screener/core/spool.py); these tests send every value that could
reach a path if that ever changed (UIDs in the command and the data set, the calling AE title, patient
name and ID, file meta and file-set values) carrying ``../``, absolute paths, NUL and very long strings,
and compare the server's working directory and a sentinel directory before and after.
"""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid

from tests.hardening.conftest import Figure
from tests.hardening.test_malformed import p_data, raw_association, read_pdu
from tests.helpers import CR_STORAGE, Server, dataset_offset, rg1_pixels, small_cr, store

MEDIA_PARENT = "../../../../../../.."


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _command(sop_uid: bytes) -> bytes:
    """A C-STORE-RQ command set with any bytes as Affected SOP Instance UID (PS3.7 9.3.1.1)."""
    command = Dataset()
    command.AffectedSOPClassUID = CR_STORAGE
    command.CommandField = 0x0001
    command.MessageID = 7
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    body = io.BytesIO()
    fp = DicomFileLike(body)
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, command)
    raw_uid = sop_uid + (b"\x00" if len(sop_uid) % 2 else b"")
    elements = body.getvalue() + b"\x00\x00\x00\x10" + len(raw_uid).to_bytes(4, "little") + raw_uid
    return b"\x00\x00\x00\x00\x04\x00\x00\x00" + len(elements).to_bytes(4, "little") + elements


def _raw_store(port: int, sop_uid: bytes, dataset: bytes) -> int | None:
    """C-STORE with the command's SOP Instance UID given as raw bytes; the status, None if none came."""
    with raw_association(port) as sock:
        sock.sendall(p_data(1, 0x03, _command(sop_uid)))
        sock.sendall(p_data(1, 0x02, dataset))
        sock.settimeout(30)
        reply = b""
        status_tag = b"\x00\x00\x00\x09\x02\x00\x00\x00"
        while status_tag not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            reply += chunk
        at = reply.index(status_tag) + len(status_tag)
        sock.sendall(b"\x05\x00\x00\x00\x00\x04" + bytes(4))
        read_pdu(sock, 5)
        return int.from_bytes(reply[at : at + 2], "little")


def _evil(sentinel: Path, value: str) -> Dataset:
    ds = small_cr(
        rg1_pixels(32), study_uid=value, sop_uid=generate_uid(), patient_name=value, patient_id=value
    )
    ds.SeriesInstanceUID = value
    ds.StorageMediaFileSetID = value[:16]
    ds.file_meta.MediaStorageSOPInstanceUID = value
    ds.file_meta.SourceApplicationEntityTitle = value[:16]
    ds.ReferencedFileID = [p for p in value.split("/") if p][:8] or ["X"]
    return ds


@pytest.mark.parametrize("sender", ["raw", "pynetdicom"])
def test_no_dicom_value_writes_outside_the_spool(make_server, tmp_path: Path, figure: Figure, sender: str):
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("untouched")
    server: Server = make_server(role="listener").start()
    values = [
        f"{MEDIA_PARENT}{sentinel}/x",
        f"{sentinel}/abs",
        "../../x\x00../../y",
        "1.2." + "9" * 5000,
        "..",
        "/",
        f"..\\..\\{sentinel.name}\\w",
    ]
    before_work = {k for k in _tree(server.workdir) if not k.startswith("spool/")}
    before_sentinel = _tree(sentinel)
    statuses: list[int | None] = []
    for value in values:
        ds = _evil(sentinel, value)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        if sender == "raw":
            # The data set names itself as the command does: command and data set must agree (ingest), so
            # the value reaches the database key, which is what this test is about.
            ds.SOPInstanceUID = value
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            data = buffer.getvalue()
            statuses.append(_raw_store(server.port, value.encode("latin-1"), data[dataset_offset(data) :]))
        else:
            calling = (value.replace("\x00", "")[:16].strip() or "X").replace("\\", "/")
            statuses += store(server.port, [ds], calling=calling)
    after_work = {k for k in _tree(server.workdir) if not k.startswith("spool/")}
    created = {k for k in after_work - before_work if not k.startswith("screener.db")}
    assert created == set(), f"files written outside the spool: {created}"
    assert _tree(sentinel) == before_sentinel
    names = [r[0] for r in server.rows("SELECT spool_name FROM instances")]
    assert names and all(
        re.fullmatch(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}-[0-9a-f]{8}\.dcm", n) for n in names
    )
    for name in names:
        assert (server.spool / name).resolve().is_relative_to(server.spool.resolve())
    assert not any(Path("/").glob("x")) and not (tmp_path / "x").exists()
    # Every store is answered. Over 64 characters the command's UID is no UID (PS3.5 9.1): 0xC000, with the
    # reason logged. Anything shorter is stored verbatim (it never names a file), like any other string.
    expected = [0xC000 if sender == "raw" and len(v) > 64 else 0x0000 for v in values]
    assert statuses == expected, f"statuses {statuses}, expected {expected}"
    refused = [e for e in server.log_events() if e.get("status") == "0xC000"]
    assert len(refused) == expected.count(0xC000)
    assert all("Affected SOP Instance UID" in e["detail"] and "PS3.5 9.1" in e["detail"] for e in refused)
    figure(
        "path traversal values sent",
        len(values),
        "values",
        sender=sender,
        written_outside=0,
        statuses=statuses,
    )


EXECUTABLE_PREAMBLES = {
    "MZ": b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff" + b"This program cannot be run in DOS mode.",
    "ELF": b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\x3e\x00\x01\x00\x00\x00",
}


@pytest.mark.parametrize("tool", ["dcmsend", "storescu"])
def test_an_executable_preamble_is_not_stored(make_server, tmp_path: Path, tool: str):
    """PS3.10 7.1 allows any preamble; a stored copy that kept an MZ/ELF header could be run or scanned
    as a program. What we store has a zero preamble and the same data set."""
    server = make_server(role="listener").start()
    sent = []
    for kind, magic in EXECUTABLE_PREAMBLES.items():
        ds = small_cr(rg1_pixels(32), study_uid=generate_uid())
        ds.preamble = magic.ljust(128, b"\x00")
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert path.read_bytes()[:2] in (b"MZ", b"\x7fE")
        sent.append((path, ds))
    out = subprocess.run(
        [tool, "-aec", "CXRSCREENER", "127.0.0.1", str(server.port), *(str(p) for p, _ in sent)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for _path, ds in sent:
        ((name,),) = server.rows(
            "SELECT spool_name FROM instances WHERE sop_instance_uid = :uid", uid=ds.SOPInstanceUID
        )
        stored = (server.spool / name).read_bytes()
        assert stored[:128] == bytes(128), "the stored preamble is zeros"
        assert stored[128:132] == b"DICM"
        back = dcmread(server.spool / name)
        for element in ds:
            assert back[element.tag].value == element.value, element.keyword

"""Malformed DICOM network traffic against a real `screener serve`, over raw sockets.

Each hostile peer must get an abort or an error status, or its instance is stored and then marked
skipped/failed with a reason by the worker (DESIGN: bad input gets a clear typed answer and loses nothing).
After each, the server still answers C-ECHO (DCMTK echoscu) and stores a normal instance, and its peak
resident memory (VmHWM of /proc/PID/status, reset through /proc/PID/clear_refs) stays bounded: what a peer
declares (a PDU length, a gigapixel image, an inflated size) must not turn into memory.
"""

from __future__ import annotations

import io
import socket
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from bench.fuzz import apply
from tests.hardening.conftest import Figure, proc_status
from tests.helpers import (
    CR_STORAGE,
    Server,
    cli,
    dataset_offset,
    rg1_pixels,
    small_cr,
    store,
    store_file_raw,
    wait_for,
)

MIB = 1 << 20
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
ABORT, ASSOCIATE_AC = 0x07, 0x02
LISTENER = {
    "SCREENER__LISTENER__NETWORK_TIMEOUT": "5",
    "SCREENER__LISTENER__ACSE_TIMEOUT": "5",
    "SCREENER__LISTENER__DIMSE_TIMEOUT": "5",
}
# Growth of the listener's peak resident memory allowed per hostile peer: the interpreter's working set
# for one association and one small instance. What the peer declares must not count.
MEMORY_BOUND_KIB = 48 * 1024


# --- raw PDUs (PS3.8 9.3) ---------------------------------------------------------------------------------


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _pdu(kind: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body) if length is None else length) + body


def associate_rq(
    sop_class: str, syntax: str, *, called: bytes = b"CXRSCREENER", calling: bytes = b"RAWSCU"
) -> bytes:
    """A-ASSOCIATE-RQ with one presentation context (id 1) and a 16 KiB maximum PDU (PS3.8 9.3.2)."""
    context = (
        struct.pack(">BBBB", 1, 0, 0, 0) + _item(0x30, sop_class.encode()) + _item(0x40, syntax.encode())
    )
    user = _item(0x51, struct.pack(">L", 16384))
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16)
        + calling.ljust(16)
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT)
        + _item(0x20, context)
        + _item(0x50, user)
    )
    return _pdu(0x01, body)


def p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    """P-DATA-TF with one PDV; ``control`` bit 0 = command, bit 1 = last fragment (PS3.8 E.2)."""
    pdv = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return _pdu(0x04, pdv)


def read_pdu(sock: socket.socket, timeout: float) -> int | None:
    """Type of the next PDU the server sends; None when it closes the connection first."""
    sock.settimeout(timeout)
    header = b""
    with suppress(ConnectionResetError):
        while len(header) < 6:
            chunk = sock.recv(6 - len(header))
            if not chunk:
                return None
            header += chunk
        kind, _, length = struct.unpack(">BBL", header)
        left = length
        while left:
            chunk = sock.recv(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)
        return int(kind)
    return None


def aborted_or_closed(sock: socket.socket, timeout: float = 15) -> bool:
    """The server answers with A-ABORT or closes the connection, within ``timeout`` seconds."""
    try:
        kind = read_pdu(sock, timeout)
    except TimeoutError:
        return False
    return kind in (None, ABORT)


def raw_association(
    port: int, sop_class: str = CR_STORAGE, syntax: str = ExplicitVRLittleEndian
) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq(sop_class, syntax))
    assert read_pdu(sock, 10) == ASSOCIATE_AC, "the listener accepts a well-formed association request"
    return sock


def store_command(sop_uid: str) -> bytes:
    """The encoded C-STORE-RQ command set (implicit VR little endian, PS3.7 9.3.1.1)."""
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = CR_STORAGE
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Priority = 2
    primitive.DataSet = io.BytesIO(b"\x00")  # any dataset: the command then says one follows
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    command = message.command_set
    buffer = io.BytesIO()
    from pydicom.filebase import DicomFileLike

    fp = DicomFileLike(buffer)
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, command)
    return buffer.getvalue()


# --- the server, its memory and its health ----------------------------------------------------------------


def reset_peak(pid: int) -> int:
    """Reset the process's VmHWM to its current RSS (Linux clear_refs); returns that RSS in KiB."""
    with suppress(PermissionError, FileNotFoundError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return proc_status(pid)["VmRSS"]


@contextmanager
def peak_growth(server: Server) -> Iterator[dict[str, int]]:
    """Yields a dict that holds ``kib``: how far the peak RSS rose above the level at entry."""
    assert server.proc is not None
    pid = server.proc.pid
    out = {"kib": 0}
    before = reset_peak(pid)
    yield out
    out["kib"] = proc_status(pid)["VmHWM"] - before


def normal_instance() -> Dataset:
    from pydicom.uid import generate_uid

    return small_cr(rg1_pixels(64), study_uid=generate_uid())


def assert_still_serving(server: Server) -> None:
    assert server.proc is not None and server.proc.poll() is None, "the server process is alive"
    echo = subprocess.run(
        ["echoscu", "-aec", "CXRSCREENER", "127.0.0.1", str(server.port)], capture_output=True, timeout=30
    )
    assert echo.returncode == 0, echo.stderr
    assert store(server.port, [normal_instance()]) == [0x0000]


def listener(make_server) -> Server:
    server = make_server(role="listener", **LISTENER).start()
    assert_still_serving(server)  # warms the association path before memory is measured
    return server


# --- protocol abuse ----------------------------------------------------------------------------------


def _huge_pdu_before_association(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_pdu(0x01, bytes(65536), length=0xFFFFFFFF))
        sock.shutdown(socket.SHUT_WR)  # the peer gives up having sent 64 KiB of the 4 GiB it declared
        return aborted_or_closed(sock)


def _huge_pdata_in_association(port: int) -> bool:
    with raw_association(port) as sock:
        sock.sendall(_pdu(0x04, bytes(MIB), length=0xFFFFFFFF))
        sock.shutdown(socket.SHUT_WR)
        return aborted_or_closed(sock)


def _unknown_pdu_first(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_pdu(0x55, b"\x00" * 4))
        return aborted_or_closed(sock, timeout=8)  # past the listener's 5 s timeouts


def _unknown_pdu_in_association(port: int) -> bool:
    with raw_association(port) as sock:
        sock.sendall(_pdu(0x0A, b"\x00" * 16))
        return aborted_or_closed(sock)


def _data_before_association(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(p_data(1, 0x03, b"\x00" * 8))
        return aborted_or_closed(sock)


PROTOCOL_CASES = {
    "A-ASSOCIATE-RQ declaring 0xFFFFFFFF bytes": _huge_pdu_before_association,
    "P-DATA-TF declaring 0xFFFFFFFF bytes": _huge_pdata_in_association,
    "P-DATA-TF before any association": _data_before_association,
    "unknown PDU type 0x0A in an association": _unknown_pdu_in_association,
}
# PS3.8 9.2.3 (Table 9-10, Evt19 "unrecognized or invalid PDU"): the provider must answer with A-ABORT.
UNKNOWN_PDU_CASES = {"unknown PDU type 0x55 first": _unknown_pdu_first}


def test_protocol_violations_and_hostile_headers_cost_the_listener_no_memory(make_server, figure: Figure):
    server = listener(make_server)
    for name, attack in PROTOCOL_CASES.items():
        with peak_growth(server) as growth:
            answered = attack(server.port)
        assert answered, f"{name}: the listener neither aborted nor closed the connection"
        assert growth["kib"] < MEMORY_BOUND_KIB, f"{name}: peak memory rose {growth['kib']} KiB"
        assert_still_serving(server)
        figure("protocol abuse peak memory growth", growth["kib"], "KiB", case=name)
    for name, ds in {"sequences nested 100 deep": nested(100), "65535 x 65535 declared": gigapixel()}.items():
        with peak_growth(server) as growth:
            assert store(server.port, [ds]) == [0x0000], name
        assert growth["kib"] < MEMORY_BOUND_KIB, f"{name}: peak memory rose {growth['kib']} KiB"
        assert_still_serving(server)
        figure("hostile image listener peak memory growth", growth["kib"], "KiB", case=name)
    assert server.rows("SELECT count(*) FROM instances")[0][0] == len(PROTOCOL_CASES) + 2 * 2 + 1
    assert not server.temp_files()
    figure("protocol abuse cases", len(PROTOCOL_CASES), "cases", lost=0, crashed=0)


@pytest.mark.parametrize("name", list(UNKNOWN_PDU_CASES))
def test_an_unknown_pdu_type_is_aborted(make_server, name: str):
    server = listener(make_server)
    assert UNKNOWN_PDU_CASES[name](server.port), f"{name}: the listener neither aborted nor closed"
    assert_still_serving(server)


def test_pdata_fragments_that_never_end_are_dropped_without_holding_them_in_memory(
    make_server, figure: Figure
):
    """96 MiB of data set fragments, none of them the last; then the peer goes away."""
    server = listener(make_server)
    sent = 96 * MIB
    with peak_growth(server) as growth:
        with raw_association(server.port) as sock:
            sock.sendall(p_data(1, 0x03, store_command("1.2.826.0.1.3680043.10.999.1")))
            fragment = p_data(1, 0x00, bytes(MIB - 64))
            for _ in range(sent // MIB):
                sock.sendall(fragment)
            sock.shutdown(socket.SHUT_WR)
            assert aborted_or_closed(sock, timeout=30)
        wait_for(lambda: not server.temp_files(), 30, "the half-received data set to be deleted")
    assert growth["kib"] < MEMORY_BOUND_KIB, f"peak memory rose {growth['kib']} KiB for {sent >> 20} MiB sent"
    assert server.rows("SELECT count(*) FROM instances")[0][0] == 1, "only the warm-up instance is stored"
    assert len(server.spool_files()) == 1
    assert_still_serving(server)
    figure("never-ending P-DATA peak memory growth", growth["kib"], "KiB", sent_mib=sent >> 20)


# --- hostile images: stored, then answered by the worker ----------------------------------------------


def nested(depth: int) -> Dataset:
    """A chest CR whose Referenced Image Sequence holds sequences ``depth`` deep."""
    ds = normal_instance()
    inner = Dataset()
    inner.ReferencedSOPClassUID = CR_STORAGE
    for _ in range(depth):
        outer = Dataset()
        outer.ReferencedImageSequence = [inner]
        inner = outer
    ds.ReferencedImageSequence = [inner]
    return ds


def gigapixel() -> Dataset:
    """Rows x Columns = 65535 x 65535 (4.3 gigapixels) declared over 8 KiB of pixel data."""
    ds = normal_instance()
    ds.Rows = ds.Columns = 65535
    ds.PixelData = bytes(8192)
    return ds


def deflate_bomb(folder: Path, inflated_mib: int) -> Path:
    """A Deflated Explicit VR Little Endian file a few hundred KiB long that inflates to ``inflated_mib``."""
    buffer = io.BytesIO()
    normal_instance().save_as(buffer, enforce_file_format=True)
    data = apply(buffer.getvalue(), (("bomb", inflated_mib),))
    assert len(data) < inflated_mib * MIB // 200, "the bomb is small on the wire"
    path = folder / f"bomb-{inflated_mib}.dcm"
    path.write_bytes(data)
    return path


def _final(server: Server, n: int) -> bool:
    rows = server.rows("SELECT status FROM instances")
    return len(rows) == n and all(r[0] in ("classified", "skipped", "failed") for r in rows)


def test_hostile_images_are_stored_then_skipped_or_failed_with_a_reason(
    make_server, tiny_model_dir: Path, tmp_path: Path, figure: Figure
):
    server = make_server(
        **LISTENER,
        SCREENER__INFERENCE__POLL_SECONDS="0.2",
        SCREENER__INFERENCE__MAX_WAIT_MS="100",
        SCREENER__INFERENCE__PREPROCESS_WORKERS="1",
    )
    cli(server, "db", "upgrade")
    cli(server, "models", "register", str(tiny_model_dir), "--activate")
    server.start()
    assert_still_serving(server)
    cases: dict[str, Dataset] = {
        "sequences nested 100 deep": nested(100),
        "65535 x 65535 declared": gigapixel(),
    }
    for name, ds in cases.items():  # memory is measured on a listener alone, above
        assert store(server.port, [ds]) == [0x0000], name
        assert_still_serving(server)
    bomb = deflate_bomb(tmp_path, 128)
    assert store_file_raw(server.port, bomb) == 0x0000
    assert_still_serving(server)

    n = server.rows("SELECT count(*) FROM instances")[0][0]
    wait_for(lambda: _final(server, n), 120, "the worker to answer every instance")
    by_uid = {
        r[0]: (r[1], r[2])
        for r in server.rows("SELECT sop_instance_uid, status, status_reason FROM instances")
    }
    status, reason = by_uid[cases["65535 x 65535 declared"].SOPInstanceUID]
    assert status == "skipped" and "oversized" in reason and "65535 x 65535" in reason
    status, reason = by_uid[cases["sequences nested 100 deep"].SOPInstanceUID]
    assert status == "classified", (status, reason)  # a deep but valid header is no reason to refuse
    assert all(status != "failed" or reason for status, reason in by_uid.values()), (
        "every failure has a reason"
    )
    assert_still_serving(server)
    figure("hostile images stored and answered", len(cases) + 1, "instances", lost=0, crashed=0)


def test_a_deflate_bomb_is_not_inflated_in_the_listener(make_server, tmp_path: Path, figure: Figure):
    server = listener(make_server)
    bomb = deflate_bomb(tmp_path, 256)
    with peak_growth(server) as growth:
        status = store_file_raw(server.port, bomb)
    figure("deflate bomb (256 MiB inflated) listener peak memory growth", growth["kib"], "KiB", status=status)
    assert_still_serving(server)
    assert growth["kib"] < MEMORY_BOUND_KIB, (
        f"peak memory rose {growth['kib']} KiB for a {bomb.stat().st_size} B file"
    )


def raw_store(port: int, part10: bytes, sop_uid: str) -> int | None:
    """Send ``part10``'s data set bytes as they are (no parsing on our side); the C-STORE status."""
    dataset = part10[dataset_offset(part10) :]
    with raw_association(port) as sock:
        sock.sendall(p_data(1, 0x03, store_command(sop_uid)))
        for start in range(0, len(dataset), 16000):
            last = start + 16000 >= len(dataset)
            sock.sendall(p_data(1, 0x02 if last else 0x00, dataset[start : start + 16000]))
        sock.settimeout(30)
        reply = b""
        status_tag = b"\x00\x00\x00\x09\x02\x00\x00\x00"  # (0000,0900) US, implicit VR
        while status_tag not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            reply += chunk
        at = reply.index(status_tag) + len(status_tag)
        status = int(struct.unpack("<H", reply[at : at + 2])[0])
        sock.sendall(_pdu(0x05, bytes(4)))  # A-RELEASE-RQ
        return status


def test_sequences_nested_1000_deep_are_stored_and_marked_failed(make_server):
    server = listener(make_server)
    ds = normal_instance()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = apply(buffer.getvalue(), (("nest", 1000),))  # pydicom itself cannot write (or read) this
    assert raw_store(server.port, data, ds.SOPInstanceUID) == 0x0000
    status, reason = server.rows(
        "SELECT status, status_reason FROM instances WHERE sop_instance_uid = :uid", uid=ds.SOPInstanceUID
    )[0]
    assert status == "failed" and reason
    assert_still_serving(server)

"""Network stalls: peers that connect and go quiet are dropped at their timeout; everyone else is served.

Three ways a peer (or a port scanner, or a half-dead modality) ties up a connection: it connects and
sends nothing; it stops in the middle of a dataset; it opens a TLS port and never sends its ClientHello.
Each must be dropped when its timeout runs out (listener.acse_timeout before an association exists,
listener.network_timeout after), must free its association thread, and must not delay other peers.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from tests.hardening.conftest import Figure, proc_status
from tests.helpers import Server, rg1_pixels, small_cr, store, wait_for

ACSE_TIMEOUT = 2.0
NETWORK_TIMEOUT = 3.0
SLACK = 2.0  # the DUL polls; a loaded 2-core CI box adds scheduling delay
TIMEOUTS = {
    "SCREENER__LISTENER__ACSE_TIMEOUT": str(ACSE_TIMEOUT),
    "SCREENER__LISTENER__NETWORK_TIMEOUT": str(NETWORK_TIMEOUT),
    "SCREENER__LISTENER__DIMSE_TIMEOUT": str(NETWORK_TIMEOUT),
}


def _closed_after(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the server closes ``sock`` (reads and discards what it sends); None: still open."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < limit:
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (ConnectionResetError, ssl.SSLError):
            return time.monotonic() - started
    return None


def _others_served(server: Server, *, tls: ssl.SSLContext | None = None) -> list[float]:
    """A C-ECHO and a C-STORE from other peers while the stall lasts; returns how long each took."""
    took = []
    started = time.monotonic()
    if tls is None:
        res = subprocess.run(
            ["echoscu", "-to", "10", "-aec", "CXRSCREENER", "127.0.0.1", str(server.port)],
            capture_output=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        took.append(time.monotonic() - started)
        started = time.monotonic()
        assert store(server.port, [small_cr(rg1_pixels(128), study_uid=generate_uid())]) == [0x0000]
    else:
        ae = AE(ae_title="OTHER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ds = small_cr(rg1_pixels(128), study_uid=generate_uid())
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", server.port, ae_title="CXRSCREENER", tls_args=(tls, "127.0.0.1"))
        assert assoc.is_established
        try:
            assert int(assoc.send_c_echo().Status) == 0x0000
            took.append(time.monotonic() - started)
            started = time.monotonic()
            assert int(assoc.send_c_store(ds).Status) == 0x0000
        finally:
            assoc.release()
    took.append(time.monotonic() - started)
    return took


def _threads_back(server: Server, baseline: int) -> None:
    assert server.proc is not None
    pid = server.proc.pid
    wait_for(lambda: proc_status(pid)["Threads"] <= baseline, 15, f"server threads back to {baseline}")


def _baseline_threads(server: Server) -> int:
    """Thread count with no association open, after one association has started everything lazy."""
    assert server.proc is not None
    assert store(server.port, [small_cr(rg1_pixels(64), study_uid=generate_uid())]) == [0x0000]
    time.sleep(1)
    return proc_status(server.proc.pid)["Threads"]


def test_a_client_that_connects_and_sends_nothing_is_dropped_at_the_acse_timeout(make_server, figure: Figure):
    server = make_server(**TIMEOUTS).start()
    baseline = _baseline_threads(server)
    silent = socket.create_connection(("127.0.0.1", server.port))
    result: list[float | None] = []
    watcher = threading.Thread(target=lambda: result.append(_closed_after(silent, ACSE_TIMEOUT + 30)))
    watcher.start()
    took = _others_served(server)
    watcher.join()
    silent.close()
    dropped = result[0]
    assert dropped is not None, "the silent connection was never dropped"
    assert ACSE_TIMEOUT - 0.5 <= dropped <= ACSE_TIMEOUT + SLACK
    assert max(took) < ACSE_TIMEOUT, "other peers waited for the silent one"
    _threads_back(server, baseline)
    figure("stall.silent_dropped_after", round(dropped, 2), "s", timeout=ACSE_TIMEOUT, others_took_s=took)


def _stalled_store(server: Server, *, cut: str) -> tuple[Any, float]:
    """Associate properly, then send a C-STORE that stops partway; returns the association and when."""
    ae = AE(ae_title="STALLER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60  # we must not be the side that gives up
    ds = small_cr(rg1_pixels(512), study_uid=generate_uid())
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="CXRSCREENER", max_pdu=16384)
    assert assoc.is_established
    context = assoc.accepted_contexts[0]
    encoded = encode(ds, False, True)  # explicit VR little endian, the accepted transfer syntax
    assert encoded is not None
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(encoded)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    # P-DATA-TF PDUs (PS3.8 9.3.5) as pynetdicom would send them, 16 KiB each: command, then dataset.
    pdus = [pdu.encode() for pdu in _as_pdus(message, context.context_id, 16384)]
    assert len(pdus) > 6
    sock = assoc.dul.socket.socket
    for pdu in pdus[:4]:
        sock.sendall(pdu)
    if cut == "mid-pdu":
        sock.sendall(pdus[4][: len(pdus[4]) // 2])  # the PDU header promised more than this
    return assoc, time.monotonic()


def _as_pdus(message: C_STORE_RQ, context_id: int, max_pdu: int) -> list[Any]:
    from pynetdicom.pdu import P_DATA_TF

    out = []
    for primitive in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out.append(pdu)
    return out


def _stall_mid_dataset(make_server, figure: Figure, cut: str) -> None:
    server = make_server(**TIMEOUTS).start()
    baseline = _baseline_threads(server)
    assoc, stalled_at = _stalled_store(server, cut=cut)
    took = _others_served(server)
    wait_for(lambda: not assoc.is_established, NETWORK_TIMEOUT + SLACK + 5, "the stalled association dropped")
    dropped = time.monotonic() - stalled_at
    assoc.abort()
    assert dropped <= NETWORK_TIMEOUT + SLACK, f"dropped after {dropped:.1f}s"
    assert max(took) < NETWORK_TIMEOUT, "other peers waited for the stalled one"
    _threads_back(server, baseline)
    assert server.rows("SELECT count(*) FROM instances")[0][0] == 2  # baseline + the other peer's store
    assert not server.temp_files(), "the half-received dataset left a temporary file"
    figure(f"stall.{cut}_dropped_after", round(dropped, 2), "s", timeout=NETWORK_TIMEOUT, others_took_s=took)


def test_a_client_that_stops_between_pdus_of_a_dataset_is_dropped_at_the_network_timeout(
    make_server, figure: Figure
):
    _stall_mid_dataset(make_server, figure, "between-pdus")


def test_a_client_that_stops_in_the_middle_of_a_pdu_is_dropped_at_the_network_timeout(
    make_server, figure: Figure
):
    _stall_mid_dataset(make_server, figure, "mid-pdu")


def test_a_tls_client_that_never_sends_its_client_hello_is_dropped(
    make_server, pki: dict[str, Path], figure: Figure
):
    server = make_server(
        **TIMEOUTS,
        SCREENER__LISTENER__TLS__CERT_FILE=str(pki["server_pem"]),
        SCREENER__LISTENER__TLS__KEY_FILE=str(pki["server_key"]),
    ).start()
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca_pem"]))
    assert server.proc is not None
    _others_served(server, tls=ctx)  # warm-up, then the baseline
    time.sleep(1)
    baseline = proc_status(server.proc.pid)["Threads"]
    silent = socket.create_connection(("127.0.0.1", server.port))
    result: list[float | None] = []
    limit = max(ACSE_TIMEOUT, NETWORK_TIMEOUT)
    watcher = threading.Thread(target=lambda: result.append(_closed_after(silent, limit + 30)))
    watcher.start()
    took = _others_served(server, tls=ctx)
    watcher.join()
    silent.close()
    dropped = result[0]
    assert dropped is not None, "the TLS connection without a ClientHello was never dropped"
    assert dropped <= limit + SLACK
    assert max(took) < limit, "other TLS peers waited for the silent one"
    _threads_back(server, baseline)
    figure("stall.tls_no_hello_dropped_after", round(dropped, 2), "s", timeout=limit, others_took_s=took)

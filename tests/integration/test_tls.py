"""DICOM over TLS (PS3.15 B.1): server certificate, optional client certificates."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.helpers import rg1_pixels, small_cr


def _store_tls(port: int, ctx: ssl.SSLContext) -> int | None:
    ae = AE(ae_title="TLSSCU")
    ae.acse_timeout = ae.network_timeout = 10
    ds = small_cr(rg1_pixels(64), study_uid=generate_uid())
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRSCREENER", tls_args=(ctx, "127.0.0.1"))
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_store(ds)
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()


def _client_ctx(pki: dict[str, Path], with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca_pem"]))
    if with_cert:
        ctx.load_cert_chain(str(pki["client_pem"]), str(pki["client_key"]))
    return ctx


def test_tls_store_with_required_client_certificate(make_server, pki):
    server = make_server(
        SCREENER__LISTENER__TLS__CERT_FILE=str(pki["server_pem"]),
        SCREENER__LISTENER__TLS__KEY_FILE=str(pki["server_key"]),
        SCREENER__LISTENER__TLS__CA_FILE=str(pki["ca_pem"]),
        SCREENER__LISTENER__TLS__REQUIRE_CLIENT_CERT="true",
    ).start()
    assert _store_tls(server.port, _client_ctx(pki, with_cert=True)) == 0x0000
    assert _store_tls(server.port, _client_ctx(pki, with_cert=False)) is None
    assert server.rows("SELECT count(*) FROM instances")[0][0] == 1
    plain = subprocess.run(
        ["echoscu", "-to", "5", "-aec", "CXRSCREENER", "127.0.0.1", str(server.port)],
        capture_output=True,
        timeout=60,
    )
    assert plain.returncode != 0, "a plain-TCP association must not be accepted on a TLS port"
    assert _store_tls(server.port, _client_ctx(pki, with_cert=True)) == 0x0000


@pytest.mark.slow
def test_results_are_sent_to_a_tls_pacs_that_demands_our_client_certificate(make_server, pki, tiny_model_dir):
    """[[pacs.destinations]] with tls_*: the SR goes out over TLS and the PACS verifies our certificate."""
    from tests.helpers import FakePacs, cli, store, wait_for

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca_pem"]))
    ctx.load_cert_chain(str(pki["server_pem"]), str(pki["server_key"]))
    ctx.verify_mode = ssl.CERT_REQUIRED
    pacs = FakePacs().start(ssl_context=ctx)
    destination = (
        f'[{{ae_title="FAKEPACS", host="127.0.0.1", port={pacs.port}, tls_ca_file="{pki["ca_pem"]}", '
        f'tls_cert_file="{pki["client_pem"]}", tls_key_file="{pki["client_key"]}"}}]'
    )
    server = make_server(
        SCREENER__PACS__DESTINATIONS=destination,
        SCREENER__PACS__SWEEP_SECONDS="0.2",
        SCREENER__INFERENCE__STUDY_SETTLE_SECONDS="1",
        SCREENER__INFERENCE__POLL_SECONDS="0.1",
        SCREENER__INFERENCE__PREPROCESS_WORKERS="1",
    )
    try:
        cli(server, "db", "upgrade")
        cli(server, "models", "register", str(tiny_model_dir), "--activate")
        server.start()
        assert store(server.port, [small_cr(rg1_pixels(128), study_uid=generate_uid())]) == [0x0000]
        wait_for(lambda: any(s == 0 for _, s in pacs.received), 120, "the SR over TLS")
        # The PACS has answered; the sender records the delivery once it reads that answer.
        wait_for(lambda: server.rows("SELECT status FROM deliveries") != [("pending",)], 30, "the outcome")
        sent = server.rows("SELECT status, attempts FROM deliveries")
        assert sent == [("sent", 1)]
    finally:
        pacs.stop()

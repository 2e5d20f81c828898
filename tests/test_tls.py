"""DICOM over TLS (PS3.15 B.1): server certificate, optional client certificates."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.helpers import rg1_pixels, small_cr


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=Test CA",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(d / f"{name}.key"),
            "-out",
            str(d / f"{name}.csr"),
        )
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{name}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(d / f"{name}.ext"),
            "-out",
            str(d / f"{name}.pem"),
        )
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


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

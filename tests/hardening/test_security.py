"""Security of the network edge and the database: DICOM TLS (PS3.15 B.9-B.11), association rules, SQL.

- TLS: DCMTK `storescu +tls` with a client certificate our CA signed stores; a certificate from elsewhere
  and plain TCP are refused; sslyze sees only TLS 1.2 / 1.3 with forward-secret AEAD suites.
- A-ASSOCIATE-RJ (PS3.8 9.3.4): an unknown calling AE title, a known one from a host not on its list, and a
  wrong called AE title are each rejected permanently with the reason PS3.8 Table 9-21 defines.
- SQL metacharacters in every string of an instance we store, on SQLite and PostgreSQL: kept verbatim,
  no statement changed (the tables and their counts stay right).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from sqlalchemy import create_engine, inspect
from sqlalchemy.orm import Session

from screener.core.db.migrate import upgrade
from screener.model.registry import register
from tests.helpers import SCREENER, cli, rg1_pixels, self_signed_certificate, small_cr, store, wait_for

TRAINER = SCREENER.with_name("trainer")
VERIFICATION = "1.2.840.10008.1.1"


# --- TLS --------------------------------------------------------------------------------------------------


def _tls_server(make_server: Any, pki: dict[str, Path]) -> Any:
    return make_server(
        SCREENER__LISTENER__TLS__CERT_FILE=str(pki["server_pem"]),
        SCREENER__LISTENER__TLS__KEY_FILE=str(pki["server_key"]),
        SCREENER__LISTENER__TLS__CA_FILE=str(pki["ca_pem"]),
        SCREENER__LISTENER__TLS__REQUIRE_CLIENT_CERT="true",
    ).start()


def _storescu(port: int, path: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "storescu",
            "-to",
            "10",
            "-ta",
            "10",
            "-td",
            "10",
            *tls,
            "-aec",
            "CXRSCREENER",
            "127.0.0.1",
            str(port),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dcmtk_storescu_over_tls_needs_a_client_certificate_from_our_ca(make_server, pki, tmp_path, figure):
    server = _tls_server(make_server, pki)
    rogue_key, rogue_pem = tmp_path / "rogue.key", tmp_path / "rogue.pem"
    self_signed_certificate(rogue_key, rogue_pem, "/CN=client")
    trusted = ["+tls", str(pki["client_key"]), str(pki["client_pem"]), "+cf", str(pki["ca_pem"])]
    outcomes: dict[str, bool] = {}
    # DCMTK's three BCP 195 profiles (non-downgrading is its default) must all interoperate.
    for profile in ("+py", "+px", "+pz"):
        path = tmp_path / f"ok{profile[1:]}.dcm"
        small_cr(rg1_pixels(64), study_uid=generate_uid()).save_as(path, enforce_file_format=True)
        res = _storescu(server.port, path, *trusted, profile)
        outcomes[f"trusted {profile}"] = res.returncode == 0
        assert res.returncode == 0, f"{profile}: {res.stdout}{res.stderr}"
    refused = tmp_path / "refused.dcm"
    small_cr(rg1_pixels(64), study_uid=generate_uid()).save_as(refused, enforce_file_format=True)
    rogue = _storescu(server.port, refused, "+tls", str(rogue_key), str(rogue_pem), "+cf", str(pki["ca_pem"]))
    outcomes["untrusted client certificate"] = rogue.returncode == 0
    anonymous = _storescu(server.port, refused, "+tla", "+cf", str(pki["ca_pem"]))
    outcomes["no client certificate"] = anonymous.returncode == 0
    plain = _storescu(server.port, refused)
    outcomes["plain TCP"] = plain.returncode == 0
    assert outcomes == {
        "trusted +py": True,
        "trusted +px": True,
        "trusted +pz": True,
        "untrusted client certificate": False,
        "no client certificate": False,
        "plain TCP": False,
    }
    assert server.rows("SELECT count(*) FROM instances")[0][0] == 3, "only the trusted sends were stored"
    assert server.proc.poll() is None
    figure(
        "tls_attempts",
        len(outcomes),
        "associations",
        **{k: ("stored" if v else "refused") for k, v in outcomes.items()},
    )


def test_tls_offers_only_tls12_and_13_with_forward_secret_aead_suites(make_server, pki, figure):
    from sslyze import (
        ClientAuthenticationCredentials,
        ScanCommand,
        Scanner,
        ServerNetworkConfiguration,
        ServerNetworkLocation,
        ServerScanRequest,
    )

    server = _tls_server(make_server, pki)
    commands = {
        ScanCommand.SSL_2_0_CIPHER_SUITES,
        ScanCommand.SSL_3_0_CIPHER_SUITES,
        ScanCommand.TLS_1_0_CIPHER_SUITES,
        ScanCommand.TLS_1_1_CIPHER_SUITES,
        ScanCommand.TLS_1_2_CIPHER_SUITES,
        ScanCommand.TLS_1_3_CIPHER_SUITES,
        ScanCommand.ELLIPTIC_CURVES,
        ScanCommand.TLS_COMPRESSION,
        ScanCommand.SESSION_RENEGOTIATION,
        ScanCommand.HEARTBLEED,
        ScanCommand.OPENSSL_CCS_INJECTION,
    }
    request = ServerScanRequest(
        server_location=ServerNetworkLocation("127.0.0.1", server.port),
        network_configuration=ServerNetworkConfiguration(
            tls_server_name_indication="127.0.0.1",
            tls_client_auth_credentials=ClientAuthenticationCredentials(
                certificate_chain_path=pki["client_pem"], key_path=pki["client_key"]
            ),
        ),
        scan_commands=commands,
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    assert result.connectivity_error_trace is None, result.connectivity_error_trace
    scan = result.scan_result
    assert scan is not None
    for command in commands:
        attempt = getattr(scan, command.value)
        assert attempt.error_trace is None, f"{command.value}: {attempt.error_trace}"
    accepted = {
        version: [s.cipher_suite.name for s in getattr(scan, attr).result.accepted_cipher_suites]
        for version, attr in (
            ("SSL 2.0", "ssl_2_0_cipher_suites"),
            ("SSL 3.0", "ssl_3_0_cipher_suites"),
            ("TLS 1.0", "tls_1_0_cipher_suites"),
            ("TLS 1.1", "tls_1_1_cipher_suites"),
            ("TLS 1.2", "tls_1_2_cipher_suites"),
            ("TLS 1.3", "tls_1_3_cipher_suites"),
        )
    }
    tried = sum(
        len(getattr(scan, attr).result.accepted_cipher_suites)
        + len(getattr(scan, attr).result.rejected_cipher_suites)
        for attr in (
            "ssl_2_0_cipher_suites",
            "ssl_3_0_cipher_suites",
            "tls_1_0_cipher_suites",
            "tls_1_1_cipher_suites",
            "tls_1_2_cipher_suites",
            "tls_1_3_cipher_suites",
        )
    )
    for old in ("SSL 2.0", "SSL 3.0", "TLS 1.0", "TLS 1.1"):
        assert accepted[old] == [], f"{old} must be refused, accepted {accepted[old]}"
    assert accepted["TLS 1.2"] and accepted["TLS 1.3"]
    weak_markers = (
        "RC4",
        "3DES",
        "DES_",
        "NULL",
        "EXPORT",
        "anon",
        "_CBC_",
        "MD5",
        "IDEA",
        "SEED",
        "CAMELLIA",
    )
    for name in accepted["TLS 1.2"]:
        assert name.startswith("TLS_ECDHE_"), f"{name}: no forward secrecy"
        assert name.endswith(("_GCM_SHA256", "_GCM_SHA384", "_CHACHA20_POLY1305_SHA256")), f"{name}: not AEAD"
        assert not any(m in name for m in weak_markers), name
    curves = scan.elliptic_curves.result
    assert curves is not None and curves.supported_curves
    strong_curves = {"X25519", "X448", "prime256v1", "secp256r1", "secp384r1", "secp521r1"}
    assert {c.name for c in curves.supported_curves} <= strong_curves, curves.supported_curves
    assert not scan.tls_compression.result.supports_compression
    renegotiation = scan.session_renegotiation.result
    assert not renegotiation.is_vulnerable_to_client_renegotiation_dos
    assert renegotiation.supports_secure_renegotiation
    assert not scan.heartbleed.result.is_vulnerable_to_heartbleed
    assert not scan.openssl_ccs_injection.result.is_vulnerable_to_ccs_injection
    assert server.proc.poll() is None, "the listener survived the scan's aborted handshakes"
    figure(
        "tls_cipher_suites_tried",
        tried,
        "suites",
        accepted_tls12=accepted["TLS 1.2"],
        accepted_tls13=accepted["TLS 1.3"],
        refused_versions=["SSL 2.0", "SSL 3.0", "TLS 1.0", "TLS 1.1"],
    )


# --- association rules ------------------------------------------------------------------------------------


def _associate(port: int, calling: str, called: str = "CXRSCREENER", source: str = "127.0.0.1") -> Any:
    """(result, source, diagnostic) of an A-ASSOCIATE-RJ, or "accepted"."""
    seen: list[Any] = []

    def on_acse(event: Any) -> None:
        seen.append(event.primitive)

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=called,
        bind_address=(source, 0),
        evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)],
    )
    if assoc.is_established:
        assoc.release()
        return "accepted"
    assert assoc.is_rejected, f"{calling}->{called} from {source}: neither accepted nor rejected"
    rj = [p for p in seen if getattr(p, "result", None) in (0x01, 0x02)][-1]
    return (int(rj.result), int(rj.result_source), int(rj.diagnostic))


CALLING_NOT_RECOGNISED = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE not recognised
CALLED_NOT_RECOGNISED = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called AE not recognised


def test_associations_are_rejected_with_the_right_reason(make_server, figure):
    server = make_server(
        SCREENER__LISTENER__ALLOWED_CALLING_AETS='["PACS1", "PACS2@127.0.0.1", "MODALITY@127.0.0.2"]'
    ).start()
    cases = {
        ("PACS1", "CXRSCREENER", "127.0.0.1"): "accepted",
        ("PACS1", "CXRSCREENER", "127.0.0.2"): "accepted",  # no host given: any host
        ("PACS2", "CXRSCREENER", "127.0.0.1"): "accepted",
        ("PACS2", "CXRSCREENER", "127.0.0.2"): CALLING_NOT_RECOGNISED,  # known AE, host not on its list
        ("MODALITY", "CXRSCREENER", "127.0.0.2"): "accepted",
        ("MODALITY", "CXRSCREENER", "127.0.0.1"): CALLING_NOT_RECOGNISED,
        ("INTRUDER", "CXRSCREENER", "127.0.0.1"): CALLING_NOT_RECOGNISED,  # unknown calling AE
        ("pacs1", "CXRSCREENER", "127.0.0.1"): CALLING_NOT_RECOGNISED,  # AE titles are case-sensitive
        ("PACS1", "SOMEONEELSE", "127.0.0.1"): CALLED_NOT_RECOGNISED,  # wrong called AE
    }
    got = {case: _associate(server.port, *case) for case in cases}
    assert got == cases
    # Rejections never stored anything and are each logged with the peer's address.
    rejected = [e for e in server.log_events() if e["event"] == "association.rejected"]
    assert {(e["calling_ae"], e["peer"]) for e in rejected} == {
        ("PACS2", "127.0.0.2"),
        ("MODALITY", "127.0.0.1"),
        ("INTRUDER", "127.0.0.1"),
        ("pacs1", "127.0.0.1"),
    }
    n_rejected = sum(1 for v in got.values() if v != "accepted")
    figure("association_rules", len(cases), "attempts", rejected=n_rejected, accepted=len(cases) - n_rejected)


def test_connections_closed_before_associating_do_not_lock_out_peers(make_server, figure):
    """Port scanners, TLS scanners and TCP health checks connect and close without a word, or after a
    first message that is no A-ASSOCIATE-RQ (the listener answers that with A-ABORT, PS3.8 9.2 AA-1)."""
    server = make_server(SCREENER__LISTENER__MAX_ASSOCIATIONS="4").start()
    for i in range(8):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            if i % 2:
                sock.sendall(b"\x16\x03\x01\x00\x05hello")  # a TLS ClientHello record header: unknown PDU
    time.sleep(1.0)
    result = _associate(server.port, "PROBE")
    figure("association_after_8_silent_connections", str(result), "", max_associations=4)
    assert result == "accepted", f"rejected {result} after silent connections (local limit exceeded)"


# --- SQL metacharacters -----------------------------------------------------------------------------------

HOSTILE_AE = "O'B\";DROP--"  # AE titles: 16 characters, no backslash or control characters (PS3.5 6.2)
HOSTILE = "O'Brien\"; DROP TABLE instances; -- \\ 100% _x_ ü ß 胸部 ✓"
HOSTILE_CS = "X'\"; DROP TABLE INSTANCES; --%_"  # code strings: default repertoire, upper case
HOSTILE_UID_SUFFIX = "'; DROP TABLE studies; --"
HOSTILE_KEYWORDS = (
    "StudyDescription",
    "SeriesDescription",
    "InstitutionName",
    "Manufacturer",
    "ReferringPhysicianName",
    "StationName",
    "ProtocolName",
    "StudyID",
    "OperatorsName",
)
# Also hostile: patient name, ID, accession number, the three UIDs, the calling AE title, and one of body
# part, view position or modality per skipped instance.
HOSTILE_ATTRIBUTES = len(HOSTILE_KEYWORDS) + 7


def _hostile_instances() -> dict[str, Any]:
    pixels = rg1_pixels(96)
    study = f"1.2.826.0.1.3680043.8.498.1{HOSTILE_UID_SUFFIX}"
    out = {}
    for key in ("eligible", "body_part", "view", "modality"):
        ds = small_cr(
            pixels,
            study_uid=study,
            sop_uid=f"{generate_uid()[:30]}{HOSTILE_UID_SUFFIX}",
            patient_name=HOSTILE,
            patient_id="X'; DROP TABLE labels; --",
            accession="A'; DELETE FROM predictions; --",
        )
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SeriesInstanceUID = f"1.2.3{HOSTILE_UID_SUFFIX}"
        for keyword in HOSTILE_KEYWORDS:
            setattr(ds, keyword, HOSTILE)
        if key == "body_part":
            ds.BodyPartExamined = HOSTILE_CS
        elif key == "view":
            ds.ViewPosition = HOSTILE_CS
        elif key == "modality":
            ds.Modality = HOSTILE_CS
        out[key] = ds
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning", "ignore:The value length:UserWarning")
@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_sql_metacharacters_are_stored_verbatim_and_change_no_query(
    make_server, tiny_model_dir, tmp_path, request, db, figure
):
    overrides = {
        "SCREENER__LISTENER__ALLOWED_CALLING_AETS": json.dumps(["TESTSCU", HOSTILE_AE]),
        "SCREENER__INFERENCE__POLL_SECONDS": "0.1",
        "SCREENER__INFERENCE__PREPROCESS_WORKERS": "1",
        "SCREENER__INFERENCE__STUDY_SETTLE_SECONDS": "0.5",
        "SCREENER__PACS__INSTITUTION_NAME": HOSTILE,
    }
    if db == "postgresql":
        overrides["SCREENER__DATABASE__URL"] = request.getfixturevalue("pg_url")
    server = make_server(**overrides)
    server.overrides.setdefault("SCREENER__DATABASE__URL", f"sqlite:///{server.workdir / 'screener.db'}")
    engine = create_engine(server.db_url)
    try:
        upgrade(engine)
        with Session(engine) as session, session.begin():
            register(session, tiny_model_dir, activate=True)
        tables_before = sorted(inspect(engine).get_table_names())
        views_before = sorted(inspect(engine).get_view_names())
    finally:
        engine.dispose()
    server.start()
    instances = _hostile_instances()
    assert store(server.port, list(instances.values()), calling=HOSTILE_AE) == [0x0000] * len(instances)
    done = "SELECT count(*) FROM instances WHERE status IN ('classified', 'skipped')"
    wait_for(lambda: server.rows(done)[0][0] == len(instances), 120, "every instance classified or skipped")
    wait_for(lambda: server.rows("SELECT count(*) FROM study_results")[0][0] == 1, 60, "the study verdict")

    rows = {
        sop: (calling, status, reason, series)
        for sop, calling, status, reason, series in server.rows(
            "SELECT sop_instance_uid, calling_ae_title, status, status_reason, series_instance_uid "
            "FROM instances"
        )
    }
    assert set(rows) == {str(ds.SOPInstanceUID) for ds in instances.values()}, "UIDs stored verbatim"
    assert {calling for calling, *_ in rows.values()} == {HOSTILE_AE}
    assert {series for *_, series in rows.values()} == {f"1.2.3{HOSTILE_UID_SUFFIX}"}
    by_key = {key: rows[str(ds.SOPInstanceUID)] for key, ds in instances.items()}
    assert by_key["eligible"][1] == "classified"
    for key in ("body_part", "view", "modality"):
        status, reason = by_key[key][1], by_key[key][2]
        # A value that breaks its VR (CS: upper case, digits, space, underscore) is not echoed, only counted.
        shown = (HOSTILE_CS, f"<malformed value of {len(HOSTILE_CS)} characters>")
        assert status == "skipped" and any(v in reason for v in shown), (key, reason)
    assert server.rows("SELECT study_instance_uid FROM studies") == [
        (str(instances["eligible"].StudyInstanceUID),)
    ]
    assert server.rows("SELECT count(*) FROM predictions")[0][0] == 1

    # Confirmed labels keyed by a hostile accession number and radiologist name.
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "accession_number,label,confirmed_by\n"
        '"A\'; DELETE FROM predictions; --",covid19,"O\'Brien""; DROP TABLE labels; --"\n',
        encoding="utf-8",
    )
    res = subprocess.run(
        [str(TRAINER), "labels", "import", str(labels)],
        cwd=server.workdir,
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert server.rows("SELECT accession_number, confirmed_by FROM labels") == [
        ("A'; DELETE FROM predictions; --", "O'Brien\"; DROP TABLE labels; --")
    ]
    # Reports read the same rows through the views without a changed query.
    for name in ("daily", "positives"):
        report = cli(server, "report", name, "--format", "json")
        json.loads(report.stdout)
    assert server.stop() == 0
    engine = create_engine(server.db_url)
    try:
        assert sorted(inspect(engine).get_table_names()) == tables_before
        assert sorted(inspect(engine).get_view_names()) == views_before
    finally:
        engine.dispose()
    assert server.rows("SELECT count(*) FROM instances")[0][0] == len(instances)
    assert server.rows("SELECT count(*) FROM predictions")[0][0] == 1
    assert server.rows("SELECT count(*) FROM labels")[0][0] == 1
    figure(
        "sql_metacharacter_values",
        len(instances),
        "instances",
        database=db,
        hostile_attributes_per_instance=HOSTILE_ATTRIBUTES,
        tables_intact=True,
    )


# --- dependency audit gate --------------------------------------------------------------------------------


def _audit_gate(tmp_path: Path, report: str | None, stderr: str = "") -> subprocess.CompletedProcess[str]:
    """Run the pip-audit verdict step of tests/run on a canned pip-audit JSON report."""
    script = (Path(__file__).resolve().parents[1] / "run").read_text()
    gate = script.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    path = tmp_path / "audit.json"
    path.unlink(missing_ok=True)
    if report is not None:
        path.write_text(report)
    (tmp_path / "audit.json.err").write_text(stderr)
    return subprocess.run(
        [sys.executable, "-c", gate, str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def test_dependency_audit_fails_on_findings_and_says_when_it_could_not_audit(tmp_path):
    vulnerable = {
        "dependencies": [
            {
                "name": "jinja2",
                "version": "2.10",
                "vulns": [{"id": "PYSEC-2019-217", "fix_versions": ["2.10.1"]}],
            },
            {"name": "numpy", "version": "2.1.0", "vulns": []},
        ]
    }
    found = _audit_gate(tmp_path, json.dumps(vulnerable))
    assert found.returncode == 1 and "jinja2 2.10: PYSEC-2019-217 (fixed in 2.10.1)" in found.stdout
    clean = _audit_gate(
        tmp_path, json.dumps({"dependencies": [{"name": "numpy", "version": "2.1.0", "vulns": []}]})
    )
    assert clean.returncode == 0 and "audited 1 dependencies: 0 known vulnerabilities" in clean.stdout
    offline = {
        "dependencies": [{"name": "numpy", "version": "2.1.0", "skip_reason": "Dependency not found on PyPI"}]
    }
    unreachable = _audit_gate(tmp_path, json.dumps(offline))
    assert unreachable.returncode == 0 and "dependencies NOT audited" in unreachable.stderr
    crashed = _audit_gate(tmp_path, None, stderr="ConnectionError: Failed to resolve 'api.osv.dev'\n")
    assert crashed.returncode == 0 and "could not run (ConnectionError" in crashed.stderr
    assert "NOT audited" in crashed.stderr

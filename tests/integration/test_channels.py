"""HL7 v2 ORU^R01 over MLLP, webhooks and email end to end through `screener serve`, against real receivers:
hl7apy's MLLP server, an HTTP server checking the signature, aiosmtpd. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.uid import generate_uid

from screener.model.modelcard import CARD_FILE
from tests.channel_peers import Hl7Receiver, SmtpReceiver, WebhookReceiver
from tests.helpers import Server, cli, free_port, rg1_pixels, small_cr, store, wait_for

SECRET = "integration-test-webhook-secret"
PATIENT = "CANARY^CHANNELPATIENT"
PATIENT_ID = "CANARYPID77"
ACCESSION = "CANARYACC77"
FAST = {
    "SCREENER__INFERENCE__STUDY_SETTLE_SECONDS": "1",
    "SCREENER__INFERENCE__MAX_WAIT_MS": "50",
    "SCREENER__INFERENCE__POLL_SECONDS": "0.2",
    "SCREENER__INFERENCE__PREPROCESS_WORKERS": "1",
    "SCREENER__PACS__BACKOFF_INITIAL_SECONDS": "0.3",
    "SCREENER__PACS__BACKOFF_MAX_SECONDS": "1",
    "SCREENER__PACS__SWEEP_SECONDS": "0.2",
    "SCREENER__PACS__MAX_ATTEMPTS": "100",
    "SCREENER__HL7__TIMEOUT_SECONDS": "5",
    "SCREENER__ALERTS__CHECK_SECONDS": "1",
    "SCREENER__ALERTS__DISK_LOW_BYTES": "0",
}


@pytest.fixture(scope="module")
def finding_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with COVID-19's operating point at 0: every analysed study flags a finding."""
    out = tmp_path_factory.mktemp("models") / "tiny-finding"
    shutil.copytree(tiny_model_dir, out)
    card = json.loads((out / CARD_FILE).read_text())
    card["version"] = "test-tiny-finding"
    card["thresholds"] = {"covid19": 0.0}
    (out / CARD_FILE).write_text(json.dumps(card))
    return out


def _server(make_server, request: pytest.FixtureRequest, model: Path, toml: str, **extra: str) -> Server:
    overrides = dict(FAST, **extra)
    if request.node.callspec.params.get("backend") == "postgresql":
        overrides["SCREENER__DATABASE__URL"] = request.getfixturevalue("pg_url")
    server: Server = make_server(**overrides)
    (server.workdir / "channels.toml").write_text(toml)
    server.overrides["SCREENER_CONFIG"] = str(server.workdir / "channels.toml")
    cli(server, "models", "register", str(model), "--activate")  # migrates the new database first
    return server


def _send_study(server: Server) -> str:
    study = generate_uid()
    ds = small_cr(
        rg1_pixels(), study_uid=study, patient_name=PATIENT, patient_id=PATIENT_ID, accession=ACCESSION
    )
    ds.PatientSex = "F"
    ds.StudyDate = "20261201"
    ds.StudyTime = "093000"
    assert store(server.port, [ds]) == [0x0000]
    return study


def _deliveries(server: Server, *args: str) -> list[dict]:
    return json.loads(cli(server, "deliveries", "list", "--json", *args).stdout)


def _hl7_rows(server: Server) -> list[tuple]:
    """(status, attempts, last_error) of the HL7 deliveries, read straight from the database (fast polls)."""
    sql = "SELECT status, attempts, last_error FROM deliveries WHERE channel = 'hl7' ORDER BY id"
    return [tuple(r) for r in server.rows(sql)]


def _no_phi(text: str, study: str) -> None:
    for secret in ("CANARY", PATIENT_ID, ACCESSION, study):
        assert secret not in text


# Each test runs on one database, to keep CI short: together they cover both; the alert rules and the outbox
# rows are tested on both in tests/unit/test_channels.py.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_verdict_reaches_ris_webhook_and_email(
    make_server, request, finding_model: Path, backend: str
) -> None:
    hl7_port, smtp_port = free_port(), free_port()
    ris = Hl7Receiver(hl7_port).start()
    hooks = WebhookReceiver(SECRET).start()
    smtp = SmtpReceiver(smtp_port).start()
    toml = f"""
[hl7]
priority_on_finding = "S"
[[hl7.destinations]]
name = "ris"
host = "127.0.0.1"
port = {hl7_port}
sending_facility = "RADIOLOGY"
receiving_application = "RIS"
receiving_facility = "HOSPITAL"

[[webhooks]]
url = "{hooks.url}"
secret = "{SECRET}"
events = ["finding", "model_changed"]

[email]
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
from = "screener@example.org"
to = ["reading-room@example.org"]
events = ["finding"]

[alerts]
link_template = "https://viewer.example.org/study?h={{study_hash}}"
"""
    server = _server(make_server, request, finding_model, toml).start()
    try:
        study = _send_study(server)
        wait_for(lambda: len(ris.accepted()) == 1 or ris.errors, 120, "the ORU^R01 at the RIS")
        assert not ris.errors
        wait_for(
            lambda: any(h.document["event"] == "finding" for h in hooks.hooks), 60, "the finding webhook"
        )
        wait_for(lambda: len(smtp.messages) == 1, 60, "the alert email")
        unsent = "SELECT count(*) FROM deliveries WHERE status <> 'sent'"
        wait_for(lambda: server.rows(unsent)[0][0] == 0, 60, "every delivery sent")
    finally:
        ris.stop()
        hooks.stop()
        smtp.stop()
        server.stop()

    received = ris.accepted()[0]
    msg = parse_message(received.text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert received.valid and msg.validate()
    assert msg.msh.msh_5.value == "RIS" and msg.msh.msh_4.value == "RADIOLOGY"
    patient = msg.oru_r01_patient_result.oru_r01_patient.pid
    assert patient.pid_3.cx_1.value == PATIENT_ID and patient.pid_5.xpn_1.value == "CANARY"
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_3.ei_1.value == ACCESSION == order.orc.orc_3.ei_1.value
    assert order.obr.obr_5.value == "S" and order.obr.obr_25.value == "P"
    assert order.obr.obr_7.value == "20261201093000"
    obx = {o.obx.obx_3.ce_1.value: o.obx for o in order.oru_r01_observation}
    assert obx["110180"].obx_5.value == study
    assert (
        obx["CXRS-VERDICT"].obx_5.value == "840539006^COVID-19^SCT" and obx["CXRS-VERDICT"].obx_8.value == "A"
    )
    probabilities = [float(o.obx_5.value) for code, o in obx.items() if code.startswith("CXRS-P-")]
    assert len(probabilities) == 3 and abs(sum(probabilities) - 1.0) < 2e-3
    assert obx["111003"].obx_5.value == "test-tiny-finding"

    by_event = {h.document["event"]: h for h in hooks.hooks}
    assert set(by_event) == {"finding", "model_changed"}
    assert all(h.signature_ok for h in hooks.hooks)
    finding = by_event["finding"]
    assert finding.document["study"]["verdict"] == "covid19"
    assert finding.document["study"]["model_version"] == "test-tiny-finding"
    assert finding.document["link"].endswith(finding.document["study"]["study_hash"])
    assert finding.headers["X-Screener-Event"] == "finding"
    assert by_event["model_changed"].document["details"]["active_version"] == "test-tiny-finding"
    _no_phi(finding.body.decode(), study)
    mail = smtp.messages[0]
    assert "finding" in mail["Subject"] and finding.document["study"]["study_hash"] in mail.get_payload()
    _no_phi(mail.as_string(), study)
    _no_phi(server.log_text(), study)
    rows = _deliveries(server, "--channel", "hl7")
    assert [(r["channel"], r["object"], r["status"], r["attempts"]) for r in rows] == [
        ("hl7", "oru", "sent", 1)
    ]


@pytest.mark.parametrize("backend", ["postgresql"])
def test_hl7_outage_kill9_reject_and_redrive_deliver_exactly_one(
    make_server, request, finding_model: Path, backend: str
) -> None:
    hl7_port = free_port()
    ris = Hl7Receiver(hl7_port, answer="AR")  # down until started
    hooks = WebhookReceiver(SECRET).start()
    toml = f"""
[[hl7.destinations]]
name = "ris"
host = "127.0.0.1"
port = {hl7_port}

[[webhooks]]
url = "{hooks.url}"
secret = "{SECRET}"
events = ["delivery_dead"]
"""
    server = _server(make_server, request, finding_model, toml).start()
    try:
        study = _send_study(server)

        def retried() -> bool:
            rows = _hl7_rows(server)
            return len(rows) == 1 and rows[0][0] == "failed" and rows[0][1] >= 2

        wait_for(retried, 120, "the ORU^R01 to be retried while the RIS is down")
        assert "cannot connect" in _hl7_rows(server)[0][2]
        server.kill9()
        server.start()
        ris.start()  # up, but rejecting: AR is dead at once
        wait_for(lambda: _hl7_rows(server)[0][0] == "dead", 60, "the AR to dead-letter")
        dead = _deliveries(server, "--channel", "hl7", "--status", "dead")
        assert len(dead) == 1 and "answered AR" in dead[0]["last_error"]
        wait_for(lambda: len(hooks.hooks) == 1, 60, "the delivery_dead webhook")
        ris.answer = "AA"
        assert "re-driven: 1" in cli(server, "deliveries", "retry", "--dead", "--channel", "hl7").stdout
        wait_for(lambda: _hl7_rows(server)[0][0] == "sent", 60, "the re-driven ORU")
    finally:
        ris.stop()
        hooks.stop()
        server.stop()
    assert len(ris.accepted()) == 1
    assert len({r.control_id for r in ris.received}) == 1, "every try carries the same MSH-10"
    assert [r.answered for r in ris.received] == ["AR", "AA"]
    rows = server.rows("SELECT channel, count(*) FROM deliveries GROUP BY channel ORDER BY channel")
    assert [tuple(r) for r in rows] == [("hl7", 1), ("webhook", 1)]
    hook = hooks.hooks[0]
    assert hook.signature_ok and hook.document["event"] == "delivery_dead"
    assert hook.document["details"]["channel"] == "hl7" and "AR" in hook.document["details"]["error"]
    _no_phi(hook.body.decode(), study)

"""HL7 ORU^R01 building, MLLP, signed webhooks, SMTP alerts and the alert outbox rules, against real peers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom import Dataset
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session

from screener.core.config import (
    AlertsConfig,
    EmailConfig,
    Hl7Config,
    Hl7Destination,
    WebhookConfig,
    load_config,
)
from screener.core.db.models import AuditEvent, Base, Delivery
from screener.core.errors import ConfigError
from screener.results import hl7, mail, mllp, webhook
from screener.results.alerts import Alert, AlertRoutes, StudyFacts, email_text, raise_alert
from tests.channel_peers import Hl7Receiver, SmtpReceiver, WebhookReceiver
from tests.helpers import free_port

SECRET = "a-shared-secret-of-some-length"
MADE_AT = datetime(2026, 12, 2, 8, 30, tzinfo=UTC)


def _header() -> Dataset:
    ds = Dataset()
    ds.PatientName = "O|Brien^Zoë^Ann^Dr^Jr"
    ds.PatientID = "MRN^42"
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = "19700102"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC&7|1"
    ds.StudyDate = "20261201"
    ds.StudyTime = "101112.25"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    return ds


def _facts(flags: bool = True, verdict: str = "covid19") -> hl7.OruFacts:
    return hl7.OruFacts(
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        model_version="v7",
        revision=2,
        verdict=verdict,
        verdict_code=hl7.Coded("840539006", "SCT", "COVID-19")
        if flags
        else hl7.Coded("17621005", "SCT", "Normal"),
        flags_finding=flags,
        algorithm_name="CXR Screener fused ResNet",
        made_at=MADE_AT,
        probabilities=[
            hl7.ClassProbability(
                "covid19", hl7.Coded("CXRS-P-COVID19", "99CXRS", "Probability of COVID-19"), 0.91
            ),
            hl7.ClassProbability(
                "normal", hl7.Coded("CXRS-P-NORMAL", "99CXRS", "Probability of Normal"), 0.09
            ),
        ],
        reasons=[
            "image 2: skipped: view position LL",
            "image 3: failed: cannot decode\r\nline two\nthree",
            "image 4: failed: " + "a|b " * 100,
        ],
        **hl7.patient_facts(_header()),
    )


DEST = Hl7Destination(
    name="ris",
    host="127.0.0.1",
    port=2575,
    sending_facility="RAD",
    receiving_application="RIS",
    receiving_facility="H",
)


def _parsed(text: str):  # type: ignore[no-untyped-def]
    msg = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert msg.validate()
    return msg


def test_oru_is_valid_251_with_accession_priority_codes_and_escaped_header_values() -> None:
    text = hl7.build_oru(_facts(), DEST, Hl7Config())
    msg = _parsed(text)
    assert msg.msh.msh_9.value == "ORU^R01^ORU_R01" and msg.msh.msh_12.value == "2.5.1"
    result = msg.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    # Delimiters in DICOM values are escaped, never new fields or components.
    assert pid.pid_5.xpn_1.value == "O\\F\\Brien" and pid.pid_5.xpn_2.value == "Zoë"
    assert pid.pid_5.xpn_4.value == "Jr" and pid.pid_5.xpn_5.value == "Dr"
    assert pid.pid_3.cx_1.value == "MRN\\S\\42" and pid.pid_3.cx_4.value == "HOSP"
    assert pid.pid_7.value == "19700102" and pid.pid_8.value == "F"
    order = result.oru_r01_order_observation
    assert order.obr.obr_3.ei_1.value == "ACC\\T\\7\\F\\1" == order.orc.orc_3.ei_1.value
    assert order.obr.obr_5.value == "S" and order.obr.obr_25.value == "P"
    assert order.obr.obr_7.value == "20261201101112"
    assert order.oru_r01_timing_qty.tq1.tq1_9.value == "S"
    obx = [o.obx for o in order.oru_r01_observation]
    by_code = {o.obx_3.ce_1.value: o for o in obx}
    assert by_code["110180"].obx_5.value == "1.2.826.0.1.3680043.8.498.1"
    verdict = by_code["CXRS-VERDICT"]
    assert verdict.obx_5.value == "840539006^COVID-19^SCT" and verdict.obx_8.value == "A"
    assert by_code["CXRS-P-COVID19"].obx_5.value == "0.9100" and by_code["CXRS-P-COVID19"].obx_2.value == "NM"
    reasons = [o.obx_5.value for o in obx if o.obx_3.ce_1.value == "CXRS-REASON"]
    assert reasons[:2] == [
        "image 2: skipped: view position LL",
        "image 3: failed: cannot decode line two three",
    ]
    assert (
        len(reasons[2]) <= 199
        and reasons[2].startswith("image 4: failed: a\\F\\b")
        and reasons[2].endswith("...")
    )
    assert len(text.split("\r")) == 8 + len(obx) - 2, "a line break in a value never makes a segment"
    assert by_code["111003"].obx_5.value == "v7"
    assert all(o.obx_11.value == "P" for o in obx)
    assert [int(o.obx_1.value) for o in obx] == list(range(1, len(obx) + 1))


def test_priority_follows_the_finding_and_the_settings_and_control_id_is_stable() -> None:
    routine = _parsed(hl7.build_oru(_facts(flags=False, verdict="normal"), DEST, Hl7Config()))
    order = routine.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_5.value == "R"
    urgent = _parsed(hl7.build_oru(_facts(), DEST, Hl7Config(priority_on_finding="A")))
    assert urgent.oru_r01_patient_result.oru_r01_order_observation.obr.obr_5.value == "A"
    first = _parsed(hl7.build_oru(_facts(), DEST, Hl7Config())).msh.msh_10.value
    again = _parsed(hl7.build_oru(_facts(), DEST, Hl7Config())).msh.msh_10.value
    other = hl7.control_id("1.2.826.0.1.3680043.8.498.1", "v7", 3, "ris")
    assert first == again != other and len(first) == 20


def test_ack_reader_and_mllp_exchange_against_a_real_receiver() -> None:
    port = free_port()
    receiver = Hl7Receiver(port).start()
    try:
        text = hl7.build_oru(_facts(), DEST, Hl7Config())
        ack = hl7.parse_ack(mllp.exchange("127.0.0.1", port, text, timeout=5))
        assert ack.accepted and ack.control_id == _parsed(text).msh.msh_10.value
        receiver.answer = "AR"
        ack = hl7.parse_ack(mllp.exchange("127.0.0.1", port, text, timeout=5))
        assert ack.rejected and not ack.accepted and "refuses" in ack.text
        assert all(r.valid for r in receiver.received) and len(receiver.received) == 2
    finally:
        receiver.stop()
    with pytest.raises(mllp.MllpError, match="cannot connect"):
        mllp.exchange("127.0.0.1", port, "MSH|^~\\&|X", timeout=2)
    with pytest.raises(hl7.Hl7Error, match="no MSH"):
        hl7.parse_ack("HTTP/1.1 200 OK")
    with pytest.raises(mllp.MllpError, match="not an MLLP block"):
        mllp.unframe(b"MSH|^~\\&|")


def test_webhook_signature_and_answers() -> None:
    token_url = "https://hooks.example.org/services/T0/B0/SECRETTOKEN?key=SECRETKEY"
    name = WebhookConfig(url=token_url, secret=SECRET).name
    assert name.startswith("https://hooks.example.org#") and "SECRET" not in name, "tokens stay out of logs"
    body = b'{"event": "finding"}'
    assert webhook.verify(SECRET, body, webhook.signature(SECRET, body))
    assert not webhook.verify(SECRET, body + b" ", webhook.signature(SECRET, body))
    receiver = WebhookReceiver(SECRET).start()
    try:
        sent = webhook.post(receiver.url, SECRET, body, event="finding", key="k1", timeout=5)
        assert sent.delivered and receiver.hooks[-1].signature_ok
        assert receiver.hooks[-1].headers["X-Screener-Delivery"] == "k1"
        receiver.status = 503
        busy = webhook.post(receiver.url, SECRET, body, event="finding", key="k1", timeout=5)
        assert not busy.delivered and busy.retryable and "503" in (busy.error or "")
        receiver.status = 401
        refused = webhook.post(receiver.url, SECRET, body, event="finding", key="k1", timeout=5)
        assert not refused.delivered and not refused.retryable
    finally:
        receiver.stop()
    down = webhook.post(f"http://127.0.0.1:{free_port()}/x", SECRET, body, event="e", key="k", timeout=2)
    assert not down.delivered and down.retryable


def test_email_through_a_real_smtp_server(tmp_path: Path) -> None:
    port = free_port()
    smtp = SmtpReceiver(port).start()
    settings = EmailConfig(
        smtp_host="127.0.0.1", smtp_port=port, from_="screener@example.org", to=("rad@example.org",)
    )
    try:
        first = mail.send(settings, "[CXR Screener] finding", "body\n", "key-1")
        assert first.delivered and first.error is None
        assert smtp.envelopes[-1] == ("screener@example.org", ["rad@example.org"])
        msg = smtp.messages[-1]
        assert msg["Message-ID"] == mail.message_id("key-1", "screener@example.org")
        assert msg["Auto-Submitted"] == "auto-generated"
    finally:
        smtp.stop()
    down = mail.send(settings, "s", "b", "key-2")
    assert not down.delivered and down.retryable


def test_email_from_key_and_phi_link_template_are_checked(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[email]\nsmtp_host = "mx"\nfrom = "a@b.org"\nto = ["c@d.org"]\nevents = ["finding"]\n')
    assert load_config(toml, {}).email.from_ == "a@b.org"
    with pytest.raises(ConfigError, match=r"email\.events.*unknown events \['nope'\]"):
        load_config(toml, {"SCREENER__EMAIL__EVENTS": '["nope"]'})
    with pytest.raises(ConfigError, match=r"alerts\.link_template.*PHI"):
        load_config(toml, {"SCREENER__ALERTS__LINK_TEMPLATE": "https://v/{study_uid}"})
    toml.write_text('[[webhooks]]\nurl = "https://h/x"\nsecret = "short"\n')
    with pytest.raises(ConfigError, match=r"webhooks\[0\]\.secret.*at least 16"):
        load_config(toml, {})


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'a.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    eng = create_engine(url)
    Base.metadata.create_all(eng)
    try:
        yield eng
    finally:
        eng.dispose()


def _study(revision: int = 1) -> StudyFacts:
    return StudyFacts(
        study_instance_uid="1.2.826.0.1.3680043.8.498.77",
        verdict="covid19",
        model_version="v7",
        revision=revision,
        probabilities={"covid19": 0.9, "normal": 0.1},
        accession_number="ACC-SECRET-9",
        patient_id="MRN-SECRET-9",
        patient_name="CANARY^PATIENT",
    )


def test_alerts_are_deduplicated_rate_limited_and_free_of_phi(engine: Engine) -> None:
    routes = AlertRoutes(
        alerts=AlertsConfig(rate_limit_per_hour=2, link_template="https://viewer/s?h={study_hash}"),
        webhooks=(
            WebhookConfig(url="https://hooks.example/in", secret=SECRET, events=("finding", "disk_low")),
        ),
        email=EmailConfig(smtp_host="mx", from_="s@example.org", to=("r@example.org",), events=("finding",)),
    )
    with Session(engine) as session, session.begin():
        assert raise_alert(session, routes, Alert("finding", "s1", study=_study()), actor="t") == 2
        # The same verdict again (a re-run after a crash): nothing new.
        assert raise_alert(session, routes, Alert("finding", "s1", study=_study()), actor="t") == 0
        now = datetime.now(UTC)
        assert (
            raise_alert(session, routes, Alert("disk_low", "spool", {"free_bytes": 1}), actor="t", now=now)
            == 1
        )
        later = now + timedelta(seconds=5)
        assert (
            raise_alert(session, routes, Alert("disk_low", "spool"), actor="t", now=later) == 0
        )  # same window
        assert raise_alert(session, routes, Alert("finding", "s2", study=_study(2)), actor="t") == 2
        # A third finding within the hour: past rate_limit_per_hour = 2 for both destinations.
        assert raise_alert(session, routes, Alert("finding", "s3", study=_study(3)), actor="t") == 0
        assert raise_alert(session, routes, Alert("model_changed", "v8"), actor="t") == 0  # nobody subscribed
    with Session(engine) as session:
        rows = list(session.scalars(select(Delivery).order_by(Delivery.id)))
        suppressed = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "alert.suppressed")))
    assert [(r.channel, r.event) for r in rows] == [
        ("webhook", "finding"),
        ("email", "finding"),
        ("webhook", "disk_low"),
        ("webhook", "finding"),
        ("email", "finding"),
    ]
    assert len(suppressed) == 2
    assert len({r.idempotency_key for r in rows}) == len(rows)
    for row in rows:
        assert row.payload is not None
        for secret in ("ACC-SECRET-9", "MRN-SECRET-9", "CANARY", "1.2.826.0.1.3680043.8.498.77"):
            assert secret not in row.payload
    doc = json.loads(rows[0].payload or "")
    assert (
        doc["phi"] is False and doc["study"]["verdict"] == "covid19" and doc["study"]["model_version"] == "v7"
    )
    assert doc["link"] == f"https://viewer/s?h={doc['study']['study_hash']}"
    subject, body = email_text(doc)
    assert "covid19" in subject and "CANARY" not in body and doc["study"]["study_hash"] in body


def test_alerts_carry_phi_only_when_configured(engine: Engine) -> None:
    routes = AlertRoutes(
        alerts=AlertsConfig(include_phi=True, link_template="https://viewer/{accession}"),
        webhooks=(WebhookConfig(url="https://hooks.example/in", secret=SECRET),),
    )
    with Session(engine) as session, session.begin():
        assert raise_alert(session, routes, Alert("finding", "s1", study=_study()), actor="t") == 1
    with Session(engine) as session:
        doc = json.loads(session.scalars(select(Delivery.payload)).one() or "")
    assert doc["phi"] is True and doc["study"]["accession_number"] == "ACC-SECRET-9"
    assert doc["link"] == "https://viewer/ACC-SECRET-9"


def test_watch_raises_queue_stalled_disk_low_model_changed_and_database_lost(
    engine: Engine, tmp_path: Path
) -> None:
    from screener.core.db.models import Instance, ModelStatus, ModelVersion
    from screener.core.spool import Spool
    from screener.results.watch import AlertWatch

    old = datetime.now(UTC) - timedelta(hours=2)
    with Session(engine) as session, session.begin():
        session.add(
            Instance(
                sop_instance_uid="1.2.3.4",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                calling_ae_title="TEST",
                spool_name="aa/bb/x.dcm",
                sha256="0" * 64,
                size_bytes=1,
                received_at=old,
                updated_at=old,
            )
        )
        session.add(
            ModelVersion(
                version="v9",
                path="/nowhere",
                status=ModelStatus.ACTIVE,
                architectures="resnet18+resnet34",
                fusion_weight=0.5,
                onnx_sha256="0" * 64,
                card_json="{}",
            )
        )
    routes = AlertRoutes(
        alerts=AlertsConfig(queue_stalled_seconds=600, disk_low_bytes=2**62),
        webhooks=(WebhookConfig(url="https://hooks.example/in", secret=SECRET),),
    )
    problem: list[str] = []
    watch = AlertWatch(
        routes,
        engine,
        Spool(tmp_path, 0),
        actor="t",
        database_problem=lambda: problem[0] if problem else None,
    )
    assert watch.due()
    events = {a.event for a in watch.check()}
    assert events == {"queue_stalled", "disk_low", "model_changed"} and not watch.due()
    problem.append("database file x was replaced by another file")
    watch.check()
    with Session(engine) as session:
        rows = list(session.scalars(select(Delivery).order_by(Delivery.id)))
    # A second check raised nothing new but database_lost: the others are de-duplicated.
    assert sorted(r.event or "" for r in rows) == [
        "database_lost",
        "disk_low",
        "model_changed",
        "queue_stalled",
    ]
    details = {r.event: json.loads(r.payload or "")["details"] for r in rows}
    assert details["queue_stalled"]["queued"] == 1 and details["model_changed"]["active_version"] == "v9"
    assert "replaced" in details["database_lost"]["reason"]


def test_mllp_over_tls_verifies_the_receiver_and_presents_our_certificate(pki: dict[str, Path]) -> None:
    import ssl

    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca_pem"]))
    server_side.load_cert_chain(str(pki["server_pem"]), str(pki["server_key"]))
    server_side.verify_mode = ssl.CERT_REQUIRED
    port = free_port()
    receiver = Hl7Receiver(port).start(tls=server_side)
    text = hl7.build_oru(_facts(), DEST, Hl7Config())
    try:
        ours = mllp.client_context(pki["ca_pem"], pki["client_pem"], pki["client_key"])
        assert hl7.parse_ack(mllp.exchange("127.0.0.1", port, text, timeout=10, tls=ours)).accepted
        assert receiver.accepted() and receiver.accepted()[0].valid
        # A receiver we cannot verify (its certificate is not from the CA we trust): refused, retryable.
        stranger = mllp.client_context(pki["client_pem"], pki["client_pem"], pki["client_key"])
        with pytest.raises(mllp.MllpError, match="SSL"):
            mllp.exchange("127.0.0.1", port, text, timeout=10, tls=stranger)
    finally:
        receiver.stop()

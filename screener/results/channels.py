"""The outbox's channels besides DICOM: HL7 v2 results, webhook and email alerts.

Two halves, both in the results stage:

- :func:`enqueue_result_messages`, called in the transaction that records a study verdict: builds the
  ORU^R01 for every ``[[hl7.destinations]]`` entry (kept in the spool, like the SR, so every retry sends the
  same bytes with the same MSH-10) and raises the study's ``finding`` or ``indeterminate`` alert. Nothing
  is added twice: each row has a unique ``idempotency_key`` derived from (study, model version, revision).
- :class:`ChannelSender`, used by the sender for every claimed row that is not ``dicom``: one attempt,
  and a :class:`DeliveryOutcome` the sender records with its one retry, backoff and dead-letter policy.

What an answer means, per channel: HL7 ACK ``AA`` (``CA``) delivers; ``AR`` (``CR``, the receiver rejects
the message as it is) is dead at once; ``AE`` (``CE``, an application error such as a result that arrives
before the order) and no answer are retried. Webhooks: 2xx delivers, 408/425/429/5xx retried, other 4xx
dead. Email: 2xx delivers, 4xx and connection failures retried, 5xx dead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from screener.core.config import Config, Hl7Config, Hl7Destination
from screener.core.db.models import (
    Delivery,
    DeliveryChannel,
    DeliveryStatus,
    Instance,
    InstanceStatus,
    ModelVersion,
    Prediction,
    Study,
    StudyResult,
    utcnow,
)
from screener.core.logs import get_logger, uid_hash
from screener.core.spool import Spool
from screener.model.modelcard import ClassConcept, ModelCard
from screener.model.verdict import INDETERMINATE, NOT_ANALYSED
from screener.results import hl7, mail, mllp, webhook
from screener.results.alerts import Alert, AlertRoutes, StudyFacts, email_text, raise_alert

log = get_logger("screener.channels")

INDETERMINATE_CODE = hl7.Coded("82334004", "SCT", "Indeterminate")
NOT_ANALYSED_CODE = hl7.Coded("CXRS-NOTANALYSED", hl7.LOCAL_SCHEME, "Not analysed: no eligible image")
ALGORITHM_NAME = "CXR Screener"


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one send attempt means for its delivery row: sent, retried later, or dead."""

    delivered: bool
    retryable: bool
    error: str | None


@dataclass(frozen=True)
class ResultChannels:
    """The settings of the result channels besides DICOM (one unit, its own sections)."""

    hl7: Hl7Config
    routes: AlertRoutes
    live: bool = True  # results.mode = "shadow": nothing is queued

    @classmethod
    def of(cls, config: Config) -> ResultChannels:
        return cls(hl7=config.hl7, routes=AlertRoutes.of(config), live=config.results.mode == "live")


def _coded(concept: ClassConcept) -> hl7.Coded:
    return hl7.Coded(concept.code, concept.scheme, concept.meaning[:64])


def _reasons(session: Session, result: StudyResult) -> list[str]:
    """Why images of the study were not analysed or are indeterminate: our own words, never PHI."""
    rows = session.execute(
        select(Instance.status, Instance.status_reason, Prediction.label, Prediction.reason)
        .outerjoin(
            Prediction,
            (Prediction.instance_id == Instance.id)
            & (Prediction.model_version_id == result.model_version_id),
        )
        .where(Instance.study_id == result.study_id)
        .order_by(Instance.received_at, Instance.id)
    ).all()
    reasons: list[str] = []
    for n, (status, status_reason, label, reason) in enumerate(rows, start=1):
        if status in (InstanceStatus.SKIPPED, InstanceStatus.FAILED):
            reasons.append(f"image {n}: {status.value}: {status_reason or 'no reason recorded'}")
        elif label == INDETERMINATE:
            reasons.append(f"image {n}: indeterminate: {reason or 'no reason recorded'}")
    if result.verdict == INDETERMINATE and result.reason and not reasons:
        reasons.append(f"study: indeterminate: {result.reason}")
    return reasons


def _source_header(session: Session, spool: Spool, study_id: int) -> Dataset | None:
    name = session.scalar(
        select(Instance.spool_name)
        .where(Instance.study_id == study_id, Instance.spool_deleted_at.is_(None))
        .order_by(Instance.received_at, Instance.id)
        .limit(1)
    )
    if name is None:
        return None
    try:
        return dcmread(spool.path(name), stop_before_pixels=True)
    except (OSError, InvalidDicomError, ValueError):
        return None


def oru_facts(
    session: Session, result: StudyResult, source: Dataset, model: ModelVersion, made_at: datetime
) -> hl7.OruFacts:
    """The ORU^R01 facts of ``result``: classes, codes and findings from the model's card."""
    card = ModelCard.from_json(model.card_json)
    concepts = card.resolved_concepts()
    probs = result.probs or {}
    if result.verdict == INDETERMINATE:
        verdict_code = INDETERMINATE_CODE
    elif result.verdict == NOT_ANALYSED or result.verdict not in concepts:
        verdict_code = NOT_ANALYSED_CODE
    else:
        verdict_code = _coded(concepts[result.verdict])
    probabilities = [
        hl7.ClassProbability(
            name,
            hl7.Coded(concept.probability_code, hl7.LOCAL_SCHEME, f"Probability of {concept.meaning}"[:64]),
            float(probs[name]),
        )
        for name, concept in concepts.items()
        if name in probs
    ]
    return hl7.OruFacts(
        study_instance_uid=str(source.get("StudyInstanceUID", "")),
        model_version=model.version,
        revision=result.revision,
        verdict=result.verdict,
        verdict_code=verdict_code,
        flags_finding=bool(result.flagged),
        algorithm_name=f"{ALGORITHM_NAME} fused ResNet ({model.architectures})",
        made_at=made_at,
        probabilities=probabilities,
        reasons=_reasons(session, result),
        **hl7.patient_facts(source),
    )


def enqueue_result_messages(
    session: Session, spool: Spool, channels: ResultChannels, result: StudyResult, *, actor: str
) -> int:
    """In the verdict's transaction: one ORU^R01 per HL7 destination, and the study's alert.

    Returns how many deliveries were added. Never raises for a study whose header cannot be read: the
    verdict is recorded anyway and the log says why no HL7 message was made."""
    if not channels.live:
        return 0
    model = session.get(ModelVersion, result.model_version_id)
    study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == result.study_id))
    assert model is not None and study_uid is not None
    added = 0
    event = "finding" if result.flagged else ("indeterminate" if result.verdict == INDETERMINATE else None)
    wants_alert = event is not None and bool(channels.routes.targets(event))
    source = None
    if channels.hl7.destinations or wants_alert:
        source = _source_header(session, spool, result.study_id)
    now = utcnow()
    if channels.hl7.destinations and source is None:
        log.error("hl7.no_source", study_uid=uid_hash(study_uid), why="no readable instance in the spool")
    elif source is not None:
        facts = oru_facts(session, result, source, model, now)
        for dest in channels.hl7.destinations:
            added += _enqueue_oru(session, spool, channels.hl7, dest, result, facts)
    if event is not None and wants_alert:
        phi = hl7.patient_facts(source) if source is not None else {}
        name = "^".join(phi.get("patient_name", ()))
        added += raise_alert(
            session,
            channels.routes,
            Alert(
                event=event,
                subject=uid_hash(study_uid) or "",
                study=StudyFacts(
                    study_instance_uid=study_uid,
                    verdict=result.verdict,
                    model_version=model.version,
                    revision=result.revision,
                    probabilities=dict(result.probs) if result.probs else None,
                    accession_number=str(phi.get("accession_number", "")),
                    patient_id=str(phi.get("patient_id", "")),
                    patient_name=name,
                ),
                study_result_id=result.id,
                details={"reason": result.reason} if result.reason else {},
            ),
            actor=actor,
            now=now,
        )
    return added


def _enqueue_oru(
    session: Session,
    spool: Spool,
    settings: Hl7Config,
    dest: Hl7Destination,
    result: StudyResult,
    facts: hl7.OruFacts,
) -> int:
    control = hl7.control_id(facts.study_instance_uid, facts.model_version, facts.revision, dest.name)
    key = f"hl7:{dest.name}:{control}"
    if session.scalar(select(Delivery.id).where(Delivery.idempotency_key == key)) is not None:
        return 0
    row = Delivery(
        study_result_id=result.id,
        channel=DeliveryChannel.HL7.value,
        destination=dest.name,
        object_kind="oru",
        idempotency_key=key,
        status=DeliveryStatus.PENDING,
        attempts=0,
    )
    try:
        row.spool_name = spool.put(hl7.build_oru(facts, dest, settings).encode("utf-8")).name
    except hl7.Hl7Error as exc:
        # Recorded dead, so `deliveries list --status dead` shows the result that could not be sent.
        log.error("hl7.build_failed", destination=dest.name, error=str(exc))
        row.status, row.last_error = DeliveryStatus.DEAD, str(exc)[:2000]
    session.add(row)
    return 1


@dataclass(frozen=True)
class Claimed:
    """A claimed delivery of a channel other than DICOM."""

    id: int
    channel: str
    destination: str
    spool_name: str | None
    payload: str | None
    event: str | None
    idempotency_key: str | None


class ChannelSender:
    """One attempt of an HL7, webhook or email delivery."""

    def __init__(self, settings: ResultChannels, spool: Spool) -> None:
        self.settings = settings
        self.spool = spool
        self.hl7_destinations = {d.name: d for d in settings.hl7.destinations}
        self.webhooks = {w.name: w for w in settings.routes.webhooks}

    def deliver(self, item: Claimed) -> DeliveryOutcome:
        if item.channel == DeliveryChannel.HL7.value:
            return self._hl7(item)
        if item.channel == DeliveryChannel.WEBHOOK.value:
            return self._webhook(item)
        if item.channel == DeliveryChannel.EMAIL.value:
            return self._email(item)
        return DeliveryOutcome(False, False, f"unknown delivery channel {item.channel!r}")

    def _hl7(self, item: Claimed) -> DeliveryOutcome:
        dest = self.hl7_destinations.get(item.destination)
        if dest is None:
            return DeliveryOutcome(
                False, False, f"HL7 destination {item.destination} is no longer configured"
            )
        if item.spool_name is None:
            return DeliveryOutcome(False, False, "the HL7 message file is missing from the delivery row")
        try:
            # Bytes, not read_text: universal newlines would turn the segment separator (CR) into LF.
            text = self.spool.path(item.spool_name).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return DeliveryOutcome(False, False, f"HL7 message file unreadable: {type(exc).__name__}")
        control = text.split("\r", 1)[0].split("|")[9] if text.startswith("MSH") else ""
        tls = mllp.client_context(dest.tls_ca_file, dest.tls_cert_file, dest.tls_key_file)
        try:
            answer = mllp.exchange(
                dest.host, dest.port, text, timeout=self.settings.hl7.timeout_seconds, tls=tls
            )
            ack = hl7.parse_ack(answer)
        except mllp.MllpError as exc:
            return DeliveryOutcome(False, True, str(exc))
        except hl7.Hl7Error as exc:
            return DeliveryOutcome(False, True, f"{dest.name}: {exc}")
        if ack.control_id and control and ack.control_id != control:
            return DeliveryOutcome(
                False, True, f"{dest.name} acknowledged message {ack.control_id}, not {control}"
            )
        if ack.accepted:
            return DeliveryOutcome(True, False, None)
        text_part = f": {ack.text}" if ack.text else ""
        return DeliveryOutcome(False, not ack.rejected, f"{dest.name} answered {ack.code}{text_part}")

    def _webhook(self, item: Claimed) -> DeliveryOutcome:
        hook = self.webhooks.get(item.destination)
        if hook is None:
            return DeliveryOutcome(False, False, f"webhook {item.destination} is no longer configured")
        if item.payload is None:
            return DeliveryOutcome(False, False, "the alert document is missing from the delivery row")
        result = webhook.post(
            hook.url,
            hook.secret,
            item.payload.encode("utf-8"),
            event=item.event or "",
            key=item.idempotency_key or str(item.id),
            timeout=hook.timeout_seconds,
        )
        return DeliveryOutcome(result.delivered, result.retryable, result.error)

    def _email(self, item: Claimed) -> DeliveryOutcome:
        settings = self.settings.routes.email
        if not settings.enabled:
            return DeliveryOutcome(False, False, "email is no longer configured ([email] smtp_host)")
        if item.payload is None:
            return DeliveryOutcome(False, False, "the alert document is missing from the delivery row")
        subject, body = email_text(json.loads(item.payload))
        result = mail.send(settings, subject, body, item.idempotency_key or str(item.id))
        return DeliveryOutcome(result.delivered, result.retryable, result.error)

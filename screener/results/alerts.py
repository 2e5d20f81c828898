"""Alerts: events that people should hear about, queued as outbox deliveries to webhooks and email.

Every alert is a ``deliveries`` row (channel ``webhook`` or ``email``) added in the caller's transaction, so
an alert about a verdict commits with the verdict, and is retried, dead-lettered, re-driven and audited like
any result message. Its ``idempotency_key`` is derived from what it reports:

- a study event (``finding``, ``indeterminate``): (event, study, model version, revision), so one verdict
  alerts once, also after a crash and a re-run;
- any other event (``delivery_dead``, ``queue_stalled``, ``disk_low``, ``model_changed``,
  ``database_lost``): (event, subject, window of ``alerts.dedup_seconds``), so a condition that stays true
  is reported once per window and destination, not on every check; ``model_changed`` once per version.

Past ``alerts.rate_limit_per_hour`` alerts of one event type to one destination in the last hour, further
ones are suppressed: counted in the audit trail (``alert.suppressed``), never queued.

No PHI by default: the document names the study by a hash (the same 12 hex digits as the logs), with the
verdict, the model version and a link from ``alerts.link_template``. With ``alerts.include_phi = true`` it
adds the Study Instance UID, the Accession Number and the patient's ID and name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from screener.core import audit
from screener.core.config import AlertsConfig, Config, EmailConfig, WebhookConfig
from screener.core.db.models import Delivery, DeliveryChannel, DeliveryStatus, utcnow
from screener.core.logs import get_logger, uid_hash

log = get_logger("screener.alerts")

ALERT_RAISED = "alert.raised"
ALERT_SUPPRESSED = "alert.suppressed"
STUDY_EVENTS = ("finding", "indeterminate")
DOCUMENT_VERSION = 1
_SUMMARIES = {
    "finding": "A study's verdict flags a finding",
    "indeterminate": "A study's verdict is indeterminate",
    "delivery_dead": "A result delivery gave up",
    "queue_stalled": "The work queue is not moving",
    "disk_low": "The spool is running out of disk space",
    "model_changed": "The active model changed",
    "database_lost": "The database is not the store's database",
}


@dataclass(frozen=True)
class AlertRoutes:
    """The settings alerts need: where they go and what they may say (one unit, its own sections)."""

    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    webhooks: tuple[WebhookConfig, ...] = ()
    email: EmailConfig = field(default_factory=EmailConfig)

    @classmethod
    def of(cls, config: Config) -> AlertRoutes:
        return cls(alerts=config.alerts, webhooks=config.webhooks, email=config.email)

    def targets(self, event: str) -> list[tuple[DeliveryChannel, str]]:
        """(channel, destination name) of every subscriber of ``event``."""
        found = [(DeliveryChannel.WEBHOOK, w.name) for w in self.webhooks if event in w.events]
        if self.email.enabled and event in self.email.events:
            found.append((DeliveryChannel.EMAIL, "email"))
        return found


@dataclass(frozen=True)
class StudyFacts:
    """What a study alert may say; the PHI fields are used only with ``alerts.include_phi``."""

    study_instance_uid: str
    verdict: str
    model_version: str
    revision: int
    probabilities: Mapping[str, float] | None = None
    accession_number: str = ""
    patient_id: str = ""
    patient_name: str = ""


@dataclass(frozen=True)
class Alert:
    """One event to report. ``subject`` is what it is about, for de-duplication (never PHI)."""

    event: str
    subject: str
    details: Mapping[str, Any] = field(default_factory=dict)
    study: StudyFacts | None = None
    study_result_id: int | None = None
    once: bool = False  # de-duplicate by subject alone, whatever the window (model_changed: per version)


def _link(template: str, values: Mapping[str, str]) -> str | None:
    if not template:
        return None
    try:
        return template.format_map(dict(values))
    except (KeyError, ValueError, IndexError):
        return None


def document(alert: Alert, settings: AlertsConfig, at: datetime, key: str) -> dict[str, Any]:
    """The alert as JSON-ready data: the webhook body and the email's content (schema in docs)."""
    doc: dict[str, Any] = {
        "version": DOCUMENT_VERSION,
        "id": key,
        "event": alert.event,
        "occurred_at": at.isoformat(),
        "summary": _SUMMARIES.get(alert.event, alert.event),
        "source": "cxr-screener",
        "phi": False,
        "details": dict(alert.details),
    }
    study = alert.study
    if study is not None:
        study_hash = uid_hash(study.study_instance_uid) or ""
        values = {"study_hash": study_hash, "event": alert.event}
        doc["study"] = {
            "study_hash": study_hash,
            "verdict": study.verdict,
            "model_version": study.model_version,
            "revision": study.revision,
            "probabilities": dict(study.probabilities) if study.probabilities else None,
        }
        if settings.include_phi:
            values |= {"study_uid": study.study_instance_uid, "accession": study.accession_number}
            doc["phi"] = True
            doc["study"] |= {
                "study_instance_uid": study.study_instance_uid,
                "accession_number": study.accession_number,
                "patient_id": study.patient_id,
                "patient_name": study.patient_name,
            }
        doc["link"] = _link(settings.link_template, values)
    return doc


def _dedup(alert: Alert, settings: AlertsConfig, at: datetime) -> str:
    if alert.study is not None:
        s = alert.study
        return "\x1f".join((s.study_instance_uid, s.model_version, str(s.revision)))
    if alert.once:
        return alert.subject
    window = int(at.timestamp() // settings.dedup_seconds) if settings.dedup_seconds > 0 else at.isoformat()
    return f"{alert.subject}\x1f{window}"


def idempotency_key(channel: str, destination: str, event: str, dedup: str) -> str:
    """``channel:event:<40 hex>``: at most 160 characters whatever the destination or subject."""
    digest = hashlib.sha256("\x1f".join((channel, destination, event, dedup)).encode()).hexdigest()[:40]
    return f"{channel}:{event}:{digest}"


def _insert(session: Session, values: dict[str, Any]) -> int:
    """Insert one delivery unless its idempotency key exists. Returns 1 when a row was added."""
    dialect = session.get_bind().dialect.name
    maker = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        maker(Delivery)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(Delivery.id)
    )
    return len(session.execute(stmt).all())


def raise_alert(
    session: Session, routes: AlertRoutes, alert: Alert, *, actor: str, now: datetime | None = None
) -> int:
    """Queue ``alert`` for every subscribed webhook and the email, in ``session``'s transaction.

    Returns how many deliveries were added (0: nobody subscribed, already raised in this window, or rate
    limited)."""
    at = now or utcnow()
    dedup = _dedup(alert, routes.alerts, at)
    added = 0
    for channel, destination in routes.targets(alert.event):
        key = idempotency_key(channel.value, destination, alert.event, dedup)
        recent = session.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(
                Delivery.event == alert.event,
                Delivery.destination == destination,
                Delivery.channel == channel.value,
                Delivery.created_at >= at - timedelta(hours=1),
            )
        )
        if (recent or 0) >= routes.alerts.rate_limit_per_hour:
            if session.scalar(select(Delivery.id).where(Delivery.idempotency_key == key)) is None:
                audit.record(
                    session,
                    ALERT_SUPPRESSED,
                    actor=actor,
                    subject=alert.subject,
                    detail={"event": alert.event, "channel": channel.value, "limit_per_hour": recent},
                )
                log.warning("alert.suppressed", alert_event=alert.event, channel=channel.value, recent=recent)
            continue
        payload = json.dumps(document(alert, routes.alerts, at, key), sort_keys=True)
        count = _insert(
            session,
            {
                "study_result_id": alert.study_result_id,
                "channel": channel.value,
                "destination": destination,
                "object_kind": channel.value,
                "event": alert.event,
                "idempotency_key": key,
                "payload": payload,
                "status": DeliveryStatus.PENDING.value,
                "attempts": 0,
                "next_attempt_at": at,
                "created_at": at,
            },
        )
        if count:
            audit.record(
                session,
                ALERT_RAISED,
                actor=actor,
                subject=alert.subject,
                detail={"event": alert.event, "channel": channel.value, "key": key},
            )
        added += count
    if added:
        log.info("alert.raised", alert_event=alert.event, subject=alert.subject, deliveries=added)
    return added


def email_text(doc: Mapping[str, Any]) -> tuple[str, str]:
    """Subject and plain-text body of an alert email, from its document."""
    study = doc.get("study") or {}
    about = f" (study {study['study_hash']}: {study['verdict']})" if study else ""
    subject = f"[CXR Screener] {doc['event']}{about}"
    lines = [str(doc["summary"]) + ".", ""]
    if study:
        for key in (
            "verdict",
            "model_version",
            "revision",
            "study_hash",
            "study_instance_uid",
            "accession_number",
            "patient_id",
            "patient_name",
        ):
            if study.get(key) not in (None, ""):
                lines.append(f"{key.replace('_', ' ')}: {study[key]}")
        for name, p in sorted((study.get("probabilities") or {}).items()):
            lines.append(f"probability {name}: {p:.3f}")
    for key, value in sorted((doc.get("details") or {}).items()):
        lines.append(f"{key.replace('_', ' ')}: {value}")
    if doc.get("link"):
        lines.append(f"link: {doc['link']}")
    lines += ["", f"occurred at: {doc['occurred_at']}", f"alert id: {doc['id']}"]
    lines += ["", "Automated message from CXR Screener; results are preliminary and not a diagnosis."]
    return subject, "\n".join(lines) + "\n"

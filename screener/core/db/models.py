"""SQLAlchemy 2.0 typed models. The schema itself is owned by the Alembic revisions in migrations/."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from screener.core.db.types import UTCDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID_LENGTH = 64  # PS3.5 9.1: a UID is at most 64 characters


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class InstanceStatus(enum.StrEnum):
    """queued -> processing -> classified | skipped | failed."""

    QUEUED = "queued"
    PROCESSING = "processing"
    CLASSIFIED = "classified"
    SKIPPED = "skipped"
    FAILED = "failed"


class ClashAction(enum.StrEnum):
    KEPT_FIRST = "kept_first"  # same SOP Instance UID, different bytes: the first copy kept
    REFUSED = "refused"  # same SOP Instance UID, different bytes: answered 0x0111
    MISMATCH_KEPT = "mismatch_kept"  # command and data set disagreed: kept under the data set's UID


def _enum(cls: type[enum.StrEnum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_status_received_at", "status", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    spool_name: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[InstanceStatus] = mapped_column(_enum(InstanceStatus), default=InstanceStatus.QUEUED)
    status_reason: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    spool_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Recorded by the worker when it finishes the instance (migration 0010), for the drift and
    # site-performance reports: header facts, the decoded [0, 1] image's mean, and the model then serving.
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    image_rows: Mapped[int | None] = mapped_column(Integer)
    image_columns: Mapped[int | None] = mapped_column(Integer)
    mean_intensity: Mapped[float | None] = mapped_column(Float)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    # The image-content gate's novelty score (migration 0011), for images the model ran on when its
    # card has a gate: classified ones and those the gate refused (skipped, the score in the reason).
    novelty: Mapped[float | None] = mapped_column(Float)


class InstanceClash(Base):
    """Audit of a SOP Instance UID received again with different bytes, or of a C-STORE whose command
    named another SOP instance or class than its data set (``command_*`` set, ``listener.on_mismatch``).

    ``sop_instance_uid`` is always the UID the bytes are kept under (the data set's own).
    """

    __tablename__ = "instance_clashes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    kept_sha256: Mapped[str] = mapped_column(String(64))
    received_sha256: Mapped[str] = mapped_column(String(64))
    received_size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    action: Mapped[ClashAction] = mapped_column(_enum(ClashAction))
    spool_name: Mapped[str | None] = mapped_column(String(128))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    command_sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    command_sop_class_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))


class ModelStatus(enum.StrEnum):
    """candidate -> active -> retired; exactly one active model at a time."""

    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[ModelStatus] = mapped_column(_enum(ModelStatus), default=ModelStatus.CANDIDATE)
    architectures: Mapped[str] = mapped_column(String(64))
    fusion_weight: Mapped[float] = mapped_column(Float)
    onnx_sha256: Mapped[str] = mapped_column(String(64))
    card_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Prediction(Base):
    """One classification of one instance by one model version (unique).

    ``probs``: ``{class: probability}`` over the classes of that model's card (migration 0012); ``label``
    one of them or ``indeterminate``, with ``reason`` saying why (migration 0013)."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("instance_id", "model_version_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    label: Mapped[str] = mapped_column(String(32))
    probs: Mapped[dict[str, float]] = mapped_column(JSON)
    reason: Mapped[str | None] = mapped_column(Text)
    probs_a: Mapped[list[float]] = mapped_column(JSON)
    probs_b: Mapped[list[float]] = mapped_column(JSON)
    disagreement: Mapped[float] = mapped_column(Float)
    backend: Mapped[str] = mapped_column(String(32))
    batch_size: Mapped[int] = mapped_column(Integer)
    preprocess_ms: Mapped[float] = mapped_column(Float)
    inference_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The class activation map as an 8-bit grey PNG (screener.model.heatmap), where the model has the
    # output (migration 0016).
    heatmap: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)


class StudyResult(Base):
    """A study verdict by one model version; a new revision when the study changed after the last one.

    ``verdict``: a class of the model's card, ``indeterminate`` (``reason`` says why) or ``not_analysed``;
    ``probs`` the carrying image's ``{class: probability}`` (None when not analysed); ``flagged`` whether
    the verdict is a finding of the card (a positive to review)."""

    __tablename__ = "study_results"
    __table_args__ = (UniqueConstraint("study_id", "model_version_id", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    revision: Mapped[int] = mapped_column(Integer, default=1)
    verdict: Mapped[str] = mapped_column(String(32))
    probs: Mapped[dict[str, float] | None] = mapped_column(JSON(none_as_null=True))
    flagged: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    reason: Mapped[str | None] = mapped_column(Text)
    instances_total: Mapped[int] = mapped_column(Integer)
    instances_classified: Mapped[int] = mapped_column(Integer)
    instances_skipped: Mapped[int] = mapped_column(Integer)
    instances_failed: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DeliveryStatus(enum.StrEnum):
    """pending -> sent; retryable failures -> failed (retried after next_attempt_at); fatal -> dead."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    DEAD = "dead"


class DeliveryChannel(enum.StrEnum):
    """How a delivery travels (migration 0014): one outbox, one retry and dead-letter policy for all."""

    DICOM = "dicom"  # C-STORE of an SR / Secondary Capture (object_kind "sr" | "sc")
    HL7 = "hl7"  # ORU^R01 over MLLP (object_kind "oru")
    WEBHOOK = "webhook"  # signed JSON POST of an alert (object_kind "webhook")
    EMAIL = "email"  # an alert by SMTP (object_kind "email")


class Delivery(Base):
    """Outbox: one row per (study result, destination, object) or per alert; survives restarts.

    DICOM and HL7 messages are built once, in the verdict's transaction, and kept in the spool
    (``spool_name``); alerts keep their document in ``payload``. ``idempotency_key`` is unique, so a repeat
    of the same result message or alert adds no row.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("study_result_id", "destination", "object_kind"),
        Index("ix_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_deliveries_event_created_at", "event", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_result_id: Mapped[int | None] = mapped_column(ForeignKey("study_results.id"), index=True)
    channel: Mapped[str] = mapped_column(
        String(16), default=DeliveryChannel.DICOM.value, server_default="dicom"
    )
    destination: Mapped[str] = mapped_column(String(128))
    object_kind: Mapped[str] = mapped_column(String(8))  # "sr" | "sc" | "oru" | "webhook" | "email"
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    spool_name: Mapped[str | None] = mapped_column(String(128))
    event: Mapped[str | None] = mapped_column(String(32))
    idempotency_key: Mapped[str | None] = mapped_column(String(160), unique=True)
    payload: Mapped[str | None] = mapped_column(Text)
    status: Mapped[DeliveryStatus] = mapped_column(_enum(DeliveryStatus), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Label(Base):
    """A radiologist-confirmed label, keyed by SOP Instance UID, Study Instance UID or accession number."""

    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    label: Mapped[str] = mapped_column(String(32))
    confirmed_by: Mapped[str | None] = mapped_column(String(128))
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    source_file: Mapped[str | None] = mapped_column(Text)
    imported_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class TrainingRun(Base):
    """One `trainer train` / `trainer retrain` run: what it used, what it produced, how it ended."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # train | retrain
    status: Mapped[str] = mapped_column(String(16))  # running | promoted | kept | failed | registered
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    labels_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    model_version: Mapped[str | None] = mapped_column(String(64))
    summary: Mapped[str | None] = mapped_column(Text)


class ModelEvent(Base):
    """Audit of the registry: registrations, promotions (gated or forced), refusals and rollbacks."""

    __tablename__ = "model_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(16))  # registered | promoted | refused | rolled_back | retired
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(Text)
    report_json: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AuditEvent(Base):
    """Who did what when: instances received, results produced, SRs delivered, model promotions and rollbacks.

    No PHI beyond the UIDs the database already holds; ``actor`` is a calling AE title, a worker or
    sender identity, or "operator".
    """

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    action: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(128))
    subject: Mapped[str] = mapped_column(String(128))
    detail: Mapped[str | None] = mapped_column(Text)


class StoreIdentity(Base):
    """The store's identity: one row, the UUID also written at the spool's root (``SPOOL_IDENTITY``).

    ``serve`` starts only when both agree, so a lost or replaced database is never taken for an empty store
    and the orphan sweep never deletes the files of another database's instances (screener/core/identity.py).
    """

    __tablename__ = "store_identity"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    identity: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ConsoleUser(Base):
    """A local account of the web console (migration 0015): ``role`` is viewer, reviewer or admin; the
    password is kept only as its argon2 hash; ``failed_logins`` wrong passwords in a row set
    ``locked_until``."""

    __tablename__ = "console_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(Text)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    password_changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ConsoleSession(Base):
    """A signed-in browser: the sha256 of its cookie token (never the token), its CSRF token, its expiry."""

    __tablename__ = "console_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("console_users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    client: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class StudyReview(Base):
    """A reviewer's reading of a study's result: agree, disagree (``label`` the correct class) or
    not_assessable, with an optional comment; ``label_id`` is the ``labels`` row it added, if any."""

    __tablename__ = "study_reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_result_id: Mapped[int | None] = mapped_column(ForeignKey("study_results.id"))
    reviewer: Mapped[str] = mapped_column(String(64))
    decision: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(32))
    comment: Mapped[str | None] = mapped_column(Text)
    label_id: Mapped[int | None] = mapped_column(ForeignKey("labels.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

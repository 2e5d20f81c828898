"""Settings: ``config.toml`` -> frozen dataclasses, with ``SCREENER__SECTION__KEY`` environment overrides.

Loaded once in ``main()`` and passed down. Every field below is documented in the repository's
``config.toml``; a key that is unknown, of the wrong type or impossible stops start-up with a
:class:`~screener.core.errors.ConfigError` naming the key, the value and where it came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from screener.core.errors import ConfigError

ENV_PREFIX = "SCREENER__"
CONFIG_ENV = "SCREENER_CONFIG"

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: AE VR, no backslash, <= 16 chars


class _Invalid(Exception):
    """Raised by a ``validate`` method: field name and why its value is impossible."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise _Invalid(key, problem)


def _check_ae_title(key: str, value: str) -> None:
    _require(
        bool(_AE_TITLE.match(value)) and value.strip() != "",
        key,
        "must be 1-16 printable ASCII characters without a backslash (DICOM AE title)",
    )


def _check_port(key: str, value: int, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    _require(low <= value <= 65535, key, f"must be a TCP port between {low} and 65535")


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    def validate(self) -> None:
        _require(
            (self.cert_file is None) == (self.key_file is None),
            "cert_file",
            "cert_file and key_file must be set together",
        )
        _require(
            not self.require_client_cert or self.ca_file is not None,
            "require_client_cert",
            "needs ca_file to verify client certificates",
        )
        _require(self.enabled or not self.require_client_cert, "require_client_cert", "needs TLS enabled")
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            _require(path is None or path.is_file(), name, "file does not exist")


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str = "CXRSCREENER"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    require_called_aet: bool = True
    max_associations: int = 16
    drain_seconds: float = 30.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu_size: int = 0
    accept_all_storage: bool = False
    on_conflict: Literal["keep_first", "refuse"] = "keep_first"
    on_mismatch: Literal["refuse", "keep"] = "refuse"
    queue_high_water: int = 20000
    tls: TLSConfig = field(default_factory=TLSConfig)

    def validate(self) -> None:
        _check_ae_title("ae_title", self.ae_title)
        _check_port("port", self.port, allow_zero=True)
        for entry in self.allowed_calling_aets:
            aet, _, host = entry.partition("@")
            _check_ae_title("allowed_calling_aets", aet)
            _require(
                "@" not in entry or host != "", "allowed_calling_aets", f"entry {entry!r} has an empty host"
            )
        _require(1 <= self.max_associations <= 1000, "max_associations", "must be between 1 and 1000")
        for name in ("drain_seconds", "acse_timeout", "dimse_timeout", "network_timeout"):
            _require(0 < getattr(self, name) <= 86400, name, "must be a number of seconds in (0, 86400]")
        _require(
            self.max_pdu_size == 0 or 4096 <= self.max_pdu_size <= 2**32 - 1,
            "max_pdu_size",
            "must be 0 (no limit) or between 4096 and 4294967295 bytes",
        )
        _require(self.queue_high_water >= 0, "queue_high_water", "must be 0 (no limit) or more instances")


@dataclass(frozen=True)
class StorageConfig:
    spool_dir: Path = Path("var/spool")
    min_free_bytes: int = 1024**3
    orphan_grace_seconds: float = 300.0
    retention_days: float = 0.0

    def validate(self) -> None:
        _require(self.min_free_bytes >= 0, "min_free_bytes", "must be zero or more bytes")
        _require(self.orphan_grace_seconds >= 0, "orphan_grace_seconds", "must be zero or more seconds")
        _require(self.retention_days >= 0, "retention_days", "must be zero (keep forever) or more days")


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "sqlite:///var/screener.db"
    auto_migrate: bool = True
    busy_timeout_ms: int = 5000
    pool_size: int = 10
    statement_timeout_seconds: float = 5.0

    def validate(self) -> None:
        _require(
            self.url.startswith(("sqlite:", "postgresql")),
            "url",
            "must be a SQLAlchemy URL for SQLite (sqlite:///PATH) or PostgreSQL (postgresql+psycopg://...)",
        )
        _require(0 <= self.busy_timeout_ms <= 600_000, "busy_timeout_ms", "must be between 0 and 600000")
        _require(1 <= self.pool_size <= 200, "pool_size", "must be between 1 and 200")
        _require(
            0.1 <= self.statement_timeout_seconds <= 3600,
            "statement_timeout_seconds",
            "must be between 0.1 and 3600 seconds",
        )


@dataclass(frozen=True)
class TritonConfig:
    """The Triton Inference Server a worker uses with ``inference.backend = "triton"``."""

    url: str = "127.0.0.1:8001"  # host:port (8001 gRPC, 8000 HTTP by Triton's defaults)
    protocol: Literal["grpc", "http"] = "grpc"
    model_name: str = "cxr-screener"
    connect_timeout_seconds: float = 5.0
    request_timeout_seconds: float = 60.0
    shared_memory: bool = False  # batches through system shared memory (client and server on one host)
    retry_seconds: float = 1.0  # first back-off after a Triton fault, doubled up to max_retry_seconds
    max_retry_seconds: float = 30.0

    def validate(self) -> None:
        _require(
            "://" not in self.url and ":" in self.url,
            "url",
            "must be host:port without a scheme (e.g. triton.example.org:8001)",
        )
        _require(self.model_name != "", "model_name", "must name the model in Triton's model repository")
        _require(
            0.1 <= self.connect_timeout_seconds <= 600,
            "connect_timeout_seconds",
            "must be between 0.1 and 600 seconds",
        )
        _require(
            0.1 <= self.request_timeout_seconds <= 3600,
            "request_timeout_seconds",
            "must be between 0.1 and 3600 seconds",
        )
        _require(0.05 <= self.retry_seconds <= 600, "retry_seconds", "must be between 0.05 and 600 seconds")
        _require(
            self.retry_seconds <= self.max_retry_seconds <= 3600,
            "max_retry_seconds",
            "must be at least retry_seconds and at most 3600 seconds",
        )


@dataclass(frozen=True)
class InferenceConfig:
    backend: Literal["auto", "onnxruntime", "torch", "tensorrt", "triton"] = "auto"
    max_batch: int = 32
    max_wait_ms: int = 200
    study_settle_seconds: float = 30.0
    preprocess_workers: int = 0
    lease_seconds: float = 300.0
    poll_seconds: float = 1.0
    threads: int = 0
    torch_compile: bool = False
    trt_cache_dir: Path = Path("var/trt-cache")
    reduced_decode: bool = True
    precision: Literal["auto", "fp32", "int8"] = "auto"
    triton: TritonConfig = field(default_factory=TritonConfig)

    def validate(self) -> None:
        _require(1 <= self.max_batch <= 1024, "max_batch", "must be between 1 and 1024")
        _require(0 <= self.max_wait_ms <= 60_000, "max_wait_ms", "must be between 0 and 60000")
        _require(self.study_settle_seconds >= 0, "study_settle_seconds", "must be zero or more seconds")
        _require(self.preprocess_workers >= 0, "preprocess_workers", "must be 0 (one per core) or more")
        _require(10 <= self.lease_seconds <= 86400, "lease_seconds", "must be between 10 and 86400 seconds")
        _require(0.05 <= self.poll_seconds <= 60, "poll_seconds", "must be between 0.05 and 60 seconds")
        _require(self.threads >= 0, "threads", "must be 0 (one per core) or more")


@dataclass(frozen=True)
class EligibilityConfig:
    """Header rules deciding whether an instance is a frontal chest radiograph
    (screener.imaging.eligibility)."""

    modalities: tuple[str, ...] = ("CR", "DX")
    secondary_capture_needs_chest_body_part: bool = True
    body_parts: tuple[str, ...] = ("CHEST",)
    chest_description_keywords: tuple[str, ...] = ("CHEST", "THORAX", "CXR", "LUNG", "TORAX", "THORAC")
    view_positions: tuple[str, ...] = ("PA", "AP")
    allow_missing_view_position: bool = True
    lateral_description_keywords: tuple[str, ...] = ("LAT", "LATERAL")
    max_pixels: int = 100_000_000
    max_frames: int = 1

    def validate(self) -> None:
        _require(len(self.modalities) > 0, "modalities", "must list at least one modality")
        _require(len(self.view_positions) > 0, "view_positions", "must list at least one view position")
        _require(1 <= self.max_pixels <= 2**31, "max_pixels", "must be between 1 and 2147483648")
        _require(1 <= self.max_frames <= 10_000, "max_frames", "must be between 1 and 10000")


@dataclass(frozen=True)
class ModelsConfig:
    dir: Path = Path("var/models")


@dataclass(frozen=True)
class PacsDestination:
    ae_title: str
    host: str
    port: int
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def validate(self) -> None:
        _check_ae_title("ae_title", self.ae_title)
        _require(self.host != "", "host", "must not be empty")
        _check_port("port", self.port)
        _check_client_tls(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)


def _check_client_tls(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> None:
    """The TLS files of an outgoing connection (the PACS, an HL7 destination): certificate and key
    together, and every file that is named exists."""
    _require(
        (cert_file is None) == (key_file is None),
        "tls_cert_file",
        "tls_cert_file and tls_key_file must be set together",
    )
    for name, path in (("tls_ca_file", ca_file), ("tls_cert_file", cert_file), ("tls_key_file", key_file)):
        _require(path is None or path.is_file(), name, "file does not exist")


_UID_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


@dataclass(frozen=True)
class PacsConfig:
    destinations: tuple[PacsDestination, ...] = ()
    calling_ae_title: str = "CXRSCREENER"
    uid_root: str = "2.25"
    send_secondary_capture: bool = False
    institution_name: str = ""
    manufacturer: str = "CXR Screener project"
    max_attempts: int = 12
    backoff_initial_seconds: float = 10.0
    backoff_max_seconds: float = 900.0
    timeout_seconds: float = 30.0
    sweep_seconds: float = 2.0

    def validate(self) -> None:
        _check_ae_title("calling_ae_title", self.calling_ae_title)
        _require(
            bool(_UID_ROOT.match(self.uid_root)) and len(self.uid_root) <= 24,
            "uid_root",
            "must be a DICOM UID root (digits and dots, no leading zeros, at most 24 characters)",
        )
        _require(1 <= self.max_attempts <= 1000, "max_attempts", "must be between 1 and 1000")
        _require(self.backoff_initial_seconds > 0, "backoff_initial_seconds", "must be more than 0 seconds")
        _require(
            self.backoff_max_seconds >= self.backoff_initial_seconds,
            "backoff_max_seconds",
            "must be at least backoff_initial_seconds",
        )
        _require(0 < self.timeout_seconds <= 3600, "timeout_seconds", "must be in (0, 3600] seconds")
        _require(0.05 <= self.sweep_seconds <= 3600, "sweep_seconds", "must be between 0.05 and 3600 seconds")


@dataclass(frozen=True)
class ResultsConfig:
    """What happens to a study verdict once it is recorded.

    ``live``: an SR (and SC) is built and queued for every ``pacs.destinations`` entry. ``shadow``: every
    instance is still classified and every prediction and verdict recorded (reports, site performance,
    drift), but nothing is built or queued for any destination; each verdict that would have gone out is
    recorded as withheld (audit action ``result.withheld``), and deliveries already queued stay pending.
    """

    mode: Literal["live", "shadow"] = "live"


# Alert events (screener.results.alerts): what a webhook or email subscribes to with `events`.
ALERT_EVENTS: tuple[str, ...] = (
    "finding",
    "indeterminate",
    "delivery_dead",
    "queue_stalled",
    "disk_low",
    "model_changed",
    "database_lost",
)
_HL7_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HL7_DELIMITERS = set("|^~\\&\r\n")


def _check_events(key: str, events: tuple[str, ...]) -> None:
    unknown = sorted(set(events) - set(ALERT_EVENTS))
    _require(not unknown, key, f"unknown events {unknown}; known events are: {', '.join(ALERT_EVENTS)}")


@dataclass(frozen=True)
class Hl7Destination:
    """One ``[[hl7.destinations]]`` entry: a RIS or interface engine taking ORU^R01 over MLLP."""

    name: str
    host: str
    port: int
    sending_application: str = "CXRSCREENER"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    def validate(self) -> None:
        _require(bool(_HL7_NAME.match(self.name)), "name", "must be 1-64 letters, digits, '_', '.' or '-'")
        _require(self.host != "", "host", "must not be empty")
        _check_port("port", self.port)
        for key in ("sending_application", "sending_facility", "receiving_application", "receiving_facility"):
            value = getattr(self, key)
            _require(
                not (_HL7_DELIMITERS & set(value)) and len(value) <= 227,
                key,
                "must not contain HL7 delimiters (| ^ ~ \\ &) or line breaks",
            )
        _require(self.sending_application != "", "sending_application", "must not be empty")
        _check_client_tls(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)


@dataclass(frozen=True)
class Hl7Config:
    """HL7 v2.5.1 ORU^R01 results over MLLP (screener.results.hl7). No destination: no HL7 message."""

    destinations: tuple[Hl7Destination, ...] = ()
    priority_on_finding: Literal["S", "A", "R"] = "S"  # OBR-5 / TQ1-9 when the verdict flags a finding
    priority_otherwise: Literal["S", "A", "R"] = "R"
    processing_id: Literal["P", "T", "D"] = "P"  # MSH-11: production, training, debugging
    timeout_seconds: float = 30.0

    def validate(self) -> None:
        names = [d.name for d in self.destinations]
        _require(len(names) == len(set(names)), "destinations", f"names must be unique, not {names}")
        _require(0 < self.timeout_seconds <= 3600, "timeout_seconds", "must be in (0, 3600] seconds")


@dataclass(frozen=True)
class WebhookConfig:
    """One ``[[webhooks]]`` entry: a JSON POST signed with HMAC-SHA256 (header ``X-Screener-Signature``)."""

    url: str
    secret: str
    events: tuple[str, ...] = ALERT_EVENTS
    timeout_seconds: float = 10.0

    @property
    def name(self) -> str:
        """The destination name of its deliveries, logs and metrics: scheme, host and a digest of the URL.
        Never the path or query, which often hold the receiver's token (chat and paging webhooks)."""
        scheme, _, rest = self.url.partition("://")
        host = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
        return f"{scheme}://{host}#{hashlib.sha256(self.url.encode()).hexdigest()[:8]}"[:128]

    def validate(self) -> None:
        _require(self.url.startswith(("http://", "https://")), "url", "must start with http:// or https://")
        _require(len(self.secret) >= 16, "secret", "must be at least 16 characters (the HMAC key)")
        _check_events("events", self.events)
        _require(0 < self.timeout_seconds <= 600, "timeout_seconds", "must be in (0, 600] seconds")


@dataclass(frozen=True)
class EmailConfig:
    """``[email]``: alerts by SMTP. Off while ``smtp_host`` is empty."""

    smtp_host: str = ""
    smtp_port: int = 25
    starttls: bool = False
    username: str = ""
    password_file: Path | None = None
    from_: str = field(default="", metadata={"key": "from"})
    to: tuple[str, ...] = ()
    events: tuple[str, ...] = ALERT_EVENTS
    timeout_seconds: float = 30.0

    @property
    def enabled(self) -> bool:
        return self.smtp_host != ""

    def validate(self) -> None:
        _check_port("smtp_port", self.smtp_port)
        _check_events("events", self.events)
        _require(0 < self.timeout_seconds <= 600, "timeout_seconds", "must be in (0, 600] seconds")
        if not self.enabled:
            return
        _require("@" in self.from_, "from_", "must be an email address (the sender of alert emails)")
        _require(len(self.to) > 0, "to", "must list at least one recipient address")
        for address in self.to:
            _require("@" in address, "to", f"{address!r} is not an email address")
        _require(
            not self.username or self.password_file is not None,
            "password_file",
            "is needed with username (a file holding the SMTP password)",
        )
        _require(
            self.password_file is None or self.password_file.is_file(), "password_file", "file does not exist"
        )


@dataclass(frozen=True)
class AlertsConfig:
    """What alerts say and how often (screener.results.alerts); webhooks and email are the channels."""

    link_template: str = ""  # e.g. "https://viewer.example.org/study?h={study_hash}"
    include_phi: bool = False
    rate_limit_per_hour: int = 60  # per event type and destination; past it, alerts are suppressed
    dedup_seconds: float = 3600.0  # an event without a study is raised once per window and destination
    check_seconds: float = 60.0  # how often queue_stalled, disk_low, model_changed are checked
    queue_stalled_seconds: float = 900.0  # queued instances and nothing finished for this long
    disk_low_bytes: int = 4 * 1024**3  # spool free space under this raises disk_low (0: off)

    def validate(self) -> None:
        _require(self.rate_limit_per_hour >= 1, "rate_limit_per_hour", "must be 1 or more")
        _require(self.dedup_seconds >= 0, "dedup_seconds", "must be zero or more seconds")
        _require(1 <= self.check_seconds <= 86400, "check_seconds", "must be between 1 and 86400 seconds")
        _require(self.queue_stalled_seconds >= 10, "queue_stalled_seconds", "must be 10 seconds or more")
        _require(self.disk_low_bytes >= 0, "disk_low_bytes", "must be zero (off) or more bytes")
        phi_fields = ("{study_uid}", "{accession}")
        _require(
            self.include_phi or not any(f in self.link_template for f in phi_fields),
            "link_template",
            "uses {study_uid} or {accession}, which are PHI: use {study_hash}, or set include_phi = true",
        )


@dataclass(frozen=True)
class SchedulerConfig:
    enabled: bool = True
    retrain_cron: str = ""
    lease_reclaim_seconds: float = 60.0
    retention_interval_seconds: float = 3600.0
    orphan_sweep_seconds: float = 3600.0

    def validate(self) -> None:
        for name in ("lease_reclaim_seconds", "retention_interval_seconds", "orphan_sweep_seconds"):
            _require(1 <= getattr(self, name) <= 86400, name, "must be between 1 and 86400 seconds")
        if self.retrain_cron:
            _require(
                len(self.retrain_cron.split()) == 5,
                "retrain_cron",
                "must be a 5-field cron expression such as '30 2 * * *' (or empty: off)",
            )


@dataclass(frozen=True)
class TrainerConfig:
    """Settings of `trainer retrain` (the nightly job) and of the promotion gate."""

    base_data: str = ""
    eval_data: str = ""
    preset: Literal["quick", "paper"] = "quick"
    workdir: Path = Path("var/training")
    lock_file: Path = Path("var/training/retrain.lock")
    min_new_labels: int = 1
    epochs: int = 0
    samples_per_epoch: int = 0
    limit_per_class: int = 0
    pretrained_dir: Path | None = None
    gate_tolerance: float = 0.0
    keep_runs: int = 5

    def validate(self) -> None:
        _require(self.min_new_labels >= 0, "min_new_labels", "must be zero or more")
        _require(self.keep_runs >= 0, "keep_runs", "must be 0 (keep every run) or more")
        _require(self.epochs >= 0, "epochs", "must be 0 (the preset's) or more")
        _require(self.samples_per_epoch >= 0, "samples_per_epoch", "must be 0 (the preset's) or more")
        _require(self.limit_per_class >= 0, "limit_per_class", "must be 0 (all images) or more")
        _require(0.0 <= self.gate_tolerance <= 0.2, "gate_tolerance", "must be between 0 and 0.2")
        _require(
            self.pretrained_dir is None or self.pretrained_dir.is_dir(),
            "pretrained_dir",
            "folder does not exist (it should hold torchvision ImageNet weight files)",
        )


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"
    pynetdicom_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"


@dataclass(frozen=True)
class MemoryConfig:
    """The C heap of ``serve`` (screener/core/allocator.py): glibc malloc arenas and returning free pages."""

    malloc_arena_max: int = 2  # 0 = glibc's default (8 per core)
    trim_interval_seconds: float = 60.0  # 0 = never

    def validate(self) -> None:
        _require(0 <= self.malloc_arena_max <= 1024, "malloc_arena_max", "must be 0 (glibc default) to 1024")
        _require(
            self.trim_interval_seconds == 0 or 1 <= self.trim_interval_seconds <= 86400,
            "trim_interval_seconds",
            "must be 0 (never) or a number of seconds in [1, 86400]",
        )


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int = 9110

    def validate(self) -> None:
        _check_port("port", self.port, allow_zero=True)


@dataclass(frozen=True)
class ConsoleConfig:
    """The web console (screener/ops/console): dashboard, worklist and review, admin. Off by default."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8042
    tls: TLSConfig = field(default_factory=TLSConfig)
    session_hours: float = 8.0
    base_url: str = ""  # the address users type, e.g. https://screener.example.org:8042 (links, redirects)
    max_failed_logins: int = 5
    lockout_minutes: float = 15.0

    def validate(self) -> None:
        _check_port("port", self.port)
        _require(0 < self.session_hours <= 24 * 7, "session_hours", "must be more than 0 and at most 168")
        _require(self.max_failed_logins >= 1, "max_failed_logins", "must be 1 or more")
        _require(self.lockout_minutes > 0, "lockout_minutes", "must be more than 0")
        _require(
            not self.base_url or self.base_url.startswith(("http://", "https://")),
            "base_url",
            "must start with http:// or https://, or be empty",
        )


@dataclass(frozen=True)
class Config:
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    pacs: PacsConfig = field(default_factory=PacsConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    hl7: Hl7Config = field(default_factory=Hl7Config)
    webhooks: tuple[WebhookConfig, ...] = ()
    email: EmailConfig = field(default_factory=EmailConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    source: str = field(default="built-in defaults", compare=False)


def resolve_config_path(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """``--config PATH``, else ``$SCREENER_CONFIG``, else ``./config.toml`` if present, else None."""
    if explicit:
        return Path(explicit)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    local = Path("config.toml")
    return local if local.is_file() else None


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or only defaults when None), apply environment overrides, validate.

    Raises:
        ConfigError: naming the key, the value and its source (file or environment variable).
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    source = "built-in defaults"
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError("--config", str(path), "file not found; pass an existing config.toml") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", str(path), f"not valid TOML: {exc}") from exc
        source = str(path)
    sources: dict[str, str] = {}
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            _apply_override(raw, name, value, sources)
    config = typing.cast(Config, _build(Config, raw, "", sources, source))
    return dataclasses.replace(config, source=source)


def _parse_env_value(value: str) -> Any:
    """Read an override as a TOML value (``30``, ``true``, ``'["A","B"]'``), else as a plain string."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _apply_override(raw: dict[str, Any], name: str, value: str, sources: dict[str, str]) -> None:
    parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
    if len(parts) < 2 or any(p == "" for p in parts):
        raise ConfigError(
            name,
            value,
            "environment overrides are named SCREENER__<SECTION>__<KEY> (e.g. SCREENER__LISTENER__PORT)",
        )
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts), value, f"{part} is not a section", source=name)
        node = child
    node[parts[-1]] = _parse_env_value(value)
    sources[".".join(parts)] = f"environment {name}"


def _build(cls: type[Any], data: Any, prefix: str, sources: dict[str, str], file_source: str) -> Any:
    """Turn a TOML table into dataclass ``cls``, checking keys and types, then run its ``validate``."""

    def where(key: str) -> str:
        return sources.get(key, file_source)

    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", data, "must be a table", where(prefix))
    hints = typing.get_type_hints(cls)
    # A field whose TOML key is a Python keyword names its key in its metadata (EmailConfig.from_: "from").
    names = {f.metadata.get("key", f.name): f.name for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(dotted, value, f"unknown key; known keys here are: {known}", where(dotted))
        kwargs[names[key]] = _convert(hints[names[key]], value, dotted, sources, file_source)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in kwargs)
        raise ConfigError(prefix, data, f"missing required keys {missing}", where(prefix)) from exc
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except _Invalid as exc:
            key = next((k for k, n in names.items() if n == exc.key), exc.key)
            dotted = f"{prefix}.{key}" if prefix else key
            raise ConfigError(dotted, getattr(obj, exc.key), exc.problem, where(dotted)) from None
    return obj


def _convert(hint: Any, value: Any, key: str, sources: dict[str, str], file_source: str) -> Any:
    src = sources.get(key, file_source)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = next(a for a in args if a is not type(None))
        if value == "" and type(None) in args:
            return None
        return _convert(inner, value, key, sources, file_source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, value, f"must be one of {', '.join(map(repr, args))}", src)
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, value, "must be a list", src)
        return tuple(
            _convert(args[0], item, f"{key}[{i}]", sources, file_source) for i, item in enumerate(value)
        )
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type[Any], hint), value, key, sources, file_source)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false", src)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer", src)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, value, "must be a number", src)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string", src)
        return value
    if hint is Path:
        if not isinstance(value, str) or value == "":
            raise ConfigError(key, value, "must be a non-empty path string", src)
        return Path(value)
    raise ConfigError(key, value, f"unsupported setting type {hint!r}", src)


def as_dict(config: Config) -> dict[str, Any]:
    """The effective settings as plain data (paths as strings), for ``screener config``."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {
                # A webhook's HMAC key is not printed; a file path (password_file) is harmless.
                f.metadata.get("key", f.name): "<hidden>"
                if f.name == "secret"
                else plain(getattr(value, f.name))
                for f in dataclasses.fields(value)
            }
        return value

    data: dict[str, Any] = plain(config)
    data.pop("source", None)
    return data

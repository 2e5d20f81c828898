"""structlog set-up: JSON lines (console rendering on a TTY); PHI never logged.

``screener serve`` logs to stdout (its log lines are its output); every other command of ``screener`` and
``trainer`` passes ``sys.stderr``, so what it prints on stdout (``--json``, ``--format csv|json``) is
nothing but its result.

Patient names, IDs, birth dates and accession numbers must never reach a log line. We never pass
them to a logger, log UIDs only as short hashes (:func:`uid_hash`), silence pynetdicom's dataset and
identifier dumps, and drop any event key that names a PHI attribute as a last line of defence.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

from screener.core.config import LoggingConfig

# Event keys that would carry PHI if anyone ever passed them; dropped before rendering.
_PHI_KEYS = frozenset(
    {
        "patient_name",
        "patientname",
        "patient_id",
        "patientid",
        "patient_birth_date",
        "patientbirthdate",
        "birth_date",
        "accession_number",
        "accessionnumber",
        "other_patient_ids",
    }
)


def uid_hash(uid: str | None) -> str | None:
    """A short, stable, non-reversible stand-in for a DICOM UID in logs (12 hex digits of sha256)."""
    if uid is None:
        return None
    return hashlib.sha256(uid.encode("utf-8")).hexdigest()[:12]


def _drop_phi(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key in [k for k in event_dict if k.lower() in _PHI_KEYS]:
        del event_dict[key]
    return event_dict


def configure_logging(config: LoggingConfig, stream: TextIO | None = None) -> None:
    """Route structlog and the standard library (pynetdicom, SQLAlchemy, Alembic) to one handler on
    ``stream`` (default stdout: the daemon's)."""
    out = stream if stream is not None else sys.stdout
    use_console = config.format == "console" or (config.format == "auto" and out.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_phi,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
        foreign_pre_chain=shared,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(config.level)
    from screener.core.pynetdicom_compat import quiet_logging

    quiet_logging(config.pynetdicom_level)  # no data set or identifier dumps (PHI)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # routine job runs; failures are logged by us
    # highdicom logs every SOP Instance UID it writes at INFO; UIDs appear in our logs only as short hashes.
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)

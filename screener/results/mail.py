"""Email alerts over SMTP (``[email]``): one message per alert to every ``email.to`` address.

STARTTLS when ``email.starttls`` (the server's certificate is verified); login with ``username`` and the
password read from ``password_file`` when a username is set. The Message-ID is derived from the alert's
idempotency key, so a retry after a lost answer carries the same ID and mail systems can drop the duplicate.

A 4xx answer, a refused or dropped connection and a timeout are retried by the outbox; a 5xx answer
(authentication refused, every recipient refused, message refused) makes the delivery dead.
"""

from __future__ import annotations

import hashlib
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate

from screener.core.config import EmailConfig


@dataclass(frozen=True)
class MailResult:
    delivered: bool
    retryable: bool
    error: str | None


def message_id(key: str, sender: str) -> str:
    domain = sender.rpartition("@")[2] or "cxr-screener.invalid"
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}@{domain}>"


def build_message(settings: EmailConfig, subject: str, body: str, key: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = settings.from_
    msg["To"] = ", ".join(settings.to)
    msg["Subject"] = subject
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = message_id(key, settings.from_)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies to an alert
    msg.set_content(body)
    return msg


def _code_of(exc: smtplib.SMTPException) -> int | None:
    code = getattr(exc, "smtp_code", None)
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [c for c, _ in exc.recipients.values()]
        return min(codes) if codes else None
    return int(code) if isinstance(code, int) else None


def send(settings: EmailConfig, subject: str, body: str, key: str) -> MailResult:
    """Send one alert email; what the server's answer means for the delivery."""
    msg = build_message(settings, subject, body, key)
    try:
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.timeout_seconds) as smtp:
            smtp.ehlo()
            if settings.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if settings.username:
                assert settings.password_file is not None  # EmailConfig.validate
                password = settings.password_file.read_text(encoding="utf-8").strip()
                smtp.login(settings.username, password)
            refused = smtp.send_message(msg)
    except smtplib.SMTPException as exc:
        code = _code_of(exc)
        retryable = code is None or 400 <= code < 500
        where = f"SMTP {code}" if code is not None else type(exc).__name__
        return MailResult(False, retryable, f"{settings.smtp_host}:{settings.smtp_port} refused: {where}")
    except (OSError, ssl.SSLError) as exc:
        return MailResult(
            False, True, f"cannot reach {settings.smtp_host}:{settings.smtp_port}: {type(exc).__name__}"
        )
    if refused:
        # Some recipients took it: the alert reached people; say who did not (addresses are not PHI).
        return MailResult(True, False, f"refused by the server for {sorted(refused)}")
    return MailResult(True, False, None)

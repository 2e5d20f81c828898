"""Signed-in browsers: a random token in an HttpOnly cookie, only its sha256 in ``console_sessions``, and a
per-session CSRF token that every form carries back (synchroniser token pattern, OWASP CSRF cheat sheet).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from screener.core.db.models import ConsoleSession, ConsoleUser, utcnow

COOKIE_NAME = "screener_console"
TOKEN_BYTES = 32


@dataclass(frozen=True)
class SignedIn:
    """The account behind a request (a value: safe to use after the database session closed)."""

    session_id: int
    user_id: int
    name: str
    role: str
    csrf_token: str
    expires_at: datetime


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def start_session(
    session: Session, user: ConsoleUser, client: str | None, hours: float
) -> tuple[str, SignedIn]:
    """A new session for ``user``: returns the cookie token (shown once, never stored) and its value."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    row = ConsoleSession(
        token_sha256=_digest(token),
        user_id=user.id,
        csrf_token=secrets.token_urlsafe(TOKEN_BYTES),
        client=(client or "")[:64] or None,
        expires_at=utcnow() + timedelta(hours=hours),
    )
    session.add(row)
    session.flush()
    return token, SignedIn(row.id, user.id, user.name, user.role, row.csrf_token, row.expires_at)


def find_session(session: Session, token: str | None) -> SignedIn | None:
    """The live session of cookie ``token``, or None when it is unknown, expired or its account disabled."""
    if not token or len(token) > 128:
        return None
    found = session.execute(
        select(ConsoleSession, ConsoleUser)
        .join(ConsoleUser, ConsoleUser.id == ConsoleSession.user_id)
        .where(ConsoleSession.token_sha256 == _digest(token))
    ).first()
    if found is None:
        return None
    row, user = found
    expires = row.expires_at
    if expires <= utcnow() or user.disabled:
        return None
    return SignedIn(row.id, user.id, user.name, user.role, row.csrf_token, expires)


def end_session(session: Session, session_id: int) -> None:
    session.execute(delete(ConsoleSession).where(ConsoleSession.id == session_id))


def purge_expired(session: Session) -> int:
    """Delete expired sessions; returns how many."""
    result = session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at <= utcnow()))
    return int(getattr(result, "rowcount", 0) or 0)


def csrf_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a form's CSRF token with the session's."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())

"""Console accounts: roles, argon2 password hashes, lockout after repeated wrong passwords.

Used by ``screener users ...`` and by the console's sign-in. Messages name the account (a staff login, not
patient data) but never echo a password.
"""

from __future__ import annotations

import contextlib
import enum
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select
from sqlalchemy.orm import Session

from screener.core.db.models import ConsoleSession, ConsoleUser, utcnow
from screener.core.errors import ScreenerError


class Role(enum.StrEnum):
    """viewer: the dashboard (no PHI); reviewer: also studies (PHI) and labels; admin: also deliveries,
    models and users."""

    VIEWER = "viewer"
    REVIEWER = "reviewer"
    ADMIN = "admin"


ROLE_RANK: dict[Role, int] = {Role.VIEWER: 0, Role.REVIEWER: 1, Role.ADMIN: 2}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024

_HASHER = PasswordHasher()  # argon2id with the library's (RFC 9106 low-memory) parameters
# Compared against when the account does not exist, so that a wrong name costs as long as a wrong password.
_DUMMY_HASH = _HASHER.hash("not a password of any account")


class AccountError(ScreenerError):
    """A user command or sign-in was refused: unknown or duplicate name, weak password, bad role."""


def allows(role: str, needed: Role) -> bool:
    """Whether an account of ``role`` may do what needs ``needed``."""
    try:
        return ROLE_RANK[Role(role)] >= ROLE_RANK[needed]
    except ValueError:
        return False


def check_name(name: str) -> str:
    """``name`` if it is a valid account name, else AccountError saying what is allowed."""
    if not NAME_RE.match(name):
        raise AccountError(
            "an account name is 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
        )
    return name


def check_password(password: str) -> str:
    """``password`` if it is acceptable (length only: NIST SP 800-63B), else AccountError."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"the password is too short: use at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AccountError(f"the password is longer than {MAX_PASSWORD_LENGTH} characters")
    return password


def _role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise AccountError(f"role {value!r} is not one of {', '.join(r.value for r in Role)}") from None


def _get(session: Session, name: str) -> ConsoleUser:
    user = session.scalar(select(ConsoleUser).where(ConsoleUser.name == name))
    if user is None:
        raise AccountError(f"no account named {name!r}: `screener users list` shows them")
    return user


def add_user(session: Session, name: str, role: str, password: str) -> ConsoleUser:
    """Create an account. Raises AccountError for a taken or invalid name, a bad role, a weak password."""
    check_name(name)
    chosen = _role(role)
    check_password(password)
    if session.scalar(select(ConsoleUser.id).where(ConsoleUser.name == name)) is not None:
        raise AccountError(f"an account named {name!r} exists: `screener users passwd {name}` changes it")
    user = ConsoleUser(
        name=name, role=chosen.value, password_hash=_HASHER.hash(password), disabled=False, failed_logins=0
    )
    session.add(user)
    session.flush()
    return user


def set_password(session: Session, name: str, password: str) -> ConsoleUser:
    """New password; unlocks the account and signs out its sessions. Raises AccountError."""
    user = _get(session, name)
    user.password_hash = _HASHER.hash(check_password(password))
    user.password_changed_at = utcnow()
    user.failed_logins = 0
    user.locked_until = None
    _end_sessions(session, user)
    return user


def disable_user(session: Session, name: str) -> ConsoleUser:
    """Disable an account and end its sessions (rows are kept: audit rows name it). Raises AccountError."""
    user = _get(session, name)
    user.disabled = True
    _end_sessions(session, user)
    return user


def enable_user(session: Session, name: str) -> ConsoleUser:
    """Enable a disabled account and clear its lockout. Raises AccountError."""
    user = _get(session, name)
    user.disabled = False
    user.failed_logins = 0
    user.locked_until = None
    return user


def set_role(session: Session, name: str, role: str) -> ConsoleUser:
    """Change an account's role and end its sessions (it signs in again under the new role)."""
    user = _get(session, name)
    user.role = _role(role).value
    _end_sessions(session, user)
    return user


def list_users(session: Session) -> list[ConsoleUser]:
    return list(session.scalars(select(ConsoleUser).order_by(ConsoleUser.name)))


def _end_sessions(session: Session, user: ConsoleUser) -> None:
    for row in session.scalars(select(ConsoleSession).where(ConsoleSession.user_id == user.id)):
        session.delete(row)


class LoginOutcome(enum.StrEnum):
    OK = "ok"
    WRONG = "wrong"  # unknown name or wrong password: the page says the same for both
    LOCKED = "locked"
    DISABLED = "disabled"


@dataclass(frozen=True)
class Login:
    outcome: LoginOutcome
    user: ConsoleUser | None
    locked_until: datetime | None = None


def authenticate(
    session: Session, name: str, password: str, *, max_failures: int, lockout: timedelta
) -> Login:
    """Check ``password`` for account ``name``; count failures and lock the account for ``lockout`` after
    ``max_failures`` wrong passwords in a row (a locked account is refused even with the right password).
    Changes are made in ``session``; the caller commits."""
    user = (
        session.scalar(select(ConsoleUser).where(ConsoleUser.name == name)) if NAME_RE.match(name) else None
    )
    if user is None:
        with contextlib.suppress(VerificationError):
            _HASHER.verify(_DUMMY_HASH, password)
        return Login(LoginOutcome.WRONG, None)
    now = utcnow()
    if user.locked_until is not None and user.locked_until > now:
        return Login(LoginOutcome.LOCKED, user, user.locked_until)
    try:
        _HASHER.verify(user.password_hash, password)
    except (VerifyMismatchError, InvalidHashError, VerificationError):
        user.failed_logins += 1
        if user.failed_logins >= max_failures:
            user.locked_until = now + lockout
            user.failed_logins = 0
            return Login(LoginOutcome.LOCKED, user, user.locked_until)
        return Login(LoginOutcome.WRONG, user)
    if user.disabled:
        return Login(LoginOutcome.DISABLED, user)
    user.failed_logins = 0
    user.locked_until = None
    user.last_login_at = now
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = _HASHER.hash(password)
    return Login(LoginOutcome.OK, user)

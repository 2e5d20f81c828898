"""Column types shared by the models and the reporting queries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time, always UTC-aware in Python, whatever the database returns.

    PostgreSQL stores ``timestamptz`` and returns it in the session's time zone; SQLite stores text without
    an offset and returns naive values. Both come back as aware UTC datetimes. Bound values are converted to
    UTC first (so SQLite's text compares correctly); a naive value is taken to be UTC already, as
    ``datetime.now(UTC).replace(tzinfo=None)`` would be.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # a raw SQLite value read through a view or a text() query
            value = datetime.fromisoformat(value)
        if not isinstance(value, datetime):
            raise TypeError(f"a timestamp column returned {type(value).__name__}, not a datetime")
        return as_utc(value)


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime; naive values are taken to be UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

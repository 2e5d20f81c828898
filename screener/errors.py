"""One small exception tree. Every message names the offending value and how to recover."""

from __future__ import annotations


class ScreenerError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(ScreenerError):
    """A setting is unknown, of the wrong type, or impossible. Raised at start-up only."""

    def __init__(self, key: str, value: object, problem: str, source: str = "") -> None:
        where = f" (from {source})" if source else ""
        super().__init__(f"config {key} = {value!r}{where}: {problem}")
        self.key = key
        self.value = value


class SpoolError(ScreenerError):
    """The spool could not durably store or read a file."""


class SpoolFullError(SpoolError):
    """Free space on the spool filesystem is below ``storage.min_free_bytes``."""


class DatabaseUnavailableError(ScreenerError):
    """The database could not be reached or refused the write."""


class DatabaseNotMigratedError(ScreenerError):
    """The database schema is not at the revision this code expects."""

    def __init__(self, current: str | None, head: str) -> None:
        super().__init__(
            f"database is at revision {current or '<empty>'} but this version of screener needs {head}: "
            "run `screener db upgrade` (or set database.auto_migrate = true)"
        )
        self.current = current
        self.head = head

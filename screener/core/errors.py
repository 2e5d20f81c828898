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


EXIT_STORE_MISMATCH = 4  # `screener serve`: the spool and the database are not one store


class StoreIdentityError(ScreenerError):
    """The spool and the database are not one store (a lost, new, empty or other database, or another spool).

    ``screener serve`` exits with :data:`EXIT_STORE_MISMATCH` on it, before it receives or deletes anything.
    """


class DatabaseLostError(ScreenerError):
    """While serving, the database file went away, was replaced, or now names another store."""


class ImagingError(ScreenerError):
    """An image could not be turned into model input."""


class ImageDecodeError(ImagingError):
    """Pixel data could not be decoded; the message names the transfer syntax and the reason."""

    def __init__(self, transfer_syntax: str, reason: str) -> None:
        super().__init__(f"cannot decode pixel data in transfer syntax {transfer_syntax}: {reason}")
        self.transfer_syntax = transfer_syntax
        self.reason = reason


class ImageTooLargeError(ImagingError):
    """Rows x Columns x Frames exceeds the configured limit; refused before any decoding."""


class ModelError(ScreenerError):
    """A model directory is missing, malformed, or fails its integrity check."""


class ModelIntegrityError(ModelError):
    """A model file's sha256 does not match its card: the file was changed or corrupted."""


class EngineUnavailableError(ScreenerError):
    """The requested inference backend cannot run on this host (no GPU, package missing)."""


class RemoteEngineError(EngineUnavailableError):
    """A remote inference server (Triton) is unreachable, timed out, or does not serve the verified model.

    Transient from the worker's view: the batch is released (nothing is marked failed), the worker backs
    off, reports it in ``/healthz`` and metrics, and retries by itself.
    """


class ServedModelMismatchError(ModelError):
    """The inference server serves another model than the registered one: the worker refuses to use it."""


class DataError(ScreenerError):
    """A training or evaluation dataset is missing, malformed, or has a bad label; the message says where."""


class TrainingError(ScreenerError):
    """Training, fusion, evaluation or promotion could not complete."""


class DatabaseNotMigratedError(ScreenerError):
    """The database schema is not at the revision this code expects."""

    def __init__(self, current: str | None, head: str) -> None:
        super().__init__(
            f"database is at revision {current or '<empty>'} but this version of screener needs {head}: "
            "run `screener db upgrade` (or set database.auto_migrate = true)"
        )
        self.current = current
        self.head = head


class IncompatibleLibraryError(ScreenerError):
    """An installed library lacks an internal we rely on (screener/core/pynetdicom_compat.py). At start-up."""

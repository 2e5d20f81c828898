"""Back-off of a worker whose inference engine is remote (Triton) and just failed.

A remote fault (:class:`~screener.core.errors.RemoteEngineError`: the server unreachable, the model not
loaded, a request timed out) is not the instances' fault: the worker releases the batch (nothing is
marked failed, the attempt does not count), waits ``retry_seconds``, doubling up to
``max_retry_seconds`` while faults continue, and resumes on the first batch that succeeds. While it
waits, the ``engine`` check of ``/healthz`` fails with the fault's message and
``screener_engine_available`` is 0.
"""

from __future__ import annotations

import threading
import time

from screener.core.errors import RemoteEngineError
from screener.core.logs import get_logger
from screener.core.metrics import Metrics

log = get_logger("screener.worker")


class EngineBackoff:
    """Consecutive remote faults and the wait they call for; thread-safe (read by ``/healthz``)."""

    def __init__(self, retry_seconds: float, max_retry_seconds: float, metrics: Metrics) -> None:
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.metrics = metrics
        self._lock = threading.Lock()
        self._faults = 0
        self._error: str | None = None
        self._since: float | None = None

    @property
    def faults(self) -> int:
        """Faults since the engine last answered."""
        with self._lock:
            return self._faults

    def failed(self, exc: RemoteEngineError, *, backend: str, released: int) -> float:
        """Record a fault (``released`` instances went back to the queue); return the seconds to wait."""
        with self._lock:
            self._faults += 1
            self._error = str(exc)
            if self._since is None:
                self._since = time.monotonic()
            delay = float(min(self.max_retry_seconds, self.retry_seconds * 2.0 ** (self._faults - 1)))
            faults = self._faults
        self.metrics.engine_fault(backend)
        log.warning(
            "engine.unavailable",
            backend=backend,
            error=str(exc),
            released=released,
            faults=faults,
            retry_in_s=round(delay, 2),
        )
        return delay

    def succeeded(self, backend: str) -> None:
        """The engine answered: clear the fault state (logged once when it had failed)."""
        with self._lock:
            if self._faults == 0:
                return
            down_s = time.monotonic() - (self._since or time.monotonic())
            faults = self._faults
            self._faults, self._error, self._since = 0, None, None
        self.metrics.engine_recovered(backend)
        log.info("engine.recovered", backend=backend, faults=faults, down_s=round(down_s, 1))

    def check(self) -> bool:
        """The ``/healthz`` check: True, or raise :class:`RemoteEngineError` with the last fault."""
        with self._lock:
            error, faults = self._error, self._faults
        if error is not None:
            raise RemoteEngineError(f"{faults} fault(s) in a row, backing off: {error}")
        return True

"""Prometheus metrics and ``/healthz`` for ``screener serve``.

Nothing is created at import time: ``serve`` builds one :class:`Metrics` (its own ``CollectorRegistry``)
and one :class:`Health`, passes the first to the listener, worker, sender and scheduler, registers a
liveness check per running part on the second, then calls :func:`start_metrics`.

Labels are only ever outcomes, statuses, backends, model versions, job names and destination names
(``AE@host:port``): never a UID, a patient name or ID, an accession number or a date (DESIGN: PHI stays
out of logs and metrics). Figures that live in the database (queue depth, deliveries by status) and the
spool's free space are read at scrape time, each database read under a short deadline, so a scrape stays
cheap and answers even while the database is down.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select

from screener.core.config import MetricsConfig
from screener.core.db.models import Delivery, DeliveryStatus, Instance, InstanceStatus, StudyResult
from screener.core.db.session import bound_statements, ping
from screener.core.errors import ScreenerError
from screener.core.logs import get_logger

log = get_logger("screener.metrics")

DATABASE_TIMEOUT_SECONDS = 2.0  # a health check or scrape-time query slower than this counts as failing
CHECK_TIMEOUT_SECONDS = 2.0

_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PROCESSED_STATUSES = ("classified", "skipped", "failed", "lost_lease")
_DELIVERY_OUTCOMES = ("sent", "failed", "dead")


class MetricsError(ScreenerError):
    """The metrics/health HTTP endpoint could not be started."""


# --- bounded calls ------------------------------------------------------------------------------------


class _Probe:
    """Runs a callable in a daemon thread and waits for it at most ``timeout`` seconds.

    Single-flight: while an earlier call is still stuck (a hung connection), no second thread is started;
    the caller waits on the stuck one and is told it timed out. So a dead peer never piles up threads.
    """

    def __init__(self, name: str, call: Callable[[], Any], timeout: float) -> None:
        self.name = name
        self.call = call
        self.timeout = timeout
        self._lock = threading.Lock()
        self._future: Future[Any] | None = None

    def submit(self) -> Future[Any]:
        with self._lock:
            if self._future is None or self._future.done():
                future: Future[Any] = Future()
                self._future = future
                threading.Thread(
                    target=self._run, args=(future,), name=f"probe-{self.name}", daemon=True
                ).start()
            return self._future

    def _run(self, future: Future[Any]) -> None:
        try:
            future.set_result(self.call())
        except Exception as exc:  # noqa: BLE001 - handed to the waiter, who reports it as the failure
            future.set_exception(exc)

    def run(self) -> Any:
        """The call's result; raises what it raised, or ``TimeoutError`` after ``timeout`` seconds."""
        try:
            return self.submit().result(self.timeout)
        except FutureTimeout:
            raise TimeoutError(f"{self.name} did not answer within {self.timeout:g}s") from None


# --- health -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    # An exception type, "not alive", or the message of one of our errors (paths and settings, never PHI).
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok} if self.error is None else {"ok": self.ok, "error": self.error}


@dataclass(frozen=True)
class HealthReport:
    checks: Mapping[str, CheckResult]

    @property
    def failing(self) -> list[str]:
        return sorted(name for name, result in self.checks.items() if not result.ok)

    @property
    def healthy(self) -> bool:
        return not self.failing

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.healthy else "unhealthy",
            "failing": self.failing,
            "checks": {name: result.as_dict() for name, result in sorted(self.checks.items())},
        }


class Health:
    """Liveness checks by part name; parts not running in this role are simply never registered.

    A check returns True (alive), False (not alive) or raises (not alive, the exception type is reported).
    Checks run in parallel, each under its own deadline.
    """

    def __init__(self) -> None:
        self._probes: dict[str, _Probe] = {}
        self._lock = threading.Lock()

    def register(self, name: str, check: Callable[[], bool], timeout: float = CHECK_TIMEOUT_SECONDS) -> None:
        """Add (or replace) the check of part ``name``."""
        with self._lock:
            self._probes[name] = _Probe(name, check, timeout)

    def register_database(
        self,
        engine: Engine,
        timeout: float = DATABASE_TIMEOUT_SECONDS,
        guard: Callable[[], bool] | None = None,
    ) -> None:
        """Add the ``database`` check: ``guard`` (raises when the database is no longer this store's, see
        :class:`screener.core.identity.DatabaseGuard`), then ``SELECT 1`` on ``engine``, within
        ``timeout``."""
        self.register("database", lambda: (guard is None or guard()) and _select_one(engine), timeout)

    @property
    def parts(self) -> list[str]:
        with self._lock:
            return sorted(self._probes)

    def check(self) -> HealthReport:
        """Run every check (in parallel, each bounded by its timeout) and collect the results."""
        with self._lock:
            probes = list(self._probes.values())
        futures = [(probe, probe.submit()) for probe in probes]
        started = time.monotonic()
        results: dict[str, CheckResult] = {}
        for probe, future in futures:
            left = max(0.0, probe.timeout - (time.monotonic() - started))
            try:
                value = future.result(left)
            except FutureTimeout:
                results[probe.name] = CheckResult(False, f"no answer within {probe.timeout:g}s")
            except ScreenerError as exc:  # ours name the value and the fix: the reason itself
                results[probe.name] = CheckResult(False, str(exc))
            except Exception as exc:  # noqa: BLE001 - any failure of a check means that part is not healthy
                results[probe.name] = CheckResult(False, type(exc).__name__)
            else:
                results[probe.name] = CheckResult(True) if value else CheckResult(False, "not alive")
        return HealthReport(results)


def _select_one(engine: Engine) -> bool:
    return ping(engine)


# --- metrics ------------------------------------------------------------------------------------------


VERDICT_WINDOW = timedelta(hours=24)


class _DatabaseCollector(Collector):
    """Queue depth, deliveries by status, and the last 24 hours' study verdicts (whatever classes the
    serving models' cards name, ``indeterminate`` and ``not_analysed``), read from the database at scrape
    time (index-only counts, and an index range on ``study_results.created_at``)."""

    def __init__(self, engine: Engine, timeout: float) -> None:
        self._probe = _Probe("metrics-database", lambda: self._read(engine), timeout)

    @staticmethod
    def _read(engine: Engine) -> tuple[int, dict[str, int], dict[str, int]]:
        with engine.connect() as conn, conn.begin():
            bound_statements(conn, DATABASE_TIMEOUT_SECONDS)
            depth = conn.execute(
                select(func.count())
                .select_from(Instance)
                .where(Instance.status.in_([InstanceStatus.QUEUED, InstanceStatus.PROCESSING]))
            ).scalar_one()
            rows = conn.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all()
            since = datetime.now(UTC) - VERDICT_WINDOW
            if engine.dialect.name == "sqlite":
                since = since.replace(tzinfo=None)  # SQLite keeps UTC timestamps as naive text
            verdicts = conn.execute(
                select(StudyResult.verdict, func.count())
                .where(StudyResult.created_at >= since)
                .group_by(StudyResult.verdict)
            ).all()
        by_status = {s.value: 0 for s in DeliveryStatus}
        for status, count in rows:
            by_status[str(getattr(status, "value", status))] = int(count)
        return int(depth), by_status, {str(verdict): int(count) for verdict, count in verdicts}

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "screener_queue_depth", "Instances waiting for or under classification (queued + processing)."
        )
        deliveries = GaugeMetricFamily(
            "screener_deliveries", "Result deliveries in the outbox, by status.", labels=["status"]
        )
        verdicts = GaugeMetricFamily(
            "screener_study_verdicts_24h",
            "Study results of the last 24 hours by verdict: a class of the model card, indeterminate or "
            "not_analysed.",
            labels=["verdict"],
        )
        return depth, deliveries, verdicts

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return self._families()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            depth_value, by_status, by_verdict = self._probe.run()
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even when the database does not
            # Absent series, not zeros: a dashboard must not show an empty queue while the database is down.
            log.warning("metrics.database_unavailable", error=type(exc).__name__)
            return []
        depth, deliveries, verdicts = self._families()
        depth.add_metric([], depth_value)
        for status, count in sorted(by_status.items()):
            deliveries.add_metric([status], count)
        for verdict, count in sorted(by_verdict.items()):
            verdicts.add_metric([verdict], count)
        return [depth, deliveries, verdicts]


class _SpoolCollector(Collector):
    """Free bytes of the spool's filesystem, at scrape time."""

    def __init__(self, spool_dir: Path) -> None:
        self._dir = spool_dir

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "screener_spool_free_bytes", "Bytes available to the screener on the spool's filesystem."
        )

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            st = os.statvfs(self._dir)
        except OSError as exc:
            log.warning("metrics.spool_unreadable", error=type(exc).__name__)
            return []
        family = self._family()
        family.add_metric([], st.f_bavail * st.f_frsize)
        return [family]


class _StoreCollector(Collector):
    """1 once the database is no longer this store's index (see ``DatabaseGuard``), else 0, at scrape time.

    Read from the guard, not from the database: it answers when the database is gone, so an alert rule
    outside the process (``screener_database_lost == 1``) fires even where no alert can be queued in it.
    """

    def __init__(self, problem: Callable[[], str | None]) -> None:
        self._problem = problem

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "screener_database_lost",
            "1 once the database file was deleted, replaced or made read-only, or carries another store's "
            "identity (the listener answers 0xA700; /healthz names the reason), else 0.",
        )

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = self._family()
        family.add_metric([], 0 if self._problem() is None else 1)
        return [family]


class Metrics:
    """Every metric of one ``screener serve`` process, in a registry of its own.

    ``Metrics()`` without arguments is a valid, unexposed sink: what the listener, worker and sender use
    when nobody passed them one. With ``engine`` and ``spool_dir`` the scrape also reports queue depth,
    deliveries by status and spool free space.
    """

    def __init__(
        self,
        engine: Engine | None = None,
        spool_dir: Path | None = None,
        *,
        database_timeout: float = DATABASE_TIMEOUT_SECONDS,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._model_lock = threading.Lock()
        r = self.registry
        self.instances_received = Counter(
            "screener_instances_received",
            "C-STORE requests answered by the listener, by ingest outcome.",
            ["outcome"],
            registry=r,
        )
        self.instances_processed = Counter(
            "screener_instances_processed",
            "Instances the worker finished, by final status (lost_lease: another worker took it over).",
            ["status"],
            registry=r,
        )
        self.batch_size = Histogram(
            "screener_batch_size",
            "Instances per worker batch (all claimed, including skipped and failed ones).",
            buckets=_BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_latency = Histogram(
            "screener_batch_latency_seconds",
            "Wall time of a worker batch, from claim to committed results.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_latency = Histogram(
            "screener_inference_batch_seconds",
            "Time the inference engine took for one batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.images_per_second = Gauge(
            "screener_inference_images_per_second",
            "Inference throughput of the last batch that reached the engine.",
            registry=r,
        )
        self.delivery_attempts = Counter(
            "screener_delivery_attempts",
            "Attempts to deliver a result to a PACS destination (AE@host:port), by outcome.",
            ["destination", "outcome"],
            registry=r,
        )
        self.model = Gauge(
            "screener_model_info",
            "1 for the model version this worker serves and its inference backend (absent before a load).",
            ["version", "backend"],
            registry=r,
        )
        self.job_failures = Counter(
            "screener_job_failures", "Scheduled jobs that raised, by job.", ["job"], registry=r
        )
        self.engine_faults = Counter(
            "screener_engine_faults",
            "Batches released because a remote inference engine (Triton) failed, by backend.",
            ["backend"],
            registry=r,
        )
        self.engine_available = Gauge(
            "screener_engine_available",
            "0 while the worker backs off after a remote inference engine fault, else 1.",
            registry=r,
        )
        self.engine_available.set(1)
        for status in _PROCESSED_STATUSES:
            self.instances_processed.labels(status)
        if engine is not None:
            r.register(_DatabaseCollector(engine, database_timeout))
        if spool_dir is not None:
            r.register(_SpoolCollector(spool_dir))

    # --- hooks (cheap; called from the listener, worker, sender and scheduler threads) ---

    def declare_ingest_outcomes(self, outcomes: Iterable[str]) -> None:
        """Create one series per ingest outcome from the start, so rate() sees the first increment."""
        for outcome in outcomes:
            self.instances_received.labels(str(outcome))

    def instance_received(self, outcome: str) -> None:
        """One C-STORE answered with ``outcome`` (an :class:`~screener.ingest.receive.IngestOutcome`
        value)."""
        self.instances_received.labels(str(outcome)).inc()

    def batch_done(
        self,
        *,
        size: int,
        inferred: int,
        infer_seconds: float,
        wall_seconds: float,
        counts: Mapping[str, int],
    ) -> None:
        """One worker batch persisted: ``counts`` maps final status -> instances."""
        self.batch_size.observe(size)
        self.batch_latency.observe(wall_seconds)
        for status, count in counts.items():
            if count:
                self.instances_processed.labels(status).inc(count)
        if inferred:
            self.inference_latency.observe(infer_seconds)
            if infer_seconds > 0:
                self.images_per_second.set(inferred / infer_seconds)

    def model_loaded(self, version: str, backend: str) -> None:
        """The worker now serves ``version`` on ``backend``."""
        with self._model_lock:  # one series at a time: the old version disappears
            self.model.clear()
            self.model.labels(version, backend).set(1)

    def engine_fault(self, backend: str) -> None:
        """A batch went back to the queue because the remote engine on ``backend`` failed."""
        self.engine_faults.labels(backend).inc()
        self.engine_available.set(0)

    def engine_recovered(self, backend: str) -> None:
        """The remote engine on ``backend`` answered again."""
        self.engine_faults.labels(backend)
        self.engine_available.set(1)

    def watch_store(self, problem: Callable[[], str | None]) -> None:
        """Export ``screener_database_lost`` from ``problem`` (``DatabaseGuard.problem``: None while fine)."""
        self.registry.register(_StoreCollector(problem))

    def delivery_attempt(self, destination: str, outcome: str) -> None:
        """One delivery attempt ended ``outcome`` (sent, failed, dead) for ``destination`` (AE@host:port)."""
        self.delivery_attempts.labels(destination, outcome).inc()

    def job_failed(self, job: str) -> None:
        """Scheduled job ``job`` raised (pass as ``build_scheduler(on_failure=...)``)."""
        self.job_failures.labels(job).inc()

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


# --- HTTP ---------------------------------------------------------------------------------------------


def _handler(metrics: Metrics, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "screener"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(HTTPStatus.OK, CONTENT_TYPE_LATEST, metrics.exposition())
            elif path == "/healthz":
                report = health.check()
                status = HTTPStatus.OK if report.healthy else HTTPStatus.SERVICE_UNAVAILABLE
                self._answer(status, "application/json", json.dumps(report.as_dict()).encode())
            else:
                body = json.dumps({"error": "not found", "paths": ["/metrics", "/healthz"]}).encode()
                self._answer(HTTPStatus.NOT_FOUND, "application/json", body)

        def _answer(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics.request", request=self.requestline, peer=self.client_address[0])

    return Handler


class MetricsServer:
    """The ``/metrics`` + ``/healthz`` endpoint; a disabled one (port 0) does nothing."""

    def __init__(self, httpd: ThreadingHTTPServer | None) -> None:
        self._httpd = httpd
        self._thread: threading.Thread | None = None
        if httpd is not None:
            self._thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
            self._thread.start()

    @property
    def port(self) -> int | None:
        """The bound TCP port, or None when disabled."""
        return None if self._httpd is None else int(self._httpd.server_address[1])

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.info("metrics.stopped")


def start_metrics(settings: MetricsConfig, health: Health, metrics: Metrics | None = None) -> MetricsServer:
    """Serve ``/metrics`` (from ``metrics``) and ``/healthz`` (from ``health``) on ``metrics.host:port``.

    ``metrics.port = 0`` disables the endpoint (the returned server's ``stop`` does nothing).

    Raises:
        MetricsError: the address cannot be bound (port in use, host not local).
    """
    mc = settings
    if mc.port == 0:
        log.info("metrics.disabled", hint="set metrics.port to serve /metrics and /healthz")
        return MetricsServer(None)
    try:
        httpd = ThreadingHTTPServer((mc.host, mc.port), _handler(metrics or Metrics(), health))
    except OSError as exc:
        raise MetricsError(
            f"cannot serve metrics on {mc.host}:{mc.port}: {exc.strerror or exc}; "
            "set metrics.port to a free port (or 0 to disable /metrics and /healthz)"
        ) from exc
    httpd.daemon_threads = True
    server = MetricsServer(httpd)
    log.info("metrics.started", host=mc.host, port=server.port, checks=health.parts)
    return server

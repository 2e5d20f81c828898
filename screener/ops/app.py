"""Wiring for ``screener serve``: database, spool, and the roles (listener, worker, settler, sender).

``--role all`` (the default) runs everything in one process. Past one host, each role runs on its own
against one PostgreSQL and a shared spool (docs/scaling.md). Runs until SIGTERM/SIGINT, then drains.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from screener.core.allocator import HeapTrimmer, limit_arenas
from screener.core.config import Config
from screener.core.db.migrate import ensure_at_head
from screener.core.db.session import make_engine, make_session_factory
from screener.core.errors import DatabaseUnavailableError
from screener.core.identity import DatabaseGuard, bind_store
from screener.core.logs import get_logger
from screener.core.metrics import Health, Metrics, start_metrics
from screener.core.spool import Spool
from screener.inference.worker import Worker
from screener.ingest.listener import CHEST_SOP_CLASSES, Listener
from screener.ingest.receive import Ingest, reconcile_spool
from screener.ops.scheduler import build_scheduler
from screener.results.alerts import AlertRoutes
from screener.results.channels import ResultChannels
from screener.results.sender import Sender
from screener.results.settlement import Settler
from screener.results.watch import AlertWatch

if TYPE_CHECKING:
    from screener.ops.console.server import ConsoleServer

log = get_logger("screener.serve")


ROLES = ("listener", "worker", "settler", "sender", "console")
ANSWER_MARGIN_SECONDS = 1.0  # a C-STORE is answered within database.statement_timeout_seconds + this


def _require_int8(config: Config, engine: Engine) -> None:
    """``inference.precision = int8``: refuse to start unless the active model has a passing INT8 graph."""
    from pathlib import Path

    from sqlalchemy.orm import Session

    from screener.model.engine import check_precision
    from screener.model.registry import active_version

    with Session(engine) as session:
        active = active_version(session)
        path = Path(active.path) if active is not None else None
    if path is not None:  # without an active model the worker waits; the check runs when it loads one
        check_precision(path, config.inference.backend, "int8")


def _console(config: Config, spool: Spool) -> ConsoleServer:
    """Start the web console (screener/ops/console); a taken port stops start-up (ConfigError)."""
    from screener.ops.console.server import ConsoleServer
    from screener.ops.console.web import ConsoleContext

    server = ConsoleServer(
        ConsoleContext(
            settings=config.console,
            # Its own pool: a dashboard's parallel reads never wait for, or starve, the worker's connections.
            engine=make_engine(config.database),
            spool_root=spool.root,
            results_mode=config.results.mode,
            max_pixels=config.eligibility.max_pixels,
            config_source=config.source if config.source != "built-in defaults" else None,
        )
    )
    server.start()
    return server


def serve(config: Config, stop: threading.Event | None = None, role: str = "all") -> int:
    """Run ``role`` until ``stop`` is set or a SIGTERM/SIGINT arrives. Returns the exit code."""
    stop = stop or threading.Event()
    # Before any thread starts: a thread's first allocation picks its arena.
    arenas_limited = limit_arenas(config.memory.malloc_arena_max)
    roles = frozenset(ROLES) if role == "all" else frozenset({role})
    if role == "all" and not config.console.enabled:  # the console joins `all` only when enabled
        roles = roles - {"console"}
    engine = make_engine(config.database)
    try:
        revision = ensure_at_head(engine, config.database.auto_migrate)
    except SQLAlchemyError as exc:
        raise DatabaseUnavailableError(
            f"cannot open database {engine.url.render_as_string(hide_password=True)}: {type(exc).__name__}: "
            f"{exc.orig if hasattr(exc, 'orig') else exc}; check database.url and that the server is running"
        ) from exc
    log.info("database.ready", url=engine.url.render_as_string(hide_password=True), revision=revision)

    spool = Spool(config.storage.spool_dir, config.storage.min_free_bytes)
    spool.ensure_layout()
    try:
        identity = bind_store(spool, engine)  # StoreIdentityError before anything is received or deleted
    except SQLAlchemyError as exc:
        raise DatabaseUnavailableError(f"cannot read the store identity: {type(exc).__name__}") from exc
    guard = DatabaseGuard(engine, identity)
    if "listener" in roles:  # only receivers leave temporaries and orphans behind
        temporaries, orphans = reconcile_spool(spool, engine, config.storage.orphan_grace_seconds)
        log.info(
            "spool.ready",
            path=str(spool.root),
            free_bytes=spool.free_bytes(),
            removed_temporaries=temporaries,
            removed_orphans=orphans,
        )

    metrics = Metrics(engine, spool.root)
    metrics.watch_store(lambda: guard.problem)  # screener_database_lost, for alert rules outside the process
    health = Health()
    health.register_database(engine, guard=guard.check)

    listener = None
    ingest_engine: Engine | None = None
    if "listener" in roles:
        # Its own engine: every wait bounded by database.statement_timeout_seconds, and a pool the
        # worker and sender cannot exhaust.
        ingest_engine = make_engine(config.database, bounded=True)
        ingest = Ingest(
            spool,
            make_session_factory(ingest_engine),
            refuse_conflicts=config.listener.on_conflict == "refuse",
            chest_sop_classes=CHEST_SOP_CLASSES,
            queue_high_water=config.listener.queue_high_water,
            keep_mismatches=config.listener.on_mismatch == "keep",
            database_problem=lambda: guard.problem,
            deadline_seconds=config.database.statement_timeout_seconds + ANSWER_MARGIN_SECONDS,
            max_waiting=2 * config.listener.max_associations,
        )
        listener = Listener(config.listener, ingest, metrics)
        health.register("listener", listener.is_alive)
    if "worker" in roles and config.inference.precision == "int8":
        _require_int8(config, engine)
    worker = None
    if "worker" in roles:
        worker = Worker(config.inference, config.eligibility, engine, spool, stop, metrics)
    settler = None
    if roles & {"worker", "settler"}:
        # Verdicts and SRs on a thread of their own, so a batch never waits for them; `--role worker` keeps
        # settling as it always did, `--role settler` settles without a model loaded.
        settler = Settler(
            engine,
            spool,
            stop,
            settle_seconds=config.inference.study_settle_seconds,
            pacs=config.pacs,
            results=config.results,
            channels=ResultChannels.of(config),
        )
    shadow = config.results.mode == "shadow"
    sender = None
    if "sender" in roles:
        # HL7, webhooks and email share the DICOM outbox; the sender also checks the alert conditions.
        watch = AlertWatch(
            AlertRoutes.of(config), engine, spool, actor="alerts", database_problem=lambda: guard.problem
        )
        channels = ResultChannels.of(config)
        sender = Sender(
            config.pacs, engine, spool, stop, metrics, shadow=shadow, channels=channels, watch=watch
        )
    if worker is not None:
        health.register("worker", worker.thread.is_alive)
        if config.inference.backend == "triton":  # the remote engine: failing while the worker backs off
            health.register("engine", worker.backoff.check)
    if settler is not None:
        health.register("settler", settler.thread.is_alive)
    if sender is not None:
        health.register("sender", sender.thread.is_alive)
    scheduler = build_scheduler(config, engine, spool, roles=roles, on_failure=metrics.job_failed)
    http = start_metrics(config.metrics, health, metrics)  # a taken port stops start-up before anything runs
    try:
        console = _console(config, spool) if "console" in roles else None
    except BaseException:
        http.stop()
        raise
    if console is not None:
        health.register("console", console.is_alive)

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("serve.signal", signal=signal.Signals(signum).name)
        stop.set()

    previous = (
        {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        if threading.current_thread() is threading.main_thread()
        else {}
    )
    try:
        guard.start()
        for part in (listener, worker, settler, sender, scheduler):
            if part is not None:
                part.start()
        destinations = [d.name for d in config.pacs.destinations]
        if shadow:
            log.warning(
                "results.mode",
                mode="shadow",
                destinations=destinations,
                note="every instance is classified and recorded; no result is delivered to any destination",
            )
        else:
            log.info("results.mode", mode="live", destinations=destinations)
        HeapTrimmer(config.memory.trim_interval_seconds, stop).start()
        log.info(
            "serve.ready",
            config=config.source,
            roles=sorted(roles),
            results_mode=config.results.mode,
            malloc_arena_max=config.memory.malloc_arena_max if arenas_limited else None,
        )
        stop.wait()
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        if listener is not None:
            listener.drain(config.listener.drain_seconds)
        if worker is not None:
            worker.join(timeout=config.listener.drain_seconds + 60)
        if settler is not None:
            settler.join(timeout=60)
        if sender is not None:
            sender.join(timeout=config.pacs.timeout_seconds * 2)
    finally:
        guard.stop()
        http.stop()
        if console is not None:
            console.stop()
        if ingest_engine is not None:
            ingest_engine.dispose()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.dispose()
    log.info("serve.stopped")
    return 0

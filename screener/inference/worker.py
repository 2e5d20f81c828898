"""The worker: a short loop over four parts, each with its own module and public methods.

- :class:`~screener.inference.model_slot.ModelSlot` (``model_slot.py``): the model served, loaded only as
  registered (card and file digests checked), hot-swapped when another version becomes active; a replaced
  engine is closed once no batch uses it.
- :class:`~screener.inference.instance_queue.InstanceQueue` (``instance_queue.py``): ``instances`` as a
  leased queue (screener.core.db.queue): claim, release, mark, each lease-guarded; poison rows fail after
  ``MAX_ATTEMPTS``.
- :class:`~screener.inference.batch.BatchRunner` (``batch.py``): claimed rows -> preprocessing pool ->
  engine -> predictions and final statuses.
- The study settler is not here: ``screener.results.settlement`` reads the finished instances from the
  tables and makes verdicts and SRs on its own thread (or host, ``--role settler``), so a batch never waits
  for SR rendering.

Pipelined: while the engine runs batch N, the pool decodes and preprocesses batch N+1. A crash at any
point loses nothing: claimed rows carry a lease (``inference.lease_seconds``); expired leases are
reclaimed by any worker; the status update and the prediction insert commit together and only while the
lease is still ours, and ``predictions`` is unique per (instance, model version). A row claimed again
(attempts > 0) runs alone, with nothing else in flight, so a poison instance (one whose decoding or
inference kills its process) is the only one that reaches ``MAX_ATTEMPTS``: the innocent rows of its first
batch share one crash, then succeed on their own.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Executor

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from screener.core.config import EligibilityConfig, InferenceConfig
from screener.core.db.models import utcnow
from screener.core.errors import RemoteEngineError
from screener.core.leases import owner_id
from screener.core.logs import get_logger
from screener.core.metrics import Metrics
from screener.core.spool import Spool
from screener.inference.batch import Batch, BatchRunner
from screener.inference.engine_backoff import EngineBackoff
from screener.inference.instance_queue import MAX_ATTEMPTS, InstanceQueue
from screener.inference.model_slot import LoadedModel, ModelSlot

__all__ = ["MAX_ATTEMPTS", "Worker"]

log = get_logger("screener.worker")


class Worker:
    """Runs in a thread of ``screener serve`` (roles all and worker)."""

    def __init__(
        self,
        inference: InferenceConfig,
        eligibility: EligibilityConfig,
        db: Engine,
        spool: Spool,
        stop: threading.Event,
        metrics: Metrics | None = None,
        *,
        pool_factory: Callable[[], Executor] | None = None,
    ) -> None:
        self.inference = inference
        self.stop = stop
        self.owner = owner_id(uuid.uuid4().hex[:8])
        metrics = metrics or Metrics()
        sessions: sessionmaker[Session] = sessionmaker(db, expire_on_commit=False)
        self.slot = ModelSlot(inference, sessions, metrics)
        self.backoff = EngineBackoff(
            inference.triton.retry_seconds, inference.triton.max_retry_seconds, metrics
        )
        self.queue = InstanceQueue(db, owner=self.owner, lease_seconds=inference.lease_seconds)
        self.eligibility = eligibility
        self.spool = spool
        self.metrics = metrics
        self.pool_factory = pool_factory
        self.runner: BatchRunner | None = None  # made when the thread starts (its pool spawns processes)
        self.thread = threading.Thread(target=self._run, name="worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def open(self) -> BatchRunner:
        """The batch runner with its preprocessing pool (made once)."""
        if self.runner is None:
            self.runner = BatchRunner(
                self.inference,
                self.eligibility,
                self.spool,
                self.queue,
                self.metrics,
                pool_factory=self.pool_factory,
            )
        return self.runner

    def close(self, pending: Batch | None = None) -> None:
        """Finish ``pending``, stop the pool and close every engine."""
        try:
            if pending is not None and self.runner is not None:
                self.runner.finish(pending)
        except RemoteEngineError as exc:  # its rows are back in the queue for the next worker
            log.warning("engine.unavailable", error=str(exc), released=len(pending.rows) if pending else 0)
        finally:
            if self.runner is not None:
                self.runner.close()
            self.slot.close()

    def _run(self) -> None:
        try:
            released = self.queue.release_dead()
            if released:
                log.warning("leases.released", instances=released, why="their worker on this host is gone")
        except SQLAlchemyError as exc:
            log.warning("worker.database_unavailable", error=type(exc).__name__)
        self.open()
        log.info("worker.started", owner=self.owner, preprocess_workers=self.inference.preprocess_workers)
        pending: Batch | None = None
        try:
            while not self.stop.is_set():
                try:
                    pending = self.step(pending)
                except SQLAlchemyError as exc:
                    log.warning("worker.database_unavailable", error=type(exc).__name__)
                    pending = None  # leases expire; the rows are reclaimed
                    self.stop.wait(self.inference.poll_seconds)
                except Exception as exc:
                    log.exception("worker.step_failed", error=type(exc).__name__)
                    pending = None  # leases expire; the rows are reclaimed (MAX_ATTEMPTS bounds retries)
                    self.stop.wait(self.inference.poll_seconds)
        finally:
            self.close(pending)
            log.info("worker.stopped")

    def step(self, pending: Batch | None) -> Batch | None:
        """One turn: refresh the model, claim and submit the next batch, finish ``pending`` meanwhile.
        Returns the batch now in flight."""
        runner = self.open()
        model = self.slot.refresh()
        if model is None:
            if pending is not None:
                runner.abandon(pending)
            self.stop.wait(self.inference.poll_seconds)
            return None
        nxt = self.next_batch(model, pending)
        if pending is not None:
            try:
                report = runner.finish(pending)
            except RemoteEngineError as exc:
                # Triton down, the model unloaded, a timeout: nothing failed; wait, then try again.
                delay = self.backoff.failed(exc, backend=model.engine.name, released=len(pending.rows))
                if nxt is not None:
                    runner.abandon(nxt)
                self.stop.wait(delay)
                return None
            if not report.requeued:
                self.backoff.succeeded(model.engine.name)
        self.slot.close_retired()
        return nxt

    def next_batch(self, model: LoadedModel, pending: Batch | None) -> Batch | None:
        """Claim and submit the next batch, or None. Reclaimed rows come first, one at a time, with nothing
        else in flight; otherwise wait up to ``max_wait_ms`` for a batch to fill."""
        inf = self.inference
        if pending is not None and pending.alone:
            return None
        backlog = self.queue.backlog()
        if backlog.retried:
            # A reclaimed row may be the one that crashed the last batch: run it when nothing else runs.
            return None if pending is not None else self._submit(model, 1, retried=True)
        if not backlog.ready:
            if pending is None:
                self.stop.wait(inf.poll_seconds)
            return None
        if backlog.ready < inf.max_batch and backlog.oldest is not None:
            age_ms = (utcnow() - backlog.oldest).total_seconds() * 1000
            if age_ms < inf.max_wait_ms:
                self.stop.wait((inf.max_wait_ms - age_ms) / 1000)
        return self._submit(model, inf.max_batch, retried=False)

    def _submit(self, model: LoadedModel, limit: int, *, retried: bool) -> Batch | None:
        rows = self.queue.claim(limit, retried=retried)
        return self.open().submit(rows, model, alone=retried) if rows else None

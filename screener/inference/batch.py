"""The batch runner: claimed instances -> preprocessing pool -> engine -> predictions, persisted.

:meth:`BatchRunner.submit` hands the claimed rows to the preprocessing pool (spawned processes) and returns
at once, so the engine can run the previous batch meanwhile; :meth:`BatchRunner.finish` waits for them,
runs the engine once on the decodable ones, and records every row's outcome with its prediction, each
update lease-guarded through the instance queue. A preprocessing process that dies (some codecs abort on
corrupt data) breaks the pool: the batch goes back to the queue with the attempt counted and a new pool
replaces the broken one.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from screener.core.config import EligibilityConfig, InferenceConfig
from screener.core.db.models import InstanceStatus, Prediction
from screener.core.errors import RemoteEngineError
from screener.core.logs import get_logger
from screener.core.metrics import Metrics
from screener.core.spool import Spool
from screener.inference.instance_queue import ClaimedInstance, InstanceQueue
from screener.inference.model_slot import LoadedModel
from screener.inference.prepare import Prepared, init_pool_process, prepare_instance
from screener.model.heatmap import stored_png
from screener.model.verdict import decide

log = get_logger("screener.worker")


@dataclass
class Batch:
    """Claimed rows whose preprocessing runs in the pool."""

    rows: list[ClaimedInstance]
    futures: list[Future[Prepared]]
    model: LoadedModel  # the model whose preprocessing contract the batch was prepared for
    alone: bool  # a reclaimed row run on its own: nothing else is claimed while it is in flight
    pool: Executor  # the pool its futures run on
    claimed_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatchReport:
    """What became of a finished batch's rows (``lost_lease``: another worker had taken them over)."""

    size: int
    classified: int = 0
    skipped: int = 0
    failed: int = 0
    lost_lease: int = 0
    gated: int = 0  # skipped by the image-content gate (counted in ``skipped`` too)
    requeued: int = 0  # given back to the queue after a preprocessing crash


def process_pool(workers: int) -> Executor:
    """The preprocessing pool: ``workers`` spawned processes (0: one per core)."""
    # spawn, not fork: the parent holds threads (listener, engine) that fork would copy mid-state.
    spawn = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        max_workers=workers or (os.cpu_count() or 1), mp_context=spawn, initializer=init_pool_process
    )


class BatchRunner:
    def __init__(
        self,
        inference: InferenceConfig,
        eligibility: EligibilityConfig,
        spool: Spool,
        queue: InstanceQueue,
        metrics: Metrics | None = None,
        *,
        pool_factory: Callable[[], Executor] | None = None,
    ) -> None:
        self.inference = inference
        self.eligibility = eligibility
        self.spool = spool
        self.queue = queue
        self.metrics = metrics or Metrics()
        self._new_pool = pool_factory or (lambda: process_pool(inference.preprocess_workers))
        self.pool = self._new_pool()

    def submit(self, rows: list[ClaimedInstance], model: LoadedModel, *, alone: bool) -> Batch:
        """Start preprocessing ``rows`` for ``model``; returns at once."""
        pool = self.pool
        futures: list[Future[Prepared]] = []
        for row in rows:
            try:
                futures.append(
                    pool.submit(
                        prepare_instance,
                        row.instance_id,
                        str(self.spool.path(row.spool_name)),
                        model.spec,
                        self.eligibility,
                        self.inference.reduced_decode,
                    )
                )
            except BrokenProcessPool as exc:
                # The batch in flight broke the pool just now: finish() requeues this one with that crash.
                broken: Future[Prepared] = Future()
                broken.set_exception(exc)
                futures.append(broken)
        return Batch(rows, futures, model, alone, pool)

    def abandon(self, batch: Batch) -> None:
        """Give a batch back without running it (no model to run it): the attempt does not count."""
        for fut in batch.futures:
            fut.cancel()
        self.queue.release([r.instance_id for r in batch.rows], crashed=False)

    def finish(self, batch: Batch) -> BatchReport:
        """Wait for the batch's preprocessing, run the engine, record every row. Returns what became of
        them. A remote engine's fault (:class:`RemoteEngineError`) releases every row, uncounted, and
        propagates."""
        prepared: list[Prepared] = []
        for fut in batch.futures:
            try:
                prepared.append(fut.result())
            except BrokenProcessPool:
                # Requeue the batch now; attempts were counted at claim time. Each row then runs alone, so
                # only a poison instance crashes again, and it ends failed after MAX_ATTEMPTS.
                log.error("worker.preprocess_pool_broken", batch=len(batch.rows), alone=batch.alone)
                if self.pool is batch.pool:  # a batch that shared the pool may have replaced it already
                    batch.pool.shutdown(wait=False, cancel_futures=True)
                    self.pool = self._new_pool()
                self.queue.release([r.instance_id for r in batch.rows], crashed=True)
                return BatchReport(size=len(batch.rows), requeued=len(batch.rows))
        ok = [p for p in prepared if p.kind == "ok"]
        started = time.perf_counter()
        model = batch.model
        output = None
        if ok:
            arrays = np.stack([p.array for p in ok if p.array is not None]).astype(np.float32, copy=False)
            try:
                output = model.engine.infer(arrays)
            except RemoteEngineError:
                # The inference server's fault, not the instances': back to the queue, the attempt does not
                # count; the worker backs off (screener.inference.engine_backoff).
                self.queue.release([r.instance_id for r in batch.rows], crashed=False)
                raise
        infer_ms = (time.perf_counter() - started) * 1000
        per_image_ms = infer_ms / max(1, len(ok))
        counts = {"classified": 0, "skipped": 0, "failed": 0, "lost_lease": 0}
        gated = 0
        with self.queue.sessions.begin() as session:
            k = 0
            for p in prepared:
                if p.kind != "ok":
                    status = InstanceStatus.SKIPPED if p.kind == "skipped" else InstanceStatus.FAILED
                    done = self.queue.mark(session, p.instance_id, status, p.reason, seen=_seen(p, model))
                    counts[p.kind if done else "lost_lease"] += 1
                    continue
                assert output is not None
                probs = [float(x) for x in output.probs[k]]
                pa = [float(x) for x in output.probs_a[k]]
                pb = [float(x) for x in output.probs_b[k]]
                novelty = float(output.novelty[k]) if output.novelty is not None else None
                heatmap = stored_png(output.heatmap[k]) if output.heatmap is not None else None
                k += 1
                seen = _seen(p, model, novelty)
                if model.gate is not None and model.gate.refuses(novelty):
                    # Not like the training images: no label, no prediction row; the score is kept on the
                    # instance and named in the reason (the SR's "not analysed").
                    assert novelty is not None
                    reason = model.gate.reason(novelty)
                    if self.queue.mark(session, p.instance_id, InstanceStatus.SKIPPED, reason, seen=seen):
                        counts["skipped"] += 1
                        gated += 1
                    else:
                        counts["lost_lease"] += 1
                    continue
                if not self.queue.mark(session, p.instance_id, InstanceStatus.CLASSIFIED, None, seen=seen):
                    counts["lost_lease"] += 1
                    continue
                session.add(
                    _prediction(
                        p,
                        model,
                        probs,
                        pa,
                        pb,
                        novelty,
                        batch_size=len(ok),
                        inference_ms=per_image_ms,
                        heatmap=heatmap,
                    )
                )
                counts["classified"] += 1
        wall_s = time.perf_counter() - batch.claimed_at
        self.metrics.batch_done(
            size=len(prepared),
            inferred=len(ok),
            infer_seconds=infer_ms / 1000,
            wall_seconds=wall_s,
            counts=counts,
        )
        log.info(
            "batch.done",
            model=model.version,
            backend=model.engine.name,
            size=len(prepared),
            infer_ms=round(infer_ms, 1),
            images_per_s=round(len(ok) / (infer_ms / 1000), 2) if ok and infer_ms > 0 else None,
            wall_ms=round(wall_s * 1000, 1),
            gated=gated,
            **counts,
        )
        return BatchReport(size=len(prepared), gated=gated, **counts)

    def close(self) -> None:
        """Stop the pool, cancelling preprocessing not yet started."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def _prediction(
    p: Prepared,
    model: LoadedModel,
    probs: list[float],
    pa: list[float],
    pb: list[float],
    novelty: float | None,
    *,
    batch_size: int,
    inference_ms: float,
    heatmap: bytes | None = None,
) -> Prediction:
    borderline = None
    if model.gate is not None and model.gate.is_borderline(novelty):
        assert novelty is not None
        borderline = model.gate.borderline_reason(novelty)
    decision = decide(probs, model.classes, model.thresholds, model.findings, borderline=borderline)
    return Prediction(
        instance_id=p.instance_id,
        model_version_id=model.row_id,
        label=decision.label,
        probs=dict(zip(model.classes, probs, strict=True)),
        reason=decision.reason,
        probs_a=pa,
        probs_b=pb,
        disagreement=float(0.5 * sum(abs(a - b) for a, b in zip(pa, pb, strict=True))),
        backend=model.engine.name,
        batch_size=batch_size,
        preprocess_ms=round(p.ms, 2),
        inference_ms=round(inference_ms, 2),
        heatmap=heatmap,
    )


def _seen(prepared: Prepared, model: LoadedModel, novelty: float | None = None) -> dict[str, Any]:
    """The ``instances`` columns the drift and site-performance reports read (migration 0010), and the
    image-content gate's score where the model has a gate (migration 0011; None: no score)."""
    facts = prepared.facts
    return {
        "novelty": novelty if novelty is None or math.isfinite(novelty) else None,
        "manufacturer": facts.manufacturer,
        "image_rows": facts.rows,
        "image_columns": facts.columns,
        "mean_intensity": facts.mean_intensity,
        "model_version_id": model.row_id,
    }

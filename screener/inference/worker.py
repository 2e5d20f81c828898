"""The worker: claim queued instances with a lease, preprocess in a pool, infer in batches, persist.

Pipelined: while the engine runs batch N, the pool decodes and preprocesses batch N+1. A crash at any
point loses nothing: claimed rows carry a lease (``inference.lease_seconds``); expired leases are
reclaimed by any worker; the status update and the prediction insert commit together and only while
the lease is still ours, and ``predictions`` is unique per (instance, model version).

``instances.attempts`` counts claims whose processing did not finish: a crash of a preprocessing process
or of the worker itself, or a lease that expired. A row claimed again (attempts > 0) runs alone, with
nothing else in flight, so a poison instance (one whose decoding or inference kills its process) is the
only one that reaches ``MAX_ATTEMPTS``: the innocent rows of its first batch share one crash, then
succeed on their own.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
import uuid
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, and_, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from screener.core import audit
from screener.core.config import Config
from screener.core.db.models import (
    Instance,
    InstanceStatus,
    Prediction,
    Study,
    StudyResult,
    utcnow,
)
from screener.core.errors import ModelIntegrityError, ScreenerError
from screener.core.leases import owner_id, release_dead_leases
from screener.core.logs import get_logger, uid_hash
from screener.core.metrics import Metrics
from screener.core.spool import Spool
from screener.imaging.pixels import PreprocessSpec
from screener.inference.prepare import Prepared, init_pool_process, prepare_instance
from screener.model.engine import load_engine
from screener.model.engine.base import Engine as InferenceEngine
from screener.model.modelcard import GateSpec, load_model_dir, read_card
from screener.model.registry import active_version, verify_registered
from screener.model.verdict import ImageOutcome, instance_label, study_verdict
from screener.results.outbox import build_objects, enqueue

log = get_logger("screener.worker")

MAX_ATTEMPTS = 3  # an instance whose processing crashed this often is marked failed, not retried forever
MODEL_RETRY_SECONDS = 60.0


@dataclass
class _Model:
    row_id: int
    version: str
    engine: InferenceEngine
    spec: PreprocessSpec
    classes: tuple[str, ...]
    thresholds: dict[str, float]
    gate: GateSpec | None = None  # the card's image-content gate (None: every decoded image is classified)


@dataclass
class _Claimed:
    rows: list[tuple[int, str, int]]  # (instance id, spool name, attempts)
    futures: list[Future[Prepared]]
    claimed_at: float
    model: _Model  # the model whose preprocessing contract the batch was prepared for
    pool: ProcessPoolExecutor  # the pool its futures run on
    alone: bool  # a reclaimed row run on its own: nothing else is claimed while it is in flight


class Worker:
    """Runs in a thread of ``screener serve`` (or alone with ``--role worker``)."""

    def __init__(
        self, config: Config, db: Engine, spool: Spool, stop: threading.Event, metrics: Metrics | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.db = db
        self.sessions: sessionmaker[Session] = sessionmaker(db, expire_on_commit=False)
        self.spool = spool
        self.stop = stop
        self.owner = owner_id(uuid.uuid4().hex[:8])
        self.model: _Model | None = None
        self._failed_model: tuple[int, float] | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._to_close: list[InferenceEngine] = []  # replaced engines, closed once their last batch is done
        self._waiting_logged = False
        self._last_settle = 0.0
        self.thread = threading.Thread(target=self._run, name="worker", daemon=True)
        self.alive = threading.Event()

    # --- lifecycle ---

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _make_pool(self) -> ProcessPoolExecutor:
        workers = self.config.inference.preprocess_workers or (os.cpu_count() or 1)
        # spawn, not fork: the parent holds threads (listener, engine) that fork would copy mid-state.
        spawn = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(max_workers=workers, mp_context=spawn, initializer=init_pool_process)

    def _release_dead_leases(self) -> None:
        try:
            with self.sessions.begin() as session:
                released = release_dead_leases(session, Instance, {"status": InstanceStatus.QUEUED})
        except SQLAlchemyError as exc:
            log.warning("worker.database_unavailable", error=type(exc).__name__)
            return
        if released:
            log.warning("leases.released", instances=released, why="their worker on this host is gone")

    def _run(self) -> None:
        self.alive.set()
        self._release_dead_leases()
        self._pool = self._make_pool()
        log.info(
            "worker.started",
            owner=self.owner,
            preprocess_workers=self.config.inference.preprocess_workers or (os.cpu_count() or 1),
        )
        pending: _Claimed | None = None
        try:
            while not self.stop.is_set():
                try:
                    pending = self._step(pending)
                except SQLAlchemyError as exc:
                    log.warning("worker.database_unavailable", error=type(exc).__name__)
                    pending = None  # leases expire; the rows are reclaimed
                    self.stop.wait(self.config.inference.poll_seconds)
                except Exception as exc:
                    log.exception("worker.step_failed", error=type(exc).__name__)
                    pending = None  # leases expire; the rows are reclaimed (MAX_ATTEMPTS bounds retries)
                    self.stop.wait(self.config.inference.poll_seconds)
            if pending is not None:
                self._finish(pending)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            for engine in [*self._to_close, *([self.model.engine] if self.model else [])]:
                engine.close()
            self.alive.clear()
            log.info("worker.stopped")

    def _step(self, pending: _Claimed | None) -> _Claimed | None:
        self._ensure_model()
        if self.model is None:
            if pending is not None:
                self._release(pending, crashed=False)
            self.stop.wait(self.config.inference.poll_seconds)
            return None
        try:
            self._settle_studies()
        except SQLAlchemyError as exc:  # verdicts retry next round; the pending batch must not wait for that
            log.warning("worker.settle_failed", error=type(exc).__name__)
        nxt = self._claim_when_ready(pending)
        if pending is not None:
            self._finish(pending)
        while self._to_close:
            self._to_close.pop().close()
        return nxt

    # --- model ---

    def _ensure_model(self) -> None:
        with self.sessions() as session:
            row = active_version(session)
        if row is None:
            if not self._waiting_logged:
                log.warning(
                    "worker.no_active_model",
                    hint="register and activate one: screener models register DIR --activate",
                )
                self._waiting_logged = True
            return
        self._waiting_logged = False
        if self.model is not None and self.model.row_id == row.id:
            return
        if (
            self._failed_model
            and self._failed_model[0] == row.id
            and time.monotonic() < self._failed_model[1]
        ):
            return
        inf = self.config.inference
        model_dir = Path(row.path)
        try:
            # The card must be the one recorded at registration before an engine parses the graph, and
            # again as load_engine verified it (the card could change in between).
            try:
                verify_registered(row, read_card(model_dir), model_dir)
            except ModelIntegrityError:
                load_model_dir(model_dir)  # a file failing its own card's checks is the more precise reason
                raise
            engine, loaded = load_engine(
                model_dir,
                inf.backend,
                threads=inf.threads,
                torch_compile=inf.torch_compile,
                trt_cache_dir=inf.trt_cache_dir,
                max_batch=inf.max_batch,
                precision=inf.precision,
            )
            try:
                verify_registered(row, loaded.card, model_dir)
            except ScreenerError:
                engine.close()
                raise
        except ScreenerError as exc:
            self._failed_model = (row.id, time.monotonic() + MODEL_RETRY_SECONDS)
            log.error(
                "model.load_failed",
                version=row.version,
                error=str(exc),
                serving=self.model.version if self.model else None,
            )
            return
        previous = self.model
        card = loaded.card
        self.model = _Model(
            row.id,
            row.version,
            engine,
            card.preprocessing,
            tuple(card.classes),
            dict(card.thresholds),
            card.gate,
        )
        if previous is not None:
            self._to_close.append(previous.engine)  # a batch prepared for it may still be pending
        self.metrics.model_loaded(row.version, engine.name)
        log.info(
            "model.loaded",
            version=row.version,
            backend=engine.name,
            previous=previous.version if previous else None,
        )

    # --- claiming ---

    def _claimable(self) -> Any:
        now = utcnow()
        return or_(
            Instance.status == InstanceStatus.QUEUED,
            and_(Instance.status == InstanceStatus.PROCESSING, Instance.lease_expires_at < now),
        )

    def _claim_when_ready(self, pending: _Claimed | None) -> _Claimed | None:
        """The next batch, or None. Reclaimed rows come first, one at a time, with nothing else in flight."""
        inf = self.config.inference
        if pending is not None and pending.alone:
            return None
        with self.sessions() as session:
            ready, oldest, retried = session.execute(
                select(
                    func.count(),
                    func.min(Instance.received_at),
                    func.count().filter(Instance.attempts > 0),
                ).where(self._claimable())
            ).one()
        if retried:
            # A reclaimed row may be the one that crashed the last batch: run it when nothing else runs.
            return None if pending is not None else self._claim(1, retried=True)
        if not ready:
            if pending is None:
                self.stop.wait(inf.poll_seconds)
            return None
        if ready < inf.max_batch and oldest is not None:
            age_ms = (utcnow() - _aware(oldest)).total_seconds() * 1000
            if age_ms < inf.max_wait_ms:
                self.stop.wait((inf.max_wait_ms - age_ms) / 1000)
        return self._claim(inf.max_batch, retried=False)

    def _claim(self, limit: int, *, retried: bool) -> _Claimed | None:
        """Lease up to ``limit`` rows claimed before (``retried``) or never claimed; counts the attempt."""
        assert self.model is not None and self._pool is not None
        now = utcnow()
        pick = (
            select(Instance.id)
            .where(self._claimable(), Instance.attempts > 0 if retried else Instance.attempts == 0)
            .order_by(Instance.received_at, Instance.id)
            .limit(limit)
        )
        if self.db.dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        stmt = (
            update(Instance)
            .where(Instance.id.in_(pick.scalar_subquery()))
            .values(
                status=InstanceStatus.PROCESSING,
                lease_owner=self.owner,
                lease_expires_at=now + timedelta(seconds=self.config.inference.lease_seconds),
                attempts=Instance.attempts + 1,
                updated_at=now,
            )
            .returning(Instance.id, Instance.spool_name, Instance.attempts)
            .execution_options(synchronize_session=False)
        )
        with self.sessions.begin() as session:
            rows = [(int(r[0]), str(r[1]), int(r[2])) for r in session.execute(stmt)]
        if not rows:
            return None
        exhausted = [r for r in rows if r[2] > MAX_ATTEMPTS]
        for instance_id, _, attempts in exhausted:
            crashed = attempts - 1  # this claim only gives up: it is not an attempt
            with self.sessions.begin() as session:
                self._mark(
                    session,
                    instance_id,
                    InstanceStatus.FAILED,
                    f"processing crashed {crashed} times (its decoder or inference process died); "
                    "not retried",
                    attempts=crashed,
                )
            log.error("worker.instance_gave_up", instance=instance_id, attempts=crashed)
        rows = [r for r in rows if r[2] <= MAX_ATTEMPTS]
        if not rows:
            return None
        rules = self.config.eligibility
        reduced = self.config.inference.reduced_decode
        pool = self._pool
        futures: list[Future[Prepared]] = []
        for iid, name, _ in rows:
            try:
                futures.append(
                    pool.submit(
                        prepare_instance, iid, str(self.spool.path(name)), self.model.spec, rules, reduced
                    )
                )
            except BrokenProcessPool as exc:
                # The batch in flight broke the pool just now: _finish requeues this one with that crash.
                broken: Future[Prepared] = Future()
                broken.set_exception(exc)
                futures.append(broken)
        return _Claimed(rows, futures, time.perf_counter(), self.model, pool, alone=retried)

    def _release(self, claimed: _Claimed, *, crashed: bool) -> None:
        """Give claimed rows back to the queue: after a crash (the attempt counts) or with no model to run
        them (it does not)."""
        ids = [r[0] for r in claimed.rows]
        attempts = Instance.attempts if crashed else Instance.attempts - 1
        with self.sessions.begin() as session:
            session.execute(
                update(Instance)
                .where(Instance.id.in_(ids), Instance.lease_owner == self.owner)
                .values(
                    status=InstanceStatus.QUEUED, lease_owner=None, lease_expires_at=None, attempts=attempts
                )
                .execution_options(synchronize_session=False)
            )

    # --- inference and persistence ---

    def _finish(self, claimed: _Claimed) -> None:
        prepared: list[Prepared] = []
        for fut in claimed.futures:
            try:
                prepared.append(fut.result())
            except BrokenProcessPool:
                # A decoder crashed its process (some codecs abort on corrupt data). Requeue the batch now;
                # attempts were counted at claim time. Each row then runs alone (see _claim_when_ready), so
                # only a poison instance crashes again, and it ends failed after MAX_ATTEMPTS.
                log.error("worker.preprocess_pool_broken", batch=len(claimed.rows), alone=claimed.alone)
                if self._pool is claimed.pool:  # a batch that shared the pool may have replaced it already
                    claimed.pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._make_pool()
                self._release(claimed, crashed=True)
                return
        ok = [p for p in prepared if p.kind == "ok"]
        started = time.perf_counter()
        model = claimed.model
        output = None
        if ok:
            batch = np.stack([p.array for p in ok if p.array is not None]).astype(np.float32, copy=False)
            output = model.engine.infer(batch)
        infer_ms = (time.perf_counter() - started) * 1000
        per_image_ms = infer_ms / max(1, len(ok))
        counts = {"classified": 0, "skipped": 0, "failed": 0, "lost_lease": 0}
        gated = 0
        with self.sessions.begin() as session:
            k = 0
            for p in prepared:
                if p.kind == "ok":
                    assert output is not None
                    probs = [float(x) for x in output.probs[k]]
                    pa = [float(x) for x in output.probs_a[k]]
                    pb = [float(x) for x in output.probs_b[k]]
                    novelty = float(output.novelty[k]) if output.novelty is not None else None
                    k += 1
                    seen = _seen(p, model, novelty)
                    if model.gate is not None and model.gate.refuses(novelty):
                        # Not like the training images: no label, no prediction row; the score is kept
                        # on the instance and named in the reason (the SR's "not analysed").
                        assert novelty is not None
                        reason = model.gate.reason(novelty)
                        if self._mark(session, p.instance_id, InstanceStatus.SKIPPED, reason, seen=seen):
                            counts["skipped"] += 1
                            gated += 1
                        else:
                            counts["lost_lease"] += 1
                        continue
                    if not self._mark(session, p.instance_id, InstanceStatus.CLASSIFIED, None, seen=seen):
                        counts["lost_lease"] += 1
                        continue
                    by_class = dict(zip(model.classes, probs, strict=True))
                    session.add(
                        Prediction(
                            instance_id=p.instance_id,
                            model_version_id=model.row_id,
                            label=instance_label(probs, model.classes, model.thresholds),
                            p_normal=by_class["normal"],
                            p_covid19=by_class["covid19"],
                            p_viral_pneumonia=by_class["viral_pneumonia"],
                            probs_a=pa,
                            probs_b=pb,
                            disagreement=float(0.5 * sum(abs(a - b) for a, b in zip(pa, pb, strict=True))),
                            backend=model.engine.name,
                            batch_size=len(ok),
                            preprocess_ms=round(p.ms, 2),
                            inference_ms=round(per_image_ms, 2),
                        )
                    )
                    counts["classified"] += 1
                else:
                    status = InstanceStatus.SKIPPED if p.kind == "skipped" else InstanceStatus.FAILED
                    if self._mark(session, p.instance_id, status, p.reason, seen=_seen(p, model)):
                        counts[p.kind] += 1
                    else:
                        counts["lost_lease"] += 1
        wall_s = time.perf_counter() - claimed.claimed_at
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

    def _mark(
        self,
        session: Session,
        instance_id: int,
        status: InstanceStatus,
        reason: str | None,
        *,
        attempts: int | None = None,
        seen: dict[str, Any] | None = None,
    ) -> bool:
        """Move a row we lease to its final status; False when our lease was lost to another worker.

        ``seen``: the image facts and serving model recorded with it (see :func:`_seen`)."""
        extra: dict[str, Any] = dict(seen or {})
        if attempts is not None:
            extra["attempts"] = attempts
        result = session.execute(
            update(Instance)
            .where(
                Instance.id == instance_id,
                Instance.lease_owner == self.owner,
                Instance.status == InstanceStatus.PROCESSING,
            )
            .values(
                status=status,
                status_reason=reason,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=utcnow(),
                **extra,
            )
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    # --- study verdicts ---

    def _settle_studies(self) -> None:
        """Verdicts for studies quiet for ``study_settle_seconds`` with every instance done."""
        if time.monotonic() - self._last_settle < min(1.0, self.config.inference.study_settle_seconds or 1.0):
            return
        self._last_settle = time.monotonic()
        assert self.model is not None
        cutoff = utcnow() - timedelta(seconds=self.config.inference.study_settle_seconds)
        pending = exists().where(
            Instance.study_id == Study.id,
            Instance.status.in_([InstanceStatus.QUEUED, InstanceStatus.PROCESSING]),
        )
        fresh_result = exists().where(
            StudyResult.study_id == Study.id, StudyResult.created_at >= Study.last_received_at
        )
        with self.sessions() as session:
            study_ids = list(
                session.scalars(
                    select(Study.id)
                    .where(Study.last_received_at <= cutoff, ~pending, ~fresh_result)
                    .limit(500)
                )
            )
        for study_id in study_ids:
            try:
                self._settle(study_id)
            except IntegrityError:
                # Another worker made this verdict at the same moment; the unique revision kept one.
                log.info("study.verdict_taken", study=study_id)

    def _settle(self, study_id: int) -> None:
        assert self.model is not None
        with self.sessions.begin() as session:
            # Workers settling the same study queue up on its row (PostgreSQL), then re-check: only the
            # first one makes the verdict, so a study never gets a second revision for the same content.
            study = session.execute(
                select(Study.last_received_at).where(Study.id == study_id).with_for_update()
            ).one_or_none()
            fresh = session.scalar(
                select(func.count())
                .select_from(StudyResult)
                .where(StudyResult.study_id == study_id, StudyResult.created_at >= Study.last_received_at)
                .where(Study.id == study_id)
            )
            if study is None or fresh:
                return
            rows = session.execute(
                select(
                    Instance.status,
                    Prediction.label,
                    Prediction.p_normal,
                    Prediction.p_covid19,
                    Prediction.p_viral_pneumonia,
                    Prediction.model_version_id,
                )
                .outerjoin(Prediction, Prediction.instance_id == Instance.id)
                .where(Instance.study_id == study_id)
            ).all()
            model_ids = [r[5] for r in rows if r[5] is not None]
            model_id = max(model_ids) if model_ids else self.model.row_id
            images = [
                ImageOutcome(
                    status=str(r[0].value if hasattr(r[0], "value") else r[0]),
                    label=r[1] if r[5] == model_id else None,
                    probs={"normal": r[2], "covid19": r[3], "viral_pneumonia": r[4]}
                    if r[5] == model_id
                    else None,
                )
                for r in rows
            ]
            verdict = study_verdict(images)
            latest = session.scalar(
                select(func.max(StudyResult.revision)).where(
                    StudyResult.study_id == study_id, StudyResult.model_version_id == model_id
                )
            )
            probs = verdict.probs or {}
            result = StudyResult(
                study_id=study_id,
                model_version_id=model_id,
                revision=(latest or 0) + 1,
                verdict=verdict.label,
                p_normal=probs.get("normal"),
                p_covid19=probs.get("covid19"),
                p_viral_pneumonia=probs.get("viral_pneumonia"),
                instances_total=verdict.total,
                instances_classified=verdict.classified,
                instances_skipped=verdict.skipped,
                instances_failed=verdict.failed,
            )
            session.add(result)
            session.flush()
            study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == study_id))
            deliveries = self._enqueue_results(session, result, study_uid)
            audit.record(
                session,
                audit.RESULT_PRODUCED,
                actor=self.owner,
                subject=study_uid or str(study_id),
                detail={"verdict": verdict.label, "revision": result.revision, "model_version_id": model_id},
            )
        log.info(
            "study.verdict",
            study_uid=uid_hash(study_uid),
            verdict=verdict.label,
            revision=(latest or 0) + 1,
            classified=verdict.classified,
            skipped=verdict.skipped,
            failed=verdict.failed,
            deliveries=deliveries,
            results_mode=self.config.results.mode,
            withheld=len(self.config.pacs.destinations) if self.config.results.mode == "shadow" else 0,
        )

    def _enqueue_results(self, session: Session, result: StudyResult, study_uid: str | None) -> int:
        """Build the SR (+SC) for a new verdict and queue one delivery per destination, in its transaction.

        In shadow mode (``results.mode``) nothing is built or queued: the verdict is recorded as withheld
        from the destinations it would have gone to (audit ``result.withheld``)."""
        pacs = self.config.pacs
        if not pacs.destinations:
            return 0
        if self.config.results.mode == "shadow":
            audit.record(
                session,
                audit.RESULT_WITHHELD,
                actor=self.owner,
                subject=study_uid or str(result.study_id),
                detail={
                    "mode": "shadow",
                    "revision": result.revision,
                    "study_result_id": result.id,
                    "destinations": [d.name for d in pacs.destinations],
                },
            )
            return 0
        try:
            objects = build_objects(session, self.spool, pacs, result)
        except Exception as exc:
            # The verdict stays recorded; the error names why no SR could be made for it.
            log.exception("sr.build_failed", study_result=result.id, error=f"{type(exc).__name__}: {exc}")
            return 0
        return enqueue(session, pacs, result, objects)


def _seen(prepared: Prepared, model: _Model, novelty: float | None = None) -> dict[str, Any]:
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


def _aware(value: Any) -> Any:
    """SQLite returns naive datetimes for timezone-aware columns; they are stored in UTC."""
    from datetime import UTC

    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

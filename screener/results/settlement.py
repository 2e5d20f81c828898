"""The study settler: a verdict for every study that has gone quiet, its SR (+SC) rendered, deliveries queued.

A study is due when it received nothing for ``inference.study_settle_seconds``, none of its instances is
queued or processing, and no verdict was made since its last instance arrived. The worker never calls
this: it records predictions in ``instances``/``predictions``, and the settler reads them from there, on a
thread of its own (or as ``screener serve --role settler``), so rendering and fsyncing SRs for hundreds of
studies never delays a batch.

One study is settled in one transaction that holds the study's row (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, :func:`screener.core.db.queue.lock_free_rows`): settlers on several hosts never wait for each
other and never make a second verdict for the same content; the unique (study, model version, revision)
keeps one if two race anyway. The SR and SC are built before the transaction writes anything, so on
SQLite the write lock is held only for the inserts. In shadow mode (``results.mode``) the verdict is
recorded and nothing is built or queued (audit ``result.withheld``).
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

from sqlalchemy import Engine, exists, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from screener.core import audit
from screener.core.config import PacsConfig, ResultsConfig
from screener.core.db.models import (
    Instance,
    InstanceStatus,
    ModelVersion,
    Prediction,
    Study,
    StudyResult,
    utcnow,
)
from screener.core.db.queue import lock_free_rows
from screener.core.leases import owner_id
from screener.core.logs import get_logger, uid_hash
from screener.core.spool import Spool
from screener.model.modelcard import ModelCard
from screener.model.registry import active_version
from screener.model.verdict import ImageOutcome, study_verdict
from screener.results.channels import ResultChannels, enqueue_result_messages
from screener.results.outbox import BuiltObject, build_objects, enqueue

log = get_logger("screener.settler")

MAX_STUDIES_PER_ROUND = 500


class Settler:
    """Runs in a thread of ``screener serve`` (roles all, worker and settler)."""

    def __init__(
        self,
        db: Engine,
        spool: Spool,
        stop: threading.Event,
        *,
        settle_seconds: float,
        pacs: PacsConfig,
        results: ResultsConfig,
        channels: ResultChannels | None = None,
    ) -> None:
        self.sessions: sessionmaker[Session] = sessionmaker(db, expire_on_commit=False)
        self.spool = spool
        self.stop = stop
        self.settle_seconds = settle_seconds
        self.pacs = pacs
        self.results = results
        self.channels = channels
        self.owner = owner_id(uuid.uuid4().hex[:8])
        self.thread = threading.Thread(target=self._run, name="settler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        log.info("settler.started", owner=self.owner, settle_seconds=self.settle_seconds)
        pause = min(1.0, self.settle_seconds or 1.0)
        while not self.stop.is_set():
            try:
                self.settle_due()
            except SQLAlchemyError as exc:  # verdicts retry next round
                log.warning("settler.database_unavailable", error=type(exc).__name__)
            except Exception as exc:
                log.exception("settler.round_failed", error=type(exc).__name__)
            self.stop.wait(pause)
        log.info("settler.stopped")

    def due(self, limit: int = MAX_STUDIES_PER_ROUND) -> list[int]:
        """Ids of the studies due for a verdict (oldest reception first)."""
        cutoff = utcnow() - timedelta(seconds=self.settle_seconds)
        pending = exists().where(
            Instance.study_id == Study.id,
            Instance.status.in_([InstanceStatus.QUEUED, InstanceStatus.PROCESSING]),
        )
        fresh_result = exists().where(
            StudyResult.study_id == Study.id, StudyResult.created_at >= Study.last_received_at
        )
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(Study.id)
                    .where(Study.last_received_at <= cutoff, ~pending, ~fresh_result)
                    .order_by(Study.last_received_at, Study.id)
                    .limit(limit)
                )
            )

    def settle_due(self) -> int:
        """Settle every due study once. Returns how many verdicts were made."""
        made = 0
        for study_id in self.due():
            if self.stop.is_set():
                break
            try:
                made += self.settle(study_id) is not None
            except IntegrityError:
                # Another settler made this verdict at the same moment; the unique revision kept one.
                log.info("study.verdict_taken", study=study_id)
        return made

    def settle(self, study_id: int) -> StudyResult | None:
        """Make the study's verdict, its result objects and deliveries, in one transaction. None when there is
        nothing to do: another settler holds the study, a verdict is already fresh, or no model has ever
        served it and none is active."""
        started = time.perf_counter()
        with self.sessions.begin() as session:
            if not lock_free_rows(session, Study.id, where=[Study.id == study_id]):
                return None
            study_uid, last_received = session.execute(
                select(Study.study_instance_uid, Study.last_received_at).where(Study.id == study_id)
            ).one()
            fresh = session.scalar(
                select(func.count())
                .select_from(StudyResult)
                .where(StudyResult.study_id == study_id, StudyResult.created_at >= last_received)
            )
            if fresh:
                return None
            rows = session.execute(
                select(
                    Instance.status,
                    Prediction.label,
                    Prediction.probs,
                    Prediction.model_version_id,
                    Prediction.reason,
                )
                .outerjoin(Prediction, Prediction.instance_id == Instance.id)
                .where(Instance.study_id == study_id)
            ).all()
            model_ids = [r[3] for r in rows if r[3] is not None]
            if model_ids:
                model_id = max(model_ids)
            else:  # nothing classified: the verdict ("not analysed") is the serving model's
                active = active_version(session)
                if active is None:
                    return None
                model_id = active.id
            images = [
                ImageOutcome(
                    status=str(getattr(r[0], "value", r[0])),
                    label=r[1] if r[3] == model_id else None,
                    probs=dict(r[2]) if r[3] == model_id and r[2] else None,
                    reason=r[4] if r[3] == model_id else None,
                )
                for r in rows
            ]
            card_json = session.scalar(select(ModelVersion.card_json).where(ModelVersion.id == model_id))
            findings = ModelCard.from_json(card_json).findings if card_json else ()
            verdict = study_verdict(images, findings)
            latest = session.scalar(
                select(func.max(StudyResult.revision)).where(
                    StudyResult.study_id == study_id, StudyResult.model_version_id == model_id
                )
            )
            result = StudyResult(
                study_id=study_id,
                model_version_id=model_id,
                revision=(latest or 0) + 1,
                verdict=verdict.label,
                probs=dict(verdict.probs) if verdict.probs is not None else None,
                flagged=verdict.label in findings,
                reason=verdict.reason,
                instances_total=verdict.total,
                instances_classified=verdict.classified,
                instances_skipped=verdict.skipped,
                instances_failed=verdict.failed,
            )
            objects = self._build(session, result)  # before the first write: SQLite's lock stays short
            session.add(result)
            session.flush()
            deliveries = self._enqueue(session, result, study_uid, objects)
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
            revision=result.revision,
            classified=verdict.classified,
            skipped=verdict.skipped,
            failed=verdict.failed,
            deliveries=deliveries,
            results_mode=self.results.mode,
            withheld=len(self.pacs.destinations) if self.results.mode == "shadow" else 0,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return result

    def _build(self, session: Session, result: StudyResult) -> list[BuiltObject] | None:
        """The SR (+SC) for a new verdict, stored in the spool; None when none is wanted or it failed."""
        if not self.pacs.destinations or self.results.mode == "shadow":
            return None
        try:
            return build_objects(session, self.spool, self.pacs, result)
        except Exception as exc:
            # The verdict stays recorded; the error names why no SR could be made for it.
            log.exception("sr.build_failed", study=result.study_id, error=f"{type(exc).__name__}: {exc}")
            return None

    def _enqueue(
        self, session: Session, result: StudyResult, study_uid: str | None, objects: list[BuiltObject] | None
    ) -> int:
        """Queue one delivery per destination and object, and the other channels' messages, in the
        verdict's transaction. Returns how many deliveries were added."""
        added = 0
        if self.channels is not None:
            # HL7 ORU^R01 per [[hl7.destinations]] and the finding / indeterminate alert (none in shadow).
            added += enqueue_result_messages(session, self.spool, self.channels, result, actor=self.owner)
        if not self.pacs.destinations:
            return added
        if self.results.mode == "shadow":
            audit.record(
                session,
                audit.RESULT_WITHHELD,
                actor=self.owner,
                subject=study_uid or str(result.study_id),
                detail={
                    "mode": "shadow",
                    "revision": result.revision,
                    "study_result_id": result.id,
                    "destinations": [d.name for d in self.pacs.destinations],
                },
            )
            return added
        if objects is None:
            return added
        return added + enqueue(session, self.pacs, result, objects)

"""Background jobs of ``screener serve`` (APScheduler): lease reclaim, spool retention, orphan sweep, retrain.

Each job is idempotent, so several processes sharing one database and spool may run the same job.
A failing job is logged and counted and never takes the daemon down. Delivery sweeps, study settling
and model hot-reload run inside the sender and worker loops themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Engine, and_, exists, select, update
from sqlalchemy.orm import Session

from screener.core.config import Config
from screener.core.db.models import Delivery, DeliveryStatus, Instance, InstanceStatus, StudyResult, utcnow
from screener.core.db.queue import LeasedQueue
from screener.core.leases import owner_id
from screener.core.logs import get_logger
from screener.core.spool import Spool
from screener.ingest.receive import reconcile_spool

log = get_logger("screener.scheduler")

_DONE = (InstanceStatus.CLASSIFIED, InstanceStatus.SKIPPED, InstanceStatus.FAILED)


def reclaim_expired_leases(db: Engine) -> int:
    """Put instances whose worker lease expired back in the queue (their worker died). Returns how many."""
    queue = LeasedQueue(db, Instance, owner=owner_id("scheduler"), lease_seconds=1)  # only reclaims
    count = queue.reclaim_expired(
        {"status": InstanceStatus.QUEUED}, where=[Instance.status == InstanceStatus.PROCESSING]
    )
    if count:
        log.warning("leases.reclaimed", instances=count)
    return count


def apply_retention(db: Engine, spool: Spool, days: float, batch: int = 500) -> int:
    """Delete spool files of finished instances older than ``days`` whose study result was delivered.

    Never touches queued or processing instances, nor studies with a delivery not yet sent (pending,
    failed or dead), nor instances no verdict has covered yet. Returns how many files were deleted.
    """
    if days <= 0:
        return 0
    cutoff = utcnow() - timedelta(days=days)
    has_result = exists().where(StudyResult.study_id == Instance.study_id)
    undelivered = exists().where(
        StudyResult.study_id == Instance.study_id,
        Delivery.study_result_id == StudyResult.id,
        Delivery.status != DeliveryStatus.SENT,
    )
    deleted = 0
    with Session(db) as session:
        rows = session.execute(
            select(Instance.id, Instance.spool_name)
            .where(
                Instance.status.in_(_DONE),
                Instance.spool_deleted_at.is_(None),
                Instance.received_at < cutoff,
                and_(has_result, ~undelivered),
            )
            .limit(batch)
        ).all()
    for instance_id, name in rows:
        spool.remove(name)
        with Session(db) as session, session.begin():
            session.execute(
                update(Instance).where(Instance.id == instance_id).values(spool_deleted_at=utcnow())
            )
        deleted += 1
    if deleted:
        log.info("retention.deleted", files=deleted, older_than_days=days)
    return deleted


def run_retrain(config_path: str | None) -> int:
    """Run ``trainer retrain`` as a child process with this daemon's settings; returns its exit code."""
    trainer = Path(sys.executable).with_name("trainer")
    env = dict(os.environ)
    if config_path:
        env["SCREENER_CONFIG"] = config_path
    result = subprocess.run([str(trainer), "retrain"], env=env, capture_output=True, text=True, check=False)
    log.info("retrain.finished", exit_code=result.returncode, summary=result.stdout.strip().splitlines()[-1:])
    if result.returncode not in (0, 3):
        raise RuntimeError(f"trainer retrain exited {result.returncode}: {result.stdout.strip()[-500:]}")
    return result.returncode


def build_scheduler(
    config: Config,
    db: Engine,
    spool: Spool,
    *,
    roles: frozenset[str],
    on_failure: Callable[[str], None] | None = None,
) -> BackgroundScheduler | None:
    """The jobs this process should run for its ``roles``; None when the scheduler is disabled."""
    if not config.scheduler.enabled:
        return None
    sched = BackgroundScheduler(timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1})
    s = config.scheduler
    if "worker" in roles:
        sched.add_job(
            reclaim_expired_leases, "interval", args=[db], seconds=s.lease_reclaim_seconds, id="lease_reclaim"
        )
        sched.add_job(
            apply_retention,
            "interval",
            args=[db, spool, config.storage.retention_days],
            seconds=s.retention_interval_seconds,
            id="retention",
        )
        if s.retrain_cron:
            source = config.source if config.source != "built-in defaults" else None
            sched.add_job(
                run_retrain,
                CronTrigger.from_crontab(s.retrain_cron, timezone="UTC"),
                args=[source],
                id="retrain",
            )
    if "listener" in roles:
        sched.add_job(
            reconcile_spool,
            "interval",
            args=[spool, db, config.storage.orphan_grace_seconds],
            seconds=s.orphan_sweep_seconds,
            id="orphan_sweep",
        )

    def _failed(event: JobExecutionEvent) -> None:
        log.error(
            "job.failed", job=event.job_id, error=f"{type(event.exception).__name__}: {event.exception}"
        )
        if on_failure is not None:
            on_failure(str(event.job_id))

    sched.add_listener(_failed, EVENT_JOB_ERROR)
    return sched


def job_ids(sched: Any) -> list[str]:
    return sorted(job.id for job in sched.get_jobs())

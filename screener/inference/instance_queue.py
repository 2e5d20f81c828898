"""The instance queue: the worker's view of ``instances`` as a leased queue (screener.core.db.queue).

``queued`` rows are claimed in reception order; a claim sets ``processing``, our lease and counts the
attempt. ``instances.attempts`` counts claims whose processing did not finish: a crash of a preprocessing
process or of the worker itself, or a lease that expired. Rows claimed before (attempts > 0) are claimed
apart from the others (``retried``), so the caller can run them alone; a row claimed more than
``MAX_ATTEMPTS`` times is marked failed instead of being handed out again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, func, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from screener.core.db.models import Instance, InstanceStatus, utcnow
from screener.core.db.queue import LeasedQueue
from screener.core.logs import get_logger

log = get_logger("screener.worker")

MAX_ATTEMPTS = 3  # an instance whose processing crashed this often is marked failed, not retried forever


@dataclass(frozen=True)
class ClaimedInstance:
    instance_id: int
    spool_name: str
    attempts: int  # including this claim


@dataclass(frozen=True)
class Backlog:
    """What waits in the queue: claimable rows, the oldest one's reception time, and how many of them were
    claimed before (a crash or an expired lease)."""

    ready: int
    oldest: datetime | None
    retried: int


class InstanceQueue:
    def __init__(self, db: Engine, *, owner: str, lease_seconds: float) -> None:
        self.queue = LeasedQueue(db, Instance, owner=owner, lease_seconds=lease_seconds)
        self.sessions = self.queue.sessions
        self.owner = owner

    @staticmethod
    def _claimable(now: datetime) -> ColumnElement[bool]:
        return or_(
            Instance.status == InstanceStatus.QUEUED,
            and_(Instance.status == InstanceStatus.PROCESSING, Instance.lease_expires_at < now),
        )

    def backlog(self) -> Backlog:
        with self.sessions() as session:
            ready, oldest, retried = session.execute(
                select(
                    func.count(),
                    func.min(Instance.received_at),
                    func.count().filter(Instance.attempts > 0),
                ).where(self._claimable(utcnow()))
            ).one()
        return Backlog(int(ready), oldest, int(retried))

    def claim(self, limit: int, *, retried: bool) -> list[ClaimedInstance]:
        """Lease up to ``limit`` rows claimed before (``retried``) or never claimed, oldest first.

        Rows past ``MAX_ATTEMPTS`` are marked failed here and not returned."""
        now = utcnow()
        rows = self.queue.claim(
            limit,
            where=[self._claimable(now), Instance.attempts > 0 if retried else Instance.attempts == 0],
            order_by=[Instance.received_at, Instance.id],
            values={
                "status": InstanceStatus.PROCESSING,
                "attempts": Instance.attempts + 1,
                "updated_at": now,
            },
            returning=[Instance.id, Instance.spool_name, Instance.attempts],
            now=now,
        )
        claimed = [ClaimedInstance(int(r[0]), str(r[1]), int(r[2])) for r in rows]
        for row in claimed:
            if row.attempts > MAX_ATTEMPTS:
                crashed = row.attempts - 1  # this claim only gives up: it is not an attempt
                with self.sessions.begin() as session:
                    self.mark(
                        session,
                        row.instance_id,
                        InstanceStatus.FAILED,
                        f"processing crashed {crashed} times (its decoder or inference process died); "
                        "not retried",
                        attempts=crashed,
                    )
                log.error("worker.instance_gave_up", instance=row.instance_id, attempts=crashed)
        return [r for r in claimed if r.attempts <= MAX_ATTEMPTS]

    def release(self, ids: list[int], *, crashed: bool) -> int:
        """Give claimed rows back to the queue: after a crash (the attempt counts) or with no model to run
        them (it does not). Returns how many were still ours."""
        attempts = Instance.attempts if crashed else Instance.attempts - 1
        return self.queue.release(ids, {"status": InstanceStatus.QUEUED, "attempts": attempts})

    def mark(
        self,
        session: Session,
        instance_id: int,
        status: InstanceStatus,
        reason: str | None,
        *,
        attempts: int | None = None,
        seen: dict[str, Any] | None = None,
    ) -> bool:
        """In the caller's transaction: move a row we lease to its final ``status``; False when our lease was
        lost to another worker. ``seen``: the image facts and serving model recorded with it."""
        values: dict[str, Any] = {
            "status": status,
            "status_reason": reason,
            "updated_at": utcnow(),
            **(seen or {}),
        }
        if attempts is not None:
            values["attempts"] = attempts
        return bool(
            self.queue.finish(
                session, instance_id, values, where=[Instance.status == InstanceStatus.PROCESSING]
            )
        )

    def release_dead(self) -> int:
        """Rows leased by processes of this host that are gone go back to the queue at once."""
        return self.queue.release_dead({"status": InstanceStatus.QUEUED})

"""Conditions watched for alerts: ``queue_stalled``, ``disk_low``, ``model_changed``, ``database_lost``.

:meth:`AlertWatch.check` runs every ``alerts.check_seconds`` in the sender's loop. Each condition that holds
raises its alert (screener.results.alerts), which de-duplicates it: a condition that stays true is reported
once per ``alerts.dedup_seconds`` window and destination, a model version once ever.

- ``queue_stalled``: instances have waited in the queue longer than ``alerts.queue_stalled_seconds`` and
  none finished in that time (no worker, or a stuck one);
- ``disk_low``: the spool's free space is under ``alerts.disk_low_bytes``;
- ``model_changed``: the active model is a version no alert has named yet;
- ``database_lost``: the store-identity guard found that the database is not this store's (its reason).
  The alert is written to the database that is reachable, and is sent only while a sender can use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from screener.core.db.models import Instance, InstanceStatus, ModelStatus, ModelVersion, utcnow
from screener.core.logs import get_logger
from screener.core.spool import Spool
from screener.results.alerts import Alert, AlertRoutes, raise_alert

log = get_logger("screener.watch")

_FINISHED = (InstanceStatus.CLASSIFIED, InstanceStatus.SKIPPED, InstanceStatus.FAILED)


class AlertWatch:
    def __init__(
        self,
        routes: AlertRoutes,
        db: Engine,
        spool: Spool,
        *,
        actor: str,
        database_problem: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.routes = routes
        self.db = db
        self.spool = spool
        self.actor = actor
        self.database_problem = database_problem
        self._next = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.routes.webhooks) or self.routes.email.enabled

    def due(self) -> bool:
        return self.enabled and time.monotonic() >= self._next

    def check(self) -> list[Alert]:
        """Raise the alert of every condition that holds now. Returns those alerts (queued or not)."""
        self._next = time.monotonic() + self.routes.alerts.check_seconds
        alerts: list[Alert] = []
        problem = self.database_problem()
        if problem is not None:
            alerts.append(Alert("database_lost", "database", {"reason": problem}))
        settings = self.routes.alerts
        if settings.disk_low_bytes > 0:
            free = self.spool.free_bytes()
            if free < settings.disk_low_bytes:
                alerts.append(
                    Alert(
                        "disk_low", "spool", {"free_bytes": free, "threshold_bytes": settings.disk_low_bytes}
                    )
                )
        try:
            with Session(self.db) as session:
                alerts += self._database_conditions(session)
            with Session(self.db) as session, session.begin():
                for alert in alerts:
                    raise_alert(session, self.routes, alert, actor=self.actor)
        except SQLAlchemyError as exc:
            log.warning("alerts.check_failed", error=type(exc).__name__)
        return alerts

    def _database_conditions(self, session: Session) -> list[Alert]:
        found: list[Alert] = []
        now = utcnow()
        window = timedelta(seconds=self.routes.alerts.queue_stalled_seconds)
        oldest, queued = session.execute(
            select(func.min(Instance.received_at), func.count()).where(
                Instance.status == InstanceStatus.QUEUED
            )
        ).one()
        if queued and oldest is not None and oldest < now - window:
            finished = session.scalar(
                select(func.count())
                .select_from(Instance)
                .where(Instance.status.in_(_FINISHED), Instance.updated_at >= now - window)
            )
            if not finished:
                waited = int((now - oldest).total_seconds())
                found.append(
                    Alert(
                        "queue_stalled",
                        "instances",
                        {"queued": int(queued), "oldest_waiting_seconds": waited},
                    )
                )
        active = session.scalar(select(ModelVersion.version).where(ModelVersion.status == ModelStatus.ACTIVE))
        if active is not None:
            found.append(Alert("model_changed", f"model {active}", {"active_version": active}, once=True))
        return found

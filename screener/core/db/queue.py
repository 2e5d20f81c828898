"""One leased queue for every table whose rows are work: instances (worker), deliveries (sender).

A row is claimed by writing our owner (``host:pid:token``) and a lease expiry into its ``lease_owner`` and
``lease_expires_at`` columns, in the same statement that picks it: PostgreSQL picks with
``FOR UPDATE SKIP LOCKED``, so concurrent claimers never wait for each other or take the same row; SQLite
has one writer at a time, so the ``UPDATE ... WHERE id IN (SELECT ...)`` is atomic there by itself.

Every later update of a claimed row is lease-guarded (:meth:`LeasedQueue.finish`, :meth:`release`): it
only applies while ``lease_owner`` is still ours, so a worker whose lease expired and was taken over
cannot overwrite the new owner's result. Dead leases come back two ways: :meth:`release_dead` at start-up
(owners of this host whose process is gone, at once) and :meth:`reclaim_expired` (any owner, once the
lease has expired).

Work that is done inside one transaction (a study's verdict) needs no lease columns:
:func:`lock_free_rows` locks the rows for that transaction, skipping those another transaction holds; the
lock ends with the transaction, also when its process dies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from screener.core.db.models import utcnow
from screener.core.leases import release_dead_leases


class LeasedQueue:
    """The rows of ``table`` (a mapped class with ``id``, ``lease_owner`` and ``lease_expires_at``),
    claimed by ``owner`` for ``lease_seconds`` at a time.

    The caller says which rows are due and what a claim, finish or release sets besides the lease; the
    queue owns the picking, the locking and the lease guard.
    """

    def __init__(self, db: Engine, table: Any, *, owner: str, lease_seconds: float) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, not {lease_seconds!r}")
        self.db = db
        self.table = table
        self.owner = owner
        self.lease = timedelta(seconds=lease_seconds)
        self.sessions: sessionmaker[Session] = sessionmaker(db, expire_on_commit=False)

    def free(self, now: datetime) -> ColumnElement[bool]:
        """Rows nobody holds: never leased, released, or whose lease expired before ``now``."""
        return or_(self.table.lease_owner.is_(None), self.table.lease_expires_at < now)

    def expired(self, now: datetime) -> ColumnElement[bool]:
        """Rows still leased whose lease expired before ``now`` (their owner stopped renewing it)."""
        return and_(self.table.lease_owner.is_not(None), self.table.lease_expires_at < now)

    def claim(
        self,
        limit: int,
        *,
        where: Sequence[ColumnElement[bool]],
        order_by: Sequence[Any],
        returning: Sequence[Any],
        values: Mapping[str, Any] | None = None,
        now: datetime | None = None,
    ) -> list[tuple[Any, ...]]:
        """Lease up to ``limit`` rows matching every ``where`` (in ``order_by`` order), setting ``values``
        as well; returns the ``returning`` columns of the rows claimed, committed."""
        if limit < 1:
            return []
        now = now or utcnow()
        pick = select(self.table.id).where(*where).order_by(*order_by).limit(limit)
        if self.db.dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        stmt = (
            update(self.table)
            .where(self.table.id.in_(pick.scalar_subquery()))
            .values(lease_owner=self.owner, lease_expires_at=now + self.lease, **dict(values or {}))
            .returning(*returning)
            .execution_options(synchronize_session=False)
        )
        with self.sessions.begin() as session:
            return [tuple(row) for row in session.execute(stmt)]

    def finish(
        self,
        session: Session,
        ids: int | Sequence[int],
        values: Mapping[str, Any],
        *,
        where: Sequence[ColumnElement[bool]] = (),
    ) -> int:
        """In the caller's transaction: set ``values`` on the rows of ``ids`` we still lease (and that match
        ``where``), and end their lease. Returns how many rows were ours; 0 means the lease was lost."""
        id_list = [ids] if isinstance(ids, int) else list(ids)
        if not id_list:
            return 0
        result = session.execute(
            update(self.table)
            .where(self.table.id.in_(id_list), self.table.lease_owner == self.owner, *where)
            .values(lease_owner=None, lease_expires_at=None, **dict(values))
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    def release(self, ids: Sequence[int], values: Mapping[str, Any] | None = None) -> int:
        """Give rows we lease back, in a transaction of their own (:meth:`finish` with ``values``)."""
        with self.sessions.begin() as session:
            return self.finish(session, ids, values or {})

    def release_dead(self, values: Mapping[str, Any] | None = None) -> int:
        """At start-up: end the leases of owners of this host whose process is gone (setting ``values``
        too), without waiting for them to expire. Returns how many rows were released."""
        with self.sessions.begin() as session:
            return release_dead_leases(session, self.table, dict(values or {}))

    def reclaim_expired(
        self,
        values: Mapping[str, Any] | None = None,
        *,
        where: Sequence[ColumnElement[bool]] = (),
        now: datetime | None = None,
    ) -> int:
        """End every expired lease of any owner (setting ``values`` too). Returns how many."""
        with self.sessions.begin() as session:
            result = session.execute(
                update(self.table)
                .where(self.expired(now or utcnow()), *where)
                .values(lease_owner=None, lease_expires_at=None, **dict(values or {}))
                .execution_options(synchronize_session=False)
            )
            return int(getattr(result, "rowcount", 0) or 0)


def lock_free_rows(
    session: Session,
    column: Any,
    *,
    where: Sequence[ColumnElement[bool]],
    order_by: Sequence[Any] = (),
    limit: int | None = None,
) -> list[Any]:
    """In the caller's transaction: the values of ``column`` (usually an id) of rows matching ``where``,
    locked until the transaction ends; rows another transaction has locked are skipped (PostgreSQL).
    SQLite has one writer, so there the caller's first write serialises it instead."""
    pick = select(column).where(*where).order_by(*order_by)
    if limit is not None:
        pick = pick.limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    return list(session.scalars(pick))

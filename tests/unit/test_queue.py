"""The leased queue (screener.core.db.queue) and the UTC timestamp type, on real SQLite and PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.orm import Session

from screener.core.db.models import Base, Instance, InstanceStatus, utcnow
from screener.core.db.queue import LeasedQueue, lock_free_rows
from tests.helpers import scratch_database


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'queue.db'}")
        Base.metadata.create_all(engine)
        yield engine
        engine.dispose()
        return
    with scratch_database() as url:
        engine = create_engine(url)
        Base.metadata.create_all(engine)
        yield engine
        engine.dispose()


def _add(db: Engine, n: int) -> list[int]:
    with Session(db) as session, session.begin():
        rows = [
            Instance(
                sop_instance_uid=f"1.2.3.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                calling_ae_title="TEST",
                spool_name=f"f{i}",
                sha256="0" * 64,
                size_bytes=1,
                received_at=utcnow() + timedelta(milliseconds=i),
            )
            for i in range(n)
        ]
        session.add_all(rows)
        session.flush()
        return [r.id for r in rows]


def _queue(db: Engine, owner: str, lease: float = 60) -> LeasedQueue:
    return LeasedQueue(db, Instance, owner=owner, lease_seconds=lease)


def _claim(queue: LeasedQueue, limit: int, now: datetime | None = None) -> list[int]:
    now = now or utcnow()
    rows = queue.claim(
        limit,
        where=[Instance.status.in_([InstanceStatus.QUEUED, InstanceStatus.PROCESSING]), queue.free(now)],
        order_by=[Instance.received_at, Instance.id],
        values={"status": InstanceStatus.PROCESSING, "attempts": Instance.attempts + 1},
        returning=[Instance.id, Instance.attempts],
        now=now,
    )
    return [int(r[0]) for r in rows]


def test_claims_are_exclusive_and_updates_lease_guarded(db: Engine) -> None:
    ids = _add(db, 3)
    a, b = _queue(db, "host:1:a"), _queue(db, "host:1:b")
    assert _claim(a, 2) == ids[:2]  # oldest first
    assert _claim(b, 5) == ids[2:]
    assert _claim(a, 5) == []  # everything is leased
    with Session(db) as session, session.begin():
        # b cannot finish a's rows; a can finish its own, once.
        assert b.finish(session, ids[0], {"status": InstanceStatus.CLASSIFIED}) == 0
        assert a.finish(session, ids[0], {"status": InstanceStatus.CLASSIFIED}) == 1
        assert a.finish(session, ids[0], {"status": InstanceStatus.FAILED}) == 0
    assert a.release([ids[1]], {"status": InstanceStatus.QUEUED}) == 1
    assert _claim(b, 5) == [ids[1]]
    with Session(db) as session:
        got = {r.id: (r.status, r.lease_owner, r.attempts) for r in session.scalars(select(Instance))}
    assert got[ids[0]] == (InstanceStatus.CLASSIFIED, None, 1)
    assert got[ids[1]] == (InstanceStatus.PROCESSING, "host:1:b", 2)


def test_an_expired_lease_is_taken_over_and_the_old_owner_loses_its_row(db: Engine) -> None:
    (iid,) = _add(db, 1)
    a, b = _queue(db, "host:1:a", lease=10), _queue(db, "host:1:b")
    assert _claim(a, 1) == [iid]
    assert _claim(b, 1) == []
    assert _claim(b, 1, now=utcnow() + timedelta(seconds=11)) == [iid]
    with Session(db) as session, session.begin():
        assert a.finish(session, iid, {"status": InstanceStatus.CLASSIFIED}) == 0
    # reclaim_expired gives back any owner's expired lease, and only an expired one.
    assert b.reclaim_expired({"status": InstanceStatus.QUEUED}) == 0
    later = utcnow() + timedelta(seconds=120)
    assert b.reclaim_expired({"status": InstanceStatus.QUEUED}, now=later) == 1
    with Session(db) as session:
        row = session.get(Instance, iid)
        assert row is not None and row.status == InstanceStatus.QUEUED and row.lease_owner is None


def test_release_dead_frees_rows_of_a_dead_process_of_this_host_only(db: Engine) -> None:
    ids = _add(db, 3)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(gone.stdout)
    host = socket.gethostname()
    owners = [f"{host}:{dead_pid}:x", f"{host}:{os.getpid()}:y", f"elsewhere:{dead_pid}:z"]
    for iid, owner in zip(ids, owners, strict=True):
        assert _claim(_queue(db, owner), 1) == [iid]
    assert _queue(db, f"{host}:{os.getpid()}:me").release_dead({"status": InstanceStatus.QUEUED}) == 1
    with Session(db) as session:
        owners_now = {r.id: r.lease_owner for r in session.scalars(select(Instance))}
    assert owners_now == {ids[0]: None, ids[1]: owners[1], ids[2]: owners[2]}


def test_timestamps_come_back_aware_utc(db: Engine) -> None:
    (iid,) = _add(db, 1)
    plus_two = datetime(2026, 12, 2, 9, 30, tzinfo=timezone(timedelta(hours=2)))
    with Session(db) as session, session.begin():
        row = session.get(Instance, iid)
        assert row is not None
        row.lease_expires_at = plus_two
        row.spool_deleted_at = datetime(2026, 12, 2, 7, 30)  # naive: taken as UTC
    with db.connect() as conn:
        if db.dialect.name == "postgresql":
            conn.execute(text("SET TIME ZONE 'America/New_York'"))
        expires, deleted, received = conn.execute(
            select(Instance.lease_expires_at, Instance.spool_deleted_at, Instance.received_at)
        ).one()
        # Compared as aware values: 09:30+02:00 is 07:30 UTC, the naive one was stored as 07:30 UTC.
        assert expires == deleted == datetime(2026, 12, 2, 7, 30, tzinfo=UTC)
        assert expires.utcoffset() == timedelta(0) and received.tzinfo is not None
        n = conn.execute(
            select(Instance.id).where(Instance.lease_expires_at < datetime(2026, 12, 2, 8, 0, tzinfo=UTC))
        ).all()
        assert len(n) == 1


def test_lock_free_rows_skips_rows_another_transaction_holds(db: Engine) -> None:
    if db.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer: there the first write serialises settlers instead")
    ids = _add(db, 2)
    with Session(db) as first, first.begin():
        held = lock_free_rows(first, Instance.id, where=[Instance.id == ids[0]])
        assert held == [ids[0]]
        with Session(db) as second, second.begin():
            assert lock_free_rows(
                second, Instance.id, where=[Instance.id.in_(ids)], order_by=[Instance.id]
            ) == [ids[1]]


def test_a_lease_must_be_positive(db: Engine) -> None:
    with pytest.raises(ValueError, match="lease_seconds must be positive, not 0"):
        LeasedQueue(db, Instance, owner="o", lease_seconds=0)

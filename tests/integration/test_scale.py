"""Roles for scale, and the scheduler's jobs: two listeners and two workers on one PostgreSQL; retention."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text

from screener.core.config import load_config
from screener.core.db.migrate import upgrade
from screener.core.spool import Spool
from screener.ops.scheduler import apply_retention, reclaim_expired_leases
from tests.helpers import FakePacs, Server, cli, rg1_pixels, small_cr, store, wait_for


@pytest.mark.slow
@pytest.mark.postgres
def test_two_listeners_two_workers_one_postgresql_classify_each_instance_once(
    make_server, pg_url: str, tiny_model_dir: Path, tmp_path: Path
):
    pacs = FakePacs().start()
    spool = tmp_path / "shared-spool"
    common = {
        "SCREENER__DATABASE__URL": pg_url,
        "SCREENER__STORAGE__SPOOL_DIR": str(spool),
        "SCREENER__STORAGE__ORPHAN_GRACE_SECONDS": "300",
        "SCREENER__INFERENCE__MAX_BATCH": "16",
        "SCREENER__INFERENCE__POLL_SECONDS": "0.1",
        "SCREENER__INFERENCE__PREPROCESS_WORKERS": "1",
        "SCREENER__INFERENCE__STUDY_SETTLE_SECONDS": "3",
        "SCREENER__PACS__SWEEP_SECONDS": "0.3",
        "SCREENER__PACS__DESTINATIONS": f'[{{ae_title="FAKEPACS", host="127.0.0.1", port={pacs.port}}}]',
    }
    try:
        processes: list[Server] = []
        for role in ("listener", "listener", "worker", "worker", "settler", "sender"):
            processes.append(make_server(**common, role=role))
        cli(processes[0], "db", "upgrade")
        cli(processes[0], "models", "register", str(tiny_model_dir), "--activate")
        for server in processes:
            server.start()
        listeners = [s for s in processes if s.role == "listener"]
        studies = [generate_uid() for _ in range(10)]
        pixels = rg1_pixels(128)
        instances = [small_cr(pixels, study_uid=studies[i % 10]) for i in range(300)]
        results: list[list[int | None]] = [[] for _ in range(4)]

        def send(k: int) -> None:
            results[k] = store(listeners[k % 2].port, instances[k::4])

        threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert all(s == 0x0000 for r in results for s in r) and sum(map(len, results)) == 300
        db = processes[0]
        wait_for(
            lambda: db.rows("SELECT count(*) FROM instances WHERE status = 'classified'")[0][0] == 300,
            600,
            "300 instances classified",
        )
        counts = db.rows("SELECT instance_id, count(*) FROM predictions GROUP BY instance_id")
        assert len(counts) == 300 and all(c == 1 for _, c in counts), "exactly one prediction each"
        owners = {r[0] for r in db.rows("SELECT DISTINCT calling_ae_title FROM instances")}
        assert owners == {"TESTSCU"}
        wait_for(lambda: len({u for u, s in pacs.received if s == 0}) == 10, 240, "one SR per study")
        per_study = db.rows("SELECT study_id, count(*) FROM study_results GROUP BY study_id")
        assert len(per_study) == 10 and all(c == 1 for _, c in per_study), "one verdict (SR) per study"
        assert len({u for u, s in pacs.received if s == 0}) == 10
        workers = [
            e for s in processes if s.role == "worker" for e in s.log_events() if e["event"] == "batch.done"
        ]
        assert {e["logger"] for e in workers} == {"screener.worker"}
        busy = [
            s
            for s in processes
            if s.role == "worker" and any(e["event"] == "batch.done" for e in s.log_events())
        ]
        assert len(busy) == 2, "both workers took work"
        # Verdicts come from the settler threads of the workers and from the settler process, once each.
        verdicts = [e for s in processes for e in s.log_events() if e["event"] == "study.verdict"]
        assert len(verdicts) == 10 and {e["logger"] for e in verdicts} == {"screener.settler"}
        (settler,) = [s for s in processes if s.role == "settler"]
        assert any(e["event"] == "settler.started" for e in settler.log_events())
        assert not any(e["event"] == "model.loaded" for e in settler.log_events())
    finally:
        pacs.stop()


def test_retention_deletes_only_delivered_and_never_pending(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = create_engine(url)
    upgrade(engine)
    spool = Spool(tmp_path / "spool", 0)
    spool.ensure_layout()
    old = datetime.now(UTC) - timedelta(days=40)
    names = {
        key: spool.put(key.encode() * 100).name for key in ("delivered", "undelivered", "pending", "young")
    }
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO studies (id, study_instance_uid, first_received_at, last_received_at) "
                "VALUES (1, '1.2.1', :t, :t), (2, '1.2.2', :t, :t), (3, '1.2.3', :t, :t)"
            ),
            {"t": old},
        )
        conn.execute(
            text(
                "INSERT INTO model_versions (id, version, path, status, architectures, fusion_weight, "
                "onnx_sha256, card_json, created_at) VALUES (1, 'm', "
                "'/x', 'active', 'a+b', 0.5, 'x', '{}', :t)"
            ),
            {"t": old},
        )
        for i, (key, study, status, received) in enumerate(
            [
                ("delivered", 1, "classified", old),
                ("undelivered", 2, "classified", old),
                ("pending", 3, "queued", old),
                ("young", 1, "classified", datetime.now(UTC)),
            ],
            start=1,
        ):
            conn.execute(
                text(
                    "INSERT INTO instances (id, sop_instance_uid, "
                    "sop_class_uid, study_id, transfer_syntax_uid, "
                    "calling_ae_title, spool_name, sha256, size_bytes, "
                    "status, received_at, updated_at, attempts) "
                    "VALUES (:i, :u, '1.2.840.10008.5.1.4.1.1.1', :s, "
                    "'1.2.840.10008.1.2.1', 'T', :n, 'x', 1, :st, :r, :r, 0)"
                ),
                {"i": i, "u": f"1.3.{i}", "s": study, "n": names[key], "st": status, "r": received},
            )
        for sid in (1, 2):
            conn.execute(
                text(
                    "INSERT INTO study_results (id, study_id, "
                    "model_version_id, revision, verdict, instances_total, "
                    "instances_classified, instances_skipped, instances_failed, created_at) "
                    "VALUES (:i, :i, 1, 1, 'normal', 1, 1, 0, 0, :t)"
                ),
                {"i": sid, "t": old},
            )
        conn.execute(
            text(
                "INSERT INTO deliveries (study_result_id, destination, "
                "object_kind, sop_instance_uid, spool_name, status, "
                "attempts, next_attempt_at, created_at) VALUES (1, "
                "'P@h:1', 'sr', '9.1', 'x', 'sent', 1, :t, :t), "
                "(2, 'P@h:1', 'sr', '9.2', 'y', 'failed', 3, :t, :t)"
            ),
            {"t": old},
        )
    assert apply_retention(engine, spool, days=30) == 1
    assert not spool.path(names["delivered"]).exists()
    for key in ("undelivered", "pending", "young"):
        assert spool.path(names[key]).exists(), key
    with engine.connect() as conn:
        marked = (
            conn.execute(text("SELECT id FROM instances WHERE spool_deleted_at IS NOT NULL")).scalars().all()
        )
    assert marked == [1]
    assert apply_retention(engine, spool, days=30) == 0  # idempotent
    assert apply_retention(engine, spool, days=0) == 0  # 0 = keep forever
    engine.dispose()


def test_expired_leases_go_back_to_the_queue(tmp_path: Path):
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    past = datetime.now(UTC) - timedelta(minutes=5)
    future = datetime.now(UTC) + timedelta(minutes=5)
    with engine.begin() as conn:
        for i, expires in enumerate([past, future], start=1):
            conn.execute(
                text(
                    "INSERT INTO instances (id, sop_instance_uid, "
                    "sop_class_uid, transfer_syntax_uid, calling_ae_title, "
                    "spool_name, sha256, size_bytes, status, received_at, updated_at, attempts, lease_owner, "
                    "lease_expires_at) VALUES (:i, :u, '1.2', '1.2', 'T', 'n', "
                    "'x', 1, 'processing', :t, :t, 1, 'w', :e)"
                ),
                {"i": i, "u": f"1.4.{i}", "t": past, "e": expires},
            )
    assert reclaim_expired_leases(engine) == 1
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT id, status FROM instances")).all())
    assert rows == {1: "queued", 2: "processing"}
    engine.dispose()


def test_scheduler_jobs_per_role(tmp_path: Path):
    from screener.ops.scheduler import build_scheduler, job_ids

    config = load_config(None, environ={"SCREENER__SCHEDULER__RETRAIN_CRON": "30 2 * * *"})
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    spool = Spool(tmp_path / "spool", 0)
    all_roles = build_scheduler(config, engine, spool, roles=frozenset({"listener", "worker", "sender"}))
    assert job_ids(all_roles) == ["lease_reclaim", "orphan_sweep", "retention", "retrain"]
    assert job_ids(build_scheduler(config, engine, spool, roles=frozenset({"listener"}))) == ["orphan_sweep"]
    assert job_ids(build_scheduler(config, engine, spool, roles=frozenset({"sender"}))) == []
    engine.dispose()


def test_a_failing_job_is_logged_and_counted_and_the_scheduler_keeps_running(tmp_path: Path):
    import time

    from screener.core.metrics import Metrics
    from screener.ops.scheduler import build_scheduler

    config = load_config(None, environ={})
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    metrics = Metrics()
    sched = build_scheduler(
        config,
        engine,
        Spool(tmp_path / "spool", 0),
        roles=frozenset({"sender"}),
        on_failure=metrics.job_failed,
    )
    assert sched is not None
    ran: list[int] = []

    def broken() -> None:
        ran.append(1)
        raise RuntimeError("disk on fire")

    sched.add_job(broken, "interval", seconds=0.2, id="broken", next_run_time=datetime.now(UTC))
    sched.start()
    try:
        deadline = time.monotonic() + 10
        while len(ran) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sched.shutdown(wait=False)
    engine.dispose()
    assert len(ran) >= 2, "the job ran again after failing"
    assert 'screener_job_failures_total{job="broken"}' in metrics.exposition().decode()


def test_leases_of_dead_local_processes_are_released_at_start(tmp_path: Path):
    import socket
    import subprocess
    import sys

    from sqlalchemy.orm import Session

    from screener.core.db.models import Instance, InstanceStatus
    from screener.core.leases import release_dead_leases

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    owners = {
        1: f"{host}:{gone.pid}:dead",
        2: f"{host}:{os.getpid()}:alive",
        3: f"elsewhere:{gone.pid}:remote",
    }
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    future = datetime.now(UTC) + timedelta(minutes=5)
    with engine.begin() as conn:
        for i, owner in owners.items():
            conn.execute(
                text(
                    "INSERT INTO instances (id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, "
                    "calling_ae_title, spool_name, sha256, size_bytes, status, received_at, updated_at, "
                    "attempts, lease_owner, lease_expires_at) "
                    "VALUES (:i, :u, '1.2', '1.2', 'T', 'n', 'x', 1, 'processing', :t, :t, 1, :o, :t)"
                ),
                {"i": i, "u": f"1.5.{i}", "t": future, "o": owner},
            )
    with Session(engine) as session, session.begin():
        assert release_dead_leases(session, Instance, {"status": InstanceStatus.QUEUED}) == 1
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT id, status FROM instances")).all())
    assert rows == {1: "queued", 2: "processing", 3: "processing"}
    engine.dispose()

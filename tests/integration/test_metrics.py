"""Prometheus metrics and /healthz: the Health checks and the exposition in-process, then real
`screener serve` processes on SQLite and on a PostgreSQL cluster that is stopped and started again."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

from screener.core.config import MetricsConfig
from screener.core.db.migrate import ensure_at_head
from screener.core.db.models import Delivery, DeliveryStatus, Instance, InstanceStatus, Study, StudyResult
from screener.core.metrics import Health, Metrics, MetricsError, start_metrics
from screener.ingest.receive import IngestOutcome
from tests.helpers import Server, free_port, rg1_pixels, small_cr, store, wait_for

# --- helpers ------------------------------------------------------------------------------------------


def get(port: int, path: str) -> tuple[int, str, str]:
    """(HTTP status, content type, body) of GET ``path`` on the local metrics port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as rsp:
            return rsp.status, rsp.headers["Content-Type"], rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(exposition: str, name: str, **labels: str) -> float | None:
    return samples(exposition).get((name, tuple(sorted(labels.items()))))


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    status, content_type, body = get(port, "/healthz")
    assert content_type == "application/json"
    return status, json.loads(body)


@pytest.fixture
def db(tmp_path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    ensure_at_head(engine, auto_migrate=True)
    return engine


def add_instances(engine: Engine, statuses: list[InstanceStatus]) -> None:
    with Session(engine) as session, session.begin():
        for status in statuses:
            session.add(
                Instance(
                    sop_instance_uid=generate_uid(),
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    calling_ae_title="TESTSCU",
                    spool_name="aa/bb/x.dcm",
                    sha256="0" * 64,
                    size_bytes=1,
                    status=status,
                )
            )


# --- Health, in-process -------------------------------------------------------------------------------


def test_health_reports_each_failing_part_by_name() -> None:
    health = Health()
    health.register("listener", lambda: True)
    health.register("worker", lambda: False)

    def broken() -> bool:
        raise ConnectionError("peer gone")

    health.register("sender", broken)
    report = health.check()
    assert not report.healthy
    assert report.failing == ["sender", "worker"]
    body = report.as_dict()
    assert body["status"] == "unhealthy"
    assert body["checks"]["listener"] == {"ok": True}
    assert body["checks"]["worker"] == {"ok": False, "error": "not alive"}
    assert body["checks"]["sender"] == {"ok": False, "error": "ConnectionError"}  # the type, not the message


def test_health_with_only_the_parts_of_this_role_is_healthy() -> None:
    health = Health()
    health.register("listener", lambda: True)
    report = health.check()
    assert report.healthy and report.as_dict() == {
        "status": "ok",
        "failing": [],
        "checks": {"listener": {"ok": True}},
    }


def test_a_hanging_check_fails_within_its_timeout_and_is_not_piled_up() -> None:
    release = threading.Event()
    calls = []

    def hangs() -> bool:
        calls.append(1)
        release.wait(30)
        return True

    health = Health()
    health.register("database", hangs, timeout=0.2)
    health.register("listener", lambda: True)
    try:
        for _ in range(3):
            started = time.monotonic()
            report = health.check()
            assert time.monotonic() - started < 2
            assert report.failing == ["database"]
            assert "0.2s" in str(report.as_dict()["checks"]["database"]["error"])
        assert len(calls) == 1  # the stuck call is waited on again, never started a second time
    finally:
        release.set()
    wait_for(lambda: health.check().healthy, 5, "the check to recover once it answers", interval=0.05)


def test_database_check_runs_select_1(db: Engine, tmp_path: Path) -> None:
    health = Health()
    health.register_database(db)
    assert health.check().healthy
    missing = create_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    health.register_database(missing)
    report = health.check()
    assert report.failing == ["database"]
    assert report.as_dict()["checks"]["database"]["error"] == "OperationalError"


# --- exposition, in-process ---------------------------------------------------------------------------


def test_hooks_move_the_exposed_metrics() -> None:
    m = Metrics()
    m.declare_ingest_outcomes(o.value for o in IngestOutcome)  # as the listener does
    for _ in range(3):
        m.instance_received("stored")
    m.instance_received("database_unavailable")
    m.batch_done(
        size=4,
        inferred=3,
        infer_seconds=0.5,
        wall_seconds=0.8,
        counts={"classified": 3, "skipped": 1, "failed": 0, "lost_lease": 0},
    )
    m.model_loaded("v1", "onnxruntime")
    m.model_loaded("v2", "tensorrt")
    m.delivery_attempt("PACS@10.0.0.5:104", "failed")
    m.delivery_attempt("PACS@10.0.0.5:104", "sent")
    m.job_failed("retention")
    text = m.exposition().decode()
    assert value(text, "screener_instances_received_total", outcome="stored") == 3
    assert value(text, "screener_instances_received_total", outcome="database_unavailable") == 1
    assert value(text, "screener_instances_received_total", outcome="spool_full") == 0  # present from start
    assert value(text, "screener_instances_processed_total", status="classified") == 3
    assert value(text, "screener_instances_processed_total", status="skipped") == 1
    assert value(text, "screener_batch_size_count") == 1
    assert value(text, "screener_batch_size_bucket", le="4.0") == 1
    assert value(text, "screener_batch_size_bucket", le="2.0") == 0
    assert value(text, "screener_batch_latency_seconds_sum") == pytest.approx(0.8)
    assert value(text, "screener_inference_batch_seconds_sum") == pytest.approx(0.5)
    assert value(text, "screener_inference_images_per_second") == pytest.approx(6.0)
    assert value(text, "screener_model_info", version="v2", backend="tensorrt") == 1
    assert value(text, "screener_model_info", version="v1", backend="onnxruntime") is None  # replaced
    assert (
        value(text, "screener_delivery_attempts_total", destination="PACS@10.0.0.5:104", outcome="sent") == 1
    )
    assert value(text, "screener_job_failures_total", job="retention") == 1


def test_two_metrics_objects_do_not_share_a_registry() -> None:
    a, b = Metrics(), Metrics()
    b.declare_ingest_outcomes(["stored"])
    a.instance_received("stored")
    assert value(b.exposition().decode(), "screener_instances_received_total", outcome="stored") == 0


def test_scrape_reads_queue_depth_deliveries_and_spool_space(db: Engine, tmp_path: Path) -> None:
    add_instances(
        db,
        [InstanceStatus.QUEUED] * 3 + [InstanceStatus.PROCESSING] + [InstanceStatus.CLASSIFIED] * 2,
    )
    with Session(db) as session, session.begin():
        study = Study(study_instance_uid=generate_uid())
        session.add(study)
        session.flush()
        result = StudyResult(
            study_id=study.id,
            model_version_id=1,
            verdict="normal",
            instances_total=1,
            instances_classified=1,
            instances_skipped=0,
            instances_failed=0,
        )
        session.add(result)
        session.flush()
        for i, status in enumerate([DeliveryStatus.SENT, DeliveryStatus.DEAD, DeliveryStatus.DEAD]):
            session.add(
                Delivery(
                    study_result_id=result.id,
                    destination=f"PACS{i}@127.0.0.1:104",
                    object_kind="sr",
                    sop_instance_uid=generate_uid(),
                    spool_name="aa/bb/y.dcm",
                    status=status,
                )
            )
    text = Metrics(db, tmp_path).exposition().decode()
    assert value(text, "screener_queue_depth") == 4
    assert value(text, "screener_deliveries", status="sent") == 1
    assert value(text, "screener_deliveries", status="dead") == 2
    assert value(text, "screener_deliveries", status="pending") == 0
    assert value(text, "screener_study_verdicts_24h", verdict="normal") == 1  # labels: the verdicts seen
    assert value(text, "screener_study_verdicts_24h", verdict="covid19") is None
    free = value(text, "screener_spool_free_bytes")
    assert free is not None and free > 0


def test_scrape_answers_without_database_figures_when_it_is_down(tmp_path: Path) -> None:
    down = create_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    m = Metrics(down, tmp_path)
    m.instance_received("stored")
    text = m.exposition().decode()
    assert value(text, "screener_queue_depth") is None  # absent, never a misleading 0
    assert value(text, "screener_instances_received_total", outcome="stored") == 1
    assert value(text, "screener_spool_free_bytes") is not None


# --- HTTP endpoint, in-process ------------------------------------------------------------------------


def test_endpoint_serves_metrics_and_healthz(db: Engine, tmp_path: Path) -> None:
    settings = MetricsConfig(host="127.0.0.1", port=free_port())
    alive = threading.Event()
    alive.set()
    health = Health()
    health.register("worker", alive.is_set)
    health.register_database(db)
    metrics = Metrics(db, tmp_path)
    metrics.instance_received("stored")
    server = start_metrics(settings, health, metrics)
    try:
        assert server.port == settings.port
        status, content_type, body = get(settings.port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        assert value(body, "screener_instances_received_total", outcome="stored") == 1
        assert value(body, "screener_queue_depth") == 0
        assert healthz(settings.port) == (
            200,
            {"status": "ok", "failing": [], "checks": {"database": {"ok": True}, "worker": {"ok": True}}},
        )
        alive.clear()
        status, report = healthz(settings.port)
        assert status == 503 and report["status"] == "unhealthy" and report["failing"] == ["worker"]
        assert get(settings.port, "/other")[0] == 404
    finally:
        server.stop()
        server.stop()  # idempotent
    with pytest.raises(OSError):
        get(settings.port, "/healthz")


def test_port_0_disables_the_endpoint_and_a_taken_port_is_a_clear_error() -> None:
    disabled = start_metrics(MetricsConfig(port=0), Health())
    assert disabled.port is None
    disabled.stop()
    running = start_metrics(MetricsConfig(port=free_port()), Health())
    try:
        assert running.port is not None
        with pytest.raises(MetricsError, match=f"127.0.0.1:{running.port}.*metrics.port"):
            start_metrics(MetricsConfig(port=running.port), Health())
    finally:
        running.stop()


# --- `screener serve` ---------------------------------------------------------------------------------


def serve_with_metrics(make_server: Any, **overrides: str) -> tuple[Server, int]:
    """A started `screener serve` with its metrics endpoint on a free port: (server, metrics port)."""
    port = free_port()
    server = make_server(SCREENER__METRICS__PORT=str(port), **overrides)
    server.start()
    wait_for(lambda: _answers(port), 20, "the metrics endpoint to answer")
    return server, port


def _answers(port: int) -> bool:
    try:
        get(port, "/healthz")
    except OSError:
        return False
    return True


def test_serve_on_sqlite_is_healthy_with_every_part_checked(make_server: Any) -> None:
    server, port = serve_with_metrics(make_server)
    wait_for(lambda: healthz(port)[0] == 200, 30, "/healthz to turn 200")
    status, report = healthz(port)
    assert status == 200 and report["status"] == "ok" and report["failing"] == []
    assert set(report["checks"]) == {"listener", "worker", "settler", "sender", "database"}
    assert server.stop() == 0


@pytest.mark.postgres
def test_serve_on_postgresql_names_the_database_while_it_is_down(make_server: Any, pg_cluster: Any) -> None:
    server, port = serve_with_metrics(
        make_server, SCREENER__DATABASE__URL=pg_cluster.url, SCREENER__DATABASE__BUSY_TIMEOUT_MS="2000"
    )
    wait_for(lambda: healthz(port)[0] == 200, 30, "/healthz to turn 200")

    pg_cluster.stop()
    wait_for(lambda: healthz(port)[0] == 503, 20, "/healthz to turn 503 with the database down")
    status, report = healthz(port)
    assert status == 503 and report["status"] == "unhealthy" and "database" in report["failing"]
    assert report["checks"]["database"]["ok"] is False
    assert report["checks"]["listener"] == {"ok": True}
    status, _, body = get(port, "/metrics")  # a scrape still answers, without DB figures
    assert status == 200 and value(body, "screener_queue_depth") is None

    pg_cluster.start()
    wait_for(lambda: healthz(port)[0] == 200, 30, "/healthz to turn 200 with the database back")
    assert server.stop() == 0


def test_received_counter_and_queue_depth_follow_stored_instances(make_server: Any) -> None:
    server, port = serve_with_metrics(make_server)  # no model registered: instances stay queued
    before = get(port, "/metrics")[2]
    assert value(before, "screener_instances_received_total", outcome="stored") == 0
    assert value(before, "screener_queue_depth") == 0

    study = generate_uid()
    pixels = rg1_pixels(64)
    datasets = [small_cr(pixels, study_uid=study) for _ in range(3)]
    assert store(server.port, datasets) == [0x0000] * 3
    assert store(server.port, datasets[:1]) == [0x0000]  # a repeat: counted as a duplicate, not stored
    after = get(port, "/metrics")[2]
    assert value(after, "screener_instances_received_total", outcome="stored") == 3
    assert value(after, "screener_instances_received_total", outcome="duplicate") == 1
    assert value(after, "screener_queue_depth") == 3
    free = value(after, "screener_spool_free_bytes")
    assert free is not None and free > 0
    assert server.stop() == 0


def test_no_phi_in_metrics_or_healthz(make_server: Any) -> None:
    server, port = serve_with_metrics(make_server)
    study = generate_uid()
    ds = small_cr(
        rg1_pixels(64),
        study_uid=study,
        patient_name="Canaryname^Zebulon",
        patient_id="PID-CANARY-7731",
        birth_date="19230417",
        accession="ACC-CANARY-99",
    )
    assert store(server.port, [ds]) == [0x0000]
    metrics_text = get(port, "/metrics")[2]
    assert value(metrics_text, "screener_instances_received_total", outcome="stored") == 1
    exposed = metrics_text + get(port, "/healthz")[2]
    for canary in (
        "Canaryname",
        "Zebulon",
        "PID-CANARY-7731",
        "19230417",
        "ACC-CANARY-99",
        study,
        str(ds.SOPInstanceUID),
        str(ds.SeriesInstanceUID),
    ):
        assert canary not in exposed, f"{canary!r} appears on the metrics endpoint"
    assert server.stop() == 0

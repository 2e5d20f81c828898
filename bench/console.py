"""Console dashboard render time with 100,000 instances in PostgreSQL (issue 18: target < 300 ms).

A scratch database on the PostgreSQL server (``--pg``, default ``$SCREENER_TEST_PG`` or the local test
server) is migrated to head and filled with ``--instances`` instances over the last 30 days: two images per
study, 97% classified (a prediction each), 1% skipped, 1% failed, 1% still queued; one result per study and
one DICOM SR delivery per result (95% sent, 3% failed, 2% dead). Then the signed-in dashboard page
(``GET /dashboard``: every query, the SVG charts and the template) is requested ``--repeat`` times through
the console's ASGI application, and so is its baseline: ``screener status``'s queries
(:func:`screener.ops.status.collect_status`), which the dashboard includes. Medians and p95 are printed;
the last line is ``ratio=<dashboard p50 / status p50>``. The database is dropped at the end.

    nice -n 19 .venv/bin/python bench/console.py                 # 100,000 instances, 20 requests
    nice -n 19 .venv/bin/python bench/console.py --instances 10000 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, create_engine, insert, text
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from screener.core.config import ConsoleConfig
from screener.core.db.migrate import upgrade
from screener.core.db.models import (
    Delivery,
    Instance,
    ModelStatus,
    ModelVersion,
    Prediction,
    Study,
    StudyResult,
)
from screener.core.progress import Progress
from screener.model.modelcard import ModelCard, PreprocessSpec
from screener.ops.console import accounts
from screener.ops.console.web import ConsoleContext, build_app
from screener.ops.status import collect_status

DEFAULT_PG = os.environ.get("SCREENER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TARGET_MS = 300.0
PASSWORD = "benchmark password 1"  # noqa: S105 - a throwaway account in a scratch database
CLASSES = ("normal", "covid19", "viral_pneumonia")
CHUNK = 5000


def _card() -> str:
    return ModelCard(
        version="bench-1",
        classes=CLASSES,
        architectures=("resnet101", "resnet152"),
        input_size=224,
        preprocessing=PreprocessSpec(),
        fusion_weight=0.5,
        created_at="2026-11-01T00:00:00+00:00",
        files={"model.onnx": "0" * 64, "weights.safetensors": "1" * 64},
        opset=17,
        metrics={"accuracy": 0.93, "macro_f1": 0.92},
    ).to_json()


def fill(engine: Engine, instances: int, seed: int = 0) -> None:
    """Add ``instances`` instances (two per study) with their predictions, results and deliveries."""
    rng = random.Random(seed)  # noqa: S311 - synthetic data, reproducible by seed
    now = datetime.now(UTC)
    with Session(engine) as s, s.begin():
        model = ModelVersion(
            version="bench-1",
            path="/nonexistent",
            status=ModelStatus.ACTIVE,
            architectures="resnet101+resnet152",
            fusion_weight=0.5,
            onnx_sha256="0" * 64,
            card_json=_card(),
            activated_at=now - timedelta(days=31),
        )
        s.add(model)
        s.flush()
        model_id = model.id
        accounts.add_user(s, "bench", "viewer", PASSWORD)
    studies = instances // 2
    progress = Progress(total=-(-studies // CHUNK))
    next_instance = 1
    for start in range(0, studies, CHUNK):
        count = min(CHUNK, studies - start)
        study_rows, inst_rows, pred_rows, result_rows, delivery_rows = [], [], [], [], []
        for k in range(count):
            sid = start + k + 1
            arrived = now - timedelta(seconds=rng.uniform(0, 30 * 86400))
            study_rows.append(
                {
                    "id": sid,
                    "study_instance_uid": f"2.25.{uuid.uuid4().int}"[:64],
                    "first_received_at": arrived,
                    "last_received_at": arrived,
                }
            )
            verdict = rng.choices(CLASSES, weights=(80, 12, 8))[0]
            probs = {c: (0.8 if c == verdict else 0.1) for c in CLASSES}
            classified = 0
            for _ in range(2):
                roll = rng.random()
                status = (
                    "classified"
                    if roll < 0.97
                    else ("skipped" if roll < 0.98 else ("failed" if roll < 0.99 else "queued"))
                )
                iid = next_instance
                next_instance += 1
                inst_rows.append(
                    {
                        "id": iid,
                        "sop_instance_uid": f"2.25.{uuid.uuid4().int}"[:64],
                        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
                        "study_id": sid,
                        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                        "calling_ae_title": "MODALITY",
                        "spool_name": f"{iid % 256:02x}/{iid // 256 % 256:02x}/{iid}.dcm",
                        "sha256": "2" * 64,
                        "size_bytes": 500_000,
                        "status": status,
                        "received_at": arrived,
                        "updated_at": arrived,
                        "attempts": 1,
                    }
                )
                if status == "classified":
                    classified += 1
                    pred_rows.append(
                        {
                            "instance_id": iid,
                            "model_version_id": model_id,
                            "label": verdict,
                            "probs": probs,
                            "probs_a": list(probs.values()),
                            "probs_b": list(probs.values()),
                            "disagreement": 0.0,
                            "backend": "onnxruntime",
                            "batch_size": 8,
                            "preprocess_ms": 12.0,
                            "inference_ms": 55.0,
                            "created_at": arrived + timedelta(seconds=3),
                        }
                    )
            result_at = arrived + timedelta(seconds=rng.uniform(2, 30))
            result_rows.append(
                {
                    "id": sid,
                    "study_id": sid,
                    "model_version_id": model_id,
                    "revision": 1,
                    "verdict": verdict if classified else "not_analysed",
                    "probs": probs if classified else None,
                    "flagged": verdict != "normal" and classified > 0,
                    "instances_total": 2,
                    "instances_classified": classified,
                    "instances_skipped": 2 - classified,
                    "instances_failed": 0,
                    "created_at": result_at,
                }
            )
            roll = rng.random()
            state = "sent" if roll < 0.95 else ("failed" if roll < 0.98 else "dead")
            delivery_rows.append(
                {
                    "study_result_id": sid,
                    "destination": "PACS@10.0.0.5:104",
                    "object_kind": "sr",
                    "sop_instance_uid": f"2.25.{uuid.uuid4().int}"[:64],
                    "spool_name": f"results/{sid}.dcm",
                    "status": state,
                    "attempts": 1,
                    "next_attempt_at": result_at,
                    "created_at": result_at,
                    "sent_at": result_at + timedelta(seconds=rng.uniform(0.2, 3))
                    if state == "sent"
                    else None,
                }
            )
        with engine.begin() as conn:
            conn.execute(insert(Study), study_rows)
            conn.execute(insert(Instance), inst_rows)
            conn.execute(insert(Prediction), pred_rows)
            conn.execute(insert(StudyResult), result_rows)
            conn.execute(insert(Delivery), delivery_rows)
        progress.step(f"studies {start + count:,}/{studies:,}")
    if progress.tty:
        print(file=sys.stderr)
    with engine.begin() as conn:
        for table in ("studies", "instances", "predictions", "study_results", "deliveries"):
            conn.execute(
                text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))")
            )
    # What autovacuum does to tables this size within a minute: statistics, and the visibility map that lets
    # counts use index-only scans.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))


def _timed(fn: object, repeat: int) -> list[float]:
    assert callable(fn)
    fn()  # warm: connections, template compilation
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000.0)
    return out


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pg", default=DEFAULT_PG, help="PostgreSQL server URL (a scratch database is made on it)"
    )
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    name = f"screener_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = create_engine(f"{args.pg.rsplit('/', 1)[0]}/{name}")
    try:
        upgrade(engine)
        started = time.perf_counter()
        fill(engine, args.instances)
        print(f"filled {args.instances:,} instances in {time.perf_counter() - started:.1f} s")
        client = TestClient(build_app(ConsoleContext(ConsoleConfig(), engine, None)))
        page = client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token is not None
        client.post("/login", data={"name": "bench", "password": PASSWORD, "csrf_token": token.group(1)})

        def dashboard() -> None:
            r = client.get("/dashboard")
            assert r.status_code == 200 and f">{args.instances:,}<".replace(",", "") in r.text.replace(
                ",", ""
            )

        dash = _timed(dashboard, args.repeat)
        week = _timed(lambda: client.get("/dashboard?hours=168"), max(3, args.repeat // 4))
        status = _timed(lambda: collect_status(engine), args.repeat)
        p50, base = statistics.median(dash), statistics.median(status)
        print(f"instances={args.instances} requests={args.repeat}")
        print(
            f"dashboard (24 h window) p50={p50:.1f} ms p95={_p95(dash):.1f} ms  target < {TARGET_MS:.0f} ms: "
            f"{'met' if _p95(dash) < TARGET_MS else 'NOT met'}"
        )
        print(f"dashboard (7 d window)  p50={statistics.median(week):.1f} ms p95={_p95(week):.1f} ms")
        print(f"baseline: screener status queries p50={base:.1f} ms p95={_p95(status):.1f} ms")
        print("# ratio is dashboard p50 / screener status p50 (same database, same run)")
        print(f"ratio={p50 / base:.3f}")
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

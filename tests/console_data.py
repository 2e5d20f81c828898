"""A migrated database with studies, results and deliveries for the console's tests (real rows, a real
spooled chest radiograph), and a signed-in Starlette test client."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from screener.core.config import ConsoleConfig
from screener.core.db.migrate import upgrade
from screener.core.db.models import (
    ConsoleUser,
    Delivery,
    DeliveryStatus,
    Instance,
    InstanceStatus,
    ModelStatus,
    ModelVersion,
    Prediction,
    Study,
    StudyResult,
)
from screener.model.modelcard import ModelCard, PreprocessSpec
from screener.ops.console import accounts
from screener.ops.console.web import ConsoleContext, build_app
from tests.helpers import rg1_dir

PASSWORD = "correct horse battery staple"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class ConsoleDb:
    engine: Engine
    spool: Path
    study_ids: list[int]
    study_uids: list[str]
    patient_name: str


def make_db(tmp: Path, url: str | None = None) -> ConsoleDb:
    """Migrate ``url`` (default: SQLite under ``tmp``) and add three studies: one covid19 with an SR sent,
    one normal with a dead SR, one not analysed; users ana (admin), rui (reviewer), vera (viewer)."""
    engine = create_engine(url or f"sqlite:///{tmp / 'console.db'}")
    upgrade(engine)
    spool = tmp / "spool"
    (spool / "ab" / "cd").mkdir(parents=True)
    source = rg1_dir() / "RG1_UNCR.dcm"
    shutil.copyfile(source, spool / "ab" / "cd" / "one.dcm")
    header = dcmread(source, stop_before_pixels=True)
    now = datetime.now(UTC)
    uids = [
        "1.2.826.0.1.3680043.8.498.1001",
        "1.2.826.0.1.3680043.8.498.1002",
        "1.2.826.0.1.3680043.8.498.1003",
    ]
    with Session(engine) as s, s.begin():
        model = ModelVersion(
            version="cxr-test-1",
            path=str(tmp),
            status=ModelStatus.ACTIVE,
            architectures="resnet18+resnet34",
            fusion_weight=0.5,
            onnx_sha256="0" * 64,
            card_json=ModelCard(
                version="cxr-test-1",
                classes=("normal", "covid19", "viral_pneumonia"),
                architectures=("resnet18", "resnet34"),
                input_size=224,
                preprocessing=PreprocessSpec(),
                fusion_weight=0.5,
                created_at=(now - timedelta(days=2)).isoformat(),
                files={"model.onnx": "0" * 64, "weights.safetensors": "1" * 64},
                opset=17,
                metrics={"accuracy": 0.9, "macro_f1": 0.88},
                calibration={"vector_scale": [1.4, 1.5, 2.2], "vector_bias": [-0.1, -0.8, 0.9]},
            ).to_json(),
            activated_at=now - timedelta(days=1),
        )
        s.add(model)
        s.flush()
        ids = []
        for n, (uid, verdict) in enumerate(zip(uids, ("covid19", "normal", "not_analysed"), strict=True)):
            study = Study(study_instance_uid=uid, first_received_at=now - timedelta(minutes=30 - n))
            s.add(study)
            s.flush()
            ids.append(study.id)
            inst = Instance(
                sop_instance_uid=f"{uid}.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                study_id=study.id,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                calling_ae_title="MODALITY",
                spool_name="ab/cd/one.dcm",
                sha256="1" * 64,
                size_bytes=source.stat().st_size,
                status=InstanceStatus.SKIPPED if verdict == "not_analysed" else InstanceStatus.CLASSIFIED,
                received_at=now - timedelta(minutes=30 - n),
            )
            s.add(inst)
            s.flush()
            probs = None if verdict == "not_analysed" else _probs(verdict)
            if probs is not None:
                s.add(
                    Prediction(
                        instance_id=inst.id,
                        model_version_id=model.id,
                        label=verdict,
                        probs=probs,
                        probs_a=list(probs.values()),
                        probs_b=list(probs.values()),
                        disagreement=0.0,
                        backend="onnxruntime",
                        batch_size=1,
                        preprocess_ms=10.0,
                        inference_ms=20.0,
                    )
                )
            result = StudyResult(
                study_id=study.id,
                model_version_id=model.id,
                verdict=verdict,
                probs=probs,
                flagged=verdict == "covid19",
                instances_total=1,
                instances_classified=0 if probs is None else 1,
                instances_skipped=1 if probs is None else 0,
                instances_failed=0,
                created_at=now - timedelta(minutes=20 - n),
            )
            s.add(result)
            s.flush()
            if verdict != "not_analysed":
                sent = verdict == "covid19"
                s.add(
                    Delivery(
                        study_result_id=result.id,
                        destination="PACS@127.0.0.1:11112",
                        object_kind="sr",
                        sop_instance_uid=f"{uid}.9",
                        spool_name="results/x.dcm",
                        status=DeliveryStatus.SENT if sent else DeliveryStatus.DEAD,
                        attempts=1 if sent else 5,
                        sent_at=now - timedelta(minutes=10) if sent else None,
                        last_error=None if sent else "association rejected",
                    )
                )
        ana = accounts.add_user(s, "ana", "admin", PASSWORD)
        # The same password: ana's argon2 hash verifies it for every account (one costly hash, not three).
        for name, role in (("rui", "reviewer"), ("vera", "viewer")):
            s.add(
                ConsoleUser(
                    name=name, role=role, password_hash=ana.password_hash, disabled=False, failed_logins=0
                )
            )
    return ConsoleDb(engine, spool, ids, uids, str(header.PatientName))


def _probs(verdict: str) -> dict[str, float]:
    base = {"normal": 0.1, "covid19": 0.1, "viral_pneumonia": 0.1}
    base[verdict] = 0.8
    return base


def client(db: ConsoleDb, settings: ConsoleConfig | None = None) -> TestClient:
    ctx = ConsoleContext(settings or ConsoleConfig(), db.engine, db.spool)
    return TestClient(build_app(ctx), follow_redirects=True)


def csrf_of(html: str) -> str:
    found = CSRF_RE.search(html)
    assert found is not None, "no CSRF field on the page"
    return found.group(1)


def sign_in(c: TestClient, name: str, password: str = PASSWORD) -> str:
    """Sign in through the form; returns the final page's HTML."""
    page = c.get("/login")
    r = c.post("/login", data={"name": name, "password": password, "csrf_token": csrf_of(page.text)})
    return r.text


def copy_db(template: ConsoleDb, tmp: Path) -> ConsoleDb:
    """A private copy of a SQLite ``template`` (database file and spool) under ``tmp``: migrating and
    hashing three passwords once per session instead of once per test."""
    source = Path(str(template.engine.url.database))
    shutil.copyfile(source, tmp / "console.db")
    shutil.copytree(template.spool, tmp / "spool")
    return ConsoleDb(
        create_engine(f"sqlite:///{tmp / 'console.db'}"),
        tmp / "spool",
        template.study_ids,
        template.study_uids,
        template.patient_name,
    )

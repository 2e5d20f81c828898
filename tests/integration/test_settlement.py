"""The study settler (screener.results.settlement) on its own: verdicts from the tables, SRs in the spool,
deliveries queued, once per study content, on SQLite and PostgreSQL, live and shadow."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session

from screener.core import audit
from screener.core.config import Config, load_config
from screener.core.db.migrate import upgrade
from screener.core.db.models import (
    AuditEvent,
    Delivery,
    Instance,
    InstanceStatus,
    ModelVersion,
    Prediction,
    Study,
    StudyResult,
    utcnow,
)
from screener.core.spool import Spool
from screener.model.registry import register
from screener.results.settlement import Settler
from tests.helpers import reuid, rg1_dir, scratch_database

DESTINATION = '[{ae_title="PACS", host="127.0.0.1", port=11112}]'


def _ready(engine: Engine, model_dir: Path) -> Engine:
    upgrade(engine)
    with Session(engine) as session, session.begin():
        register(session, model_dir, activate=True)
    return engine


@pytest.fixture
def sqlite_db(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Engine]:
    engine = _ready(create_engine(f"sqlite:///{tmp_path / 'screener.db'}"), tiny_model_dir)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_db(tiny_model_dir: Path) -> Iterator[Engine]:
    with scratch_database() as url:
        engine = _ready(create_engine(url), tiny_model_dir)
        yield engine
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> Engine:
    engine: Engine = request.getfixturevalue(f"{'pg' if request.param == 'postgresql' else 'sqlite'}_db")
    return engine


def _config(mode: str = "live") -> Config:
    return load_config(environ={"SCREENER__PACS__DESTINATIONS": DESTINATION, "SCREENER__RESULTS__MODE": mode})


def _settler(db: Engine, spool: Spool, config: Config) -> Settler:
    return Settler(
        db,
        spool,
        threading.Event(),
        settle_seconds=0,
        pacs=config.pacs,
        results=config.results,
    )


def _study(db: Engine, spool: Spool, tmp_path: Path, labels: list[str | None]) -> str:
    """A study of real radiographs, one per label: classified with that label, or skipped (None)."""
    study_uid = generate_uid()
    with Session(db) as session, session.begin():
        model_id = session.scalars(select(ModelVersion.id)).one()
        study = Study(study_instance_uid=study_uid)
        session.add(study)
        session.flush()
        for n, label in enumerate(labels):
            path = tmp_path / f"{study_uid}-{n}.dcm"
            ds = reuid(rg1_dir() / "RG1_UNCR.dcm", path, study_uid=study_uid)
            entry = spool.put(path.read_bytes())
            inst = Instance(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                study_id=study.id,
                series_instance_uid=str(ds.SeriesInstanceUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                calling_ae_title="TEST",
                spool_name=entry.name,
                sha256=entry.sha256,
                size_bytes=entry.size_bytes,
                status=InstanceStatus.CLASSIFIED if label else InstanceStatus.SKIPPED,
                status_reason=None if label else "not a frontal chest radiograph: lateral view",
                model_version_id=model_id,
            )
            session.add(inst)
            session.flush()
            if label:
                probs = {"normal": 0.1, "covid19": 0.1, "viral_pneumonia": 0.1}
                probs[label] = 0.8
                session.add(
                    Prediction(
                        instance_id=inst.id,
                        model_version_id=model_id,
                        label=label,
                        probs=probs,
                        probs_a=list(probs.values()),
                        probs_b=list(probs.values()),
                        disagreement=0.0,
                        backend="onnxruntime",
                        batch_size=1,
                        preprocess_ms=1.0,
                        inference_ms=1.0,
                    )
                )
    return study_uid


def _results(db: Engine) -> list[tuple[str, str, int]]:
    with Session(db) as session:
        rows = session.execute(
            select(Study.study_instance_uid, StudyResult.verdict, StudyResult.revision).join(
                Study, Study.id == StudyResult.study_id
            )
        ).all()
    return sorted((str(r[0]), str(r[1]), int(r[2])) for r in rows)


def test_a_quiet_study_gets_one_verdict_and_its_sr_is_queued(db: Engine, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    spool.ensure_layout()
    settler = _settler(db, spool, _config())
    covid = _study(db, spool, tmp_path, ["normal", "covid19", None])
    with Session(db) as session, session.begin():  # a study still being classified is not due
        busy = _study(db, spool, tmp_path, ["normal"])
        session.execute(
            Instance.__table__.update()
            .where(
                Instance.study_id
                == select(Study.id).where(Study.study_instance_uid == busy).scalar_subquery()
            )
            .values(status=InstanceStatus.QUEUED)
        )
    assert settler.settle_due() == 1
    assert _results(db) == [(covid, "covid19", 1)]
    assert settler.settle_due() == 0  # fresh: nothing to do until the study changes
    with Session(db) as session:
        (delivery,) = session.scalars(select(Delivery)).all()
        result = session.scalars(select(StudyResult)).one()
        assert result.instances_total == 3 and result.instances_skipped == 1 and result.flagged
        produced = session.scalars(select(AuditEvent).where(AuditEvent.action == audit.RESULT_PRODUCED)).one()
    assert delivery.destination == "PACS@127.0.0.1:11112" and delivery.object_kind == "sr"
    sr = dcmread(spool.path(delivery.spool_name))
    assert sr.StudyInstanceUID == covid and sr.SOPInstanceUID == delivery.sop_instance_uid
    assert produced.subject == covid and json.loads(produced.detail or "{}")["verdict"] == "covid19"
    # A late instance makes the study due again: a second revision, a second SR.
    with Session(db) as session, session.begin():
        session.execute(
            Study.__table__.update()
            .where(Study.study_instance_uid == covid)
            .values(last_received_at=utcnow())
        )
    assert settler.settle_due() == 1
    assert _results(db) == [(covid, "covid19", 1), (covid, "covid19", 2)]


def test_shadow_mode_records_the_verdict_and_queues_nothing(sqlite_db: Engine, tmp_path: Path) -> None:
    db = sqlite_db
    spool = Spool(tmp_path / "spool", 0)
    spool.ensure_layout()
    study = _study(db, spool, tmp_path, ["viral_pneumonia"])
    assert _settler(db, spool, _config("shadow")).settle_due() == 1
    assert _results(db) == [(study, "viral_pneumonia", 1)]
    with Session(db) as session:
        assert session.scalar(select(func.count()).select_from(Delivery)) == 0
        withheld = session.scalars(select(AuditEvent).where(AuditEvent.action == audit.RESULT_WITHHELD)).one()
    assert json.loads(withheld.detail or "{}")["destinations"] == ["PACS@127.0.0.1:11112"]


def test_concurrent_settlers_make_one_verdict_per_study(pg_db: Engine, tmp_path: Path) -> None:
    """Settlers on several hosts (PostgreSQL): each study settled once, none waiting for another."""
    db = pg_db
    spool = Spool(tmp_path / "spool", 0)
    spool.ensure_layout()
    studies = [_study(db, spool, tmp_path, ["normal"]) for _ in range(8)]
    config = _config()
    settlers = [_settler(db, spool, config) for _ in range(3)]
    made: list[int] = []
    threads = [threading.Thread(target=lambda s=s: made.append(s.settle_due())) for s in settlers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(made) == len(studies)
    assert _results(db) == sorted((s, "normal", 1) for s in studies)
    with Session(db) as session:
        assert session.scalar(select(func.count()).select_from(Delivery)) == len(studies)

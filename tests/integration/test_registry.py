"""Model registry: the promotion gate, rollback, and a running screener switching models safely."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from screener.core.db.migrate import upgrade
from screener.core.db.models import ModelEvent, ModelStatus, ModelVersion
from screener.core.errors import ModelError
from screener.model.export import create_random_model_dir
from screener.model.registry import active_version, register
from tests.helpers import SCREENER, cli, rg1_pixels, small_cr, store, wait_for
from trainer.evaluate import gate_passes
from trainer.registry import promote, rollback

TRAINER = SCREENER.with_name("trainer")


def _report(macro_f1: float, covid_sensitivity: float) -> dict:
    return {"macro_f1": macro_f1, "per_class": {"covid19": {"sensitivity": covid_sensitivity}}}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    dirs = []
    for n in range(3):
        out = root / f"tiny-{n}"
        create_random_model_dir(
            out, arch_a="resnet18", arch_b="resnet34", input_size=64, seed=n, version=f"tiny-{n}"
        )
        dirs.append(out)
    return dirs


def test_gate_refuses_worse_and_accepts_better_or_equal():
    ok, reason = gate_passes(_report(0.80, 0.90), _report(0.85, 0.90))
    assert not ok and "macro-F1 0.8000 vs active 0.8500" in reason
    ok, reason = gate_passes(_report(0.90, 0.70), _report(0.85, 0.90))
    assert not ok and "sensitivity 0.7000 vs active 0.9000" in reason
    assert gate_passes(_report(0.90, 0.95), _report(0.85, 0.90))[0]
    assert gate_passes(_report(0.85, 0.90), _report(0.85, 0.90))[0]
    assert gate_passes(_report(0.84, 0.90), _report(0.85, 0.90), tolerance=0.02)[0]


def test_promote_gate_force_and_rollback(tmp_path: Path, tiny_models: list[Path]):
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    with Session(engine) as session, session.begin():
        for d in tiny_models:
            register(session, d)
        first = promote(session, "tiny-0", candidate_report=None, active_report=None)
        assert first.promoted and first.reason == "no model was active"
        refused = promote(
            session, "tiny-1", candidate_report=_report(0.5, 0.5), active_report=_report(0.6, 0.6)
        )
        assert not refused.promoted
        assert active_version(session).version == "tiny-0"
        with pytest.raises(ModelError, match="--data"):
            promote(session, "tiny-1", candidate_report=None, active_report=None)
        better = promote(
            session, "tiny-1", candidate_report=_report(0.7, 0.9), active_report=_report(0.6, 0.6)
        )
        assert better.promoted and better.previous == "tiny-0"
        forced = promote(session, "tiny-2", candidate_report=None, active_report=None, force=True)
        assert forced.promoted and forced.forced
        assert active_version(session).version == "tiny-2"
        back = rollback(session)
        assert back.version == "tiny-1" and back.previous == "tiny-2"
        assert active_version(session).version == "tiny-1"
        statuses = {r.version: r.status for r in session.scalars(select(ModelVersion))}
        assert statuses == {
            "tiny-0": ModelStatus.RETIRED,
            "tiny-1": ModelStatus.ACTIVE,
            "tiny-2": ModelStatus.RETIRED,
        }
        actions = [
            (e.version, e.action, e.forced)
            for e in session.scalars(select(ModelEvent).order_by(ModelEvent.id))
        ]
        assert ("tiny-1", "refused", False) in actions
        assert ("tiny-2", "promoted", True) in actions
        assert actions[-1] == ("tiny-1", "rolled_back", False)
    engine.dispose()


def test_tampered_candidate_cannot_be_registered(tmp_path: Path, tiny_models: list[Path]):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_models[0], bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    with Session(engine) as session, pytest.raises(ModelError, match=r"model\.onnx sha256"):
        register(session, bad)
    engine.dispose()


@pytest.mark.slow
def test_running_screener_switches_models_without_losing_or_double_classifying(make_server, tiny_models):
    server = make_server(
        SCREENER__INFERENCE__MAX_BATCH="2",
        SCREENER__INFERENCE__POLL_SECONDS="0.1",
        SCREENER__INFERENCE__PREPROCESS_WORKERS="1",
        SCREENER__INFERENCE__STUDY_SETTLE_SECONDS="600",
    )
    cli(server, "db", "upgrade")
    for d in tiny_models[:2]:
        cli(server, "models", "register", str(d))
    cli(server, "models", "activate", "tiny-0")
    server.start()
    study = generate_uid()
    pixels = rg1_pixels(256)
    first = [small_cr(pixels, study_uid=study) for _ in range(12)]
    assert store(server.port, first) == [0x0000] * len(first)
    wait_for(lambda: server.rows("SELECT count(*) FROM predictions")[0][0] >= 2, 120, "the first predictions")
    res = subprocess.run(
        [str(TRAINER), "models", "promote", "tiny-1", "--force"],
        cwd=server.workdir,
        env=server.env(),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    second = [small_cr(pixels, study_uid=study) for _ in range(6)]
    assert store(server.port, second) == [0x0000] * len(second)
    total = len(first) + len(second)
    wait_for(
        lambda: server.rows("SELECT count(*) FROM instances WHERE status = 'classified'")[0][0] == total,
        240,
        "every instance classified",
    )
    rows = server.rows(
        "SELECT p.instance_id, count(*), min(m.version) FROM predictions p "
        "JOIN model_versions m ON m.id = p.model_version_id GROUP BY p.instance_id"
    )
    assert len(rows) == total and all(c == 1 for _, c, _ in rows)
    versions = {v for _, _, v in rows}
    assert versions == {"tiny-0", "tiny-1"}, versions
    loaded = [e for e in server.log_events() if e["event"] == "model.loaded"]
    assert [e["version"] for e in loaded] == ["tiny-0", "tiny-1"]

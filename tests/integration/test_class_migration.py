"""Migration 0012 moves the three ``p_*`` columns into a per-class JSON map and back, on SQLite and
PostgreSQL; the reporting views keep working on both sides of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, create_engine, text

from screener.core.db.migrate import _alembic_config, upgrade

COVID = {"normal": 0.1, "covid19": 0.7, "viral_pneumonia": 0.2}


def _migrate(engine: Engine, revision: str, *, down: bool = False) -> None:
    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


def _seed_0011(engine: Engine) -> None:
    """One model, one study with a COVID-19 image and a normal one, and two verdicts (one not analysed)."""
    now = "2026-12-01 10:00:00"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO model_versions (id, version, path, status, architectures, fusion_weight, "
                "onnx_sha256, card_json, created_at) VALUES (1, 'm1', '/m', 'active', 'a+b', 0.5, :sha, "
                "'{}', :now)"
            ),
            {"sha": "0" * 64, "now": now},
        )
        conn.execute(
            text(
                "INSERT INTO studies (id, study_instance_uid, first_received_at, last_received_at) "
                "VALUES (1, '1.2.3', :now, :now), (2, '1.2.4', :now, :now)"
            ),
            {"now": now},
        )
        for n, (label, probs) in enumerate(
            (("covid19", COVID), ("normal", {"normal": 0.8, "covid19": 0.15, "viral_pneumonia": 0.05})), 1
        ):
            conn.execute(
                text(
                    "INSERT INTO instances (id, sop_instance_uid, sop_class_uid, study_id, "
                    "transfer_syntax_uid, calling_ae_title, spool_name, sha256, size_bytes, status, "
                    "received_at, updated_at, attempts) VALUES (:id, :uid, '1.2.840.10008.5.1.4.1.1.1', 1, "
                    "'1.2.840.10008.1.2.1', 'SCU', :spool, :sha, 10, 'classified', :now, :now, 1)"
                ),
                {"id": n, "uid": f"1.2.3.{n}", "spool": f"s{n}", "sha": "1" * 64, "now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO predictions (instance_id, model_version_id, label, p_normal, p_covid19, "
                    "p_viral_pneumonia, probs_a, probs_b, disagreement, backend, batch_size, preprocess_ms, "
                    "inference_ms, created_at) VALUES (:id, 1, :label, :pn, :pc, :pv, '[]', '[]', 0, 'x', 1, "
                    "1, 1, :now)"
                ),
                {
                    "id": n,
                    "label": label,
                    "pn": probs["normal"],
                    "pc": probs["covid19"],
                    "pv": probs["viral_pneumonia"],
                    "now": now,
                },
            )
        conn.execute(
            text(
                "INSERT INTO study_results (study_id, model_version_id, revision, verdict, p_normal, "
                "p_covid19, p_viral_pneumonia, instances_total, instances_classified, instances_skipped, "
                "instances_failed, created_at) VALUES (1, 1, 1, 'covid19', 0.1, 0.7, 0.2, 2, 2, 0, 0, :now), "
                "(2, 1, 1, 'not_analysed', NULL, NULL, NULL, 1, 0, 1, 0, :now)"
            ),
            {"now": now},
        )


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_class_columns_become_a_map_and_come_back(backend: str, tmp_path: Path, request: Any) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    engine = create_engine(url)
    try:
        upgrade(engine, "0011")
        _seed_0011(engine)
        upgrade(engine, "0013")
        with engine.connect() as conn:
            probs = {
                label: _json(p)
                for label, p in conn.execute(text("SELECT label, probs FROM predictions ORDER BY id"))
            }
            results = list(
                conn.execute(text("SELECT verdict, probs, flagged FROM study_results ORDER BY study_id"))
            )
            positives = list(
                conn.execute(text("SELECT study_instance_uid, verdict, probs FROM report_positives"))
            )
            daily = {
                r[0]: r[1] for r in conn.execute(text("SELECT verdict, results FROM report_daily_verdicts"))
            }
        assert probs["covid19"] == pytest.approx(COVID)
        assert set(probs["normal"]) == set(COVID)
        assert results[0][0] == "covid19" and _json(results[0][1]) == pytest.approx(COVID) and results[0][2]
        assert results[1][0] == "not_analysed" and results[1][1] is None and not results[1][2]
        assert [(uid, verdict) for uid, verdict, _ in positives] == [("1.2.3", "covid19")]
        assert _json(positives[0][2]) == pytest.approx(COVID)
        assert daily == {"covid19": 1, "not_analysed": 1}

        _migrate(engine, "0011", down=True)
        with engine.connect() as conn:
            back = list(
                conn.execute(
                    text("SELECT p_normal, p_covid19, p_viral_pneumonia FROM predictions ORDER BY id")
                )
            )
            verdicts = list(conn.execute(text("SELECT p_covid19 FROM study_results ORDER BY study_id")))
            old_view = list(conn.execute(text("SELECT covid19, not_analysed FROM report_daily_verdicts")))
        assert back[0] == pytest.approx((0.1, 0.7, 0.2))
        assert verdicts[0][0] == pytest.approx(0.7) and verdicts[1][0] is None
        assert [tuple(r) for r in old_view] == [(1, 1)]
    finally:
        engine.dispose()

"""The console's model admin runs the trainer's own commands (``trainer models promote|rollback``) with the
daemon's settings file: the gate is enforced, a rollback re-activates the previous model, both audited."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from screener.core.config import ConsoleConfig
from screener.core.db.models import AuditEvent, ModelStatus, ModelVersion
from screener.ops.console.web import ConsoleContext, build_app
from tests.console_data import csrf_of, make_db, sign_in
from tests.helpers import REPO


def test_promote_goes_through_the_gate_and_rollback_restores_the_previous_model(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    db = make_db(tmp_path)
    with Session(db.engine) as s, s.begin():
        active = s.scalars(select(ModelVersion)).one()
        s.add(
            ModelVersion(
                version="cxr-test-0",
                path=str(tmp_path),
                status=ModelStatus.RETIRED,
                architectures=active.architectures,
                fusion_weight=0.5,
                onnx_sha256="2" * 64,
                card_json=active.card_json.replace("cxr-test-1", "cxr-test-0"),
                activated_at=datetime.now(UTC) - timedelta(days=10),
                retired_at=datetime.now(UTC) - timedelta(days=1),
            )
        )
    settings = tmp_path / "settings.toml"
    settings.write_text(f'[database]\nurl = "{db.engine.url.render_as_string(hide_password=False)}"\n')
    assert (REPO / "config.toml").is_file()  # the trainer must read settings.toml, not the repository's
    ctx = ConsoleContext(ConsoleConfig(), db.engine, db.spool, config_source=str(settings))
    c = TestClient(build_app(ctx), follow_redirects=True)
    sign_in(c, "ana")
    page = c.get("/admin/models")
    assert "cxr-test-0" in page.text and "cxr-test-1" in page.text
    token = csrf_of(page.text)

    # The retired version cannot come back without the gate's evaluation data (none configured here).
    r = c.post("/admin/models/promote", data={"version": "cxr-test-0", "csrf_token": token})
    assert "trainer models promote cxr-test-0" in r.text and "(exit 1)" in r.text
    assert "promotion gate needs both models evaluated" in r.text
    with Session(db.engine) as s:
        assert (
            s.scalar(select(ModelVersion.version).where(ModelVersion.status == ModelStatus.ACTIVE))
            == "cxr-test-1"
        )

    r = c.post("/admin/models/rollback", data={"csrf_token": token})
    assert "(exit 0)" in r.text and "cxr-test-0" in r.text
    with Session(db.engine) as s:
        assert (
            s.scalar(select(ModelVersion.version).where(ModelVersion.status == ModelStatus.ACTIVE))
            == "cxr-test-0"
        )
        actions = [(e.action, e.actor) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert ("model.rolled_back", "operator") in actions  # the trainer's own audit row
    assert ("console.model_promote", "console:ana") in actions
    assert ("console.model_rollback", "console:ana") in actions

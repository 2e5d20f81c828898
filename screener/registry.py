"""The ``model_versions`` table: register model directories, activate one, find the active one."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from screener.db.models import ModelStatus, ModelVersion, utcnow
from screener.errors import ModelError
from screener.modelcard import load_model_dir


def register(session: Session, model_dir: Path, *, activate: bool = False) -> ModelVersion:
    """Verify ``model_dir`` (every sha256) and record it as a candidate (idempotent per version).

    Raises:
        ModelError / ModelIntegrityError: the directory is incomplete or a file was altered.
    """
    loaded = load_model_dir(model_dir)
    card = loaded.card
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == card.version))
    onnx_sha = card.files["model.onnx"]
    if row is None:
        row = ModelVersion(
            version=card.version,
            path=str(model_dir.resolve()),
            status=ModelStatus.CANDIDATE,
            architectures="+".join(card.architectures),
            fusion_weight=card.fusion_weight,
            onnx_sha256=onnx_sha,
            card_json=card.to_json(),
        )
        session.add(row)
        session.flush()
    elif row.onnx_sha256 != onnx_sha:
        raise ModelError(
            f"model version {card.version} is already registered with a different model.onnx "
            f"({row.onnx_sha256[:12]} != {onnx_sha[:12]}): give the new model a new version"
        )
    if activate:
        activate_version(session, card.version)
    return row


def activate_version(session: Session, version: str) -> ModelVersion:
    """Make ``version`` the one active model; the previously active one is retired."""
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version).with_for_update())
    if row is None:
        known = ", ".join(session.scalars(select(ModelVersion.version))) or "none"
        raise ModelError(
            f"no model version {version!r} is registered (known: {known}); run `screener models register DIR`"
        )
    now = utcnow()
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.status == ModelStatus.ACTIVE, ModelVersion.id != row.id)
        .values(status=ModelStatus.RETIRED, retired_at=now)
    )
    row.status = ModelStatus.ACTIVE
    row.activated_at = now
    row.retired_at = None
    return row


def active_version(session: Session) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion)
        .where(ModelVersion.status == ModelStatus.ACTIVE)
        .order_by(ModelVersion.activated_at.desc())
    )


def list_versions(session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.created_at)))

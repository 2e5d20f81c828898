"""Promotion with a gate, and rollback, over the ``model_versions`` table (audited in ``model_events``).

A candidate becomes active only if, on the same evaluation set, its macro-F1 and COVID-19 sensitivity
are not worse than the active model's (``trainer.gate_tolerance`` allows a small slack) and, where the
candidate's card carries figures from sources it never trained on (``metrics.out_of_source``, from
``trainer crossval --leave-source-out``), neither are those. ``--force``
overrides the gate and is recorded. Running screeners pick up the new active model by themselves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from screener.core import audit
from screener.core.db.models import ModelEvent, ModelStatus, ModelVersion, utcnow
from screener.core.errors import ModelError
from screener.model.registry import activate_version, active_version
from trainer.evaluate import gate_passes, out_of_source_gate


@dataclass(frozen=True)
class Decision:
    promoted: bool
    version: str
    previous: str | None
    reason: str
    forced: bool = False


def _event(
    session: Session,
    version: str,
    action: str,
    reason: str,
    *,
    forced: bool = False,
    report: Mapping[str, Any] | None = None,
) -> None:
    session.add(
        ModelEvent(
            version=version,
            action=action,
            forced=forced,
            reason=reason,
            report_json=json.dumps(report, sort_keys=True, default=str) if report is not None else None,
        )
    )


def promote(
    session: Session,
    version: str,
    *,
    candidate_report: Mapping[str, Any] | None,
    active_report: Mapping[str, Any] | None,
    force: bool = False,
    tolerance: float = 0.0,
    actor: str = "operator",
) -> Decision:
    """Make ``version`` active if the gate passes (or ``force``); record the decision either way.

    Raises ModelError when the version is unknown, or when the gate needs reports that were not given.
    """
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if row is None:
        raise ModelError(f"no model version {version!r} is registered; register it first")
    current = active_version(session)
    if current is not None and current.version == version:
        return Decision(False, version, version, f"{version} is already the active model")
    if current is None:
        ok, reason = True, "no model was active"
    elif force:
        ok, reason = True, "gate overridden with --force"
    else:
        if candidate_report is None or active_report is None:
            raise ModelError(
                "the promotion gate needs both models evaluated on the same data: pass --data DIR"
            )
        ok, reason = gate_passes(candidate_report, active_report, tolerance)
        if ok:
            shifted_ok, shifted = out_of_source_gate(
                _card_metrics(row.card_json), _card_metrics(current.card_json), tolerance
            )
            if not shifted_ok:
                ok, reason = False, shifted or reason
            elif shifted:
                reason = f"{reason}; {shifted}"
    previous = current.version if current is not None else None
    if ok:
        activate_version(session, version)
        audit.record(
            session,
            audit.MODEL_PROMOTED,
            actor=actor,
            subject=version,
            detail={"previous": previous, "forced": force and current is not None, "reason": reason},
        )
        _event(
            session,
            version,
            "promoted",
            reason,
            forced=force and current is not None,
            report=candidate_report,
        )
        if previous is not None:
            _event(session, previous, "retired", f"replaced by {version}")
    else:
        _event(session, version, "refused", reason, report=candidate_report)
    return Decision(ok, version, previous, reason, forced=force and current is not None)


def _card_metrics(card_json: str) -> dict[str, Any]:
    metrics = json.loads(card_json).get("metrics", {})
    return metrics if isinstance(metrics, dict) else {}


def rollback(session: Session, actor: str = "operator") -> Decision:
    """Re-activate the model that was active before the current one; the current one is retired.

    Raises ModelError when there is no active model or no earlier active one to return to.
    """
    current = active_version(session)
    if current is None:
        raise ModelError("no active model to roll back from")
    earlier = session.scalar(
        select(ModelVersion)
        .where(
            ModelVersion.id != current.id,
            ModelVersion.activated_at.is_not(None),
            ModelVersion.status == ModelStatus.RETIRED,
        )
        .order_by(ModelVersion.activated_at.desc())
        .limit(1)
    )
    if earlier is None:
        raise ModelError(f"{current.version} is the only model ever active: nothing to roll back to")
    activate_version(session, earlier.version)
    current.retired_at = utcnow()
    reason = f"rolled back from {current.version}"
    _event(session, earlier.version, "rolled_back", reason)
    audit.record(
        session,
        audit.MODEL_ROLLED_BACK,
        actor=actor,
        subject=earlier.version,
        detail={"from": current.version},
    )
    return Decision(True, earlier.version, current.version, reason)


def record_registration(
    session: Session, version: str, reason: str, report: Mapping[str, Any] | None
) -> None:
    _event(session, version, "registered", reason, report=report)

"""The audit trail (``audit_events``): who did what, when. UIDs only, never patient names, IDs or dates."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session

from screener.core.db.models import AuditEvent

INSTANCE_RECEIVED = "instance.received"
INSTANCE_RESTORED = "instance.restored"  # a resent copy replaced a kept file that had gone missing
RESULT_PRODUCED = "result.produced"
RESULT_DELIVERED = "result.delivered"
RESULT_WITHHELD = "result.withheld"  # results.mode = "shadow": recorded, not sent to the destinations named
MODEL_PROMOTED = "model.promoted"
MODEL_ROLLED_BACK = "model.rolled_back"


def record(
    session: Session, action: str, *, actor: str, subject: str, detail: Mapping[str, Any] | None = None
) -> None:
    """Add one audit row to ``session``'s transaction (it commits or rolls back with the work it records)."""
    session.add(
        AuditEvent(
            action=action,
            actor=actor[:128],
            subject=subject[:128],
            detail=json.dumps(detail, sort_keys=True, default=str) if detail else None,
        )
    )

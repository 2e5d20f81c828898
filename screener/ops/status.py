"""``screener status``: what is in the queue and which model serves it, from the database alone."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from screener.core import audit
from screener.core.db.models import (
    AuditEvent,
    Delivery,
    DeliveryStatus,
    Instance,
    InstanceClash,
    InstanceStatus,
    Prediction,
    Study,
    StudyResult,
)
from screener.model.registry import active_version


def collect_status(engine: Engine, results_mode: str = "live") -> dict[str, Any]:
    """Counts from the database; ``results_mode`` is the configured ``results.mode``, shown beside the
    verdicts withheld in shadow mode and the deliveries still waiting to be sent."""
    with Session(engine) as session:
        by_status = dict.fromkeys((s.value for s in InstanceStatus), 0)
        for status, count in session.execute(select(Instance.status, func.count()).group_by(Instance.status)):
            by_status[InstanceStatus(status).value] = int(count)
        studies = int(session.scalar(select(func.count()).select_from(Study)) or 0)
        clashes = int(session.scalar(select(func.count()).select_from(InstanceClash)) or 0)
        predictions = int(session.scalar(select(func.count()).select_from(Prediction)) or 0)
        results = int(session.scalar(select(func.count()).select_from(StudyResult)) or 0)
        withheld = int(
            session.scalar(
                select(func.count()).select_from(AuditEvent).where(AuditEvent.action == audit.RESULT_WITHHELD)
            )
            or 0
        )
        waiting = int(
            session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.FAILED]))
            )
            or 0
        )
        model = active_version(session)
    return {
        "instances": {"total": sum(by_status.values()), **by_status},
        "studies": studies,
        "study_results": results,
        "predictions": predictions,
        "clashes": clashes,
        "results": {"mode": results_mode, "withheld": withheld, "deliveries_waiting": waiting},
        "active_model": None
        if model is None
        else {"version": model.version, "architectures": model.architectures, "path": model.path},
    }


def render_status(status: dict[str, Any]) -> str:
    inst = status["instances"]
    lines = [f"instances: {inst['total']}"]
    lines += [f"  {name:<11} {inst[name]}" for name in (s.value for s in InstanceStatus)]
    lines.append(f"studies:   {status['studies']} ({status['study_results']} verdicts)")
    lines.append(
        f"clashes:   {status['clashes']} (same SOP Instance UID with different bytes, or a command whose "
        "UIDs disagreed with its data set)"
    )
    results = status["results"]
    if results["mode"] == "shadow":
        lines.append(
            f"results:   shadow - verdicts recorded, nothing delivered ({results['withheld']} withheld, "
            f"{results['deliveries_waiting']} queued deliveries waiting for live mode)"
        )
    else:
        lines.append(
            f"results:   live - verdicts delivered ({results['deliveries_waiting']} deliveries waiting, "
            f"{results['withheld']} withheld while in shadow mode)"
        )
    model = status["active_model"]
    if model is None:
        lines.append(
            "model:     none active - the worker is waiting; run `screener models register DIR --activate`"
        )
    else:
        lines.append(f"model:     {model['version']} ({model['architectures']})")
    return "\n".join(lines)

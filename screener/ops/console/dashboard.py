"""The dashboard's numbers: what ``screener status``, ``screener report`` and ``/metrics`` show, over one
window of recent hours, read with a handful of aggregate queries (no PHI: counts, durations, model figures).

Instance counts come from :func:`screener.ops.status.collect_status`; turnaround percentiles from
:func:`screener.ops.reporting.turnaround_summary` over the same measures as the ``report_turnaround`` view
(seconds from a study's first arrival to its result, and to its last DICOM SR sent when every SR of the
result was sent); queue depth as ``screener_queue_depth`` (queued + processing).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, case, func, select
from sqlalchemy.orm import Session

from screener.core.db.models import (
    Delivery,
    Instance,
    InstanceStatus,
    ModelVersion,
    Study,
    StudyResult,
)
from screener.core.db.queries import PG_TURNAROUND
from screener.model.registry import active_version
from screener.ops.reporting import PERCENTILES, turnaround_summary
from screener.ops.status import collect_status

WINDOWS_HOURS: tuple[int, ...] = (24, 24 * 7, 24 * 30)
"""The windows a user can choose: the last day, week or 30 days."""

READERS = 4  # connections one dashboard uses at once (the engine's pool holds 5 by default)
T = TypeVar("T")

CARD_FIGURES: tuple[str, ...] = ("accuracy", "test_accuracy", "macro_f1", "auc_macro", "ece")


def _shown(value: object) -> str | None:
    """A card calibration value as the dashboard prints it: 0.788, or "1.400 / 1.530 / 2.177" for one number
    per class (vector scaling); None for anything else."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.3f}"
    if isinstance(value, list) and value and all(isinstance(x, int | float) for x in value):
        return " / ".join(f"{x:.3f}" for x in value)
    return None


@dataclass(frozen=True)
class ActiveModel:
    version: str
    architectures: str
    activated_at: str | None
    figures: dict[str, float]
    calibration: dict[str, str]  # key -> value as shown (a temperature, or one number per class)
    thresholds: dict[str, float]
    int8: bool
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Dashboard:
    """Everything the dashboard page shows; plain values, ready for a template or JSON."""

    generated_at: str
    window_hours: int
    status: dict[str, Any]
    received_per_bucket: list[tuple[str, int]]
    bucket: str  # "hour" | "day"
    queue_depth: int
    oldest_queued_seconds: float | None
    turnaround: list[dict[str, Any]]
    verdicts: dict[str, int]
    deliveries: list[dict[str, Any]]
    model: ActiveModel | None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["model"] = None if self.model is None else dict(self.model.__dict__)
        return out


def _bucket_expr(engine: Engine, column: Any, bucket: str) -> Any:
    """The UTC hour or day of a timestamp column, as text, in either dialect."""
    if engine.dialect.name == "postgresql":
        fmt = "YYYY-MM-DD HH24:00" if bucket == "hour" else "YYYY-MM-DD"
        return func.to_char(func.timezone("UTC", column), fmt)
    return func.strftime("%Y-%m-%d %H:00" if bucket == "hour" else "%Y-%m-%d", column)


def _received(session: Session, engine: Engine, since: datetime, bucket: str) -> list[tuple[str, int]]:
    key = _bucket_expr(engine, Instance.received_at, bucket)
    rows = session.execute(
        select(key, func.count()).where(Instance.received_at >= since).group_by(key).order_by(key)
    ).all()
    return [(str(k), int(n)) for k, n in rows]


def _turnaround_rows(session: Session, since: datetime) -> list[dict[str, Any]]:
    """``seconds_to_result`` and ``seconds_to_delivery`` of every result since ``since``, as the
    ``report_turnaround`` view defines them (delivery: the last SR sent, when every SR of the result was)."""
    query = (
        select(
            Study.first_received_at,
            StudyResult.created_at,
            func.count(Delivery.id),
            func.sum(case((Delivery.status == "sent", 0), else_=1)),
            func.max(Delivery.sent_at),
        )
        .join(Study, Study.id == StudyResult.study_id)
        .outerjoin(Delivery, (Delivery.study_result_id == StudyResult.id) & (Delivery.object_kind == "sr"))
        .where(StudyResult.created_at >= since)
        .group_by(StudyResult.id, Study.first_received_at, StudyResult.created_at)
    )
    rows: list[dict[str, Any]] = []
    for arrived, result_at, n, unsent, last_sent in session.execute(query):
        start = arrived
        delivered = n and not unsent and last_sent is not None
        rows.append(
            {
                "seconds_to_result": (result_at - start).total_seconds(),
                "seconds_to_delivery": (last_sent - start).total_seconds() if delivered else None,
            }
        )
    return rows


def _turnaround(session: Session, engine: Engine, since: datetime) -> list[dict[str, Any]]:
    """:func:`screener.ops.reporting.turnaround_summary` of the window's results. On PostgreSQL the
    percentiles are computed in the database (``percentile_cont`` interpolates linearly between closest
    ranks, as :func:`~screener.ops.reporting.percentile` does), so a month of results is not sent over."""
    if engine.dialect.name != "postgresql":
        return turnaround_summary(_turnaround_rows(session, since))
    row = session.execute(PG_TURNAROUND, {"since": since, "qs": [q / 100.0 for q in PERCENTILES]}).one()
    out: list[dict[str, Any]] = []
    for measure, n, values in (
        ("seconds_to_result", row.n_result, row.p_result),
        ("seconds_to_delivery", row.n_delivery, row.p_delivery),
    ):
        summary: dict[str, Any] = {"measure": measure, "n": int(n), "missing": int(row.total) - int(n)}
        for q, value in zip(PERCENTILES, values or [None] * len(PERCENTILES), strict=True):
            summary[f"p{q:g}"] = None if value is None else round(float(value), 3)
        out.append(summary)
    return out


def _active_model(session: Session) -> ActiveModel | None:
    row: ModelVersion | None = active_version(session)
    if row is None:
        return None
    card = json.loads(row.card_json)
    metrics = card.get("metrics", {}) if isinstance(card.get("metrics"), dict) else {}
    figures = {k: float(metrics[k]) for k in CARD_FIGURES if isinstance(metrics.get(k), int | float)}
    shown = {k: _shown(v) for k, v in (card.get("calibration") or {}).items()}
    calibration = {k: v for k, v in shown.items() if v is not None}
    thresholds = {
        k: float(v) for k, v in (card.get("thresholds") or {}).items() if isinstance(v, int | float)
    }
    int8 = card.get("int8")
    int8_ok = isinstance(int8, dict) and int8.get("passed") is True  # served only when its gate passed
    return ActiveModel(
        version=row.version,
        architectures=row.architectures,
        activated_at=row.activated_at.isoformat(timespec="seconds") if row.activated_at else None,
        figures=figures,
        calibration=calibration,
        thresholds=thresholds,
        int8=int8_ok,
        classes=tuple(str(c) for c in card.get("classes", ())),
    )


def _read(engine: Engine, part: Callable[[Session], T]) -> T:
    with Session(engine) as session:
        return part(session)


def _verdicts(session: Session, since: datetime) -> dict[str, int]:
    query = (
        select(StudyResult.verdict, func.count())
        .where(StudyResult.created_at >= since)
        .group_by(StudyResult.verdict)
        .order_by(StudyResult.verdict)
    )
    return {str(v): int(n) for v, n in session.execute(query)}


def _deliveries(session: Session) -> list[dict[str, Any]]:
    query = (
        select(Delivery.channel, Delivery.destination, Delivery.object_kind, Delivery.status, func.count())
        .group_by(Delivery.channel, Delivery.destination, Delivery.object_kind, Delivery.status)
        .order_by(Delivery.channel, Delivery.destination, Delivery.object_kind, Delivery.status)
    )
    return [
        {"channel": c, "destination": d, "object": k, "status": getattr(s, "value", str(s)), "count": int(n)}
        for c, d, k, s, n in session.execute(query)
    ]


def _oldest_queued(session: Session) -> datetime | None:
    """Through the (status, received_at) index."""
    return session.scalar(
        select(func.min(Instance.received_at)).where(Instance.status == InstanceStatus.QUEUED)
    )


def collect_dashboard(
    engine: Engine, *, window_hours: int = 24, results_mode: str = "live", now: datetime | None = None
) -> Dashboard:
    """The dashboard over the last ``window_hours`` (per hour up to two days, else per day).

    The independent reads run at once, each on its own connection (the database does the work; the
    page waits for the slowest, not for their sum)."""
    now = now or datetime.now(UTC)
    since = now - timedelta(hours=window_hours)
    bucket = "hour" if window_hours <= 48 else "day"
    with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="console-read") as pool:
        status_f = pool.submit(collect_status, engine, results_mode)
        received_f = pool.submit(_read, engine, lambda s: _received(s, engine, since, bucket))
        turnaround_f = pool.submit(_read, engine, lambda s: _turnaround(s, engine, since))
        verdicts_f = pool.submit(_read, engine, lambda s: _verdicts(s, since))
        deliveries_f = pool.submit(_read, engine, _deliveries)
        oldest_f = pool.submit(_read, engine, _oldest_queued)
        model_f = pool.submit(_read, engine, _active_model)
        status = status_f.result()
        oldest = oldest_f.result()
        # Depth as screener_queue_depth: queued + processing, from the status counts.
        depth = (
            status["instances"][InstanceStatus.QUEUED.value]
            + status["instances"][InstanceStatus.PROCESSING.value]
        )
        return Dashboard(
            generated_at=now.isoformat(timespec="seconds"),
            window_hours=window_hours,
            status=status,
            received_per_bucket=received_f.result(),
            bucket=bucket,
            queue_depth=int(depth),
            oldest_queued_seconds=(now - oldest).total_seconds() if oldest is not None else None,
            turnaround=turnaround_f.result(),
            verdicts=verdicts_f.result(),
            deliveries=deliveries_f.result(),
            model=model_f.result(),
        )


@dataclass(frozen=True)
class SiteFigures:
    """The site-performance and drift reports' tables (as ``screener report`` prints them), and PNGs."""

    summary: list[dict[str, Any]]
    per_class: list[dict[str, Any]]
    labels_ignored: int
    psi: list[dict[str, Any]]
    drift_problem: str | None


def collect_site(engine: Engine, spool_root: Path | None) -> SiteFigures:
    """The site-performance report (confirmed labels) and the drift report, all dates, all versions."""
    from screener.core.errors import ScreenerError
    from screener.ops.drift import drift, psi_rows
    from screener.ops.site_performance import class_rows, site_performance, summary_rows

    result = site_performance(engine, None, None, spool_root=spool_root)
    problem: str | None = None
    try:
        psi = psi_rows(drift(engine, None, None))
    except ScreenerError as exc:
        psi, problem = [], str(exc)
    return SiteFigures(summary_rows(result), class_rows(result), result.labels_ignored, psi, problem)


def site_plot(engine: Engine, spool_root: Path | None, which: str, out: Path) -> None:
    """Draw ``screener report site-performance|drift --plot`` into ``out`` (PNG)."""
    from screener.ops.report_plots import plot_drift, plot_site_performance

    if which == "site-performance":
        from screener.ops.site_performance import site_performance

        plot_site_performance(site_performance(engine, None, None, spool_root=spool_root), out)
    else:
        from screener.ops.drift import drift

        plot_drift(drift(engine, None, None), out)

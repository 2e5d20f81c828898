"""`screener report`: the reporting views (migration 0006) rendered as a table, CSV or JSON.

The views do the joins; this module filters them by ``day`` (the UTC date of each view's natural
timestamp), and computes in Python what SQLite and PostgreSQL cannot compute the same way: percentiles of
turnaround times, and confusion matrices with per-class sensitivity and PPV. Those computations are pure
functions, tested on their own. No report shows a patient name, ID, birth date or accession number: the
views hold Study and SOP Instance UIDs only.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Date, Engine, bindparam, select, text
from sqlalchemy.sql.selectable import TextualSelect
from sqlalchemy.types import TypeEngine

from screener.core.db.models import ModelVersion
from screener.core.db.types import UTCDateTime, as_utc
from screener.core.errors import ScreenerError
from screener.model.modelcard import CLASSES, classes_of_json
from screener.model.verdict import INDETERMINATE, NOT_ANALYSED

VIEW_REPORTS: tuple[str, ...] = ("daily", "positives", "turnaround", "performance", "deliveries")
SITE_REPORTS: tuple[str, ...] = ("site-performance", "drift")  # computed from tables, with ReportOptions
REPORTS: tuple[str, ...] = (*VIEW_REPORTS, *SITE_REPORTS)
FORMATS: tuple[str, ...] = ("table", "csv", "json")
PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)
NON_CLASS_VERDICTS: tuple[str, ...] = (INDETERMINATE, NOT_ANALYSED)

Row = dict[str, Any]


class ReportError(ScreenerError):
    """A report was asked for with an unknown name or format, or an impossible date range."""


@dataclass(frozen=True)
class ReportOptions:
    """Options of the site reports (``site-performance``, ``drift``); the view reports take none.

    ``model``: only this model version. ``baseline_days``: drift's baseline window when the card has no
    reference. ``spool_root``: where accession-number labels are matched against headers. ``plot``: also
    write a PNG figure there.
    """

    model: str | None = None
    baseline_days: int = 7
    spool_root: Path | None = None
    plot: Path | None = None


@dataclass(frozen=True)
class Table:
    """One titled block of a report: named columns and their rows (values are JSON-ready)."""

    title: str
    columns: tuple[str, ...]
    rows: list[Row]


# --- pure aggregation ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values`` by linear interpolation between closest ranks (the
    default of numpy.percentile); None for no values. Raises ValueError when q is outside 0-100 or a
    value is not finite."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q!r} is outside 0-100")
    if not values:
        return None
    ordered = sorted(float(v) for v in values)
    if not all(math.isfinite(v) for v in ordered):
        raise ValueError("percentile of a non-finite value")
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def confusion_counts(pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Counts of each (true label, predicted label) pair seen."""
    counts: dict[tuple[str, str], int] = {}
    for true, predicted in pairs:
        counts[(true, predicted)] = counts.get((true, predicted), 0) + 1
    return counts


@dataclass(frozen=True)
class ClassMetrics:
    """Per-class screening metrics. ``sensitivity`` = TP / (TP + FN), ``ppv`` = TP / (TP + FP); None where
    the denominator is zero (no true cases, or never predicted)."""

    label: str
    support: int  # true cases of this class
    predicted: int  # predictions of this class
    true_positives: int
    sensitivity: float | None
    ppv: float | None


def class_metrics(
    counts: Mapping[tuple[str, str], int], classes: Sequence[str] = CLASSES
) -> list[ClassMetrics]:
    """Sensitivity and PPV of each class in ``classes`` (plus any other label in ``counts``, sorted)."""
    seen = {label for pair in counts for label in pair}
    labels = [*classes, *sorted(seen - set(classes))]
    out = []
    for label in labels:
        tp = counts.get((label, label), 0)
        support = sum(n for (true, _), n in counts.items() if true == label)
        predicted = sum(n for (_, pred), n in counts.items() if pred == label)
        out.append(
            ClassMetrics(
                label=label,
                support=support,
                predicted=predicted,
                true_positives=tp,
                sensitivity=tp / support if support else None,
                ppv=tp / predicted if predicted else None,
            )
        )
    return out


def delivery_summary(statuses: Iterable[str]) -> str:
    """The delivery status of one study result over its deliveries, as the views compute it: "none"
    without deliveries, else "dead" if any is dead, "failed" if any failed, "pending" if any is pending,
    "sent" when all are sent."""
    seen = set(statuses)
    if not seen:
        return "none"
    for status in ("dead", "failed", "pending"):
        if status in seen:
            return status
    return "sent"


# --- the classes of the registered models -----------------------------------------------------------


def model_classes(engine: Engine) -> dict[str, tuple[str, ...]]:
    """``{model version: its card's classes}`` for every registered model, in registration order."""
    with engine.connect() as conn:
        rows = conn.execute(select(ModelVersion.version, ModelVersion.card_json).order_by(ModelVersion.id))
        return {str(version): classes_of_json(card) for version, card in rows}


def all_classes(engine: Engine) -> tuple[str, ...]:
    """The classes of every registered model, each once, in the order they first appear (the paper's
    three when no model is registered yet)."""
    seen: dict[str, None] = {}
    for classes in model_classes(engine).values():
        seen.update(dict.fromkeys(classes))
    return tuple(seen) or CLASSES


def probs_of(value: Any) -> dict[str, float]:
    """A ``probs`` column read from a view: JSON text (SQLite) or an already parsed object (PostgreSQL)."""
    if value is None:
        return {}
    data = json.loads(value) if isinstance(value, str | bytes) else value
    return {str(k): float(v) for k, v in dict(data).items()}


def _with_probs(row: Row, classes: Sequence[str]) -> Row:
    """``row`` with its ``probs`` map spread into ``p_<class>`` columns (None where the model lacked it)."""
    probs = probs_of(row.get("probs"))
    out = {k: v for k, v in row.items() if k != "probs"}
    out.update({f"p_{c}": probs.get(c) for c in classes})
    return out


# --- reading the views ---------------------------------------------------------------------------------

_TIMESTAMPS: dict[str, tuple[str, ...]] = {
    "report_positives": ("arrived_at", "result_at"),
    "report_turnaround": ("arrived_at", "result_at", "delivered_at"),
    "report_performance": ("predicted_at",),
    "report_delivery_failures": ("created_at", "next_attempt_at"),
}
_ORDER: dict[str, str] = {
    "report_daily_volume": "day",
    "report_daily_verdicts": "day",
    "report_positives": "result_at, study_instance_uid",
    "report_turnaround": "result_at, study_result_id",
    "report_performance": "model_version, prediction_id",
    "report_delivery_failures": "created_at, delivery_id",
}


def _view_query(view: str, since: date | None, until: date | None) -> TextualSelect:
    where = []
    if since is not None:
        where.append("day >= :since")
    if until is not None:
        where.append("day <= :until")
    order = _ORDER[view]  # KeyError for anything but the fixed view names above
    # view is a key of _ORDER (checked on the line above), never text from a user or the database.
    sql = f"SELECT * FROM {view}"  # nosec B608
    if where:
        sql += " WHERE " + " AND ".join(where)
    query = text(sql + f" ORDER BY {order}")
    # Typed parameters and columns: SQLite holds dates and timestamps as text, PostgreSQL as date/timestamptz.
    params = [bindparam(name, type_=Date()) for name in ("since", "until") if f":{name}" in sql]
    if params:
        query = query.bindparams(*params)
    # By name (keywords), not by position: the views' columns come in their own order.
    types: dict[str, TypeEngine[Any]] = {name: UTCDateTime() for name in _TIMESTAMPS.get(view, ())}
    types["day"] = Date()
    return query.columns(**types)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return as_utc(value).isoformat(timespec="milliseconds")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, dict):
        return value  # a JSON column (``probs``) PostgreSQL has already parsed
    return float(value)  # Decimal from SUM() on PostgreSQL


def read_view(engine: Engine, view: str, since: date | None = None, until: date | None = None) -> list[Row]:
    """The rows of reporting view ``view`` whose ``day`` lies in [since, until], as JSON-ready dicts
    (dates and timestamps as ISO 8601 strings in UTC, counts as int)."""
    if view not in _ORDER:
        raise ReportError(f"unknown reporting view {view!r}; known views are {', '.join(_ORDER)}")
    params = {k: v for k, v in (("since", since), ("until", until)) if v is not None}
    with engine.connect() as conn:
        result = conn.execute(_view_query(view, since, until), params)
        rows = [dict(r._mapping) for r in result]
    return [{k: _jsonable(v) for k, v in row.items()} for row in rows]


# --- the reports ---------------------------------------------------------------------------------------

_VOLUME = ("received", "queued", "processing", "classified", "skipped", "failed")


def _daily(engine: Engine, since: date | None, until: date | None) -> list[Table]:
    volume = {r["day"]: r for r in read_view(engine, "report_daily_volume", since, until)}
    verdicts: dict[str, dict[str, int]] = {}
    results: dict[str, int] = {}
    studies: dict[str, int] = {}
    for r in read_view(engine, "report_daily_verdicts", since, until):  # one row per (day, verdict)
        day = r["day"]
        verdicts.setdefault(day, {})[str(r["verdict"])] = int(r["results"] or 0)
        results[day] = results.get(day, 0) + int(r["results"] or 0)
        studies[day] = studies.get(day, 0) + int(r["studies"] or 0)  # a study counted once per verdict
    names = [*all_classes(engine), *NON_CLASS_VERDICTS]
    names += sorted({v for counts in verdicts.values() for v in counts} - set(names))
    rows = []
    for day in sorted(volume.keys() | verdicts.keys()):
        row: Row = {"day": day}
        for name in _VOLUME:
            row[name] = int(volume.get(day, {}).get(name) or 0)
        row["results"] = results.get(day, 0)
        row["studies"] = studies.get(day, 0)
        for name in names:
            row[name] = verdicts.get(day, {}).get(name, 0)
        rows.append(row)
    return [Table("Daily volume (instances by arrival day) and verdicts (by result day)", _cols(rows), rows)]


_POSITIVE_HEAD = ("day", "study_instance_uid", "verdict", "revision")
_POSITIVE_TAIL = ("arrived_at", "result_at", "model_version", "delivery_status")


def _positives(engine: Engine, since: date | None, until: date | None) -> list[Table]:
    classes = all_classes(engine)
    rows = [_with_probs(r, classes) for r in read_view(engine, "report_positives", since, until)]
    columns = (*_POSITIVE_HEAD, *(f"p_{c}" for c in classes), *_POSITIVE_TAIL)
    return [Table("Positive studies (latest result is a finding of its model's card)", columns, rows)]


_TURNAROUND_COLUMNS = (
    "day",
    "study_instance_uid",
    "revision",
    "verdict",
    "model_version",
    "arrived_at",
    "result_at",
    "delivered_at",
    "seconds_to_result",
    "seconds_to_delivery",
    "delivery_status",
)


def turnaround_summary(rows: Sequence[Mapping[str, Any]]) -> list[Row]:
    """p50/p90/p99 of ``seconds_to_result`` and ``seconds_to_delivery`` over ``rows`` (rows without a
    delivery yet are left out of the delivery line, and counted in its ``n``)."""
    out: list[Row] = []
    for measure in ("seconds_to_result", "seconds_to_delivery"):
        values = [float(r[measure]) for r in rows if r.get(measure) is not None]
        row: Row = {"measure": measure, "n": len(values), "missing": len(rows) - len(values)}
        for q in PERCENTILES:
            value = percentile(values, q)
            row[f"p{q:g}"] = None if value is None else round(value, 3)
        out.append(row)
    return out


def _turnaround(engine: Engine, since: date | None, until: date | None) -> list[Table]:
    rows = read_view(engine, "report_turnaround", since, until)
    summary = turnaround_summary(rows)
    per_result = [{k: r[k] for k in _TURNAROUND_COLUMNS} for r in rows]
    return [
        Table("Turnaround percentiles (seconds from first arrival)", _cols(summary), summary),
        Table("Turnaround per study result", _TURNAROUND_COLUMNS, per_result),
    ]


def performance_by_model(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[tuple[str, str], int]]:
    """Confusion counts ``{(true, predicted): n}`` per model version over report_performance rows."""
    pairs: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        pairs.setdefault(str(r["model_version"]), []).append(
            (str(r["true_label"]), str(r["predicted_label"]))
        )
    return {version: confusion_counts(p) for version, p in sorted(pairs.items())}


def _performance(engine: Engine, since: date | None, until: date | None) -> list[Table]:
    rows = read_view(engine, "report_performance", since, until)
    confusion: list[Row] = []
    metrics: list[Row] = []
    classes = model_classes(engine)
    for version, counts in performance_by_model(rows).items():
        per_class = class_metrics(counts, classes.get(version, CLASSES))
        labels = [m.label for m in per_class]
        for true in labels:
            row: Row = {"model_version": version, "true_label": true}
            row.update({f"pred_{pred}": counts.get((true, pred), 0) for pred in labels})
            confusion.append(row)
        for m in per_class:
            metrics.append(
                {
                    "model_version": version,
                    "label": m.label,
                    "support": m.support,
                    "predicted": m.predicted,
                    "true_positives": m.true_positives,
                    "sensitivity": None if m.sensitivity is None else round(m.sensitivity, 4),
                    "ppv": None if m.ppv is None else round(m.ppv, 4),
                }
            )
    return [
        Table("Confusion counts per model version (rows: confirmed label)", _cols(confusion), confusion),
        Table("Per-class sensitivity and PPV per model version", _cols(metrics), metrics),
    ]


_DELIVERY_COLUMNS = (
    "day",
    "study_instance_uid",
    "revision",
    "destination",
    "object_kind",
    "status",
    "attempts",
    "last_error",
    "created_at",
    "next_attempt_at",
)


def _deliveries(engine: Engine, since: date | None, until: date | None) -> list[Table]:
    rows = read_view(engine, "report_delivery_failures", since, until)
    return [Table("Failed and dead deliveries", _DELIVERY_COLUMNS, rows)]


def _cols(rows: Sequence[Row]) -> tuple[str, ...]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return tuple(columns)


_BUILDERS = {
    "daily": _daily,
    "positives": _positives,
    "turnaround": _turnaround,
    "performance": _performance,
    "deliveries": _deliveries,
}


def _site_performance(
    engine: Engine, since: date | None, until: date | None, options: ReportOptions
) -> tuple[list[Table], dict[str, Any]]:
    from screener.ops.site_performance import class_rows, site_performance, summary_rows

    result = site_performance(engine, since, until, model=options.model, spool_root=options.spool_root)
    if options.plot is not None:
        from screener.ops.report_plots import plot_site_performance

        plot_site_performance(result, options.plot)
    summary, per_class = summary_rows(result), class_rows(result)
    tables = [
        Table(
            "Site performance per model version (instances with a confirmed label)", _cols(summary), summary
        ),
        Table(
            "Per-class sensitivity, specificity and PPV with 95% Wilson intervals (one-vs-rest)",
            _cols(per_class),
            per_class,
        ),
    ]
    return tables, {"labels_ignored": result.labels_ignored, "ece_bins": 15, "interval": "wilson 95%"}


def _drift(
    engine: Engine, since: date | None, until: date | None, options: ReportOptions
) -> tuple[list[Table], dict[str, Any]]:
    from screener.ops.drift import THRESHOLDS, bin_rows, drift, psi_rows

    if options.baseline_days < 1:
        raise ReportError(f"--baseline-days {options.baseline_days}: must be 1 or more days")
    results = drift(engine, since, until, model=options.model, baseline_days=options.baseline_days)
    if options.plot is not None:
        from screener.ops.report_plots import plot_drift

        plot_drift(results, options.plot)
    psi, bins = psi_rows(results), bin_rows(results)
    tables = [
        Table(
            "Population stability index per feature (< 0.1 stable, 0.1-0.25 moderate, >= 0.25 major shift)",
            _cols(psi),
            psi,
        ),
        Table("Shares per bin: reference and recent window", _cols(bins), bins),
    ]
    return tables, {"thresholds": THRESHOLDS, "baseline_days": options.baseline_days}


_SITE_BUILDERS = {"site-performance": _site_performance, "drift": _drift}


def _check(name: str, since: date | None, until: date | None, options: ReportOptions | None) -> None:
    if name not in REPORTS:
        raise ReportError(f"unknown report {name!r}; choose one of: {', '.join(REPORTS)}")
    if since is not None and until is not None and since > until:
        raise ReportError(
            f"--since {since.isoformat()} is after --until {until.isoformat()}: the range would be empty"
        )
    if name in VIEW_REPORTS and options is not None and (options.model or options.plot):
        raise ReportError(f"--model and --plot apply to {' and '.join(SITE_REPORTS)} only, not to {name}")


def _build(
    engine: Engine, name: str, since: date | None, until: date | None, options: ReportOptions | None
) -> tuple[list[Table], dict[str, Any]]:
    _check(name, since, until, options)
    if name in _SITE_BUILDERS:
        return _SITE_BUILDERS[name](engine, since, until, options or ReportOptions())
    return _BUILDERS[name](engine, since, until), {}


def build_report(
    engine: Engine,
    name: str,
    since: date | None = None,
    until: date | None = None,
    options: ReportOptions | None = None,
) -> list[Table]:
    """The tables of report ``name`` over days [since, until] (inclusive, UTC). Raises ReportError for an
    unknown name, since > until, or site-report options given to a view report."""
    return _build(engine, name, since, until, options)[0]


# --- rendering -----------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return (
            f"{value:.4g}" if abs(value) < 1e-3 and value != 0.0 else f"{value:.3f}".rstrip("0").rstrip(".")
        )
    return str(value)


def render_table(tables: Sequence[Table]) -> str:
    """Aligned plain text: each table under its title, numbers right-aligned; "(no rows)" when empty."""
    blocks = []
    for t in tables:
        lines = [t.title]
        if not t.rows:
            lines.append("(no rows)")
        else:
            cells = [[_text(r.get(c)) for c in t.columns] for r in t.rows]
            widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(t.columns)]
            numeric = [
                all(isinstance(r.get(c), int | float) or r.get(c) is None for r in t.rows) for c in t.columns
            ]
            lines.append("  ".join(c.ljust(w) for c, w in zip(t.columns, widths, strict=True)).rstrip())
            lines.append("  ".join("-" * w for w in widths))
            for row in cells:
                parts = [
                    v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric, strict=True)
                ]
                lines.append("  ".join(parts).rstrip())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def render_csv(tables: Sequence[Table]) -> str:
    """CSV with a header per table; several tables are separated by a blank line and a ``# title`` line."""
    out = io.StringIO()
    for n, t in enumerate(tables):
        if len(tables) > 1:
            if n:
                out.write("\n")
            out.write(f"# {t.title}\n")
        writer = csv.DictWriter(out, fieldnames=list(t.columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in t.rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in t.columns})
    return out.getvalue()


def render_json(
    name: str,
    since: date | None,
    until: date | None,
    tables: Sequence[Table],
    extra: Mapping[str, Any] | None = None,
) -> str:
    """``{"report", "since", "until", "tables": [{"title", "columns", "rows"}]}`` as indented JSON, plus
    the keys of ``extra`` (the site reports' settings: thresholds, baseline days...)."""
    doc: dict[str, Any] = {
        "report": name,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        **(extra or {}),
        "tables": [{"title": t.title, "columns": list(t.columns), "rows": t.rows} for t in tables],
    }
    return json.dumps(doc, indent=2) + "\n"


def run_report(
    engine: Engine,
    name: str,
    since: date | None,
    until: date | None,
    fmt: str,
    options: ReportOptions | None = None,
) -> str:
    """Report ``name`` (one of :data:`REPORTS`) over days [since, until] (inclusive, UTC; None: open)
    rendered as ``fmt`` (one of :data:`FORMATS`); the site reports take ``options`` (and write
    ``options.plot`` when set). Raises ReportError for an unknown name or format, since > until, or
    options a view report does not take; the database must be at head."""
    if fmt not in FORMATS:
        raise ReportError(f"unknown report format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    tables, extra = _build(engine, name, since, until, options)
    if fmt == "csv":
        return render_csv(tables)
    if fmt == "json":
        return render_json(name, since, until, tables, extra)
    return render_table(tables)

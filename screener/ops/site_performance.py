"""``screener report site-performance``: predictions against the site's confirmed labels, per model version.

Which instances a label reaches follows ``trainer.data.confirmed_label_samples``, so the report measures
against the truth ``trainer retrain`` trains on: a label row applies through its most specific key (its
SOP Instance UID, else its Study Instance UID, else its accession number, matched against the spooled
headers, read without pixel data and only when such labels exist); where several labels reach one
instance the latest import wins (``imported_at``, then row id). Labels that name no class of any registered
model's card are left out and counted. Each model version is measured over its own card's classes; a
label naming a class that version lacks counts as a miss (calibration and ROC AUC leave it out).

A labelled instance counts for the model version that predicted it (``predictions``) or, when it was not
analysed (``skipped`` or ``failed``), for the model version that was serving when the worker finished it
(``instances.model_version_id``, recorded since migration 0010; older rows count as ``(not recorded)``).
``--since``/``--until`` filter on the UTC day of the prediction, or of the instance's last update.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, select

from screener.core.db.models import Instance, InstanceStatus, Label, ModelVersion, Prediction, Study
from screener.core.stats import (
    ECE_BINS,
    ClassFigures,
    calibration,
    class_figures,
    macro_auc,
)
from screener.imaging.part10 import accession_of
from screener.model.modelcard import CLASSES, classes_of_json

NOT_RECORDED = "(not recorded)"


@dataclass
class _Case:
    """One labelled instance as one model version saw it."""

    instance_id: int
    sop: str
    study: str | None
    spool_name: str
    model_version: str
    predicted: str | None = None  # None: not analysed
    probs: dict[str, float] | None = None
    truth: str | None = None


@dataclass(frozen=True)
class VersionFigures:
    """The figures of one model version on its labelled instances."""

    model_version: str
    labelled: int
    not_analysed: int
    indeterminate: int  # predictions whose label is none of the classes (an abstention)
    truth: list[str]
    predicted: list[str]
    probs: list[tuple[float, ...]]  # in the version's class order
    per_class: list[ClassFigures]
    macro_auc: float | None
    ece: float | None
    calibration_bins: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.truth)

    @property
    def accuracy(self) -> float | None:
        if not self.truth:
            return None
        return sum(t == p for t, p in zip(self.truth, self.predicted, strict=True)) / len(self.truth)


@dataclass(frozen=True)
class SitePerformance:
    versions: list[VersionFigures]
    labels_ignored: int  # label rows naming no known class
    classes: tuple[str, ...] = CLASSES  # every class of the versions measured, in order of appearance


def _bounds(since: date | None, until: date | None) -> tuple[datetime | None, datetime | None]:
    """[since 00:00 UTC, until + 1 day 00:00 UTC) as bind values."""

    def at(day: date | None) -> datetime | None:
        if day is None:
            return None
        return datetime.combine(day, time(0), tzinfo=UTC)

    return at(since), at(until + timedelta(days=1) if until else None)


def _window(query: Any, column: Any, low: datetime | None, high: datetime | None) -> Any:
    if low is not None:
        query = query.where(column >= low)
    if high is not None:
        query = query.where(column < high)
    return query


def _load_cases(
    engine: Engine, since: date | None, until: date | None, model: str | None
) -> tuple[list[_Case], list[Any]]:
    low, high = _bounds(since, until)
    predicted = _window(
        select(
            Instance.id,
            Instance.sop_instance_uid,
            Study.study_instance_uid,
            Instance.spool_name,
            ModelVersion.version,
            Prediction.label,
            Prediction.probs,
        )
        .join(Instance, Instance.id == Prediction.instance_id)
        .join(ModelVersion, ModelVersion.id == Prediction.model_version_id)
        .outerjoin(Study, Study.id == Instance.study_id)
        .order_by(Prediction.id),
        Prediction.created_at,
        low,
        high,
    )
    unanalysed = _window(
        select(
            Instance.id,
            Instance.sop_instance_uid,
            Study.study_instance_uid,
            Instance.spool_name,
            ModelVersion.version,
        )
        .outerjoin(ModelVersion, ModelVersion.id == Instance.model_version_id)
        .outerjoin(Study, Study.id == Instance.study_id)
        .where(Instance.status.in_([InstanceStatus.SKIPPED, InstanceStatus.FAILED]))
        .order_by(Instance.id),
        Instance.updated_at,
        low,
        high,
    )
    if model is not None:
        predicted = predicted.where(ModelVersion.version == model)
        unanalysed = unanalysed.where(ModelVersion.version == model)
    labels_query = select(
        Label.id, Label.sop_instance_uid, Label.study_instance_uid, Label.accession_number, Label.label
    ).order_by(Label.imported_at, Label.id)
    with engine.connect() as conn:
        labels = list(conn.execute(labels_query))
        if not labels:
            return [], []
        cases = [
            _Case(iid, sop, study, spool, version, label, {str(k): float(v) for k, v in probs.items()})
            for iid, sop, study, spool, version, label, probs in conn.execute(predicted)
        ]
        cases += [
            _Case(iid, sop, study, spool, version or NOT_RECORDED)
            for iid, sop, study, spool, version in conn.execute(unanalysed)
        ]
    return cases, labels


def _attach_truth(
    cases: list[_Case], labels: Sequence[Any], spool_root: Path | None, known: Sequence[str] = CLASSES
) -> int:
    """Set each case's ``truth`` from the labels (see the module docstring). Returns the label rows
    ignored because they name no known class."""
    by_sop: dict[str, list[_Case]] = defaultdict(list)
    by_study: dict[str, list[_Case]] = defaultdict(list)
    for case in cases:
        by_sop[case.sop].append(case)
        if case.study:
            by_study[case.study].append(case)
    by_accession: dict[str, list[_Case]] = defaultdict(list)
    if spool_root is not None and any(
        r.accession_number and not r.sop_instance_uid and not r.study_instance_uid for r in labels
    ):
        numbers: dict[int, str | None] = {}
        for case in cases:
            if case.instance_id not in numbers:
                numbers[case.instance_id] = accession_of(spool_root / case.spool_name)
            number = numbers[case.instance_id]
            if number:
                by_accession[number].append(case)
    ignored = 0
    for row in labels:  # in import order: a later label overrides an earlier one
        label = str(row.label).strip().lower()
        if label not in known:
            ignored += 1
            continue
        if row.sop_instance_uid:
            targets = by_sop.get(row.sop_instance_uid, [])
        elif row.study_instance_uid:
            targets = by_study.get(row.study_instance_uid, [])
        elif row.accession_number:
            targets = by_accession.get(row.accession_number, [])
        else:
            targets = []
        for case in targets:
            case.truth = label
    return ignored


def figures_for(version: str, cases: Sequence[_Case], classes: Sequence[str] = CLASSES) -> VersionFigures:
    """The figures of one model version over its labelled cases (``truth`` set)."""
    analysed = [c for c in cases if c.predicted is not None and c.probs is not None]
    truth = [str(c.truth) for c in analysed]
    predicted = [str(c.predicted) for c in analysed]
    probs = [tuple((c.probs or {}).get(k, 0.0) for k in classes) for c in analysed]
    matrix = np.asarray(probs, dtype=np.float64).reshape(len(probs), len(classes))
    scored = np.array([t in classes for t in truth], dtype=bool)  # truths this version can score
    scored_truth = [t for t in truth if t in classes]
    ece, bins = calibration(scored_truth, matrix[scored], classes, ECE_BINS)
    return VersionFigures(
        model_version=version,
        labelled=len(cases),
        not_analysed=len(cases) - len(analysed),
        indeterminate=sum(1 for p in predicted if p not in classes),
        truth=truth,
        predicted=predicted,
        probs=probs,
        per_class=class_figures(truth, predicted, classes),
        macro_auc=macro_auc(scored_truth, matrix[scored], classes) if scored_truth else None,
        ece=ece,
        calibration_bins=bins,
    )


def site_performance(
    engine: Engine,
    since: date | None = None,
    until: date | None = None,
    *,
    model: str | None = None,
    spool_root: Path | None = None,
) -> SitePerformance:
    """Figures per model version (only ``model`` when given) over the labelled instances predicted, or left
    unanalysed, on days [since, until] (UTC, inclusive). ``spool_root`` is where accession-number labels
    are matched against headers; without it they reach nothing."""
    cases, labels = _load_cases(engine, since, until, model)
    with engine.connect() as conn:
        cards = {
            str(v): classes_of_json(card)
            for v, card in conn.execute(select(ModelVersion.version, ModelVersion.card_json))
        }
    known = tuple(dict.fromkeys(c for classes in cards.values() for c in classes)) or CLASSES
    ignored = _attach_truth(cases, labels, spool_root, known)
    by_version: dict[str, list[_Case]] = defaultdict(list)
    for case in cases:
        if case.truth is not None:
            by_version[case.model_version].append(case)
    versions = [figures_for(v, by_version[v], cards.get(v, CLASSES)) for v in sorted(by_version)]
    return SitePerformance(versions=versions, labels_ignored=ignored, classes=known)


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def summary_rows(result: SitePerformance) -> list[dict[str, Any]]:
    return [
        {
            "model_version": v.model_version,
            "labelled": v.labelled,
            "n": v.n,
            "not_analysed": v.not_analysed,
            "not_analysed_share": _r(v.not_analysed / v.labelled) if v.labelled else None,
            "indeterminate": v.indeterminate,
            "accuracy": _r(v.accuracy),
            "macro_roc_auc": _r(v.macro_auc),
            "ece": _r(v.ece),
        }
        for v in result.versions
    ]


def class_rows(result: SitePerformance) -> list[dict[str, Any]]:
    rows = []
    for v in result.versions:
        for f in v.per_class:
            row: dict[str, Any] = {
                "model_version": v.model_version,
                "label": f.label,
                "support": f.support,
                "predicted": f.predicted,
            }
            for name, prop in (
                ("sensitivity", f.sensitivity),
                ("specificity", f.specificity),
                ("ppv", f.ppv),
            ):
                interval = prop.interval
                row[name] = _r(prop.value)
                row[f"{name}_low"] = _r(interval[0]) if interval else None
                row[f"{name}_high"] = _r(interval[1]) if interval else None
            rows.append(row)
    return rows

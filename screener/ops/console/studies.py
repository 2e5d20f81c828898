"""Worklist, study page and reviews: what a reviewer sees of a study and how a reading becomes a label.

A review that names a class (agree with the verdict, or disagree and give the correct class) adds a
``labels`` row keyed by the Study Instance UID with ``confirmed_by`` and ``confirmed_at``, the same row
``trainer labels import`` adds for a CSV line (canonical class name, ``imported_at`` now), so ``trainer
retrain`` and ``screener report site-performance`` use it. ``source_file`` says it came from the console.
"""

from __future__ import annotations

import enum
import io
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from screener.core import audit
from screener.core.db.models import (
    Delivery,
    Instance,
    Label,
    ModelVersion,
    Prediction,
    Study,
    StudyResult,
    StudyReview,
    utcnow,
)
from screener.core.errors import ScreenerError
from screener.model.modelcard import CLASSES

NOT_ANALYSED = "not_analysed"
PAGE_SIZE = 50
LABEL_SOURCE = "console"  # labels.source_file of a label recorded in the console
MAX_COMMENT = 2000
RENDER_LONG_SIDE = 1024
STUDY_VIEWED = "console.study_viewed"
IMAGE_VIEWED = "console.image_viewed"
STUDY_REVIEWED = "console.study_reviewed"


class Decision(enum.StrEnum):
    AGREE = "agree"
    DISAGREE = "disagree"
    NOT_ASSESSABLE = "not_assessable"


class ReviewError(ScreenerError):
    """A review was refused: unknown study, a class that is not one, agreeing with no class."""


def classes() -> tuple[str, ...]:
    """The classes a reviewer can choose: the model card's label map (one place to adapt)."""
    return CLASSES


def classes_of(result: Any) -> tuple[str, ...]:
    """The classes a reviewer can give for a study: those its result has probabilities for (its model
    card's), else :func:`classes`."""
    names = tuple(result_probabilities(result)) if result is not None else ()
    return names or classes()


def verdict_choices() -> tuple[str, ...]:
    """Verdicts the worklist filters on: every class, ``indeterminate`` and ``not_analysed``."""
    return (*classes(), "indeterminate", NOT_ANALYSED)


def result_probabilities(row: Any) -> dict[str, float]:
    """Per-class probabilities of a prediction or study result, by class name: its ``probs`` mapping (the
    classes of its model's card), else the per-class ``p_<class>`` columns of older schemas."""
    probs = getattr(row, "probs", None)
    if isinstance(probs, dict):
        return {str(k): float(v) for k, v in probs.items() if isinstance(v, int | float)}
    out: dict[str, float] = {}
    for name in classes():
        value = getattr(row, f"p_{name}", None)
        if isinstance(value, int | float):
            out[name] = float(value)
    return out


@dataclass(frozen=True)
class WorklistFilter:
    verdict: str | None = None
    day_from: date | None = None
    day_to: date | None = None
    model: str | None = None
    unreviewed: bool = False
    page: int = 1


@dataclass(frozen=True)
class WorklistRow:
    study_id: int
    uid_hash: str
    first_received_at: datetime
    verdict: str | None
    probabilities: dict[str, float]
    model_version: str | None
    instances: int
    result_at: datetime | None
    review: str | None


@dataclass(frozen=True)
class Worklist:
    rows: list[WorklistRow]
    total: int
    page: int
    pages: int


def short_hash(uid: str) -> str:
    """The log-safe short hash of a UID (as the daemon logs them)."""
    import hashlib

    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def _bounds(day_from: date | None, day_to: date | None) -> tuple[datetime | None, datetime | None]:
    low = datetime.combine(day_from, time(0), tzinfo=UTC) if day_from else None
    high = datetime.combine(day_to, time(0), tzinfo=UTC) + timedelta(days=1) if day_to else None
    return low, high


def _latest_result_ids() -> Any:
    return select(StudyResult.study_id, func.max(StudyResult.id).label("rid")).group_by(StudyResult.study_id)


def worklist(engine: Engine, flt: WorklistFilter) -> Worklist:
    """Studies, newest first, with their latest result, filtered by verdict, arrival day and model."""
    latest = _latest_result_ids().subquery()
    last_review = (
        select(StudyReview.study_id, func.max(StudyReview.id).label("review_id"))
        .group_by(StudyReview.study_id)
        .subquery()
    )
    query = (
        select(Study, StudyResult, ModelVersion.version, StudyReview.decision)
        .outerjoin(latest, latest.c.study_id == Study.id)
        .outerjoin(StudyResult, StudyResult.id == latest.c.rid)
        .outerjoin(ModelVersion, ModelVersion.id == StudyResult.model_version_id)
        .outerjoin(last_review, last_review.c.study_id == Study.id)
        .outerjoin(StudyReview, StudyReview.id == last_review.c.review_id)
    )
    if flt.verdict:
        query = query.where(StudyResult.verdict == flt.verdict)
    low, high = _bounds(flt.day_from, flt.day_to)
    if low is not None:
        query = query.where(Study.first_received_at >= low)
    if high is not None:
        query = query.where(Study.first_received_at < high)
    if flt.model:
        query = query.where(ModelVersion.version == flt.model)
    if flt.unreviewed:
        query = query.where(last_review.c.review_id.is_(None))
    with Session(engine) as session:
        total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
        pages = max(1, -(-total // PAGE_SIZE))
        page = min(max(1, flt.page), pages)
        found = session.execute(
            query.order_by(Study.first_received_at.desc(), Study.id.desc())
            .limit(PAGE_SIZE)
            .offset((page - 1) * PAGE_SIZE)
        ).all()
        ids = [study.id for study, *_ in found]
        counts = dict(
            session.execute(
                select(Instance.study_id, func.count())
                .where(Instance.study_id.in_(ids))
                .group_by(Instance.study_id)
            ).all()
        )
        rows = [
            WorklistRow(
                study_id=study.id,
                uid_hash=short_hash(study.study_instance_uid),
                first_received_at=study.first_received_at,
                verdict=result.verdict if result is not None else None,
                probabilities=result_probabilities(result) if result is not None else {},
                model_version=version,
                instances=int(counts.get(study.id, 0)),
                result_at=result.created_at if result is not None else None,
                review=decision,
            )
            for study, result, version, decision in found
        ]
    return Worklist(rows, total, page, pages)


def model_versions(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(select(ModelVersion.version).order_by(ModelVersion.created_at)))


@dataclass(frozen=True)
class InstanceView:
    id: int
    status: str
    reason: str | None
    label: str | None
    probabilities: dict[str, float]
    novelty: float | None
    viewable: bool
    heatmap: bool = False  # the prediction carries a class activation map (models with the output)


@dataclass(frozen=True)
class DeliveryView:
    id: int
    channel: str
    destination: str
    object: str
    status: str
    attempts: int
    last_error: str | None
    sent_at: datetime | None


@dataclass(frozen=True)
class ReviewView:
    reviewer: str
    decision: str
    label: str | None
    comment: str | None
    created_at: datetime


@dataclass(frozen=True)
class StudyView:
    """What the study page shows; ``header`` holds the patient details (PHI) read from the spooled file."""

    id: int
    uid: str
    first_received_at: datetime
    result_id: int | None
    verdict: str | None
    revision: int | None
    model_version: str | None
    probabilities: dict[str, float]
    instances: list[InstanceView]
    deliveries: list[DeliveryView]
    reviews: list[ReviewView]
    header: dict[str, str] = field(default_factory=dict)
    reason: str | None = None  # why the verdict is indeterminate or not analysed
    flagged: bool = False  # the verdict is a finding of the model's card


_HEADER_FIELDS = (
    ("PatientName", "Patient name"),
    ("PatientID", "Patient ID"),
    ("PatientBirthDate", "Birth date"),
    ("PatientSex", "Sex"),
    ("AccessionNumber", "Accession number"),
    ("StudyDate", "Study date"),
    ("StudyDescription", "Study description"),
    ("ViewPosition", "View"),
)


def _header(path: Path) -> dict[str, str]:
    """Patient and study details of one spooled file (header only); empty where it cannot be read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
    except (OSError, InvalidDicomError, ValueError, EOFError):
        return {}
    return {title: str(ds.get(keyword, "") or "") for keyword, title in _HEADER_FIELDS}


def study_view(engine: Engine, study_id: int, spool_root: Path | None) -> StudyView | None:
    """The study page of ``study_id``, or None when there is no such study."""
    with Session(engine) as session:
        study = session.get(Study, study_id)
        if study is None:
            return None
        result = session.scalar(
            select(StudyResult)
            .where(StudyResult.study_id == study_id)
            .order_by(StudyResult.id.desc())
            .limit(1)
        )
        model_row = session.get(ModelVersion, result.model_version_id) if result is not None else None
        version = model_row.version if model_row is not None else None
        instances = list(
            session.scalars(select(Instance).where(Instance.study_id == study_id).order_by(Instance.id))
        )
        predictions: dict[int, Prediction] = {}
        if instances:
            query = select(Prediction).where(Prediction.instance_id.in_([i.id for i in instances]))
            if result is not None:
                query = query.where(Prediction.model_version_id == result.model_version_id)
            for p in session.scalars(query.order_by(Prediction.id)):
                predictions[p.instance_id] = p
        deliveries = list(
            session.scalars(
                select(Delivery)
                .join(StudyResult, StudyResult.id == Delivery.study_result_id)
                .where(StudyResult.study_id == study_id)
                .order_by(Delivery.id)
            )
        )
        reviews = list(
            session.scalars(
                select(StudyReview).where(StudyReview.study_id == study_id).order_by(StudyReview.id)
            )
        )
        header: dict[str, str] = {}
        if spool_root is not None:
            for inst in instances:
                if inst.spool_deleted_at is None:
                    header = _header(spool_root / inst.spool_name)
                    if header:
                        break
        return StudyView(
            id=study.id,
            uid=study.study_instance_uid,
            first_received_at=study.first_received_at,
            result_id=result.id if result is not None else None,
            verdict=result.verdict if result is not None else None,
            revision=result.revision if result is not None else None,
            model_version=version,
            probabilities=result_probabilities(result) if result is not None else {},
            instances=[
                InstanceView(
                    id=i.id,
                    status=str(getattr(i.status, "value", i.status)),
                    reason=i.status_reason,
                    label=predictions[i.id].label if i.id in predictions else None,
                    probabilities=result_probabilities(predictions[i.id]) if i.id in predictions else {},
                    novelty=i.novelty,
                    viewable=i.spool_deleted_at is None and spool_root is not None,
                    heatmap=i.id in predictions and getattr(predictions[i.id], "heatmap", None) is not None,
                )
                for i in instances
            ],
            deliveries=[
                DeliveryView(
                    d.id,
                    d.channel,
                    d.destination,
                    d.object_kind,
                    str(getattr(d.status, "value", d.status)),
                    d.attempts,
                    d.last_error,
                    d.sent_at,
                )
                for d in deliveries
            ],
            reviews=[ReviewView(r.reviewer, r.decision, r.label, r.comment, r.created_at) for r in reviews],
            header=header,
            reason=getattr(result, "reason", None) if result is not None else None,
            flagged=bool(getattr(result, "flagged", False)) if result is not None else False,
        )


def record_review(
    session: Session,
    study_id: int,
    *,
    reviewer: str,
    decision: str,
    correct_class: str | None,
    comment: str | None,
    client: str | None,
) -> StudyReview:
    """Record a reviewer's reading (and its ``labels`` row when it names a class) with an audit row, in
    ``session``'s transaction. Raises ReviewError for an unknown study or decision, a missing or unknown
    class on disagree, agree with a study whose result names no class, or a comment over the limit."""
    study = session.get(Study, study_id)
    if study is None:
        raise ReviewError(f"no study {study_id}: it may have been removed; go back to the worklist")
    try:
        chosen = Decision(decision)
    except ValueError:
        raise ReviewError("choose agree, disagree (with the correct class) or not assessable") from None
    text = (comment or "").strip() or None
    if text is not None and len(text) > MAX_COMMENT:
        raise ReviewError(f"the comment is longer than {MAX_COMMENT} characters: shorten it")
    result = session.scalar(
        select(StudyResult).where(StudyResult.study_id == study_id).order_by(StudyResult.id.desc()).limit(1)
    )
    label: str | None = None
    choices = classes_of(result)
    if chosen is Decision.AGREE:
        if result is None or result.verdict not in choices:
            raise ReviewError(
                "this study's result names no class to agree with: choose disagree with the correct class, "
                "or not assessable"
            )
        label = result.verdict
    elif chosen is Decision.DISAGREE:
        if not correct_class or correct_class not in choices:
            raise ReviewError(f"disagree needs the correct class: one of {', '.join(choices)}")
        if result is not None and result.verdict == correct_class:
            raise ReviewError("the correct class given is the verdict itself: choose agree instead")
        label = correct_class
    now = utcnow()
    label_row: Label | None = None
    if label is not None:
        label_row = Label(
            sop_instance_uid=None,
            study_instance_uid=study.study_instance_uid,
            accession_number=None,
            label=label,
            confirmed_by=reviewer,
            confirmed_at=now,
            source_file=LABEL_SOURCE,
            imported_at=now,
        )
        session.add(label_row)
        session.flush()
    review = StudyReview(
        study_id=study_id,
        study_result_id=result.id if result is not None else None,
        reviewer=reviewer,
        decision=chosen.value,
        label=label,
        comment=text,
        label_id=label_row.id if label_row is not None else None,
        created_at=now,
    )
    session.add(review)
    session.flush()
    audit.record(
        session,
        STUDY_REVIEWED,
        actor=f"console:{reviewer}",
        subject=study.study_instance_uid,
        detail={
            "from": client,
            "study_id": study_id,
            "review_id": review.id,
            "decision": chosen.value,
            "label": label,
            "label_id": review.label_id,
            "verdict": result.verdict if result is not None else None,
        },
    )
    return review


def render_instance_png(path: Path, *, max_pixels: int, long_side: int = RENDER_LONG_SIDE) -> bytes:
    """The first frame of a spooled DICOM file, window-levelled (VOI LUT or the file's first window, else
    the 1st-99th percentile), MONOCHROME1 inverted, scaled to at most ``long_side`` pixels, as PNG.

    Raises the imaging errors of :func:`screener.imaging.pixels.dicom_to_unit` for an undecodable image.
    """
    from PIL import Image

    from screener.imaging.part10 import read_bounded
    from screener.imaging.pixels import dicom_to_unit

    ds = read_bounded(path, max_pixels)
    unit = dicom_to_unit(ds, max_pixels=max_pixels, window_percentiles=(1.0, 99.0), reduce_for=long_side)
    image = Image.fromarray(np.asarray(np.round(unit * 255.0), dtype=np.uint8), mode="L")
    if max(image.size) > long_side:
        scale = long_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def heatmap_of(engine: Engine, study_id: int, instance_id: int) -> tuple[str, str, bytes] | None:
    """``(Study Instance UID, spool name, stored heatmap PNG)`` of an instance of ``study_id`` whose latest
    prediction has a heatmap, or None."""
    with Session(engine) as session:
        inst = session.get(Instance, instance_id)
        if inst is None or inst.study_id != study_id or inst.spool_deleted_at is not None:
            return None
        pred = session.scalar(
            select(Prediction)
            .where(Prediction.instance_id == instance_id)
            .order_by(Prediction.id.desc())
            .limit(1)
        )
        stored = getattr(pred, "heatmap", None) if pred is not None else None
        study = session.get(Study, study_id)
        if not stored or study is None:
            return None
        return study.study_instance_uid, inst.spool_name, bytes(stored)


def render_heatmap_png(path: Path, stored: bytes, *, max_pixels: int, side: int = 512) -> bytes:
    """The radiograph letterboxed as the model saw it with the stored heatmap drawn over it (as the
    Secondary Capture draws it), as an RGB PNG of ``side`` pixels. Raises the imaging errors and
    ValueError for a stored heatmap that is not an 8-bit grey PNG."""
    from PIL import Image

    from screener.imaging.part10 import read_bounded
    from screener.imaging.pixels import dicom_to_unit, letterbox
    from screener.model.heatmap import decode_png, overlay

    ds = read_bounded(path, max_pixels)
    unit = dicom_to_unit(ds, max_pixels=max_pixels, window_percentiles=(1.0, 99.0), reduce_for=side)
    rgb = overlay(letterbox(unit, side), decode_png(stored))
    out = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(out, format="PNG")
    return out.getvalue()

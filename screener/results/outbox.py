"""Study result -> DICOM SR (+ optional Secondary Capture) in the spool -> one delivery row per destination.

The objects are built once, when the verdict is made, and kept in the spool, so every retry sends the
same bytes with the same SOP Instance UID (derived from study, model version and revision).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from screener import __version__
from screener.core.config import PacsConfig
from screener.core.db.models import (
    Delivery,
    DeliveryStatus,
    Instance,
    ModelVersion,
    Prediction,
    Study,
    StudyResult,
)
from screener.core.errors import ImagingError
from screener.core.logs import get_logger
from screener.core.spool import Spool
from screener.imaging.pixels import dicom_to_unit, letterbox
from screener.model.heatmap import decode_png, overlay
from screener.model.modelcard import ModelCard
from screener.results.sc import SIZE as SC_SIZE
from screener.results.sc import build_secondary_capture
from screener.results.sr import AlgorithmInfo, AnalysedImage, StudyVerdictInput, build_sr, derive_uid

SC_MAX_PIXELS = 100_000_000
"""Largest image decoded again for the Secondary Capture's heatmap (it was classified, so it passed the
eligibility check's own limit already)."""

log = get_logger("screener.results.outbox")


@dataclass(frozen=True)
class BuiltObject:
    kind: str  # "sr" | "sc"
    sop_instance_uid: str
    spool_name: str


def algorithm_info(model: ModelVersion, pacs: PacsConfig) -> AlgorithmInfo:
    card: dict[str, Any] = json.loads(model.card_json)
    preprocessing = card.get("preprocessing") or {}
    # The operating points (card thresholds) decide labels and abstention: the SR names them (TID 4019).
    thresholds = card.get("thresholds") or {}
    return AlgorithmInfo(
        name=f"CXR Screener fused ResNet ({model.architectures})",
        version=model.version,
        parameters={
            "architectures": model.architectures,
            "fusion_weight": f"{model.fusion_weight:.4f}",
            "input_size": str(preprocessing.get("input_size", card.get("input_size", ""))),
        }
        | {f"threshold.{cls}": f"{float(value):.4f}" for cls, value in thresholds.items()},
        manufacturer=pacs.manufacturer,
        model_name="CXR Screener",
        software_version=__version__,
        device_uid=derive_uid(pacs.uid_root, "device", model.version, model.onnx_sha256),
    )


def _to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def build_objects(session: Session, spool: Spool, pacs: PacsConfig, result: StudyResult) -> list[BuiltObject]:
    """Build the SR (and SC when configured) for ``result`` and store them durably in the spool."""
    study = session.get(Study, result.study_id)
    model = session.get(ModelVersion, result.model_version_id)
    assert study is not None and model is not None
    rows = session.execute(
        select(Instance, Prediction)
        .outerjoin(
            Prediction,
            (Prediction.instance_id == Instance.id)
            & (Prediction.model_version_id == result.model_version_id),
        )
        .where(Instance.study_id == study.id)
        .order_by(Instance.received_at, Instance.id)
    ).all()
    images = []
    concepts = ModelCard.from_json(model.card_json).resolved_concepts()
    for inst, pred in rows:
        probs = dict(pred.probs) if pred is not None else None
        status = inst.status.value
        images.append(
            AnalysedImage(
                sop_class_uid=inst.sop_class_uid,
                sop_instance_uid=inst.sop_instance_uid,
                series_instance_uid=inst.series_instance_uid,
                status=status if pred is not None or status != "classified" else "failed",
                label=pred.label if pred is not None else None,
                probs=probs,
                reason=inst.status_reason if pred is None else pred.reason,
            )
        )
    source_row = next((inst for inst, pred in rows if pred is not None), rows[0][0])
    source = dcmread(spool.path(source_row.spool_name), stop_before_pixels=True)
    verdict = StudyVerdictInput(
        label=result.verdict,
        probs=dict(result.probs) if result.probs is not None else None,
        revision=result.revision,
        concepts=concepts,
        reason=result.reason,
    )
    algorithm = algorithm_info(model, pacs)
    sr = build_sr(
        source,
        images,
        verdict,
        algorithm,
        uid_root=pacs.uid_root,
        institution_name=pacs.institution_name or None,
    )
    built = [BuiltObject("sr", str(sr.SOPInstanceUID), spool.put(_to_bytes(sr)).name)]
    if pacs.send_secondary_capture:
        pairs = [(inst, pred) for inst, pred in rows]
        drawn = heatmap_overlay(spool, pairs, result.verdict, ModelCard.from_json(model.card_json))
        sc = build_secondary_capture(
            source,
            verdict,
            algorithm,
            uid_root=pacs.uid_root,
            overlay=drawn[0] if drawn is not None else None,
            heatmap_label=drawn[1] if drawn is not None else None,
        )
        built.append(BuiltObject("sc", str(sc.SOPInstanceUID), spool.put(_to_bytes(sc)).name))
    return built


def heatmap_overlay(
    spool: Spool, rows: Sequence[tuple[Instance, Prediction | None]], verdict: str, card: ModelCard
) -> tuple[npt.NDArray[np.uint8], str] | None:
    """``(RGB overlay, class)`` for the Secondary Capture: the heatmap of the image that carries the study
    verdict (the highest probability of the verdict's class; for other verdicts, the highest top
    probability) drawn over that radiograph, letterboxed as the model saw it; the class is the image's
    fused argmax, whose map it is. None when no prediction has a heatmap (models without the output) or
    the image cannot be read back from the spool (the SC then carries the text alone, as before)."""
    candidates = [(inst, pred) for inst, pred in rows if pred is not None and pred.heatmap is not None]
    if not candidates:
        return None

    def weight(pred: Prediction) -> float:
        probs = dict(pred.probs)
        return float(probs.get(verdict, max(probs.values(), default=0.0)))

    inst, pred = max(candidates, key=lambda pair: weight(pair[1]) if pair[1] is not None else 0.0)
    assert pred is not None and pred.heatmap is not None
    try:
        ds = dcmread(spool.path(inst.spool_name))
        unit = dicom_to_unit(
            ds,
            max_pixels=SC_MAX_PIXELS,
            window_percentiles=card.preprocessing.window_percentiles,
            reduce_for=SC_SIZE,
        )
        picture = overlay(letterbox(unit, SC_SIZE), decode_png(pred.heatmap))
    except (OSError, ValueError, InvalidDicomError, ImagingError) as exc:
        log.warning("sc.heatmap_unavailable", instance_id=inst.id, error=type(exc).__name__)
        return None
    probs = dict(pred.probs)
    return picture, max(probs, key=lambda c: probs[c])


def enqueue(session: Session, pacs: PacsConfig, result: StudyResult, objects: list[BuiltObject]) -> int:
    """One pending delivery per (destination, object). Returns how many rows were added."""
    added = 0
    for destination in pacs.destinations:
        for obj in objects:
            session.add(
                Delivery(
                    study_result_id=result.id,
                    destination=destination.name,
                    object_kind=obj.kind,
                    sop_instance_uid=obj.sop_instance_uid,
                    spool_name=obj.spool_name,
                    status=DeliveryStatus.PENDING,
                    attempts=0,
                )
            )
            added += 1
    return added

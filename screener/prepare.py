"""Per-instance preprocessing for the worker's process pool (kept light: no torch, no engine imports)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from screener.config import EligibilityConfig
from screener.eligibility import decide
from screener.errors import ImagingError
from screener.imaging import PreprocessSpec, preprocess_dataset
from screener.part10 import read_bounded


@dataclass(frozen=True)
class Prepared:
    """What preprocessing made of one instance (crosses the process boundary, so plain data)."""

    instance_id: int
    kind: Literal["ok", "skipped", "failed"]
    array: np.ndarray | None
    reason: str | None
    ms: float


def prepare_instance(
    instance_id: int,
    path: str,
    spec: PreprocessSpec,
    rules: EligibilityConfig,
    reduced_decode: bool = False,
) -> Prepared:
    """Eligibility from the header, then decode + preprocess. Never raises: bad input becomes a reason.

    ``reduced_decode`` (``inference.reduced_decode``) lets single-frame JPEG 2000 decode at the coarsest
    resolution level that suits ``spec.input_size``; see :func:`screener.imaging.dicom_to_unit`.
    """
    started = time.perf_counter()

    def done(
        kind: Literal["ok", "skipped", "failed"], array: np.ndarray | None, reason: str | None
    ) -> Prepared:
        return Prepared(instance_id, kind, array, reason, (time.perf_counter() - started) * 1000)

    try:
        # Pixel data stays encoded until preprocess_dataset, after the size check; a deflated data set is
        # inflated only as far as its declared pixels allow.
        ds = read_bounded(Path(path), rules.max_pixels)
    except Exception as exc:  # noqa: BLE001 - any unreadable header is this instance's failure, not the worker's
        return done("failed", None, f"DICOM header unreadable ({type(exc).__name__})")
    return prepare_dataset(instance_id, ds, spec, rules, reduced_decode, started=started)


def prepare_dataset(
    instance_id: int,
    ds: Dataset,
    spec: PreprocessSpec,
    rules: EligibilityConfig,
    reduced_decode: bool = False,
    *,
    started: float | None = None,
) -> Prepared:
    """:func:`prepare_instance` for a data set already read (pixel data still encoded). Never raises."""
    began = time.perf_counter() if started is None else started

    def done(
        kind: Literal["ok", "skipped", "failed"], array: np.ndarray | None, reason: str | None
    ) -> Prepared:
        return Prepared(instance_id, kind, array, reason, (time.perf_counter() - began) * 1000)

    decision = decide(ds, rules)
    if not decision.eligible:
        return done("skipped", None, decision.reason)
    try:
        array = preprocess_dataset(ds, spec, rules.max_pixels, reduced_decode=reduced_decode)
    except ImagingError as exc:
        return done("failed", None, str(exc))
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not take the worker down
        return done("failed", None, f"unexpected error while decoding ({type(exc).__name__})")
    return done("ok", array, None)


def init_pool_process() -> None:
    """Pool initialiser: one OpenCV thread per process, so N processes do not fight over N cores."""
    import cv2

    cv2.setNumThreads(1)

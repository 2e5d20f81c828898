"""Per-instance preprocessing for the worker's process pool (kept light: no torch, no engine imports)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from screener.core.config import EligibilityConfig
from screener.core.errors import ImagingError
from screener.imaging.eligibility import decide
from screener.imaging.part10 import read_bounded
from screener.imaging.pixels import PreprocessSpec, dicom_to_unit, reduced_side, to_model_input

MANUFACTURER_LENGTH = 64  # PS3.5 6.2: LO, and the instances.manufacturer column


@dataclass(frozen=True)
class ImageFacts:
    """What the drift report compares over time: header facts (never PHI) and the decoded image's mean."""

    manufacturer: str | None = None
    rows: int | None = None
    columns: int | None = None
    mean_intensity: float | None = None  # mean of the decoded [0, 1] image, before resizing


@dataclass(frozen=True)
class Prepared:
    """What preprocessing made of one instance (crosses the process boundary, so plain data)."""

    instance_id: int
    kind: Literal["ok", "skipped", "failed"]
    array: np.ndarray | None
    reason: str | None
    ms: float
    facts: ImageFacts = ImageFacts()


def header_facts(ds: Dataset) -> ImageFacts:
    """Manufacturer, Rows and Columns from the header; None for any that is absent or unreadable."""

    def read(keyword: str) -> object:
        try:
            return ds.get(keyword)
        except Exception:  # noqa: BLE001 - a malformed element is a missing fact, never the worker's failure
            return None

    maker = read("Manufacturer")
    rows, columns = read("Rows"), read("Columns")
    text = str(maker).strip()[:MANUFACTURER_LENGTH] if maker is not None else ""
    return ImageFacts(
        manufacturer=text or None,
        rows=rows if isinstance(rows, int) and rows > 0 else None,
        columns=columns if isinstance(columns, int) and columns > 0 else None,
    )


def prepare_instance(
    instance_id: int,
    path: str,
    spec: PreprocessSpec,
    rules: EligibilityConfig,
    reduced_decode: bool = False,
) -> Prepared:
    """Eligibility from the header, then decode + preprocess. Never raises: bad input becomes a reason.

    ``reduced_decode`` (``inference.reduced_decode``) lets single-frame JPEG 2000 decode at the coarsest
    resolution level that suits ``spec.input_size``; see :func:`screener.imaging.pixels.dicom_to_unit`.
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
    facts = header_facts(ds)

    def done(
        kind: Literal["ok", "skipped", "failed"], array: np.ndarray | None, reason: str | None
    ) -> Prepared:
        return Prepared(instance_id, kind, array, reason, (time.perf_counter() - began) * 1000, facts)

    decision = decide(ds, rules)
    if not decision.eligible:
        return done("skipped", None, decision.reason)
    try:
        # screener.imaging.pixels.preprocess_dataset, in its two steps: the drift report needs the decoded
        # image.
        unit = dicom_to_unit(
            ds,
            max_pixels=rules.max_pixels,
            window_percentiles=spec.window_percentiles,
            reduce_for=reduced_side(spec) if reduced_decode else 0,
        )
        array = to_model_input(unit, spec)
    except ImagingError as exc:
        return done("failed", None, str(exc))
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not take the worker down
        return done("failed", None, f"unexpected error while decoding ({type(exc).__name__})")
    mean = float(np.mean(unit))
    seen = ImageFacts(facts.manufacturer, facts.rows, facts.columns, mean if np.isfinite(mean) else None)
    return Prepared(instance_id, "ok", array, None, (time.perf_counter() - began) * 1000, seen)


def init_pool_process() -> None:
    """Pool initialiser: one OpenCV thread per process, so N processes do not fight over N cores; and a
    watch on the parent, so a worker killed with SIGKILL (which cannot shut its pool down) leaves no
    pool processes behind: they would wait forever on a queue whose write end they hold themselves."""
    import cv2

    cv2.setNumThreads(1)
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_with_parent(parent: int, interval: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(0)  # the parent is gone: nothing here is anyone's to finish

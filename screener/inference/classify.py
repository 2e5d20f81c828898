"""``screener classify``: classify DICOM/PNG/JPEG files with a model directory, without the daemon."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from screener.core.config import Config
from screener.core.errors import ImageDecodeError, ImagingError, ModelError
from screener.imaging.pixels import preprocess_file, read_dicom
from screener.inference.prepare import Prepared, prepare_dataset, prepare_instance
from screener.model.engine import load_engine
from screener.model.heatmap import input_picture, overlay, write_overlay_png
from screener.model.verdict import decide


@dataclass(frozen=True)
class FileResult:
    path: str
    status: str  # classified | skipped | failed
    label: str | None
    probs: dict[str, float] | None
    reason: str | None
    note: str | None = None  # how the file was read, where that was an assumption
    novelty: float | None = None  # the image-content gate's score, where the model has a gate
    heatmap: str | None = None  # the overlay PNG written for it (classify --heatmap DIR)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status,
            "label": self.label,
            "probs": self.probs,
            "reason": self.reason,
            "note": self.note,
            "novelty": self.novelty,
            "heatmap": self.heatmap,
        }


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _bare_dataset(path: Path) -> Dataset | None:
    """The file as a DICOM data set without preamble and file meta information (older modalities, raw
    exports), or None where it is not one (a PNG, a JPEG). Its transfer syntax is the encoding it was read
    in (:func:`screener.imaging.pixels.read_dicom`)."""
    try:
        ds = read_dicom(path)
    except ImageDecodeError:
        return None
    return ds if "PixelData" in ds and "SOPClassUID" in ds else None


def _assumed_encoding_note(ds: Dataset) -> str:
    return (
        f"no file meta information: read as {ds.file_meta.TransferSyntaxUID.name} "
        "(assumed from the data set's encoding)"
    )


def heatmap_file_name(index: int, path: Path) -> str:
    """``NNNN-<file stem>.png``: the overlay PNG of the ``index``-th file (numbered, so that files of the
    same name from different folders do not overwrite each other)."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)[:80] or "image"
    return f"{index:04d}-{stem}.png"


def classify_files(
    config: Config,
    model_dir: Path,
    files: list[Path],
    batch: int = 8,
    *,
    heatmap_dir: Path | None = None,
) -> tuple[str, list[FileResult]]:
    """Classify ``files``; DICOM files go through the same eligibility and preprocessing as the worker,
    and, where the card has an image-content gate, the same gate (a refused image is ``skipped`` with the
    worker's reason, and no label).

    With ``heatmap_dir`` (created if missing) every classified image also gets a PNG there
    (:func:`heatmap_file_name`): the image as the networks saw it with the class activation map of its
    fused prediction drawn over it (:mod:`screener.model.heatmap`); its path is the result's ``heatmap``.
    Returns (model version, one result per file in order). Raises ModelError on a bad model directory or
    when ``heatmap_dir`` is given for a model without the ``heatmap`` output.
    """
    inf = config.inference
    engine, loaded = load_engine(
        model_dir,
        inf.backend,
        threads=inf.threads,
        torch_compile=inf.torch_compile,
        trt_cache_dir=inf.trt_cache_dir,
        max_batch=max(batch, 1),
        precision=inf.precision,
    )
    card = loaded.card
    spec = card.preprocessing
    if heatmap_dir is not None:
        if card.heatmap is None:
            engine.close()
            raise ModelError(
                f"model {card.version} has no heatmap output (its card has no heatmap section): re-export "
                f"it with `trainer export {model_dir} --heatmap --out NEW_DIR`, or leave out --heatmap"
            )
        heatmap_dir.mkdir(parents=True, exist_ok=True)
    prepared: list[Prepared] = []
    notes: dict[int, str] = {}
    for n, path in enumerate(files):
        if not path.is_file():
            prepared.append(Prepared(n, "failed", None, f"no such file: {path}", 0.0))
        elif _is_dicom(path):
            prepared.append(prepare_instance(n, str(path), spec, config.eligibility, inf.reduced_decode))
        elif (bare := _bare_dataset(path)) is not None:
            notes[n] = _assumed_encoding_note(bare)
            prepared.append(prepare_dataset(n, bare, spec, config.eligibility, inf.reduced_decode))
        else:
            started = time.perf_counter()
            try:
                array = preprocess_file(
                    path, spec, config.eligibility.max_pixels, reduced_decode=inf.reduced_decode
                )
                prepared.append(Prepared(n, "ok", array, None, (time.perf_counter() - started) * 1000))
            except ImagingError as exc:
                prepared.append(Prepared(n, "failed", None, str(exc), 0.0))
    results: dict[int, FileResult] = {}
    ok = [p for p in prepared if p.kind == "ok" and p.array is not None]
    try:
        for start in range(0, len(ok), max(batch, 1)):
            chunk = ok[start : start + batch]
            out = engine.infer(np.stack([p.array for p in chunk if p.array is not None]).astype(np.float32))
            for k, p in enumerate(chunk):
                probs = [float(x) for x in out.probs[k]]
                novelty = float(out.novelty[k]) if out.novelty is not None else None
                if card.gate is not None and card.gate.refuses(novelty):
                    assert novelty is not None
                    results[p.instance_id] = FileResult(
                        str(files[p.instance_id]),
                        "skipped",
                        None,
                        None,
                        card.gate.reason(novelty),
                        notes.get(p.instance_id),
                        novelty,
                    )
                    continue
                borderline = None
                if card.gate is not None and card.gate.is_borderline(novelty):
                    assert novelty is not None
                    borderline = card.gate.borderline_reason(novelty)
                decision = decide(probs, card.classes, card.thresholds, card.findings, borderline=borderline)
                written = None
                if heatmap_dir is not None and out.heatmap is not None and p.array is not None:
                    target = heatmap_dir / heatmap_file_name(p.instance_id, files[p.instance_id])
                    write_overlay_png(target, overlay(input_picture(p.array, spec), out.heatmap[k]))
                    written = str(target)
                results[p.instance_id] = FileResult(
                    str(files[p.instance_id]),
                    "classified",
                    decision.label,
                    dict(zip(card.classes, probs, strict=True)),
                    decision.reason,
                    notes.get(p.instance_id),
                    novelty,
                    written,
                )
    finally:
        engine.close()
    for p in prepared:
        if p.instance_id not in results:
            results[p.instance_id] = FileResult(
                str(files[p.instance_id]),
                "skipped" if p.kind == "skipped" else "failed",
                None,
                None,
                p.reason,
                notes.get(p.instance_id),
            )
    return card.version, [results[n] for n in range(len(files))]

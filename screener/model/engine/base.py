"""The one interface every inference backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class EngineOutput:
    """Per-image class probabilities, each float32 ``[N, num_classes]`` in the card's class order.

    ``probs`` is the fused result; ``probs_a`` and ``probs_b`` are the two networks' own softmax outputs.
    ``novelty`` (float32 ``[N]``) is the image-content gate's score where the model has a gate (card
    section ``gate``), else None. ``heatmap`` (float32 ``[N, H, H]`` in [0, 1]) is the class activation
    map of the fused prediction on the whole network input where the model has one (card section
    ``heatmap``; :mod:`screener.model.cam`), else None.
    """

    probs: FloatArray
    probs_a: FloatArray
    probs_b: FloatArray
    novelty: FloatArray | None = None
    heatmap: FloatArray | None = None


@runtime_checkable
class Engine(Protocol):
    """A loaded model that classifies preprocessed batches.

    ``infer`` takes float32 ``[N, 3, S, S]`` (``S`` = the card's input size, ``N`` >= 1) and returns
    :class:`EngineOutput`; it raises ``ValueError`` naming the shape or dtype of a malformed batch.
    ``close`` releases sessions and device memory; the engine is unusable afterwards.
    """

    name: str

    def infer(self, batch: FloatArray) -> EngineOutput: ...

    def close(self) -> None: ...


def check_batch(batch: object, input_size: int) -> FloatArray:
    """Return ``batch`` as a C-contiguous float32 array, or raise ``ValueError`` naming what is wrong."""
    if not isinstance(batch, np.ndarray):
        raise ValueError(f"batch must be a numpy array, not {type(batch).__name__}")
    if batch.dtype != np.float32:
        raise ValueError(f"batch dtype {batch.dtype} must be float32")
    expected = (3, input_size, input_size)
    if batch.ndim != 4 or tuple(batch.shape[1:]) != expected or batch.shape[0] < 1:
        raise ValueError(f"batch shape {tuple(batch.shape)} must be [N>=1, 3, {input_size}, {input_size}]")
    return np.ascontiguousarray(batch)


def as_output(
    probs: object, probs_a: object, probs_b: object, novelty: object = None, *, heatmap: object = None
) -> EngineOutput:
    """Wrap three (four, with the gate's novelty; five, with the heatmap) array-likes as float32
    :class:`EngineOutput`."""
    return EngineOutput(
        probs=np.asarray(probs, dtype=np.float32),
        probs_a=np.asarray(probs_a, dtype=np.float32),
        probs_b=np.asarray(probs_b, dtype=np.float32),
        novelty=None if novelty is None else np.asarray(novelty, dtype=np.float32).reshape(-1),
        heatmap=None if heatmap is None else np.asarray(heatmap, dtype=np.float32),
    )


def concat_outputs(parts: list[EngineOutput]) -> EngineOutput:
    """One :class:`EngineOutput` from the outputs of consecutive chunks of a batch."""
    if len(parts) == 1:
        return parts[0]
    novelty = [p.novelty for p in parts]
    heatmaps = [p.heatmap for p in parts]
    return as_output(
        np.concatenate([p.probs for p in parts]),
        np.concatenate([p.probs_a for p in parts]),
        np.concatenate([p.probs_b for p in parts]),
        None if any(n is None for n in novelty) else np.concatenate([n for n in novelty if n is not None]),
        heatmap=None
        if any(h is None for h in heatmaps)
        else np.concatenate([h for h in heatmaps if h is not None]),
    )

"""Pure image functions shared by the screener and the trainer: pixels in, model input out."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreprocessSpec:
    """The preprocessing contract a model card carries (timm-style): the screener derives input from it."""

    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    window_percentiles: tuple[float, float] = (0.5, 99.5)

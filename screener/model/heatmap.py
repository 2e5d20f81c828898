"""Heatmaps as pictures and numbers: the graph's ``heatmap`` output (:mod:`screener.model.cam`) stored as a
small PNG, drawn over a radiograph, and measured for shortcut learning.

Pure functions of arrays (no torch): the worker, ``screener classify``, the Secondary Capture and the
audit benchmark share them. A heatmap is float ``[H, W]`` in [0, 1] over the letterboxed network input
(the square :func:`screener.imaging.pixels.letterbox` makes), so it lines up with any letterboxed copy of
the same image, at any size.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from screener.imaging.pixels import PreprocessSpec

FloatImage = npt.NDArray[np.float32]
RGBImage = npt.NDArray[np.uint8]

OVERLAY_ALPHA = 0.55
"""Opacity of the colour map where the heatmap is 1 (it fades to 0 where the heatmap is 0)."""

BORDER_BAND = 0.08
"""Width of the border band, as a share of the image side (where rulers, markers and collimation sit)."""

CORNER_SIDE = 0.2
"""Side of each corner square, as a share of the image side (where burned-in text sits)."""


def check_heatmap(heatmap: object) -> FloatImage:
    """``heatmap`` as float32 ``[H, W]`` in [0, 1]; raises ``ValueError`` naming the shape or values."""
    array = np.asarray(heatmap, dtype=np.float32)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"heatmap shape {array.shape} must be [H, W]")
    if not np.isfinite(array).all():
        raise ValueError("heatmap holds a non-finite value")
    if array.min() < -1e-4 or array.max() > 1.0 + 1e-4:
        raise ValueError(f"heatmap values {array.min():.4g}..{array.max():.4g} must lie in [0, 1]")
    out: FloatImage = np.clip(array, 0.0, 1.0)
    return out


def encode_png(heatmap: object) -> bytes:
    """The heatmap as an 8-bit grey PNG (0-255 for 0-1): what ``predictions.heatmap`` stores."""
    grey = np.rint(check_heatmap(heatmap) * 255.0).astype(np.uint8)
    ok, buffer = cv2.imencode(".png", grey)
    if not ok:
        raise ValueError(f"cannot encode a heatmap of shape {grey.shape} as PNG")
    return bytes(buffer.tobytes())


def stored_png(heatmap: object) -> bytes | None:
    """:func:`encode_png`, or None for a map that cannot be one (a non-finite value, a wrong shape): the
    worker keeps the prediction and stores no heatmap rather than lose the image."""
    try:
        return encode_png(heatmap)
    except ValueError:
        return None


def decode_png(data: bytes) -> FloatImage:
    """A heatmap stored by :func:`encode_png`; raises ``ValueError`` when ``data`` is not a grey PNG."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError("stored heatmap is not an 8-bit grey PNG")
    out: FloatImage = image.astype(np.float32) / np.float32(255.0)
    return out


def input_picture(model_input: npt.NDArray[np.float32], spec: PreprocessSpec) -> FloatImage:
    """The grey ``[S, S]`` picture in [0, 1] the networks saw, from a ``[3, S, S]`` model input (channel 0
    with the card's normalisation undone)."""
    if model_input.ndim != 3 or model_input.shape[0] != 3:
        raise ValueError(f"model input shape {model_input.shape} must be [3, S, S]")
    grey = model_input[0] * np.float32(spec.std[0]) + np.float32(spec.mean[0])
    out: FloatImage = np.clip(grey, 0.0, 1.0).astype(np.float32)
    return out


def resize_heatmap(heatmap: object, size: int) -> FloatImage:
    """The heatmap resampled (bilinear) to ``size`` x ``size``."""
    array = check_heatmap(heatmap)
    if array.shape == (size, size):
        return array
    out: FloatImage = np.clip(
        cv2.resize(array, (size, size), interpolation=cv2.INTER_LINEAR), 0.0, 1.0
    ).astype(np.float32)
    return out


def overlay(picture: npt.NDArray[np.float32], heatmap: object) -> RGBImage:
    """RGB uint8 ``[S, S, 3]``: the grey ``picture`` (``[S, S]`` in [0, 1], square) with the heatmap drawn
    over it in a colour map (blue-green-yellow-red), more opaque where the heatmap is higher."""
    if picture.ndim != 2 or picture.shape[0] != picture.shape[1]:
        raise ValueError(f"picture shape {picture.shape} must be square [S, S]")
    side = int(picture.shape[0])
    heat = resize_heatmap(heatmap, side)
    grey = np.clip(picture, 0.0, 1.0).astype(np.float32)
    colours = cv2.applyColorMap(np.rint(heat * 255.0).astype(np.uint8), cv2.COLORMAP_TURBO)
    colours_rgb = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    alpha = (OVERLAY_ALPHA * heat)[:, :, None]
    blended = (1.0 - alpha) * grey[:, :, None] + alpha * colours_rgb
    out: RGBImage = np.rint(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def write_overlay_png(path: object, rgb: RGBImage) -> None:
    """Write an RGB overlay as a PNG file; raises ``OSError`` when it cannot be written."""
    ok = cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot write PNG {path}")


def content_region(heatmap: object, height: int, width: int) -> FloatImage:
    """The part of a heatmap over the image itself, without the letterbox's padding, for an original of
    ``height`` x ``width`` pixels (the placement :func:`screener.imaging.pixels.letterbox` uses)."""
    array = check_heatmap(heatmap)
    if height < 1 or width < 1:
        raise ValueError(f"image size {height} x {width} must be positive")
    side = array.shape[0]
    scale = side / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    top, left = (side - new_h) // 2, (side - new_w) // 2
    out: FloatImage = array[top : top + new_h, left : left + new_w]
    return out


def border_mask(shape: tuple[int, int], band: float = BORDER_BAND) -> npt.NDArray[np.bool_]:
    """True within ``band`` (a share of each side) of any edge of an image of ``shape``."""
    rows, cols = shape
    dy, dx = max(1, round(band * rows)), max(1, round(band * cols))
    mask = np.zeros((rows, cols), dtype=bool)
    mask[:dy, :] = mask[rows - dy :, :] = True
    mask[:, :dx] = mask[:, cols - dx :] = True
    return mask


def corner_mask(shape: tuple[int, int], corner: float = CORNER_SIDE) -> npt.NDArray[np.bool_]:
    """True within the four corner rectangles (``corner`` of each side) of an image of ``shape``."""
    rows, cols = shape
    dy, dx = max(1, round(corner * rows)), max(1, round(corner * cols))
    mask = np.zeros((rows, cols), dtype=bool)
    for r in (slice(0, dy), slice(rows - dy, rows)):
        for c in (slice(0, dx), slice(cols - dx, cols)):
            mask[r, c] = True
    return mask


def mass_share(heatmap: object, mask: npt.NDArray[np.bool_]) -> float | None:
    """Share of the heatmap's total mass inside ``mask`` (same shape); None for an all-zero map."""
    array = check_heatmap(heatmap)
    if array.shape != mask.shape:
        raise ValueError(f"heatmap shape {array.shape} differs from the mask's {mask.shape}")
    total = float(array.sum())
    if total <= 0.0:
        return None
    return float(array[mask].sum()) / total

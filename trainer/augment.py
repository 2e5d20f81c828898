"""Training-time augmentation of ``[0, 1]`` grey images (paper section II: rotation, sharpening, brightness,
translation).

The paper expands its small COVID-19 class by augmented copies. Here augmentation is applied on the fly,
once per draw, and the class imbalance is handled by :func:`trainer.data.balanced_sampler`, which draws
each class equally often: together they are the online equivalent of storing augmented copies of the
minority class.

Augmentation acts on the ``[0, 1]`` image that :func:`screener.imaging.pixels.load_unit` returns, before the
shared :func:`screener.imaging.pixels.to_model_input`, so training sees exactly the serving pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from screener.imaging.pixels import FloatImage


@dataclass(frozen=True)
class Augmenter:
    """Random affine (rotation + translation), brightness and unsharp-mask sharpening, in that order.

    ``rotation_degrees``: the angle is uniform in ``[-rotation_degrees, rotation_degrees]`` about the
    centre. ``translate_fraction``: the shift is uniform in ``[-f, f]`` of the width and of the height.
    Pixels moved in from outside the image are black (0), like the letterbox padding of serving.
    ``brightness``: the image is multiplied by a gain uniform in ``[1 - b, 1 + b]`` and shifted by an
    offset uniform in ``[-b / 2, b / 2]``, then clipped to ``[0, 1]``. With probability
    ``sharpen_probability`` an unsharp mask ``x + a * (x - gaussian(x, sigma=1 px))`` with ``a`` uniform in
    ``[0, sharpen_amount]`` is applied. A parameter of 0 disables its step (and draws no random number for
    it, except that the draw order below is fixed, so a given ``rng`` state always gives the same output).

    Raises:
        ValueError: a parameter is negative, ``brightness >= 1``, ``translate_fraction >= 0.5``, or
            ``sharpen_probability`` is outside ``[0, 1]``; the message names the value.
    """

    rotation_degrees: float = 10.0
    translate_fraction: float = 0.08
    brightness: float = 0.15
    sharpen_probability: float = 0.3
    sharpen_amount: float = 1.0

    def __post_init__(self) -> None:
        checks = (
            ("rotation_degrees", self.rotation_degrees, 180.0),
            ("translate_fraction", self.translate_fraction, 0.5),
            ("brightness", self.brightness, 1.0),
            ("sharpen_amount", self.sharpen_amount, math.inf),
        )
        for name, value, upper in checks:
            if not math.isfinite(value) or value < 0 or value >= upper:
                raise ValueError(f"Augmenter {name} = {value!r}: must be >= 0 and < {upper}")
        if not 0.0 <= self.sharpen_probability <= 1.0:
            raise ValueError(
                f"Augmenter sharpen_probability = {self.sharpen_probability!r}: must be between 0 and 1"
            )

    def __call__(self, img01: FloatImage, rng: np.random.Generator) -> FloatImage:
        """A new augmented float32 ``[0, 1]`` image of the same shape; ``img01`` is not modified.

        The result depends only on ``img01``, the parameters and the state of ``rng``.

        Raises:
            ValueError: ``img01`` is not a 2-D image.
        """
        if img01.ndim != 2:
            raise ValueError(f"Augmenter expects a 2-D grey image, got shape {img01.shape}")
        # Draw every random number up front, in a fixed order, so the output is a pure function of the
        # generator state whatever steps are disabled.
        angle, shift_x, shift_y, gain, offset, sharpen_draw, amount = rng.random(7)
        height, width = img01.shape
        out = np.clip(img01, 0.0, 1.0).astype(np.float32, copy=True)

        degrees = (2.0 * angle - 1.0) * self.rotation_degrees
        dx = (2.0 * shift_x - 1.0) * self.translate_fraction * width
        dy = (2.0 * shift_y - 1.0) * self.translate_fraction * height
        if degrees != 0.0 or dx != 0.0 or dy != 0.0:
            matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), degrees, 1.0)
            matrix[0, 2] += dx
            matrix[1, 2] += dy
            warped = cv2.warpAffine(
                out,
                matrix,
                (width, height),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0.0,
            )
            out = np.asarray(warped, dtype=np.float32)

        if self.brightness > 0.0:
            scale = 1.0 + (2.0 * gain - 1.0) * self.brightness
            shift = (offset - 0.5) * self.brightness
            out = out * np.float32(scale) + np.float32(shift)
            np.clip(out, 0.0, 1.0, out=out)

        if self.sharpen_amount > 0.0 and sharpen_draw < self.sharpen_probability:
            blurred = cv2.GaussianBlur(out, (0, 0), sigmaX=1.0, borderType=cv2.BORDER_REPLICATE)
            out = out + np.float32(amount * self.sharpen_amount) * (out - blurred)
            np.clip(out, 0.0, 1.0, out=out)

        result: FloatImage = np.ascontiguousarray(out, dtype=np.float32)
        return result


@dataclass(frozen=True)
class SiteAugmenter:
    """Makes one radiograph look as if another site, device and processing chain had produced it.

    The ``robust`` preset's defence against shortcut learning: each class of the training data comes
    mostly from a few sources, so a network can separate the classes by exposure, processing, resolution,
    compression, borders and burned-in text instead of by the lungs. Applied after :class:`Augmenter` and
    before the shared preprocessing, each step with its own probability (``strength`` scales all of them,
    0 disables every step):

    - a random tone curve: gamma in ``[1/1.8, 1.8]``, then a monotone piecewise-linear curve through
      jittered control points (stands in for histogram matching to an unknown site's look);
    - a random window: the grey range is cut at random low and high levels and stretched back;
    - blur (Gaussian, sigma 0.4-1.6 px) or unsharp-mask sharpening, as detector MTFs and vendor
      post-processing differ;
    - additive Gaussian noise (sigma 0.3-3% of the range) and, separately, JPEG re-compression at quality
      15-85 (journal figures, teaching files and web copies);
    - downscale-then-upscale from 25-75% of the size (a database's downsized copy vs an original);
    - a random crop of up to 12% from each side, or a border of 2-8% on some sides (black, white or grey:
      collimation and scanner frames);
    - erasing of rectangles (4-14% of the side) in the corners and along the edges, where text markers,
      side markers and rulers sit, filled with black, white or the image's median.

    Inversion is never applied: MONOCHROME1 is handled by decoding.

    Raises:
        ValueError: ``strength`` is outside ``[0, 1]``.
    """

    strength: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.strength) or not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"SiteAugmenter strength = {self.strength!r}: must be between 0 and 1")

    def __call__(self, img01: FloatImage, rng: np.random.Generator) -> FloatImage:
        """A new float32 ``[0, 1]`` image (its shape may differ: crops and borders); ``img01`` is kept.

        Raises:
            ValueError: ``img01`` is not a 2-D image.
        """
        if img01.ndim != 2:
            raise ValueError(f"SiteAugmenter expects a 2-D grey image, got shape {img01.shape}")
        p = self.strength
        out = np.clip(img01, 0.0, 1.0).astype(np.float32, copy=True)
        if rng.random() < 0.3 * p:
            out = _downscale_upscale(out, rng)
        if rng.random() < 0.7 * p:
            out = _tone_curve(out, rng)
        if rng.random() < 0.3 * p:
            low, high = rng.uniform(0.0, 0.12), rng.uniform(0.85, 1.0)
            out = np.clip((out - low) / (high - low), 0.0, 1.0).astype(np.float32)
        kernel = rng.random()
        if kernel < 0.25 * p:
            out = np.asarray(cv2.GaussianBlur(out, (0, 0), sigmaX=rng.uniform(0.4, 1.6)), dtype=np.float32)
        elif kernel < 0.45 * p:
            blurred = cv2.GaussianBlur(out, (0, 0), sigmaX=rng.uniform(0.8, 2.0))
            out = np.clip(out + rng.uniform(0.3, 1.5) * (out - blurred), 0.0, 1.0).astype(np.float32)
        if rng.random() < 0.3 * p:
            noise = rng.normal(0.0, rng.uniform(0.003, 0.03), out.shape).astype(np.float32)
            out = np.clip(out + noise, 0.0, 1.0)
        if rng.random() < 0.3 * p:
            out = _jpeg(out, int(rng.integers(15, 86)))
        frame = rng.random()
        if frame < 0.3 * p:
            out = _random_crop(out, rng)
        elif frame < 0.5 * p:
            out = _random_border(out, rng)
        if rng.random() < 0.5 * p:
            out = _erase_margins(out, rng)
        result: FloatImage = np.ascontiguousarray(out, dtype=np.float32)
        return result


def _downscale_upscale(img: FloatImage, rng: np.random.Generator) -> FloatImage:
    height, width = img.shape
    factor = rng.uniform(0.25, 0.75)
    small = cv2.resize(
        img, (max(8, round(width * factor)), max(8, round(height * factor))), interpolation=cv2.INTER_AREA
    )
    flags = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_NEAREST)[int(rng.integers(0, 3))]
    out: FloatImage = np.clip(cv2.resize(small, (width, height), interpolation=flags), 0.0, 1.0)
    return out


def _tone_curve(img: FloatImage, rng: np.random.Generator) -> FloatImage:
    gamma = math.exp(rng.uniform(-math.log(1.8), math.log(1.8)))
    xs = np.linspace(0.0, 1.0, 6)
    ys = np.sort(np.clip(xs + rng.normal(0.0, 0.06, xs.size), 0.0, 1.0))
    ys[0], ys[-1] = min(ys[0], 0.05), max(ys[-1], 0.95)
    curved = np.interp(np.power(img, gamma), xs, ys)
    out: FloatImage = curved.astype(np.float32)
    return out


def _jpeg(img: FloatImage, quality: int) -> FloatImage:
    ok, encoded = cv2.imencode(
        ".jpg", np.rint(img * 255.0).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:  # pragma: no cover - OpenCV always encodes an 8-bit grey image
        return img
    decoded = np.asarray(cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE), dtype=np.float32)
    out: FloatImage = decoded / np.float32(255.0)
    return out


def _random_crop(img: FloatImage, rng: np.random.Generator) -> FloatImage:
    height, width = img.shape
    top, bottom, left, right = (rng.uniform(0.0, 0.12, 4) * np.array([height, height, width, width])).astype(
        int
    )
    return img[top : height - bottom, left : width - right]


def _random_border(img: FloatImage, rng: np.random.Generator) -> FloatImage:
    height, width = img.shape
    fill = float((0.0, 1.0, 0.5)[int(rng.integers(0, 3))])
    sides = (rng.random(4) < 0.5) * (rng.uniform(0.02, 0.08, 4) * np.array([height, height, width, width]))
    top, bottom, left, right = sides.astype(int)
    out: FloatImage = np.asarray(
        cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=fill), dtype=np.float32
    )
    return out


def _erase_margins(img: FloatImage, rng: np.random.Generator) -> FloatImage:
    out = img.copy()
    height, width = img.shape
    for _ in range(int(rng.integers(1, 4))):
        h = max(1, int(rng.uniform(0.04, 0.14) * height))
        w = max(1, int(rng.uniform(0.04, 0.14) * width))
        # A corner or a point along an edge.
        y = (
            (0, height - h)[int(rng.integers(0, 2))]
            if rng.random() < 0.7
            else int(rng.integers(0, height - h + 1))
        )
        x = (
            (0, width - w)[int(rng.integers(0, 2))]
            if (y not in (0, height - h) or rng.random() < 0.7)
            else int(rng.integers(0, width - w + 1))
        )
        fill = (0.0, 1.0, float(np.median(img)))[int(rng.integers(0, 3))]
        out[y : y + h, x : x + w] = fill
    return out


@dataclass(frozen=True)
class Chain:
    """Apply several augmenters in order (each with the same generator)."""

    steps: tuple[Callable[[FloatImage, np.random.Generator], FloatImage], ...]

    def __call__(self, img01: FloatImage, rng: np.random.Generator) -> FloatImage:
        out = img01
        for step in self.steps:
            out = step(out, rng)
        return out

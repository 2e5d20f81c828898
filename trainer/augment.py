"""Training-time augmentation of ``[0, 1]`` grey images (paper section II: rotation, sharpening, brightness,
translation).

The paper expands its small COVID-19 class by augmented copies. Here augmentation is applied on the fly,
once per draw, and the class imbalance is handled by :func:`trainer.data.balanced_sampler`, which draws
each class equally often: together they are the online equivalent of storing augmented copies of the
minority class.

Augmentation acts on the ``[0, 1]`` image that :func:`screener.imaging.load_unit` returns, before the
shared :func:`screener.imaging.to_model_input`, so training sees exactly the serving pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from screener.imaging import FloatImage


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

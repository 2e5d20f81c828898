"""Train the lung-field segmenter of :class:`screener.model.lungs.LungCrop` on radiographs with lung masks.

The data is a folder like ``jsrt-lungs``: ``MANIFEST.csv`` with ``file``, ``mask`` and (optionally)
``split`` columns, 8-bit images and masks (255 = lung). Every image goes through the classifier's own
preprocessing (:func:`screener.imaging.pixels.to_model_input` with the model's spec) and every mask through
the same geometry (working size, letterbox), so the segmenter learns on exactly the input it will meet inside
the graph. The manifest's ``test`` split is never trained on: the Dice score reported on it is the
segmenter's held-out figure. Augmentation: random affine (the same for image and mask), gamma, blur and
noise, so that films and detectors of other sites still find their lungs.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from screener.core.errors import DataError, ImagingError
from screener.core.logs import get_logger
from screener.core.progress import Progress
from screener.imaging.pixels import (
    FloatImage,
    PreprocessSpec,
    letterbox,
    load_unit,
    to_model_input,
    to_working_size,
)
from screener.model.lungs import LungCrop
from screener.model.modelcard import LungCropSpec

log = get_logger("trainer.segment")


@dataclass(frozen=True)
class LungPair:
    """One radiograph and its lung mask; ``split`` is the manifest's (``train`` where it has none)."""

    image: Path
    mask: Path
    split: str


@dataclass(frozen=True)
class SegmenterResult:
    """A trained :class:`LungCrop` and its figures (``summary`` goes into the card's ``lung_crop``)."""

    crop: LungCrop
    summary: dict[str, Any]


def load_lung_pairs(root: Path) -> list[LungPair]:
    """The image/mask pairs listed in ``root/MANIFEST.csv`` (``file``, ``mask``, optional ``split``).

    Raises:
        DataError: the folder or its manifest is missing, a column is missing, or a listed file is absent.
    """
    manifest = root / "MANIFEST.csv"
    if not manifest.is_file():
        raise DataError(
            f"segmentation data {root}: no MANIFEST.csv (columns file, mask[, split]): give a folder like "
            "../shared/data/jsrt-lungs"
        )
    pairs: list[LungPair] = []
    with manifest.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = {"file", "mask"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{manifest}: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            image, mask = root / row["file"], root / row["mask"]
            for path in (image, mask):
                if not path.is_file():
                    raise DataError(f"{manifest} line {reader.line_num}: {path} does not exist")
            pairs.append(LungPair(image, mask, (row.get("split") or "train").strip() or "train"))
    if not pairs:
        raise DataError(f"{manifest} lists no images")
    return pairs


def _mask_geometry(mask01: FloatImage, spec: PreprocessSpec) -> FloatImage:
    """The mask through the image's geometry (working size, letterbox), thresholded at 0.5."""
    square = letterbox(to_working_size(mask01, spec.working_size), spec.input_size)
    out: FloatImage = (square > 0.5).astype(np.float32)
    return out


def _affine(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    height, width = shape
    angle = rng.uniform(-10.0, 10.0)
    scale = rng.uniform(0.85, 1.15)
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), angle, scale)
    matrix[0, 2] += rng.uniform(-0.08, 0.08) * width
    matrix[1, 2] += rng.uniform(-0.08, 0.08) * height
    return matrix


def _augment(img: FloatImage, mask: FloatImage, rng: np.random.Generator) -> tuple[FloatImage, FloatImage]:
    matrix = _affine(rng, img.shape)
    size = (img.shape[1], img.shape[0])
    img = np.asarray(cv2.warpAffine(img, matrix, size, flags=cv2.INTER_LINEAR, borderValue=0.0), np.float32)
    mask = np.asarray(
        cv2.warpAffine(mask, matrix, size, flags=cv2.INTER_NEAREST, borderValue=0.0), np.float32
    )
    img = np.clip(img, 0.0, 1.0) ** np.float32(math.exp(rng.uniform(-0.4, 0.4)))
    if rng.random() < 0.3:
        img = np.asarray(cv2.GaussianBlur(img, (0, 0), sigmaX=rng.uniform(0.5, 1.5)), np.float32)
    if rng.random() < 0.3:
        img = img + rng.normal(0.0, rng.uniform(0.005, 0.03), img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32), mask.astype(np.float32)


def _tensors(
    items: list[tuple[FloatImage, FloatImage]], spec: PreprocessSpec, rng: np.random.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = [], []
    for img, mask in items:
        if rng is not None:
            img, mask = _augment(img, mask, rng)
        images.append(to_model_input(img, spec)[:1])
        masks.append(_mask_geometry(mask, spec)[None])
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks))


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    dice = (2 * inter + 1.0) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1.0)
    return bce + (1.0 - dice.mean())


def dice_scores(crop: LungCrop, images: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Dice of the thresholded mask per image (``images`` normalised ``[N, 1, S, S]``, masks ``[N, 1, S, S]``
    at the graph input size; compared at the segmenter's size)."""
    size = crop.spec.seg_size
    crop.eval()
    with torch.no_grad():
        predicted = (crop.mask_logits(images) > 0).float()
        target = (F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False) > 0.5).float()
    inter = (predicted * target).sum(dim=(1, 2, 3))
    total = predicted.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    return (2 * inter / total.clamp(min=1.0)).numpy()


def train_segmenter(
    root: Path,
    spec: PreprocessSpec,
    crop_spec: LungCropSpec,
    *,
    epochs: int = 30,
    batch_size: int = 16,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
) -> SegmenterResult:
    """Train a :class:`LungCrop` U-Net on ``root`` and measure it on the manifest's ``test`` split.

    ``limit`` caps the training images (for tests). Returns the module (eval mode) and a summary:
    images per split, epochs, seconds, the held-out Dice (mean, 5th percentile) and the share of held-out
    images where the crop finds no lungs.

    Raises:
        DataError: unusable segmentation data (see :func:`load_lung_pairs`) or an unreadable image.
    """
    started = time.perf_counter()
    pairs = load_lung_pairs(root)
    train_pairs = [p for p in pairs if p.split != "test"]
    test_pairs = [p for p in pairs if p.split == "test"] or train_pairs[-max(1, len(train_pairs) // 5) :]
    if limit is not None:
        train_pairs = train_pairs[:limit]
        test_pairs = test_pairs[: max(2, limit // 2)]

    def read(pair: LungPair) -> tuple[FloatImage, FloatImage]:
        try:
            return load_unit(pair.image, spec, 100_000_000), load_unit(pair.mask, spec, 100_000_000)
        except (ImagingError, OSError) as exc:
            raise DataError(f"cannot read segmentation pair {pair.image}: {exc}") from exc

    train_items = [read(p) for p in train_pairs]
    test_images, test_masks = _tensors([read(p) for p in test_pairs], spec, None)

    torch.manual_seed(seed)
    crop = LungCrop(crop_spec)
    optimizer = torch.optim.Adam(crop.unet.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    rng = np.random.default_rng(seed)
    n_batches = math.ceil(len(train_items) / batch_size)
    bar = Progress(epochs * n_batches) if progress else None
    for epoch in range(1, epochs + 1):
        crop.train()
        order = rng.permutation(len(train_items))
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = [train_items[i] for i in order[start : start + batch_size]]
            images, masks = _tensors(batch, spec, rng)
            size = crop_spec.seg_size
            target = (
                F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False) > 0.5
            ).float()
            loss = _loss(crop.mask_logits(images), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            if bar is not None:
                bar.step(f"lung segmenter epoch {epoch}/{epochs} loss {total / (start + len(batch)):.4f}")
        scheduler.step()
    if bar is not None:
        bar.__exit__(None, None, None)
    crop.eval()
    dice = dice_scores(crop, test_images, test_masks)
    with torch.no_grad():
        _, found = crop.boxes(test_images.expand(-1, 3, -1, -1))
    summary = {
        "architecture": f"U-Net, 4 levels, {crop_spec.base_channels}-{8 * crop_spec.base_channels} channels",
        "data": root.name,
        "train_images": len(train_items),
        "test_images": len(test_pairs),
        "epochs": epochs,
        "seconds": round(time.perf_counter() - started, 1),
        "test_dice_mean": round(float(dice.mean()), 4),
        "test_dice_p05": round(float(np.percentile(dice, 5)), 4),
        "test_not_found": round(float(1.0 - found.float().mean()), 4),
    }
    log.info("segmenter_trained", **summary)
    return SegmenterResult(crop=crop, summary=summary)

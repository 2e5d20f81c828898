"""Train the image-content gate's view check: real frontal chests against negatives made from them.

The view check (:class:`screener.model.novelty.ViewCheck`) answers one question the Mahalanobis score on
a chest classifier's features answers badly: is this a frontal chest radiograph the right way up and the
right way round? It is trained only on the model's TRAINING split, never on the images the gate is
checked on (the pydicom-data non-chest radiographs and the validation or test chests rotated and
inverted):

- positives: every training chest as the model sees it, mirrored left-right half of the time (a mirrored
  chest is still a frontal chest), with mild brightness and contrast jitter;
- negatives generated from training chests: rotated by 90, 180 or 270 degrees, inverted (``1 - grey``,
  before contrast enhancement, as a wrong MONOCHROME1/2 flag would make it), inverted and rotated, a part
  of the image (a window of 20-50% of its side, as a detail view or a collimated extremity looks);
- procedural phantoms: a dark field with a bright elongated bone and its soft-tissue envelope (a limb), or
  a round body section with organs and bone (a CT or MR slice), with noise and blur.

No real non-chest image is used for training: every one available here is one the gate is checked on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from screener.core.errors import DataError, ImagingError
from screener.core.logs import get_logger
from screener.imaging.pixels import PreprocessSpec, load_unit, to_model_input
from screener.model.novelty import VIEW_SIZE, ViewCheck
from trainer.data import Sample

log = get_logger("trainer.viewcheck")

FloatImage = npt.NDArray[np.float32]
NEGATIVE_KINDS: tuple[str, ...] = ("inverted", "inverted rotated", "part", "limb phantom", "section phantom")
"""Negatives drawn from the decoded image; rotations of positives are added in the network's input space
(contrast enhancement commutes with a rotation by a multiple of 90 degrees)."""
_MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class ViewCheckFit:
    """The trained view check and how it did on the synthetic negatives of held-out (validation) chests."""

    view: ViewCheck
    epochs: int
    train_counts: dict[str, int]
    held_out: dict[str, float]


def _prepared(array: FloatImage) -> torch.Tensor:
    return ViewCheck.prepare(torch.from_numpy(array[None]))[0]


def _phantom_limb(rng: np.random.Generator, size: int) -> FloatImage:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, math.pi)
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    # Distance across and along the limb's axis.
    across = np.abs((xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle))
    along = np.abs(-(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle))
    soft_w, bone_w = rng.uniform(0.12, 0.25), rng.uniform(0.03, 0.08)
    length = rng.uniform(0.35, 0.6)
    inside = along < length
    img = np.full((size, size), rng.uniform(0.0, 0.15), dtype=np.float32)
    img[inside & (across < soft_w)] = rng.uniform(0.3, 0.5)
    img[inside & (across < bone_w)] = rng.uniform(0.75, 1.0)
    if rng.random() < 0.5:  # a second, parallel bone (forearm, lower leg)
        shift = rng.uniform(0.06, 0.1)
        img[inside & (np.abs(across - shift) < bone_w * 0.6)] = rng.uniform(0.7, 0.95)
    return img


def _phantom_section(rng: np.random.Generator, size: int) -> FloatImage:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), rng.uniform(0.0, 0.1), dtype=np.float32)
    rx, ry = rng.uniform(0.3, 0.48), rng.uniform(0.25, 0.45)
    body = ((xx - 0.5) / rx) ** 2 + ((yy - 0.5) / ry) ** 2 < 1
    img[body] = rng.uniform(0.35, 0.6)
    for _ in range(int(rng.integers(2, 7))):
        ex, ey = rng.uniform(0.3, 0.7, size=2)
        ax, ay = rng.uniform(0.03, 0.15, size=2)
        img[((xx - ex) / ax) ** 2 + ((yy - ey) / ay) ** 2 < 1] = rng.uniform(0.0, 1.0)
    ring = np.abs(((xx - 0.5) / rx) ** 2 + ((yy - 0.5) / ry) ** 2 - 0.95) < 0.05
    if rng.random() < 0.5:
        img[ring] = rng.uniform(0.8, 1.0)
    return img


def _finish(img: FloatImage, rng: np.random.Generator) -> FloatImage:
    """Noise and a box blur, so the phantoms are not flat-shaded."""
    out: FloatImage = img + rng.normal(0.0, rng.uniform(0.01, 0.05), size=img.shape).astype(np.float32)
    r = int(rng.integers(0, 3))
    if r:
        pad = np.pad(out, r, mode="edge")
        acc = np.zeros_like(out)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                acc += pad[r + dy : r + dy + out.shape[0], r + dx : r + dx + out.shape[1]]
        out = acc / np.float32((2 * r + 1) ** 2)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def negative_from(unit: FloatImage, kind: str, rng: np.random.Generator) -> FloatImage:
    """One negative of ``kind`` (one of :data:`NEGATIVE_KINDS`) from a chest's ``[0, 1]`` image.
    Raises ``ValueError`` for an unknown kind."""
    if kind == "inverted":
        return (1.0 - unit).astype(np.float32)
    if kind == "inverted rotated":
        return np.ascontiguousarray(np.rot90(1.0 - unit, int(rng.integers(1, 4)))).astype(np.float32)
    if kind == "part":
        h, w = unit.shape
        side = max(8, int(min(h, w) * rng.uniform(0.2, 0.5)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        return np.ascontiguousarray(unit[y : y + side, x : x + side])
    if kind == "limb phantom":
        return _finish(_phantom_limb(rng, 256), rng)
    if kind == "section phantom":
        return _finish(_phantom_section(rng, 256), rng)
    raise ValueError(f"unknown negative kind {kind!r}; known: {', '.join(NEGATIVE_KINDS)}")


def _load(sample: Sample, spec: PreprocessSpec) -> FloatImage:
    try:
        return load_unit(sample.path, spec, _MAX_PIXELS)
    except (ImagingError, OSError) as exc:
        raise DataError(f"cannot load {sample.path}: {exc}") from exc


def synthetic_negatives(
    samples: Sequence[Sample], spec: PreprocessSpec, rng: np.random.Generator, per_kind: int
) -> tuple[torch.Tensor, list[str]]:
    """``per_kind`` negatives of each of :data:`NEGATIVE_KINDS` from ``samples`` (drawn at random), as
    prepared view-check inputs ``[M, 1, VIEW_SIZE, VIEW_SIZE]``, and each one's kind."""
    if not samples:
        raise DataError("the view check needs chest images to make its negatives from")
    picks = rng.choice(len(samples), size=min(len(samples), per_kind * 3), replace=False)
    units = [_load(samples[int(i)], spec) for i in picks]
    out: list[torch.Tensor] = []
    kinds: list[str] = []
    for kind in NEGATIVE_KINDS:
        for k in range(per_kind):
            unit = units[(k * 7 + NEGATIVE_KINDS.index(kind)) % len(units)]
            out.append(_prepared(to_model_input(negative_from(unit, kind, rng), spec)))
            kinds.append(kind)
    return torch.stack(out), kinds


def rotations(small: torch.Tensor, rng: np.random.Generator, count: int) -> torch.Tensor:
    """``count`` random rotations by 90, 180 or 270 degrees of rows of prepared inputs ``small``."""
    idx = rng.choice(small.shape[0], size=count, replace=small.shape[0] < count)
    turns = rng.integers(1, 4, size=count)
    return torch.stack(
        [torch.rot90(small[int(i)], int(t), dims=(1, 2)) for i, t in zip(idx, turns, strict=True)]
    )


def _jitter(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = batch.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip[:, None, None, None], torch.flip(batch, dims=(3,)), batch)
    scale = 1.0 + 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    shift = 0.3 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    return batch * scale + shift


def train_view_check(
    positives: torch.Tensor,
    negatives: torch.Tensor,
    *,
    epochs: int = 8,
    batch_size: int = 64,
    seed: int = 0,
) -> ViewCheck:
    """Train a :class:`ViewCheck` on prepared inputs (``[N, 1, VIEW_SIZE, VIEW_SIZE]``): label 0 for
    ``positives`` (frontal chests), 1 for ``negatives``; the two are weighted equally whatever their
    counts. Raises :class:`DataError` when either is empty or the shapes are wrong."""
    shape = (1, VIEW_SIZE, VIEW_SIZE)
    if positives.shape[0] == 0 or negatives.shape[0] == 0:
        raise DataError(
            f"the view check needs positives and negatives, got {positives.shape[0]}, {negatives.shape[0]}"
        )
    if tuple(positives.shape[1:]) != shape or tuple(negatives.shape[1:]) != shape:
        raise DataError(
            f"view-check inputs must be [N, {shape}], got {tuple(positives.shape)}, {tuple(negatives.shape)}"
        )
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    view = ViewCheck()
    x = torch.cat((positives, negatives)).float()
    y = torch.cat((torch.zeros(positives.shape[0]), torch.ones(negatives.shape[0])))
    weight = torch.cat(
        (
            torch.full((positives.shape[0],), 0.5 * x.shape[0] / positives.shape[0]),
            torch.full((negatives.shape[0],), 0.5 * x.shape[0] / negatives.shape[0]),
        )
    )
    optimiser = torch.optim.AdamW(view.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(x.shape[0] / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps)
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    view.train()
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        total = 0.0
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            logits = view.classify(_jitter(x[idx], generator))
            loss = (loss_fn(logits, y[idx]) * weight[idx]).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * idx.numel()
        log.info("view_check.epoch", epoch=epoch + 1, epochs=epochs, loss=round(total / x.shape[0], 4))
    return view.eval()


def not_chest_probability(
    view: ViewCheck, small: torch.Tensor, centre: float = 0.0
) -> npt.NDArray[np.float64]:
    """The view check's probability of "not a frontal chest" for prepared inputs, in batches, as the graph
    computes it (:meth:`ViewCheck.not_chest`: with the transformed copies where ``view.consistency``,
    ``centre`` being the :func:`screener.model.novelty.invert_centre` of the model's normalisation)."""
    out = []
    view.eval()
    with torch.no_grad():
        for start in range(0, small.shape[0], 256):
            out.append(view.not_chest(small[start : start + 256].float(), centre).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def fit_view_check(
    train_small: torch.Tensor,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    spec: PreprocessSpec,
    *,
    seed: int = 0,
    per_kind: int | None = None,
    epochs: int = 8,
) -> ViewCheckFit:
    """Train the view check on the training split's prepared inputs ``train_small`` and negatives made
    from ``train_samples`` (``per_kind`` of each kind, default a third of the training images between
    16 and 300); report how many negatives made from ``val_samples`` it refuses at 0.5."""
    if per_kind is None:
        per_kind = int(np.clip(len(train_samples) // 3, 16, 300))
    rng = np.random.default_rng(seed)
    made, kinds = synthetic_negatives(train_samples, spec, rng, per_kind)
    rotated = rotations(train_small, rng, per_kind * 3)
    negatives = torch.cat((made, rotated))
    view = train_view_check(train_small, negatives, epochs=epochs, seed=seed)
    counts = {k: kinds.count(k) for k in NEGATIVE_KINDS}
    counts["rotated"] = int(rotated.shape[0])
    counts["positives"] = int(train_small.shape[0])
    held_out: dict[str, float] = {}
    if val_samples:
        val_rng = np.random.default_rng(seed + 1)
        val_made, val_kinds = synthetic_negatives(val_samples, spec, val_rng, max(8, per_kind // 10))
        p = not_chest_probability(view, val_made)
        for kind in NEGATIVE_KINDS:
            mask = np.array([k == kind for k in val_kinds])
            held_out[kind] = round(float(np.mean(p[mask] > 0.5)), 4)
    return ViewCheckFit(view=view, epochs=epochs, train_counts=counts, held_out=held_out)


__all__ = [
    "NEGATIVE_KINDS",
    "ViewCheckFit",
    "fit_view_check",
    "negative_from",
    "not_chest_probability",
    "rotations",
    "synthetic_negatives",
    "train_view_check",
]

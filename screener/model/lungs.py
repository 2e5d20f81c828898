"""Lung-field crop inside the model graph: a small U-Net finds the lungs, the image is cropped to them.

A classifier that sees the whole radiograph can score well by reading where it came from: burned-in
text and markers in the corners, collimation edges, the black border a database left around its copies
(Wang, Liu & Xu's data has all of these; DeGrave, Janizek & Lee, "AI for radiographic COVID-19 detection
selects shortcuts over signal", Nature Machine Intelligence 2021, show the effect on exactly this kind of
multi-source data). :class:`LungCrop` removes most of that: a lung-field segmenter (trained on the JSRT
radiographs with the SCR lung masks, van Ginneken et al. 2006) predicts a mask at ``seg_size``, the
bounding box of the lung fields is widened by ``margin`` on each side, and the network input is resampled
from that box to ``crop_size`` (bilinear, ``grid_sample``).

It is a plain ``nn.Module`` made of ONNX-exportable operators, so it lives inside ``model.onnx`` in front
of both ResNets: every engine (ONNX Runtime, INT8, torch, TensorRT) runs the same crop, and the trainer
uses the very same module to crop its training images, so training and serving cannot drift apart.
Where the segmenter finds too little lung (less than ``min_fraction`` of the image, or a box narrower or
lower than ``min_side`` of it: not a chest, or a failure), the whole image is used, unchanged, so a
failure degrades to the behaviour without the crop rather than to a crop of noise.

The image the module receives is the normalised network input ``[N, 3, S, S]`` (the grey plane in every
channel); it reads channel 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from screener.core.errors import ModelError
from screener.model.modelcard import LungCropSpec


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class LungUNet(nn.Module):
    """A four-level U-Net (Ronneberger et al. 2015) with ``base``, 2x, 4x, 8x channels: one grey channel
    in, one lung-field logit per pixel out, same size (a multiple of 8)."""

    def __init__(self, base: int = 8) -> None:
        super().__init__()
        c1, c2, c3, c4 = base, 2 * base, 4 * base, 8 * base
        self.enc1 = _block(1, c1)
        self.enc2 = _block(c1, c2)
        self.enc3 = _block(c2, c3)
        self.bottom = _block(c3, c4)
        self.up3 = nn.ConvTranspose2d(c4, c3, 2, stride=2)
        self.dec3 = _block(2 * c3, c3)
        self.up2 = nn.ConvTranspose2d(c3, c2, 2, stride=2)
        self.dec2 = _block(2 * c2, c2)
        self.up1 = nn.ConvTranspose2d(c2, c1, 2, stride=2)
        self.dec1 = _block(2 * c1, c1)
        self.head = nn.Conv2d(c1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        b = self.bottom(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([self.up3(b), e3], dim=1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        out: torch.Tensor = self.head(d1)
        return out


class LungCrop(nn.Module):
    """``[N, 3, S, S]`` normalised input -> ``[N, 3, C, C]`` crop of the lung fields (see the module doc).

    :meth:`boxes` gives the crop boxes in normalised coordinates and whether the lungs were found;
    :meth:`forward` resamples. ``jitter`` (training only, 0 in the exported graph) widens or narrows the
    box by up to that fraction and shifts it by up to half of it, drawn per image from ``generator``.
    """

    def __init__(self, spec: LungCropSpec) -> None:
        super().__init__()
        self.spec = spec
        self.unet = LungUNet(spec.base_channels)

    def mask_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Lung-field logits ``[N, 1, seg_size, seg_size]`` of the normalised input's channel 0."""
        grey = image[:, :1]
        if grey.shape[-1] != self.spec.seg_size or grey.shape[-2] != self.spec.seg_size:
            grey = F.interpolate(
                grey, size=(self.spec.seg_size, self.spec.seg_size), mode="bilinear", align_corners=False
            )
        logits: torch.Tensor = self.unet(grey)
        return logits

    def boxes(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(box [N, 4] as x0, y0, x1, y1 in [-1, 1], found [N] bool)``; the whole image where not found."""
        s = self.spec.seg_size
        lung = (self.mask_logits(image) > 0).to(image.dtype)[:, 0]  # [N, s, s]
        fraction = lung.mean(dim=(1, 2))
        # A row or column counts when at least min_line of it is lung: stray specks do not widen the box.
        cols = lung.mean(dim=1) >= self.spec.min_line  # [N, s]
        rows = lung.mean(dim=2) >= self.spec.min_line
        index = torch.arange(s, dtype=image.dtype, device=image.device)[None, :]
        big = torch.full_like(index, float(2 * s))

        def extent(occupied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            first = torch.where(occupied, index, big).amin(dim=1)
            last = torch.where(occupied, index, -big).amax(dim=1)
            return first, last

        x0, x1 = extent(cols)
        y0, y1 = extent(rows)
        width = (x1 - x0 + 1) / s
        height = (y1 - y0 + 1) / s
        found = (
            (fraction >= self.spec.min_fraction)
            & (width >= self.spec.min_side)
            & (height >= self.spec.min_side)
        )
        # Pixel edges -> [-1, 1] (align_corners=False), then the margin on every side.
        m = self.spec.margin
        u0 = 2.0 * x0 / s - 1.0 - 2.0 * m * width
        u1 = 2.0 * (x1 + 1.0) / s - 1.0 + 2.0 * m * width
        v0 = 2.0 * y0 / s - 1.0 - 2.0 * m * height
        v1 = 2.0 * (y1 + 1.0) / s - 1.0 + 2.0 * m * height
        box = torch.stack([u0, v0, u1, v1], dim=1)
        whole = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=image.dtype, device=image.device)
        return torch.where(found[:, None], box, whole[None, :]), found

    def forward(
        self, image: torch.Tensor, jitter: float = 0.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        with torch.no_grad():
            box, _ = self.boxes(image)
        return crop_boxes(image, box, self.spec.crop_size, jitter=jitter, generator=generator)


def crop_boxes(
    image: torch.Tensor,
    box: torch.Tensor,
    size: int,
    *,
    jitter: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resample each image's ``box`` (x0, y0, x1, y1 in ``[-1, 1]``) to ``size`` x ``size`` (bilinear,
    edge pixels repeated outside the image). ``jitter`` > 0 randomly scales (by ``1 +- jitter``) and
    shifts (by up to ``jitter / 2`` of the box) each box first."""
    n = image.shape[0]
    cx = (box[:, 0] + box[:, 2]) / 2.0
    cy = (box[:, 1] + box[:, 3]) / 2.0
    hx = (box[:, 2] - box[:, 0]) / 2.0
    hy = (box[:, 3] - box[:, 1]) / 2.0
    if jitter > 0.0:
        draws = torch.rand((n, 4), generator=generator, dtype=torch.float32).to(image)
        hx = hx * (1.0 + jitter * (2.0 * draws[:, 0] - 1.0))
        hy = hy * (1.0 + jitter * (2.0 * draws[:, 1] - 1.0))
        cx = cx + jitter * hx * (2.0 * draws[:, 2] - 1.0)
        cy = cy + jitter * hy * (2.0 * draws[:, 3] - 1.0)
    # Sample positions of the output pixel centres (align_corners=False) in [-1, 1] of the input.
    steps = (torch.arange(size, dtype=image.dtype, device=image.device) * 2.0 + 1.0) / size - 1.0
    gx = cx[:, None] + hx[:, None] * steps[None, :]  # [N, size]
    gy = cy[:, None] + hy[:, None] * steps[None, :]
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=3)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


def load_lung_crop(weights_path: Path, spec: LungCropSpec) -> LungCrop:
    """The lung crop of a model directory: its U-Net weights (``lung_crop.*``) from the safetensors file
    (never a pickle), in eval mode. Digests are not checked here: load the directory with
    :func:`screener.model.modelcard.load_model_dir` first.

    Raises:
        ModelError: the file is unreadable or its ``lung_crop.*`` tensors do not fit ``spec``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"cannot read weights {weights_path}: {exc}") from None
    crop = LungCrop(spec)
    prefix = "lung_crop."
    try:
        crop.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    except RuntimeError as exc:
        raise ModelError(f"weights {weights_path}: no lung crop that fits the card: {exc}") from None
    return crop.eval()

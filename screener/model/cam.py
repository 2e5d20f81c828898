"""Class activation maps of the fused model, computed inside the graph as its extra output ``heatmap``.

Zhou, Khosla, Lapedriza, Oliva & Torralba, "Learning deep features for discriminative localization"
(CVPR 2016): a ResNet's logit for class ``c`` is ``w_c . mean_xy F(x, y) + b_c``, with ``F`` its last
convolutional features, so ``w_c . F(x, y)`` says how much each place of the image added to it. Here:

- ``c`` is the class of the fused prediction (the argmax of ``probs``), one map per image;
- each network's map is rectified and scaled to a maximum of 1 (the two networks' logits have their own
  scales), then the two are mixed with the fusion weight ``w``, like the probabilities;
- the map lives on the image the networks saw. With a lung crop in the graph that is the crop box, so it
  is resampled back onto the whole (letterboxed) network input: zero outside the box, bilinear inside,
  as separable interpolation matrices (a few matrix products, no ``GridSample``: the INT8 quantiser keeps
  everything a ``GridSample`` depends on in FP32, and that would be the whole backbone here).

The cost is one gather of the head's weights, one batched product with the features and two small matrix
products per image: nothing next to the two ResNets (BENCHMARKS.md has the measured latency).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from torchvision.models import ResNet

EPS = 1e-6


def backbone_maps(net: ResNet, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features [N, D, h, w], pooled [N, D], logits [N, C])`` of a torchvision ResNet, with the operators
    of its own ``forward``."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(image))))
    fmap = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    pooled = torch.flatten(net.avgpool(fmap), 1)
    return fmap, pooled, net.fc(pooled)


def class_map(fmap: torch.Tensor, head: nn.Linear, classes: torch.Tensor) -> torch.Tensor:
    """``[N, h, w]``: the rectified activation map of each image's class ``classes[n]``, scaled to max 1
    (all zero where nothing in the image speaks for the class)."""
    n, d, h, w = fmap.shape
    weights = head.weight[classes].to(fmap.dtype)  # [N, D]
    cam = torch.bmm(weights.unsqueeze(1), fmap.reshape(n, d, h * w)).reshape(n, h, w)
    cam = torch.relu(cam)
    peak = cam.reshape(n, h * w).amax(dim=1).reshape(n, 1, 1)
    return cam / (peak + EPS)


def _axis_weights(lo: torch.Tensor, hi: torch.Tensor, size: int, cells: int) -> torch.Tensor:
    """``[N, size, cells]`` bilinear weights from ``cells`` map cells spanning ``[lo, hi]`` (per image, in
    the input's ``[-1, 1]`` coordinates) to the input's ``size`` pixel centres; zero outside the span."""
    centres = (torch.arange(size, dtype=lo.dtype, device=lo.device) * 2.0 + 1.0) / size - 1.0  # [size]
    half = (hi - lo) / 2.0
    t = (centres[None, :] - ((lo + hi) / 2.0)[:, None]) / half[:, None]  # [N, size], -1..1 inside the span
    inside = (t.abs() <= 1.0).to(lo.dtype)
    position = ((t + 1.0) * cells - 1.0) / 2.0  # in cell units, cell centres at 0 .. cells - 1
    position = position.clamp(0.0, float(cells - 1))
    index = torch.arange(cells, dtype=lo.dtype, device=lo.device)
    weights = torch.relu(1.0 - (position[:, :, None] - index[None, None, :]).abs())
    return weights * inside[:, :, None]


def to_input_frame(cam: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
    """Resample ``cam`` ``[N, h, w]``, which covers ``box`` (x0, y0, x1, y1 in ``[-1, 1]`` of the network
    input, as :func:`screener.model.lungs.crop_boxes` takes it), onto ``size`` x ``size`` pixels of the
    whole input; scaled to max 1 again."""
    n, h, w = cam.shape
    rows = _axis_weights(box[:, 1], box[:, 3], size, h)  # [N, size, h]
    cols = _axis_weights(box[:, 0], box[:, 2], size, w)  # [N, size, w]
    out = torch.bmm(torch.bmm(rows, cam), cols.transpose(1, 2))  # [N, size, size]
    peak = out.reshape(n, size * size).amax(dim=1).reshape(n, 1, 1)
    return out / (peak + EPS)


def fused_heatmap(
    fmaps: tuple[torch.Tensor, torch.Tensor],
    heads: tuple[nn.Linear, nn.Linear],
    probs: torch.Tensor,
    weight: torch.Tensor,
    box: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """``heatmap [N, size, size]`` in [0, 1] of the fused prediction (see the module doc): each network's
    map of the class ``probs`` picks, mixed with the fusion ``weight``, mapped from ``box`` to the input.
    Raises ``ValueError`` when the two networks' feature maps differ in size."""
    classes = probs.argmax(dim=1)
    cam_a = class_map(fmaps[0].float(), heads[0], classes)
    cam_b = class_map(fmaps[1].float(), heads[1], classes)
    if cam_a.shape != cam_b.shape:
        raise ValueError(
            f"the networks' feature maps differ in size: {tuple(cam_a.shape)} vs {tuple(cam_b.shape)}"
        )
    w = weight.float()
    return to_input_frame(w * cam_a + (1.0 - w) * cam_b, box.float(), size)


def whole_image_box(image: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` boxes covering the whole input (no crop)."""
    whole = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float32, device=image.device)
    return whole[None, :].expand(image.shape[0], 4)

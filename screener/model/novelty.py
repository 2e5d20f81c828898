"""The image-content gate inside the model graph: a Mahalanobis novelty score on the pooled features.

Lee, Lee, Lee & Shin, "A simple unified framework for detecting out-of-distribution samples and
adversarial attacks" (NeurIPS 2018): fit one Gaussian per class with a covariance shared by all classes
(tied) on a trained network's penultimate features; the squared Mahalanobis distance to the closest class
mean scores how unlike the training images an input is. Here the features are the global-average-pooled
outputs of both fused ResNets, concatenated. The precision matrix is stored factorised as a whitening
matrix ``W`` (``Sigma^-1 = W W^T``), so the score is ``min_c ||x W - mu_c W||^2``: one matrix product and a
few element-wise operators, exportable to ONNX and run by every engine, in FP32.

Beside it, optionally, a view check (:class:`ViewCheck`): a small CNN on the whole model input (before the
lung crop) that scores "not a frontal chest radiograph" (rotated, upside down, inverted, a part of an
image, another anatomy). Mahalanobis distances on a chest classifier's features do not see orientation
or polarity well (a lung crop and contrast enhancement make a rotated or inverted chest look
chest-like), so the gate's score becomes ``max(mahalanobis, view_scale * p_not_chest)``, still in the
Mahalanobis score's units, with ``view_scale`` mapping the view check's threshold onto the gate's.

With ``consistency`` (card method ``mahalanobis+view+consistency``) the view check also reads seven
transformed copies of the input: turned by 90, 180 and 270 degrees, and inverted (a wrong MONOCHROME1/2
flag) as it is and turned. ``u_0`` is the check's "upright chest" probability of the input as it is and
``u_t`` that of copy ``t``; the probability the gate uses becomes
``max(p_not_chest, max_t u_t, 0.5 + max_t u_t - u_0)`` (clipped to [0, 1]): a copy that looks like an
upright chest, or that looks more like one than the input itself, means the input is a turned or inverted
chest, however upright it looked to the check alone. No retraining: the copies of an upright chest are
exactly the negatives the check was trained to refuse, so they score low. A turn by a multiple of 90
degrees commutes with the contrast enhancement, so turning the prepared input is turning the image;
inversion is done on the prepared input too (``centre - x``, :func:`invert_centre`), exact for the
normalisation and close for the contrast enhancement (an equalisation of ``1 - g`` is about ``1 - `` that
of ``g``). Seven more passes of a CNN of about 70,000 parameters at 64 px: still negligible.

The statistics and weights are fitted by the trainer (``trainer.gate``); this module only holds and
applies them.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional

VIEW_SIZE = 64
"""Side in pixels at which the view check looks at the model input."""

if TYPE_CHECKING:
    from torchvision.models import ResNet


def backbone_features(net: ResNet, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled features [N, D], logits [N, C])`` of a torchvision ResNet, with exactly the operators of
    its own ``forward`` (so the exported graph is the same, plus one more consumer of the pooled features).
    """
    x = net.maxpool(net.relu(net.bn1(net.conv1(image))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    features = torch.flatten(net.avgpool(x), 1)
    return features, net.fc(features)


class ViewCheck(nn.Module):
    """``forward(image [N, 3, S, S]) -> logit [N]`` of "this is not a frontal chest radiograph".

    The model input (already contrast-enhanced and normalised) is averaged over its channels and resized
    to :data:`VIEW_SIZE`; four stride-2 convolutions keep a 4 x 4 map whose layout (where the bright and
    dark parts are) a linear layer reads: orientation is exactly what a global pool would lose. About
    70,000 parameters: negligible beside the ResNets.
    """

    def __init__(self, *, consistency: bool = False) -> None:
        super().__init__()
        self.consistency = consistency
        layers: list[nn.Module] = []
        channels = (1, 16, 32, 64, 64)
        for c_in, c_out in itertools.pairwise(channels):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out)]
            layers.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1] * (VIEW_SIZE // 16) ** 2, 1)

    @staticmethod
    def prepare(image: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` model input -> ``[N, 1, VIEW_SIZE, VIEW_SIZE]``: what :meth:`classify` reads."""
        x = image.float().mean(dim=1, keepdim=True)
        if x.shape[-1] != VIEW_SIZE or x.shape[-2] != VIEW_SIZE:
            x = functional.interpolate(x, size=(VIEW_SIZE, VIEW_SIZE), mode="bilinear", align_corners=False)
        return x

    def classify(self, small: torch.Tensor) -> torch.Tensor:
        """Logits ``[N]`` of prepared ``[N, 1, VIEW_SIZE, VIEW_SIZE]`` inputs."""
        logits: torch.Tensor = self.head(torch.flatten(self.features(small), 1))
        return logits[:, 0]

    def not_chest(self, small: torch.Tensor, centre: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Probability ``[N]`` of "not a frontal chest the right way up" for prepared inputs; with
        :attr:`consistency`, raised by the transformed copies (see the module docstring), the inverted
        ones being ``centre - x`` (:func:`invert_centre` of the model's normalisation)."""
        if not self.consistency:
            return torch.sigmoid(self.classify(small))
        n = small.shape[0]
        inverted = centre - small
        copies = [small, *_turns(small), inverted, *_turns(inverted)]
        upright = 1.0 - torch.sigmoid(self.classify(torch.cat(copies))).reshape(8, n)
        best_copy = upright[1:].max(dim=0).values
        more_upright_than_itself = torch.clamp(0.5 + best_copy - upright[0], 0.0, 1.0)
        return torch.maximum(torch.maximum(1.0 - upright[0], best_copy), more_upright_than_itself)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``[N]`` of the model input ``image`` as it is (no copies)."""
        return self.classify(self.prepare(image))


def _turns(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` ``[N, 1, S, S]`` turned by 90, 180 and 270 degrees (torch.rot90's direction), from transposes
    and flips: the ONNX exporter has no rot90, and every engine runs Transpose and Slice."""
    return [
        torch.flip(x, dims=(3,)).transpose(2, 3),
        torch.flip(x, dims=(2, 3)),
        torch.flip(x.transpose(2, 3), dims=(3,)),
    ]


def invert_centre(mean: tuple[float, ...], std: tuple[float, ...]) -> float:
    """The ``c`` for which ``c - x`` is the prepared input of the inverted grey image, where ``x`` is the
    prepared input (:meth:`ViewCheck.prepare`: the channel mean of ``(g - mean_k) / std_k``): with
    ``a = mean_k(1 / std_k)`` and ``b = mean_k(mean_k / std_k)``, ``x = a g - b`` and
    ``a (1 - g) - b = (a - 2 b) - x``. Raises ``ValueError`` for empty, mismatched or non-positive std."""
    if not mean or len(mean) != len(std) or any(not s > 0 for s in std):
        raise ValueError(
            f"normalisation mean {mean!r} and std {std!r} must be non-empty, equal in length, std > 0"
        )
    a = sum(1.0 / s for s in std) / len(std)
    b = sum(m / s for m, s in zip(mean, std, strict=True)) / len(std)
    return a - 2.0 * b


class MahalanobisGate(nn.Module):
    """``forward(features [N, D], image) -> novelty [N]``: the squared Mahalanobis distance to the nearest
    class, raised to ``view_scale * sigmoid(view(image))`` where that is higher (with a view check).

    Buffers (persisted in the state dict, so in ``weights.safetensors``): ``whitening`` ``[D, D]`` and
    ``means`` ``[C, D]`` (the class means, already whitened); with ``view=True`` also the
    :class:`ViewCheck` weights (``view.``) and ``view_scale``. Computed in float32 whatever the input
    dtype: the scores of unusual images reach 1e4-1e6, past what FP16 holds with any precision.
    """

    whitening: torch.Tensor
    means: torch.Tensor
    view_scale: torch.Tensor
    view_invert_centre: torch.Tensor

    def __init__(
        self, feature_size: int, num_classes: int, *, view: bool = False, consistency: bool = False
    ) -> None:
        super().__init__()
        if feature_size < 1 or num_classes < 1:
            raise ValueError(f"feature size {feature_size} and class count {num_classes} must be >= 1")
        self.register_buffer("whitening", torch.eye(feature_size, dtype=torch.float32))
        self.register_buffer("means", torch.zeros(num_classes, feature_size, dtype=torch.float32))
        self.view: ViewCheck | None = None
        if consistency and not view:
            raise ValueError("the consistency copies are a part of the view check: they need view=True")
        if view:
            self.view = ViewCheck(consistency=consistency)
            self.register_buffer("view_scale", torch.tensor(1.0, dtype=torch.float32))
        if consistency:
            self.register_buffer("view_invert_centre", torch.tensor(0.0, dtype=torch.float32))

    def set_view(self, view: ViewCheck, scale: float, centre: float | None = None) -> None:
        """Load a trained view check and the factor that maps its probability onto the gate's score
        units, and (a gate with the consistency copies) the :func:`invert_centre` of the model's
        normalisation. Raises ``ValueError`` when the gate was built without a view check, ``scale`` is not
        a finite positive number, or the centre is missing or not finite where needed."""
        if self.view is None:
            raise ValueError("this gate was built without a view check (MahalanobisGate(view=True))")
        if not (float(scale) > 0.0 and float(scale) < float("inf")):
            raise ValueError(f"view scale {scale!r} must be a finite number > 0")
        if self.view.consistency and (centre is None or not math.isfinite(float(centre))):
            raise ValueError(
                f"a view check with consistency copies needs a finite inversion centre, got {centre!r}"
            )
        self.view.load_state_dict(view.state_dict())
        self.view.eval()
        self.view_scale.fill_(float(scale))
        if self.view.consistency and centre is not None:
            self.view_invert_centre.fill_(float(centre))

    def set_statistics(self, whitening: torch.Tensor, means: torch.Tensor) -> None:
        """Load fitted statistics; raises ``ValueError`` when their shapes do not fit the gate's."""
        if tuple(whitening.shape) != tuple(self.whitening.shape) or tuple(means.shape) != tuple(
            self.means.shape
        ):
            raise ValueError(
                f"gate statistics {tuple(whitening.shape)}, {tuple(means.shape)} do not fit "
                f"{tuple(self.whitening.shape)}, {tuple(self.means.shape)}"
            )
        if not (torch.isfinite(whitening).all() and torch.isfinite(means).all()):
            raise ValueError("gate statistics hold a non-finite value")
        self.whitening.copy_(whitening.to(torch.float32))
        self.means.copy_(means.to(torch.float32))

    def mahalanobis(self, features: torch.Tensor) -> torch.Tensor:
        """The squared Mahalanobis distance of ``features`` ``[N, D]`` to the nearest class mean."""
        z = torch.matmul(features.float(), self.whitening)  # [N, D]
        diff = z.unsqueeze(1) - self.means.unsqueeze(0)  # [N, C, D]
        return (diff * diff).sum(dim=2).min(dim=1).values

    def forward(self, features: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        distance = self.mahalanobis(features)
        if self.view is None:
            return distance
        if image is None:
            raise ValueError("a gate with a view check needs the model input image")
        small = self.view.prepare(image)
        centre = self.view_invert_centre if self.view.consistency else 0.0
        return torch.maximum(distance, self.view_scale * self.view.not_chest(small, centre))

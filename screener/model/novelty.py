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

With ``turns`` (card method ``mahalanobis+view+turns``) the view check also reads the input turned by 90,
180 and 270 degrees, and ``p_not_chest`` becomes ``max(p_not_chest(x), max_k p_chest(turn_k(x)))``: an
input that looks like an upright chest once turned is a turned chest, however upright it looked to the
check itself. It costs three more passes of the small CNN (about 70,000 parameters at 64 px) and no
retraining: the turned inputs are exactly the rotated negatives the check was trained to refuse, so an
upright chest's turned versions score low. A rotation by a multiple of 90 degrees commutes with the
contrast enhancement, so turning the prepared input is turning the image.

The statistics and weights are fitted by the trainer (``trainer.gate``); this module only holds and
applies them.
"""

from __future__ import annotations

import itertools
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

    def __init__(self, *, turns: bool = False) -> None:
        super().__init__()
        self.turns = turns
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

    def not_chest(self, small: torch.Tensor) -> torch.Tensor:
        """Probability ``[N]`` of "not a frontal chest the right way up" for prepared inputs; with
        :attr:`turns`, raised to the highest "upright chest" probability of the input turned by 90, 180 or
        270 degrees (see the module docstring)."""
        if not self.turns:
            return torch.sigmoid(self.classify(small))
        n = small.shape[0]
        # Turns by 90, 180 and 270 degrees (torch.rot90's direction) from transposes and flips: the ONNX
        # exporter has no rot90, and every engine runs Transpose and Slice.
        turned = [
            small,
            torch.flip(small, dims=(3,)).transpose(2, 3),
            torch.flip(small, dims=(2, 3)),
            torch.flip(small.transpose(2, 3), dims=(3,)),
        ]
        p = torch.sigmoid(self.classify(torch.cat(turned))).reshape(4, n)
        return torch.maximum(p[0], (1.0 - p[1:]).max(dim=0).values)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``[N]`` of the model input ``image`` as it is (no turns)."""
        return self.classify(self.prepare(image))


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

    def __init__(
        self, feature_size: int, num_classes: int, *, view: bool = False, turns: bool = False
    ) -> None:
        super().__init__()
        if feature_size < 1 or num_classes < 1:
            raise ValueError(f"feature size {feature_size} and class count {num_classes} must be >= 1")
        self.register_buffer("whitening", torch.eye(feature_size, dtype=torch.float32))
        self.register_buffer("means", torch.zeros(num_classes, feature_size, dtype=torch.float32))
        self.view: ViewCheck | None = None
        if turns and not view:
            raise ValueError("turns are a part of the view check: a gate with turns needs view=True")
        if view:
            self.view = ViewCheck(turns=turns)
            self.register_buffer("view_scale", torch.tensor(1.0, dtype=torch.float32))

    def set_view(self, view: ViewCheck, scale: float) -> None:
        """Load a trained view check and the factor that maps its probability onto the gate's score
        units. Raises ``ValueError`` when the gate was built without a view check or ``scale`` is not a
        finite positive number."""
        if self.view is None:
            raise ValueError("this gate was built without a view check (MahalanobisGate(view=True))")
        if not (float(scale) > 0.0 and float(scale) < float("inf")):
            raise ValueError(f"view scale {scale!r} must be a finite number > 0")
        self.view.load_state_dict(view.state_dict())
        self.view.eval()
        self.view_scale.fill_(float(scale))

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
        return torch.maximum(distance, self.view_scale * self.view.not_chest(self.view.prepare(image)))

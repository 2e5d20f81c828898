"""The image-content gate inside the model graph: a Mahalanobis novelty score on the pooled features.

Lee, Lee, Lee & Shin, "A simple unified framework for detecting out-of-distribution samples and
adversarial attacks" (NeurIPS 2018): fit one Gaussian per class with a covariance shared by all classes
(tied) on a trained network's penultimate features; the squared Mahalanobis distance to the closest class
mean scores how unlike the training images an input is. Here the features are the global-average-pooled
outputs of both fused ResNets, concatenated. The precision matrix is stored factorised as a whitening
matrix ``W`` (``Sigma^-1 = W W^T``), so the score is ``min_c ||x W - mu_c W||^2``: one matrix product and a
few element-wise operators, exportable to ONNX and run by every engine, in FP32.

The statistics are fitted by the trainer (``trainer.gate``); this module only holds and applies them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

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


class MahalanobisGate(nn.Module):
    """``forward(features [N, D]) -> novelty [N]``: the squared Mahalanobis distance to the nearest class.

    Buffers (persisted in the state dict, so in ``weights.safetensors``): ``whitening`` ``[D, D]`` and
    ``means`` ``[C, D]`` (the class means, already whitened). Computed in float32 whatever the input
    dtype: the scores of unusual images reach 1e4-1e6, past what FP16 holds with any precision.
    """

    whitening: torch.Tensor
    means: torch.Tensor

    def __init__(self, feature_size: int, num_classes: int) -> None:
        super().__init__()
        if feature_size < 1 or num_classes < 1:
            raise ValueError(f"feature size {feature_size} and class count {num_classes} must be >= 1")
        self.register_buffer("whitening", torch.eye(feature_size, dtype=torch.float32))
        self.register_buffer("means", torch.zeros(num_classes, feature_size, dtype=torch.float32))

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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = torch.matmul(features.float(), self.whitening)  # [N, D]
        diff = z.unsqueeze(1) - self.means.unsqueeze(0)  # [N, C, D]
        return (diff * diff).sum(dim=2).min(dim=1).values

"""The fused classifier: two ResNets whose softmax outputs are mixed by one weight ("model integration").

``probs = w * softmax(net_a(x)) + (1 - w) * softmax(net_b(x))`` as in Wang, Liu & Xu (2020), section II.C,
with ResNet-101 and ResNet-152 by default. Weights are only ever read from safetensors, never unpickled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchvision import models

from screener.core.errors import ModelError
from screener.model.cam import backbone_maps, fused_heatmap, whole_image_box
from screener.model.lungs import LungCrop, crop_boxes
from screener.model.modelcard import (
    ARCHITECTURE_NAMES,
    CLASSES,
    GateSpec,
    LungCropSpec,
    ModelCard,
    OutputCalibration,
)
from screener.model.novelty import MahalanobisGate, backbone_features

if TYPE_CHECKING:
    from torchvision.models import ResNet

ARCHITECTURES: dict[str, Callable[..., ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
    "resnet101": models.resnet101,
    "resnet152": models.resnet152,
}
"""Explicit backbone factories by name (never ``models.__dict__[name]``)."""

assert tuple(ARCHITECTURES) == ARCHITECTURE_NAMES, (
    "screener.model.modelcard.ARCHITECTURE_NAMES is out of date"
)


def make_backbone(name: str, num_classes: int = len(CLASSES)) -> ResNet:
    """A randomly initialised ResNet whose ``fc`` is replaced by a ``num_classes`` Linear head.

    Nothing is downloaded (``weights=None``). Raises :class:`ModelError` for an unknown name.
    """
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        raise ModelError(f"unknown backbone {name!r}: choose one of {', '.join(ARCHITECTURES)}") from None
    if num_classes < 2:
        raise ModelError(f"num_classes {num_classes} must be at least 2")
    net = factory(weights=None)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


class FusedResNet(nn.Module):
    """Two backbones and a fusion weight ``w`` in [0, 1], kept as a float32 buffer named ``fusion_weight``.

    :meth:`forward` takes a float32 image batch ``[N, 3, S, S]`` and returns ``(probs, probs_a, probs_b)``,
    each ``[N, num_classes]``, with ``probs = w * probs_a + (1 - w) * probs_b`` and ``probs_x =
    softmax(logits_x / T_x)``: each network's temperature ``T`` (1 by default) comes from the card's
    ``calibration`` and is not part of the weights file. With an output calibration (card ``calibration``: a
    fused temperature or vector scaling, :class:`OutputCalibration`), ``probs`` is then ``softmax(scale *
    log(probs) + bias)``: the mixture itself calibrated (:func:`fuse`). With ``lung_crop`` the input first
    goes through :class:`screener.model.lungs.LungCrop` (its U-Net weights are part of the state dict, under
    ``lung_crop.``) and the backbones see the crop. With ``gate_dims`` (the two networks' feature sizes) the
    model holds a :class:`screener.model.novelty.MahalanobisGate` (``novelty_gate.``, its statistics in the
    state dict) and :meth:`forward` returns a fourth tensor, ``novelty`` ``[N]`` float32. With
    ``heatmap_size`` it returns one more tensor, last: ``heatmap`` ``[N, heatmap_size, heatmap_size]`` float32
    in [0, 1], the class activation map of the fused prediction on the whole input
    (:mod:`screener.model.cam`).
    """

    fusion_weight: torch.Tensor
    temperature_a: torch.Tensor
    temperature_b: torch.Tensor
    output_scale: torch.Tensor
    output_bias: torch.Tensor

    def __init__(
        self,
        arch_a: str = "resnet101",
        arch_b: str = "resnet152",
        *,
        fusion_weight: float = 0.5,
        num_classes: int = len(CLASSES),
        lung_crop: LungCropSpec | None = None,
        temperatures: tuple[float, float] = (1.0, 1.0),
        output_calibration: OutputCalibration | None = None,
        gate_dims: tuple[int, int] | None = None,
        gate_view: bool = False,
        gate_consistency: bool = False,
        heatmap_size: int | None = None,
    ) -> None:
        super().__init__()
        self.arch_a = arch_a
        self.arch_b = arch_b
        self.lung_crop_spec = lung_crop
        self.lung_crop: nn.Module | None = None
        if lung_crop is not None:
            from screener.model.lungs import LungCrop

            self.lung_crop = LungCrop(lung_crop)
        self.net_a = make_backbone(arch_a, num_classes)
        self.net_b = make_backbone(arch_b, num_classes)
        self.register_buffer(
            "fusion_weight", torch.tensor(_checked_weight(fusion_weight), dtype=torch.float32)
        )
        self.register_buffer("temperature_a", torch.tensor(1.0), persistent=False)
        self.register_buffer("temperature_b", torch.tensor(1.0), persistent=False)
        self.set_temperatures(*temperatures)
        self.register_buffer("output_scale", torch.ones(num_classes), persistent=False)
        self.register_buffer("output_bias", torch.zeros(num_classes), persistent=False)
        self.output_calibrated = False  # a Python flag, so the exported graph holds the step only when used
        self.set_output_calibration(output_calibration)
        self.novelty_gate: MahalanobisGate | None = None
        if gate_dims is not None:
            self.add_gate(gate_dims, view=gate_view, consistency=gate_consistency)
        # With a size, forward also returns the class activation map (screener.model.cam), last.
        self.heatmap_size = heatmap_size

    @property
    def feature_dims(self) -> tuple[int, int]:
        """The pooled feature size of each network (the input size of its ``fc`` head)."""
        return int(self.net_a.fc.in_features), int(self.net_b.fc.in_features)

    def add_gate(
        self, gate_dims: tuple[int, int] | None = None, *, view: bool = False, consistency: bool = False
    ) -> MahalanobisGate:
        """Give the model an (unfitted) image-content gate, with a view check on the input image where
        ``view`` (reading the input's turned and inverted copies too where ``consistency``), and return
        it. Raises :class:`ModelError` when ``gate_dims`` (default: the networks' own) differ from the
        networks' feature sizes."""
        dims = tuple(gate_dims) if gate_dims is not None else self.feature_dims
        if dims != self.feature_dims:
            raise ModelError(f"gate feature sizes {dims} differ from the networks' {self.feature_dims}")
        num_classes = int(self.net_a.fc.out_features)
        self.novelty_gate = MahalanobisGate(
            sum(self.feature_dims), num_classes, view=view, consistency=consistency
        )
        return self.novelty_gate

    def set_temperatures(self, temperature_a: float, temperature_b: float) -> None:
        """Set each network's softmax temperature (calibration). Raises :class:`ModelError` unless both
        are finite and positive."""
        for value in (temperature_a, temperature_b):
            if not (float(value) > 0.0 and float(value) < float("inf")):
                raise ModelError(f"temperature {value!r} must be a finite number > 0")
        self.temperature_a.fill_(float(temperature_a))
        self.temperature_b.fill_(float(temperature_b))

    def set_output_calibration(self, calibration: OutputCalibration | None) -> None:
        """Set (or, with None, remove) the step on the fused probabilities. Raises :class:`ModelError`
        when its length is not the number of classes or a value is not finite."""
        if calibration is None:
            self.output_scale.fill_(1.0)
            self.output_bias.fill_(0.0)
            self.output_calibrated = False
            return
        k = int(self.output_scale.shape[0])
        values = (*calibration.scale, *calibration.bias)
        if len(calibration.scale) != k or len(calibration.bias) != k or not all(map(math.isfinite, values)):
            raise ModelError(f"output calibration {calibration} must hold {k} finite scales and {k} biases")
        self.output_scale.copy_(torch.tensor(calibration.scale))
        self.output_bias.copy_(torch.tensor(calibration.bias))
        self.output_calibrated = True

    @property
    def temperatures(self) -> tuple[float, float]:
        """The two networks' temperatures ``(T_a, T_b)``."""
        return float(self.temperature_a), float(self.temperature_b)

    @property
    def output_calibration(self) -> OutputCalibration | None:
        """The step on the fused probabilities (None: none)."""
        if not self.output_calibrated:
            return None
        return OutputCalibration(
            tuple(float(x) for x in self.output_scale), tuple(float(x) for x in self.output_bias)
        )

    def fuse(self, probs_a: torch.Tensor, probs_b: torch.Tensor) -> torch.Tensor:
        """The fused probabilities of the two networks' (calibrated) ones: :func:`fuse`."""
        step = (self.output_scale, self.output_bias) if self.output_calibrated else None
        return fuse(probs_a, probs_b, self.fusion_weight, step)

    def set_fusion_weight(self, weight: float) -> None:
        """Re-weight the two networks (the paper's integration step).

        Raises :class:`ModelError` when ``weight`` is outside [0, 1].
        """
        self.fusion_weight.fill_(_checked_weight(weight))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.heatmap_size is not None:
            return self._forward_with_heatmap(image, self.heatmap_size)
        whole = image  # the gate's view check looks at the whole input, not the lung crop
        if self.lung_crop is not None:
            image = self.lung_crop(image)
        if self.novelty_gate is None:
            logits_a, logits_b = self.net_a(image), self.net_b(image)
        else:
            features_a, logits_a = backbone_features(self.net_a, image)
            features_b, logits_b = backbone_features(self.net_b, image)
        probs_a = torch.softmax(logits_a / self.temperature_a.to(image.dtype), dim=1)
        probs_b = torch.softmax(logits_b / self.temperature_b.to(image.dtype), dim=1)
        probs = self.fuse(probs_a, probs_b)
        if self.novelty_gate is None:
            return probs, probs_a, probs_b
        return probs, probs_a, probs_b, self.novelty_gate(torch.cat((features_a, features_b), dim=1), whole)

    def _forward_with_heatmap(self, image: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
        """:meth:`forward`'s outputs, then ``heatmap [N, size, size]`` (:mod:`screener.model.cam`)."""
        whole = image
        if isinstance(self.lung_crop, LungCrop):
            with torch.no_grad():
                box, _ = self.lung_crop.boxes(image)
            image = crop_boxes(image, box, self.lung_crop.spec.crop_size)
        else:
            box = whole_image_box(image)
        fmap_a, features_a, logits_a = backbone_maps(self.net_a, image)
        fmap_b, features_b, logits_b = backbone_maps(self.net_b, image)
        probs_a = torch.softmax(logits_a / self.temperature_a.to(image.dtype), dim=1)
        probs_b = torch.softmax(logits_b / self.temperature_b.to(image.dtype), dim=1)
        probs = self.fuse(probs_a, probs_b)
        w = self.fusion_weight.to(probs_a.dtype)
        heatmap = fused_heatmap((fmap_a, fmap_b), (self.net_a.fc, self.net_b.fc), probs, w, box, size)
        if self.novelty_gate is None:
            return probs, probs_a, probs_b, heatmap
        novelty = self.novelty_gate(torch.cat((features_a, features_b), dim=1), whole)
        return probs, probs_a, probs_b, novelty, heatmap


LOG_FLOOR = 1e-12
"""Probabilities are floored here before a logarithm (the fused temperature's ``log``)."""


def fuse(
    probs_a: torch.Tensor,
    probs_b: torch.Tensor,
    fusion_weight: torch.Tensor,
    output_step: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``w * probs_a + (1 - w) * probs_b`` (the paper's weighted integration), then, with an output step
    ``(scale, bias)``, ``softmax(scale * log(mixture) + bias)``: temperature or vector scaling of the
    mixture itself (Guo et al., ICML 2017). A mixture of two calibrated distributions is under-confident;
    calibrating each network alone cannot fix that, this step can (trainer/calibrate.py)."""
    w = fusion_weight.to(probs_a.dtype)
    probs = w * probs_a + (1.0 - w) * probs_b
    if output_step is None:
        return probs
    scale, bias = output_step
    # the floor of the trainer's numpy twin (trainer.calibrate), so both give the same numbers
    logs = torch.log(probs.clamp_min(LOG_FLOOR))
    return torch.softmax(logs * scale.to(probs.dtype) + bias.to(probs.dtype), dim=1)


def _checked_weight(weight: float) -> float:
    value = float(weight)
    if not 0.0 <= value <= 1.0:
        raise ModelError(f"fusion weight {weight!r} must be between 0 and 1")
    return value


def _gate_dims(gate: GateSpec | None) -> tuple[int, int] | None:
    return None if gate is None else (int(gate.feature_dims[0]), int(gate.feature_dims[1]))


def gate_has_view(gate: GateSpec | None) -> bool:
    """True when the card's gate includes the view check (method ``mahalanobis+view`` or
    ``mahalanobis+view+consistency``)."""
    return gate is not None and gate.method in ("mahalanobis+view", "mahalanobis+view+consistency")


def gate_has_consistency(gate: GateSpec | None) -> bool:
    """True when the card's view check also reads the input's turned and inverted copies (method
    ``mahalanobis+view+consistency``)."""
    return gate is not None and gate.method == "mahalanobis+view+consistency"


def load_fused_from_safetensors(path: Path, card: ModelCard) -> FusedResNet:
    """Build the card's :class:`FusedResNet` and load its state dict from a safetensors file (eval mode, CPU).

    Only safetensors is read (no pickle). A card with a ``gate`` section needs the gate's statistics in
    the file (and a card without one refuses a file that has them). Raises :class:`ModelError` when the
    file is unreadable, its tensors do not fit the card's architectures (and gate), or its stored
    fusion weight disagrees with the card.
    Digests are not checked here: call :func:`screener.model.modelcard.load_model_dir` first.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    arch_a, arch_b = card.architectures
    model = FusedResNet(
        arch_a,
        arch_b,
        fusion_weight=card.fusion_weight,
        num_classes=len(card.classes),
        lung_crop=card.lung_crop,
        temperatures=(card.temperature("a"), card.temperature("b")),
        output_calibration=card.output_calibration(),
        gate_dims=_gate_dims(card.gate),
        gate_view=gate_has_view(card.gate),
        gate_consistency=gate_has_consistency(card.gate),
        heatmap_size=card.heatmap.size if card.heatmap is not None else None,
    )
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"cannot read weights {path}: {exc}; restore the file or re-export") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelError(
            f"weights {path} do not fit {arch_a}+{arch_b} with {len(card.classes)} classes: {first}"
        ) from None
    stored = float(model.fusion_weight)
    if abs(stored - card.fusion_weight) > 1e-6:
        raise ModelError(
            f"weights {path} carry fusion weight {stored} but the card says {card.fusion_weight}: re-export"
        )
    return model.eval()

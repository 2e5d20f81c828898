"""Model integration (Wang, Liu & Xu 2020, sections II.C and III.B): two frozen nets, one output weight.

``p = w * softmax(z_a) + (1 - w) * softmax(z_b)``, exactly what :class:`screener.model.fused.FusedResNet`
computes.
Both nets are frozen; only ``w`` is learnt, from the validation set. The nets' probabilities are computed
once (inference is the expensive part) and every round reuses them.

``method="accuracy"`` is the paper's dynamic re-weighting: each round draws a bootstrap resample of the
validation set, measures both nets' accuracy on it, and moves ``w`` toward ``acc_a / (acc_a + acc_b)`` --
the net with the higher accuracy gets the higher weight. The proportional rule (rather than a softmax with a
sharp temperature) is the paper's literal description, and it keeps both nets in the mix, which on a few
hundred validation images guards against crowning a net on sampling noise; ``temperature`` sharpens it
when wanted. Exponential smoothing across rounds damps the round-to-round swings the paper reports in its
fused loss curve. ``method="logloss"`` instead picks the ``w`` in [0, 1] that minimises the validation
log-loss (convex in ``w``; golden-section search).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.utils.data import DataLoader

from screener.core.errors import TrainingError
from screener.core.logs import get_logger

log = get_logger("trainer.fuse")

METHODS = ("accuracy", "logloss")
_EPS = 1e-12

Probs = NDArray[np.float64]
Labels = NDArray[np.int64]


@dataclass(frozen=True)
class FusionResult:
    """The weight of net A (net B gets ``1 - weight``), how it was reached, and the full-validation-set
    accuracy of each net and of the fusion, with the fusion's log-loss at ``weight``."""

    weight: float
    trajectory: list[dict[str, float]]
    acc_a: float
    acc_b: float
    acc_fused: float
    logloss_fused: float
    method: str = "accuracy"

    def summary(self) -> dict[str, float | str | int]:
        """Flat numbers for a model card's metrics."""
        return {
            "method": self.method,
            "weight": self.weight,
            "rounds": len(self.trajectory),
            "acc_a": self.acc_a,
            "acc_b": self.acc_b,
            "acc_fused": self.acc_fused,
            "logloss_fused": self.logloss_fused,
        }


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad = False`` on every parameter; returns ``net``."""
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net


def predict_probs(
    net_a: nn.Module,
    net_b: nn.Module,
    loader: DataLoader[Any],
    device: torch.device,
) -> tuple[Probs, Probs, Labels]:
    """Softmax outputs of both (frozen) nets over ``loader``, and the labels: ``[N, C], [N, C], [N]``.

    Raises :class:`TrainingError` when the loader yields nothing.
    """
    outs_a: list[torch.Tensor] = []
    outs_b: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with torch.inference_mode():
        for images, targets in loader:
            images = images.to(device)
            outs_a.append(torch.softmax(net_a(images).float(), dim=1).cpu())
            outs_b.append(torch.softmax(net_b(images).float(), dim=1).cpu())
            labels.append(targets.cpu())
    if not labels:
        raise TrainingError("the validation loader for fusion yielded no images")
    return (
        torch.cat(outs_a).double().numpy(),
        torch.cat(outs_b).double().numpy(),
        torch.cat(labels).long().numpy(),
    )


def fused_probs(weight: float, probs_a: Probs, probs_b: Probs) -> Probs:
    """``weight * probs_a + (1 - weight) * probs_b``."""
    return weight * probs_a + (1.0 - weight) * probs_b


def accuracy(probs: Probs, labels: Labels) -> float:
    """Share of rows whose argmax is the label."""
    return float(np.mean(probs.argmax(axis=1) == labels))


def log_loss(probs: Probs, labels: Labels) -> float:
    """Mean negative log-probability of the true class (clipped at 1e-12)."""
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, _EPS, 1.0))))


def accuracy_weight(acc_a: float, acc_b: float, temperature: float | None = None) -> float:
    """The target weight of net A from the two accuracies: ``acc_a / (acc_a + acc_b)`` (0.5 when both are 0),
    or with ``temperature`` a softmax ``exp(acc_a/T) / (exp(acc_a/T) + exp(acc_b/T))``."""
    if temperature is not None:
        if temperature <= 0:
            raise TrainingError(f"temperature {temperature} must be positive")
        return 1.0 / (1.0 + math.exp((acc_b - acc_a) / temperature))
    total = acc_a + acc_b
    return 0.5 if total <= 0 else acc_a / total


def fuse_probs(
    probs_a: Probs,
    probs_b: Probs,
    labels: Labels,
    *,
    method: str = "accuracy",
    rounds: int = 10,
    smoothing: float = 0.5,
    temperature: float | None = None,
    seed: int = 0,
) -> FusionResult:
    """:func:`fuse` on precomputed probabilities (pure numpy; deterministic for a given ``seed``).

    For ``"accuracy"``: start at ``w = 0.5``; each round ``w <- (1 - smoothing) * w + smoothing * target``
    with the target from :func:`accuracy_weight` on a bootstrap resample. For ``"logloss"``: golden-section
    search on [0, 1] (``rounds`` is ignored; the trajectory lists the search steps).
    Raises :class:`TrainingError` for an unknown method, bad arguments or mismatched arrays.
    """
    if method not in METHODS:
        raise TrainingError(f"unknown fusion method {method!r}: choose one of {', '.join(METHODS)}")
    if probs_a.shape != probs_b.shape or probs_a.shape[0] != labels.shape[0] or labels.size == 0:
        raise TrainingError(
            f"fusion needs matching, non-empty arrays: got {probs_a.shape}, {probs_b.shape}, {labels.shape}"
        )
    if not 0.0 < smoothing <= 1.0:
        raise TrainingError(f"smoothing {smoothing} must be in (0, 1]")
    if rounds < 1:
        raise TrainingError(f"rounds {rounds} must be at least 1")

    def point(weight: float) -> tuple[float, float]:
        fused = fused_probs(weight, probs_a, probs_b)
        return accuracy(fused, labels), log_loss(fused, labels)

    trajectory: list[dict[str, float]] = []
    if method == "accuracy":
        rng = np.random.default_rng(seed)
        weight = 0.5
        n = labels.shape[0]
        for round_no in range(1, rounds + 1):
            idx = rng.integers(0, n, size=n)  # a bootstrap resample: this round's "validation"
            acc_a_r = accuracy(probs_a[idx], labels[idx])
            acc_b_r = accuracy(probs_b[idx], labels[idx])
            target = accuracy_weight(acc_a_r, acc_b_r, temperature)
            weight = (1.0 - smoothing) * weight + smoothing * target
            acc_f, loss_f = point(weight)
            trajectory.append(
                {
                    "round": round_no,
                    "acc_a": acc_a_r,
                    "acc_b": acc_b_r,
                    "w": weight,
                    "acc_fused": acc_f,
                    "logloss_fused": loss_f,
                }
            )
    else:
        weight, trajectory = _golden_section(lambda w: point(w)[1], point)
    acc_f, loss_f = point(weight)
    result = FusionResult(
        weight=float(weight),
        trajectory=trajectory,
        acc_a=accuracy(probs_a, labels),
        acc_b=accuracy(probs_b, labels),
        acc_fused=acc_f,
        logloss_fused=loss_f,
        method=method,
    )
    log.info("fusion_done", **result.summary())
    return result


def _golden_section(
    objective: Callable[[float], float],
    point: Callable[[float], tuple[float, float]],
    tolerance: float = 1e-4,
) -> tuple[float, list[dict[str, float]]]:
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    low, high = 0.0, 1.0
    c, d = high - inv_phi * (high - low), low + inv_phi * (high - low)
    fc, fd = float(objective(c)), float(objective(d))
    trajectory: list[dict[str, float]] = []
    step = 0
    while high - low > tolerance:
        step += 1
        if fc <= fd:
            high, d, fd = d, c, fc
            c = high - inv_phi * (high - low)
            fc = float(objective(c))
        else:
            low, c, fc = c, d, fd
            d = low + inv_phi * (high - low)
            fd = float(objective(d))
        mid = (low + high) / 2.0
        acc_f, loss_f = point(mid)
        trajectory.append({"round": step, "w": mid, "acc_fused": acc_f, "logloss_fused": loss_f})
    # Convex but possibly minimal at an end point: compare the ends too.
    best = min((0.0, 1.0, (low + high) / 2.0), key=lambda w: float(objective(w)))
    return best, trajectory


def fuse(
    net_a: nn.Module,
    net_b: nn.Module,
    val_loader: DataLoader[Any],
    *,
    method: str = "accuracy",
    rounds: int = 10,
    device: torch.device | str | None = None,
    smoothing: float = 0.5,
    temperature: float | None = None,
    seed: int = 0,
) -> FusionResult:
    """Freeze both nets, run them over ``val_loader`` once, and learn the weight of ``net_a``.

    See :func:`fuse_probs` for the methods. The nets are left frozen (eval, no gradients) on ``device``
    (default: CUDA when available, else CPU). Raises :class:`TrainingError` for an unknown method or an
    empty loader.
    """
    if method not in METHODS:
        raise TrainingError(f"unknown fusion method {method!r}: choose one of {', '.join(METHODS)}")
    target = torch.device(device) if device is not None else None
    if target is None:
        target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    freeze(net_a.to(target))
    freeze(net_b.to(target))
    probs_a, probs_b, labels = predict_probs(net_a, net_b, val_loader, target)
    return fuse_probs(
        probs_a,
        probs_b,
        labels,
        method=method,
        rounds=rounds,
        smoothing=smoothing,
        temperature=temperature,
        seed=seed,
    )


def apply_temperature(probs: Probs, temperature: float) -> Probs:
    """``softmax(log(probs) / T)``: the probabilities the network would give with its logits divided by
    ``T`` (softmax is shift-invariant, so log-probabilities stand in for the logits)."""
    logits = np.log(np.clip(probs, _EPS, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    out: Probs = scaled / scaled.sum(axis=1, keepdims=True)
    return out


def fit_temperature(probs: Probs, labels: Labels, low: float = 0.05, high: float = 20.0) -> float:
    """Temperature scaling (Guo, Pleiss, Sun & Weinberger, "On calibration of modern neural networks",
    ICML 2017): the ``T`` in ``[low, high]`` minimising the validation log-loss of
    :func:`apply_temperature`, by golden-section search on ``log T`` (the loss is convex in ``1 / T``).
    It never changes a prediction's argmax. Raises :class:`TrainingError` for empty or mismatched arrays.
    """
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0] or labels.size == 0:
        raise TrainingError(
            f"temperature fit needs matching, non-empty arrays: {probs.shape}, {labels.shape}"
        )
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = math.log(low), math.log(high)

    def loss(log_t: float) -> float:
        return log_loss(apply_temperature(probs, math.exp(log_t)), labels)

    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > 1e-4:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = loss(d)
    return round(math.exp((a + b) / 2.0), 4)

"""Calibration of the fused output on validation data: the methods measured, and the one the graph runs.

The graph computes ``p = w * softmax(logits_a / T_a) + (1 - w) * softmax(logits_b / T_b)``, then, with an
output step, ``softmax(scale * log(p) + bias)`` (:func:`screener.model.fused.fuse`; a fused temperature
is ``scale = 1 / T_f``, ``bias = 0``). Fitting each
network's ``T`` on its own log-loss (the old recipe) calibrates each network, not their mixture: the mean
of two calibrated distributions is less confident than either, and on the robust model the fused
validation ECE rose from 6.3% to 7.4%. The methods measured here (Guo, Pleiss, Sun & Weinberger, ICML
2017, for temperature, vector and matrix scaling):

- ``per_network``: each ``T`` on its own network's log-loss;
- ``joint``: both ``T`` together, on the log-loss of the FUSED output with the model's fusion weight
  (no new operator in the graph: it is what the model ships);
- ``fused_temperature``: one ``T_f`` on the log of the fused probabilities (in the graph);
- ``joint_fused``: the ``joint`` temperatures, then a ``T_f`` on their mixture (in the graph);
- ``vector``: a per-class scale and bias on the log of the fused probabilities (in the graph);
- ``matrix``: a full affine map of the log of the fused probabilities.

Each is scored by its ECE on the validation split it was fitted on ("in-sample", what the issue's target
reads) and by a two-fold cross-fitted ECE and log-loss (fitted on one half, measured on the other,
pooled): the honest figures, since a method with more parameters always looks better in-sample.

The method kept is the in-graph one with the lowest cross-fitted LOG-LOSS. Binned ECE is too noisy to
choose by at validation sizes: a perfectly calibrated model shows an ECE of several percent on ~100
images by chance alone (:func:`ece_noise_floor` estimates it for the model's own confidences), and an
earlier rule that chose by cross-fitted ECE kept "none" on a 135-image split whose log-loss temperature
scaling clearly lowered. Log-loss is a proper scoring rule (what Guo et al. fit temperatures on): it
rewards calibration and is far less noisy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from screener.core.errors import TrainingError
from screener.core.stats import calibration_of_indices
from screener.model.modelcard import OutputCalibration, calibration_section, network_temperatures
from trainer.fuse import apply_temperature, fit_temperature, fused_probs, log_loss

Probs = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int64]
METHODS: tuple[str, ...] = (
    "none",
    "per_network",
    "joint",
    "fused_temperature",
    "joint_fused",
    "vector",
    "matrix",
)
IN_GRAPH: tuple[str, ...] = ("none", "per_network", "joint", "fused_temperature", "joint_fused", "vector")
"""Methods the exported graph can run; matrix scaling is measured only. Their parameters are the card's
``calibration`` keys (:data:`screener.model.modelcard.CALIBRATION_KEYS`): ``temperature_a``,
``temperature_b`` and, for a step on the fused output, ``fused_temperature`` or ``vector_scale`` and
``vector_bias``."""
_LOG_T = np.linspace(math.log(0.1), math.log(10.0), 47)


def ece(labels: Labels, probs: Probs) -> float:
    """Expected calibration error, 15 bins, top class (the one implementation, :mod:`screener.core.stats`)."""
    value, _ = calibration_of_indices(labels.astype(np.int64), probs.astype(np.float64))
    return float(value or 0.0)


def fit_joint_temperatures(
    probs_a: Probs, probs_b: Probs, labels: Labels, weight: float
) -> tuple[float, float]:
    """``(T_a, T_b)`` minimising the log-loss of the fused output ``w * p_a(T_a) + (1 - w) * p_b(T_b)``:
    a grid on ``log T`` in [0.1, 10], then two finer grids around the best point.
    Raises :class:`TrainingError` for empty or mismatched arrays."""
    if probs_a.shape != probs_b.shape or probs_a.shape[0] != labels.shape[0] or labels.size == 0:
        raise TrainingError(
            f"joint calibration needs matching, non-empty arrays: {probs_a.shape}, {labels.shape}"
        )

    def loss(la: float, lb: float) -> float:
        fused = fused_probs(
            weight, apply_temperature(probs_a, math.exp(la)), apply_temperature(probs_b, math.exp(lb))
        )
        return log_loss(fused, labels)

    grid_a: list[float] = _LOG_T.tolist()
    grid_b: list[float] = _LOG_T.tolist()
    best = (0.0, 0.0)
    for step in (None, 0.1, 0.02):
        if step is not None:
            grid_a = [best[0] + step * i for i in range(-5, 6)]
            grid_b = [best[1] + step * i for i in range(-5, 6)]
        scores = [(loss(a, b), a, b) for a in grid_a for b in grid_b]
        _, la, lb = min(scores)
        best = (la, lb)
    clip = (0.05, 20.0)
    return (
        round(float(np.clip(math.exp(best[0]), *clip)), 4),
        round(float(np.clip(math.exp(best[1]), *clip)), 4),
    )


def _fit_affine(log_probs: Probs, labels: Labels, *, full: bool, steps: int = 200) -> tuple[Probs, Probs]:
    """``(W, b)`` minimising the log-loss of ``softmax(log_probs @ W + b)`` (``W`` diagonal unless
    ``full``), with a small L2 pull of ``W`` towards the identity (few hundred images, nine parameters)."""
    k = log_probs.shape[1]
    x = torch.from_numpy(log_probs)
    y = torch.from_numpy(labels.astype(np.int64))
    w = torch.eye(k, dtype=torch.float64) if full else torch.ones(k, dtype=torch.float64)
    w.requires_grad_(True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")
    eye = torch.eye(k, dtype=torch.float64)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = x @ w + b if full else x * w + b
        penalty = ((w - eye) ** 2).sum() if full else ((w - 1.0) ** 2).sum()
        loss = torch.nn.functional.cross_entropy(logits, y) + 1e-3 * penalty
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimiser.step(closure)  # type: ignore[no-untyped-call]
    return w.detach().numpy(), b.detach().numpy()


def _apply_affine(log_probs: Probs, w: Probs, b: Probs) -> Probs:
    logits = log_probs @ w + b if w.ndim == 2 else log_probs * w + b
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    out: Probs = e / e.sum(axis=1, keepdims=True)
    return out


@dataclass(frozen=True)
class Calibrated:
    """A method's fitted parameters and its calibrated fused probabilities on some images."""

    method: str
    params: dict[str, Any]
    probs: Probs


def _log(p: Probs) -> Probs:
    out: Probs = np.log(np.clip(p, 1e-12, 1.0))
    return out


def fit_method(method: str, probs_a: Probs, probs_b: Probs, labels: Labels, weight: float) -> dict[str, Any]:
    """Fit ``method`` (one of :data:`METHODS`) on validation outputs; its parameters.
    Raises :class:`TrainingError` for an unknown method."""
    fused = fused_probs(weight, probs_a, probs_b)
    if method == "none":
        return {"temperature_a": 1.0, "temperature_b": 1.0}
    if method == "per_network":
        return {
            "temperature_a": fit_temperature(probs_a, labels),
            "temperature_b": fit_temperature(probs_b, labels),
        }
    if method in ("joint", "joint_fused"):
        ta, tb = fit_joint_temperatures(probs_a, probs_b, labels, weight)
        if method == "joint":
            return {"temperature_a": ta, "temperature_b": tb}
        mixed = fused_probs(weight, apply_temperature(probs_a, ta), apply_temperature(probs_b, tb))
        return {"temperature_a": ta, "temperature_b": tb, "fused_temperature": fit_temperature(mixed, labels)}
    if method == "fused_temperature":
        tf = fit_temperature(fused, labels)
        return {"temperature_a": 1.0, "temperature_b": 1.0, "fused_temperature": tf}
    if method == "vector":
        w, b = _fit_affine(_log(fused), labels, full=False)
        scale = [round(float(x), 6) for x in w]
        bias = [round(float(x), 6) for x in b]
        return {"temperature_a": 1.0, "temperature_b": 1.0, "vector_scale": scale, "vector_bias": bias}
    if method == "matrix":
        w, b = _fit_affine(_log(fused), labels, full=True)
        return {"w": w.tolist(), "b": b.tolist()}
    raise TrainingError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")


def apply_method(method: str, params: dict[str, Any], probs_a: Probs, probs_b: Probs, weight: float) -> Probs:
    """The fused probabilities of ``method`` with ``params`` (from :func:`fit_method`)."""
    if method in IN_GRAPH:
        return apply_graph_calibration(params, probs_a, probs_b, weight)
    fused = fused_probs(weight, probs_a, probs_b)
    if method == "matrix":
        return _apply_affine(_log(fused), np.asarray(params["w"]), np.asarray(params["b"]))
    raise TrainingError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")


def graph_calibration(params: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """An in-graph method's parameters as the exporter writes the card's ``calibration`` section
    (:func:`screener.model.modelcard.calibration_section`)."""
    return calibration_section(network_temperatures(params), OutputCalibration.of(params, num_classes))


def apply_graph_calibration(params: dict[str, Any], probs_a: Probs, probs_b: Probs, weight: float) -> Probs:
    """What the graph outputs as ``probs`` for uncalibrated network outputs ``probs_a``/``probs_b`` under
    the card ``calibration`` keys ``params``: each network's temperature, the weighted mixture, then the
    output step where there is one (:class:`screener.model.modelcard.OutputCalibration`)."""
    ta, tb = network_temperatures(params)
    mixed = fused_probs(weight, apply_temperature(probs_a, ta), apply_temperature(probs_b, tb))
    step = OutputCalibration.of(params, probs_a.shape[1])
    if step is None:
        return mixed
    return _apply_affine(_log(mixed), np.asarray(step.scale), np.asarray(step.bias))


def cross_fitted_probs(
    method: str, probs_a: Probs, probs_b: Probs, labels: Labels, weight: float, seed: int = 0
) -> Probs | None:
    """The fused probabilities of ``method`` fitted on one half of the images and applied to the other,
    both ways (every image scored by a fit that never saw it); None with fewer than 20 images."""
    n = labels.size
    if n < 20:
        return None
    order = np.random.default_rng(seed).permutation(n)
    halves = (order[: n // 2], order[n // 2 :])
    out = np.zeros((n, probs_a.shape[1]))
    for fit_idx, eval_idx in (halves, halves[::-1]):
        params = fit_method(method, probs_a[fit_idx], probs_b[fit_idx], labels[fit_idx], weight)
        out[eval_idx] = apply_method(method, params, probs_a[eval_idx], probs_b[eval_idx], weight)
    return out


def ece_noise_floor(probs: Probs, draws: int = 200, seed: int = 0) -> tuple[float, float]:
    """``(mean, 95th percentile)`` of the ECE that a PERFECTLY calibrated model with these very
    probabilities would show on this many images: labels drawn from ``probs`` themselves, ``draws`` times.
    An ECE at or below this is indistinguishable from perfect calibration at this sample size."""
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise TrainingError(f"the ECE noise floor needs [N, C] probabilities with N >= 1, got {probs.shape}")
    rng = np.random.default_rng(seed)
    p = np.clip(probs, 0.0, None)
    p = p / p.sum(axis=1, keepdims=True)
    cumulative = np.cumsum(p, axis=1)
    values = []
    for _ in range(draws):
        u = rng.random((p.shape[0], 1))
        drawn = np.minimum((u > cumulative).sum(axis=1), p.shape[1] - 1).astype(np.int64)
        values.append(ece(drawn, p))
    return float(np.mean(values)), float(np.percentile(values, 95))


def compare_methods(
    probs_a: Probs, probs_b: Probs, labels: Labels, weight: float, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Every method of :data:`METHODS` on the same validation outputs: its in-sample ECE and log-loss,
    its two-fold cross-fitted ECE and log-loss, whether the graph can run it, and its parameters."""
    table: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        params = fit_method(method, probs_a, probs_b, labels, weight)
        probs = apply_method(method, params, probs_a, probs_b, weight)
        held_out = cross_fitted_probs(method, probs_a, probs_b, labels, weight, seed)
        cross = None if held_out is None else ece(labels, held_out)
        cross_ll = None if held_out is None else log_loss(held_out, labels)
        table[method] = {
            "val_ece": round(ece(labels, probs), 4),
            "val_logloss": round(log_loss(probs, labels), 4),
            "cross_fitted_ece": None if cross is None else round(cross, 4),
            "cross_fitted_logloss": None if cross_ll is None else round(cross_ll, 4),
            "in_graph": method in IN_GRAPH,
            "params": graph_calibration(params, probs_a.shape[1]) if method in IN_GRAPH else {},
        }
    return table


def choose_calibration(table: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The in-graph method with the lowest cross-fitted log-loss (in-sample log-loss where too few images
    to cross-fit; see the module docstring for why not ECE), and its card ``calibration`` keys."""

    def key(method: str) -> float:
        row = table[method]
        cross = row.get("cross_fitted_logloss")
        return float(cross if cross is not None else row["val_logloss"])

    best = min((m for m in IN_GRAPH if m in table), key=key)
    return best, dict(table[best]["params"])


__all__ = [
    "IN_GRAPH",
    "METHODS",
    "apply_graph_calibration",
    "apply_method",
    "choose_calibration",
    "compare_methods",
    "cross_fitted_probs",
    "ece",
    "ece_noise_floor",
    "fit_joint_temperatures",
    "fit_method",
    "graph_calibration",
]

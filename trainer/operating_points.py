"""Operating points and selective prediction: per-class thresholds for a target sensitivity, and the
selective accuracy against coverage curve.

:func:`pick_thresholds` turns validation probabilities into the card's ``thresholds`` (used by
:func:`screener.model.verdict.decide`): a class named in ``targets`` gets the highest threshold that still
catches at least the target share of its validation images; every other class with validation images gets
the threshold that maximises Youden's J (sensitivity + specificity - 1), so that "no class reaches its
operating point" (the ``indeterminate`` verdict) means the model is unsure of every class. ``trainer
train --target-sensitivity`` and ``trainer adapt`` call it on the validation split.

:func:`selective_curve` orders images by the model's confidence (its highest class probability) and gives
the accuracy over the most confident share of them, for every share (coverage): how much accuracy is bought
by letting the model abstain on the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from screener.core.errors import DataError
from screener.model.modelcard import ModelCard

COVERAGES: tuple[float, ...] = (0.5, 0.8, 1.0)
"""Coverages at which ``trainer evaluate`` reports selective accuracy."""


@dataclass(frozen=True)
class OperatingPoints:
    """``thresholds`` for the card (``{class: threshold}``) and how each was chosen (``details``: rule,
    target, validation sensitivity and specificity at the threshold, number of positives)."""

    thresholds: dict[str, float]
    details: dict[str, dict[str, Any]] = field(default_factory=dict)


def parse_targets(items: Sequence[str], classes: Sequence[str] | None = None) -> dict[str, float]:
    """``["covid19=0.95", ...]`` (the ``--target-sensitivity`` options) as ``{class: target}``.

    Raises :class:`DataError` naming the item for a missing ``=``, a target outside (0, 1], a class given
    twice, or (with ``classes``) a class the model does not have."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise DataError(f"--target-sensitivity {item!r}: expected CLASS=SENSITIVITY, e.g. covid19=0.95")
        try:
            target = float(value)
        except ValueError:
            raise DataError(f"--target-sensitivity {item!r}: {value!r} is not a number") from None
        if not (math.isfinite(target) and 0.0 < target <= 1.0):
            raise DataError(f"--target-sensitivity {item!r}: the sensitivity must be in (0, 1]")
        if name in out:
            raise DataError(f"--target-sensitivity names {name} twice")
        if classes is not None and name not in classes:
            raise DataError(f"--target-sensitivity {item!r}: {name} is not a class ({', '.join(classes)})")
        out[name] = target
    return out


def _rates(
    scores: npt.NDArray[np.float64], positive: npt.NDArray[np.bool_], threshold: float
) -> tuple[float, float]:
    called = scores >= threshold
    n_pos = int(positive.sum())
    n_neg = int((~positive).sum())
    sensitivity = float((called & positive).sum() / n_pos) if n_pos else float("nan")
    specificity = float((~called & ~positive).sum() / n_neg) if n_neg else float("nan")
    return sensitivity, specificity


def _target_threshold(
    scores: npt.NDArray[np.float64], positive: npt.NDArray[np.bool_], target: float
) -> float:
    """The highest threshold whose sensitivity on ``positive`` is at least ``target``."""
    ranked = np.sort(scores[positive])[::-1]
    k = max(1, math.ceil(target * ranked.size - 1e-9))
    return float(ranked[k - 1])


def _youden_threshold(scores: npt.NDArray[np.float64], positive: npt.NDArray[np.bool_]) -> float:
    """The threshold among the observed scores that maximises sensitivity + specificity - 1 (the highest
    such threshold on ties)."""
    best, best_j = 1.0, -math.inf
    for threshold in np.unique(scores)[::-1]:
        sensitivity, specificity = _rates(scores, positive, float(threshold))
        j = (sensitivity if math.isfinite(sensitivity) else 0.0) + (
            specificity if math.isfinite(specificity) else 0.0
        )
        if j > best_j + 1e-12:
            best, best_j = float(threshold), j
    return best


def pick_thresholds(
    probs: npt.ArrayLike, labels: npt.ArrayLike, classes: Sequence[str], targets: Mapping[str, float]
) -> OperatingPoints:
    """Per-class thresholds on fused probabilities ``probs`` ``[N, K]`` with true class indices ``labels``.

    Each class of ``targets`` gets the highest threshold that catches at least its target share of the
    validation images of that class; every other class with validation images gets Youden's J optimum;
    a class without validation images gets none (it then clears only as the most probable class). An
    empty ``targets`` gives no thresholds at all (labels by argmax, as before operating points).

    Raises :class:`DataError` for a target naming no class of ``classes``, or a targeted class with no
    validation image; ValueError for mismatched shapes.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if p.ndim != 2 or p.shape[1] != len(classes) or p.shape[0] != y.size:
        raise ValueError(f"probs {p.shape} and labels {y.shape} do not fit {len(classes)} classes")
    for name in targets:
        if name not in classes:
            raise DataError(f"target sensitivity for {name}: not a class of the model ({', '.join(classes)})")
    if not targets:
        return OperatingPoints({}, {})
    thresholds: dict[str, float] = {}
    details: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(classes):
        positive = y == index
        scores = p[:, index]
        n_pos = int(positive.sum())
        if name in targets:
            if n_pos == 0:
                raise DataError(
                    f"target sensitivity for {name}: the validation split has no {name} image to set it on"
                )
            threshold = _target_threshold(scores, positive, targets[name])
            rule: dict[str, Any] = {"rule": "target_sensitivity", "target": targets[name]}
        elif n_pos:
            threshold = _youden_threshold(scores, positive)
            rule = {"rule": "youden"}
        else:
            continue
        sensitivity, specificity = _rates(scores, positive, threshold)
        # Six decimals, rounded down: a threshold never rises above the score that met the target.
        thresholds[name] = math.floor(min(max(threshold, 0.0), 1.0) * 1e6) / 1e6
        details[name] = rule | {
            "threshold": thresholds[name],
            "val_sensitivity": sensitivity,
            "val_specificity": specificity if math.isfinite(specificity) else None,
            "n_positive": n_pos,
        }
    return OperatingPoints(thresholds, details)


def inherited_targets(card: ModelCard) -> dict[str, float]:
    """The target sensitivities a card's operating points were chosen for (its
    ``metrics.operating_points``), so a fine-tuned model keeps its parent's policy; ``{}`` when none."""
    points = (card.metrics.get("operating_points") or {}).get("classes") or {}
    return {
        name: float(detail["target"])
        for name, detail in points.items()
        if isinstance(detail, dict) and detail.get("rule") == "target_sensitivity" and name in card.classes
    }


def selective_curve(
    probs: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """``(coverage, accuracy)``: for k = 1..N, the share k/N of images kept (the most confident, by highest
    class probability) and the argmax accuracy over them. Raises ValueError for no images."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if p.ndim != 2 or p.shape[0] != y.size or y.size == 0:
        raise ValueError(f"probs {p.shape} and labels {y.shape}: need [N, K] and N labels, N >= 1")
    order = np.argsort(-p.max(axis=1), kind="mergesort")
    correct = (p.argmax(axis=1) == y)[order].astype(np.float64)
    kept = np.arange(1, y.size + 1, dtype=np.float64)
    return kept / y.size, np.cumsum(correct) / kept


def accuracy_at_coverage(probs: npt.ArrayLike, labels: npt.ArrayLike, coverage: float) -> float:
    """Accuracy over the most confident ``coverage`` share of images (at least one image)."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage {coverage!r} must be in (0, 1]")
    cover, accuracy = selective_curve(probs, labels)
    k = max(1, math.ceil(coverage * cover.size - 1e-9))
    return float(accuracy[k - 1])


def selective_summary(probs: npt.ArrayLike, labels: npt.ArrayLike) -> dict[str, Any]:
    """``{"accuracy_at_coverage": {"0.5": a, "0.8": b, "1.0": c}, "n": N}`` for the report."""
    n = int(np.asarray(labels).size)
    if n == 0:
        return {"n": 0, "accuracy_at_coverage": {}}
    return {
        "n": n,
        "accuracy_at_coverage": {f"{c:.1f}": accuracy_at_coverage(probs, labels, c) for c in COVERAGES},
    }


def plot_selective(probs: npt.ArrayLike, labels: npt.ArrayLike, path: Path) -> None:
    """Write the selective accuracy against coverage curve as a PNG, the report's coverages marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cover, accuracy = selective_curve(probs, labels)
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    try:
        ax.plot(cover, accuracy, color="tab:blue", lw=1.8, label="most confident first")
        for c in COVERAGES:
            value = accuracy_at_coverage(probs, labels, c)
            ax.scatter([c], [value], color="tab:red", zorder=3)
            ax.annotate(f"{100 * value:.1f}%", (c, value), textcoords="offset points", xytext=(-8, 8))
        ax.set_xlim(0.0, 1.02)
        ax.set_ylim(max(0.0, float(accuracy.min()) - 0.05), 1.01)
        ax.set_xlabel("coverage (share of images the model answers)")
        ax.set_ylabel("accuracy on the answered images")
        ax.set_title(f"Selective accuracy against coverage (n={cover.size})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)

"""Pure statistics of the site reports (``screener report site-performance`` and ``drift``).

No I/O, no database: numbers in, numbers out, each function tested on its own. The trainer computes the
same figures on its evaluation sets (``trainer.evaluate``); these are the screener's own, because the
screener never imports the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
ECE_BINS = 15  # equal-width bins of the top-class probability, as trainer.evaluate
PSI_MODERATE = 0.1  # population stability index at or above this: a moderate shift
PSI_MAJOR = 0.25  # at or above this: a major shift
PSI_FLOOR = 1e-4  # a bin empty on one side counts as this share, so the index stays finite


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion (Wilson 1927; Brown, Cai and DasGupta 2001 recommend
    it over the normal approximation for small n and proportions near 0 or 1). None for no trials.
    Raises ValueError for successes outside [0, trials]."""
    if not 0 <= successes <= trials:
        raise ValueError(f"successes={successes} is outside [0, trials={trials}]")
    if trials == 0:
        return None
    p = successes / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Proportion:
    """``successes / trials`` with its 95% Wilson interval; all None when there are no trials."""

    successes: int
    trials: int

    @property
    def value(self) -> float | None:
        return self.successes / self.trials if self.trials else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson_interval(self.successes, self.trials)


@dataclass(frozen=True)
class ClassFigures:
    """One class, one-vs-rest: sensitivity TP/(TP+FN), specificity TN/(TN+FP), PPV TP/(TP+FP)."""

    label: str
    support: int
    predicted: int
    sensitivity: Proportion
    specificity: Proportion
    ppv: Proportion


def class_figures(
    truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]
) -> list[ClassFigures]:
    """Per-class figures of ``predicted`` against ``truth`` (equal lengths) for each of ``classes``."""
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} true labels but {len(predicted)} predictions")
    out = []
    for label in classes:
        tp = sum(1 for t, p in zip(truth, predicted, strict=True) if t == label and p == label)
        fn = sum(1 for t, p in zip(truth, predicted, strict=True) if t == label and p != label)
        fp = sum(1 for t, p in zip(truth, predicted, strict=True) if t != label and p == label)
        tn = len(truth) - tp - fn - fp
        out.append(
            ClassFigures(
                label=label,
                support=tp + fn,
                predicted=tp + fp,
                sensitivity=Proportion(tp, tp + fn),
                specificity=Proportion(tn, tn + fp),
                ppv=Proportion(tp, tp + fp),
            )
        )
    return out


def average_ranks(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """1-based ranks of ``values``, tied values sharing the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    first = np.ones(n, dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], n)
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[group]
    return ranks


def binary_auc(positive: npt.ArrayLike, scores: npt.ArrayLike) -> float | None:
    """ROC AUC of ``scores`` for the boolean ``positive`` labels; ``None`` without both classes present.

    Computed as the Mann-Whitney U statistic over average ranks: the probability that a random positive
    scores higher than a random negative, a tie counting one half.
    """
    pos = np.asarray(positive, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    u = float(average_ranks(s)[pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def macro_auc(truth: Sequence[str], probs: npt.ArrayLike, classes: Sequence[str]) -> float | None:
    """Mean one-vs-rest ROC AUC over the classes present in ``truth`` (each needs positives and
    negatives); ``probs`` is [n, len(classes)]. None when no class qualifies (e.g. one class only)."""
    p = np.asarray(probs, dtype=np.float64).reshape(len(truth), len(classes))
    aucs = []
    for k, label in enumerate(classes):
        auc = binary_auc([t == label for t in truth], p[:, k])
        if auc is not None:
            aucs.append(auc)
    return float(np.mean(aucs)) if aucs else None


def calibration(
    truth: Sequence[str], probs: npt.ArrayLike, classes: Sequence[str], n_bins: int = ECE_BINS
) -> tuple[float | None, list[dict[str, Any]]]:
    """Expected calibration error over the top-class probability, and its bins (see
    :func:`calibration_of_indices`), for labels given by name. ECE is None for no predictions."""
    p = np.asarray(probs, dtype=np.float64).reshape(len(truth), len(classes))
    index_of = {c: i for i, c in enumerate(classes)}
    y = np.array([index_of[t] for t in truth], dtype=np.int64)
    return calibration_of_indices(y, p, n_bins)


def calibration_of_indices(
    y: npt.NDArray[np.int64], p: npt.NDArray[np.float64], n_bins: int = ECE_BINS
) -> tuple[float | None, list[dict[str, Any]]]:
    """ECE and its bins for true class indices ``y`` [n] and probabilities ``p`` [n, k] (the one
    implementation, shared with ``trainer.evaluate``): ``n_bins`` equal-width bins ``(lo, hi]`` (the first
    also holds 0); a prediction is correct when its most probable class is the true one; ECE = sum of
    (bin share) x |bin accuracy - bin mean confidence|. Each bin is ``{low, high, count, accuracy,
    confidence}``; accuracy and confidence are None for an empty bin. ECE is None for no predictions."""
    n_total = int(y.size)
    confidence = p.max(axis=1) if n_total else np.zeros(0)
    correct = (p.argmax(axis=1) == y).astype(np.float64) if n_total else np.zeros(0)
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(index, weights=correct, minlength=n_bins)
    ece = 0.0
    bins: list[dict[str, Any]] = []
    for b in range(n_bins):
        n = int(counts[b])
        acc = float(correct_sum[b] / n) if n else None
        conf = float(conf_sum[b] / n) if n else None
        if acc is not None and conf is not None:
            ece += n / n_total * abs(acc - conf)
        bins.append(
            {"low": b / n_bins, "high": (b + 1) / n_bins, "count": n, "accuracy": acc, "confidence": conf}
        )
    return (float(ece) if n_total else None), bins


def shares(counts: Mapping[str, float]) -> dict[str, float]:
    """Each key's share of the total; empty for a zero total."""
    total = float(sum(counts.values()))
    return {k: float(v) / total for k, v in counts.items()} if total > 0 else {}


def psi_terms(reference: Mapping[str, float], recent: Mapping[str, float]) -> dict[str, float]:
    """Each bin's term of the population stability index: (recent - reference) x ln(recent / reference),
    over the union of bins, both sides given as shares (or counts: they are normalised here). A share of 0
    counts as :data:`PSI_FLOOR`. Raises ValueError when either side is empty."""
    ref, new = shares(reference), shares(recent)
    if not ref or not new:
        raise ValueError("population stability index needs a non-empty reference and recent distribution")
    terms = {}
    for key in sorted(ref.keys() | new.keys()):
        a = max(ref.get(key, 0.0), PSI_FLOOR)
        b = max(new.get(key, 0.0), PSI_FLOOR)
        terms[key] = (b - a) * math.log(b / a)
    return terms


def psi(reference: Mapping[str, float], recent: Mapping[str, float]) -> float:
    """Population stability index: the sum of :func:`psi_terms` (0 for identical distributions)."""
    return float(sum(psi_terms(reference, recent).values()))


def psi_flag(value: float | None) -> str:
    """``stable`` below :data:`PSI_MODERATE`, ``moderate`` below :data:`PSI_MAJOR`, else ``major``; the
    rule of thumb of credit-scorecard monitoring (Siddiqi, *Credit Risk Scorecards*, Wiley 2006;
    examined by Yurdakul, *Statistical properties of population stability index*, 2018). ``no data``
    for None."""
    if value is None:
        return "no data"
    if value >= PSI_MAJOR:
        return "major"
    if value >= PSI_MODERATE:
        return "moderate"
    return "stable"


def histogram(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts of ``values`` in the bins ``[edges[i], edges[i+1])``, the last bin closed; values outside
    ``[edges[0], edges[-1]]`` go to the first or last bin. Raises ValueError for fewer than 2 edges or edges
    that do not increase."""
    e = np.asarray(edges, dtype=np.float64)
    if e.size < 2 or not np.all(np.diff(e) > 0):
        raise ValueError(f"histogram edges must be at least 2 increasing numbers, got {list(edges)!r}")
    v = np.clip(np.asarray(values, dtype=np.float64), e[0], e[-1])
    counts, _ = np.histogram(v, bins=e)
    return [int(c) for c in counts]

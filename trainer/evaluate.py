"""Evaluate a model directory on labelled images: metrics with bootstrap CIs, plots, a promotion gate.

:func:`metrics_from_probs` is pure numpy: accuracy, macro-F1, per-class sensitivity / specificity /
PPV / F1 with 95% percentile-bootstrap intervals, one-vs-rest ROC AUC (Mann-Whitney rank statistic,
ties counted half), expected calibration error and the confusion matrix. :func:`evaluate_model` runs a
model directory over a list of :class:`~trainer.data.Sample` exactly as the screener would (same
preprocessing, same decision rule) and writes ``report.json`` plus three PNG plots. :func:`gate_passes`
is the promotion rule: a candidate may replace the active model only if neither its macro-F1 nor its
COVID-19 sensitivity is worse.

Every number in a report is a plain ``float``/``int`` or ``None`` where it is undefined (a class with no
images has no sensitivity), so a report always serialises as strict JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from screener.core.errors import DataError, ImagingError
from screener.core.stats import binary_auc, calibration_of_indices
from screener.imaging.pixels import preprocess_file
from screener.model.verdict import instance_label
from trainer.data import Sample
from trainer.operating_points import plot_selective, selective_summary

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

ECE_BINS = 15
"""Equal-width bins of the top-class probability used for the expected calibration error."""

CI_LEVEL = 0.95
GATE_CLASS = "covid19"
"""The class whose sensitivity the promotion gate protects: a missed COVID-19 case costs the most."""

REPORT_FILE = "report.json"
CONFUSION_PNG = "confusion.png"
ROC_PNG = "roc.png"
SELECTIVE_PNG = "selective.png"
RELIABILITY_PNG = "reliability.png"
PROBS_NPY = "probs.npy"
LUNG_CROPS_PNG = "lung_crops.png"
SHEET_IMAGES = 32
LABELS_NPY = "labels.npy"

_CI_METRICS = ("sensitivity", "specificity", "ppv", "f1")
_DPI = 120
_BOOTSTRAP_CELLS = 2_000_000  # resampled indices held at once; bounds memory for large sets


# --- numbers ------------------------------------------------------------------------------------------


def _num(value: float | np.floating[Any]) -> float | None:
    """A finite float, or ``None`` for NaN / infinity (JSON has no NaN)."""
    out = float(value)
    return out if math.isfinite(out) else None


def _ratio(numerator: FloatArray, denominator: FloatArray) -> FloatArray:
    """Element-wise ``numerator / denominator``, NaN where the denominator is zero."""
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _confusion_batch(y_true: IntArray, y_pred: IntArray, k: int) -> IntArray:
    """Confusion matrices ``[B, K, K]`` (rows true, columns predicted) of ``[B, N]`` label arrays."""
    b = y_true.shape[0]
    flat = (np.arange(b, dtype=np.int64)[:, None] * (k * k) + y_true * k + y_pred).ravel()
    return np.bincount(flat, minlength=b * k * k).reshape(b, k, k).astype(np.int64)


def _confusion_metrics(confusion: IntArray) -> dict[str, FloatArray]:
    """Per-class and overall metrics of ``[B, K, K]`` confusion matrices; NaN where undefined.

    Per-class arrays are ``[B, K]``, overall ones ``[B]``. Sensitivity and F1 are undefined for a class
    without support (F1 is then left out of the macro average), PPV for a class never predicted,
    specificity for a class that is the only one present.
    """
    conf = confusion.astype(np.float64)
    tp = np.diagonal(conf, axis1=1, axis2=2)
    support = conf.sum(axis=2)
    predicted = conf.sum(axis=1)
    total = conf.sum(axis=(1, 2))
    fn = support - tp
    fp = predicted - tp
    tn = total[:, None] - tp - fn - fp
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    f1[support == 0] = np.nan
    defined = ~np.isnan(f1)
    counted = defined.sum(axis=1).astype(np.float64)
    macro_f1 = _ratio(np.where(defined, f1, 0.0).sum(axis=1), counted)
    return {
        "sensitivity": _ratio(tp, support),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, predicted),
        "f1": f1,
        "accuracy": _ratio(tp.sum(axis=1), total),
        "macro_f1": macro_f1,
    }


def roc_curve(positive: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """False- and true-positive rates at every distinct score threshold, from (0, 0) to (1, 1).

    Tied scores move the curve diagonally in one step, so the area under it equals :func:`binary_auc`.
    Raises ``ValueError`` when positives or negatives are missing (the curve is undefined).
    """
    pos = np.asarray(positive, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC curve needs positives and negatives, got {n_pos} and {n_neg}")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, pos_sorted = s[order], pos[order]
    last_of_group = np.append(s_sorted[1:] != s_sorted[:-1], True)
    tps = np.cumsum(pos_sorted)[last_of_group].astype(np.float64)
    fps = np.cumsum(~pos_sorted)[last_of_group].astype(np.float64)
    return np.append(0.0, fps / n_neg), np.append(0.0, tps / n_pos)


def calibration_bins(
    y_true: npt.ArrayLike, probs: npt.ArrayLike, n_bins: int = ECE_BINS
) -> tuple[float, list[dict[str, Any]]]:
    """Expected calibration error and its bins over the top-class probability (confidence).

    ``n_bins`` equal-width bins ``(lo, hi]`` of [0, 1] (the first also holds 0). A prediction is correct
    when the most probable class is the true one. ECE = sum over bins of (bin share of images) x
    |bin accuracy - bin mean confidence|. Each bin is ``{low, high, count, accuracy, confidence}``;
    accuracy and confidence are ``None`` for an empty bin. Raises ``ValueError`` for no images.
    """
    y = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if y.size == 0:
        raise ValueError("calibration needs at least one image")
    ece, bins = calibration_of_indices(y, p, n_bins)
    return float(ece or 0.0), bins


# --- metrics ------------------------------------------------------------------------------------------


def _check_inputs(y_true: npt.ArrayLike, probs: npt.ArrayLike, k: int) -> tuple[IntArray, FloatArray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array of class indices, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= k:
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise ValueError(f"y_true holds class index {bad}, outside 0..{k - 1} for {k} classes")
    if p.shape != (y.size, k):
        raise ValueError(
            f"probs shape {p.shape} must be [{y.size}, {k}] (one row per label, one column per class)"
        )
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or infinity")
    return y.astype(np.int64), p


def predict_labels(probs: npt.ArrayLike, classes: Sequence[str], thresholds: Mapping[str, float]) -> IntArray:
    """Class index per row, decided by :func:`screener.model.verdict.instance_label` as the screener
    decides; where no class reaches its operating point (``indeterminate``) the most probable class, so
    the figures are those of a forced decision (:func:`abstained` counts those rows)."""
    index = {name: i for i, name in enumerate(classes)}
    rows = np.asarray(probs, dtype=np.float64).tolist()
    labels = [instance_label(row, classes, thresholds) for row in rows]
    return np.array(
        [
            index[label] if label in index else int(np.argmax(row))
            for label, row in zip(labels, rows, strict=True)
        ],
        dtype=np.int64,
    )


def abstained(probs: npt.ArrayLike, classes: Sequence[str], thresholds: Mapping[str, float]) -> int:
    """How many rows are ``indeterminate`` under ``thresholds`` (no class reaches its operating point)."""
    rows = np.asarray(probs, dtype=np.float64).tolist()
    return sum(1 for row in rows if instance_label(row, classes, thresholds) not in classes)


def _stratified_indices(y: IntArray, rng: np.random.Generator, replicates: int) -> IntArray:
    """``[replicates, N]`` resampled image indices, each class resampled within itself (support fixed)."""
    parts = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        parts.append(members[rng.integers(0, members.size, size=(replicates, members.size))])
    return np.concatenate(parts, axis=1)


def _percentile_ci(values: FloatArray) -> list[float] | None:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    tail = (1.0 - CI_LEVEL) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return [float(low), float(high)]


def _bootstrap(y: IntArray, pred: IntArray, k: int, replicates: int, seed: int) -> dict[str, FloatArray]:
    """Metric arrays over ``replicates`` stratified resamples of the images (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CELLS // y.size)
    pieces: list[dict[str, FloatArray]] = []
    done = 0
    while done < replicates:
        b = min(chunk, replicates - done)
        idx = _stratified_indices(y, rng, b)
        pieces.append(_confusion_metrics(_confusion_batch(y[idx], pred[idx], k)))
        done += b
    return {key: np.concatenate([p[key] for p in pieces], axis=0) for key in pieces[0]}


def _short_metrics(
    y: IntArray, probs: FloatArray, classes: Sequence[str], thresholds: Mapping[str, float]
) -> dict[str, Any]:
    pred = predict_labels(probs, classes, thresholds)
    point = _confusion_metrics(_confusion_batch(y[None, :], pred[None, :], len(classes)))
    aucs = [binary_auc(y == i, probs[:, i]) for i in range(len(classes))]
    defined = [a for a in aucs if a is not None]
    return {
        "accuracy": _num(point["accuracy"][0]),
        "macro_f1": _num(point["macro_f1"][0]),
        "macro_auc": float(np.mean(defined)) if defined else None,
    }


def _network_names(arch_names: tuple[str, str] | None) -> tuple[str, str]:
    if arch_names is None:
        return "a", "b"
    first, second = arch_names
    if first == second or "fused" in arch_names:
        return f"{first} (a)", f"{second} (b)"
    return first, second


def metrics_from_probs(
    y_true: npt.ArrayLike,
    probs: npt.ArrayLike,
    classes: Sequence[str],
    *,
    probs_a: npt.ArrayLike | None = None,
    probs_b: npt.ArrayLike | None = None,
    arch_names: tuple[str, str] | None = None,
    thresholds: Mapping[str, float] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The evaluation report of class probabilities against true class indices.

    ``y_true`` holds indices into ``classes``; ``probs`` is ``[N, K]`` in the same order. Labels are
    decided with :func:`screener.model.verdict.instance_label` (``thresholds`` from the model card; argmax
    without), exactly as the screener labels an image. The report holds:

    - ``n``, ``classes``, ``confusion`` (rows true, columns predicted), ``accuracy``, ``macro_f1``
      (mean F1 over classes with at least one image), ``macro_auc`` (mean of the defined one-vs-rest
      AUCs), ``auc_per_class``, ``ece`` (15 bins, top-class probability) and ``calibration`` (its bins);
    - ``per_class``: ``{class: {support, predicted, sensitivity, specificity, ppv, f1, ci95}}`` where
      ``ci95`` maps each of sensitivity / specificity / ppv / f1 to ``[low, high]``;
    - ``accuracy_ci95`` and ``macro_f1_ci95``: 95% percentile intervals over ``bootstrap`` resamples of
      the images, stratified by true class (support is fixed, so sensitivity is always defined), seeded
      with ``seed`` so the same inputs give the same intervals; all intervals are ``None`` when
      ``bootstrap`` is 0;
    - ``per_network`` when ``probs_a`` and ``probs_b`` are given: ``{name_a, name_b, "fused"}`` each with
      accuracy, macro_f1 and macro_auc under the same decision rule, names from ``arch_names`` (``"a"``
      and ``"b"`` without; suffixed when both names are equal), as in the paper's comparison table.

    A metric that is undefined (a class with no images has no sensitivity, F1 or AUC; a class never
    predicted has no PPV) is ``None``, never NaN. Raises ``ValueError`` naming the shape, dtype or value
    of malformed inputs, or a negative ``bootstrap``.
    """
    names = tuple(classes)
    k = len(names)
    if k < 2:
        raise ValueError(f"classes {list(names)} must name at least two classes")
    if bootstrap < 0:
        raise ValueError(f"bootstrap {bootstrap} must be 0 (no intervals) or a number of resamples")
    y, p = _check_inputs(y_true, probs, k)
    rule = dict(thresholds or {})
    pred = predict_labels(p, names, rule)
    confusion = _confusion_batch(y[None, :], pred[None, :], k)
    point = _confusion_metrics(confusion)
    boot = _bootstrap(y, pred, k, bootstrap, seed) if bootstrap else None

    per_class: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        ci = {m: (_percentile_ci(boot[m][:, i]) if boot is not None else None) for m in _CI_METRICS}
        per_class[name] = {
            "support": int(confusion[0, i, :].sum()),
            "predicted": int(confusion[0, :, i].sum()),
            **{m: _num(point[m][0, i]) for m in _CI_METRICS},
            "ci95": ci,
        }
    auc_per_class = {name: binary_auc(y == i, p[:, i]) for i, name in enumerate(names)}
    defined_aucs = [a for a in auc_per_class.values() if a is not None]
    ece, bins = calibration_bins(y, p)

    report: dict[str, Any] = {
        "n": int(y.size),
        "classes": list(names),
        "decision": "thresholds" if rule else "argmax",
        "thresholds": {c: float(t) for c, t in rule.items()},
        "indeterminate": abstained(p, names, rule) if rule else 0,
        "selective": selective_summary(p, y),
        "confusion": confusion[0].tolist(),
        "accuracy": _num(point["accuracy"][0]),
        "accuracy_ci95": _percentile_ci(boot["accuracy"]) if boot is not None else None,
        "macro_f1": _num(point["macro_f1"][0]),
        "macro_f1_ci95": _percentile_ci(boot["macro_f1"]) if boot is not None else None,
        "macro_auc": float(np.mean(defined_aucs)) if defined_aucs else None,
        "auc_per_class": auc_per_class,
        "ece": ece,
        "calibration": bins,
        "per_class": per_class,
        "bootstrap": {"replicates": int(bootstrap), "seed": int(seed), "method": "stratified percentile"},
    }
    if probs_a is not None and probs_b is not None:
        name_a, name_b = _network_names(arch_names)
        _, pa = _check_inputs(y, probs_a, k)
        _, pb = _check_inputs(y, probs_b, k)
        report["per_network"] = {
            name_a: _short_metrics(y, pa, names, rule),
            name_b: _short_metrics(y, pb, names, rule),
            "fused": {
                "accuracy": report["accuracy"],
                "macro_f1": report["macro_f1"],
                "macro_auc": report["macro_auc"],
            },
        }
    return report


# --- plots --------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Any:
    # Figure without pyplot: no global state, no GUI backend, safe in threads and daemons.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png", bbox_inches="tight")


def plot_confusion(confusion: Sequence[Sequence[int]] | IntArray, classes: Sequence[str], path: Path) -> None:
    """Write the confusion matrix as a PNG: cells coloured by row-normalised share, annotated with the
    count and the percentage of the true class. Raises ``ValueError`` when the matrix is not K x K."""
    counts = np.asarray(confusion, dtype=np.int64)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"confusion shape {counts.shape} must be [{k}, {k}] for classes {list(classes)}")
    rows = counts.sum(axis=1, keepdims=True).astype(np.float64)
    share = _ratio(counts.astype(np.float64), np.broadcast_to(rows, counts.shape))
    fig = _new_figure(1.6 * k + 2.4, 1.4 * k + 1.6)
    ax = fig.add_subplot()
    image = ax.imshow(np.nan_to_num(share) * 100.0, cmap="Blues", vmin=0.0, vmax=100.0)
    fig.colorbar(image, ax=ax, label="% of true class")
    for i in range(k):
        for j in range(k):
            pct = "n/a" if np.isnan(share[i, j]) else f"{share[i, j] * 100:.1f}%"
            dark = not np.isnan(share[i, j]) and share[i, j] > 0.55
            ax.text(
                j, i, f"{counts[i, j]}\n{pct}", ha="center", va="center", color="white" if dark else "black"
            )
    ax.set_xticks(range(k), labels=list(classes), rotation=20, ha="right")
    ax.set_yticks(range(k), labels=[f"{c}\n(n={int(rows[i, 0])})" for i, c in enumerate(classes)])
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"Confusion matrix (n={int(counts.sum())})")
    _save(fig, path)


def plot_roc(y_true: npt.ArrayLike, probs: npt.ArrayLike, classes: Sequence[str], path: Path) -> None:
    """Write one-vs-rest ROC curves, one per class with its AUC in the legend, as a PNG.

    A class without positives or negatives is listed in the legend as "AUC n/a" and has no curve.
    Raises ``ValueError`` for malformed inputs as :func:`metrics_from_probs` does.
    """
    y, p = _check_inputs(y_true, probs, len(classes))
    fig = _new_figure(6.0, 5.4)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance (AUC 0.500)")
    for i, name in enumerate(classes):
        positive = y == i
        auc = binary_auc(positive, p[:, i])
        if auc is None:
            ax.plot([], [], label=f"{name} (AUC n/a, n={int(positive.sum())})")
            continue
        fpr, tpr = roc_curve(positive, p[:, i])
        ax.plot(fpr, tpr, linewidth=2, label=f"{name} (AUC {auc:.3f}, n={int(positive.sum())})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title("ROC, one class vs. rest")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    _save(fig, path)


def plot_reliability(y_true: npt.ArrayLike, probs: npt.ArrayLike, path: Path) -> None:
    """Write a reliability diagram (accuracy vs. confidence per bin, gap to the diagonal shaded) above a
    histogram of confidences, ECE in the title, as a PNG. Raises ``ValueError`` for malformed inputs."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs shape {p.shape} must be [N, K]")
    y, p = _check_inputs(y_true, p, p.shape[1])
    ece, bins = calibration_bins(y, p)
    width = 1.0 / len(bins)
    centres = np.array([(b["low"] + b["high"]) / 2 for b in bins])
    acc = np.array([b["accuracy"] if b["accuracy"] is not None else 0.0 for b in bins])
    conf = np.array([b["confidence"] if b["confidence"] is not None else 0.0 for b in bins])
    filled = np.array([b["count"] > 0 for b in bins])
    fig = _new_figure(6.0, 7.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    top.bar(centres[filled], acc[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy")
    top.bar(
        centres[filled],
        conf[filled] - acc[filled],
        bottom=acc[filled],
        width=width,
        fill=False,
        hatch="//",
        edgecolor="tab:red",
        linewidth=1,
        zorder=3,
        label="gap to mean confidence",
    )
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("Accuracy of top class")
    top.set_title(f"Reliability diagram (ECE = {ece:.3f}, {len(bins)} bins, n={y.size})")
    top.legend(loc="upper left", fontsize="small")
    top.grid(alpha=0.3)
    counts = np.array([b["count"] for b in bins])
    bottom.bar(centres, counts, width=width, edgecolor="black", color="tab:grey")
    bottom.set_xlabel("Confidence (top-class probability)")
    bottom.set_ylabel("Images")
    bottom.grid(alpha=0.3)
    _save(fig, path)


# --- evaluating a model directory ---------------------------------------------------------------------


def _batches(items: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate_model(
    model_dir: Path,
    samples: Sequence[Sample],
    out_dir: Path | None = None,
    *,
    backend: str = "onnxruntime",
    batch_size: int = 16,
    bootstrap: int = 1000,
    seed: int = 0,
    max_pixels: int = 100_000_000,
    progress: bool = True,
    group_by: str | None = None,
) -> dict[str, Any]:
    """Run the model in ``model_dir`` over ``samples`` and return its report.

    With ``group_by="source"`` the report also holds ``per_group``: ``{source: report of
    :func:`metrics_from_probs` on that source's images}`` (at most 200 bootstrap resamples each), so a
    model is judged per hospital or collection, not only on the pooled images.

    The directory is verified (every file's sha256) and opened with
    :func:`screener.model.engine.load_engine`; each image goes through
    :func:`screener.imaging.pixels.preprocess_file` with the card's preprocessing, exactly as the screener
    does, and is labelled with the card's thresholds. An image that cannot be read or decoded is listed
    under ``data.skipped`` with its reason, never a crash. The report is that of
    :func:`metrics_from_probs` (per-network figures named after the card's architectures) plus
    ``model_version``, ``backend``, ``architectures``, ``fusion_weight``, ``evaluated_at``,
    ``elapsed_s`` and ``data`` (``n_samples``, ``n_evaluated``, ``n_skipped``, ``per_class`` counts of
    evaluated images, ``skipped``: ``[{key, label, path, reason}]``). With ``out_dir`` it also writes
    ``report.json``, ``confusion.png``, ``roc.png``, ``reliability.png`` and ``selective.png`` (selective
    accuracy against coverage) there. A progress bar is drawn on stderr, one step per batch, unless
    ``progress`` is false.

    Raises:
        DataError: no samples, a sample label the model does not output, or no image could be read.
        ModelError / ModelIntegrityError: the model directory is invalid or a file fails its sha256.
        EngineUnavailableError: ``backend`` is unknown or cannot run here.
        ValueError: ``batch_size`` < 1 or a negative ``bootstrap``.
    """
    from screener.core.progress import Progress
    from screener.model.engine import load_engine

    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be at least 1")
    if not samples:
        raise DataError("no samples to evaluate: the dataset is empty")
    started = time.perf_counter()
    engine, model = load_engine(Path(model_dir), backend)
    card = model.card
    classes = card.classes
    unknown = sorted({s.label for s in samples if s.label not in classes})
    if unknown:
        engine.close()
        raise DataError(
            f"sample labels {unknown} are not classes of model {card.version} ({', '.join(classes)}): "
            "fix the dataset's labels"
        )
    if group_by not in (None, "source"):
        raise ValueError(f"group_by {group_by!r}: only 'source' is supported")
    crop = _lung_crop_of(model)
    found: list[bool] = []
    sheet: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], bool]] = []
    labels: list[int] = []
    groups: list[str] = []
    outputs: list[tuple[FloatArray, FloatArray, FloatArray]] = []
    skipped: list[dict[str, str]] = []
    n_batches = math.ceil(len(samples) / batch_size)
    bar = Progress(n_batches) if progress else None
    try:
        with bar if bar is not None else contextlib.nullcontext():
            for number, chunk in enumerate(_batches(samples, batch_size), start=1):
                inputs: list[npt.NDArray[np.float32]] = []
                for sample in chunk:
                    try:
                        inputs.append(preprocess_file(Path(sample.path), card.preprocessing, max_pixels))
                    except (ImagingError, OSError) as exc:
                        reason = (
                            str(exc)
                            if isinstance(exc, ImagingError)
                            else f"cannot read file: {exc.strerror or exc}"
                        )
                        skipped.append(
                            {
                                "key": sample.key,
                                "label": sample.label,
                                "path": str(sample.path),
                                "reason": reason,
                            }
                        )
                        continue
                    labels.append(classes.index(sample.label))
                    groups.append(sample.source or "unknown")
                if inputs:
                    batch = np.stack(inputs).astype(np.float32, copy=False)
                    if crop is not None:
                        _record_crops(crop, batch, found, sheet, max(1, len(samples) // SHEET_IMAGES))
                    out = engine.infer(batch)
                    outputs.append(
                        (
                            out.probs.astype(np.float64),
                            out.probs_a.astype(np.float64),
                            out.probs_b.astype(np.float64),
                        )
                    )
                if bar is not None:
                    bar.step(f"batch {number}/{n_batches}")
        backend_name = engine.name
    finally:
        engine.close()
    if not labels:
        first = skipped[0]["reason"] if skipped else "none"
        raise DataError(f"none of the {len(samples)} images could be read; first reason: {first}")

    y = np.array(labels, dtype=np.int64)
    probs, probs_a, probs_b = (np.concatenate([o[i] for o in outputs]) for i in range(3))
    report = metrics_from_probs(
        y,
        probs,
        classes,
        probs_a=probs_a,
        probs_b=probs_b,
        arch_names=card.architectures,
        thresholds=card.thresholds,
        bootstrap=bootstrap,
        seed=seed,
    )
    report.update(
        {
            "model_version": card.version,
            "backend": backend_name,
            "architectures": list(card.architectures),
            "fusion_weight": float(card.fusion_weight),
            "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "elapsed_s": round(time.perf_counter() - started, 3),
            "data": {
                "n_samples": len(samples),
                "n_evaluated": int(y.size),
                "n_skipped": len(skipped),
                "per_class": {c: int((y == i).sum()) for i, c in enumerate(classes)},
                "skipped": skipped,
            },
        }
    )
    if card.calibration:
        from trainer.fuse import apply_temperature

        raw_a = apply_temperature(probs_a, 1.0 / card.temperature("a"))
        raw_b = apply_temperature(probs_b, 1.0 / card.temperature("b"))
        raw = card.fusion_weight * raw_a + (1.0 - card.fusion_weight) * raw_b
        report["temperature_scaling"] = {
            "temperature_a": card.temperature("a"),
            "temperature_b": card.temperature("b"),
            "output_step": {
                k: v for k, v in card.calibration.items() if k not in ("temperature_a", "temperature_b")
            },
            "ece_before": calibration_bins(y, raw)[0],
            "ece_after": report["ece"],
        }
    if crop is not None:
        missed = np.array([not f for f in found])
        report["lung_crop"] = {
            "n": len(found),
            "not_found": int(missed.sum()),
            "share_not_found": float(missed.mean()) if found else None,
            "per_group": {g: float(missed[np.array(groups) == g].mean()) for g in sorted(set(groups))},
            "fallback": "where no lungs are found the model sees the whole image (as without the crop)",
        }
    if group_by is not None:
        report["group_by"] = group_by
        report["per_group"] = per_group_metrics(
            y,
            probs,
            np.array(groups),
            classes,
            thresholds=card.thresholds,
            bootstrap=min(bootstrap, 200),
            seed=seed,
        )
    if out_dir is not None:
        write_report(report, y, probs, Path(out_dir))
        if sheet:
            plot_lung_crops(sheet, Path(out_dir) / LUNG_CROPS_PNG)
    return report


def _lung_crop_of(model: Any) -> Any:
    """The model's lung crop as a torch module (to report where it finds no lungs), or None."""
    if model.card.lung_crop is None:
        return None
    from screener.model.lungs import load_lung_crop

    return load_lung_crop(model.weights_path, model.card.lung_crop)


def _record_crops(
    crop: Any,
    batch: npt.NDArray[np.float32],
    found: list[bool],
    sheet: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], bool]],
    every: int,
) -> None:
    """Append whether the crop found lungs in each image of ``batch``; keep every ``every``-th image (and
    its box) for the contact sheet."""
    import torch

    with torch.no_grad():
        tensor = torch.from_numpy(batch)
        boxes, hits = crop.boxes(tensor)
    for image, box, hit in zip(batch, boxes.numpy(), hits.tolist(), strict=True):
        if len(found) % every == 0 and len(sheet) < SHEET_IMAGES:
            sheet.append((image[0], box.astype(np.float32), bool(hit)))
        found.append(bool(hit))


def plot_lung_crops(
    sheet: Sequence[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], bool]], path: Path
) -> None:
    """A contact sheet: each input image with its lung-crop box (green: found; red: not found, the whole
    image is used)."""
    from matplotlib.patches import Rectangle

    cols = 8
    rows = max(1, math.ceil(len(sheet) / cols))
    fig = _new_figure(2.0 * cols, 2.0 * rows)
    for index, (image, box, hit) in enumerate(sheet):
        ax = fig.add_subplot(rows, cols, index + 1)
        size = image.shape[-1]
        ax.imshow(image, cmap="gray")
        x0, y0, x1, y1 = ((box + 1.0) / 2.0 * size).tolist()
        ax.add_patch(
            Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime" if hit else "red", linewidth=1.5)
        )
        ax.set_axis_off()
    fig.suptitle("lung crop (green: lungs found; red: not found, whole image used)")
    _save(fig, path)


def per_group_metrics(
    y_true: IntArray,
    probs: FloatArray,
    groups: npt.NDArray[Any],
    classes: Sequence[str],
    *,
    thresholds: Mapping[str, float] | None = None,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """``{group: metrics_from_probs report of its images}`` for every group, sorted by name. A group that
    holds one class has no AUC (``None``); its sensitivity (or, for normal, the specificity of the other
    classes) still tells how the model does there."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted({str(g) for g in groups.tolist()}):
        mask = groups == name
        out[name] = metrics_from_probs(
            y_true[mask], probs[mask], classes, thresholds=thresholds, bootstrap=bootstrap, seed=seed
        )
    return out


def write_report(
    report: Mapping[str, Any], y_true: npt.ArrayLike, probs: npt.ArrayLike, out_dir: Path
) -> None:
    """Write ``report.json`` (indented, key-sorted, strict JSON), the three plots, and the probabilities and
    true class indices (``probs.npy``, ``labels.npy``, for further analysis) into ``out_dir``.

    Raises ``ValueError`` if the report holds NaN, ``OSError`` if the folder cannot be written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = list(report["classes"])
    plot_confusion(report["confusion"], classes, out_dir / CONFUSION_PNG)
    plot_roc(y_true, probs, classes, out_dir / ROC_PNG)
    plot_reliability(y_true, probs, out_dir / RELIABILITY_PNG)
    plot_selective(probs, y_true, out_dir / SELECTIVE_PNG)
    np.save(out_dir / PROBS_NPY, np.asarray(probs, dtype=np.float64))
    np.save(out_dir / LABELS_NPY, np.asarray(y_true, dtype=np.int64))
    text = json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n"
    tmp = out_dir / f".{REPORT_FILE}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out_dir / REPORT_FILE)


# --- promotion gate -----------------------------------------------------------------------------------


def _gate_values(report: Mapping[str, Any]) -> tuple[float | None, float | None]:
    macro_f1 = report.get("macro_f1")
    per_class = report.get("per_class") or {}
    sensitivity = (per_class.get(GATE_CLASS) or {}).get("sensitivity")
    return (
        None if macro_f1 is None else float(macro_f1),
        None if sensitivity is None else float(sensitivity),
    )


def _delta(candidate: float | None, active: float | None) -> float | None:
    return None if candidate is None or active is None else candidate - active


def compare_reports(candidate: Mapping[str, Any], active: Mapping[str, Any]) -> dict[str, Any]:
    """Candidate-minus-active differences of the two gate metrics.

    Returns ``{"macro_f1": {candidate, active, delta}, "covid19_sensitivity": {...}, "n": {candidate,
    active}, "same_data": bool | None}``; a value missing from a report, and so its delta, is ``None``.
    ``same_data`` is whether both were evaluated on the same number of images per class (``None`` when
    a report does not say); a gate comparison across different data is weak evidence.
    """
    cand_f1, cand_sens = _gate_values(candidate)
    act_f1, act_sens = _gate_values(active)
    cand_data, act_data = candidate.get("data"), active.get("data")
    same: bool | None = None
    if isinstance(cand_data, Mapping) and isinstance(act_data, Mapping):
        same = cand_data.get("per_class") == act_data.get("per_class")
    return {
        "macro_f1": {"candidate": cand_f1, "active": act_f1, "delta": _delta(cand_f1, act_f1)},
        f"{GATE_CLASS}_sensitivity": {
            "candidate": cand_sens,
            "active": act_sens,
            "delta": _delta(cand_sens, act_sens),
        },
        "n": {"candidate": candidate.get("n"), "active": active.get("n")},
        "same_data": same,
    }


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def gate_passes(
    candidate: Mapping[str, Any], active: Mapping[str, Any], tolerance: float = 0.0
) -> tuple[bool, str]:
    """Whether ``candidate`` may replace ``active``, and why, naming both values of each metric.

    It passes when its macro-F1 and its COVID-19 sensitivity are each at least the active model's minus
    ``tolerance``. A metric the candidate lacks fails the gate (nothing shows it is not worse); a metric
    only the active report lacks is not held against the candidate. Raises ``ValueError`` for a negative
    or non-finite ``tolerance``.
    """
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance {tolerance} must be a finite number >= 0")
    deltas = compare_reports(candidate, active)
    failures: list[str] = []
    summary: list[str] = []
    for key, label in (("macro_f1", "macro-F1"), (f"{GATE_CLASS}_sensitivity", f"{GATE_CLASS} sensitivity")):
        cand, act = deltas[key]["candidate"], deltas[key]["active"]
        text = f"{label} {_fmt(cand)} vs active {_fmt(act)}"
        summary.append(text)
        if cand is None:
            failures.append(f"{text}: the candidate's is undefined")
        elif act is not None and cand < act - tolerance:
            slack = f" (tolerance {tolerance:g})" if tolerance else ""
            failures.append(f"{text}: worse by {act - cand:.4f}{slack}")
    if failures:
        return False, "refused: " + "; ".join(failures)
    note = "" if deltas["same_data"] is not False else " (warning: evaluated on different data)"
    return True, "passes: " + "; ".join(summary) + note


OUT_OF_SOURCE_FIGURES: tuple[tuple[str, str], ...] = (
    ("mean_macro_auc", "out-of-source macro ROC AUC"),
    (f"mean_{GATE_CLASS}_sensitivity", f"out-of-source {GATE_CLASS} sensitivity"),
)
"""The figures of a card's ``metrics.out_of_source`` that the promotion gate compares."""


def out_of_source_gate(
    candidate_metrics: Mapping[str, Any], active_metrics: Mapping[str, Any], tolerance: float = 0.0
) -> tuple[bool, str | None]:
    """The gate on figures measured on sources a model never trained on (leave-source-out or external
    data, the card's ``metrics.out_of_source``): when the candidate's card has them and the active
    model's too, each of :data:`OUT_OF_SOURCE_FIGURES` must be at least the active model's minus
    ``tolerance``. Returns ``(passes, reason)``; the reason is ``None`` when the candidate has no such
    figures (nothing to compare: the in-distribution gate decides alone)."""
    candidate = candidate_metrics.get("out_of_source")
    if not isinstance(candidate, Mapping):
        return True, None
    active = active_metrics.get("out_of_source")
    parts: list[str] = []
    failures: list[str] = []
    for key, label in OUT_OF_SOURCE_FIGURES:
        cand = candidate.get(key)
        act = active.get(key) if isinstance(active, Mapping) else None
        text = f"{label} {_fmt(cand)} vs active {_fmt(act)}"
        parts.append(text)
        if cand is None:
            failures.append(f"{text}: the candidate's is undefined")
        elif act is not None and cand < act - tolerance:
            failures.append(f"{text}: worse by {act - cand:.4f}")
    if failures:
        return False, "refused on sources never trained on: " + "; ".join(failures)
    return True, "; ".join(parts)


# --- text summary -------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "  n/a" if value is None else f"{value * 100:5.1f}"


def _ci(interval: Sequence[float] | None) -> str:
    return "[  n/a,   n/a]" if interval is None else f"[{_pct(interval[0])}, {_pct(interval[1])}]"


def format_summary(report: Mapping[str, Any]) -> str:
    """A short human-readable table of a report: headline metrics, per-class sensitivity and PPV with
    95% intervals (percent), per-network accuracies and skipped images. Never raises on missing keys."""
    lines: list[str] = []
    head = f"model {report.get('model_version', '?')}"
    if "backend" in report:
        head += f" ({report['backend']})"
    data = report.get("data") or {}
    head += f" on {report.get('n', '?')} images"
    if data.get("n_skipped"):
        head += f", {data['n_skipped']} skipped"
    lines.append(head)
    lines.append(
        f"accuracy {_pct(report.get('accuracy'))} {_ci(report.get('accuracy_ci95'))}   "
        f"macro-F1 {_pct(report.get('macro_f1'))} {_ci(report.get('macro_f1_ci95'))}   "
        f"macro AUC {_pct(report.get('macro_auc'))}   ECE {_pct(report.get('ece'))}  (percent)"
    )
    selective = (report.get("selective") or {}).get("accuracy_at_coverage") or {}
    if selective:
        cells = ", ".join(f"{_pct(v).strip()} at {100 * float(c):.0f}%" for c, v in selective.items())
        lines.append(f"selective accuracy (argmax, most confident first): {cells} coverage")
    if report.get("indeterminate"):
        lines.append(
            f"indeterminate under the card's operating points: {report['indeterminate']} of {report.get('n')}"
        )
    calibration = report.get("temperature_scaling")
    if isinstance(calibration, Mapping):
        lines.append(
            f"calibration: ECE {_pct(calibration.get('ece_before'))} before, "
            f"{_pct(calibration.get('ece_after'))} after temperature scaling "
            f"(T = {calibration.get('temperature_a')}, {calibration.get('temperature_b')}; "
            f"on the fused output: {calibration.get('output_step') or 'nothing'})"
        )
    lung = report.get("lung_crop")
    if lung:
        lines.append(
            f"lung crop: no lungs found in {lung.get('not_found')} of {lung.get('n')} images "
            "(the whole image was used there)"
        )
    width = max([len(c) for c in report.get("classes", [])] + [5])
    lines.append(f"{'class':<{width}}  support  sensitivity [95% CI]   PPV [95% CI]           AUC")
    aucs = report.get("auc_per_class") or {}
    for name, row in (report.get("per_class") or {}).items():
        ci = row.get("ci95") or {}
        lines.append(
            f"{name:<{width}}  {row.get('support', 0):7d}  "
            f"{_pct(row.get('sensitivity'))} {_ci(ci.get('sensitivity'))}  "
            f"{_pct(row.get('ppv'))} {_ci(ci.get('ppv'))}  {_pct(aucs.get(name))}"
        )
    networks = report.get("per_network")
    if networks:
        parts = [f"{name} {_pct(m.get('accuracy')).strip()}" for name, m in networks.items()]
        lines.append("accuracy per network: " + ", ".join(parts))
    per_group = report.get("per_group") or {}
    if per_group:
        lines.append(f"per {report.get('group_by', 'group')}:")
        gwidth = max(len(g) for g in per_group)
        names = list(report.get("classes", []))
        lines.append(
            f"  {'group':<{gwidth}}  {'n':>5}  {'acc':>5}  {'AUC':>5}  {'ECE':>5}  "
            + "  ".join(f"sens {c[:10]:>10}" for c in names)
        )
        for group, metrics in per_group.items():
            sens = metrics.get("per_class") or {}
            cells = "  ".join(f"{_pct((sens.get(c) or {}).get('sensitivity')):>15}" for c in names)
            lines.append(
                f"  {group:<{gwidth}}  {metrics.get('n', 0):>5}  {_pct(metrics.get('accuracy'))}  "
                f"{_pct(metrics.get('macro_auc'))}  {_pct(metrics.get('ece'))}  {cells}"
            )
    for item in data.get("skipped", [])[:5]:
        lines.append(f"skipped {item.get('key')}: {item.get('reason')}")
    if len(data.get("skipped", [])) > 5:
        lines.append(f"... and {len(data['skipped']) - 5} more skipped")
    return "\n".join(lines)

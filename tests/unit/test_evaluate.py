"""Evaluation: metrics on hand-made arrays with known answers, a real model over real chest X-rays, the
promotion gate."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from screener.core.errors import DataError
from screener.model.modelcard import CLASSES
from trainer.data import Sample
from trainer.evaluate import (
    binary_auc,
    calibration_bins,
    compare_reports,
    evaluate_model,
    format_summary,
    gate_passes,
    metrics_from_probs,
    roc_curve,
)

REQUIRED_KEYS = {
    "n",
    "accuracy",
    "macro_f1",
    "macro_auc",
    "ece",
    "per_class",
    "confusion",
    "classes",
    "per_network",
    "auc_per_class",
    "accuracy_ci95",
    "macro_f1_ci95",
    "model_version",
    "backend",
    "data",
}
PER_CLASS_KEYS = {"sensitivity", "specificity", "ppv", "f1", "support", "ci95"}


def one_hot(y: list[int], k: int = 3) -> np.ndarray:
    out: np.ndarray = np.eye(k)[np.asarray(y)]
    return out


def brute_force_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[positive], scores[~positive]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def floats_in(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in floats_in(v)]
    if isinstance(value, list | tuple):
        return [f for v in value for f in floats_in(v)]
    return []


# --- metrics on known answers -------------------------------------------------------------------------


def test_perfect_confident_predictions_score_one_and_zero_calibration_error() -> None:
    y = np.array([0, 1, 2, 0, 1, 2, 2])
    report = metrics_from_probs(y, one_hot(y.tolist()), CLASSES, bootstrap=50)
    assert report["n"] == 7
    assert report["accuracy"] == 1.0
    assert report["macro_f1"] == 1.0
    assert report["macro_auc"] == 1.0
    assert report["ece"] == pytest.approx(0.0, abs=1e-12)
    assert report["confusion"] == [[2, 0, 0], [0, 2, 0], [0, 0, 3]]
    for name in CLASSES:
        row = report["per_class"][name]
        assert set(row) >= PER_CLASS_KEYS
        assert (row["sensitivity"], row["specificity"], row["ppv"], row["f1"]) == (1.0, 1.0, 1.0, 1.0)
        assert row["ci95"]["sensitivity"] == [1.0, 1.0]
    assert report["accuracy_ci95"] == [1.0, 1.0]


def test_known_confusion_matrix_gives_the_textbook_metrics() -> None:
    # rows true, columns predicted
    confusion = [[3, 1, 0], [1, 2, 1], [0, 0, 4]]
    y: list[int] = []
    pred: list[int] = []
    for t, row in enumerate(confusion):
        for p, count in enumerate(row):
            y += [t] * count
            pred += [p] * count
    probs = one_hot(pred) * 0.7 + 0.1
    report = metrics_from_probs(np.array(y), probs, CLASSES, bootstrap=0)
    assert report["confusion"] == confusion
    assert report["accuracy"] == pytest.approx(9 / 12)
    normal, covid, viral = (report["per_class"][c] for c in CLASSES)
    assert normal["support"] == 4
    assert normal["sensitivity"] == pytest.approx(3 / 4)
    assert normal["specificity"] == pytest.approx(7 / 8)
    assert normal["ppv"] == pytest.approx(3 / 4)
    assert covid["sensitivity"] == pytest.approx(2 / 4)
    assert covid["ppv"] == pytest.approx(2 / 3)
    assert covid["specificity"] == pytest.approx(7 / 8)
    assert covid["f1"] == pytest.approx(4 / 7)
    assert viral["sensitivity"] == 1.0
    assert viral["ppv"] == pytest.approx(4 / 5)
    assert viral["f1"] == pytest.approx(8 / 9)
    assert report["macro_f1"] == pytest.approx((3 / 4 + 4 / 7 + 8 / 9) / 3)
    assert report["accuracy_ci95"] is None  # bootstrap=0: no intervals
    assert normal["ci95"]["f1"] is None


def test_auc_with_ties_matches_brute_force_pairwise_count() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, size=80)
    raw = rng.dirichlet([1, 1, 1], size=80)
    raw[np.arange(80), y] += 0.3
    probs = np.round(raw / raw.sum(axis=1, keepdims=True), 1)  # coarse: many ties
    report = metrics_from_probs(y, probs, CLASSES, bootstrap=0)
    for i, name in enumerate(CLASSES):
        expected = brute_force_auc(y == i, probs[:, i])
        assert report["auc_per_class"][name] == pytest.approx(expected, abs=1e-12)
        fpr, tpr = roc_curve(y == i, probs[:, i])
        assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == pytest.approx(expected, abs=1e-12)
    assert report["macro_auc"] == pytest.approx(np.mean(list(report["auc_per_class"].values())))
    # all scores tied: AUC is exactly one half; reversed ranking: zero
    assert binary_auc([True, False, True, False], [0.4, 0.4, 0.4, 0.4]) == 0.5
    assert binary_auc([True, True, False], [0.1, 0.2, 0.3]) == 0.0
    assert binary_auc([True, True], [0.1, 0.2]) is None


def test_ece_on_a_hand_example() -> None:
    # two images at confidence 0.9 (one right, one wrong) and two at 0.5 (both right):
    # ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1.0 - 0.5| = 0.45
    probs = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])
    y = np.array([0, 1, 0, 1])
    ece, bins = calibration_bins(y, probs)
    assert ece == pytest.approx(0.45)
    assert len(bins) == 15
    assert sum(b["count"] for b in bins) == 4
    assert [b["count"] for b in bins if b["count"]] == [2, 2]
    assert metrics_from_probs(y, probs, CLASSES, bootstrap=0)["ece"] == pytest.approx(0.45)


def test_bootstrap_intervals_contain_the_estimate_and_repeat_for_a_seed() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, size=300)
    probs = rng.dirichlet([1, 1, 1], size=300)
    probs[np.arange(300), y] += 0.4
    probs /= probs.sum(axis=1, keepdims=True)
    first = metrics_from_probs(y, probs, CLASSES, bootstrap=300, seed=11)
    again = metrics_from_probs(y, probs, CLASSES, bootstrap=300, seed=11)
    other = metrics_from_probs(y, probs, CLASSES, bootstrap=300, seed=12)
    assert first == again
    assert first["accuracy_ci95"] != other["accuracy_ci95"]
    low, high = first["accuracy_ci95"]
    assert low <= first["accuracy"] <= high and low < high
    low, high = first["macro_f1_ci95"]
    assert low <= first["macro_f1"] <= high
    for row in first["per_class"].values():
        for metric in ("sensitivity", "specificity", "ppv", "f1"):
            low, high = row["ci95"][metric]
            assert 0.0 <= low <= row[metric] <= high <= 1.0


def test_class_without_support_gives_null_metrics_and_strict_json() -> None:
    y = np.array([0, 0, 2, 2, 2])
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.6, 0.2, 0.2]]
    )  # covid19 predicted once, never true
    report = metrics_from_probs(y, probs, CLASSES, probs_a=probs, probs_b=probs, bootstrap=100)
    covid = report["per_class"]["covid19"]
    assert covid["support"] == 0
    assert covid["sensitivity"] is None
    assert covid["f1"] is None
    assert covid["ci95"]["sensitivity"] is None
    assert covid["ppv"] == 0.0  # predicted once, wrong: defined and zero
    assert report["auc_per_class"]["covid19"] is None
    # macro-F1 averages the classes that have images
    f1s = [report["per_class"][c]["f1"] for c in ("normal", "viral_pneumonia")]
    assert report["macro_f1"] == pytest.approx(sum(f1s) / 2)
    assert all(math.isfinite(f) for f in floats_in(report))
    assert json.loads(json.dumps(report, allow_nan=False))["per_class"]["covid19"]["sensitivity"] is None


def test_thresholds_decide_labels_like_the_screener() -> None:
    probs = np.array([[0.6, 0.35, 0.05], [0.6, 0.25, 0.15]])
    y = np.array([1, 0])
    argmax = metrics_from_probs(y, probs, CLASSES, bootstrap=0)
    assert argmax["decision"] == "argmax"
    assert argmax["confusion"] == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]
    tuned = metrics_from_probs(y, probs, CLASSES, thresholds={"covid19": 0.3}, bootstrap=0)
    assert tuned["decision"] == "thresholds"
    assert tuned["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert tuned["accuracy"] == 1.0


def test_per_network_accuracies_name_the_architectures() -> None:
    y = np.array([0, 1, 2, 0])
    good = one_hot([0, 1, 2, 0]) * 0.9 + 0.05
    bad = one_hot([1, 1, 0, 0]) * 0.9 + 0.05
    report = metrics_from_probs(
        y, good, CLASSES, probs_a=good, probs_b=bad, arch_names=("resnet101", "resnet152"), bootstrap=0
    )
    networks = report["per_network"]
    assert set(networks) == {"resnet101", "resnet152", "fused"}
    assert networks["resnet101"]["accuracy"] == 1.0
    assert networks["resnet152"]["accuracy"] == 0.5
    assert networks["fused"]["accuracy"] == report["accuracy"] == 1.0
    assert "per_network" not in metrics_from_probs(y, good, CLASSES, bootstrap=0)
    same = metrics_from_probs(
        y, good, CLASSES, probs_a=good, probs_b=bad, arch_names=("resnet18", "resnet18")
    )
    assert len(same["per_network"]) == 3


@pytest.mark.parametrize(
    ("y", "probs", "message"),
    [
        (np.array([0, 1]), np.ones((3, 3)) / 3, "shape"),
        (np.array([0, 3]), np.ones((2, 3)) / 3, "class index 3"),
        (np.array([0.0, 1.0]), np.ones((2, 3)) / 3, "integer"),
        (np.array([0, 1]), np.array([[np.nan, 0.5, 0.5], [0.2, 0.4, 0.4]]), "NaN"),
        (np.array([], dtype=int), np.ones((0, 3)), "non-empty"),
    ],
)
def test_malformed_inputs_raise_value_error_naming_the_problem(
    y: np.ndarray, probs: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        metrics_from_probs(y, probs, CLASSES)


# --- a real model over real images --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from screener.model.export import create_random_model_dir

    out = tmp_path_factory.mktemp("eval-model") / "tiny"
    create_random_model_dir(out, arch_a="resnet18", arch_b="resnet34", input_size=64, seed=0, version="tiny")
    return out


def real_samples(cxr3_dir: Path, per_class: int) -> list[Sample]:
    samples = []
    for label in CLASSES:
        for path in sorted((cxr3_dir / label).glob("*.png"))[:per_class]:
            samples.append(Sample(path=path, label=label, key=f"{label}/{path.name}"))
    return samples


def test_evaluate_model_end_to_end_on_real_images(
    tiny_model_dir: Path, cxr3_dir: Path, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00 definitely not a png " * 20)
    samples = real_samples(cxr3_dir, 10)
    samples.insert(7, Sample(path=corrupt, label="covid19", key="broken/corrupt.png"))
    out = tmp_path / "eval"

    report = evaluate_model(tiny_model_dir, samples, out, batch_size=8, bootstrap=200, progress=False)

    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk) >= REQUIRED_KEYS
    assert on_disk["model_version"] == "tiny"
    assert on_disk["backend"] == "onnxruntime"
    assert on_disk["classes"] == list(CLASSES)
    assert on_disk["n"] == 30
    assert sum(map(sum, on_disk["confusion"])) == 30
    assert on_disk["data"]["per_class"] == {c: 10 for c in CLASSES}
    assert on_disk["data"]["n_samples"] == 31
    [skip] = on_disk["data"]["skipped"]
    assert skip["key"] == "broken/corrupt.png"
    assert skip["label"] == "covid19"
    assert "decode" in skip["reason"]
    assert set(on_disk["per_network"]) == {"resnet18", "resnet34", "fused"}
    for row in on_disk["per_class"].values():
        assert set(row) >= PER_CLASS_KEYS
        assert row["support"] == 10
        assert set(row["ci95"]) == {"sensitivity", "specificity", "ppv", "f1"}
    assert 0.0 <= on_disk["accuracy"] <= 1.0
    assert 0.0 <= on_disk["ece"] <= 1.0
    for name in ("confusion.png", "roc.png", "reliability.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            assert image.width >= 400 and image.height >= 400
            image.load()
            colors = image.getcolors(1 << 16)  # None: more colours than that
            assert colors is None or len(colors) > 10  # not a blank canvas

    summary = format_summary(report)
    assert "tiny" in summary and "macro-F1" in summary and "covid19" in summary
    assert "resnet34" in summary and "broken/corrupt.png" in summary


def test_evaluate_model_refuses_labels_the_model_does_not_output(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    sample = Sample(path=tmp_path / "x.png", label="tuberculosis", key="x.png")
    with pytest.raises(DataError, match="tuberculosis"):
        evaluate_model(tiny_model_dir, [sample], progress=False)
    with pytest.raises(DataError, match="empty"):
        evaluate_model(tiny_model_dir, [], progress=False)


def test_evaluate_model_with_no_readable_image_is_a_data_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    missing = Sample(path=tmp_path / "gone.png", label="normal", key="gone.png")
    with pytest.raises(DataError, match="none of the 1 images"):
        evaluate_model(tiny_model_dir, [missing], progress=False)


# --- promotion gate -----------------------------------------------------------------------------------


def gate_report(macro_f1: float | None, covid_sensitivity: float | None) -> dict[str, Any]:
    return {"n": 100, "macro_f1": macro_f1, "per_class": {"covid19": {"sensitivity": covid_sensitivity}}}


def test_gate_refuses_a_worse_candidate_naming_both_values() -> None:
    active = gate_report(0.9, 0.95)
    ok, reason = gate_passes(gate_report(0.85, 0.95), active)
    assert not ok
    assert "0.8500" in reason and "0.9000" in reason and "macro-F1" in reason
    ok, reason = gate_passes(gate_report(0.95, 0.90), active)
    assert not ok
    assert "covid19 sensitivity" in reason and "0.9000" in reason and "0.9500" in reason
    ok, reason = gate_passes(gate_report(0.95, None), active)
    assert not ok and "undefined" in reason


def test_gate_accepts_better_or_equal_candidates() -> None:
    active = gate_report(0.9, 0.95)
    ok, reason = gate_passes(gate_report(0.9, 0.95), active)
    assert ok and "0.9000" in reason and "0.9500" in reason
    assert gate_passes(gate_report(0.91, 0.97), active)[0]
    assert gate_passes(gate_report(0.895, 0.95), active, tolerance=0.01)[0]
    assert gate_passes(gate_report(0.5, 0.5), gate_report(None, None))[0]  # nothing to beat
    with pytest.raises(ValueError, match="tolerance"):
        gate_passes(active, active, tolerance=-0.1)


def test_compare_reports_gives_candidate_minus_active() -> None:
    deltas = compare_reports(gate_report(0.8, 0.9), gate_report(0.75, 1.0))
    assert deltas["macro_f1"] == {"candidate": 0.8, "active": 0.75, "delta": pytest.approx(0.05)}
    assert deltas["covid19_sensitivity"]["delta"] == pytest.approx(-0.1)
    assert compare_reports(gate_report(None, 0.9), gate_report(0.7, 0.9))["macro_f1"]["delta"] is None

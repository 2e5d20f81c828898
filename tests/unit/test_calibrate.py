"""Calibration of the fused output (trainer.calibrate): the methods, their cross-fitted ECE, the choice."""

from __future__ import annotations

import numpy as np
import pytest

from screener.core.errors import TrainingError
from trainer.calibrate import (
    IN_GRAPH,
    METHODS,
    apply_graph_calibration,
    apply_method,
    choose_calibration,
    compare_methods,
    ece,
    ece_noise_floor,
    fit_joint_temperatures,
    fit_method,
)
from trainer.fuse import apply_temperature, fit_temperature, fused_probs, log_loss


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two 'networks' whose logits are a calibrated model's times 3 and 2: both overconfident."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(size=(n, 3)) * 1.5
    labels = np.array([rng.choice(3, p=p) for p in _softmax(true_logits)], dtype=np.int64)
    noise = rng.normal(scale=0.3, size=(2, n, 3))
    return _softmax(3 * (true_logits + noise[0])), _softmax(2 * (true_logits + noise[1])), labels


def test_joint_temperatures_calibrate_the_fused_output_better_than_per_network() -> None:
    pa, pb, y = _overconfident(2000, 0)
    w = 0.6
    per_net = fit_method("per_network", pa, pb, y, w)
    joint = fit_joint_temperatures(pa, pb, y, w)
    assert joint[0] > 1.5 and joint[1] > 1.2  # both networks were overconfident: T > 1 cools them
    fused_joint = apply_method("joint", {"temperature_a": joint[0], "temperature_b": joint[1]}, pa, pb, w)
    fused_per = apply_method("per_network", per_net, pa, pb, w)
    assert log_loss(fused_joint, y) <= log_loss(fused_per, y) + 1e-3
    assert ece(y, fused_joint) < 0.5 * ece(y, fused_probs(w, pa, pb))
    # Temperatures never change a network's argmax.
    assert (fused_joint.argmax(1) == fused_probs(w, pa, pb).argmax(1)).mean() > 0.95


def test_compare_methods_reports_every_method_and_the_choice_is_one_the_graph_runs() -> None:
    pa, pb, y = _overconfident(600, 1)
    table = compare_methods(pa, pb, y, 0.5)
    assert list(table) == list(METHODS)
    for method, row in table.items():
        assert row["in_graph"] == (method in IN_GRAPH)
        assert 0.0 <= row["val_ece"] <= 1.0 and row["cross_fitted_ece"] is not None
        assert row["cross_fitted_logloss"] is not None and row["cross_fitted_logloss"] > 0
    assert table["joint"]["val_ece"] < table["none"]["val_ece"]
    method, params = choose_calibration(table)
    assert method in IN_GRAPH and method != "none"
    # Chosen by cross-fitted log-loss: no in-graph method has a lower one.
    assert all(table[method]["cross_fitted_logloss"] <= table[m]["cross_fitted_logloss"] for m in IN_GRAPH)
    assert params == table[method]["params"]


def test_the_mixture_of_two_calibrated_networks_is_under_confident_and_a_fused_temperature_sharpens_it() -> (
    None
):
    # Two overconfident networks that disagree. Calibrated one by one, their mixture is LESS confident
    # than it is right (the old per-network recipe); a temperature on the mixture itself undoes that.
    rng = np.random.default_rng(4)
    n = 3000
    true_logits = rng.normal(size=(n, 3)) * 2.5
    y = np.array([rng.choice(3, p=p) for p in _softmax(true_logits)], dtype=np.int64)
    pa = _softmax(true_logits + rng.normal(scale=1.2, size=(n, 3)))
    pb = _softmax(true_logits + rng.normal(scale=1.2, size=(n, 3)))
    table = compare_methods(pa, pb, y, 0.5)
    assert table["per_network"]["val_ece"] > table["none"]["val_ece"]  # each calibrated, the mix is not
    per_network_mix = apply_method("per_network", table["per_network"]["params"], pa, pb, 0.5)
    assert fit_temperature(per_network_mix, y) < 0.9  # under-confident: T_f < 1 sharpens it
    method, params = choose_calibration(table)
    cross = table[method]["cross_fitted_logloss"]
    assert (
        cross < table["per_network"]["cross_fitted_logloss"]
        and cross <= table["joint"]["cross_fitted_logloss"]
    )
    # What the graph runs (the card keys) is what was scored.
    kept = apply_graph_calibration(params, pa, pb, 0.5)
    assert np.allclose(kept, apply_method(method, table[method]["params"], pa, pb, 0.5))
    assert np.allclose(
        apply_graph_calibration({"fused_temperature": 0.7}, pa, pb, 0.5),
        apply_temperature(fused_probs(0.5, pa, pb), 0.7),
    )
    # Vector scaling is in the graph too: per-class scale and bias on the log of the mixture.
    vector = table["vector"]["params"]
    assert len(vector["vector_scale"]) == len(vector["vector_bias"]) == 3
    log_mix = np.log(np.clip(fused_probs(0.5, pa, pb), 1e-12, 1.0))
    z = log_mix * np.array(vector["vector_scale"]) + np.array(vector["vector_bias"])
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    assert np.allclose(apply_graph_calibration(vector, pa, pb, 0.5), expected)


def test_few_images_are_not_cross_fitted_and_bad_input_is_refused() -> None:
    pa, pb, y = _overconfident(12, 2)
    table = compare_methods(pa, pb, y, 0.5)
    assert table["joint"]["cross_fitted_ece"] is None and table["joint"]["cross_fitted_logloss"] is None
    assert choose_calibration(table)[0] in IN_GRAPH
    with pytest.raises(TrainingError, match="unknown calibration method 'platt'"):
        fit_method("platt", pa, pb, y, 0.5)
    with pytest.raises(TrainingError, match="matching, non-empty"):
        fit_joint_temperatures(pa, pb[:5], y, 0.5)


def test_the_ece_noise_floor_is_what_perfect_calibration_shows_and_shrinks_with_more_images() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, size=(2000, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    small_mean, small_p95 = ece_noise_floor(probs[:100], draws=100)
    large_mean, _ = ece_noise_floor(probs, draws=50)
    assert 0.0 < large_mean < small_mean <= small_p95 < 0.5
    assert small_mean > 0.03  # 100 perfectly calibrated images still show several percent
    # Labels really drawn from the probabilities land within the floor's spread.
    drawn = np.array([rng.choice(3, p=row) for row in probs[:100]])
    assert ece(drawn, probs[:100]) < 2 * small_p95
    with pytest.raises(TrainingError, match="noise floor needs"):
        ece_noise_floor(np.zeros((0, 3)))

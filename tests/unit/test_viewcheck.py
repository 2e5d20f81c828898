"""The image-content gate's view check: negatives made from chests, the network, the combined score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from screener.imaging.pixels import PreprocessSpec
from screener.model.novelty import VIEW_SIZE, MahalanobisGate, ViewCheck, invert_centre
from trainer.viewcheck import NEGATIVE_KINDS, negative_from, not_chest_probability, train_view_check


def _chest_like(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A crude frontal-chest layout: bright below and at the sides, two dark lung fields, noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.35 + 0.5 * yy**2
    for cx in (0.3, 0.7):
        img -= 0.3 * np.exp(-(((xx - cx) / 0.12) ** 2 + ((yy - 0.45) / 0.22) ** 2))
    img += rng.normal(scale=0.03, size=img.shape)
    out: np.ndarray = np.clip(img, 0, 1).astype(np.float32)
    return out


def test_every_negative_kind_is_a_grey_image_and_unknown_kinds_are_refused() -> None:
    rng = np.random.default_rng(0)
    unit = _chest_like(rng)
    for kind in NEGATIVE_KINDS:
        out = negative_from(unit, kind, rng)
        assert out.ndim == 2 and out.dtype == np.float32 and 0.0 <= out.min() <= out.max() <= 1.0, kind
    np.testing.assert_allclose(negative_from(unit, "inverted", rng), 1.0 - unit, atol=1e-6)
    assert max(negative_from(unit, "part", rng).shape) <= 0.5 * unit.shape[0]
    with pytest.raises(ValueError, match="unknown negative kind 'lateral'"):
        negative_from(unit, "lateral", rng)


def test_the_gate_score_is_the_larger_of_the_distance_and_the_scaled_view_probability() -> None:
    torch.manual_seed(0)
    gate = MahalanobisGate(4, 2, view=True)
    view = ViewCheck()
    with torch.no_grad():
        view.head.bias.fill_(5.0)  # "not a chest" with p = sigmoid(5 + ...) for every image
    gate.set_view(view, 100.0)
    image = torch.zeros(3, 3, 128, 128)
    assert ViewCheck.prepare(image).shape == (3, 1, VIEW_SIZE, VIEW_SIZE)
    features = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    p = torch.sigmoid(view(image))  # no consistency copies: the input as it is
    expected = torch.maximum(gate.mahalanobis(features), 100.0 * p)
    torch.testing.assert_close(gate(features, image), expected)
    with torch.no_grad():
        assert float(gate(features, image)[1]) == pytest.approx(2500.0)  # the distance wins
    with pytest.raises(ValueError, match="needs the model input image"):
        gate(features)
    with pytest.raises(ValueError, match="built without a view check"):
        MahalanobisGate(4, 2).set_view(view, 1.0)
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        gate.set_view(view, 0.0)


def test_the_view_check_learns_upright_from_rotated_on_held_out_images() -> None:
    rng = np.random.default_rng(1)

    def small(images: list[np.ndarray]) -> torch.Tensor:
        return ViewCheck.prepare(torch.from_numpy(np.stack(images)[:, None].repeat(3, axis=1)))

    upright = small([_chest_like(rng) for _ in range(96)])
    rotated = torch.rot90(upright, 1, dims=(2, 3))
    upside_down = torch.rot90(upright, 2, dims=(2, 3))
    view = train_view_check(upright[:64], torch.cat((rotated[:32], upside_down[:32])), epochs=4)
    p_chest = not_chest_probability(view, upright[64:])
    p_other = not_chest_probability(view, torch.cat((rotated[64:], upside_down[64:])))
    assert np.mean(p_chest < 0.5) >= 0.9 and np.mean(p_other > 0.5) >= 0.9
    # With the consistency copies, an input is refused as soon as a turned copy looks upright: never less
    # refused than before, and the upright ones still pass.
    view.consistency = True
    p_chest_turns = not_chest_probability(view, upright[64:])
    p_other_turns = not_chest_probability(view, torch.cat((rotated[64:], upside_down[64:])))
    assert np.all(p_other_turns >= p_other - 1e-6) and np.mean(p_other_turns > 0.5) >= 0.9
    assert np.mean(p_chest_turns < 0.5) >= 0.9


def test_with_consistency_the_view_probability_counts_turned_and_inverted_copies_looking_upright() -> None:
    torch.manual_seed(3)
    view = ViewCheck(consistency=True).eval()
    small, centre = torch.rand(5, 1, VIEW_SIZE, VIEW_SIZE), 0.4
    with torch.no_grad():
        got = view.not_chest(small, centre)
        own = 1.0 - torch.sigmoid(view.classify(small))  # "upright chest" as it is
        copies = [torch.rot90(small, k, dims=(2, 3)) for k in (1, 2, 3)]
        copies += [torch.rot90(centre - small, k, dims=(2, 3)) for k in (0, 1, 2, 3)]
        best = torch.stack([1.0 - torch.sigmoid(view.classify(c)) for c in copies]).max(dim=0).values
    expected = torch.maximum(torch.maximum(1.0 - own, best), torch.clamp(0.5 + best - own, 0.0, 1.0))
    torch.testing.assert_close(got, expected)
    view.consistency = False
    with torch.no_grad():
        torch.testing.assert_close(view.not_chest(small, centre), 1.0 - own)
    with pytest.raises(ValueError, match="need view=True"):
        MahalanobisGate(4, 2, consistency=True)
    with pytest.raises(ValueError, match="needs a finite inversion centre"):
        MahalanobisGate(4, 2, view=True, consistency=True).set_view(ViewCheck(), 1.0)


def _normalised(grey: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The grey plane replicated to three channels and normalised per channel, as the model input is."""
    planes = [(grey - m) / s for m, s in zip(spec.mean, spec.std, strict=True)]
    return np.stack(planes).astype(np.float32)


def test_inverting_the_prepared_input_about_the_centre_is_inverting_the_grey_image() -> None:
    spec = PreprocessSpec()
    rng = np.random.default_rng(2)
    grey = _chest_like(rng)
    # Normalisation only (no contrast enhancement between): exact.
    centre = invert_centre(spec.mean, spec.std)
    as_is = ViewCheck.prepare(torch.from_numpy(_normalised(grey, spec)[None]))
    inverted = ViewCheck.prepare(torch.from_numpy(_normalised(1.0 - grey, spec)[None]))
    torch.testing.assert_close(centre - as_is, inverted, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="std > 0"):
        invert_centre((0.5,), (0.0,))


def test_a_gate_with_turns_exports_to_onnx_and_scores_as_torch_does(tmp_path) -> None:
    import onnxruntime as ort

    torch.manual_seed(4)
    gate = MahalanobisGate(4, 2, view=True, consistency=True)
    gate.set_view(ViewCheck(), 10.0, invert_centre((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    gate.eval()
    features, image = torch.rand(3, 4), torch.rand(3, 3, 96, 96)
    path = tmp_path / "gate.onnx"
    torch.onnx.export(
        gate,
        (features, image),
        str(path),
        input_names=["f", "i"],
        output_names=["n"],
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"f": features.numpy(), "i": image.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, gate(features, image).numpy(), rtol=1e-4, atol=1e-5)


def test_the_view_threshold_sits_halfway_between_the_chests_and_the_check_cases_within_its_range() -> None:
    from trainer.gate import VIEW_THRESHOLD_RANGE, choose_view_threshold, pass_threshold

    chests = np.linspace(0.0, 0.8, 200)
    q = pass_threshold(chests, 0.995)
    assert 0.79 < q <= 0.8
    assert choose_view_threshold(chests, np.array([0.99, 1.0])) == pytest.approx((q + 0.99) / 2)
    # A check case below the chests' quantile: the chests come first.
    assert choose_view_threshold(chests, np.array([0.3, 1.0])) == pytest.approx(q)
    assert choose_view_threshold(chests, np.zeros(0)) == pytest.approx(q)
    low, high = VIEW_THRESHOLD_RANGE
    assert choose_view_threshold(np.full(50, 0.1), np.array([0.2])) == low
    assert choose_view_threshold(np.full(50, 0.999), np.array([1.0])) == high

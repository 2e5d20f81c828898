"""The fused ResNet-101 + ResNet-152 model: ONNX export, model card, integrity checks, engine agreement.

The model directory (random weights, seeded) is exported once per session: exporting both networks
takes several seconds on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from screener.core.errors import EngineUnavailableError, ModelError, ModelIntegrityError
from screener.imaging.pixels import PreprocessSpec, preprocess_file
from screener.model.engine import available_backends, load_engine
from screener.model.engine.base import EngineOutput
from screener.model.engine.onnx_backend import OnnxRuntimeEngine
from screener.model.export import RANDOM_NOTES
from screener.model.fused import ARCHITECTURES, FusedResNet, load_fused_from_safetensors
from screener.model.modelcard import (
    ARCHITECTURE_NAMES,
    CARD_FILE,
    CLASSES,
    ONNX_FILE,
    WEIGHTS_FILE,
    ModelCard,
    load_model_dir,
)
from tests.conftest import MODEL_FUSION_WEIGHT as FUSION_WEIGHT
from trainer import cli as trainer_cli

TOL = 1e-4


@pytest.fixture
def cxr_batch(cxr3_dir: Path) -> np.ndarray:
    """Four real radiographs, at least one per class, preprocessed at 224."""
    paths = [sorted((cxr3_dir / cls).glob("*.png"))[0] for cls in CLASSES]
    paths.append(sorted((cxr3_dir / "covid19").glob("*.png"))[1])
    spec = PreprocessSpec(input_size=224)
    batch = np.stack([preprocess_file(path, spec, 50_000_000) for path in paths]).astype(np.float32)
    assert batch.shape == (4, 3, 224, 224)
    return batch


def _assert_fused(out: EngineOutput, weight: float) -> None:
    for probs in (out.probs, out.probs_a, out.probs_b):
        assert probs.dtype == np.float32 and probs.shape[1] == len(CLASSES)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.probs, weight * out.probs_a + (1 - weight) * out.probs_b, atol=1e-6)


def _assert_close(a: EngineOutput, b: EngineOutput, tol: float) -> None:
    for field in ("probs", "probs_a", "probs_b"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=tol, rtol=0, err_msg=field)


def test_onnx_graph_matches_torch_on_real_images(model_dir: Path, cxr_batch: np.ndarray) -> None:
    import torch

    loaded = load_model_dir(model_dir)
    assert loaded.card.architectures == ("resnet101", "resnet152")
    assert loaded.card.fusion_weight == FUSION_WEIGHT
    net = load_fused_from_safetensors(loaded.weights_path, loaded.card)
    engine = OnnxRuntimeEngine(loaded, threads=0)
    try:
        for batch in (cxr_batch, cxr_batch[:1]):  # dynamic batch axis: 4 then 1
            with torch.inference_mode():
                probs, probs_a, probs_b = net(torch.from_numpy(batch))[:3]  # then the heatmap
            expected = EngineOutput(probs.numpy(), probs_a.numpy(), probs_b.numpy())
            got = engine.infer(batch)
            assert got.probs.shape == (len(batch), 3)
            _assert_close(got, expected, TOL)
            _assert_fused(got, FUSION_WEIGHT)
        # Calibrated random weights give soft probabilities, so agreement above is not one-hot trivia.
        assert float(got.probs_a.max()) < 0.999 and float(got.probs_b.max()) < 0.999
    finally:
        engine.close()


def test_torch_and_onnxruntime_backends_agree(model_dir: Path, cxr_batch: np.ndarray) -> None:
    ort_engine, loaded = load_engine(model_dir, "onnxruntime")
    torch_engine, _ = load_engine(model_dir, "torch")
    try:
        assert ort_engine.name == "onnxruntime" and torch_engine.name == "torch"
        _assert_close(torch_engine.infer(cxr_batch), ort_engine.infer(cxr_batch), TOL)
        _assert_fused(torch_engine.infer(cxr_batch[:1]), loaded.card.fusion_weight)
        with pytest.raises(ValueError, match=r"batch shape \(1, 3, 64, 64\)"):
            ort_engine.infer(np.zeros((1, 3, 64, 64), np.float32))
        with pytest.raises(ValueError, match="float64"):
            torch_engine.infer(cxr_batch.astype(np.float64))
    finally:
        ort_engine.close()
        torch_engine.close()


def test_auto_backend_on_cpu_host_is_onnxruntime(model_dir: Path) -> None:
    backends = available_backends()
    assert {"onnxruntime", "torch"} <= set(backends)
    if "tensorrt" in backends:
        pytest.skip("this host can run TensorRT; auto picks it")
    engine, _ = load_engine(model_dir, "auto")
    assert engine.name == "onnxruntime"
    engine.close()
    with pytest.raises(EngineUnavailableError, match="'openvino'"):
        load_engine(model_dir, "openvino")


def _copy_model_dir(src: Path, dst: Path) -> Path:
    """A copy whose large unchanged files are hard links (cheap); model.onnx is a real copy."""
    dst.mkdir()
    shutil.copyfile(src / CARD_FILE, dst / CARD_FILE)
    shutil.copyfile(src / ONNX_FILE, dst / ONNX_FILE)
    try:
        os.link(src / WEIGHTS_FILE, dst / WEIGHTS_FILE)
    except OSError:
        shutil.copyfile(src / WEIGHTS_FILE, dst / WEIGHTS_FILE)
    return dst


def test_tampered_onnx_is_refused(model_dir: Path, tmp_path: Path) -> None:
    tampered = _copy_model_dir(model_dir, tmp_path / "tampered")
    with (tampered / ONNX_FILE).open("r+b") as fh:
        fh.seek((tampered / ONNX_FILE).stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ModelIntegrityError, match=r"model\.onnx sha256 [0-9a-f]{64} != card"):
        load_model_dir(tampered)
    for backend in ("onnxruntime", "torch", "auto"):
        with pytest.raises(ModelIntegrityError, match=r"model\.onnx"):
            load_engine(tampered, backend)


def test_missing_card_or_file_is_refused(model_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"no card\.json"):
        load_model_dir(empty)
    with pytest.raises(ModelError, match="does not exist"):
        load_model_dir(tmp_path / "nowhere")
    partial = _copy_model_dir(model_dir, tmp_path / "partial")
    (partial / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelError, match=r"weights\.safetensors listed in .* is missing"):
        load_engine(partial, "onnxruntime")


def test_card_round_trips_and_records_every_file(model_dir: Path) -> None:
    text = (model_dir / CARD_FILE).read_text()
    card = ModelCard.from_json(text)
    assert ModelCard.from_json(card.to_json()) == card
    assert card.classes == CLASSES
    assert card.input_size == card.preprocessing.input_size == 224
    assert set(card.files) == {ONNX_FILE, WEIGHTS_FILE}
    assert card.notes == RANDOM_NOTES
    assert card.version == "test-random-0" and card.parent_version is None
    assert card.opset >= 13


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fusion_weight", 1.5, r"fusion_weight = 1\.5: must be between 0 and 1"),
        ("classes", ["normal", "covid19", "tuberculosis"], r"classes = 'tuberculosis': unknown class"),
        ("architectures", ["resnet101", "vgg16"], r"architectures = 'vgg16'"),
        ("files", {"../etc/passwd": "0" * 64}, r"files = '\.\./etc/passwd'"),
        ("thresholds", {"covid19": 2}, r"thresholds\.covid19 = 2"),
        ("input_size", 256, r"preprocessing\.input_size = 224: differs from input_size 256"),
        ("colour", "blue", r"colour = 'blue': unknown key"),
    ],
)
def test_bad_cards_are_refused_naming_the_key(model_dir: Path, key: str, value: object, message: str) -> None:
    data = json.loads((model_dir / CARD_FILE).read_text())
    data[key] = value
    with pytest.raises(ModelError, match=message):
        ModelCard.from_json(json.dumps(data))


def test_card_without_a_required_key_is_refused(model_dir: Path) -> None:
    data = json.loads((model_dir / CARD_FILE).read_text())
    del data["version"]
    with pytest.raises(ModelError, match="version = None: is required"):
        ModelCard.from_json(json.dumps(data))
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelCard.from_json("{")


def test_architecture_names_are_explicit_factories() -> None:
    assert tuple(ARCHITECTURES) == ARCHITECTURE_NAMES
    with pytest.raises(ModelError, match="unknown backbone 'vgg16'"):
        FusedResNet("vgg16", "resnet18")
    with pytest.raises(ModelError, match="fusion weight"):
        FusedResNet("resnet18", "resnet18", fusion_weight=-0.1)


def test_trainer_init_model_writes_a_loadable_small_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "small"
    argv = ["init-model", "--out", str(out), "--arch-a", "resnet18", "--arch-b", "resnet34"]
    argv += ["--input-size", "64", "--fusion-weight", "0.8", "--seed", "3", "--version", "small-1"]
    assert trainer_cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == f"{out / CARD_FILE} version small-1"
    engine, loaded = load_engine(out, "onnxruntime")
    assert loaded.card.architectures == ("resnet18", "resnet34")
    out8 = engine.infer(np.random.default_rng(0).standard_normal((8, 3, 64, 64), dtype=np.float32))
    assert out8.probs.shape == (8, 3)
    _assert_fused(out8, 0.8)
    engine.close()
    # Model directories are immutable: a second export to the same place is refused.
    assert trainer_cli.main(argv) == 1  # a ScreenerError: message on stderr, exit 1
    assert "already exists" in capsys.readouterr().err


def test_the_output_calibration_is_the_same_step_in_the_fp32_and_fp16_models() -> None:
    import torch

    from screener.model.engine.torch_backend import HalfFused
    from screener.model.modelcard import OutputCalibration
    from trainer.fuse import apply_temperature, fused_probs

    torch.manual_seed(0)
    step = OutputCalibration.of({"fused_temperature": 0.7}, 3)
    assert step is not None and step.card_keys() == {"fused_temperature": 0.7}
    model = FusedResNet("resnet18", "resnet18", temperatures=(1.3, 0.9), output_calibration=step).eval()
    image = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        probs, probs_a, probs_b = (t.double().numpy() for t in model(image))
        half = HalfFused(model, torch.contiguous_format)(image)
    expected = apply_temperature(fused_probs(float(model.fusion_weight), probs_a, probs_b), 0.7)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert np.abs(probs - fused_probs(float(model.fusion_weight), probs_a, probs_b)).max() > 1e-3
    np.testing.assert_allclose(half[0].double().numpy(), probs, atol=2e-2)
    with pytest.raises(ModelError, match="3 finite scales and 3 biases"):
        model.set_output_calibration(OutputCalibration((1.0, 1.0), (0.0, 0.0)))
    with pytest.raises(ModelError, match="fused_temperature and vector scaling"):
        OutputCalibration.of(
            {"fused_temperature": 0.7, "vector_scale": [1, 1, 1], "vector_bias": [0, 0, 0]}, 3
        )
    with pytest.raises(ModelError, match="one number per class"):
        OutputCalibration.of({"vector_scale": [1, 1], "vector_bias": [0, 0]}, 3)

"""INT8: `trainer export --int8` calibrates on the model's own training split and gates INT8 against FP32;
the screener serves INT8 on CPU only when the card says the gate passed, and says which precision it runs.

One tiny model (resnet18 + resnet18 at 64 px, one short epoch) is really trained once per module on 40 real
cxr3 images per class, so its card carries a real training-data digest that calibration can check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from screener.core.errors import DataError, ModelError, ModelIntegrityError
from screener.model.engine import load_engine
from screener.model.modelcard import CARD_FILE, CLASSES, INT8_FILE, load_model_dir, read_card, sha256_file
from tests.helpers import cli, train_tiny_model, wait_for
from trainer.data import load_samples
from trainer.quantize import (
    GateThresholds,
    QuantSettings,
    early_nodes,
    export_int8,
    gate_figures,
    model_splits,
)

TRAINER = Path(sys.executable).with_name("trainer")
SCREENER = Path(sys.executable).with_name("screener")
PER_CLASS = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model directory from `train_and_export`, the data folder it was trained on)."""
    value = os.environ.get("CXR3_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("CXR3_DIR not set to the cxr3 dataset folder")
    return train_tiny_model(tmp_path_factory.mktemp("int8"), Path(value), PER_CLASS, "int8-test")


def _copy(model: Path, tmp_path: Path) -> Path:
    target = tmp_path / model.name
    shutil.copytree(model, target)
    return target


def _export(model: Path, data: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER")}
    env["SCREENER__LOGGING__FORMAT"] = "json"
    return subprocess.run(
        [
            str(TRAINER),
            "export",
            str(model),
            "--int8",
            "--data",
            str(data),
            "--calibration-images",
            "16",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
    )


@pytest.fixture(scope="module")
def passing(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained model with an INT8 graph that passed its gate (12 evaluation images)."""
    model, data = trained
    target = _copy(model, tmp_path_factory.mktemp("passing"))
    res = _export(target, data, "--min-eval-images", "10")
    assert res.returncode == 0, res.stdout + res.stderr
    return target


def _classify(
    model: Path, files: list[Path], precision: str
) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER")}
    env |= {"SCREENER__LOGGING__FORMAT": "json", "SCREENER__INFERENCE__PRECISION": precision}
    res = subprocess.run(
        [str(SCREENER), "classify", "--model", str(model), "--json", *map(str, files)],
        capture_output=True,
        text=True,
        env=env,
    )
    events = []
    for line in (res.stdout + res.stderr).splitlines():
        if line.startswith('{"') and '"event"' in line:
            events.append(json.loads(line))
    body = res.stdout[res.stdout.find("{\n") :] if res.returncode == 0 else res.stderr
    return res.returncode, json.loads(body) if res.returncode == 0 else {"error": body}, events


def _precision_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "engine.precision"]


def test_export_writes_the_int8_file_and_its_card_section(passing: Path, trained: tuple[Path, Path]) -> None:
    card = load_model_dir(passing).card  # every sha256 verified, the INT8 file included
    int8 = card.int8
    assert int8 is not None and int8.passed
    assert card.files[INT8_FILE] == int8.sha256 == sha256_file(passing / INT8_FILE)
    _, evaluation = model_splits(load_model_dir(trained[0]), trained[1])
    assert int8.gate["n"] == len(evaluation) == 12
    assert int8.gate["label_agreement"] == 1.0 and int8.gate["disagreements"] == 0
    for key in ("macro_f1_fp32", "macro_f1_int8", "covid19_sensitivity_fp32", "covid19_sensitivity_int8"):
        assert 0.0 <= int8.gate[key] <= 1.0
    assert int8.gate["thresholds"]["min_agreement"] == 0.99
    assert int8.calibration["count"] == 16 and len(int8.calibration["digest"]) == 64
    assert int8.calibration["split"] == "train"
    assert int8.quantization["format"] == "QDQ" and "per-channel" in int8.quantization["weights"]
    # the stem and stage 1 of both networks stay FP32 (their convs read float tensors and float weights),
    # every later conv runs on dequantised int8 inputs
    early = set(int8.quantization["fp32_early_nodes"])
    assert int8.quantization["fp32_stages"] == 1
    graph = onnx.load(str(passing / INT8_FILE)).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    gate = [node for node in convs if node.name.startswith("/novelty_gate/")]  # the gate's view check
    assert all(producer.get(node.input[1]) != "DequantizeLinear" for node in gate), "view check stays FP32"
    kept = [node for node in convs if node.name in early and node not in gate]
    assert len(kept) == 2 * (1 + 4)  # resnet18: stem + two basic blocks of two convs, twice
    for node in convs:
        dequantised = [producer.get(name) == "DequantizeLinear" for name in node.input[:2]]
        assert dequantised == ([False, False] if node in kept or node in gate else [True, True]), node.name
    # the card on disk reads back identically
    assert read_card(passing).int8 == int8


def test_passing_gate_classify_uses_int8_close_to_fp32(passing: Path, trained: tuple[Path, Path]) -> None:
    # the evaluation split: the gate measured identical labels there, and the screener must reproduce them
    _, evaluation = model_splits(load_model_dir(trained[0]), trained[1])
    files = [s.path for s in evaluation]
    rc, int8_out, int8_events = _classify(passing, files, "auto")
    assert rc == 0, int8_out
    (line,) = _precision_events(int8_events)
    assert line["precision"] == "int8" and "gate passed" in line["reason"] and CARD_FILE in line["reason"]
    rc, fp32_out, fp32_events = _classify(passing, files, "fp32")
    assert rc == 0, fp32_out
    assert _precision_events(fp32_events)[0]["precision"] == "fp32"
    # The content gate (FP32 in both graphs) refuses the same images in both; the rest are compared.
    assert [r["probs"] is None for r in int8_out["results"]] == [
        r["probs"] is None for r in fp32_out["results"]
    ]
    analysed = [(a, b) for a, b in zip(int8_out["results"], fp32_out["results"], strict=True) if a["probs"]]
    assert len(analysed) >= len(files) // 2, "the gate refused most of the model's own evaluation split"
    int8_probs = np.array([[a["probs"][c] for c in CLASSES] for a, _ in analysed])
    fp32_probs = np.array([[b["probs"][c] for c in CLASSES] for _, b in analysed])
    assert [r["label"] for r in int8_out["results"]] == [r["label"] for r in fp32_out["results"]]
    difference = np.abs(int8_probs - fp32_probs)
    assert difference.max() > 0.0, "INT8 gave bit-identical probabilities: the FP32 graph ran"
    assert difference.max() < 0.05


def test_worker_serves_int8_when_the_gate_passed(passing: Path, make_server: Any) -> None:
    server = make_server(SCREENER__INFERENCE__PRECISION="auto")
    cli(server, "db", "upgrade")
    cli(server, "models", "register", str(passing), "--activate")
    listing = subprocess.run(
        [str(TRAINER), "models", "list"], cwd=server.workdir, env=server.env(), capture_output=True, text=True
    )
    assert "int8-test" in listing.stdout and "cpu=int8" in listing.stdout, listing.stdout + listing.stderr
    server.start()
    try:
        wait_for(lambda: '"model.loaded"' in server.log_text(), 60, "the worker to load the model")
        events = server.log_events()
        (line,) = _precision_events(events)
        assert line["precision"] == "int8" and line["setting"] == "auto"
        loaded = next(e for e in events if e.get("event") == "model.loaded")
        assert loaded["backend"] == "onnxruntime-int8"
    finally:
        assert server.stop() == 0


def test_failing_gate_keeps_fp32_and_int8_setting_refuses(
    trained: tuple[Path, Path], tmp_path: Path, make_server: Any
) -> None:
    model = _copy(trained[0], tmp_path)
    # 12 evaluation images are fewer than the 100 the default gate needs: it must fail whatever the figures
    res = _export(model, trained[1])
    assert res.returncode == 3, res.stdout + res.stderr
    assert "INT8 gate FAILED on n=12" in res.stdout and "fewer than the 100" in res.stdout
    card = load_model_dir(model).card
    assert card.int8 is not None and not card.int8.passed and card.files[INT8_FILE] == card.int8.sha256

    files = sorted((trained[1] / "covid19").glob("*.png"))[:2]
    rc, _, events = _classify(model, files, "auto")
    assert rc == 0
    (line,) = _precision_events(events)
    assert line["precision"] == "fp32" and "INT8 gate FAILED" in line["reason"]

    rc, out, _ = _classify(model, files, "int8")
    assert rc == 1
    message = out["error"]
    assert "inference.precision = int8" in message and str(model / CARD_FILE) in message
    assert "label agreement" in message and "macro-F1" in message and "COVID-19 sensitivity" in message
    assert "INT8 gate FAILED on n=12" in message

    server = make_server(SCREENER__INFERENCE__PRECISION="int8")
    cli(server, "db", "upgrade")
    cli(server, "models", "register", str(model), "--activate")
    server.start(wait=False)
    assert server.proc is not None and server.proc.wait(timeout=60) == 1
    assert "inference.precision = int8" in server.log_text() and "INT8 gate FAILED" in server.log_text()


def test_int8_setting_without_any_int8_model_refuses(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError) as caught:
        load_engine(tiny_model_dir, "onnxruntime", precision="int8")
    message = str(caught.value)
    assert str(tiny_model_dir / CARD_FILE) in message and "no int8 section" in message
    assert "trainer export" in message
    engine, _ = load_engine(tiny_model_dir, "onnxruntime", precision="auto")
    assert engine.name == "onnxruntime"
    engine.close()


def test_tampered_int8_file_is_refused(passing: Path, tmp_path: Path) -> None:
    model = _copy(passing, tmp_path)
    raw = bytearray((model / INT8_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (model / INT8_FILE).write_bytes(bytes(raw))
    for precision in ("auto", "fp32"):
        with pytest.raises(ModelIntegrityError, match=INT8_FILE):
            load_engine(model, "onnxruntime", precision=precision)


def test_calibration_refuses_anything_but_the_models_training_split(
    trained: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    model, data = trained
    # a random-weight model has no training data at all
    with pytest.raises(DataError, match="no training-data digest"):
        export_int8(tiny_model_dir, data, progress=False)
    # a subset of the data (without its first image) or another seed gives another split
    samples = load_samples(data)
    copy = _copy(model, tmp_path)
    for wrong, seed in ((samples[1:], 0), (samples, 1)):
        with pytest.raises(DataError, match="is not the one model int8-test was trained on"):
            export_int8(copy, wrong, seed=seed, progress=False)
    assert not (copy / INT8_FILE).exists() and read_card(copy).int8 is None


def test_fp32_stages_are_found_by_resolution(trained: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = trained
    shaped = tmp_path / "shaped.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(onnx.load(str(model / "model.onnx"))), str(shaped))
    assert early_nodes(shaped, 0) == []
    one, two = early_nodes(shaped, 1), early_nodes(shaped, 2)
    assert set(one) < set(two)
    assert all("layer1" in name or "layer" not in name for name in one)
    assert any("layer2" in name for name in two) and not any("layer3" in name for name in two)
    with pytest.raises(ValueError, match="fp32_stages"):
        QuantSettings(fp32_stages=5).validate()


def test_gate_logic_on_given_figures() -> None:
    y = np.array([0] * 50 + [1] * 50 + [2] * 50)
    fp32 = np.eye(3)[y] * 0.8 + 0.2 / 3
    gate = GateThresholds()
    figures, passed, failures = gate_figures(y, fp32, fp32 * 0.999 + 0.001 / 3, CLASSES, {}, gate)
    assert passed and not failures and figures["label_agreement"] == 1.0 and figures["macro_f1_drop"] == 0.0
    # INT8 calls two COVID-19 images normal: 98.7% agreement, sensitivity drops 0.04
    flipped = fp32.copy()
    flipped[[50, 51]] = np.eye(3)[0] * 0.8 + 0.2 / 3
    figures, passed, failures = gate_figures(y, fp32, flipped, CLASSES, {}, gate)
    assert not passed
    assert figures["disagreements"] == 2 and figures["covid19_sensitivity_drop"] == pytest.approx(0.04)
    assert any("label agreement" in f for f in failures)
    assert any("COVID-19 sensitivity drop 0.04" in f for f in failures)
    assert any("macro-F1 drop" in f for f in failures)
    # one flip in 150 images: agreement 99.3% passes, but the COVID-19 sensitivity drop of 0.02 does not
    one = fp32.copy()
    one[50] = fp32[0]
    _, passed, failures = gate_figures(y, fp32, one, CLASSES, {}, gate)
    assert not passed and len(failures) >= 1 and not any("label agreement" in f for f in failures)
    with pytest.raises(ValueError, match="min_agreement"):
        gate_figures(y, fp32, fp32, CLASSES, {}, GateThresholds(min_agreement=1.5))


def test_card_int8_section_must_match_its_file_entry(passing: Path) -> None:
    from screener.model.modelcard import ModelCard

    data = json.loads((passing / CARD_FILE).read_text())
    data["int8"]["sha256"] = "0" * 64
    with pytest.raises(ModelError, match=r"files\.model\.int8\.onnx = .*must equal int8\.sha256"):
        ModelCard.from_json(json.dumps(data))
    data = json.loads((passing / CARD_FILE).read_text())
    del data["int8"]
    with pytest.raises(ModelError, match="is listed but the card has no int8 section"):
        ModelCard.from_json(json.dumps(data))
    data = json.loads((passing / CARD_FILE).read_text())
    data["int8"]["passed"] = "yes"
    with pytest.raises(ModelError, match=r"int8\.passed = 'yes'"):
        ModelCard.from_json(json.dumps(data))

"""Export a :class:`~screener.model.fused.FusedResNet` as a model directory: safetensors + one ONNX graph +
card.

The directory is assembled in a hidden sibling temp directory, every file is fsynced, and only then is it
renamed into place, so a reader sees either no directory or a complete, verifiable one.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from screener.core.errors import ModelError
from screener.imaging.pixels import PreprocessSpec
from screener.model.fused import FusedResNet
from screener.model.modelcard import (
    CARD_FILE,
    CLASSES,
    ONNX_FILE,
    WEIGHTS_FILE,
    GateSpec,
    HeatmapSpec,
    ModelCard,
    calibration_section,
    default_concepts,
    sha256_file,
)

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("probs", "probs_a", "probs_b")
NOVELTY_OUTPUT = "novelty"
HEATMAP_OUTPUT = "heatmap"
DEFAULT_HEATMAP = HeatmapSpec(method="cam", size=64)
"""Every new export carries the class activation map output (``heatmap=None`` leaves it out)."""
RANDOM_NOTES = "random weights, not trained: for plumbing only"


def export_model_dir(
    model: FusedResNet,
    out: Path,
    *,
    version: str,
    preprocessing: PreprocessSpec,
    metrics: Mapping[str, Any] | None = None,
    training_data_digest: str = "",
    parent_version: str | None = None,
    thresholds: Mapping[str, float] | None = None,
    notes: str = "",
    opset: int = OPSET,
    sources: Mapping[str, Mapping[str, int]] | None = None,
    gate: GateSpec | None = None,
    heatmap: HeatmapSpec | None = DEFAULT_HEATMAP,
    classes: Sequence[str] = CLASSES,
) -> ModelCard:
    """Write ``out/`` with ``weights.safetensors``, ``model.onnx`` and ``card.json``; return the card.

    The ONNX graph holds both networks and the fusion: input ``image`` float32 ``[N, 3, S, S]`` with a
    dynamic batch axis, outputs ``probs``, ``probs_a``, ``probs_b`` ``[N, 3]``. ``S`` is
    ``preprocessing.input_size``. The caller's model is not modified (a CPU copy is exported). The card takes
    the model's temperatures, the fused one too (``calibration``), and lung crop; ``sources`` is the class x
    source table of the training data. A model with a fitted image-content gate (``model.novelty_gate``) needs
    its card section ``gate``; the graph then has a fourth output ``novelty`` ``[N]``. With ``heatmap`` (the
    default) the graph's last output is ``heatmap`` ``[N, size, size]`` (:mod:`screener.model.cam`) and the
    card says so in its section ``heatmap``; ``heatmap=None`` exports without it. ``classes`` name the model's
    outputs in order (default: the paper's three); the card describes them with their default concepts
    (:data:`screener.model.modelcard.DEFAULT_CONCEPTS`).
    Raises :class:`ModelError` when ``out`` already exists, the card is invalid, the model's gate and
    ``gate`` disagree, ``classes`` do not match the model's outputs, or the graph fails ``onnx.checker``.
    """
    out = Path(out)
    outputs = int(model.net_a.fc.out_features)
    if len(classes) != outputs:
        raise ModelError(f"classes {list(classes)} name {len(classes)} outputs; the model has {outputs}")
    if out.exists():
        raise ModelError(f"{out} already exists: model directories are immutable; choose a new directory")
    if (model.novelty_gate is None) != (gate is None):
        raise ModelError(
            "the model's image-content gate and the card's gate section must come together "
            f"(model gate: {model.novelty_gate is not None}, card gate: {gate is not None})"
        )
    if gate is not None and tuple(gate.feature_dims) != model.feature_dims:
        raise ModelError(
            f"card gate.feature_dims {gate.feature_dims} differ from the model's {model.feature_dims}"
        )
    calibration = calibration_section(model.temperatures, model.output_calibration)
    card = ModelCard(
        version=version,
        classes=tuple(classes),
        concepts=default_concepts(classes),
        architectures=(model.arch_a, model.arch_b),
        input_size=preprocessing.input_size,
        preprocessing=preprocessing,
        fusion_weight=round(float(model.fusion_weight), 6),  # the float32 buffer, as written
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        files={ONNX_FILE: "0" * 64, WEIGHTS_FILE: "0" * 64},
        opset=opset,
        thresholds=dict(thresholds or {}),
        metrics=dict(metrics or {}),
        training_data_digest=training_data_digest,
        parent_version=parent_version,
        notes=notes,
        calibration=calibration,
        lung_crop=model.lung_crop_spec,
        sources={k: dict(v) for k, v in (sources or {}).items()},
        gate=gate,
        heatmap=heatmap,
    )
    card.validate()  # fail before the expensive export

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        cpu_model = copy.deepcopy(model).to("cpu").eval()
        cpu_model.set_temperatures(card.temperature("a"), card.temperature("b"))  # exactly the card's
        cpu_model.set_output_calibration(card.output_calibration())
        cpu_model.heatmap_size = heatmap.size if heatmap is not None else None
        _write_safetensors(cpu_model, tmp / WEIGHTS_FILE)
        _export_onnx(cpu_model, tmp / ONNX_FILE, preprocessing.input_size, opset)
        files = {name: sha256_file(tmp / name) for name in (ONNX_FILE, WEIGHTS_FILE)}
        card = dataclasses.replace(card, files=files)
        (tmp / CARD_FILE).write_text(card.to_json(), encoding="utf-8")
        for name in (ONNX_FILE, WEIGHTS_FILE, CARD_FILE):
            fsync_path(tmp / name)
        fsync_path(tmp)
        tmp.rename(out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


def _write_safetensors(model: FusedResNet, path: Path) -> None:
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "arch_a": model.arch_a, "arch_b": model.arch_b})


def _export_onnx(model: FusedResNet, path: Path, input_size: int, opset: int) -> None:
    import onnx

    dummy = torch.zeros(2, 3, input_size, input_size, dtype=torch.float32)
    outputs = (*OUTPUT_NAMES, NOVELTY_OUTPUT) if model.novelty_gate is not None else OUTPUT_NAMES
    if model.heatmap_size is not None:
        outputs = (*outputs, HEATMAP_OUTPUT)
    dynamic_axes = {name: {0: "batch"} for name in (INPUT_NAME, *outputs)}
    # The TorchScript exporter: one self-contained file, and (unlike the dynamo exporter in this torch)
    # it needs no onnxscript and exports ResNet-101 + ResNet-152 in seconds.
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # The lung crop's shape check and constant box trace to constants, which is what they are.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(outputs),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"exported graph {path.name} fails onnx.checker: {exc}") from None
    graph = onnx.load(str(path), load_external_data=False).graph
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:
        raise ModelError(f"exported graph {path.name} has a fixed batch size {batch_dim.dim_value}")


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (so a rename into it is durable)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def calibrate_batchnorm(model: nn.Module, *, input_size: int, seed: int, batches: int = 2) -> None:
    """Reset BatchNorm running statistics and re-estimate them on seeded, spatially smooth noise.

    A randomly initialised deep ResNet in eval mode has exploding activations (logits ~1e4), so its
    softmax is one-hot and two backends trivially "agree". Statistics calibrated on smooth noise
    (Gaussian at 1/8 resolution, upsampled: radiographs are smooth too; white noise is not, and leaves
    real images with logits ~50) keep the logits O(1) on real radiographs.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            low = torch.randn(4, 3, max(input_size // 8, 1), max(input_size // 8, 1), generator=generator)
            noise = nn.functional.interpolate(low, size=(input_size, input_size), mode="bilinear")
            model((noise - noise.mean()) / noise.std())
    model.train(was_training)
    for bn in bns:
        bn.momentum = 0.1


def create_random_model_dir(
    out: Path,
    *,
    arch_a: str = "resnet101",
    arch_b: str = "resnet152",
    input_size: int = 224,
    fusion_weight: float = 0.5,
    seed: int = 0,
    version: str | None = None,
    classes: Sequence[str] = CLASSES,
) -> ModelCard:
    """Export a seeded, randomly initialised (untrained) fused model to ``out``; return its card.

    For plumbing, tests and benchmarks only: the card's notes say so. The seed fixes the initial
    weights (global RNG state is left untouched); calibrated BatchNorm statistics may differ between
    hosts in the last bits (threaded reductions). Raises :class:`ModelError` as :func:`export_model_dir` does.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FusedResNet(arch_a, arch_b, fusion_weight=fusion_weight, num_classes=len(classes))
    calibrate_batchnorm(model, input_size=input_size, seed=seed)
    model.eval()
    if version is None:
        version = f"random-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-seed{seed}"
    return export_model_dir(
        model,
        out,
        version=version,
        preprocessing=PreprocessSpec(input_size=input_size),
        metrics={},
        training_data_digest="none",
        parent_version=None,
        thresholds={},
        notes=RANDOM_NOTES,
        classes=classes,
    )


def add_heatmap(
    model_dir: Path, out: Path, *, version: str | None = None, heatmap: HeatmapSpec = DEFAULT_HEATMAP
) -> ModelCard:
    """Write ``out``: the verified model of ``model_dir`` re-exported with the ``heatmap`` output.

    For models exported before the output existed: same weights, preprocessing, fusion, calibration, lung
    crop, gate, thresholds, metrics and sources; the card records ``parent_version`` (the model it came
    from), a new ``version`` (default ``<version>+cam``) and the ``heatmap`` section. An INT8 graph is not
    carried over (the graph changed): quantise the new directory again. Raises :class:`ModelError` when
    ``out`` exists or ``model_dir`` fails verification.
    """
    from screener.model.fused import load_fused_from_safetensors
    from screener.model.modelcard import load_model_dir

    out = Path(out)
    if out.exists():
        raise ModelError(f"{out} already exists: model directories are immutable; choose a new directory")
    loaded = load_model_dir(Path(model_dir))
    card = loaded.card
    model = load_fused_from_safetensors(loaded.weights_path, card)
    return export_model_dir(
        model,
        out,
        version=version or f"{card.version}+cam"[:64],
        preprocessing=card.preprocessing,
        metrics=card.metrics,
        training_data_digest=card.training_data_digest,
        parent_version=card.version,
        thresholds=card.thresholds,
        notes=f"{card.notes}; heatmap output added to {card.version}".lstrip("; "),
        opset=card.opset,
        sources=card.sources,
        gate=card.gate,
        heatmap=heatmap,
    )

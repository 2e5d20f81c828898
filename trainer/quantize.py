"""``trainer export MODEL_DIR --int8``: a statically quantised copy of ``model.onnx``, its accuracy proven.

Calibration uses real images of the model's own TRAINING split only: the data source is split again with
the trainer's seeded, leak-free :func:`trainer.data.split_samples` and the split's digest must equal the
card's ``training_data_digest``, so neither another dataset nor the held-out images can calibrate. Every
image goes through the serving preprocessing (:func:`screener.imaging.pixels.preprocess_file`, driven by the
card). The graph is quantised with ONNX Runtime's ``quantize_static`` (QDQ format, per-channel symmetric
INT8 weights, MinMax activation ranges; ONNX Runtime's quantisation guide,
https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html). The INT8 graph is then
compared with the FP32 graph on the EVALUATION (held-out test) split of the same split, and the card gets
an ``int8`` section (:class:`screener.model.modelcard.Int8Card`) with the file's sha256, the calibration count
and digest, the gate figures and whether the gate passed. The screener serves INT8 only when it passed.

Gate (defaults): labels identical on >= 99% of images, macro-F1 drop <= 0.01, COVID-19 sensitivity drop
<= 0.01, on at least 100 images (fewer prove nothing: one disagreement in 20 images is already 5%).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import platform
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from screener.core.errors import DataError, ImagingError, ModelError
from screener.core.logs import get_logger
from screener.core.progress import Progress
from screener.imaging.pixels import PreprocessSpec, preprocess_file
from screener.model.export import fsync_path
from screener.model.modelcard import (
    CARD_FILE,
    INT8_FILE,
    Int8Card,
    LoadedModel,
    ModelCard,
    load_model_dir,
    sha256_file,
)
from trainer.data import Sample, Splits, limit_per_class, load_samples, split_samples
from trainer.evaluate import metrics_from_probs, predict_labels

log = get_logger("trainer.quantize")

FloatArray = npt.NDArray[np.float32]
Activations = Literal["uint8", "int8"]
COVID = "covid19"
DEFAULT_CALIBRATION_IMAGES = 200
# Stem and first ResNet stage of each network kept FP32. Measured on the quick cxr3 model (MODEL_RESULTS.md):
# with everything quantised the INT8 graph's mean KL divergence from FP32 on 400 training images outside the
# calibration set was 1.5e-3 (4 labels differ); with the stem and stage 1 in FP32 it is 4.5e-4 (3 differ),
# with stages 1-2 9e-5 (none). Per-conv sensitivity (one conv quantised at a time) also falls with depth.
# Those early layers are a small share of the FLOPs, so most of the INT8 speed-up remains.
DEFAULT_FP32_STAGES = 1
_MAX_PIXELS = 100_000_000
_BATCH = 8
_CALIBRATION_BATCH = 4
_HEX64 = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class GateThresholds:
    """What INT8 must achieve against FP32 on the evaluation split to be served.

    ``min_agreement``: share of images with the same label; ``max_macro_f1_drop`` and
    ``max_covid_sensitivity_drop``: FP32 minus INT8, as fractions; ``min_images``: evaluation images
    needed for the figures to mean anything.
    """

    min_agreement: float = 0.99
    max_macro_f1_drop: float = 0.01
    max_covid_sensitivity_drop: float = 0.01
    min_images: int = 100

    def validate(self) -> None:
        """Raises ``ValueError`` naming a threshold outside its range."""
        for name in ("min_agreement", "max_macro_f1_drop", "max_covid_sensitivity_drop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"INT8 gate {name} = {value!r} must be between 0 and 1")
        if self.min_images < 1:
            raise ValueError(f"INT8 gate min_images = {self.min_images!r} must be at least 1")


@dataclass(frozen=True)
class QuantSettings:
    """ONNX Runtime ``quantize_static`` settings recorded on the card.

    ``activations``: ``uint8`` (asymmetric, ONNX Runtime's advice for x86-64 CPUs) or ``int8``
    (symmetric, its advice for ARM). Weights are always per-channel symmetric INT8. ``reduce_range``
    (7-bit weights) is ONNX Runtime's advice for x86-64 CPUs without VNNI, where 8-bit products can
    saturate; the default follows this host's CPU.
    """

    activations: Activations = "uint8"
    reduce_range: bool = False
    fp32_stages: int = DEFAULT_FP32_STAGES

    def validate(self) -> None:
        """Raises ``ValueError`` for an ``fp32_stages`` outside 0..4."""
        if not 0 <= self.fp32_stages <= 4:
            raise ValueError(f"fp32_stages = {self.fp32_stages!r} must be between 0 and 4 (ResNet stages)")

    def as_dict(self) -> dict[str, Any]:
        import onnxruntime

        return {
            "tool": f"onnxruntime {onnxruntime.__version__} quantize_static",
            "format": "QDQ",
            "weights": "int8 per-channel symmetric",
            "activations": "int8 symmetric" if self.activations == "int8" else "uint8 asymmetric",
            "calibration_method": "MinMax",
            "fp32_nodes": "classifier heads, softmax and fusion (after the global average pools)"
            + (f"; stem and first {self.fp32_stages} stage(s) of each network" if self.fp32_stages else ""),
            "fp32_stages": self.fp32_stages,
            "reduce_range": self.reduce_range,
            "host": platform.machine(),
        }


def host_has_vnni() -> bool:
    """True when this CPU advertises VNNI (AVX512-VNNI or AVX-VNNI) in /proc/cpuinfo; False elsewhere."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return "vnni" in flags


def default_settings() -> QuantSettings:
    """ONNX Runtime's advice for this CPU: ARM symmetric int8 activations; x86-64 uint8, 7-bit weights
    without VNNI. The stem and first stage stay FP32 (:data:`DEFAULT_FP32_STAGES`)."""
    if platform.machine().lower() in {"arm64", "aarch64"}:
        return QuantSettings(activations="int8", reduce_range=False)
    return QuantSettings(activations="uint8", reduce_range=not host_has_vnni())


@dataclass(frozen=True)
class Int8Outcome:
    """The card written by :func:`export_int8` and the evaluation and calibration sample counts."""

    card: ModelCard
    int8: Int8Card
    n_calibration: int
    n_eval: int


# --- the gate (pure) ---------------------------------------------------------------------------------


def gate_figures(
    y_true: npt.ArrayLike,
    probs_fp32: npt.ArrayLike,
    probs_int8: npt.ArrayLike,
    classes: Sequence[str],
    decision_thresholds: dict[str, float],
    gate: GateThresholds,
) -> tuple[dict[str, Any], bool, list[str]]:
    """Compare INT8 with FP32 on the same images; return ``(figures, passed, failures)``.

    Labels are decided as the screener decides them (the card's thresholds, else argmax). ``figures``
    holds every key of :data:`screener.model.modelcard.INT8_GATE_FIGURES` (drops are FP32 minus INT8) plus
    ``disagreements`` and ``thresholds``; ``failures`` says in words which threshold was missed. A
    COVID-19 sensitivity that cannot be measured (no COVID-19 image) fails the gate.
    Raises ``ValueError`` for malformed arrays.
    """
    gate.validate()
    y = np.asarray(y_true, dtype=np.int64)
    fp32 = metrics_from_probs(y, probs_fp32, classes, thresholds=decision_thresholds, bootstrap=0)
    int8 = metrics_from_probs(y, probs_int8, classes, thresholds=decision_thresholds, bootstrap=0)
    labels_fp32 = predict_labels(probs_fp32, classes, decision_thresholds)
    labels_int8 = predict_labels(probs_int8, classes, decision_thresholds)
    n = int(y.size)
    agree = int(np.sum(labels_fp32 == labels_int8))
    agreement = agree / n if n else 0.0

    def drop(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a - b, 6)

    f1_fp32, f1_int8 = fp32["macro_f1"], int8["macro_f1"]
    covid = COVID in classes
    sens_fp32 = fp32["per_class"][COVID]["sensitivity"] if covid else None
    sens_int8 = int8["per_class"][COVID]["sensitivity"] if covid else None
    figures: dict[str, Any] = {
        "n": n,
        "label_agreement": round(agreement, 6),
        "disagreements": n - agree,
        "macro_f1_fp32": f1_fp32,
        "macro_f1_int8": f1_int8,
        "macro_f1_drop": drop(f1_fp32, f1_int8),
        "covid19_sensitivity_fp32": sens_fp32,
        "covid19_sensitivity_int8": sens_int8,
        "covid19_sensitivity_drop": drop(sens_fp32, sens_int8),
        "max_abs_prob_diff": float(
            np.max(np.abs(np.asarray(probs_fp32, np.float64) - np.asarray(probs_int8, np.float64)))
        )
        if n
        else None,
        "thresholds": dataclasses.asdict(gate),
    }
    failures: list[str] = []
    if n < gate.min_images:
        failures.append(f"only {n} evaluation images, fewer than the {gate.min_images} the gate needs")
    if agreement < gate.min_agreement:
        failures.append(f"label agreement {agreement:.4f} < {gate.min_agreement}")
    f1_drop = figures["macro_f1_drop"]
    if f1_drop is None or f1_drop > gate.max_macro_f1_drop:
        failures.append(f"macro-F1 drop {f1_drop} > {gate.max_macro_f1_drop}")
    sens_drop = figures["covid19_sensitivity_drop"]
    if sens_drop is None or sens_drop > gate.max_covid_sensitivity_drop:
        reason = "not measurable (no COVID-19 image)" if sens_drop is None else f"{sens_drop}"
        failures.append(f"COVID-19 sensitivity drop {reason} > {gate.max_covid_sensitivity_drop}")
    return figures, not failures, failures


# --- data --------------------------------------------------------------------------------------------


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and set(value) <= _HEX64


def model_split(
    model: LoadedModel, data: Sequence[Sample] | Path | str, *, seed: int = 0, limit: int | None = None
) -> Splits:
    """The train / validation / test split of ``data`` exactly as ``trainer train`` made it.

    ``seed`` and ``limit`` (images per class) must be those given to ``trainer train``; the split's
    fractions come from the card (``metrics.split_fractions``). Raises
    :class:`DataError` when the card has no training-data digest (an untrained, random-weight model has
    none: there are no training images) or when the split of ``data`` does not reproduce it (another
    dataset, a subset such as the test-split CSV, or another seed or limit).
    """
    card = model.card
    if not _is_sha256(card.training_data_digest):
        raise DataError(
            f"model {card.version} has no training-data digest ({card.training_data_digest!r}; "
            f"notes: {card.notes!r}): INT8 calibration and the image-content gate use only the model's own "
            "training images, and a random or synthetic model has none. Use a model made by `trainer train`"
        )
    samples = load_samples(data) if isinstance(data, Path | str) else list(data)
    if limit is not None:
        samples = limit_per_class(samples, limit, seed=seed)
    fractions = card.metrics.get("split_fractions") or {}  # absent on cards before --val-fraction: 0.1
    splits = split_samples(
        samples,
        spec=card.preprocessing,
        seed=seed,
        val_fraction=float(fractions.get("val", 0.1)),
        test_fraction=float(fractions.get("test", 0.1)),
    )
    digest = splits.digest()
    if digest != card.training_data_digest:
        raise DataError(
            f"the split of the data given (digest {digest[:12]}, {len(samples)} images, seed {seed}"
            f"{f', limit {limit}' if limit is not None else ''}) is not the one model {card.version} was "
            f"trained on (card digest {card.training_data_digest[:12]}): give the same --data, --seed and "
            "--limit as `trainer train`, so that only training images are used"
        )
    return splits


def model_splits(
    model: LoadedModel, data: Sequence[Sample] | Path | str, *, seed: int = 0, limit: int | None = None
) -> tuple[list[Sample], list[Sample]]:
    """``(training split, evaluation split)`` of ``data`` exactly as ``trainer train`` split it
    (:func:`model_split`), for INT8 calibration and its gate. Raises :class:`DataError` as
    :func:`model_split` does, and when either split is empty.
    """
    splits = model_split(model, data, seed=seed, limit=limit)
    if not splits.train or not splits.test:
        raise DataError(
            f"the split has {len(splits.train)} training and {len(splits.test)} evaluation images: "
            "both are needed to calibrate and to prove INT8 accuracy"
        )
    return splits.train, splits.test


def calibration_samples(train: Sequence[Sample], count: int, seed: int) -> list[Sample]:
    """``count`` training images drawn reproducibly, classes taking turns (so a small class is not
    crowded out); all of them when there are fewer. Raises ``ValueError`` for ``count`` < 1."""
    if count < 1:
        raise ValueError(f"calibration image count {count!r} must be at least 1")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[Sample]] = {}
    for sample in sorted(train, key=lambda s: (s.key, str(s.path))):
        by_label.setdefault(sample.label, []).append(sample)
    queues = [
        [group[i] for i in rng.permutation(len(group)).tolist()] for _, group in sorted(by_label.items())
    ]
    chosen: list[Sample] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def samples_digest(samples: Sequence[Sample]) -> str:
    """sha256 (hex) of the sorted ``key, label`` lines of ``samples``."""
    lines = sorted(f"{s.key}\t{s.label}" for s in samples)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _load(sample: Sample, spec: PreprocessSpec) -> FloatArray:
    try:
        return preprocess_file(sample.path, spec, _MAX_PIXELS)
    except (ImagingError, OSError) as exc:
        raise DataError(f"cannot preprocess {sample.path}: {exc}") from exc


# --- quantisation ------------------------------------------------------------------------------------


def head_nodes(path: Path) -> list[str]:
    """Names of the nodes after the global average pools (the classifier heads, softmaxes and fusion) and
    of the image-content gate (``/novelty_gate/``).

    They stay FP32. Quantised, the output probabilities would be rounded to steps of about 1/255 and the
    logits to 8 bits, which flips the label of images whose two top classes are close (on the quick
    cxr3 model: 6 of 361 held-out labels) while saving almost nothing: the convolutions are the cost.
    Raises :class:`ModelError` when a head node has no name (the quantiser selects nodes by name).
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier = [out for node in graph.node if node.op_type == "GlobalAveragePool" for out in node.output]
    seen: dict[int, Any] = {}
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if id(node) not in seen:
                seen[id(node)] = node
                frontier.extend(node.output)
    # The image-content gate's view check reads the input image, not the pools: its nodes stay FP32 too.
    for node in graph.node:
        if "novelty_gate" in node.name:
            seen[id(node)] = node
    names = [node.name for node in seen.values()]
    if not all(names):
        raise ModelError(f"{path}: a node after the global average pool has no name; re-export the model")
    return sorted(set(names))


def lung_crop_nodes(path: Path) -> list[str]:
    """Names of the lung crop's nodes (:mod:`screener.model.lungs`): every node the ``GridSample`` depends on,
    and the ``GridSample`` itself; empty for a model without a lung crop. They stay FP32: quantised, the
    U-Net's mask (and so the crop box) would move, and they cost a few percent of the graph.
    Raises :class:`ModelError` when such a node has no name."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    frontier = [node for node in graph.node if node.op_type == "GridSample"]
    seen: dict[int, Any] = {}
    while frontier:
        node = frontier.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        frontier.extend(producer[name] for name in node.input if name in producer)
    names = [node.name for node in seen.values()]
    if not all(names):
        raise ModelError(f"{path}: a node of the lung crop has no name; re-export the model")
    return sorted(names)


def early_nodes(path: Path, stages: int) -> list[str]:
    """Names of the nodes of the stem and the first ``stages`` ResNet stages of every network in ``path``.

    Found by resolution, not by name: a ResNet's stem ends in a max pool, stage 1 runs at the pool's
    resolution and every later stage halves it. So the nodes kept are those whose 4-D output is at least
    as large (height x width) as the first max pool's output divided by ``4 ** (stages - 1)``; with
    ``stages`` 0, none. They are the layers whose quantisation moves the output most (see
    :data:`DEFAULT_FP32_STAGES`). Needs the shapes written by ONNX shape inference (``quant_pre_process``).
    Raises :class:`ModelError` when the graph has no max pool or its output size is unknown.
    """
    if stages <= 0:
        return []
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    sizes: dict[str, int] = {}
    for value in [*graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
            sizes[value.name] = dims[2].dim_value * dims[3].dim_value
    crop = set(lung_crop_nodes(path))  # the lung crop's U-Net pools are not a ResNet stem
    pools = [node for node in graph.node if node.op_type == "MaxPool" and node.name not in crop]
    if not pools or pools[0].output[0] not in sizes:
        raise ModelError(
            f"{path}: no max pool with a known output size, so the ResNet stem and stages to keep in FP32 "
            "cannot be found; quantise with --fp32-stages 0"
        )
    smallest = sizes[pools[0].output[0]] // 4 ** (stages - 1)
    names = [
        node.name
        for node in graph.node
        if node.name not in crop and sizes.get(node.output[0] if node.output else "", 0) >= smallest
    ]
    if not all(names):
        raise ModelError(f"{path}: a node of the stem or an early stage has no name; re-export the model")
    return names


def quantize_graph(
    src: Path,
    dst: Path,
    samples: Sequence[Sample],
    spec: PreprocessSpec,
    settings: QuantSettings,
    *,
    bar: Progress | None = None,
) -> list[str]:
    """Write the statically quantised QDQ graph of ``src`` to ``dst``, calibrated on ``samples``; return
    the names of the stem and early-stage nodes kept in FP32 (``settings.fp32_stages``, :func:`early_nodes`).

    The images are real files read with the serving preprocessing (``spec``); there is no way to feed
    arrays, so random or synthetic calibration data cannot reach it. The graph is first prepared with
    ONNX Runtime's ``quant_pre_process`` (shape inference and basic optimisation), as its guide advises.
    Raises :class:`DataError` for an unreadable image and :class:`ModelError` when ONNX Runtime fails.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not samples:
        raise DataError("no calibration images")
    settings.validate()

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.position = 0

        def get_next(self) -> dict[str, FloatArray] | None:
            if self.position >= len(samples):
                return None
            chunk = samples[self.position : self.position + _CALIBRATION_BATCH]
            self.position += len(chunk)
            batch = np.stack([_load(s, spec) for s in chunk]).astype(np.float32)
            if bar is not None:
                for _ in chunk:
                    bar.step("calibrating")
            return {"image": batch}

    activation = QuantType.QInt8 if settings.activations == "int8" else QuantType.QUInt8
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=dst.parent) as work:
        prepared = Path(work) / "prepared.onnx"
        try:
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            head = head_nodes(prepared) + lung_crop_nodes(prepared)
            early = early_nodes(prepared, settings.fp32_stages)
            quantize_static(
                str(prepared),
                str(dst),
                _Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=settings.reduce_range,
                activation_type=activation,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=head + early,
                extra_options={
                    "ActivationSymmetric": settings.activations == "int8",
                    "WeightSymmetric": True,
                    # No CalibMaxIntermediateOutputs: in this ONNX Runtime it drops the collected ranges
                    # instead of merging them (onnxruntime issue 18893); the augmented calibration graph
                    # only outputs per-tensor ReduceMin/ReduceMax, so keeping every batch costs little.
                },
            )
        except DataError:
            raise
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelError(f"ONNX Runtime could not quantise {src}: {exc}") from exc
    return early


def _infer_all(engine: Any, arrays: FloatArray, bar: Progress | None, label: str) -> FloatArray:
    out: list[FloatArray] = []
    for start in range(0, len(arrays), _BATCH):
        out.append(engine.infer(arrays[start : start + _BATCH]).probs)
        if bar is not None:
            bar.step(label)
    return np.concatenate(out).astype(np.float32)


def _write_card(model_dir: Path, card: ModelCard) -> None:
    tmp = model_dir / f".{CARD_FILE}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.write_text(card.to_json(), encoding="utf-8")
        fsync_path(tmp)
        tmp.replace(model_dir / CARD_FILE)
        fsync_path(model_dir)
    finally:
        tmp.unlink(missing_ok=True)


def _quantize_and_run(
    model: LoadedModel,
    tmp: Path,
    calibration: Sequence[Sample],
    evaluation: Sequence[Sample],
    settings: QuantSettings,
    threads: int,
    bar: Progress | None,
) -> tuple[FloatArray, FloatArray, list[str]]:
    """Quantise to ``tmp``, then run the evaluation images through FP32 and ``tmp``:
    ``(fp32, int8, early nodes kept FP32)``."""
    from screener.model.engine.onnx_backend import OnnxRuntimeEngine

    spec = model.card.preprocessing
    early = quantize_graph(model.onnx_path, tmp, calibration, spec, settings, bar=bar)
    arrays: list[FloatArray] = []
    for sample in evaluation:
        arrays.append(_load(sample, spec))
        if bar is not None:
            bar.step("preprocessing evaluation split")
    images = np.stack(arrays).astype(np.float32)
    fp32_engine = OnnxRuntimeEngine(model, threads=threads, precision="fp32")
    probs_fp32 = _infer_all(fp32_engine, images, bar, "FP32")
    fp32_engine.close()
    int8_engine = OnnxRuntimeEngine(model, threads=threads, precision="int8", graph=tmp)
    probs_int8 = _infer_all(int8_engine, images, bar, "INT8")
    int8_engine.close()
    return probs_fp32, probs_int8, early


def export_int8(
    model_dir: Path,
    data: Sequence[Sample] | Path | str,
    *,
    seed: int = 0,
    limit: int | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    gate: GateThresholds | None = None,
    settings: QuantSettings | None = None,
    replace: bool = False,
    threads: int = 0,
    progress: bool = True,
) -> Int8Outcome:
    """Quantise ``model_dir/model.onnx`` to ``model.int8.onnx``, prove it, and record both on the card.

    ``data``, ``seed`` and ``limit`` must reproduce the model's training split (:func:`model_splits`).
    ``calibration_images`` training images calibrate the activation ranges; the whole evaluation split
    is run through both graphs (ONNX Runtime on CPU) and held to ``gate``. The INT8 file and the card's
    ``int8`` section are written whether or not the gate passed (the figures are worth keeping); the
    screener serves INT8 only when ``passed``. The file is written under a temporary name, fsynced and
    renamed, then the card is replaced atomically, so readers always find a card that matches its files.
    With ``replace`` an existing INT8 model is replaced (the card first drops it).

    Raises:
        ModelError / ModelIntegrityError: the directory fails verification, already has an INT8 model
            (without ``replace``), or quantisation fails.
        DataError: the data does not reproduce the training split, or an image cannot be read.
        ValueError: bad ``calibration_images``, gate thresholds or ``settings.fp32_stages``.
    """
    gate = gate or GateThresholds()
    gate.validate()
    settings = settings or default_settings()
    settings.validate()
    model_dir = Path(model_dir)
    model = load_model_dir(model_dir)
    card = model.card
    if card.int8 is not None and not replace:
        raise ModelError(
            f"{model_dir / CARD_FILE} already has an INT8 model ({card.int8.summary()}): "
            "pass --replace to quantise again"
        )
    train, evaluation = model_splits(model, data, seed=seed, limit=limit)
    calibration = calibration_samples(train, calibration_images, seed)
    n_batches = math.ceil(len(evaluation) / _BATCH)
    log.info(
        "int8.start",
        version=card.version,
        calibration_images=len(calibration),
        eval_images=len(evaluation),
        settings=settings.as_dict(),
    )
    tmp = model_dir / f".{INT8_FILE}.tmp-{uuid.uuid4().hex}"
    bar = Progress(len(calibration) + len(evaluation) + 2 * n_batches) if progress else None
    try:
        with bar if bar is not None else contextlib.nullcontext():
            probs_fp32, probs_int8, early = _quantize_and_run(
                model, tmp, calibration, evaluation, settings, threads, bar
            )
        y = np.array([card.classes.index(s.label) for s in evaluation], dtype=np.int64)
        figures, passed, failures = gate_figures(
            y, probs_fp32, probs_int8, card.classes, dict(card.thresholds), gate
        )
        figures["failures"] = failures
        digest = sha256_file(tmp)
        int8 = Int8Card(
            file=INT8_FILE,
            sha256=digest,
            passed=passed,
            gate=figures,
            calibration={
                "count": len(calibration),
                "digest": samples_digest(calibration),
                "split": "train",
                "seed": seed,
                "limit": limit,
                "evaluation_split": "test",
            },
            quantization={**settings.as_dict(), "fp32_early_nodes": early},
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        if card.int8 is not None:  # replacing: first a card that no longer lists the old file
            files = {k: v for k, v in card.files.items() if k != INT8_FILE}
            _write_card(model_dir, dataclasses.replace(card, files=files, int8=None))
        new_card = dataclasses.replace(card, files={**card.files, INT8_FILE: digest}, int8=int8)
        new_card.validate()
        fsync_path(tmp)
        tmp.replace(model_dir / INT8_FILE)
        fsync_path(model_dir)
        _write_card(model_dir, new_card)
    finally:
        tmp.unlink(missing_ok=True)
        for leftover in model_dir.glob(".int8-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    log.info("int8.done", version=card.version, passed=passed, summary=int8.summary())
    return Int8Outcome(card=new_card, int8=int8, n_calibration=len(calibration), n_eval=len(evaluation))

"""The model card: one JSON file next to the weights that carries a model's whole contract.

A model directory holds ``card.json``, ``model.onnx`` (both networks and the fusion in one graph) and
``weights.safetensors``. The card records the version, the label map, the preprocessing the screener must
apply, the fusion weight, decision thresholds, validation metrics, the training-data digest, the parent
version and the sha256 of every file; :func:`load_model_dir` checks every one of those digests before any
byte is handed to an inference engine. Nothing here imports torch or onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from screener.core.errors import ModelError, ModelIntegrityError
from screener.imaging.pixels import PreprocessSpec
from screener.model.onnx_safety import check_model_onnx_files

CLASSES: tuple[str, ...] = ("normal", "covid19", "viral_pneumonia")
"""The paper's three classes, in model output order: the default label map of a new model, not a schema.
A served model's classes are its card's :attr:`ModelCard.classes`, described by :attr:`ModelCard.concepts`."""

RESERVED_LABELS: tuple[str, ...] = ("not_analysed", "indeterminate")
"""Verdicts that are not classes: no card may name a class so."""

CONCEPT_SCHEMES: tuple[str, ...] = ("SCT", "LN", "DCM", "RADLEX", "99CXRS")
"""Coding schemes a class concept may use: SNOMED CT, LOINC, DICOM, RadLex, and the screener's local scheme
(declared in every SR it writes)."""


@dataclass(frozen=True)
class ClassConcept:
    """One entry of the card's ``concepts`` section: what a class means, for the SR and for the verdict.

    ``code`` / ``scheme`` / ``meaning``: the coded finding written in the SR (SNOMED CT for the paper's
    three). ``finding``: true when the class flags the study (a positive to review); false for a class such
    as ``normal``. ``priority``: among finding classes that reach their operating point on one image, the
    lowest wins (COVID-19 before viral pneumonia); ties go to the class listed first. ``probability_code``:
    the local code (scheme ``99CXRS``) of the class's probability in the SR.
    """

    meaning: str
    code: str
    scheme: str
    finding: bool
    probability_code: str
    priority: int = 100

    def validate(self, name: str) -> None:
        """Check every field; raises :class:`ModelError` naming the offending key and value."""
        key = f"concepts.{name}"
        if not isinstance(self.meaning, str) or not 1 <= len(self.meaning) <= 64:
            raise _bad(f"{key}.meaning", self.meaning, "must be 1-64 characters (the code meaning, LO)")
        if not isinstance(self.code, str) or not _CODE_RE.match(self.code):
            raise _bad(
                f"{key}.code", self.code, "must be 1-16 letters, digits, '.', '-' or '_' (a code value)"
            )
        if self.scheme not in CONCEPT_SCHEMES:
            raise _bad(
                f"{key}.scheme", self.scheme, f"unknown coding scheme; known: {', '.join(CONCEPT_SCHEMES)}"
            )
        if not isinstance(self.finding, bool):
            raise _bad(f"{key}.finding", self.finding, "must be true (flags the study) or false")
        if not isinstance(self.probability_code, str) or not _CODE_RE.match(self.probability_code):
            raise _bad(
                f"{key}.probability_code", self.probability_code, "must be 1-16 letters, digits, '.', '-'"
            )
        if (
            isinstance(self.priority, bool)
            or not isinstance(self.priority, int)
            or not 0 <= self.priority <= 999
        ):
            raise _bad(f"{key}.priority", self.priority, "must be an integer between 0 and 999")


# SNOMED CT. For "normal" 17621005 "Normal" rather than 281900007 "No abnormality detected": 17621005 is the
# value DICOM's own context groups use for a normal result (CID 222 "Normal-Abnormal", CID 242 ...), so PACS
# and viewers recognise it, and the model's "normal" class means "none of the model's findings", which does
# not warrant claiming no abnormality of any kind. 427359005 "Solitary nodule of lung" is what the JSRT
# database's nodule cases show.
DEFAULT_CONCEPTS: dict[str, ClassConcept] = {
    "normal": ClassConcept("Normal", "17621005", "SCT", False, "CXRS-P-NORMAL", 100),
    "covid19": ClassConcept("COVID-19", "840539006", "SCT", True, "CXRS-P-COVID19", 10),
    "viral_pneumonia": ClassConcept("Viral pneumonia", "75570004", "SCT", True, "CXRS-P-VIRALPNEU", 20),
    "bacterial_pneumonia": ClassConcept(
        "Bacterial pneumonia", "53084003", "SCT", True, "CXRS-P-BACTPNEU", 30
    ),
    "lung_nodule": ClassConcept("Solitary nodule of lung", "427359005", "SCT", True, "CXRS-P-NODULE", 40),
}
"""Concepts a card need not spell out: a class of one of these names takes this entry unless the card's
``concepts`` section gives its own."""

ARCHITECTURE_NAMES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
"""Backbones a card may name; ``screener.model.fused.ARCHITECTURES`` maps each to its factory."""

CARD_FILE = "card.json"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
INT8_FILE = "model.int8.onnx"
REQUIRED_FILES: tuple[str, ...] = (ONNX_FILE, WEIGHTS_FILE)
INT8_GATE_FIGURES: tuple[str, ...] = (
    "n",
    "label_agreement",
    "macro_f1_fp32",
    "macro_f1_int8",
    "macro_f1_drop",
    "covid19_sensitivity_fp32",
    "covid19_sensitivity_int8",
    "covid19_sensitivity_drop",
)
"""Figures every ``int8.gate`` records (see :class:`Int8Card`)."""

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CLASS_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_CODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,15}$")
_CHUNK = 1 << 20


def _bad(key: str, value: object, problem: str) -> ModelError:
    return ModelError(f"model card {key} = {value!r}: {problem}")


@dataclass(frozen=True)
class Int8Card:
    """The card's ``int8`` section: a statically quantised copy of ``model.onnx`` and proof of its accuracy.

    ``sha256`` must equal the card's ``files[file]`` entry, so the INT8 graph is verified like every other
    file. ``calibration`` records how the quantisation ranges were found (``count`` training-split images,
    their ``digest``, the ``split`` they came from, ``seed``); ``quantization`` the ONNX Runtime settings;
    ``gate`` the INT8-versus-FP32 figures on the evaluation split (:data:`INT8_GATE_FIGURES`, each drop
    FP32 minus INT8) and the ``thresholds`` they were held to; ``passed`` whether every threshold was
    met. The screener serves INT8 only when ``passed`` is true.
    """

    file: str
    sha256: str
    passed: bool
    gate: dict[str, Any]
    calibration: dict[str, Any]
    quantization: dict[str, Any]
    created_at: str

    def validate(self) -> None:
        """Check every field; raises :class:`ModelError` naming the offending key and value."""
        if self.file != INT8_FILE:
            raise _bad("int8.file", self.file, f"must be {INT8_FILE}")
        if not isinstance(self.sha256, str) or not _SHA256_RE.match(self.sha256):
            raise _bad("int8.sha256", self.sha256, "must be a lower-case hex sha256 digest")
        if not isinstance(self.passed, bool):
            raise _bad("int8.passed", self.passed, "must be true or false")
        for key in INT8_GATE_FIGURES:
            value = self.gate.get(key)
            if key == "n":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise _bad("int8.gate.n", value, "must be the number of evaluated images")
            elif value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            ):
                raise _bad(f"int8.gate.{key}", value, "must be a finite number or null")
        if not isinstance(self.gate.get("thresholds"), dict):
            raise _bad("int8.gate.thresholds", self.gate.get("thresholds"), "must be an object")
        count = self.calibration.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise _bad("int8.calibration.count", count, "must be a positive number of images")
        digest = self.calibration.get("digest")
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise _bad("int8.calibration.digest", digest, "must be a lower-case hex sha256 digest")
        try:
            datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError):
            raise _bad("int8.created_at", self.created_at, "must be an ISO 8601 timestamp") from None

    def summary(self) -> str:
        """The gate figures in one line, for log lines and error messages."""
        g = self.gate

        def pct(key: str) -> str:
            value = g.get(key)
            return f"{100 * value:.1f}%" if isinstance(value, int | float) else "n/a"

        def drop(key: str) -> str:
            value = g.get(key)
            return f"{value:+.4f}" if isinstance(value, int | float) else "n/a"

        verdict = "passed" if self.passed else "FAILED"
        return (
            f"INT8 gate {verdict} on n={g.get('n')}: label agreement {pct('label_agreement')}, "
            f"macro-F1 {pct('macro_f1_fp32')} -> {pct('macro_f1_int8')} (drop {drop('macro_f1_drop')}), "
            f"COVID-19 sensitivity {pct('covid19_sensitivity_fp32')} -> {pct('covid19_sensitivity_int8')} "
            f"(drop {drop('covid19_sensitivity_drop')})"
        )


@dataclass(frozen=True)
class LungCropSpec:
    """The card's ``lung_crop`` section: the lung-field crop inside ``model.onnx`` (see
    :mod:`screener.model.lungs`). The graph's input stays ``input_size``; the lungs are found on a
    ``seg_size`` copy, their box widened by ``margin`` of its size on each side and resampled to
    ``crop_size``, the backbones' input. The whole image is used where less than ``min_fraction`` of it
    is lung, or the box is narrower or lower than ``min_side`` of the image; a row or column belongs to the
    box when at least ``min_line`` of it is lung. ``segmenter`` records how the U-Net was trained and how
    well it did (Dice on held-out masks, the share of images where it found no lungs)."""

    seg_size: int = 128
    crop_size: int = 128
    margin: float = 0.05
    min_fraction: float = 0.08
    min_side: float = 0.3
    min_line: float = 0.02
    base_channels: int = 8
    segmenter: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check every field; raises :class:`ModelError` naming the offending key and value."""
        for key in ("seg_size", "crop_size", "base_channels"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= 4096:
                raise _bad(f"lung_crop.{key}", value, "must be an integer between 8 and 4096")
        if self.seg_size % 8:
            raise _bad("lung_crop.seg_size", self.seg_size, "must be a multiple of 8 (three 2x poolings)")
        for key, upper in (("margin", 0.5), ("min_fraction", 1.0), ("min_side", 1.0), ("min_line", 1.0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < upper:
                raise _bad(f"lung_crop.{key}", value, f"must be a number in [0, {upper})")
        if not isinstance(self.segmenter, dict):
            raise _bad("lung_crop.segmenter", self.segmenter, "must be an object")


GATE_METHODS: tuple[str, ...] = ("mahalanobis", "mahalanobis+view", "mahalanobis+view+consistency")
"""Novelty scores the card's ``gate`` may name (the graph computes it; see :mod:`screener.model.novelty`)."""


@dataclass(frozen=True)
class GateSpec:
    """The card's ``gate`` section: the image-content gate computed inside ``model.onnx``.

    The graph's extra output ``novelty`` [N] is the squared Mahalanobis distance (tied covariance,
    smallest over the classes) of the two networks' concatenated pooled features from the training
    split's class means (:mod:`screener.model.novelty`); with method ``mahalanobis+view`` it is raised to
    the view check's scaled "not a frontal chest" probability where that is higher (same units, same
    threshold), and with ``mahalanobis+view+consistency`` that probability also counts the input's turned
    and inverted copies looking upright; the means, the whitening matrix and the view check's weights are
    buffers in ``weights.safetensors``, so the card's sha256 list covers them. An image whose novelty exceeds
    ``threshold`` (or is not a finite number) is not classified: it is skipped with :meth:`reason`.
    ``feature_dims`` are the two networks' feature sizes; ``fitted_on`` says which images the statistics
    came from (split, counts per class, digest, shrinkage); ``validation`` how the threshold was chosen
    (the share of validation images that pass); ``checks`` the scores of real non-chest radiographs and
    transformed chests at fitting time; ``alternatives`` the other scores measured beside it (energy).
    """

    method: str
    threshold: float
    feature_dims: tuple[int, int]
    fitted_on: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    alternatives: dict[str, Any] = field(default_factory=dict)
    borderline: float | None = None

    @property
    def feature_size(self) -> int:
        """Length of the concatenated feature vector the gate scores."""
        return int(self.feature_dims[0]) + int(self.feature_dims[1])

    def validate(self) -> None:
        """Check every field; raises :class:`ModelError` naming the offending key and value."""
        if self.method not in GATE_METHODS:
            raise _bad("gate.method", self.method, f"unknown method; known: {', '.join(GATE_METHODS)}")
        value = self.threshold
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _bad("gate.threshold", value, "must be a finite number")
        if value <= 0:
            raise _bad("gate.threshold", value, "must be > 0 (a squared distance)")
        if not isinstance(self.feature_dims, tuple) or len(self.feature_dims) != 2:
            raise _bad("gate.feature_dims", self.feature_dims, "must list the two networks' feature sizes")
        for dim in self.feature_dims:
            if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 65536:
                raise _bad("gate.feature_dims", self.feature_dims, "must be two integers between 1 and 65536")
        for key in ("fitted_on", "validation", "checks", "alternatives"):
            if not isinstance(getattr(self, key), dict):
                raise _bad(f"gate.{key}", getattr(self, key), "must be an object")
        edge = self.borderline
        if edge is not None and (
            isinstance(edge, bool) or not isinstance(edge, int | float) or not 0 < edge < self.threshold
        ):
            raise _bad(
                "gate.borderline", edge, f"must be null or a number in (0, threshold {self.threshold})"
            )

    def is_borderline(self, novelty: float | None) -> bool:
        """True when an image the gate lets through lies in its borderline band (``borderline`` <
        novelty <= ``threshold``): classified, but its verdict is ``indeterminate``."""
        if novelty is None or self.borderline is None or self.refuses(novelty):
            return False
        return novelty > self.borderline

    def borderline_reason(self, novelty: float) -> str:
        """Why an image in the borderline band gets no label: names the score and the band."""
        return (
            f"image-content gate borderline: novelty {novelty:.1f} in ({self.borderline:.1f}, "
            f"{self.threshold:.1f}]: too unlike the training images for a confident label"
        )

    def refuses(self, novelty: float | None) -> bool:
        """True when an image with this novelty score must not be classified (NaN included)."""
        if novelty is None:
            return False
        return not (math.isfinite(novelty) and novelty <= self.threshold)

    def reason(self, novelty: float) -> str:
        """The ``skipped`` reason for an image the gate refuses: names the score and the threshold."""
        return (
            f"image-content gate: novelty {novelty:.1f} > threshold {self.threshold:.1f}: not like the "
            "frontal chest radiographs the model was trained on"
        )


HEATMAP_METHODS: tuple[str, ...] = ("cam",)
"""How the graph's ``heatmap`` output may be computed (see :mod:`screener.model.cam`)."""


@dataclass(frozen=True)
class HeatmapSpec:
    """The card's ``heatmap`` section: the graph's extra output ``heatmap`` ``[N, size, size]`` float32.

    ``method`` ``cam``: the class activation map (Zhou et al. 2016) of the fused prediction's class from
    each network's last convolutional features, each scaled to a maximum of 1 and mixed with the fusion
    weight, mapped back from the lung crop (where the graph has one) to the whole network input, values in
    [0, 1]. The map covers the letterboxed ``input_size`` square the networks were given. Cards without
    the section (older models) have no ``heatmap`` output and are served as before.
    """

    method: str = "cam"
    size: int = 64

    def validate(self) -> None:
        """Check every field; raises :class:`ModelError` naming the offending key and value."""
        if self.method not in HEATMAP_METHODS:
            raise _bad("heatmap.method", self.method, f"unknown method; known: {', '.join(HEATMAP_METHODS)}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 8 <= self.size <= 1024:
            raise _bad("heatmap.size", self.size, "must be an integer between 8 and 1024")


TEMPERATURE_KEYS: tuple[str, ...] = ("temperature_a", "temperature_b", "fused_temperature")
"""Keys of the card's ``calibration`` section that hold one temperature (1 where absent): each network's,
and the fused output's."""
VECTOR_KEYS: tuple[str, ...] = ("vector_scale", "vector_bias")
"""Keys of the card's ``calibration`` section that hold one number per class: vector scaling of the fused
output (Guo et al., ICML 2017), ``softmax(vector_scale * log(probs) + vector_bias)``."""
CALIBRATION_KEYS: tuple[str, ...] = TEMPERATURE_KEYS + VECTOR_KEYS
_VECTOR_LIMIT = 100.0


@dataclass(frozen=True)
class OutputCalibration:
    """The step the graph applies to the fused probabilities: ``softmax(scale * log(probs) + bias)``, one
    ``scale`` and ``bias`` per class. A fused temperature ``T`` is ``scale = 1 / T``, ``bias = 0``."""

    scale: tuple[float, ...]
    bias: tuple[float, ...]

    @classmethod
    def of(cls, calibration: dict[str, Any], num_classes: int) -> OutputCalibration | None:
        """The output step a card's ``calibration`` section describes, or None (no step). Raises
        :class:`ModelError` when the section holds both a fused temperature and vector scaling, only one
        of the two vectors, or vectors of the wrong length or with impossible values."""
        temperature = calibration.get("fused_temperature")
        vectors = [calibration.get(key) for key in VECTOR_KEYS]
        if temperature is not None and any(v is not None for v in vectors):
            raise _bad("calibration", sorted(calibration), "holds fused_temperature and vector scaling: one")
        if temperature is not None:
            if float(temperature) == 1.0:
                return None
            return cls((1.0 / float(temperature),) * num_classes, (0.0,) * num_classes)
        if all(v is None for v in vectors):
            return None
        for key, value in zip(VECTOR_KEYS, vectors, strict=True):
            if not isinstance(value, list) or len(value) != num_classes:
                raise _bad(f"calibration.{key}", value, f"must list one number per class ({num_classes})")
            for x in value:
                if isinstance(x, bool) or not isinstance(x, int | float) or not abs(x) <= _VECTOR_LIMIT:
                    raise _bad(
                        f"calibration.{key}", value, f"must hold numbers between -100 and 100, not {x!r}"
                    )
        scale, bias = (tuple(float(x) for x in v) for v in vectors if isinstance(v, list))
        return cls(scale, bias)

    def card_keys(self) -> dict[str, Any]:
        """The card's ``calibration`` keys for this step: ``fused_temperature`` where it is one (equal
        scales, no bias), else ``vector_scale`` and ``vector_bias``."""
        if len(set(self.scale)) == 1 and not any(self.bias) and self.scale[0] > 0:
            return {"fused_temperature": round(1.0 / self.scale[0], 6)}
        return {
            "vector_scale": [round(x, 6) for x in self.scale],
            "vector_bias": [round(x, 6) for x in self.bias],
        }


def network_temperatures(calibration: dict[str, Any]) -> tuple[float, float]:
    """``(T_a, T_b)`` of a card's ``calibration`` section (1 where a key is absent)."""
    return float(calibration.get("temperature_a", 1.0)), float(calibration.get("temperature_b", 1.0))


def calibration_section(temperatures: tuple[float, float], step: OutputCalibration | None) -> dict[str, Any]:
    """The card's ``calibration`` section for these network temperatures and output step: both
    temperatures where either is not 1, then the step's keys (:meth:`OutputCalibration.card_keys`)."""
    ta, tb = temperatures
    section: dict[str, Any] = (
        {"temperature_a": round(ta, 6), "temperature_b": round(tb, 6)} if (ta, tb) != (1.0, 1.0) else {}
    )
    if step is not None:
        section.update(step.card_keys())
    return section


@dataclass(frozen=True)
class ModelCard:
    """What a model promises: label map, preprocessing, fusion, thresholds, provenance and file digests.

    ``classes`` name the graph's outputs in order; ``concepts`` describe them (:class:`ClassConcept`: SR
    code, finding or not, priority; :data:`DEFAULT_CONCEPTS` fill in the known ones). ``thresholds`` maps a
    class to its operating point on its fused probability (:func:`screener.model.verdict.decide`: where no
    class reaches its own, the label is ``indeterminate``); an empty mapping means "argmax". ``files``
    maps each file name in the model directory to its sha256 (lower-case hex).
    ``calibration`` holds each network's softmax temperature and the step on the fused output (a
    temperature or vector scaling: :class:`OutputCalibration`; fitted on validation data, built into the
    graph), ``lung_crop`` the lung-field crop the graph applies first (None: the whole
    image), and ``sources`` the class x source counts of the training data, ``gate`` the image-content gate
    the graph computes (None: the graph has no ``novelty`` output and every image is classified).
    Construct through :meth:`from_json` or call :meth:`validate`; :meth:`to_json` validates first.
    """

    version: str
    classes: tuple[str, ...]
    architectures: tuple[str, str]
    input_size: int
    preprocessing: PreprocessSpec
    fusion_weight: float
    created_at: str
    files: dict[str, str]
    opset: int
    thresholds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training_data_digest: str = ""
    parent_version: str | None = None
    notes: str = ""
    int8: Int8Card | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    lung_crop: LungCropSpec | None = None
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    gate: GateSpec | None = None
    concepts: dict[str, ClassConcept] = field(default_factory=dict)
    heatmap: HeatmapSpec | None = None

    def concept(self, name: str) -> ClassConcept:
        """The concept of class ``name``: the card's own entry, else :data:`DEFAULT_CONCEPTS`.

        Raises :class:`ModelError` for a name the card does not list or that has no concept."""
        if name not in self.classes:
            raise _bad("classes", name, f"is not a class of model {self.version} ({', '.join(self.classes)})")
        found = self.concepts.get(name) or DEFAULT_CONCEPTS.get(name)
        if found is None:
            raise _bad(f"concepts.{name}", None, "is required: the class has no default concept")
        return found

    def resolved_concepts(self) -> dict[str, ClassConcept]:
        """Every class's concept, in output order (defaults filled in)."""
        return {name: self.concept(name) for name in self.classes}

    @property
    def findings(self) -> tuple[str, ...]:
        """The classes that flag a study, most urgent first (priority, then output order)."""
        order = {name: n for n, name in enumerate(self.classes)}
        flagged = [name for name in self.classes if self.concept(name).finding]
        return tuple(sorted(flagged, key=lambda c: (self.concept(c).priority, order[c])))

    def temperature(self, which: str) -> float:
        """The softmax temperature of network ``"a"`` or ``"b"`` (1.0: uncalibrated)."""
        return float(self.calibration.get(f"temperature_{which}", 1.0))

    def output_calibration(self) -> OutputCalibration | None:
        """The step the graph applies to the fused probabilities (None: none). Raises :class:`ModelError`
        for an impossible ``calibration`` section."""
        return OutputCalibration.of(self.calibration, len(self.classes))

    def validate(self) -> None:
        """Check every field; raises :class:`ModelError` naming the offending key and value."""
        if not isinstance(self.version, str) or not _VERSION_RE.match(self.version):
            raise _bad(
                "version", self.version, "must be 1-64 characters of letters, digits, '.', '_', '+', '-'"
            )
        self._validate_classes()
        if not isinstance(self.architectures, tuple) or len(self.architectures) != 2:
            raise _bad("architectures", self.architectures, "must name exactly two backbones")
        for arch in self.architectures:
            if arch not in ARCHITECTURE_NAMES:
                raise _bad("architectures", arch, f"unknown backbone; known: {', '.join(ARCHITECTURE_NAMES)}")
        if not isinstance(self.input_size, int) or isinstance(self.input_size, bool):
            raise _bad("input_size", self.input_size, "must be an integer")
        if not 32 <= self.input_size <= 4096:
            raise _bad("input_size", self.input_size, "must be between 32 and 4096 pixels")
        if self.preprocessing.input_size != self.input_size:
            raise _bad(
                "preprocessing.input_size",
                self.preprocessing.input_size,
                f"differs from input_size {self.input_size}",
            )
        weight = self.fusion_weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise _bad("fusion_weight", weight, "must be a finite number")
        if not 0.0 <= weight <= 1.0:
            raise _bad("fusion_weight", weight, "must be between 0 and 1")
        for cls, threshold in self.thresholds.items():
            if cls not in self.classes:
                raise _bad(f"thresholds.{cls}", threshold, "names a class the model does not output")
            if isinstance(threshold, bool) or not isinstance(threshold, int | float):
                raise _bad(f"thresholds.{cls}", threshold, "must be a number")
            if not 0.0 <= threshold <= 1.0:
                raise _bad(f"thresholds.{cls}", threshold, "must be between 0 and 1")
        try:
            datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError):
            raise _bad("created_at", self.created_at, "must be an ISO 8601 timestamp") from None
        if not isinstance(self.files, dict):
            raise _bad("files", self.files, "must map file names to sha256 digests")
        for name, digest in self.files.items():
            if not isinstance(name, str) or not _FILE_NAME_RE.match(name) or name == CARD_FILE:
                raise _bad("files", name, "must be a plain file name inside the model directory")
            if not isinstance(digest, str) or not _SHA256_RE.match(digest):
                raise _bad(f"files.{name}", digest, "must be a lower-case hex sha256 digest")
        for name in REQUIRED_FILES:
            if name not in self.files:
                raise _bad("files", sorted(self.files), f"must list {name}")
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not 7 <= self.opset <= 99:
            raise _bad("opset", self.opset, "must be an ONNX opset number")
        if not isinstance(self.metrics, dict):
            raise _bad("metrics", self.metrics, "must be an object")
        if not isinstance(self.training_data_digest, str):
            raise _bad("training_data_digest", self.training_data_digest, "must be a string")
        if self.parent_version is not None and not (
            isinstance(self.parent_version, str) and _VERSION_RE.match(self.parent_version)
        ):
            raise _bad("parent_version", self.parent_version, "must be null or a model version")
        if not isinstance(self.notes, str):
            raise _bad("notes", self.notes, "must be a string")
        if self.preprocessing.working_size < 0:
            raise _bad(
                "preprocessing.working_size", self.preprocessing.working_size, "must be 0 (off) or > 0"
            )
        if not isinstance(self.calibration, dict):
            raise _bad("calibration", self.calibration, "must be an object")
        for key, value in self.calibration.items():
            if key not in CALIBRATION_KEYS:
                raise _bad(f"calibration.{key}", value, f"unknown key; known: {', '.join(CALIBRATION_KEYS)}")
            if key in VECTOR_KEYS:
                continue  # checked as a whole below
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.05 <= value <= 20.0:
                raise _bad(f"calibration.{key}", value, "must be a temperature between 0.05 and 20")
        self.output_calibration()
        if self.lung_crop is not None:
            self.lung_crop.validate()
        if not isinstance(self.sources, dict):
            raise _bad("sources", self.sources, "must map source names to class counts")
        if self.gate is not None:
            self.gate.validate()
        if self.heatmap is not None:
            self.heatmap.validate()
        if self.int8 is not None:
            self.int8.validate()
            if self.files.get(INT8_FILE) != self.int8.sha256:
                raise _bad(
                    f"files.{INT8_FILE}", self.files.get(INT8_FILE), "must equal int8.sha256 (re-export INT8)"
                )
        elif INT8_FILE in self.files:
            raise _bad(
                f"files.{INT8_FILE}", self.files[INT8_FILE], "is listed but the card has no int8 section"
            )

    def _validate_classes(self) -> None:
        if not isinstance(self.classes, tuple) or len(self.classes) < 2:
            raise _bad("classes", self.classes, "must list at least two classes")
        for name in self.classes:
            if not isinstance(name, str) or not _CLASS_RE.match(name) or name in RESERVED_LABELS:
                raise _bad(
                    "classes",
                    name,
                    "must be 1-32 lower-case letters, digits or '_', starting with a letter, "
                    f"and not {' or '.join(RESERVED_LABELS)}",
                )
        if len(set(self.classes)) != len(self.classes):
            raise _bad("classes", self.classes, "lists a class twice")
        if not isinstance(self.concepts, dict):
            raise _bad("concepts", self.concepts, "must map class names to concepts")
        for name in self.classes:
            if name not in self.concepts and name not in DEFAULT_CONCEPTS:
                raise _bad(
                    "classes",
                    name,
                    "unknown class without a concept: give it an entry in the card's concepts section "
                    "(meaning, code, scheme, finding, probability_code)",
                )
        for name, concept in self.concepts.items():
            if name not in self.classes:
                raise _bad(f"concepts.{name}", name, "names a class the model does not output")
            concept.validate(name)
        concepts = self.resolved_concepts()  # raises for a class without a concept
        if not any(c.finding for c in concepts.values()):
            raise _bad("concepts", sorted(concepts), "no class is a finding: nothing could ever flag a study")
        codes = [c.probability_code for c in concepts.values()]
        if len(set(codes)) != len(codes):
            raise _bad("concepts", codes, "two classes share a probability_code")

    def to_json(self) -> str:
        """The card as indented, key-sorted JSON. Raises :class:`ModelError` if the card is invalid."""
        self.validate()
        data = asdict(self)
        # Cards without these sections stay as they were written before the sections existed.
        for optional in ("int8", "lung_crop", "gate", "heatmap"):
            if data[optional] is None:
                del data[optional]
        for optional in ("calibration", "sources", "concepts"):
            if not data[optional]:
                del data[optional]
        return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        """Parse and validate a card; raises :class:`ModelError` naming the bad key and value."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"model card is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _bad("<root>", type(data).__name__, "must be a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """Build and validate a card from parsed JSON; raises :class:`ModelError` on any bad key."""
        known = {f for f in cls.__dataclass_fields__}
        for key in data:
            if key not in known:
                raise _bad(key, data[key], "unknown key")
        required = {"version", "classes", "architectures", "input_size", "preprocessing", "fusion_weight"}
        required |= {"created_at", "files", "opset"}
        for key in sorted(required):
            if key not in data:
                raise _bad(key, None, "is required")
        card = cls(
            version=data["version"],
            classes=_as_tuple("classes", data["classes"]),
            architectures=_as_pair("architectures", data["architectures"]),
            input_size=data["input_size"],
            preprocessing=_preprocess_from_dict(data["preprocessing"]),
            fusion_weight=data["fusion_weight"],
            created_at=data["created_at"],
            files=_as_dict("files", data["files"]),
            opset=data["opset"],
            thresholds=_as_dict("thresholds", data.get("thresholds", {})),
            metrics=_as_dict("metrics", data.get("metrics", {})),
            training_data_digest=data.get("training_data_digest", ""),
            parent_version=data.get("parent_version"),
            notes=data.get("notes", ""),
            int8=_int8_from_dict(data["int8"]) if data.get("int8") is not None else None,
            calibration=_as_dict("calibration", data.get("calibration", {})),
            lung_crop=_lung_crop_from_dict(data["lung_crop"]) if data.get("lung_crop") is not None else None,
            sources=_as_dict("sources", data.get("sources", {})),
            gate=_gate_from_dict(data["gate"]) if data.get("gate") is not None else None,
            concepts=_concepts_from_dict(data.get("concepts", {})),
            heatmap=_heatmap_from_dict(data["heatmap"]) if data.get("heatmap") is not None else None,
        )
        card.validate()
        return card


def _as_tuple(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _bad(key, value, "must be a list of strings")
    return tuple(value)


def _as_pair(key: str, value: object) -> tuple[str, str]:
    items = _as_tuple(key, value)
    if len(items) != 2:
        raise _bad(key, value, "must name exactly two backbones")
    return items[0], items[1]


def _as_dict(key: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _bad(key, value, "must be a JSON object")
    return dict(value)


def _refuse_unknown_keys(section: str, data: dict[str, Any], fields: Collection[str]) -> None:
    for key in data:
        if key not in fields:
            raise _bad(f"{section}.{key}", data[key], "unknown key")


def _int8_from_dict(value: object) -> Int8Card:
    data = _as_dict("int8", value)
    fields = Int8Card.__dataclass_fields__
    _refuse_unknown_keys("int8", data, fields)
    for key in fields:
        if key not in data:
            raise _bad(f"int8.{key}", None, "is required")
    return Int8Card(
        file=data["file"],
        sha256=data["sha256"],
        passed=data["passed"],
        gate=_as_dict("int8.gate", data["gate"]),
        calibration=_as_dict("int8.calibration", data["calibration"]),
        quantization=_as_dict("int8.quantization", data["quantization"]),
        created_at=data["created_at"],
    )


def _concepts_from_dict(value: object) -> dict[str, ClassConcept]:
    data = _as_dict("concepts", value)
    fields = ClassConcept.__dataclass_fields__
    out: dict[str, ClassConcept] = {}
    for name, item in data.items():
        entry = _as_dict(f"concepts.{name}", item)
        _refuse_unknown_keys(f"concepts.{name}", entry, fields)
        for key in ("meaning", "code", "scheme", "finding", "probability_code"):
            if key not in entry:
                raise _bad(f"concepts.{name}.{key}", None, "is required")
        out[name] = ClassConcept(**entry)
    return out


def classes_of_json(card_json: str) -> tuple[str, ...]:
    """The ``classes`` of a card's JSON text as a registry row keeps it, without validating the rest (for
    reports over old or partial rows); the paper's three when the text names none."""
    try:
        data = json.loads(card_json)
    except ValueError:
        return CLASSES
    classes = data.get("classes") if isinstance(data, dict) else None
    if isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes):
        return tuple(classes)
    return CLASSES


def default_concepts(classes: Collection[str]) -> dict[str, ClassConcept]:
    """The :data:`DEFAULT_CONCEPTS` entries of ``classes`` (those with a default), for a new card."""
    return {name: DEFAULT_CONCEPTS[name] for name in classes if name in DEFAULT_CONCEPTS}


def _lung_crop_from_dict(value: object) -> LungCropSpec:
    data = _as_dict("lung_crop", value)
    _refuse_unknown_keys("lung_crop", data, LungCropSpec.__dataclass_fields__)
    try:
        spec = LungCropSpec(**data)
    except TypeError as exc:
        raise _bad("lung_crop", data, str(exc)) from None
    spec.validate()
    return spec


def _gate_from_dict(value: object) -> GateSpec:
    data = _as_dict("gate", value)
    _refuse_unknown_keys("gate", data, GateSpec.__dataclass_fields__)
    for key in ("method", "threshold", "feature_dims"):
        if key not in data:
            raise _bad(f"gate.{key}", None, "is required")
    dims = data["feature_dims"]
    if not isinstance(dims, list | tuple) or len(dims) != 2:
        raise _bad("gate.feature_dims", dims, "must list the two networks' feature sizes")
    spec = GateSpec(
        method=data["method"],
        threshold=data["threshold"],
        feature_dims=(dims[0], dims[1]),
        fitted_on=_as_dict("gate.fitted_on", data.get("fitted_on", {})),
        validation=_as_dict("gate.validation", data.get("validation", {})),
        checks=_as_dict("gate.checks", data.get("checks", {})),
        alternatives=_as_dict("gate.alternatives", data.get("alternatives", {})),
        borderline=data.get("borderline"),
    )
    spec.validate()
    return spec


def _heatmap_from_dict(value: object) -> HeatmapSpec:
    data = _as_dict("heatmap", value)
    _refuse_unknown_keys("heatmap", data, HeatmapSpec.__dataclass_fields__)
    spec = HeatmapSpec(**data)
    spec.validate()
    return spec


def _preprocess_from_dict(value: object) -> PreprocessSpec:
    data = _as_dict("preprocessing", value)
    _refuse_unknown_keys("preprocessing", data, PreprocessSpec.__dataclass_fields__)
    converted: dict[str, Any] = {}
    for key, item in data.items():
        if isinstance(item, list):
            if not all(isinstance(v, int | float | str) and not isinstance(v, bool) for v in item):
                raise _bad(f"preprocessing.{key}", item, "must be a list of numbers")
            converted[key] = tuple(float(v) if isinstance(v, int | float) else v for v in item)
        elif isinstance(item, int | float | str | bool):
            converted[key] = item
        else:
            raise _bad(f"preprocessing.{key}", item, "must be a number, string or list")
    try:
        return PreprocessSpec(**converted)
    except TypeError as exc:
        raise _bad("preprocessing", data, str(exc)) from None


def sha256_file(path: Path) -> str:
    """Lower-case hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    """A model directory whose card parsed and whose every listed file matched its sha256."""

    card: ModelCard
    path: Path

    @property
    def onnx_path(self) -> Path:
        """The single ONNX graph (both networks and the fusion)."""
        return self.path / ONNX_FILE

    @property
    def weights_path(self) -> Path:
        """The safetensors state dict of :class:`screener.model.fused.FusedResNet`."""
        return self.path / WEIGHTS_FILE

    @property
    def int8_path(self) -> Path:
        """The statically quantised graph (present only when the card has an ``int8`` section)."""
        return self.path / INT8_FILE

    @property
    def int8_passed(self) -> bool:
        """True when the card holds a verified INT8 graph whose accuracy gate passed."""
        return self.card.int8 is not None and self.card.int8.passed and INT8_FILE in self.card.files

    def sha256(self, name: str) -> str:
        """The verified digest of one file of the directory, as recorded on the card."""
        return self.card.files[name]


ModelDir = LoadedModel
"""Alias: a verified model directory."""


def read_card(model_dir: Path) -> ModelCard:
    """Parse ``card.json`` of ``model_dir`` without checking file digests.

    Raises :class:`ModelError` when the directory or its card is missing, unreadable or invalid.
    """
    if not model_dir.is_dir():
        raise ModelError(f"model directory {model_dir} does not exist or is not a directory")
    card_path = model_dir / CARD_FILE
    if not card_path.is_file():
        raise ModelError(
            f"no {CARD_FILE} in {model_dir}: not a model directory; "
            "create one with `trainer init-model` or `trainer export`"
        )
    try:
        text = card_path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {card_path}: {exc.strerror}") from None
    return ModelCard.from_json(text)


def load_model_dir(path: Path) -> LoadedModel:
    """Read the card and verify the sha256 of EVERY file it lists before returning.

    Raises :class:`ModelError` when the card or a listed file is missing or the card is invalid, and
    :class:`ModelIntegrityError` (naming the file) when a file's bytes differ from its recorded digest.
    """
    model_dir = Path(path)
    card = read_card(model_dir)
    for name, expected in sorted(card.files.items()):
        file_path = model_dir / name
        if not file_path.is_file():
            raise ModelError(
                f"{name} listed in {model_dir / CARD_FILE} is missing: restore it or re-export the model"
            )
        try:
            actual = sha256_file(file_path)
        except OSError as exc:
            raise ModelError(f"cannot read {file_path}: {exc.strerror}") from None
        if actual != expected:
            raise ModelIntegrityError(
                f"{name} sha256 {actual} != card {expected}: the file was changed or corrupted; "
                "restore it or re-export"
            )
    check_model_onnx_files(model_dir, card.files)  # external data must stay inside the directory
    return LoadedModel(card=card, path=model_dir)

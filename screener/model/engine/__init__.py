"""Inference engines: one :class:`Engine` protocol, four backends (onnxruntime, torch, tensorrt, triton).

Backends are imported only when chosen, so ``import screener.model.engine`` stays cheap and works without
torch's CUDA runtime, TensorRT or tritonclient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from screener.core.config import TritonConfig
from screener.core.errors import EngineUnavailableError, ModelError
from screener.core.logs import get_logger
from screener.model.engine.base import Engine, EngineOutput
from screener.model.modelcard import CARD_FILE, LoadedModel, load_model_dir

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt", "triton")
PRECISIONS = ("auto", "fp32", "int8")
DEFAULT_TRT_CACHE_DIR = Path("var/trt-cache")

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Engine",
    "EngineOutput",
    "available_backends",
    "choose_precision",
    "load_engine",
]

log = get_logger("screener.engine")


def _tensorrt_usable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    import torch

    return bool(torch.cuda.is_available())


def available_backends() -> list[str]:
    """Concrete backends that can run on this host, best first for a GPU host."""
    names = ["onnxruntime", "torch"]
    if _tensorrt_usable():
        names.insert(0, "tensorrt")
    return names


def _onnxruntime_on_gpu() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def choose_precision(
    model: LoadedModel, backend: str, precision: str, *, on_gpu: bool = False
) -> tuple[Literal["fp32", "int8"], str]:
    """``(precision to run, why)`` for a verified model on a concrete ``backend``.

    INT8 runs only on the onnxruntime CPU backend and only when the card's ``int8`` section says its
    accuracy gate passed (``model.int8.onnx`` was verified with every other file by
    :func:`~screener.model.modelcard.load_model_dir`). ``precision`` is ``auto`` (INT8 where allowed, else
    FP32), ``fp32`` or ``int8``; GPU backends (tensorrt, onnxruntime with ``on_gpu``) ignore INT8.
    Raises :class:`ModelError` when ``precision`` is ``int8`` and the card holds no passing INT8 model
    (the message names the card and its gate figures) or the backend is torch, which cannot run the
    INT8 graph, and :class:`EngineUnavailableError` for an unknown ``precision``.
    """
    if precision not in PRECISIONS:
        raise EngineUnavailableError(
            f"unknown inference precision {precision!r}: choose one of {', '.join(PRECISIONS)}"
        )
    card_path = model.path / CARD_FILE
    int8 = model.card.int8
    if precision == "fp32":
        return "fp32", "inference.precision is fp32"
    if backend == "triton":
        if precision == "int8":
            raise ModelError(
                "inference.precision = int8 does not apply to inference.backend = triton: Triton runs the "
                "graph exported to its repository; set inference.precision = auto or fp32"
            )
        return "fp32", "backend triton runs the graph exported to Triton's model repository"
    if backend == "tensorrt" or (backend == "onnxruntime" and on_gpu):
        return "fp32", f"backend {backend} runs on the GPU, where INT8 is not used"
    if precision == "int8" and backend != "onnxruntime":
        raise ModelError(
            f"inference.precision = int8 needs inference.backend = onnxruntime (or auto on a CPU host), "
            f"not {backend}: the INT8 graph is an ONNX Runtime model"
        )
    if int8 is None:
        reason = (
            f"{card_path} has no int8 section (create one with `trainer export MODEL_DIR --int8 --data ...`)"
        )
    elif not int8.passed:
        reason = f"{card_path}: {int8.summary()}"
    elif backend != "onnxruntime":
        return "fp32", f"backend {backend} does not run the INT8 graph"
    else:
        return "int8", f"{card_path}: {int8.summary()}"
    if precision == "int8":
        raise ModelError(
            f"inference.precision = int8 but model {model.card.version} has no INT8 graph that passed its "
            f"accuracy gate: {reason}; set inference.precision = auto or fp32, or export a passing INT8 model"
        )
    return "fp32", reason


def check_precision(model_dir: Path, backend: str, precision: str) -> tuple[str, str]:
    """Verify ``model_dir`` and resolve ``precision`` as :func:`load_engine` would, without opening it.

    For start-up checks (``screener serve`` with ``inference.precision = int8`` refuses to start when
    the active model has no passing INT8 graph). Returns ``(precision, why)``; raises as
    :func:`choose_precision` and :func:`~screener.model.modelcard.load_model_dir` do.
    """
    if backend not in BACKENDS:
        raise EngineUnavailableError(
            f"unknown inference backend {backend!r}: choose one of {', '.join(BACKENDS)}"
        )
    model = load_model_dir(Path(model_dir))
    concrete = ("tensorrt" if _tensorrt_usable() else "onnxruntime") if backend == "auto" else backend
    on_gpu = concrete == "onnxruntime" and precision != "fp32" and _onnxruntime_on_gpu()
    return choose_precision(model, concrete, precision, on_gpu=on_gpu)


def load_engine(
    model_dir: Path,
    backend: str,
    *,
    threads: int = 0,
    torch_compile: bool = False,
    trt_cache_dir: Path | None = None,
    max_batch: int = 64,
    precision: str = "fp32",
    triton: TritonConfig | None = None,
) -> tuple[Engine, LoadedModel]:
    """Verify ``model_dir`` (every file's sha256) and open it on ``backend``.

    ``auto`` picks tensorrt when the ``tensorrt`` package imports and a CUDA GPU is present, else
    onnxruntime. ``threads`` (0 = one per core) applies to CPU backends; ``trt_cache_dir`` defaults to
    ``var/trt-cache``. ``precision`` (``auto`` | ``fp32`` | ``int8``, the setting
    ``inference.precision``) is resolved by :func:`choose_precision`; the choice and its reason are
    logged in one ``engine.precision`` line. Raises :class:`~screener.core.errors.ModelError` /
    :class:`~screener.core.errors.ModelIntegrityError` for a bad model directory or an ``int8`` demand the
    card cannot meet, and :class:`~screener.core.errors.EngineUnavailableError` for an unknown backend or
    precision or a backend this host cannot run. ``triton`` (the ``inference.triton`` settings, defaults
    when None) is for the ``triton`` backend, which also verifies that Triton serves exactly this model
    (:class:`~screener.core.errors.ServedModelMismatchError`) and raises
    :class:`~screener.core.errors.RemoteEngineError` when Triton cannot be reached.
    """
    if backend not in BACKENDS:
        raise EngineUnavailableError(
            f"unknown inference backend {backend!r}: choose one of {', '.join(BACKENDS)}"
        )
    model = load_model_dir(Path(model_dir))
    if backend == "auto":
        backend = "tensorrt" if _tensorrt_usable() else "onnxruntime"
    on_gpu = backend == "onnxruntime" and precision != "fp32" and _onnxruntime_on_gpu()
    chosen, reason = choose_precision(model, backend, precision, on_gpu=on_gpu)
    log.info(
        "engine.precision",
        precision=chosen,
        reason=reason,
        backend=backend,
        setting=precision,
        version=model.card.version,
    )
    engine: Engine
    if backend == "onnxruntime":
        from screener.model.engine.onnx_backend import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine(model, threads=threads, precision=chosen)
    elif backend == "torch":
        from screener.model.engine.torch_backend import TorchEngine

        engine = TorchEngine(model, threads=threads, torch_compile=torch_compile, max_batch=max_batch)
    elif backend == "triton":
        from screener.model.engine.triton_backend import TritonEngine

        engine = TritonEngine(model, triton if triton is not None else TritonConfig(), max_batch=max_batch)
    else:
        from screener.model.engine.tensorrt_backend import TensorRTEngine

        cache = trt_cache_dir if trt_cache_dir is not None else DEFAULT_TRT_CACHE_DIR
        engine = TensorRTEngine(model, cache_dir=cache, max_batch=max_batch)
    return engine, model

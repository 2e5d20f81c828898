"""Inference engines: one :class:`Engine` protocol, three backends (onnxruntime, torch, tensorrt).

Backends are imported only when chosen, so ``import screener.engine`` stays cheap and works without
torch's CUDA runtime or TensorRT.
"""

from __future__ import annotations

from pathlib import Path

from screener.engine.base import Engine, EngineOutput
from screener.errors import EngineUnavailableError
from screener.modelcard import LoadedModel, load_model_dir

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")
DEFAULT_TRT_CACHE_DIR = Path("var/trt-cache")

__all__ = ["BACKENDS", "Engine", "EngineOutput", "available_backends", "load_engine"]


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


def load_engine(
    model_dir: Path,
    backend: str,
    *,
    threads: int = 0,
    torch_compile: bool = False,
    trt_cache_dir: Path | None = None,
    max_batch: int = 64,
) -> tuple[Engine, LoadedModel]:
    """Verify ``model_dir`` (every file's sha256) and open it on ``backend``.

    ``auto`` picks tensorrt when the ``tensorrt`` package imports and a CUDA GPU is present, else
    onnxruntime. ``threads`` (0 = one per core) applies to CPU backends; ``trt_cache_dir`` defaults to
    ``var/trt-cache``. Raises :class:`~screener.errors.ModelError` /
    :class:`~screener.errors.ModelIntegrityError` for a bad model directory and
    :class:`~screener.errors.EngineUnavailableError` for an unknown backend or one this host cannot run.
    """
    if backend not in BACKENDS:
        raise EngineUnavailableError(
            f"unknown inference backend {backend!r}: choose one of {', '.join(BACKENDS)}"
        )
    model = load_model_dir(Path(model_dir))
    if backend == "auto":
        backend = "tensorrt" if _tensorrt_usable() else "onnxruntime"
    engine: Engine
    if backend == "onnxruntime":
        from screener.engine.onnx_backend import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine(model, threads=threads)
    elif backend == "torch":
        from screener.engine.torch_backend import TorchEngine

        engine = TorchEngine(model, threads=threads, torch_compile=torch_compile)
    else:
        from screener.engine.tensorrt_backend import TensorRTEngine

        cache = trt_cache_dir if trt_cache_dir is not None else DEFAULT_TRT_CACHE_DIR
        engine = TensorRTEngine(model, cache_dir=cache, max_batch=max_batch)
    return engine, model

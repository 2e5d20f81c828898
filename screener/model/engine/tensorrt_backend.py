"""TensorRT backend: an FP16 engine built from ``model.onnx`` on this GPU and cached on disk.

The serialized plan is only valid for one GPU model, TensorRT version and graph, so it is cached under
``trt_cache_dir`` in a file named by the sha256 of (GPU name, compute capability, TensorRT version, ONNX
sha256, input size, batch profile, precision). A sidecar JSON records those fields and the plan's own
sha256, which is checked before the plan is deserialized; a mismatch rebuilds the plan. I/O buffers are
torch CUDA tensors allocated once for the largest batch, fed from pinned host buffers with asynchronous
copies, and inference runs on a private torch CUDA stream (TensorRT 10 tensor-address API).
``tensorrt`` is imported lazily: it is the optional extra ``pip install .[tensorrt]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from screener.core.errors import EngineUnavailableError, ModelError
from screener.model.engine.base import EngineOutput, FloatArray, as_output, check_batch, concat_outputs
from screener.model.modelcard import ONNX_FILE, LoadedModel

INPUT_NAME = "image"
OUTPUT_NAMES = ("probs", "probs_a", "probs_b")
NOVELTY_OUTPUT = "novelty"
HEATMAP_OUTPUT = "heatmap"
GATE_SCOPE = (
    "novelty_gate"  # the gate's ONNX node names start /novelty_gate/ (screener.model.fused.FusedResNet)
)
WORKSPACE_BYTES = 4 << 30


def import_tensorrt() -> ModuleType:
    """Import TensorRT >= 10 and check for a CUDA GPU; raises :class:`EngineUnavailableError` otherwise."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineUnavailableError(
            f"backend tensorrt needs the tensorrt package ({exc}): install it with "
            "`pip install .[tensorrt]` on a CUDA host, or set inference.backend = onnxruntime"
        ) from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise EngineUnavailableError(
            f"backend tensorrt needs TensorRT >= 10, found {trt.__version__}: upgrade tensorrt"
        )
    if not torch.cuda.is_available():
        raise EngineUnavailableError(
            "backend tensorrt needs a CUDA GPU but torch.cuda.is_available() is False on this host: "
            "set inference.backend = onnxruntime (or torch)"
        )
    module: ModuleType = trt
    return module


def plan_key(
    *, gpu_name: str, capability: tuple[int, int], trt_version: str, onnx_sha256: str, profile: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The cache key (sha256 hex) for a plan and the fields it was derived from."""
    fields: dict[str, Any] = {
        "gpu_name": gpu_name,
        "compute_capability": f"{capability[0]}.{capability[1]}",
        "tensorrt_version": trt_version,
        "onnx_sha256": onnx_sha256,
        "precision": "fp16",
        "fp32_layers": GATE_SCOPE,
        **profile,
    }
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return key, fields


class TensorRTEngine:
    """Runs an FP16 TensorRT engine built (or loaded from cache) for ``model.onnx``.

    The optimisation profile covers batch 1 to ``max_batch`` (optimum ``min(32, max_batch)``); larger
    batches are split. ``cache_hit`` says whether the plan came from ``cache_dir``. With the card's
    ``gate`` the engine also returns ``novelty``; the gate's layers (and the cast of the pooled features
    into it) are constrained to FP32, since its scores overflow FP16. With the card's ``heatmap`` it also
    returns ``heatmap`` ``[N, size, size]``.
    Raises :class:`EngineUnavailableError` without TensorRT 10 or a CUDA GPU, and :class:`ModelError`
    when the ONNX graph cannot be parsed or built.
    """

    name = "tensorrt"

    def __init__(self, model: LoadedModel, *, cache_dir: Path, max_batch: int = 64, device: int = 0) -> None:
        trt = import_tensorrt()
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch} must be at least 1")
        self._trt = trt
        self._device = torch.device("cuda", device)
        self._input_size = model.card.input_size
        self._num_classes = len(model.card.classes)
        self.max_batch = max_batch
        self._logger = trt.Logger(trt.Logger.WARNING)
        size = self._input_size
        profile = {
            "input_size": size,
            "min_batch": 1,
            "opt_batch": min(32, max_batch),
            "max_batch": max_batch,
        }
        props = torch.cuda.get_device_properties(self._device)
        key, fields = plan_key(
            gpu_name=props.name,
            capability=(props.major, props.minor),
            trt_version=str(trt.__version__),
            onnx_sha256=model.sha256(ONNX_FILE),
            profile=profile,
        )
        cache_dir = Path(cache_dir)
        self.plan_path = cache_dir / f"{key}.plan"
        meta_path = cache_dir / f"{key}.json"
        plan = _read_cached_plan(self.plan_path, meta_path)
        self.cache_hit = plan is not None
        if plan is None:
            with torch.cuda.device(self._device):
                plan = self._build(model.onnx_path, profile)
            _write_cached_plan(self.plan_path, meta_path, plan, fields)

        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self._device):
            self._engine = self._runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                raise ModelError(
                    f"TensorRT could not deserialize plan {self.plan_path}; delete it to rebuild"
                )
            self._context = self._engine.create_execution_context()
            self._stream = torch.cuda.Stream(device=self._device)  # type: ignore[no-untyped-call]
        names = {self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)}
        self._gated = model.card.gate is not None
        outputs = (*OUTPUT_NAMES, NOVELTY_OUTPUT) if self._gated else OUTPUT_NAMES
        self._heatmap = model.card.heatmap
        if self._heatmap is not None:
            outputs = (*outputs, HEATMAP_OUTPUT)
        if names != {INPUT_NAME, *outputs}:
            expected = ", ".join((INPUT_NAME, *outputs))
            raise ModelError(f"TensorRT engine tensors {sorted(names)} are not {expected}")
        for name in outputs:
            if self._engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise ModelError(
                    f"TensorRT output {name} is {self._engine.get_tensor_dtype(name)}, not FLOAT"
                )
        # I/O buffers for the largest batch, allocated once: device tensors whose addresses are bound
        # per call, and pinned host staging so both copies are asynchronous DMA on our stream.
        classes = self._num_classes
        self._dev_in = torch.empty((max_batch, 3, size, size), dtype=torch.float32, device=self._device)
        self._dev_out = {
            name: torch.empty((max_batch, classes), dtype=torch.float32, device=self._device)
            for name in OUTPUT_NAMES
        }
        self._host_in = torch.empty((max_batch, 3, size, size), dtype=torch.float32).pin_memory()
        self._host_out = torch.empty(
            (len(OUTPUT_NAMES), max_batch, classes), dtype=torch.float32
        ).pin_memory()
        if self._gated:
            self._dev_novelty = torch.empty((max_batch,), dtype=torch.float32, device=self._device)
            self._host_novelty = torch.empty((max_batch,), dtype=torch.float32).pin_memory()
        if self._heatmap is not None:
            side = self._heatmap.size
            self._dev_heatmap = torch.empty((max_batch, side, side), dtype=torch.float32, device=self._device)
            self._host_heatmap = torch.empty((max_batch, side, side), dtype=torch.float32).pin_memory()

    def _build(self, onnx_path: Path, profile: dict[str, int]) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        config.set_flag(trt.BuilderFlag.FP16)  # layers without FP16 kernels stay FP32
        gate_layers = _constrain_gate_to_fp32(trt, network)
        if gate_layers:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        size = profile["input_size"]
        opt_profile = builder.create_optimization_profile()
        opt_profile.set_shape(
            INPUT_NAME,
            (profile["min_batch"], 3, size, size),
            (profile["opt_batch"], 3, size, size),
            (profile["max_batch"], 3, size, size),
        )
        config.add_optimization_profile(opt_profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelError(f"TensorRT failed to build an engine from {onnx_path}; see its log above")
        return bytes(serialized)

    def infer(self, batch: FloatArray) -> EngineOutput:
        """Classify a float32 ``[N, 3, S, S]`` batch; raises ``ValueError`` for a malformed batch."""
        x_np = check_batch(batch, self._input_size)
        parts = [self._infer_chunk(x_np[i : i + self.max_batch]) for i in range(0, len(x_np), self.max_batch)]
        return concat_outputs(parts)

    def _infer_chunk(self, x_np: FloatArray) -> EngineOutput:
        n = int(x_np.shape[0])
        ctx = self._context
        self._host_in[:n].numpy()[...] = x_np
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            x = self._dev_in[:n]
            x.copy_(self._host_in[:n], non_blocking=True)
            if not ctx.set_input_shape(INPUT_NAME, tuple(x.shape)):
                raise ValueError(
                    f"TensorRT refused input shape {tuple(x.shape)} (max batch {self.max_batch})"
                )
            ctx.set_tensor_address(INPUT_NAME, x.data_ptr())
            for name, tensor in self._dev_out.items():
                ctx.set_tensor_address(name, tensor.data_ptr())  # rows 0..n-1 of a row-major [max, C]
            if self._gated:
                ctx.set_tensor_address(NOVELTY_OUTPUT, self._dev_novelty.data_ptr())
            if self._heatmap is not None:
                ctx.set_tensor_address(HEATMAP_OUTPUT, self._dev_heatmap.data_ptr())
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise ModelError("TensorRT execute_async_v3 failed; see its log above")
            for k, name in enumerate(OUTPUT_NAMES):
                self._host_out[k, :n].copy_(self._dev_out[name][:n], non_blocking=True)
            if self._gated:
                self._host_novelty[:n].copy_(self._dev_novelty[:n], non_blocking=True)
            if self._heatmap is not None:
                self._host_heatmap[:n].copy_(self._dev_heatmap[:n], non_blocking=True)
        self._stream.synchronize()
        host = self._host_out[:, :n].numpy().copy()
        novelty = self._host_novelty[:n].numpy().copy() if self._gated else None
        heatmap = self._host_heatmap[:n].numpy().copy() if self._heatmap is not None else None
        return as_output(host[0], host[1], host[2], novelty, heatmap=heatmap)

    def close(self) -> None:
        """Free the execution context, engine and runtime (in that order)."""
        for attr in (
            "_context",
            "_engine",
            "_runtime",
            "_dev_in",
            "_dev_out",
            "_host_in",
            "_host_out",
            "_dev_novelty",
            "_host_novelty",
            "_dev_heatmap",
            "_host_heatmap",
        ):
            if hasattr(self, attr):
                delattr(self, attr)
        torch.cuda.empty_cache()


def _constrain_gate_to_fp32(trt: Any, network: Any) -> int:
    """Pin every layer of the image-content gate (ONNX nodes under ``/novelty_gate/``) to FP32 inputs and
    outputs; return how many there are (0: the model has no gate)."""
    count = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if GATE_SCOPE not in layer.name:
            continue
        layer.precision = trt.float32
        for output in range(layer.num_outputs):
            if layer.get_output(output).dtype in (trt.float32, trt.float16):
                layer.set_output_type(output, trt.float32)
        count += 1
    return count


def _read_cached_plan(plan_path: Path, meta_path: Path) -> bytes | None:
    """The cached plan if it and its sidecar exist and the plan's sha256 matches; else None."""
    if not (plan_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        plan = plan_path.read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("plan_sha256") != hashlib.sha256(plan).hexdigest():
        return None
    return plan


def _write_cached_plan(plan_path: Path, meta_path: Path, plan: bytes, fields: dict[str, Any]) -> None:
    """Atomically write plan then sidecar (temp file, fsync, rename)."""
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**fields, "plan_sha256": hashlib.sha256(plan).hexdigest()}
    for path, data in ((plan_path, plan), (meta_path, (json.dumps(meta, indent=2) + "\n").encode())):
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)

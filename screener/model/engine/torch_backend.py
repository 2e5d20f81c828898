"""PyTorch backend: the FusedResNet from safetensors, eager (optionally compiled), CPU or CUDA.

On CPU the model runs eagerly in FP32 (the benchmarks' baseline). On CUDA the fast path is: FP16
backbone weights (softmax and fusion in FP32), channels-last activations (tensor-core convolution
kernels), pinned host staging buffers with ``non_blocking`` copies on a private stream, and one CUDA
graph per batch bucket (a batch is zero-padded up to the next bucket; the graphs share one memory pool),
which removes the per-kernel launch cost of ~300 small kernels per image batch. See the PyTorch notes
"CUDA semantics: CUDA Graphs" and "Pinned memory buffers".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from screener.core.logs import get_logger
from screener.model.cam import backbone_maps, fused_heatmap, whole_image_box
from screener.model.engine.base import EngineOutput, FloatArray, as_output, check_batch, concat_outputs
from screener.model.fused import FusedResNet, fuse, load_fused_from_safetensors
from screener.model.lungs import LungCrop, crop_boxes
from screener.model.modelcard import LoadedModel
from screener.model.novelty import backbone_features

log = get_logger("screener.engine.torch")

_Outputs = tuple[torch.Tensor, ...]  # probs, probs_a, probs_b[, novelty][, heatmap]
_Forward = Callable[[torch.Tensor], _Outputs]

GRAPH_WARMUP_CALLS = 3  # eager calls on the capture stream before capture (cuDNN autotuning, allocator)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes that get their own CUDA graph: powers of two below ``max_batch``, then ``max_batch``.

    A batch of ``n`` runs in the smallest bucket >= ``n`` (zero-padded), so padding never more than doubles
    the work. Raises ``ValueError`` when ``max_batch`` < 1.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch {max_batch} must be at least 1")
    sizes = []
    b = 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return tuple(sizes)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``n`` images; raises ``ValueError`` when none does."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch of {n} exceeds the largest CUDA graph bucket {buckets[-1]}")


class HalfFused(nn.Module):
    """The fused model with FP16 backbones: logits are cast back to FP32 before softmax and fusion.

    Takes a float32 ``[N, 3, S, S]`` batch in any memory format; the cast to FP16 and to ``memory_format``
    happens inside (so it is part of a captured CUDA graph). The image-content gate, where the model has
    one, stays FP32: it gets the FP16 pooled features cast to FP32 (its scores overflow FP16).
    """

    fusion_weight: torch.Tensor
    temperature_a: torch.Tensor
    temperature_b: torch.Tensor
    output_scale: torch.Tensor
    output_bias: torch.Tensor

    def __init__(self, fused: FusedResNet, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.lung_crop = fused.lung_crop  # FP32: the crop box must not move with FP16 rounding
        self.net_a = fused.net_a.half()
        self.net_b = fused.net_b.half()
        self.register_buffer("fusion_weight", fused.fusion_weight.detach().float().clone())
        self.register_buffer("temperature_a", fused.temperature_a.detach().float().clone())
        self.register_buffer("temperature_b", fused.temperature_b.detach().float().clone())
        self.register_buffer("output_scale", fused.output_scale.detach().float().clone())
        self.register_buffer("output_bias", fused.output_bias.detach().float().clone())
        self.output_calibrated = fused.output_calibrated
        self.novelty_gate = fused.novelty_gate.float() if fused.novelty_gate is not None else None
        self.memory_format = memory_format
        self.heatmap_size = fused.heatmap_size

    def _output_step(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.output_scale, self.output_bias) if self.output_calibrated else None

    def forward(self, image: torch.Tensor) -> _Outputs:
        if self.heatmap_size is not None:
            return self._forward_with_heatmap(image, self.heatmap_size)
        whole = image  # FP32: the gate's view check looks at the whole input
        if self.lung_crop is not None:
            image = self.lung_crop(image)
        x = image.to(dtype=torch.float16, memory_format=self.memory_format)
        if self.novelty_gate is None:
            logits_a, logits_b = self.net_a(x), self.net_b(x)
        else:
            features_a, logits_a = backbone_features(self.net_a, x)
            features_b, logits_b = backbone_features(self.net_b, x)
        probs_a = torch.softmax(logits_a.float() / self.temperature_a, dim=1)
        probs_b = torch.softmax(logits_b.float() / self.temperature_b, dim=1)
        probs = fuse(probs_a, probs_b, self.fusion_weight, self._output_step())
        if self.novelty_gate is None:
            return probs, probs_a, probs_b
        features = torch.cat((features_a.float(), features_b.float()), dim=1)
        return probs, probs_a, probs_b, self.novelty_gate(features, whole)

    def _forward_with_heatmap(self, image: torch.Tensor, size: int) -> _Outputs:
        """:meth:`forward`'s outputs, then the FP32 heatmap from the FP16 feature maps."""
        whole = image
        if isinstance(self.lung_crop, LungCrop):
            with torch.no_grad():
                box, _ = self.lung_crop.boxes(image)
            image = crop_boxes(image, box, self.lung_crop.spec.crop_size)
        else:
            box = whole_image_box(image)
        x = image.to(dtype=torch.float16, memory_format=self.memory_format)
        fmap_a, features_a, logits_a = backbone_maps(self.net_a, x)
        fmap_b, features_b, logits_b = backbone_maps(self.net_b, x)
        probs_a = torch.softmax(logits_a.float() / self.temperature_a, dim=1)
        probs_b = torch.softmax(logits_b.float() / self.temperature_b, dim=1)
        probs = fuse(probs_a, probs_b, self.fusion_weight, self._output_step())
        w = self.fusion_weight
        heatmap = fused_heatmap((fmap_a, fmap_b), (self.net_a.fc, self.net_b.fc), probs, w, box, size)
        if self.novelty_gate is None:
            return probs, probs_a, probs_b, heatmap
        features = torch.cat((features_a.float(), features_b.float()), dim=1)
        return probs, probs_a, probs_b, self.novelty_gate(features, whole), heatmap


def engine_output(outs: _Outputs, *, gated: bool, heatmap: bool) -> EngineOutput:
    """The model's output tuple (probs, probs_a, probs_b[, novelty][, heatmap]) as :class:`EngineOutput`."""
    arrays = [out.detach().float().cpu().numpy() for out in outs]
    expected = 3 + int(gated) + int(heatmap)
    if len(arrays) != expected:
        raise ValueError(f"the model returned {len(arrays)} outputs, not {expected}")
    novelty = arrays[3] if gated else None
    return as_output(arrays[0], arrays[1], arrays[2], novelty, heatmap=arrays[-1] if heatmap else None)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inp: torch.Tensor  # static device input, float32 NCHW contiguous
    out: _Outputs  # static device outputs


class TorchEngine:
    """Runs :class:`~screener.model.fused.FusedResNet` in ``inference_mode``.

    ``device`` defaults to CUDA when available, else CPU. On CUDA: ``fp16`` (default on) runs FP16
    backbone weights with softmax and fusion in FP32; ``fp16=False`` is plain FP32 (the benchmarks'
    GPU baseline). ``channels_last`` defaults to on for CUDA (tensor cores) and off for CPU: there it
    is only ~10% faster and its different convolution kernels move the deep random-weight outputs by
    ~1e-4, past the agreement the tests demand with onnxruntime. ``cuda_graphs`` (default on with CUDA)
    captures one graph per bucket of :func:`batch_buckets` (``max_batch``), lazily on first use; larger
    batches are split; when capture fails the engine logs it and stays eager.
    ``threads`` > 0 sets torch's process-wide intra-op thread count.
    ``torch_compile`` wraps the model in ``torch.compile`` (``compile_mode``, default "default"; first
    batches of each shape are slow).
    Raises :class:`~screener.core.errors.ModelError` when the weights do not fit the card.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        device: str | None = None,
        threads: int = 0,
        torch_compile: bool = False,
        channels_last: bool | None = None,
        fp16: bool | None = None,
        cuda_graphs: bool | None = None,
        max_batch: int = 64,
        compile_mode: str | None = None,
    ) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cuda = self.device.type == "cuda"
        self.name = "torch-cuda" if cuda else "torch"
        net = load_fused_from_safetensors(model.weights_path, model.card)
        self._memory_format = (
            torch.channels_last
            if (channels_last if channels_last is not None else cuda)
            else torch.contiguous_format
        )
        self.fp16 = bool(fp16 if fp16 is not None else cuda) and cuda
        self._input_size = model.card.input_size
        self._num_classes = len(model.card.classes)
        self._gated = model.card.gate is not None
        self._heatmap = model.card.heatmap
        module: nn.Module = HalfFused(net, self._memory_format) if self.fp16 else net
        module = module.to(self.device).to(memory_format=self._memory_format).eval()
        self._net: nn.Module | None = module
        self._forward: _Forward = torch.compile(module, mode=compile_mode) if torch_compile else module
        self.cuda_graphs = bool(cuda_graphs if cuda_graphs is not None else cuda) and cuda
        self.buckets = batch_buckets(max_batch)
        self.max_batch = max_batch
        self._graphs: dict[int, _Graph] = {}
        if cuda:
            # Shapes repeat (one per bucket), so let cuDNN time its convolution algorithms once per shape.
            torch.backends.cudnn.benchmark = True
            self._stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
            self._pool = torch.cuda.graph_pool_handle()
            size = self._input_size
            self._host_in = torch.empty((max_batch, 3, size, size), dtype=torch.float32).pin_memory()
            self._host_out = torch.empty((3, max_batch, self._num_classes), dtype=torch.float32).pin_memory()
            self._host_novelty = torch.empty((max_batch,), dtype=torch.float32).pin_memory()
            if self._heatmap is not None:
                side = self._heatmap.size
                self._host_heatmap = torch.empty((max_batch, side, side), dtype=torch.float32).pin_memory()

    def infer(self, batch: FloatArray) -> EngineOutput:
        """Classify a float32 ``[N, 3, S, S]`` batch; raises ``ValueError`` for a malformed batch."""
        x_np = check_batch(batch, self._input_size)
        if self._net is None:
            raise RuntimeError("TorchEngine.infer called after close()")
        if self.device.type != "cuda":
            return self._infer_cpu(x_np)
        parts = [self._infer_cuda(x_np[i : i + self.max_batch]) for i in range(0, len(x_np), self.max_batch)]
        return concat_outputs(parts)

    def _infer_cpu(self, x_np: FloatArray) -> EngineOutput:
        with torch.inference_mode():
            x = torch.from_numpy(x_np).contiguous(memory_format=self._memory_format)
            return engine_output(self._forward(x), gated=self._gated, heatmap=self._heatmap is not None)

    def _infer_cuda(self, x_np: FloatArray) -> EngineOutput:
        n = int(x_np.shape[0])
        host_in = self._host_in[:n]
        host_in.numpy()[...] = x_np  # into pinned memory, so the copy below is a real async DMA
        with torch.inference_mode(), torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            graph = self._graph_for(n) if self.cuda_graphs else None
            if graph is not None:
                graph.inp[:n].copy_(host_in, non_blocking=True)
                if n < graph.inp.shape[0]:
                    graph.inp[n:].zero_()
                graph.graph.replay()
                outs = graph.out
            else:
                x = host_in.to(self.device, non_blocking=True)
                outs = self._forward(x.contiguous(memory_format=self._memory_format))
            for k, out in enumerate(outs[:3]):
                self._host_out[k, :n].copy_(out[:n].float(), non_blocking=True)
            if self._gated:
                self._host_novelty[:n].copy_(outs[3][:n].float(), non_blocking=True)
            if self._heatmap is not None:
                self._host_heatmap[:n].copy_(outs[-1][:n].float(), non_blocking=True)
        self._stream.synchronize()
        host = self._host_out[:, :n].numpy().copy()
        novelty = self._host_novelty[:n].numpy().copy() if self._gated else None
        heatmap = self._host_heatmap[:n].numpy().copy() if self._heatmap is not None else None
        return as_output(host[0], host[1], host[2], novelty, heatmap=heatmap)

    def _graph_for(self, n: int) -> _Graph | None:
        """The captured graph for ``n``'s bucket, capturing it on first use; None when capture failed."""
        b = bucket_for(n, self.buckets)
        if b in self._graphs:
            return self._graphs[b]
        size = self._input_size
        inp = torch.zeros((b, 3, size, size), dtype=torch.float32, device=self.device)
        try:
            for _ in range(GRAPH_WARMUP_CALLS):  # on self._stream (the caller's context), as capture needs
                self._forward(inp)
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                out = self._forward(inp)
        except RuntimeError as exc:
            log.warning("torch.cuda_graph_failed", batch=b, error=str(exc)[:200], fallback="eager")
            self.cuda_graphs = False
            return None
        captured = _Graph(graph, inp, out)
        self._graphs[b] = captured
        return captured

    def close(self) -> None:
        """Release the model, graphs and pinned buffers (and cached CUDA memory)."""
        self._net = None
        self._graphs.clear()
        del self._forward
        if self.device.type == "cuda":
            del self._host_in, self._host_out, self._host_novelty
            if self._heatmap is not None:
                del self._host_heatmap
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

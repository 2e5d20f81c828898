"""PyTorch backend: the FusedResNet from safetensors, eager (optionally compiled), CPU or CUDA."""

from __future__ import annotations

from collections.abc import Callable

import torch

from screener.engine.base import EngineOutput, FloatArray, as_output, check_batch
from screener.fused import load_fused_from_safetensors
from screener.modelcard import LoadedModel

_Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class TorchEngine:
    """Runs :class:`~screener.fused.FusedResNet` in ``inference_mode``.

    ``device`` defaults to CUDA when available, else CPU; on CUDA the forward pass runs under FP16
    autocast (softmax stays FP32) unless ``fp16=False`` (the FP32 baseline of the benchmarks).
    ``channels_last`` defaults to on for CUDA (tensor cores) and off for
    CPU: there it is only ~10% faster and its different convolution kernels move the deep random-weight
    outputs by ~1e-4, past the agreement the tests demand with onnxruntime.
    ``threads`` > 0 sets torch's process-wide intra-op thread count.
    ``torch_compile`` wraps the model in ``torch.compile`` (first batches of each shape are slow).
    Raises :class:`~screener.errors.ModelError` when the weights do not fit the card.
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
    ) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.name = "torch-cuda" if self.device.type == "cuda" else "torch"
        net = load_fused_from_safetensors(model.weights_path, model.card)
        self._memory_format = (
            torch.channels_last
            if (channels_last if channels_last is not None else self.device.type == "cuda")
            else torch.contiguous_format
        )
        net = net.to(self.device).to(memory_format=self._memory_format).eval()
        self._net: torch.nn.Module | None = net
        self._forward: _Forward = torch.compile(net) if torch_compile else net
        self._input_size = model.card.input_size
        self._autocast = (
            fp16 if fp16 is not None else self.device.type == "cuda"
        ) and self.device.type == "cuda"

    def infer(self, batch: FloatArray) -> EngineOutput:
        """Classify a float32 ``[N, 3, S, S]`` batch; raises ``ValueError`` for a malformed batch."""
        x_np = check_batch(batch, self._input_size)
        if self._net is None:
            raise RuntimeError("TorchEngine.infer called after close()")
        with torch.inference_mode():
            x = torch.from_numpy(x_np).to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=self._memory_format)
            with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self._autocast):
                probs, probs_a, probs_b = self._forward(x)
            return as_output(
                probs.float().cpu().numpy(), probs_a.float().cpu().numpy(), probs_b.float().cpu().numpy()
            )

    def close(self) -> None:
        """Release the model (and cached CUDA memory)."""
        self._net = None
        del self._forward
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

"""ONNX Runtime backend: the CPU default, CUDA when onnxruntime-gpu offers it; INT8 on CPU when proven."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from screener.core.errors import ModelError
from screener.model.engine.base import EngineOutput, FloatArray, as_output, check_batch
from screener.model.modelcard import LoadedModel

OUTPUT_NAMES = ["probs", "probs_a", "probs_b"]
NOVELTY_OUTPUT = "novelty"
HEATMAP_OUTPUT = "heatmap"


class OnnxRuntimeEngine:
    """Runs the card's single ``model.onnx`` graph (or its INT8 copy) in an ONNX Runtime session.

    ``threads`` sets intra-op threads (0 = one per core). With ``precision="fp32"``
    CUDAExecutionProvider is used first when this onnxruntime build offers it. ``precision="int8"`` runs
    ``model.int8.onnx`` on the CPU provider only (the statically quantised QDQ graph is what the card's
    accuracy gate measured on CPU); the caller decides whether the card allows it
    (:func:`screener.model.engine.load_engine`). ``graph`` overrides the file opened, for the INT8 export,
    which evaluates a graph before the card lists it. Raises :class:`ModelError` when the graph's inputs
    or outputs do not match the contract (input ``image`` [N, 3, S, S], outputs ``probs``, ``probs_a``,
    ``probs_b``, ``novelty`` exactly when the card has a ``gate`` section, ``heatmap`` exactly when it has a
    ``heatmap`` section).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model: LoadedModel,
        *,
        threads: int = 0,
        precision: Literal["fp32", "int8"] = "fp32",
        graph: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads if threads > 0 else (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = ort.get_available_providers()
        wanted = (
            ("CPUExecutionProvider",)
            if precision == "int8"
            else ("CUDAExecutionProvider", "CPUExecutionProvider")
        )
        providers = [p for p in wanted if p in available]
        path = graph if graph is not None else (model.int8_path if precision == "int8" else model.onnx_path)
        self.precision = precision
        if precision == "int8":
            self.name = "onnxruntime-int8"
        self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self._input_size = model.card.input_size
        self.providers: list[str] = list(self._session.get_providers())
        inputs = self._session.get_inputs()
        outputs = [o.name for o in self._session.get_outputs()]
        size = self._input_size
        if len(inputs) != 1 or inputs[0].name != "image" or list(inputs[0].shape[1:]) != [3, size, size]:
            got = [(i.name, i.shape) for i in inputs]
            raise ModelError(f"{path} inputs {got} are not image [N, 3, {size}, {size}]")
        self._outputs = OUTPUT_NAMES + ([NOVELTY_OUTPUT] if model.card.gate is not None else [])
        self._heatmap = model.card.heatmap is not None
        if self._heatmap:
            self._outputs.append(HEATMAP_OUTPUT)
        if sorted(outputs) != sorted(self._outputs):
            raise ModelError(f"{path} outputs {outputs} are not {self._outputs}")

    def infer(self, batch: FloatArray) -> EngineOutput:
        """Classify a float32 ``[N, 3, S, S]`` batch; raises ``ValueError`` for a malformed batch."""
        x = check_batch(batch, self._input_size)
        outputs = self._session.run(self._outputs, {"image": x})
        if self._heatmap:
            return as_output(*outputs[:-1], heatmap=outputs[-1])
        return as_output(*outputs)

    def close(self) -> None:
        """Drop the session (ONNX Runtime frees it when the last reference goes)."""
        self._session = None

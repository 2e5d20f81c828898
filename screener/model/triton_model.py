"""Triton Python-backend model: the screener's ``model.onnx`` run with ONNX Runtime inside Triton.

``screener models export-triton VERSION REPO_DIR`` copies this file into each version directory of the
repository entry (it is also at ``deploy/triton/model.py``). Triton's Python backend stub runs it with
the system's Python 3 (Debian: ``/usr/bin/python3`` with ``python3-numpy``), not the screener's
virtualenv, so it imports nothing but the standard library, numpy and onnxruntime. The stub's Python
ignores ``PYTHONPATH``: name a folder holding an onnxruntime built for that Python in
``SCREENER_TRITON_PYTHONPATH`` when starting ``tritonserver`` (docs/scaling.md).

At load it checks ``model.onnx`` against the sha256 that ``config.pbtxt`` lists for this version and
refuses to load on a mismatch. Requests that Triton's dynamic batcher hands over together run as one
ONNX Runtime call. Parameters (``config.pbtxt``): ``intra_op_threads`` (0 = ONNX Runtime's default).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# The stub's embedded Python ignores PYTHONPATH: folders named here (os.pathsep-separated) come first.
SITE_ENV = "SCREENER_TRITON_PYTHONPATH"
for _folder in reversed([f for f in os.environ.get(SITE_ENV, "").split(os.pathsep) if f]):
    if _folder not in sys.path:
        sys.path.insert(0, _folder)

import onnxruntime as ort  # noqa: E402 - after the site folders above

INPUT_NAME = "image"
ONNX_FILE = "model.onnx"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parameter(config: dict[str, Any], key: str) -> str | None:
    value = config.get("parameters", {}).get(key)
    return None if value is None else str(value.get("string_value", ""))


class TritonPythonModel:
    """The entry point Triton's Python backend looks for."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        version = args["model_version"]
        path = Path(args["model_repository"]) / version / ONNX_FILE
        expected = _parameter(config, f"onnx_sha256:{version}")
        found = _sha256(path)
        if expected != found:
            raise pb_utils.TritonModelException(
                f"{path} has sha256 {found[:12]}, config.pbtxt lists {str(expected)[:12]} for version "
                f"{version}: export the model again with `screener models export-triton`"
            )
        options = ort.SessionOptions()
        threads = int(_parameter(config, "intra_op_threads") or "0")
        if threads > 0:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
        providers = [p for p in wanted if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.outputs = [str(o["name"]) for o in config["output"]]
        self.pid = os.getpid()

    def execute(self, requests: list[Any]) -> list[Any]:
        """One ONNX Runtime call for every request of the dynamic batch; each gets its own rows back."""
        arrays = [pb_utils.get_input_tensor_by_name(r, INPUT_NAME).as_numpy() for r in requests]
        counts = [int(a.shape[0]) for a in arrays]
        batch = np.ascontiguousarray(
            np.concatenate(arrays) if len(arrays) > 1 else arrays[0], dtype=np.float32
        )
        results = self.session.run(self.outputs, {INPUT_NAME: batch})
        responses = []
        start = 0
        for count in counts:
            tensors = []
            for name, value in zip(self.outputs, results, strict=True):
                rows = np.asarray(value[start : start + count], dtype=np.float32)
                if rows.ndim == 1:  # novelty is [N] in the graph, [N, 1] in Triton
                    rows = rows.reshape(-1, 1)
                tensors.append(pb_utils.Tensor(name, rows))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += count
        return responses

    def finalize(self) -> None:
        self.session = None

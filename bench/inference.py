"""Inference throughput per backend and batch size; the same benchmark as ``screener bench``.

    python bench/inference.py            # batches 1, 8, 32 (1, 8, 32, 64 on a GPU); torch eager FP32 baseline
    python bench/inference.py --quick    # batches 1 and 8 (1 and 64 on a GPU), 3 rounds
    python bench/inference.py --parity 200 --model-dir DIR   # fast engine vs ONNX Runtime FP32 on cxr3

Backends are timed in rotating order within each batch size (medians of several rounds); the fused
model's FLOPs per image are printed and, on a GPU, the compute-bound ceiling and each result's share.
The last line is ``ratio=<onnxruntime / torch eager images/s at batch 8>`` (on a GPU host, TensorRT FP16
or the best torch CUDA FP16 variant over torch eager FP32 at the largest batch; with ``--parity`` the
share of identical labels). See ``screener/ops/benchmark.py`` for every option.
"""

from __future__ import annotations

import sys

from screener.ops.benchmark import main

if __name__ == "__main__":
    sys.exit(main())

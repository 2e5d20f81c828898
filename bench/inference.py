"""Inference throughput per backend and batch size; the same benchmark as ``screener bench``.

    python bench/inference.py            # batches 1, 8, 32 (64 on a GPU); torch eager FP32 is the baseline
    python bench/inference.py --quick    # batches 1 and 8, under 2 minutes on 2 cores

The last line is ``ratio=<onnxruntime / torch eager images/s at batch 8>`` (on a GPU host,
TensorRT FP16 over torch eager at batch 64).
"""

from __future__ import annotations

import sys

from screener.benchmark import main

if __name__ == "__main__":
    sys.exit(main())

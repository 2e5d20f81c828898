"""Workers sharing one Triton Inference Server against the local ONNX Runtime engine, in the same run.

    python bench/triton_fleet.py                    # random fused resnet18+resnet34 at 128 px, 192 images
    python bench/triton_fleet.py --archs resnet101,resnet152 --size 224 --images 64   # the paper's model
    python bench/triton_fleet.py --model-dir DIR    # an exported model directory

One model is exported with ``export_triton`` (the Python-backend entry that ``screener models
export-triton`` writes) and served by the nvidia-pytriton wheel's ``tritonserver`` on loopback
(``screener.model.triton_local``: ``var/pytriton`` and ``var/triton-py``, as tests/run installs them).
Then, on the same random batches of ``--batch`` images:

- ``local``: one worker process running the local ONNX Runtime engine (one thread per core);
- ``triton xW``: W worker processes (1, 2, 4) each sending its share of the batches to the one Triton over
  gRPC (the ``triton`` engine backend), Triton's dynamic batcher merging what arrives together.

For each: images/s over the whole run and p50/p95 latency of one batch. The last line is
``ratio=<triton images/s with the most workers / local images/s>``. ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from screener.core.config import TritonConfig
from screener.core.progress import Progress
from screener.model.engine.base import Engine
from screener.model.modelcard import load_model_dir
from screener.model.triton_local import LocalTriton
from screener.model.triton_repo import export_triton


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    model_dir: str, url: str | None, batches: list[int], batch: int, seed: int, threads: int
) -> tuple[list[float], float, float]:
    """Run ``batches`` (their indices seed the random input) on one engine; return per-batch latencies (s),
    the wall-clock start and end (time.time, comparable across processes)."""
    loaded = load_model_dir(Path(model_dir))
    size = loaded.card.input_size
    engine: Engine
    if url is None:
        from screener.model.engine.onnx_backend import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine(loaded, threads=threads)
    else:
        from screener.model.engine.triton_backend import TritonEngine

        engine = TritonEngine(loaded, TritonConfig(url=url, request_timeout_seconds=600), max_batch=batch)
    inputs = [
        np.random.default_rng(seed + i).random((batch, 3, size, size), dtype=np.float32) for i in batches
    ]
    engine.infer(inputs[0][:1])  # warm-up (session, connection) outside the timing
    latencies = []
    start = time.time()
    for x in inputs:
        t0 = time.perf_counter()
        engine.infer(x)
        latencies.append(time.perf_counter() - t0)
    end = time.time()
    engine.close()
    return latencies, start, end


def _run(
    model_dir: Path, url: str | None, workers: int, n_batches: int, batch: int, threads: int
) -> dict[str, Any]:
    shares = [list(range(k, n_batches, workers)) for k in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        results = pool.starmap(_worker, [(str(model_dir), url, s, batch, 7, threads) for s in shares])
    latencies = [x for r in results for x in r[0]]
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    images = n_batches * batch
    ordered = sorted(latencies)
    return {
        "workers": workers,
        "images": images,
        "images_per_s": round(images / wall, 2),
        "p50_batch_ms": round(statistics.median(ordered) * 1000, 1),
        "p95_batch_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, help="an exported model (default: a random fused model)")
    parser.add_argument("--archs", default="resnet18,resnet34", help="random model: two architectures")
    parser.add_argument("--size", type=int, default=128, help="random model: input size")
    parser.add_argument("--images", type=int, default=192, help="images per configuration")
    parser.add_argument("--batch", type=int, default=8, help="images per batch (one request)")
    parser.add_argument("--workers", default="1,2,4", help="worker processes against Triton")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    n_batches = max(max(counts), args.images // args.batch)
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        root = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            from screener.model.export import create_random_model_dir

            arch_a, arch_b = args.archs.split(",")
            model_dir = root / "model"
            create_random_model_dir(model_dir, arch_a=arch_a, arch_b=arch_b, input_size=args.size, seed=0)
        exported = export_triton(model_dir, root / "repo", max_batch=max(args.batch, 32))
        card = load_model_dir(model_dir).card
        server = LocalTriton(root / "repo", root / "server", http_port=_free_port(), grpc_port=_free_port())
        rows: list[dict[str, Any]] = []
        with Progress(1 + len(counts)) as bar:
            rows.append(
                {"engine": "local onnxruntime", **_run(model_dir, None, 1, n_batches, args.batch, threads)}
            )
            bar.step("local onnxruntime")
            server.start()
            try:
                server.wait_model("cxr-screener", exported.triton_version)
                for w in counts:
                    rows.append(
                        {
                            "engine": f"triton x{w}",
                            **_run(model_dir, server.grpc_url, w, n_batches, args.batch, threads),
                        }
                    )
                    bar.step(f"triton x{w}")
            finally:
                server.stop()
    print(
        f"model {'+'.join(card.architectures)} at {card.input_size} px, batch {args.batch}, "
        f"{n_batches * args.batch} images per configuration, {threads} CPU threads"
    )
    print(f"{'engine':<20} {'workers':>7} {'images/s':>9} {'p50 batch ms':>13} {'p95 batch ms':>13}")
    for r in rows:
        cells = (r["engine"], r["workers"], r["images_per_s"], r["p50_batch_ms"], r["p95_batch_ms"])
        print("{:<20} {:>7} {:>9} {:>13} {:>13}".format(*cells))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"model": list(card.architectures), "size": card.input_size, "rows": rows}, indent=2)
        )
    print(f"ratio={rows[-1]['images_per_s'] / rows[0]['images_per_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

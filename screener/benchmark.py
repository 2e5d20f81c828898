"""Inference throughput of the fused ResNet-101 + ResNet-152 on each backend (``screener bench``).

    screener bench [--quick] [--backend torch,onnxruntime] [--batch 1,8] [--image-size 224] [--runs 5]
                   [--json PATH] [--model-dir DIR]
    python bench/inference.py ...   (the same)

Exports a seeded random-weight model (speed does not depend on training) unless ``--model-dir`` is
given, times ``runs`` calls per (backend, batch) after a warm-up call and reports the median as
images/s. The last stdout line is ``ratio=<x>``: onnxruntime / torch eager (CPU, FP32) at batch 8, or on a
GPU host tensorrt (FP16) / torch-cuda eager (FP32) at batch 64.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from screener.engine import Engine, available_backends, load_engine
from screener.engine.torch_backend import TorchEngine
from screener.export import create_random_model_dir
from screener.modelcard import LoadedModel, load_model_dir
from screener.progress import Progress


@dataclass(frozen=True)
class Result:
    backend: str
    batch: int
    median_s: float
    images_per_s: float
    runs: int


def _gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _open(backend: str, model: LoadedModel, threads: int, trt_cache: Path, max_batch: int) -> Engine:
    if backend == "torch":  # the baseline: eager FP32 on CPU, whatever GPU the host has
        return TorchEngine(model, device="cpu", threads=threads)
    if backend == "torch-cuda":  # the GPU baseline: eager FP32, no autocast
        return TorchEngine(model, device="cuda", fp16=False)
    engine, _ = load_engine(
        model.path, backend, threads=threads, trt_cache_dir=trt_cache, max_batch=max_batch
    )
    return engine


def _time(engine: Engine, batch: np.ndarray, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        engine.infer(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        engine.infer(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ratio(results: list[Result]) -> tuple[str, float | None]:
    rate = {(r.backend, r.batch): r.images_per_s for r in results}
    for num, den, batch in (("tensorrt", "torch-cuda", 64), ("onnxruntime", "torch", 8)):
        if (num, batch) in rate and (den, batch) in rate:
            return f"{num}/{den} at batch {batch}", rate[(num, batch)] / rate[(den, batch)]
    return "n/a", None


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="batches 1 and 8, 3 runs (under 2 min on 2 cores)"
    )
    parser.add_argument(
        "--backend",
        "--backends",
        dest="backends",
        help="comma list of torch, torch-cuda, onnxruntime, tensorrt",
    )
    parser.add_argument("--batch", "--batches", dest="batches", help="comma list of batch sizes")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--runs", type=int, help="timed runs per point (default 5, quick 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = one per core)")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--model-dir", type=Path, help="an existing model directory (default: random one)")
    args = parser.parse_args(argv)

    gpu = _gpu()
    usable = available_backends()
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    elif gpu:
        backends = ["torch-cuda", "onnxruntime"] + (["tensorrt"] if "tensorrt" in usable else [])
    else:
        backends = ["torch", "onnxruntime"]
    if args.batches:
        batches = _parse_ints(args.batches)
    else:
        batches = [1, 8] if args.quick else [1, 8, 32]
        if gpu and not args.quick:
            batches.append(64)
        if gpu and args.quick:
            batches = [1, 64]
    runs = args.runs or (3 if args.quick else 5)

    results: list[Result] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp,
        Progress(1 + len(backends) * (1 + len(batches))) as bar,
    ):
        if args.model_dir is None:
            start = time.perf_counter()
            model_dir = Path(tmp) / "model"
            create_random_model_dir(model_dir, input_size=args.image_size, seed=0, version="bench")
            bar.step(f"exported resnet101+resnet152 in {time.perf_counter() - start:.1f}s")
        else:
            model_dir = args.model_dir
            bar.step("model dir given")
        model = load_model_dir(model_dir)
        size = model.card.input_size
        rng = np.random.default_rng(0)
        for backend in backends:
            engine = _open(backend, model, args.threads, Path(tmp) / "trt-cache", max(max(batches), 1))
            bar.step(f"{backend} loaded")
            try:
                for n in batches:
                    batch = rng.standard_normal((n, 3, size, size), dtype=np.float32)
                    median = _time(engine, batch, runs, args.warmup)
                    results.append(Result(backend, n, median, n / median, runs))
                    bar.step(f"{backend} batch {n}: {n / median:.2f} img/s")
            finally:
                engine.close()

    print(
        f"fused resnet101+resnet152 at {size}px, {runs} runs, median; host {platform.node()}, "
        f"{os.cpu_count()} cpus, gpu={gpu}"
    )
    print(f"{'backend':<12} {'batch':>5} {'median ms':>10} {'images/s':>9}")
    for r in results:
        print(f"{r.backend:<12} {r.batch:>5} {r.median_s * 1000:>10.1f} {r.images_per_s:>9.2f}")
    what, ratio = _ratio(results)
    if args.json:
        payload = {
            "results": [asdict(r) for r in results],
            "ratio": ratio,
            "ratio_of": what,
            "image_size": size,
            "cpus": os.cpu_count(),
            "gpu": gpu,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"# ratio is {what}")
    print(f"ratio={ratio:.3f}" if ratio is not None else "ratio=nan")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inference throughput of the fused ResNet-101 + ResNet-152 on each backend (``screener bench``).

    screener bench [--quick] [--backend torch,onnxruntime] [--batch 1,8] [--image-size 224] [--runs 5]
                   [--json PATH] [--model-dir DIR] [--parity N [--cxr3 DIR]]
    python bench/inference.py ...   (the same)

Exports a seeded random-weight model (speed does not depend on training) unless ``--model-dir`` is
given. For each batch size every backend is warmed up, then the backends are timed in turn, ``runs``
rounds in rotating order (so a noisy neighbour hurts them alike), and the median is reported as
images/s. Backends (each only where this host can run it):

- ``torch``: eager FP32 on CPU, the CPU baseline; ``onnxruntime`` FP32; ``onnxruntime-int8`` when the
  model card holds an INT8 graph that passed its accuracy gate;
- on a CUDA host: ``torch-cuda`` eager FP32 (the GPU baseline; cuDNN's TF32 setting as torch leaves it,
  printed), ``torch-cuda-fp16`` (FP16, channels-last, pinned memory), ``torch-cuda-fp16-graphs`` (the
  same replayed as CUDA graphs: the torch backend's default on CUDA), ``torch-cuda-fp16-compile``
  (``--compile``), ``onnxruntime`` when it offers the CUDA provider, and ``tensorrt`` FP16.

The fused model's FLOPs per image are counted with ``torch.utils.flop_counter.FlopCounterMode``
(2 FLOPs per multiply-add); on a GPU whose dense FP16 tensor peak is known (or ``--peak-tflops``) the
compute-bound ceiling ``peak / FLOPs per image`` and each result's share of it are printed.

``--parity N`` instead compares the fast engine (tensorrt, else torch-cuda-fp16, else on a CPU host
onnxruntime-int8 or torch) with ONNX Runtime FP32 on the CPU provider over N real cxr3 images
(``$CXR3_DIR``): largest probability difference and label agreement.

The last stdout line is ``ratio=<x>``: onnxruntime / torch eager (CPU, FP32) at batch 8, on a GPU host
tensorrt FP16 (else the best torch-cuda FP16 variant) / torch-cuda eager FP32 at the largest batch;
with ``--parity`` the share of identical labels.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from screener.core.progress import Progress
from screener.model.engine import Engine, available_backends, load_engine
from screener.model.export import create_random_model_dir
from screener.model.modelcard import LoadedModel, load_model_dir

# Dense (no sparsity) FP16 tensor-core peaks in TFLOPS, from NVIDIA's product datasheets, whose headline
# figures assume 2:4 sparsity and are halved here. Matched against torch.cuda.get_device_name(),
# most specific first.
GPU_PEAK_FP16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "NVL"), 835.5),  # H100 NVL datasheet: 1,671 TFLOPS with sparsity
    (("H100", "PCIE"), 756.5),  # H100 PCIe datasheet: 1,513 TFLOPS with sparsity
    (("H100",), 989.4),  # H100 SXM5 (e.g. "NVIDIA H100 80GB HBM3"): 1,979 TFLOPS with sparsity
    (("H200", "NVL"), 835.5),  # H200 NVL: 1,671 TFLOPS with sparsity
    (("H200",), 989.4),  # H200 SXM: 1,979 TFLOPS with sparsity
    (("GH200",), 989.4),
    (("A100",), 312.0),  # A100 (SXM and PCIe): 624 TFLOPS with sparsity
    (("L40S",), 362.05),
    (("L4",), 121.0),
    (("A10",), 125.0),
)


def gpu_peak_tflops(device_name: str) -> float | None:
    """The dense FP16 tensor peak (TFLOPS) of a GPU from its CUDA device name; None when unknown."""
    name = device_name.upper().replace(" ", "")
    for keys, peak in GPU_PEAK_FP16_TFLOPS:
        if all(k.replace(" ", "") in name for k in keys):
            return peak
    return None


def count_flops(arch_a: str, arch_b: str, input_size: int) -> int:
    """FLOPs of one image through the fused model (both backbones), counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from screener.model.fused import FusedResNet

    with torch.device("meta"):
        net = FusedResNet(arch_a, arch_b).eval()
        x = torch.empty((1, 3, input_size, input_size))
    with FlopCounterMode(display=False) as counter:
        net(x)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class Result:
    backend: str
    batch: int
    median_s: float
    images_per_s: float
    runs: int
    ceiling_share: float | None = None


@dataclass(frozen=True)
class Parity:
    """How a candidate engine's probabilities compare with a reference's on the same images."""

    images: int
    max_abs_diff: float
    within_tol: float  # share of images whose every class probability is within tol
    label_agreement: float  # share of images with the same argmax label
    ambiguous: int  # reference top-2 margin below tol: labels may legitimately differ
    tol: float

    def passed(self, min_agreement: float = 0.995) -> bool:
        return self.max_abs_diff <= self.tol and self.label_agreement >= min_agreement


def compare_probs(candidate: np.ndarray, reference: np.ndarray, tol: float = 0.01) -> Parity:
    """Parity figures of two ``[N, C]`` probability arrays; raises ``ValueError`` on a shape mismatch."""
    if candidate.shape != reference.shape or candidate.ndim != 2 or candidate.shape[0] == 0:
        raise ValueError(f"probability arrays {candidate.shape} and {reference.shape} must be equal [N, C]")
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    top2 = np.sort(reference, axis=1)[:, -2:]
    return Parity(
        images=int(candidate.shape[0]),
        max_abs_diff=float(diff.max()),
        within_tol=float((diff.max(axis=1) <= tol).mean()),
        label_agreement=float((candidate.argmax(axis=1) == reference.argmax(axis=1)).mean()),
        ambiguous=int(((top2[:, 1] - top2[:, 0]) < tol).sum()),
        tol=tol,
    )


def _gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def int8_ready(model: LoadedModel) -> tuple[bool, str]:
    """Whether the model card holds an INT8 graph that passed its accuracy gate, and why not."""
    int8 = getattr(model.card, "int8", None)
    if int8 is None:
        return False, "model card has no int8 section (trainer export MODEL_DIR --int8 --data ...)"
    if not bool(getattr(int8, "passed", False)):
        return False, "the model card's INT8 graph did not pass its accuracy gate"
    return True, "passed"


def default_backends(gpu: bool, usable: list[str], model: LoadedModel, compile_: bool) -> list[str]:
    """The variants this host can time, baseline first."""
    if not gpu:
        names = ["torch", "onnxruntime"]
        if int8_ready(model)[0]:
            names.append("onnxruntime-int8")
        return names
    names = ["torch-cuda", "torch-cuda-fp16", "torch-cuda-fp16-graphs"]
    if compile_:
        names.append("torch-cuda-fp16-compile")
    if _ort_cuda():
        names.append("onnxruntime")
    if "tensorrt" in usable:
        names.append("tensorrt")
    return names


def open_engine(backend: str, model: LoadedModel, threads: int, trt_cache: Path, max_batch: int) -> Engine:
    """Open one benchmark variant (see the module docstring for the names)."""
    from screener.model.engine.torch_backend import TorchEngine

    if backend == "torch":  # the CPU baseline: eager FP32
        return TorchEngine(model, device="cpu", threads=threads)
    if backend == "torch-cuda":  # the GPU baseline: eager FP32, no autocast, no graphs
        return TorchEngine(model, device="cuda", fp16=False, cuda_graphs=False, channels_last=False)
    if backend == "torch-cuda-fp16":
        return TorchEngine(model, device="cuda", fp16=True, cuda_graphs=False, max_batch=max_batch)
    if backend == "torch-cuda-fp16-graphs":
        return TorchEngine(model, device="cuda", fp16=True, cuda_graphs=True, max_batch=max_batch)
    if backend == "torch-cuda-fp16-compile":
        return TorchEngine(
            model, device="cuda", fp16=True, cuda_graphs=True, torch_compile=True, max_batch=max_batch
        )
    if backend == "onnxruntime-int8":
        engine, _ = load_engine(model.path, "onnxruntime", threads=threads, precision="int8")
        return engine
    engine, _ = load_engine(
        model.path, backend, threads=threads, trt_cache_dir=trt_cache, max_batch=max_batch, precision="fp32"
    )
    return engine


def time_alternating(
    engines: dict[str, Engine],
    batch: np.ndarray,
    runs: int,
    warmup: int,
    iters: int = 1,
    on_round: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Median seconds per ``infer(batch)`` call of each engine, timed in rotating order.

    Each engine gets ``warmup`` untimed calls, then ``runs`` rounds; in round ``r`` the engines start at
    offset ``r`` so none is always first. A sample is the mean over ``iters`` back-to-back calls.
    """
    names = list(engines)
    for name in names:
        for _ in range(warmup):
            engines[name].infer(batch)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            start = time.perf_counter()
            for _ in range(iters):
                engines[name].infer(batch)
            samples[name].append((time.perf_counter() - start) / iters)
        if on_round is not None:
            on_round()
    return {name: statistics.median(values) for name, values in samples.items()}


def pick_ratio(results: list[Result]) -> tuple[str, float | None]:
    """The headline ratio: GPU fast path / torch-cuda FP32 at the largest batch, else ORT / torch at 8."""
    rate = {(r.backend, r.batch): r.images_per_s for r in results}
    gpu_batches = sorted({b for (name, b) in rate if name == "torch-cuda"})
    if gpu_batches:
        batch = gpu_batches[-1]
        for fast in ("tensorrt", "torch-cuda-fp16-compile", "torch-cuda-fp16-graphs", "torch-cuda-fp16"):
            if (fast, batch) in rate:
                return f"{fast}/torch-cuda (eager FP32) at batch {batch}", rate[(fast, batch)] / rate[
                    ("torch-cuda", batch)
                ]
    for batch in (8, *sorted({b for (_, b) in rate}, reverse=True)):
        if ("onnxruntime", batch) in rate and ("torch", batch) in rate:
            return f"onnxruntime/torch (eager FP32) at batch {batch}", rate[("onnxruntime", batch)] / rate[
                ("torch", batch)
            ]
    return "n/a", None


def load_cxr3_batch(cxr3: Path, model: LoadedModel, n: int) -> tuple[np.ndarray, list[str]]:
    """``n`` real cxr3 images (round robin over the class folders, sorted names), preprocessed per the card.

    Raises :class:`~screener.core.errors.ConfigError` when the folder holds fewer than ``n`` PNG images.
    """
    from screener.core.errors import ConfigError
    from screener.imaging.pixels import preprocess_file

    folders = [d for d in sorted(cxr3.iterdir()) if d.is_dir()] if cxr3.is_dir() else []
    lists = [sorted(d.glob("*.png")) for d in folders]
    picked: list[Path] = []
    depth = 0
    while len(picked) < n and any(depth < len(files) for files in lists):
        picked += [files[depth] for files in lists if depth < len(files)]
        depth += 1
    picked = picked[:n]
    if len(picked) < n:
        raise ConfigError(
            "CXR3_DIR",
            str(cxr3),
            f"holds {len(picked)} PNG images in class folders, {n} needed: "
            "set CXR3_DIR (or --cxr3) to the cxr3 dataset folder, or lower --parity",
        )
    spec = model.card.preprocessing
    arrays = [preprocess_file(p, spec, 100_000_000) for p in picked]
    return np.stack(arrays).astype(np.float32), [p.name for p in picked]


def _reference_probs(model: LoadedModel, x: np.ndarray, threads: int) -> np.ndarray:
    """ONNX Runtime FP32 on the CPU provider (never CUDA/TF32): the parity reference."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(model.onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    out = [session.run(["probs"], {"image": x[i : i + 16]})[0] for i in range(0, len(x), 16)]
    return np.concatenate(out).astype(np.float32)


def run_parity(
    model: LoadedModel, candidate: str, cxr3: Path, n: int, threads: int, trt_cache: Path, tol: float
) -> Parity:
    """Probabilities of ``candidate`` against ONNX Runtime FP32 (CPU) on ``n`` real cxr3 images."""
    x, _ = load_cxr3_batch(cxr3, model, n)
    engine = open_engine(candidate, model, threads, trt_cache, max_batch=64)  # the cached plan's profile
    try:
        got = np.concatenate([engine.infer(x[i : i + 32]).probs for i in range(0, len(x), 32)])
    finally:
        engine.close()
    return compare_probs(got, _reference_probs(model, x, threads), tol)


def _parity_candidate(gpu: bool, usable: list[str], model: LoadedModel) -> str:
    if gpu:
        return "tensorrt" if "tensorrt" in usable else "torch-cuda-fp16-graphs"
    return "onnxruntime-int8" if int8_ready(model)[0] else "torch"


def _host_line(gpu: bool) -> str:
    import torch

    line = f"host {platform.node()}, {os.cpu_count()} cpus, torch {torch.__version__}"
    if gpu:
        line += (
            f", gpu {torch.cuda.get_device_name(0)}, cuda {torch.version.cuda}, "
            f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}"
        )
    return line


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and runs (under 2 min)")
    parser.add_argument(
        "--backend",
        "--backends",
        dest="backends",
        help="comma list of torch, onnxruntime, onnxruntime-int8, torch-cuda, torch-cuda-fp16, "
        "torch-cuda-fp16-graphs, torch-cuda-fp16-compile, tensorrt (default: what this host runs)",
    )
    parser.add_argument("--batch", "--batches", dest="batches", help="comma list of batch sizes")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--archs", default="resnet101,resnet152", help="backbones of the random model")
    parser.add_argument(
        "--runs", type=int, help="timed rounds per batch size (default CPU 5, GPU 10; quick 3)"
    )
    parser.add_argument("--iters", type=int, help="calls per timed sample (default 1 on CPU, 10 on GPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = one per core)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (GPU; slow start)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense FP16 peak, if not in the table")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--model-dir", type=Path, help="an existing model directory (default: random one)")
    parser.add_argument("--trt-cache", type=Path, help="TensorRT plan cache (default: a temp dir)")
    parser.add_argument("--parity", type=int, metavar="N", help="parity check on N real cxr3 images instead")
    parser.add_argument("--parity-backend", help="engine compared in --parity (default: the fastest)")
    parser.add_argument("--tol", type=float, default=0.01, help="--parity probability tolerance")
    parser.add_argument(
        "--cxr3", type=Path, default=None, help="cxr3 folder for --parity (default $CXR3_DIR)"
    )
    args = parser.parse_args(argv)

    gpu = _gpu()
    usable = available_backends()
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        if args.model_dir is None:
            start = time.perf_counter()
            arch_a, arch_b = (a.strip() for a in args.archs.split(","))
            model_dir = Path(tmp) / "model"
            create_random_model_dir(
                model_dir, arch_a=arch_a, arch_b=arch_b, input_size=args.image_size, seed=0, version="bench"
            )
            print(
                f"# exported random {arch_a}+{arch_b} in {time.perf_counter() - start:.1f}s", file=sys.stderr
            )
        else:
            model_dir = args.model_dir
        model = load_model_dir(model_dir)
        trt_cache = args.trt_cache or Path(tmp) / "trt-cache"
        if args.parity:
            return _parity_main(args, model, gpu, usable, trt_cache)
        return _speed_main(args, model, gpu, usable, trt_cache)


def _parity_main(
    args: argparse.Namespace, model: LoadedModel, gpu: bool, usable: list[str], trt: Path
) -> int:
    cxr3_text = str(args.cxr3) if args.cxr3 else os.environ.get("CXR3_DIR", "")
    if not cxr3_text:
        print("bench: --parity needs the cxr3 images: set CXR3_DIR or pass --cxr3 DIR", file=sys.stderr)
        return 2
    candidate = args.parity_backend or _parity_candidate(gpu, usable, model)
    with Progress(1) as bar:
        parity = run_parity(model, candidate, Path(cxr3_text), args.parity, args.threads, trt, args.tol)
        bar.step(f"{candidate} vs onnxruntime FP32 (CPU) on {parity.images} images")
    print(_host_line(gpu))
    print(f"parity: {candidate} against onnxruntime FP32 (CPU provider), model {model.card.version}")
    print(
        f"images {parity.images}; max |dp| {parity.max_abs_diff:.5f} (tolerance {parity.tol}); "
        f"images within tolerance {parity.within_tol:.2%}; identical labels {parity.label_agreement:.2%}; "
        f"reference top-2 margin < tolerance on {parity.ambiguous} images"
    )
    print(f"parity {'PASS' if parity.passed() else 'FAIL'} (needs max |dp| <= {parity.tol}, labels >= 99.5%)")
    if args.json:
        args.json.write_text(json.dumps({"candidate": candidate, **asdict(parity)}, indent=2) + "\n")
    print("# ratio is the share of identical labels")
    print(f"ratio={parity.label_agreement:.4f}")
    return 0


def _speed_main(args: argparse.Namespace, model: LoadedModel, gpu: bool, usable: list[str], trt: Path) -> int:
    backends = (
        [b.strip() for b in args.backends.split(",") if b.strip()]
        if args.backends
        else default_backends(gpu, usable, model, args.compile)
    )
    if args.batches:
        batches = _parse_ints(args.batches)
    elif gpu:
        batches = [1, 64] if args.quick else [1, 8, 32, 64]
    else:
        batches = [1, 8] if args.quick else [1, 8, 32]
    runs = args.runs or (3 if args.quick else (10 if gpu else 5))
    iters = args.iters or (10 if gpu else 1)
    notes = []
    if not gpu and "onnxruntime-int8" not in backends:
        notes.append(f"onnxruntime-int8 not timed: {int8_ready(model)[1]}")
    if gpu and "tensorrt" not in usable:
        notes.append("tensorrt not timed: the tensorrt package does not import on this host")
    if gpu and "onnxruntime" not in backends:
        notes.append("onnxruntime not timed: this build has no CUDAExecutionProvider")

    flops = count_flops(*model.card.architectures, model.card.input_size)
    peak = None
    if gpu:
        import torch

        peak = args.peak_tflops or gpu_peak_tflops(torch.cuda.get_device_name(0))
    ceiling = peak * 1e12 / flops if peak else None

    results: list[Result] = []
    size = model.card.input_size
    rng = np.random.default_rng(0)
    with Progress(len(backends) + len(batches) * (runs + 1)) as bar:
        engines: dict[str, Engine] = {}
        try:
            for backend in backends:
                started = time.perf_counter()
                engines[backend] = open_engine(backend, model, args.threads, trt, max(batches))
                bar.step(f"{backend} loaded in {time.perf_counter() - started:.1f}s")
            for n in batches:
                batch = rng.standard_normal((n, 3, size, size), dtype=np.float32)
                medians = time_alternating(
                    engines,
                    batch,
                    runs,
                    args.warmup,
                    iters,
                    on_round=functools.partial(bar.step, f"batch {n}"),
                )
                for backend, median in medians.items():
                    share = (n / median) / ceiling if ceiling else None
                    results.append(Result(backend, n, median, n / median, runs, share))
                bar.step(f"batch {n}: " + ", ".join(f"{b} {n / m:.1f}/s" for b, m in medians.items()))
        finally:
            for engine in engines.values():
                engine.close()

    print(f"fused {'+'.join(model.card.architectures)} at {size}px, {runs} rounds x {iters} calls, median")
    print(_host_line(gpu))
    print(f"FLOPs per image: {flops / 1e9:.2f} GFLOP (FlopCounterMode, 2 per multiply-add)")
    if gpu:
        if ceiling:
            print(
                f"compute-bound ceiling: {peak} TFLOPS dense FP16 / {flops / 1e9:.2f} GFLOP "
                f"= {ceiling:,.0f} images/s"
            )
        else:
            print("compute-bound ceiling: unknown GPU, pass --peak-tflops")
    for note in notes:
        print(f"note: {note}")
    print(f"{'backend':<24} {'batch':>5} {'median ms':>10} {'images/s':>9} {'of ceiling':>10}")
    for r in results:
        of_ceiling = f"{r.ceiling_share:.1%}" if r.ceiling_share is not None else "-"
        print(
            f"{r.backend:<24} {r.batch:>5} {r.median_s * 1000:>10.2f} {r.images_per_s:>9.2f} {of_ceiling:>10}"
        )
    what, ratio = pick_ratio(results)
    if args.json:
        payload: dict[str, Any] = {
            "results": [asdict(r) for r in results],
            "ratio": ratio,
            "ratio_of": what,
            "image_size": size,
            "flops_per_image": flops,
            "peak_tflops": peak,
            "ceiling_images_per_s": ceiling,
            "notes": notes,
            "host": _host_line(gpu),
            "cpus": os.cpu_count(),
            "gpu": gpu,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"# ratio is {what}")
    print(f"ratio={ratio:.3f}" if ratio is not None else "ratio=nan")
    return 0


if __name__ == "__main__":
    sys.exit(main())

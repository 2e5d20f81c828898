"""Helpers of ``bench/gpu/run.sh``: host facts, a cxr3 sample to carry, a checked dry run, the Markdown.

python bench/gpu/report.py env                          # what this host offers (GPU, TensorRT, ORT)
python bench/gpu/report.py sample-cxr3 --n 200 --out var/cxr3-sample   # from $CXR3_DIR, to carry
python bench/gpu/report.py model --out DIR              # the random fused resnet101+152 model
python bench/gpu/report.py build-plan --model-dir DIR --cache DIR --max-batch 64
python bench/gpu/report.py dry-run                      # imports and flags, CPU only, no timing
python bench/gpu/report.py markdown --out OUT           # OUT/*.json + logs -> OUT/BENCHMARKS-gpu.md
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def host_facts() -> dict[str, Any]:
    """GPU, CUDA, TensorRT and ONNX Runtime facts of this host (never fails: missing parts are None)."""
    import onnxruntime as ort
    import torch

    facts: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "tensorrt": None,
        "gpu": None,
    }
    try:
        trt = importlib.import_module("tensorrt")
        facts["tensorrt"] = str(trt.__version__)
    except ImportError as exc:
        facts["tensorrt_missing"] = str(exc)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        from screener.ops.benchmark import gpu_peak_tflops

        facts["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count,
            "peak_fp16_dense_tflops": gpu_peak_tflops(props.name),
            "cudnn": torch.backends.cudnn.version(),  # type: ignore[no-untyped-call]
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        }
    if shutil.which("nvidia-smi"):
        res = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        facts["nvidia_smi"] = res.stdout.strip() or res.stderr.strip()
    return facts


def sample_cxr3(src: Path, out: Path, n: int) -> int:
    """Copy ``n`` cxr3 PNGs (round robin over the class folders) into ``out``/<class>/."""
    folders = [d for d in sorted(src.iterdir()) if d.is_dir()]
    lists = {d.name: sorted(d.glob("*.png")) for d in folders}
    copied = 0
    depth = 0
    while copied < n and any(depth < len(v) for v in lists.values()):
        for name, files in lists.items():
            if depth < len(files) and copied < n:
                (out / name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(files[depth], out / name / files[depth].name)
                copied += 1
        depth += 1
    return copied


def make_model(out: Path, archs: str) -> None:
    from screener.model.export import create_random_model_dir

    arch_a, arch_b = archs.split(",")
    size = 224 if arch_a == "resnet101" else 64
    create_random_model_dir(out, arch_a=arch_a, arch_b=arch_b, input_size=size, seed=0, version="gpu-bench")


def build_plan(model_dir: Path, cache: Path, max_batch: int) -> dict[str, Any]:
    """Build (or find) the TensorRT FP16 plan; returns its path, cache hit and seconds taken."""
    from screener.model.engine import load_engine
    from screener.model.engine.tensorrt_backend import TensorRTEngine

    start = time.perf_counter()
    engine, _ = load_engine(model_dir, "tensorrt", trt_cache_dir=cache, max_batch=max_batch, precision="fp32")
    took = time.perf_counter() - start
    assert isinstance(engine, TensorRTEngine)
    result = {
        "plan": str(engine.plan_path),
        "cache_hit": engine.cache_hit,
        "seconds": round(took, 1),
        "plan_mib": round(engine.plan_path.stat().st_size / 2**20, 1),
    }
    engine.close()
    return result


def dry_run() -> int:
    """Everything run.sh touches, checked without a GPU: imports, CLI flags, the CUDA code's structure.

    Returns the number of problems found (each printed as ``FAIL ...``).
    """
    problems = 0

    def check(what: str, ok: bool, detail: str = "") -> None:
        nonlocal problems
        print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")
        problems += 0 if ok else 1

    for module in ("torch", "onnxruntime", "pynetdicom", "pydicom", "data_store", "sqlalchemy", "numpy"):
        try:
            importlib.import_module(module)
            check(f"import {module}", True)
        except ImportError as exc:
            check(f"import {module}", False, str(exc))
    try:
        importlib.import_module("tensorrt")
        check("import tensorrt", True)
    except ImportError:
        print("note tensorrt missing here: run.sh then times torch CUDA (FP16, channels-last, graphs) only")
    for tool in ("storescu", "dcmsend"):
        check(f"DCMTK {tool} on PATH", shutil.which(tool) is not None)
    import screener

    where = Path(screener.__file__).resolve().parent
    check("screener imported from this checkout", where == REPO / "screener", str(where))
    try:
        importlib.import_module("screener._migrations")
        check("import screener._migrations (serve migrates its database)", True)
    except ImportError as exc:
        check("import screener._migrations (serve migrates its database)", False, f"{exc}: pip install -e .")
    for script, flags in (
        (
            "bench/inference.py",
            ["--model-dir", "--trt-cache", "--json", "--parity", "--compile", "--peak-tflops"],
        ),
        ("bench/e2e.py", ["--model", "--trt-cache", "--json", "--quick", "--data", "--max-batch"]),
        ("bench/train.py", ["--quick", "--device"]),
    ):
        res = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True)
        missing = [f for f in flags if f not in res.stdout]
        check(
            f"{script} --help lists {' '.join(flags)}", res.returncode == 0 and not missing, " ".join(missing)
        )
    from screener.model.engine.torch_backend import HalfFused, TorchEngine, batch_buckets, bucket_for
    from screener.ops.benchmark import default_backends, gpu_peak_tflops, open_engine

    check("H100 SXM peak", gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4)
    check("H100 PCIe peak", gpu_peak_tflops("NVIDIA H100 PCIe") == 756.5)
    check(
        "buckets for 64",
        batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64) and bucket_for(33, batch_buckets(64)) == 64,
    )
    for name in ("TorchEngine", "HalfFused", "open_engine", "default_backends"):
        check(
            f"{name} importable",
            callable(
                {
                    "TorchEngine": TorchEngine,
                    "HalfFused": HalfFused,
                    "open_engine": open_engine,
                    "default_backends": default_backends,
                }[name]
            ),
        )
    # The FP16 module on CPU (float16 convolutions run on CPU in torch >= 2.1): same answer as FP32.
    import numpy as np
    import torch

    from screener.model.fused import FusedResNet

    torch.manual_seed(0)
    fused = FusedResNet("resnet18", "resnet34", fusion_weight=0.3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        want = fused(x)[0].numpy()
        got = HalfFused(fused, torch.channels_last)(x)[0].float().numpy()
    check(
        "HalfFused (FP16) matches FP32 within 0.01",
        bool(np.abs(got - want).max() < 0.01),
        f"max diff {np.abs(got - want).max():.4f}",
    )
    for var in ("OUT",):
        print(f"note ${var} = {os.environ.get(var, '(unset: run.sh uses ./gpu-results)')}")
    print(f"dry run: {problems} problem(s)")
    return problems


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def markdown(out: Path) -> str:
    """A Markdown fragment for BENCHMARKS.md from the JSON files run.sh left in ``out``."""
    env = _load(out / "env.json") or {}
    lines = ["## GPU host", ""]
    gpu = env.get("gpu") or {}
    lines.append(
        f"**{gpu.get('name', 'no GPU')}** ({gpu.get('memory_gib', '?')} GiB, "
        f"compute {gpu.get('capability', '?')}), "
        f"{env.get('cpus')} CPUs; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
        f"TensorRT {env.get('tensorrt') or 'not installed'}, onnxruntime {env.get('onnxruntime')} "
        f"(providers: {', '.join(env.get('ort_providers') or [])}). "
        f"`bench/gpu/run.sh`, {time.strftime('%Y-%m-%d')}."
    )
    plan = _load(out / "plan.json")
    if plan:
        lines += [
            "",
            f"TensorRT FP16 plan (batch 1-64): built in {plan['seconds']} s, {plan['plan_mib']} MiB "
            f"(cache hit: {plan['cache_hit']}).",
        ]
    inf = _load(out / "inference.json")
    if inf:
        lines += ["", "### Inference: fused ResNet-101 + ResNet-152 at 224 px", ""]
        lines.append(f"`python bench/inference.py --model-dir M --trt-cache C` ({inf.get('host', '')}).")
        flops = inf.get("flops_per_image")
        if flops:
            lines.append(
                f"FLOPs per image {flops / 1e9:.2f} G; dense FP16 peak {inf.get('peak_tflops')} TFLOPS; "
                f"compute-bound ceiling {inf.get('ceiling_images_per_s') or 0:,.0f} images/s."
            )
        batches = sorted({r["batch"] for r in inf["results"]})
        lines += [
            "",
            "| backend | " + " | ".join(f"batch {b}" for b in batches) + " | share of ceiling at "
            f"{batches[-1]} |",
            "| --- " * (len(batches) + 2) + "|",
        ]
        by = {(r["backend"], r["batch"]): r for r in inf["results"]}
        for backend in dict.fromkeys(r["backend"] for r in inf["results"]):
            cells = [
                f"{by[(backend, b)]['images_per_s']:.1f}" if (backend, b) in by else "-" for b in batches
            ]
            last = by.get((backend, batches[-1]), {}).get("ceiling_share")
            lines.append(
                f"| {backend} | " + " | ".join(cells) + f" | {last:.1%} |"
                if last is not None
                else f"| {backend} | " + " | ".join(cells) + " | - |"
            )
        lines += ["", f"`ratio={inf.get('ratio') or float('nan'):.3f}` ({inf.get('ratio_of')}; target >= 5)."]
        for note in inf.get("notes") or []:
            lines.append(f"Note: {note}.")
    comp = _load(out / "inference-compile.json")
    if comp:
        lines += [
            "",
            "torch.compile (batch 64): "
            + ", ".join(f"{r['backend']} {r['images_per_s']:.1f} images/s" for r in comp["results"]),
        ]
    par = _load(out / "parity.json")
    if par:
        lines += [
            "",
            "### Parity: FP16 engine vs ONNX Runtime FP32 (CPU provider)",
            "",
            f"{par['candidate']} on {par['images']} real cxr3 images: max |dp| {par['max_abs_diff']:.5f} "
            f"(target <= {par['tol']}), identical labels {par['label_agreement']:.2%} (target >= 99.5%), "
            f"{par['ambiguous']} images whose reference top-2 margin is below the tolerance.",
        ]
    for name, title in (
        ("e2e-uncompressed.json", "uncompressed RG1"),
        ("e2e-j2k.json", "JPEG 2000 lossless RG1"),
    ):
        runs = _load(out / name)
        if not runs:
            continue
        lines += [
            "",
            f"### End to end ({title}, `bench/e2e.py --quick`)",
            "",
            "| mode | backend | precision | to prediction p50 / p95 / p99 ms | to SR p50 / p95 / p99 ms | "
            "instances/s | instances/s to SR |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in runs:
            tp, ts = r["to_prediction"], r["to_sr"]
            lines.append(
                f"| {r['mode']} | {r['backend']} | {r['precision']} | "
                f"{tp['p50'] * 1000:.0f} / {tp['p95'] * 1000:.0f} / {tp['p99'] * 1000:.0f} | "
                f"{ts['p50'] * 1000:.0f} / {ts['p95'] * 1000:.0f} / {ts['p99'] * 1000:.0f} | "
                f"{r['sustained']:.2f} | {r['sustained_sr']:.2f} |"
            )
    train_log = out / "logs" / "train.log"
    if train_log.is_file():
        tail = [ln for ln in train_log.read_text(errors="replace").splitlines() if not ln.startswith("[")][
            -6:
        ]
        lines += ["", "### Training step (AMP, batch 64, `bench/train.py --quick`)", "", "```", *tail, "```"]
    status = out / "logs" / "steps.txt"
    if status.is_file():
        lines += ["", "Steps (exit status, seconds):", "", "```", status.read_text().strip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    p = sub.add_parser("sample-cxr3")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--src", type=Path, default=Path(os.environ.get("CXR3_DIR", "")))
    p = sub.add_parser("model")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--archs", default="resnet101,resnet152")
    p = sub.add_parser("build-plan")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--max-batch", type=int, default=64)
    sub.add_parser("dry-run")
    p = sub.add_parser("markdown")
    p.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "env":
        print(json.dumps(host_facts(), indent=2))
    elif args.cmd == "sample-cxr3":
        if not args.src.is_dir() or str(args.src) in ("", "."):
            sys.exit("sample-cxr3: set CXR3_DIR (or --src) to the cxr3 dataset folder")
        print(f"copied {sample_cxr3(args.src, args.out, args.n)} images to {args.out}")
    elif args.cmd == "model":
        make_model(args.out, args.archs)
    elif args.cmd == "build-plan":
        print(json.dumps(build_plan(args.model_dir, args.cache, args.max_batch), indent=2))
    elif args.cmd == "dry-run":
        return 1 if dry_run() else 0
    else:
        text = markdown(args.out)
        (args.out / "BENCHMARKS-gpu.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

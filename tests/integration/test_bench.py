"""The benchmarks' pure parts: FLOP counting, GPU ceilings, alternating timing, ratios, parity, summaries.

Fast: no model export, no server; the one network used is a resnet18+resnet34 pair at 64 px.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from screener.model.engine.base import EngineOutput
from screener.model.engine.torch_backend import HalfFused, batch_buckets, bucket_for
from screener.model.fused import FusedResNet
from screener.ops.benchmark import (
    Result,
    compare_probs,
    count_flops,
    gpu_peak_tflops,
    pick_ratio,
    time_alternating,
)

REPO = Path(__file__).resolve().parents[2]


def _bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_flops_of_the_paper_model_match_the_published_backbone_costs() -> None:
    # torchvision documents 7.80 and 11.51 GMACs at 224 px; 2 FLOPs per multiply-add.
    assert count_flops("resnet101", "resnet152", 224) == pytest.approx(2 * (7.80 + 11.51) * 1e9, rel=0.01)
    assert count_flops("resnet18", "resnet34", 64) < count_flops("resnet18", "resnet34", 128)


def test_gpu_peak_is_detected_by_device_name() -> None:
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert gpu_peak_tflops("NVIDIA H100 NVL") == 835.5
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_peak_tflops("Some Future GPU") is None


class _SlowEngine:
    def __init__(self, name: str, seconds: float, calls: list[str]) -> None:
        self.name, self.seconds, self.calls = name, seconds, calls

    def infer(self, batch: np.ndarray) -> EngineOutput:
        self.calls.append(self.name)
        import time

        time.sleep(self.seconds)
        z = np.zeros((len(batch), 3), np.float32)
        return EngineOutput(z, z, z)

    def close(self) -> None:
        pass


def test_timing_alternates_the_order_and_separates_a_slow_engine() -> None:
    calls: list[str] = []
    engines = {"a": _SlowEngine("a", 0.001, calls), "b": _SlowEngine("b", 0.02, calls)}
    rounds = []
    medians = time_alternating(
        engines, np.zeros((1, 3, 4, 4), np.float32), 4, 1, on_round=lambda: rounds.append(1)
    )  # type: ignore[arg-type]
    assert calls[:2] == ["a", "b"]  # warm-up
    timed = calls[2:]
    assert timed[0::2][:2] == ["a", "b"]  # who goes first rotates round by round
    assert len(rounds) == 4
    assert medians["b"] > 5 * medians["a"]


def test_headline_ratio_prefers_the_gpu_fast_path_at_the_largest_batch() -> None:
    cpu = [Result("torch", 8, 1.0, 8.0, 3), Result("onnxruntime", 8, 0.5, 16.0, 3)]
    assert pick_ratio(cpu) == ("onnxruntime/torch (eager FP32) at batch 8", 2.0)
    gpu = [
        Result("torch-cuda", 64, 1.0, 100.0, 3),
        Result("torch-cuda-fp16-graphs", 64, 0.2, 400.0, 3),
        Result("tensorrt", 64, 0.1, 800.0, 3),
        Result("tensorrt", 1, 0.1, 10.0, 3),
    ]
    what, ratio = pick_ratio(gpu)
    assert what.startswith("tensorrt/torch-cuda") and ratio == 8.0
    assert pick_ratio([Result("torch", 1, 1.0, 1.0, 1)]) == ("n/a", None)


def test_parity_counts_label_flips_and_the_largest_difference() -> None:
    ref = np.array([[0.7, 0.2, 0.1], [0.4, 0.395, 0.205], [0.1, 0.1, 0.8]], np.float32)
    same = compare_probs(ref + 0.001, ref)
    assert same.label_agreement == 1.0 and same.passed()
    flipped = ref.copy()
    flipped[1] = [0.39, 0.405, 0.205]  # an ambiguous image flips
    parity = compare_probs(flipped, ref)
    assert parity.label_agreement == pytest.approx(2 / 3)
    assert parity.max_abs_diff == pytest.approx(0.01, abs=1e-6)
    assert parity.ambiguous == 1
    assert not parity.passed()
    with pytest.raises(ValueError, match="must be equal"):
        compare_probs(ref[:2], ref)


def test_cuda_graph_buckets_pad_at_most_to_double() -> None:
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert bucket_for(5, batch_buckets(64)) == 8
    assert bucket_for(64, batch_buckets(64)) == 64
    with pytest.raises(ValueError, match="exceeds"):
        bucket_for(65, batch_buckets(64))
    with pytest.raises(ValueError, match="at least 1"):
        batch_buckets(0)


def test_fp16_module_keeps_softmax_and_fusion_in_fp32_and_agrees_with_fp32() -> None:
    torch.manual_seed(0)
    fused = FusedResNet("resnet18", "resnet34", fusion_weight=0.3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        want = fused(x)
        got = HalfFused(fused, torch.channels_last).eval()(x)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        assert float((g - w).abs().max()) < 0.01
    torch.testing.assert_close(got[0], 0.3 * got[1] + 0.7 * got[2])


def test_e2e_percentiles_and_reuid_copies(tmp_path: Path) -> None:
    e2e = _bench_module("e2e")
    stats = e2e.percentiles([float(v) for v in range(1, 101)])
    assert (
        stats["p50"] == pytest.approx(50.5) and stats["p99"] == pytest.approx(99.01) and stats["max"] == 100
    )
    with pytest.raises(ValueError, match="no latencies"):
        e2e.percentiles([])
    from pydicom import dcmread

    paths = e2e.reuid_copies(e2e.rg1_file("RG1_J2KR.dcm"), tmp_path, 2)
    a, b = (dcmread(p, stop_before_pixels=True) for p in paths)
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.StudyInstanceUID != b.StudyInstanceUID
    assert str(a.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.90"  # still lossless JPEG 2000
    assert e2e.RESPONSE_RE.search("I: Received Store Response (Success)").group("status") == "Success"
    assert e2e.RESPONSE_RE.search("I: Received C-STORE Response (Success)") is not None


def test_train_ratio_sums_both_networks() -> None:
    train = _bench_module("train")
    results = [train.ArchResult("resnet101", 8, 4.0, 1.0), train.ArchResult("resnet152", 8, 6.0, 2.0)]
    assert train.pair_ratio(results) == pytest.approx(3.0 / 10.0)

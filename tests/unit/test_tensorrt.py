"""TensorRT backend on a CUDA host: FP16 engine close to onnxruntime FP32, and the plan cache reused.

Skipped unless the optional ``tensorrt`` package imports and a CUDA GPU is visible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from screener.model.engine import load_engine
from screener.model.engine.tensorrt_backend import TensorRTEngine
from screener.model.export import create_random_model_dir

pytest.importorskip("tensorrt", reason="TensorRT not installed (pip install .[tensorrt])")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trt-models") / "fused-101-152"
    create_random_model_dir(out, fusion_weight=0.3, seed=7, version="trt-test-1")
    return out


def test_fp16_engine_matches_onnxruntime_and_reuses_cache(model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "trt-cache"
    batch = np.random.default_rng(0).standard_normal((5, 3, 224, 224), dtype=np.float32)

    engine, loaded = load_engine(model_dir, "tensorrt", trt_cache_dir=cache, max_batch=8)
    assert isinstance(engine, TensorRTEngine)
    assert engine.cache_hit is False
    plans = sorted(cache.glob("*.plan"))
    assert len(plans) == 1 and plans[0].stat().st_size > 0
    got = engine.infer(batch)
    got_one = engine.infer(batch[:1])
    big = engine.infer(np.concatenate([batch, batch]))  # 10 > max_batch 8: split in two runs
    engine.close()

    reference, _ = load_engine(model_dir, "onnxruntime")
    want = reference.infer(batch)
    reference.close()
    for field in ("probs", "probs_a", "probs_b"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), atol=2e-2, rtol=0)
    np.testing.assert_allclose(got_one.probs, want.probs[:1], atol=2e-2, rtol=0)
    np.testing.assert_allclose(big.probs[5:], want.probs, atol=2e-2, rtol=0)
    np.testing.assert_allclose(got.probs.sum(axis=1), 1.0, atol=1e-3)
    w = loaded.card.fusion_weight
    np.testing.assert_allclose(got.probs, w * got.probs_a + (1 - w) * got.probs_b, atol=1e-3)
    # The heatmap output (card section heatmap): same maps as onnxruntime where the label agrees.
    assert got.heatmap is not None and want.heatmap is not None and big.heatmap is not None
    assert got.heatmap.shape == want.heatmap.shape == (5, 64, 64) and big.heatmap.shape[0] == 10
    same = got.probs.argmax(axis=1) == want.probs.argmax(axis=1)
    np.testing.assert_allclose(got.heatmap[same], want.heatmap[same], atol=5e-2, rtol=0)

    mtime = plans[0].stat().st_mtime_ns
    again, _ = load_engine(model_dir, "tensorrt", trt_cache_dir=cache, max_batch=8)
    assert isinstance(again, TensorRTEngine) and again.cache_hit is True
    assert plans[0].stat().st_mtime_ns == mtime
    np.testing.assert_allclose(again.infer(batch).probs, got.probs, atol=1e-3)
    again.close()


def test_corrupt_cached_plan_is_rebuilt(model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "trt-cache"
    engine, _ = load_engine(model_dir, "tensorrt", trt_cache_dir=cache, max_batch=2)
    engine.close()
    plan = next(cache.glob("*.plan"))
    plan.write_bytes(b"not a plan")
    rebuilt, _ = load_engine(model_dir, "tensorrt", trt_cache_dir=cache, max_batch=2)
    assert isinstance(rebuilt, TensorRTEngine) and rebuilt.cache_hit is False
    rebuilt.close()

"""`screener models export-triton`: the Triton model repository entry, without a Triton."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from screener.core.errors import ModelError
from screener.model.modelcard import CARD_FILE, ONNX_FILE, sha256_file
from screener.model.triton_repo import PYTHON_MODEL_SOURCE, export_triton, triton_version


def _variant(src: Path, dest: Path, **changes: object) -> Path:
    """``src`` with card fields changed (same graph, another card and so another card sha256)."""
    shutil.copytree(src, dest)
    card = json.loads((dest / CARD_FILE).read_text())
    card.update(changes)
    (dest / CARD_FILE).write_text(json.dumps(card, indent=2))
    return dest


def test_versions_are_named_by_the_card_sha256_and_the_config_lists_the_newest_two(
    tiny_model_dir: Path, tmp_path: Path
):
    models = [tiny_model_dir] + [
        _variant(tiny_model_dir, tmp_path / f"v{i}", version=f"v{i}") for i in (1, 2)
    ]
    repo = tmp_path / "repo"
    done = [export_triton(m, repo, max_batch=16) for m in models]
    entry = repo / "cxr-screener"
    for model, exported in zip(models, done, strict=True):
        card_sha = sha256_file(model / CARD_FILE)
        assert exported.card_sha256 == card_sha and exported.triton_version == int(card_sha[:12], 16)
    assert done[-1].versions == (done[1].triton_version, done[2].triton_version)
    assert done[-1].removed == (done[0].triton_version,)
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        [str(done[1].triton_version), str(done[2].triton_version), "config.pbtxt"]
    )
    newest = entry / str(done[2].triton_version)
    assert sorted(p.name for p in newest.iterdir()) == [CARD_FILE, ONNX_FILE, "model.py"]
    assert (newest / "model.py").read_bytes() == PYTHON_MODEL_SOURCE.read_bytes()
    assert sha256_file(newest / ONNX_FILE) == sha256_file(tiny_model_dir / ONNX_FILE)
    config = (entry / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 16" in config and "dynamic_batching" in config
    assert f"versions: [{done[1].triton_version}, {done[2].triton_version}]" in config
    assert "dims: [3, 64, 64]" in config and 'name: "probs_b" data_type: TYPE_FP32 dims: [3]' in config
    for exported, version in ((done[1], "v1"), (done[2], "v2")):
        v = exported.triton_version
        assert f'key: "card_sha256:{v}" value: {{ string_value: "{exported.card_sha256}" }}' in config
        assert f'key: "screener_version:{v}" value: {{ string_value: "{version}" }}' in config
    assert str(done[0].triton_version) not in config
    # Exporting the served version again rewrites it under the same number.
    again = export_triton(models[2], repo, max_batch=16)
    assert again.triton_version == done[2].triton_version and again.removed == ()


def test_a_model_with_another_contract_or_kind_is_refused(tiny_model_dir: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    export_triton(tiny_model_dir, repo)
    preprocessing = json.loads((tiny_model_dir / CARD_FILE).read_text())["preprocessing"]
    bigger = _variant(
        tiny_model_dir,
        tmp_path / "big",
        version="big",
        input_size=96,
        preprocessing={**preprocessing, "input_size": 96},
    )
    with pytest.raises(
        ModelError, match=r"differs from version test-tiny-0 .* export it under another --model-name"
    ):
        export_triton(bigger, repo)
    with pytest.raises(ModelError, match="is a python entry, not onnxruntime"):
        export_triton(_variant(tiny_model_dir, tmp_path / "v3", version="v3"), repo, kind="onnxruntime")
    onnx_entry = export_triton(bigger, repo, model_name="cxr-big", kind="onnxruntime")
    config = (onnx_entry.model_dir / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "dims: [3, 96, 96]" in config
    assert not (onnx_entry.version_dir / "model.py").exists()


def test_tensorrt_entries_take_the_cached_plan_built_from_this_graph(tiny_model_dir: Path, tmp_path: Path):
    cache = tmp_path / "trt-cache"
    with pytest.raises(ModelError, match=r"no TensorRT plan for model\.onnx sha256"):
        export_triton(tiny_model_dir, tmp_path / "repo", kind="tensorrt", trt_cache_dir=cache)
    cache.mkdir()
    plan = b"serialized engine bytes"
    onnx_sha = sha256_file(tiny_model_dir / ONNX_FILE)
    (cache / "k1.plan").write_bytes(plan)
    meta = {"onnx_sha256": onnx_sha, "plan_sha256": hashlib.sha256(plan).hexdigest(), "gpu_name": "test"}
    (cache / "k1.json").write_text(json.dumps(meta))
    (cache / "k2.plan").write_bytes(b"another graph's plan")
    (cache / "k2.json").write_text(json.dumps({**meta, "onnx_sha256": "f" * 64}))
    done = export_triton(tiny_model_dir, tmp_path / "repo", kind="tensorrt", trt_cache_dir=cache)
    assert (done.version_dir / "model.plan").read_bytes() == plan
    assert not (done.version_dir / ONNX_FILE).exists()
    assert 'platform: "tensorrt_plan"' in (done.model_dir / "config.pbtxt").read_text()


def test_triton_version_needs_a_sha256():
    assert triton_version("ab" * 32) == int("ab" * 6, 16)
    with pytest.raises(ModelError, match="not a sha256"):
        triton_version("abc")

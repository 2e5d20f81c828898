"""Heatmaps end to end: `screener classify --heatmap DIR` on real radiographs (and an old model without
the output, re-exported with `trainer export --heatmap`), every CPU engine returning the same map, and
`screener serve` storing each prediction's map and sending a Secondary Capture with the overlay that a
PACS receives and dciodvfy accepts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from screener.model.engine.onnx_backend import OnnxRuntimeEngine
from screener.model.engine.torch_backend import HalfFused, TorchEngine
from screener.model.export import add_heatmap, export_model_dir
from screener.model.fused import load_fused_from_safetensors
from screener.model.modelcard import load_model_dir
from screener.results.sc import SC_SOP_CLASS_UID, SIZE
from tests.helpers import cli, free_port, reuid, rg1_dir, store, wait_for, wrap_png_as_dx

SCREENER = Path(sys.executable).with_name("screener")
TRAINER = Path(sys.executable).with_name("trainer")


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER")}
    env["SCREENER__DATABASE__URL"] = f"sqlite:///{root / 'screener.db'}"
    env["SCREENER__STORAGE__SPOOL_DIR"] = str(root / "spool")
    return env


def _run(program: Path, env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(program), *args], env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.fixture(scope="module")
def old_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported as models were before the heatmap output existed (no card section)."""
    loaded = load_model_dir(tiny_model_dir)
    out = tmp_path_factory.mktemp("old") / "no-heatmap"
    export_model_dir(
        load_fused_from_safetensors(loaded.weights_path, loaded.card),
        out,
        version="test-tiny-old",
        preprocessing=loaded.card.preprocessing,
        notes="exported without the heatmap output",
        heatmap=None,
    )
    return out


def test_classify_writes_one_overlay_png_per_classified_image(tiny_model_dir, cxr3_dir, tmp_path):
    pngs = sorted((cxr3_dir / "covid19").glob("*.png"))[:2]
    dicom = tmp_path / "rg1.dcm"
    reuid(rg1_dir() / "RG1_UNCR.dcm", dicom)
    missing = tmp_path / "missing.png"
    out_dir = tmp_path / "heatmaps"
    env = _env(tmp_path)
    res = _run(
        SCREENER,
        env,
        "classify",
        "--model",
        str(tiny_model_dir),
        "--json",
        "--heatmap",
        str(out_dir),
        *map(str, [*pngs, dicom, missing]),
        ok=False,
    )
    assert res.returncode == 1, res.stderr  # the missing file fails; the others are classified
    doc = json.loads(res.stdout)
    classified = [r for r in doc["results"] if r["status"] == "classified"]
    assert len(classified) == 3
    assert doc["results"][3]["status"] == "failed" and doc["results"][3]["heatmap"] is None
    written = sorted(out_dir.iterdir())
    assert [p.name for p in written] == [Path(r["heatmap"]).name for r in classified]
    assert written[2].name == "0002-rg1.png"
    size = load_model_dir(tiny_model_dir).card.input_size
    for path in written:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
    text = _run(
        SCREENER, env, "classify", "--model", str(tiny_model_dir), "--heatmap", str(out_dir), str(dicom)
    )
    assert f"{dicom}: heatmap: {out_dir / '0000-rg1.png'}" in text.stdout


def test_an_old_model_still_classifies_and_gets_the_output_by_re_export(old_model_dir, cxr3_dir, tmp_path):
    png = sorted((cxr3_dir / "normal").glob("*.png"))[0]
    env = _env(tmp_path)
    plain = json.loads(
        _run(SCREENER, env, "classify", "--model", str(old_model_dir), "--json", str(png)).stdout
    )
    assert plain["results"][0]["status"] == "classified" and plain["results"][0]["heatmap"] is None

    refused = _run(
        SCREENER,
        env,
        "classify",
        "--model",
        str(old_model_dir),
        "--heatmap",
        str(tmp_path / "h"),
        str(png),
        ok=False,
    )
    assert refused.returncode != 0
    assert "has no heatmap output" in refused.stderr and "trainer export" in refused.stderr
    assert not (tmp_path / "h").exists()

    new_dir = tmp_path / "with-heatmap"
    _run(TRAINER, env, "export", str(old_model_dir), "--heatmap", "--out", str(new_dir))
    card = load_model_dir(new_dir).card
    assert card.heatmap is not None and card.parent_version == "test-tiny-old"
    again = json.loads(
        _run(
            SCREENER,
            env,
            "classify",
            "--model",
            str(new_dir),
            "--json",
            "--heatmap",
            str(tmp_path / "h"),
            str(png),
        ).stdout
    )
    assert again["results"][0]["probs"] == pytest.approx(plain["results"][0]["probs"], abs=1e-5)
    assert Path(again["results"][0]["heatmap"]).is_file()
    with pytest.raises(Exception, match="already exists"):
        add_heatmap(old_model_dir, new_dir)


def test_onnxruntime_and_torch_engines_return_the_same_heatmap(tiny_model_dir, cxr3_dir):
    from screener.imaging.pixels import preprocess_file

    loaded = load_model_dir(tiny_model_dir)
    files = sorted((cxr3_dir / "covid19").glob("*.png"))[:2] + sorted((cxr3_dir / "normal").glob("*.png"))[:1]
    batch = np.stack([preprocess_file(f, loaded.card.preprocessing, 100_000_000) for f in files])
    onnx_out = OnnxRuntimeEngine(loaded, threads=1).infer(batch)
    torch_out = TorchEngine(loaded, device="cpu", threads=1).infer(batch)
    assert loaded.card.heatmap is not None
    side = loaded.card.heatmap.size
    assert onnx_out.heatmap is not None and torch_out.heatmap is not None
    assert onnx_out.heatmap.shape == (3, side, side)
    np.testing.assert_allclose(onnx_out.heatmap, torch_out.heatmap, atol=2e-3)
    assert np.all(onnx_out.heatmap.reshape(3, -1).max(axis=1) > 0.99)
    # The CUDA path's FP16 networks (run here on the CPU): the map from FP16 features stays close.
    half = HalfFused(load_fused_from_safetensors(loaded.weights_path, loaded.card), torch.contiguous_format)
    with torch.no_grad():
        half_out = half(torch.from_numpy(batch))
    assert half_out[-1].dtype == torch.float32 and tuple(half_out[-1].shape) == (3, side, side)
    same = half_out[0].argmax(dim=1).numpy() == onnx_out.probs.argmax(axis=1)
    np.testing.assert_allclose(half_out[-1].numpy()[same], onnx_out.heatmap[same], atol=5e-2)


class _ReceivingPacs:
    """A storage SCP on loopback that keeps every data set it receives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Any] = []
        ae = AE(ae_title="HEATPACS")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


def test_serve_stores_heatmaps_and_sends_a_secondary_capture_with_the_overlay(
    make_server, tiny_model_dir, cxr3_dir, tmp_path
):
    pacs = _ReceivingPacs()
    server = make_server(
        SCREENER__PACS__DESTINATIONS=f'[{{ae_title="HEATPACS", host="127.0.0.1", port={pacs.port}}}]',
        SCREENER__PACS__SEND_SECONDARY_CAPTURE="true",
        SCREENER__INFERENCE__STUDY_SETTLE_SECONDS="2",
        SCREENER__INFERENCE__MAX_WAIT_MS="100",
        SCREENER__INFERENCE__POLL_SECONDS="0.2",
        SCREENER__INFERENCE__PREPROCESS_WORKERS="1",
    )
    cli(server, "db", "upgrade")
    cli(server, "models", "register", str(tiny_model_dir), "--activate")
    server.start()
    try:
        study = generate_uid()
        pngs = (
            sorted((cxr3_dir / "covid19").glob("*.png"))[:1] + sorted((cxr3_dir / "normal").glob("*.png"))[:1]
        )
        assert store(server.port, [wrap_png_as_dx(p, study_uid=study) for p in pngs]) == [0x0000, 0x0000]
        wait_for(
            lambda: any(str(ds.SOPClassUID) == SC_SOP_CLASS_UID for ds in pacs.received),
            240,
            "the SC at the PACS",
        )
        stored = server.rows("SELECT heatmap FROM predictions")
        assert len(stored) == 2 and all(
            row[0] is not None and bytes(row[0])[:4] == b"\x89PNG" for row in stored
        )
    finally:
        server.stop()
        pacs.stop()
    sc = next(ds for ds in pacs.received if str(ds.SOPClassUID) == SC_SOP_CLASS_UID)
    assert sc.StudyInstanceUID == study
    assert sc.PhotometricInterpretation == "RGB" and (sc.Rows, sc.Columns) == (SIZE, 2 * SIZE)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    pixels = dcmread(path).pixel_array
    left = pixels[:, :SIZE].astype(int)
    assert (left.max(axis=2) - left.min(axis=2)).max() > 40  # coloured: the overlay is drawn
    assert left.mean() > 10  # and the radiograph under it
    if shutil.which("dciodvfy") is not None:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], errors

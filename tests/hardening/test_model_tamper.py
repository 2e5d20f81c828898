"""Tampered model directories: a flipped byte, ONNX external data pointing outside the directory.

Both are refused with an error naming the file (or tensor and location) before any inference engine sees
the graph; a running `screener serve` whose active model is switched to a tampered one keeps serving the
previous model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from screener.core.errors import ModelError, ModelIntegrityError
from screener.model.engine import load_engine
from screener.model.modelcard import CARD_FILE, ONNX_FILE, WEIGHTS_FILE, load_model_dir, sha256_file
from tests.helpers import SCREENER, cli, rg1_pixels, small_cr, store, wait_for


def _copy(src: Path, dst: Path, *, version: str | None = None, link_weights: bool = True) -> Path:
    """A copy of a model directory; the weights are hard-linked (never modified through it) when asked."""
    dst.mkdir()
    for name in (CARD_FILE, ONNX_FILE):
        shutil.copyfile(src / name, dst / name)
    if link_weights:
        try:
            os.link(src / WEIGHTS_FILE, dst / WEIGHTS_FILE)
        except OSError:
            shutil.copyfile(src / WEIGHTS_FILE, dst / WEIGHTS_FILE)
    else:
        shutil.copyfile(src / WEIGHTS_FILE, dst / WEIGHTS_FILE)
    if version is not None:
        card = json.loads((dst / CARD_FILE).read_text())
        card["version"] = version
        (dst / CARD_FILE).write_text(json.dumps(card))
    return dst


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


def _externalise(model_dir: Path, location: str, *, write_bytes_to: Path | None = None) -> str:
    """Move the smallest float initializer of model.onnx to external data at ``location``.

    Re-signs the card (as an attacker with write access to the directory would), so only the external-data
    check stands between the graph and the engine. Returns the tensor's name.
    """
    import onnx

    path = model_dir / ONNX_FILE
    model = onnx.load(str(path), load_external_data=False)
    # Pick by element count: touching ``raw_data`` copies it, which is slow over a whole model.
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims]
    tensor = min(floats, key=lambda t: int(np.prod(t.dims)))
    raw = bytes(tensor.raw_data)
    assert raw, f"{tensor.name} keeps its data in raw_data"
    if write_bytes_to is not None:
        write_bytes_to.write_bytes(raw)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())
    card = json.loads((model_dir / CARD_FILE).read_text())
    card["files"][ONNX_FILE] = sha256_file(path)
    if write_bytes_to is not None and write_bytes_to.parent == model_dir:
        card["files"][write_bytes_to.name] = sha256_file(write_bytes_to)
    (model_dir / CARD_FILE).write_text(json.dumps(card))
    return str(tensor.name)


def test_one_flipped_byte_in_any_model_file_is_refused(tiny_model_dir: Path, tmp_path: Path, figure):
    tampered = _copy(tiny_model_dir, tmp_path / "flipped", link_weights=False)
    tried = refused = 0
    for name in (ONNX_FILE, WEIGHTS_FILE):
        size = (tampered / name).stat().st_size
        for offset in (0, size // 2, size - 1):
            _flip(tampered / name, offset)
            tried += 1
            with pytest.raises(
                ModelIntegrityError, match=rf"{name.replace('.', '[.]')} sha256 [0-9a-f]{{64}} != card"
            ):
                load_model_dir(tampered)
            refused += 1
            _flip(tampered / name, offset)  # restore for the next position
    with pytest.raises(ModelIntegrityError, match=r"weights\.safetensors"):
        _flip(tampered / WEIGHTS_FILE, 4096)
        load_engine(tampered, "torch")
    load_model_dir(tiny_model_dir)  # the original, shared through no link, is untouched
    figure("flipped_bytes_refused", refused, "of", tried=tried)
    assert refused == tried == 6


OUTSIDE_LOCATIONS = {
    "parent-dirs": "../../etc/passwd",
    "absolute": "/etc/passwd",
    "nested-climb": "sub/../../outside.bin",
    "windows-absolute": "C:\\Windows\\win.ini",
    "windows-climb": "..\\..\\etc\\passwd",
}


@pytest.mark.parametrize("kind", sorted(OUTSIDE_LOCATIONS))
def test_external_data_outside_the_model_dir_is_refused(tiny_model_dir: Path, tmp_path: Path, kind: str):
    bad = _copy(tiny_model_dir, tmp_path / kind)
    location = OUTSIDE_LOCATIONS[kind]
    tensor = _externalise(bad, location)
    with pytest.raises(ModelError) as refused:
        load_model_dir(bad)
    message = str(refused.value)
    assert f"tensor {tensor!r}" in message and repr(location) in message
    assert "outside the model directory" in message


def test_external_data_through_a_symlink_or_unlisted_file_is_refused(
    tiny_model_dir: Path, tmp_path: Path, figure
):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\x00" * 4096)
    cases = {}
    linked = _copy(tiny_model_dir, tmp_path / "linked")
    (linked / "data.bin").symlink_to(outside)
    _externalise(linked, "data.bin")
    cases["symlink"] = (linked, "through a symbolic link")
    unlisted = _copy(tiny_model_dir, tmp_path / "unlisted")
    _externalise(unlisted, "extra.bin", write_bytes_to=tmp_path / "extra.bin")
    shutil.move(tmp_path / "extra.bin", unlisted / "extra.bin")  # inside, but no digest on the card
    cases["unlisted"] = (unlisted, "not listed on the model card")
    missing = _copy(tiny_model_dir, tmp_path / "missing")
    _externalise(missing, "nowhere.bin")
    cases["missing"] = (missing, "not a regular file")
    for model_dir, problem in cases.values():
        with pytest.raises(ModelError, match=problem):
            load_model_dir(model_dir)
    for backend in ("onnxruntime", "torch"):  # every engine goes through the same check
        with pytest.raises(ModelError, match="through a symbolic link"):
            load_engine(linked, backend)
    # The CLI a PACS administrator uses says the same and exits non-zero.
    res = subprocess.run(
        [str(SCREENER), "models", "register", str(linked)],
        cwd=tmp_path,
        env={**os.environ, "SCREENER__DATABASE__URL": f"sqlite:///{tmp_path / 'cli.db'}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "through a symbolic link" in res.stderr, res.stdout + res.stderr
    tried = len(cases) + len(OUTSIDE_LOCATIONS)
    figure("external_data_locations_refused", tried, "of", tried=tried)


def test_external_data_inside_the_model_dir_and_on_the_card_still_loads(tiny_model_dir: Path, tmp_path: Path):
    """The check refuses escapes, not the legitimate ONNX external-data layout."""
    good = _copy(tiny_model_dir, tmp_path / "external-ok")
    _externalise(good, "tensors.bin", write_bytes_to=good / "tensors.bin")
    loaded = load_model_dir(good)
    assert "tensors.bin" in loaded.card.files
    batch = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    engines = [load_engine(d, "onnxruntime")[0] for d in (tiny_model_dir, good)]
    try:
        np.testing.assert_allclose(engines[0].infer(batch).probs, engines[1].infer(batch).probs, atol=1e-6)
    finally:
        for engine in engines:
            engine.close()


@pytest.mark.slow
def test_serving_keeps_the_previous_model_when_a_tampered_one_is_activated(
    make_server, tiny_model_dir: Path, tmp_path: Path, figure
):
    server = make_server(
        SCREENER__INFERENCE__POLL_SECONDS="0.1",
        SCREENER__INFERENCE__PREPROCESS_WORKERS="1",
        SCREENER__INFERENCE__MAX_BATCH="4",
        SCREENER__INFERENCE__STUDY_SETTLE_SECONDS="600",
    )
    flipped = _copy(tiny_model_dir, tmp_path / "flipped", version="tamper-flip")
    escaping = _copy(tiny_model_dir, tmp_path / "escaping", version="tamper-escape")
    cli(server, "db", "upgrade")
    cli(server, "models", "register", str(tiny_model_dir), "--activate")
    for model in (flipped, escaping):  # registered while intact, tampered with afterwards
        cli(server, "models", "register", str(model))
    _flip(flipped / ONNX_FILE, (flipped / ONNX_FILE).stat().st_size // 3)
    _externalise(escaping, "../../../../../../etc/passwd")
    server.start()
    pixels = rg1_pixels(128)
    sent = 0

    def classified() -> int:
        return int(server.rows("SELECT count(*) FROM instances WHERE status = 'classified'")[0][0])

    def send(n: int) -> None:
        nonlocal sent
        assert store(server.port, [small_cr(pixels, study_uid=generate_uid()) for _ in range(n)]) == [0] * n
        sent += n
        wait_for(lambda: classified() == sent, 120, f"{sent} instances classified")

    send(2)
    for version, reason in (
        ("tamper-flip", "model.onnx sha256"),
        ("tamper-escape", "outside the model directory"),
    ):
        cli(server, "models", "activate", version)  # the registry accepts it; the worker must not
        wait_for(
            lambda v=version: any(
                e["event"] == "model.load_failed" and e["version"] == v for e in server.log_events()
            ),
            60,
            f"the worker refusing {version}",
        )
        failed = [
            e for e in server.log_events() if e["event"] == "model.load_failed" and e["version"] == version
        ]
        assert reason in failed[-1]["error"] and failed[-1]["serving"] == "test-tiny-0"
        send(1)
    versions = server.rows(
        "SELECT m.version, count(*) FROM predictions p JOIN model_versions m ON m.id = p.model_version_id "
        "GROUP BY m.version"
    )
    assert versions == [("test-tiny-0", sent)], versions
    assert server.proc is not None and server.proc.poll() is None, "serve kept running"
    loaded = [e["version"] for e in server.log_events() if e["event"] == "model.loaded"]
    assert loaded == ["test-tiny-0"]
    figure("classified_by_previous_model_after_bad_activation", sent, "instances", tampered_activations=2)

"""The worker serves only what was registered, and a poison instance fails alone.

1. A registered model directory rewritten after registration (files and card.json together, so the
   card's own digests still match) is refused with a ModelIntegrityError naming the version, the file and
   both digests; the worker keeps serving the model it had.
2. An instance whose processing kills its process is retried on its own: the rest of its batch is
   classified after one shared crash, and only it is marked failed after MAX_ATTEMPTS crashes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session, sessionmaker

import screener.inference.batch as batch_module
from screener.core.config import EligibilityConfig, load_config
from screener.core.db.migrate import upgrade
from screener.core.db.models import Instance, ModelVersion, Prediction
from screener.core.errors import ModelError, ModelIntegrityError
from screener.imaging.pixels import PreprocessSpec
from screener.inference.model_slot import ModelSlot
from screener.inference.prepare import Prepared, prepare_instance
from screener.inference.worker import MAX_ATTEMPTS
from screener.model.modelcard import (
    CARD_FILE,
    INT8_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    Int8Card,
    ModelCard,
    read_card,
    sha256_file,
)
from screener.model.registry import activate_version, register, verify_registered
from screener.ops.app import serve
from tests.helpers import cli, free_port, rg1_pixels, small_cr, store, wait_for

POISON_MARK = "crash-the-decoder"


def crashing_prepare(
    instance_id: int,
    path: str,
    spec: PreprocessSpec,
    rules: EligibilityConfig,
    reduced_decode: bool = False,
) -> Prepared:
    """``prepare_instance``, except that an instance marked as poison kills its process.

    Stands in for a codec that aborts the process on one corrupt image (a real one is not reproducible on
    demand); runs in the worker's spawned pool processes, which import it from this module.
    """
    if dcmread(path, stop_before_pixels=True).get("ImageComments") == POISON_MARK:
        os.kill(os.getpid(), signal.SIGKILL)
    return prepare_instance(instance_id, path, spec, rules, reduced_decode)


def _database(tmp_path: Path) -> tuple[str, Engine]:
    url = f"sqlite:///{tmp_path / 'screener.db'}"
    engine = create_engine(url)
    upgrade(engine)
    return url, engine


def _copy(src: Path, dst: Path, version: str) -> Path:
    shutil.copytree(src, dst)
    card = json.loads((dst / CARD_FILE).read_text())
    card["version"] = version
    (dst / CARD_FILE).write_text(json.dumps(card))
    return dst


def _rewrite(model_dir: Path, name: str) -> None:
    """Change ``name`` and re-sign the card, as someone with write access to the directory could."""
    path = model_dir / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor's raw data: still a valid file, another model
    path.write_bytes(bytes(data))
    card = json.loads((model_dir / CARD_FILE).read_text())
    card["files"][name] = sha256_file(path)
    (model_dir / CARD_FILE).write_text(json.dumps(card))


def _add_int8(model_dir: Path, *, passed: bool) -> None:
    """An ``int8`` section and file on the card (the graph is a copy of model.onnx: the check is digests)."""
    shutil.copyfile(model_dir / ONNX_FILE, model_dir / INT8_FILE)
    card = read_card(model_dir)
    digest = sha256_file(model_dir / INT8_FILE)
    int8 = Int8Card(
        file=INT8_FILE,
        sha256=digest,
        passed=passed,
        gate={"n": 100, "thresholds": {}},
        calibration={"count": 10, "digest": "0" * 64},
        quantization={},
        created_at="2024-01-01T00:00:00+00:00",
    )
    card = dataclasses.replace(card, files={**card.files, INT8_FILE: digest}, int8=int8)
    (model_dir / CARD_FILE).write_text(card.to_json())


def _slot(engine: Engine, retry_seconds: float) -> ModelSlot:
    config = load_config(
        environ={"SCREENER__INFERENCE__BACKEND": "onnxruntime", "SCREENER__INFERENCE__THREADS": "1"}
    )
    return ModelSlot(config.inference, sessionmaker(engine), retry_seconds=retry_seconds)


def _session(engine: Engine) -> Session:
    return Session(engine, expire_on_commit=False)


def _activate(engine: Engine, version: str) -> None:
    with _session(engine) as session, session.begin():
        activate_version(session, version)


def test_a_rewritten_registered_model_is_refused_and_the_previous_one_keeps_serving(
    tiny_model_dir: Path, tmp_path: Path
):
    _, engine = _database(tmp_path)
    swapped_onnx = _copy(tiny_model_dir, tmp_path / "swap-onnx", "swap-onnx")
    swapped_weights = _copy(tiny_model_dir, tmp_path / "swap-weights", "swap-weights")
    added_int8 = _copy(tiny_model_dir, tmp_path / "added-int8", "added-int8")
    with _session(engine) as session, session.begin():
        register(session, tiny_model_dir, activate=True)
        for model in (swapped_onnx, swapped_weights, added_int8):
            register(session, model)  # intact at registration
    recorded_onnx = sha256_file(swapped_onnx / ONNX_FILE)
    recorded_weights = sha256_file(swapped_weights / WEIGHTS_FILE)
    _rewrite(swapped_onnx, ONNX_FILE)
    _rewrite(swapped_weights, WEIGHTS_FILE)
    _add_int8(added_int8, passed=True)  # would be served on CPU with inference.precision = auto

    slot = _slot(engine, retry_seconds=3600)
    try:
        model = slot.refresh()
        assert model is not None and model.version == "test-tiny-0"
        serving = model.engine
        refusals = {
            "swap-onnx": (ONNX_FILE, recorded_onnx, sha256_file(swapped_onnx / ONNX_FILE), "new version"),
            "swap-weights": (
                WEIGHTS_FILE,
                recorded_weights,
                sha256_file(swapped_weights / WEIGHTS_FILE),
                "new version",
            ),
            "added-int8": (INT8_FILE, None, sha256_file(added_int8 / INT8_FILE), "screener models register"),
        }
        for version, (name, expected, found, remedy) in refusals.items():
            _activate(engine, version)
            with Session(engine) as session:
                row = session.scalars(select(ModelVersion).where(ModelVersion.version == version)).one()
            model_dir = Path(row.path)
            with pytest.raises(ModelIntegrityError) as refused:
                verify_registered(row, read_card(model_dir), model_dir)
            message = str(refused.value)
            assert f"model version {version}" in message and name in message and remedy in message
            assert found[:12] in message
            assert expected is None or expected[:12] in message
            model = slot.refresh()
            assert model is not None and model.version == "test-tiny-0" and model.engine is serving, version
            assert slot.refused is not None and slot.retired == []
        # A card edited without touching any file (thresholds: what the SR reports) is refused too.
        edited = _copy(tiny_model_dir, tmp_path / "edited", "edited")
        with _session(engine) as session, session.begin():
            register(session, edited)
        card = json.loads((edited / CARD_FILE).read_text())
        card["thresholds"] = {"covid19": 0.99}
        (edited / CARD_FILE).write_text(json.dumps(card))
        _activate(engine, "edited")
        with Session(engine) as session:
            row = session.scalars(select(ModelVersion).where(ModelVersion.version == "edited")).one()
        with pytest.raises(ModelIntegrityError, match="thresholds on the card differ"):
            verify_registered(row, read_card(edited), edited)
        assert slot.refresh() is model and slot.refused is not None  # not tried again for retry_seconds
        # The intended change is recorded by registering again; then the worker loads it.
        with _session(engine) as session, session.begin():
            register(session, edited)
        edited_model = slot.refresh()  # registered again: tried at once, not after retry_seconds
        assert edited_model is not None and edited_model.version == "edited"
        assert edited_model.thresholds == {"covid19": 0.99}
        # The engine it replaced is retired, not closed: a batch prepared for it may still be in flight.
        assert slot.retired == [serving]
        slot.close_retired()
        assert slot.retired == []
    finally:
        slot.close()
        engine.dispose()


def test_registering_again_records_an_int8_export_but_never_another_model(
    tiny_model_dir: Path, tmp_path: Path
):
    _, engine = _database(tmp_path)
    model = _copy(tiny_model_dir, tmp_path / "m", "int8-later")
    with _session(engine) as session, session.begin():
        row = register(session, model)
    recorded = ModelCard.from_json(row.card_json)
    assert set(recorded.files) == {ONNX_FILE, WEIGHTS_FILE}
    _add_int8(model, passed=False)  # what `trainer export --int8` does to the directory
    with pytest.raises(ModelIntegrityError, match=rf"{INT8_FILE} \(sha256 [0-9a-f]{{12}}\) was not part"):
        verify_registered(row, read_card(model), model)
    with _session(engine) as session, session.begin():
        row = register(session, model)
        int8_digest = sha256_file(model / INT8_FILE)
        assert ModelCard.from_json(row.card_json).files[INT8_FILE] == int8_digest
    verify_registered(row, read_card(model), model)  # recorded now: served again
    # A replaced INT8 graph is checked against the recorded digest, expected and found named.
    _rewrite(model, INT8_FILE)
    card = json.loads((model / CARD_FILE).read_text())
    card["int8"]["sha256"] = card["files"][INT8_FILE]
    (model / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelIntegrityError) as refused:
        verify_registered(row, read_card(model), model)
    assert f"{INT8_FILE} sha256 was {int8_digest[:12]} at registration" in str(refused.value)
    assert sha256_file(model / INT8_FILE)[:12] in str(refused.value)
    # Other weights under the same version are another model: registration refuses them.
    _rewrite(model, WEIGHTS_FILE)
    with Session(engine) as session, pytest.raises(ModelError, match=r"different weights\.safetensors"):
        register(session, model)
    engine.dispose()


@pytest.fixture
def poison_server(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[int, Engine]]:
    """``serve`` in this process (so its pool runs :func:`crashing_prepare`) on SQLite with the tiny model."""
    monkeypatch.setattr(batch_module, "prepare_instance", crashing_prepare)
    monkeypatch.chdir(tmp_path)
    url, engine = _database(tmp_path)
    with _session(engine) as session, session.begin():
        register(session, tiny_model_dir, activate=True)
    port = free_port()
    config = load_config(
        environ={
            "SCREENER__DATABASE__URL": url,
            "SCREENER__LISTENER__PORT": str(port),
            "SCREENER__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
            "SCREENER__STORAGE__MIN_FREE_BYTES": "0",
            "SCREENER__METRICS__PORT": "0",
            "SCREENER__INFERENCE__BACKEND": "onnxruntime",
            "SCREENER__INFERENCE__THREADS": "1",
            "SCREENER__INFERENCE__PREPROCESS_WORKERS": "1",
            "SCREENER__INFERENCE__MAX_BATCH": "8",
            "SCREENER__INFERENCE__MAX_WAIT_MS": "5000",  # the whole association lands in one batch
            "SCREENER__INFERENCE__POLL_SECONDS": "0.1",
            "SCREENER__INFERENCE__STUDY_SETTLE_SECONDS": "600",
        }
    )
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(config, stop), daemon=True)
    thread.start()
    try:
        yield port, engine
    finally:
        stop.set()
        thread.join(timeout=90)
        engine.dispose()
    assert not thread.is_alive(), "serve did not stop"


def test_a_poison_instance_fails_alone_and_its_batch_is_classified(poison_server: tuple[int, Engine]):
    port, engine = poison_server
    pixels = rg1_pixels(128)
    study = generate_uid()
    batch = [small_cr(pixels, study_uid=study) for _ in range(5)]
    batch[2].ImageComments = POISON_MARK
    poison_uid = str(batch[2].SOPInstanceUID)

    def statuses() -> dict[str, tuple[str, int, str | None]]:
        with Session(engine) as session:
            rows = session.execute(
                select(Instance.sop_instance_uid, Instance.status, Instance.attempts, Instance.status_reason)
            ).all()
        return {r[0]: (str(getattr(r[1], "value", r[1])), int(r[2]), r[3]) for r in rows}

    assert _store_when_listening(port, batch) == [0x0000] * len(batch)
    wait_for(
        lambda: all(s[0] in ("classified", "failed") for s in statuses().values()) and len(statuses()) == 5,
        180,
        "every instance classified or failed",
    )
    final = statuses()
    poison = final.pop(poison_uid)
    assert poison == (
        "failed",
        MAX_ATTEMPTS,
        f"processing crashed {MAX_ATTEMPTS} times (its decoder or inference process died); not retried",
    )
    # Its neighbours shared the first crash (one attempt) and were then classified on their own.
    assert sorted(final.values()) == [("classified", 2, None)] * 4
    with Session(engine) as session:
        predicted = session.scalars(select(Prediction.batch_size)).all()
    assert predicted == [1, 1, 1, 1]


def _store_when_listening(port: int, batch: list[Dataset]) -> list[int | None]:
    """``store`` once the in-process listener accepts associations."""
    result: list[int | None] = []

    def sent() -> bool:
        nonlocal result
        result = store(port, batch)
        return result[0] is not None

    wait_for(sent, 60, "the listener to accept the association")
    return result


def test_a_running_server_refuses_a_rewritten_model(make_server, tiny_model_dir: Path, tmp_path: Path):
    """`screener serve` as a PACS administrator runs it: the refusal is logged, classification goes on."""
    server = make_server(
        SCREENER__INFERENCE__POLL_SECONDS="0.1",
        SCREENER__INFERENCE__PREPROCESS_WORKERS="1",
        SCREENER__INFERENCE__STUDY_SETTLE_SECONDS="600",
    )
    swapped = _copy(tiny_model_dir, tmp_path / "swapped", "swapped")
    cli(server, "db", "upgrade")
    cli(server, "models", "register", str(tiny_model_dir), "--activate")
    cli(server, "models", "register", str(swapped))
    recorded = sha256_file(swapped / ONNX_FILE)
    _rewrite(swapped, ONNX_FILE)
    server.start()
    pixels = rg1_pixels(128)

    def classified() -> int:
        return int(server.rows("SELECT count(*) FROM instances WHERE status = 'classified'")[0][0])

    assert store(server.port, [small_cr(pixels, study_uid=generate_uid())]) == [0]
    wait_for(lambda: classified() == 1, 120, "the first instance classified")
    cli(server, "models", "activate", "swapped")
    wait_for(
        lambda: any(e["event"] == "model.load_failed" for e in server.log_events()),
        60,
        "the worker refusing the rewritten model",
    )
    failed = [e for e in server.log_events() if e["event"] == "model.load_failed"][-1]
    assert failed["version"] == "swapped" and failed["serving"] == "test-tiny-0"
    assert f"model.onnx sha256 was {recorded[:12]} at registration" in failed["error"]
    assert store(server.port, [small_cr(pixels, study_uid=generate_uid())]) == [0]
    wait_for(lambda: classified() == 2, 120, "the second instance classified")
    versions = server.rows(
        "SELECT m.version, count(*) FROM predictions p JOIN model_versions m ON m.id = p.model_version_id "
        "GROUP BY m.version"
    )
    assert versions == [("test-tiny-0", 2)]
    assert [e["version"] for e in server.log_events() if e["event"] == "model.loaded"] == ["test-tiny-0"]

"""Results back to the PACS: Orthanc routes chest X-rays to us and receives our SR; retries, dead letters."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from tests.helpers import (
    FakePacs,
    Orthanc,
    Server,
    cli,
    reuid,
    rg1_dir,
    rg1_pixels,
    small_cr,
    store,
    wait_for,
    wrap_png_as_dx,
)

FAST_RETRY = {
    "SCREENER__PACS__BACKOFF_INITIAL_SECONDS": "0.3",
    "SCREENER__PACS__BACKOFF_MAX_SECONDS": "1",
    "SCREENER__PACS__SWEEP_SECONDS": "0.2",
    "SCREENER__PACS__TIMEOUT_SECONDS": "5",
}
PIPELINE = {
    "SCREENER__INFERENCE__STUDY_SETTLE_SECONDS": "2",
    "SCREENER__INFERENCE__MAX_WAIT_MS": "100",
    "SCREENER__INFERENCE__POLL_SECONDS": "0.2",
    "SCREENER__INFERENCE__PREPROCESS_WORKERS": "1",
}


def _server(make_server, model_dir: Path, destinations: str, **extra: str) -> Server:
    server = make_server(**{"SCREENER__PACS__DESTINATIONS": destinations, **PIPELINE, **FAST_RETRY, **extra})
    cli(server, "db", "upgrade")
    cli(server, "models", "register", str(model_dir), "--activate")
    return server


def _deliveries(server: Server) -> list[dict]:
    return json.loads(cli(server, "deliveries", "list", "--json").stdout)


@pytest.mark.slow
def test_orthanc_routes_chest_xrays_to_us_and_receives_sr_and_sc_once(
    make_server, model_dir, cxr3_dir, tmp_path
):
    server = make_server(**PIPELINE, **FAST_RETRY, SCREENER__PACS__SEND_SECONDARY_CAPTURE="true")
    orthanc = Orthanc(tmp_path / "orthanc", screener_port=server.port)
    server.overrides["SCREENER__PACS__DESTINATIONS"] = (
        f'[{{ae_title="ORTHANC", host="127.0.0.1", port={orthanc.dicom_port}}}]'
    )
    cli(server, "db", "upgrade")
    cli(server, "models", "register", str(model_dir), "--activate")
    server.start()
    orthanc.start()
    try:
        study = generate_uid()
        files = []
        for n, png in enumerate(
            [
                *sorted((cxr3_dir / "covid19").glob("*.png"))[:1],
                *sorted((cxr3_dir / "normal").glob("*.png"))[:1],
            ]
        ):
            wrap_png_as_dx(png, study_uid=study).save_as(tmp_path / f"dx{n}.dcm", enforce_file_format=True)
            files.append(tmp_path / f"dx{n}.dcm")
        reuid(rg1_dir() / "RG1_UNCR.dcm", tmp_path / "rg1.dcm", study_uid=study)
        files.append(tmp_path / "rg1.dcm")
        out = subprocess.run(
            ["storescu", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port), *map(str, files)],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        wait_for(lambda: len(orthanc.instances_of_modality(study, "SR")) >= 1, 240, "the SR in Orthanc")
        wait_for(
            lambda: (
                len(orthanc.instances_of_modality(study, "OT"))
                + len(orthanc.instances_of_modality(study, "SC"))
                >= 1
            ),
            60,
            "the Secondary Capture in Orthanc",
        )
        srs = orthanc.instances_of_modality(study, "SR")
        assert len(srs) == 1, "one SR per study, not per image"
        assert srs[0]["StudyInstanceUID"] == study
        assert server.rows("SELECT count(*) FROM predictions")[0][0] == 3
        deliveries = _deliveries(server)
        assert sorted(d["object"] for d in deliveries) == ["sc", "sr"]
        assert all(d["status"] == "sent" and d["attempts"] == 1 for d in deliveries)
    finally:
        orthanc.stop()


@pytest.mark.slow
def test_refused_then_busy_then_back_delivers_once_and_dead_letters_are_re_driven(
    make_server, tiny_model_dir
):
    pacs = FakePacs()
    # Retries come every second here; on a busy machine each `deliveries list` poll takes seconds, so the
    # default 12 attempts could run out (dead) before step 2. Exhausting them is not what this tests.
    server = _server(
        make_server,
        tiny_model_dir,  # delivery, not the model, is under test: the small one costs seconds less per start
        f'[{{ae_title="FAKEPACS", host="127.0.0.1", port={pacs.port}}}]',
        SCREENER__PACS__MAX_ATTEMPTS="1000",
    )
    server.start()
    study = generate_uid()
    assert store(server.port, [_rg1_dx(study)]) == [0x0000]
    # 1. The PACS is down: association refused, retried with backoff.
    wait_for(
        lambda: any(d["attempts"] >= 2 for d in _deliveries(server)), 240, "retries while the PACS is down"
    )
    assert _deliveries(server)[0]["status"] == "failed"
    assert "refused" in _deliveries(server)[0]["last_error"]
    # 2. It answers 0xA700 (out of resources): still retried.
    pacs.answer = 0xA700
    pacs.start()
    try:
        wait_for(lambda: any(s == 0xA700 for _, s in pacs.received), 30, "a 0xA700 answer")
        # The PACS has answered; the sender records the outcome once it reads that answer.
        wait_for(lambda: _deliveries(server)[0]["status"] != "pending", 30, "the outcome recorded")
        assert _deliveries(server)[0]["status"] == "failed"
        # 3. It comes back: delivered exactly once, always with the same SOP Instance UID.
        pacs.answer = 0x0000
        wait_for(lambda: _deliveries(server)[0]["status"] == "sent", 30, "the delivery to succeed")
        uids = {u for u, _ in pacs.received}
        assert len(uids) == 1
        assert [s for _, s in pacs.received].count(0x0000) == 1

        # A revision for a late instance goes out as a second SR with a new SOP Instance UID.
        assert store(server.port, [_rg1_dx(study)]) == [0x0000]
        wait_for(
            lambda: len(_deliveries(server)) == 2 and all(d["status"] == "sent" for d in _deliveries(server)),
            240,
            "the revised SR",
        )
        assert len({u for u, s in pacs.received if s == 0}) == 2

        # 4. 0xC000 (cannot understand) is fatal: dead at once; `deliveries retry --dead` re-drives it.
        pacs.answer = 0xC000
        study2 = generate_uid()
        assert store(server.port, [_rg1_dx(study2)]) == [0x0000]
        wait_for(lambda: any(d["status"] == "dead" for d in _deliveries(server)), 240, "a dead delivery")
        dead = next(d for d in _deliveries(server) if d["status"] == "dead")
        assert dead["attempts"] == 1 and "0xC000" in dead["last_error"]
        pacs.answer = 0x0000
        assert "re-driven: 1" in cli(server, "deliveries", "retry", "--dead").stdout
        wait_for(
            lambda: next(d for d in _deliveries(server) if d["id"] == dead["id"])["status"] == "sent",
            30,
            "the re-driven delivery",
        )
    finally:
        pacs.stop()


@pytest.mark.slow
def test_kill9_with_deliveries_pending_sends_each_once_after_restart(make_server, tiny_model_dir):
    pacs = FakePacs()
    server = _server(
        make_server,
        tiny_model_dir,
        f'[{{ae_title="FAKEPACS", host="127.0.0.1", port={pacs.port}}}]',
        SCREENER__PACS__BACKOFF_INITIAL_SECONDS="1",
    )
    server.start()
    studies = [generate_uid() for _ in range(2)]
    assert store(server.port, [_rg1_dx(s) for s in studies]) == [0x0000, 0x0000]
    wait_for(lambda: len(_deliveries(server)) == 2, 240, "two pending deliveries")
    server.kill9()
    pacs.start()
    try:
        server.start()
        wait_for(
            lambda: all(d["status"] == "sent" for d in _deliveries(server)), 60, "deliveries after restart"
        )
        uids = [u for u, s in pacs.received if s == 0]
        assert len(uids) == 2 and len(set(uids)) == 2, "each SR sent exactly once"
        audit = server.rows("SELECT action, subject FROM audit_events ORDER BY id")
        actions = [a for a, _ in audit]
        assert actions.count("instance.received") == 2
        assert actions.count("result.produced") == 2
        assert sorted(s for a, s in audit if a == "result.delivered") == sorted(uids)
    finally:
        pacs.stop()


def _rg1_dx(study: str) -> Dataset:
    """A small real chest radiograph (RG1 pixels) in ``study``."""
    return small_cr(rg1_pixels(256), study_uid=study)

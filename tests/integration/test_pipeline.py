"""End to end on CPU: DCMTK sends real chest radiographs to `screener serve`, the worker classifies them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.helpers import (
    Server,
    cli,
    reuid,
    rg1_dir,
    store,
    wait_for,
    wrap_png_as_dx,
)

FINAL = ("classified", "skipped", "failed")


def _dcmtk(tool: str, server: Server, files: list[Path]) -> None:
    """Send with a DCMTK tool: storescu proposes uncompressed syntaxes, dcmsend each file's own."""
    out = subprocess.run(
        [tool, "-aec", "CXRSCREENER", "127.0.0.1", str(server.port), *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _all_final(server: Server, n: int) -> bool:
    rows = server.rows("SELECT status FROM instances")
    return len(rows) == n and all(r[0] in FINAL for r in rows)


def _corrupt_j2k(src: Path, dst: Path, study_uid: str) -> None:
    from pydicom.encaps import encapsulate, generate_frames

    ds = reuid(src, dst, study_uid=study_uid)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:400]])  # a truncated codestream in a valid encapsulation
    ds.save_as(dst, enforce_file_format=True)


@pytest.fixture
def served(make_server, model_dir: Path) -> Server:
    server = make_server(
        SCREENER__INFERENCE__STUDY_SETTLE_SECONDS="1",
        SCREENER__INFERENCE__MAX_BATCH="4",
        SCREENER__INFERENCE__MAX_WAIT_MS="100",
        SCREENER__INFERENCE__PREPROCESS_WORKERS="2",
        SCREENER__INFERENCE__LEASE_SECONDS="10",
        SCREENER__INFERENCE__POLL_SECONDS="0.2",
        SCREENER__LISTENER__ACCEPT_ALL_STORAGE="true",
    )
    cli(server, "db", "upgrade")
    res = cli(server, "models", "register", str(model_dir), "--activate")
    assert "test-random-0" in res.stdout
    return server


@pytest.mark.slow
def test_real_radiographs_are_classified_exactly_once(served: Server, cxr3_dir: Path, tmp_path: Path):
    server = served.start()
    study_a, study_b = generate_uid(), generate_uid()
    rg1 = [reuid(rg1_dir() / n, tmp_path / n, study_uid=study_a) for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm")]
    pngs = [
        p for c in ("covid19", "normal", "viral_pneumonia") for p in sorted((cxr3_dir / c).glob("*.png"))[:2]
    ]
    wrapped = []
    for n, png in enumerate(pngs):
        ds = wrap_png_as_dx(png, study_uid=study_b)
        ds.save_as(tmp_path / f"dx{n}.dcm", enforce_file_format=True)
        wrapped.append(tmp_path / f"dx{n}.dcm")
    lateral = wrap_png_as_dx(pngs[0], study_uid=study_b, view="LL")
    lateral.save_as(tmp_path / "lateral.dcm", enforce_file_format=True)
    _corrupt_j2k(rg1_dir() / "RG1_J2KR.dcm", tmp_path / "broken.dcm", study_a)

    _dcmtk("storescu", server, [tmp_path / "RG1_UNCR.dcm", *wrapped, tmp_path / "lateral.dcm"])
    _dcmtk("dcmsend", server, [tmp_path / "RG1_J2KR.dcm", tmp_path / "broken.dcm"])
    ct = dcmread(get_testdata_file("CT_small.dcm"))
    assert store(server.port, [ct]) == [0x0000]

    n = len(rg1) + len(wrapped) + 3
    wait_for(lambda: _all_final(server, n), 240, "every instance to be classified, skipped or failed")
    by_uid = {
        r[0]: (r[1], r[2])
        for r in server.rows("SELECT sop_instance_uid, status, status_reason FROM instances")
    }
    for ds in rg1:
        assert by_uid[ds.SOPInstanceUID][0] == "classified"
    assert by_uid[lateral.SOPInstanceUID][0] == "skipped"
    assert "view position LL" in by_uid[lateral.SOPInstanceUID][1]
    assert by_uid[ct.SOPInstanceUID][0] == "skipped"
    assert "not a chest radiography storage class" in by_uid[ct.SOPInstanceUID][1]
    broken_uid = dcmread(tmp_path / "broken.dcm", stop_before_pixels=True).SOPInstanceUID
    status, reason = by_uid[broken_uid]
    assert status == "failed"
    assert "1.2.840.10008.1.2.4.90" in reason or "JPEG 2000" in reason

    preds = server.rows(
        "SELECT i.sop_instance_uid, count(*), min(p.label), "
        "min(json_extract(p.probs, '$.normal') + json_extract(p.probs, '$.covid19') "
        "+ json_extract(p.probs, '$.viral_pneumonia')) "
        "FROM predictions p JOIN instances i ON i.id = p.instance_id GROUP BY i.sop_instance_uid"
    )
    classified = {u for u, (s, _) in by_uid.items() if s == "classified"}
    assert {p[0] for p in preds} == classified
    assert len(classified) == len(rg1) + len(wrapped)
    assert all(p[1] == 1 for p in preds), "exactly one prediction per instance per model version"
    assert all(abs(p[3] - 1.0) < 1e-4 for p in preds)
    assert {p[2] for p in preds} <= {"normal", "covid19", "viral_pneumonia"}

    def verdicts() -> dict[str, tuple]:
        rows = server.rows(
            "SELECT s.study_instance_uid, r.verdict, r.instances_classified, r.instances_skipped, "
            "r.instances_failed FROM study_results r JOIN studies s ON s.id = r.study_id"
        )
        return {v[0]: tuple(v[1:]) for v in rows}

    wait_for(lambda: {study_a, study_b, ct.StudyInstanceUID} <= set(verdicts()), 60, "study verdicts")
    got = verdicts()
    assert got[ct.StudyInstanceUID] == ("not_analysed", 0, 1, 0)
    assert got[study_a][1:] == (2, 0, 1)
    assert got[study_b][1:] == (len(wrapped), 1, 0)
    assert got[study_b][0] in {"normal", "covid19", "viral_pneumonia"}
    status = json.loads(cli(server, "status", "--json").stdout)
    assert status["active_model"]["version"] == "test-random-0"
    assert status["predictions"] == len(classified)


@pytest.mark.slow
def test_kill9_mid_batch_still_one_prediction_each(served: Server, cxr3_dir: Path):
    server = served.start()
    study = generate_uid()
    pngs = sorted((cxr3_dir / "normal").glob("*.png"))[:12]
    datasets = [wrap_png_as_dx(p, study_uid=study) for p in pngs]
    assert store(server.port, datasets) == [0x0000] * len(datasets)
    wait_for(
        lambda: (
            server.rows("SELECT count(*) FROM instances WHERE status = 'classified'")[0][0] >= 1
            and server.rows("SELECT count(*) FROM instances WHERE status IN ('queued', 'processing')")[0][0]
            >= 1
        ),
        180,
        "a batch classified and more in flight",
        interval=0.05,
    )
    server.kill9()
    in_flight = server.rows("SELECT count(*) FROM instances WHERE status = 'processing'")[0][0]
    server.start()
    wait_for(lambda: _all_final(server, len(datasets)), 240, "every instance classified after the restart")
    counts = server.rows("SELECT instance_id, count(*) FROM predictions GROUP BY instance_id")
    assert len(counts) == len(datasets)
    assert all(c == 1 for _, c in counts), "no instance got two predictions from one model version"
    assert server.rows("SELECT count(*) FROM instances WHERE status = 'classified'")[0][0] == len(datasets)
    print(f"instances in flight at kill -9: {in_flight}")


def test_without_an_active_model_the_worker_waits_and_status_says_so(make_server, tmp_path: Path):
    server = make_server(SCREENER__INFERENCE__POLL_SECONDS="0.2").start()
    sent = tmp_path / "a.dcm"
    reuid(rg1_dir() / "RG1_UNCR.dcm", sent)
    _dcmtk("storescu", server, [sent])
    wait_for(
        lambda: any(e["event"] == "worker.no_active_model" for e in server.log_events()), 30, "the warning"
    )
    assert server.rows("SELECT status FROM instances")[0][0] == "queued"
    out = cli(server, "status").stdout
    assert "none active" in out and "queued      1" in out

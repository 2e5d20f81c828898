"""No patient name, patient ID, birth date or accession number in any log line, even at DEBUG."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom.uid import generate_uid

from tests.helpers import rg1_pixels, small_cr, store

CANARIES = {
    "patient_name": "CANARYNAME^PHIFIRST",
    "patient_id": "CANARYPID4711",
    "birth_date": "19020304",
    "accession": "CANARYACC0815",
}


def _needles() -> list[str]:
    name = CANARIES["patient_name"]
    return [*CANARIES.values(), name.split("^")[0], name.split("^")[1], "1902-03-04"]


def test_phi_canaries_never_reach_the_log(make_server, tmp_path: Path):
    server = make_server(
        SCREENER__LOGGING__LEVEL="DEBUG",
        SCREENER__LOGGING__PYNETDICOM_LEVEL="DEBUG",
        SCREENER__LISTENER__ALLOWED_CALLING_AETS='["TESTSCU", "STORESCU"]',
    ).start()
    study = generate_uid()
    pixels = rg1_pixels(128)
    first = small_cr(pixels, study_uid=study, **CANARIES)
    clash = small_cr(pixels[::-1].copy(), study_uid=study, sop_uid=first.SOPInstanceUID, **CANARIES)
    no_study = small_cr(pixels, study_uid=study, **CANARIES)
    del no_study.StudyInstanceUID  # stored as failed: a path that builds a reason string
    assert store(server.port, [first, first, clash, no_study]) == [0x0000] * 4

    path = tmp_path / "dcmtk.dcm"
    via_dcmtk = small_cr(pixels, study_uid=study, **CANARIES)
    via_dcmtk.save_as(path, enforce_file_format=True)
    out = subprocess.run(
        ["storescu", "-d", "-aec", "CXRSCREENER", "127.0.0.1", str(server.port), str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert store(server.port, [first], calling="NOTALLOWED") == [None]

    spooled = [(server.spool / n).read_bytes() for (n,) in server.rows("SELECT spool_name FROM instances")]
    assert len(spooled) == 3 and all(CANARIES["patient_id"].encode() in b for b in spooled), (
        "canaries arrived"
    )
    assert server.stop() == 0
    log = server.log_text()
    events = server.log_events()
    assert len([e for e in events if e["event"] == "instance.received"]) == 5
    assert any(e["logger"].startswith("pynetdicom") for e in events), (
        "pynetdicom's DEBUG lines are in the log"
    )
    lowered = log.lower()
    leaked = [needle for needle in _needles() if needle.lower() in lowered]
    assert leaked == [], f"PHI in the log: {leaked}"
    assert first.SOPInstanceUID not in log and study not in log, "UIDs are logged only as hashes"

"""Images outside the screener's scope are never given a finding; the SR says "not analysed" and why.

One study holds a CT, a lateral chest, a skull, instances missing Modality, Body Part Examined, or View
Position (with a lateral series description), and a Secondary Capture without a body part. The worker
(a real `screener serve` with a small model) must classify none of them, and the SR the sender delivers to
the PACS (kept in the spool, read back from its delivery row) must carry no finding, a "not analysed" status
for each image with the eligibility reason as text, and a "not analysed" study verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.hardening.conftest import Figure
from tests.helpers import FakePacs, cli, rg1_pixels, small_cr, store, wait_for

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _cr(study: str, **changes: Any) -> Dataset:
    ds = small_cr(rg1_pixels(64), study_uid=study)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _cases(study: str) -> dict[str, tuple[Dataset, str]]:
    """name -> (dataset, a phrase its reason must contain)."""
    ct = dcmread(get_testdata_file("CT_small.dcm"))
    ct.StudyInstanceUID = study
    sc = _cr(study, Modality="OT", BodyPartExamined=None)
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    return {
        "CT": (ct, "not a chest radiography storage class"),
        "lateral": (_cr(study, ViewPosition="LL"), "view position LL is not frontal"),
        "skull": (_cr(study, BodyPartExamined="SKULL"), "body part examined SKULL is not a chest"),
        "no modality": (_cr(study, Modality=None), "modality <absent>"),
        "no body part": (_cr(study, BodyPartExamined=None), "body part examined is absent"),
        "no view, lateral description": (
            _cr(study, ViewPosition=None, SeriesDescription="CHEST LAT"),
            "names a lateral view (LAT)",
        ),
        "secondary capture without body part": (sc, "secondary capture with body part examined <absent>"),
    }


def _content(items: Any) -> list[tuple[str, str]]:
    """(concept name, value) of every content item of an SR tree, depth first."""
    out: list[tuple[str, str]] = []
    for item in items:
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        if "TextValue" in item:
            out.append((name, str(item.TextValue)))
        elif "ConceptCodeSequence" in item:
            out.append((name, str(item.ConceptCodeSequence[0].CodeMeaning)))
        else:
            out.append((name, ""))
        if "ContentSequence" in item:
            out += _content(item.ContentSequence)
    return out


def test_out_of_scope_images_get_no_finding_and_the_sr_says_why(
    make_server, tiny_model_dir: Path, figure: Figure
):
    pacs = FakePacs().start()
    try:
        server = make_server(
            SCREENER__LISTENER__ACCEPT_ALL_STORAGE="true",
            SCREENER__INFERENCE__STUDY_SETTLE_SECONDS="1",
            SCREENER__INFERENCE__POLL_SECONDS="0.2",
            SCREENER__INFERENCE__MAX_WAIT_MS="100",
            SCREENER__INFERENCE__PREPROCESS_WORKERS="1",
            SCREENER__PACS__SWEEP_SECONDS="0.2",
            SCREENER__PACS__DESTINATIONS=f'[{{ae_title="FAKEPACS", host="127.0.0.1", port={pacs.port}}}]',
        )
        cli(server, "db", "upgrade")
        cli(server, "models", "register", str(tiny_model_dir), "--activate")
        server.start()
        study = generate_uid()
        cases = _cases(study)
        assert store(server.port, [ds for ds, _ in cases.values()]) == [0x0000] * len(cases)

        def delivered() -> list[Any]:
            return server.rows(
                "SELECT d.spool_name FROM deliveries d WHERE d.object_kind = 'sr' AND d.status = 'sent'"
            )

        wait_for(lambda: len(delivered()) == 1, 120, "the study's SR delivered to the PACS")
        rows = {
            r[0]: (r[1], r[2])
            for r in server.rows("SELECT sop_instance_uid, status, status_reason FROM instances")
        }
        for name, (ds, phrase) in cases.items():
            status, reason = rows[ds.SOPInstanceUID]
            assert status == "skipped", (name, status, reason)
            assert phrase in reason, (name, reason)
        assert server.rows("SELECT count(*) FROM predictions")[0][0] == 0, "no image was classified"
        verdict = server.rows("SELECT verdict, instances_skipped FROM study_results")
        assert verdict == [("not_analysed", len(cases))]

        ((spool_name,),) = delivered()
        sr = dcmread(server.spool / spool_name)
        assert [uid for uid, _ in pacs.received] == [sr.SOPInstanceUID]
        content = _content(sr.ContentSequence)
        assert not [value for name, value in content if name == "Finding"], "no finding of any kind"
        assert not [name for name, _ in content if name.startswith("Probability")], "no probabilities"
        statuses = [value for name, value in content if name == "Analysis status"]
        assert statuses.count("Not analysed: not eligible") == len(cases)
        assert "Not analysed: no eligible image" in statuses
        reasons = [value for name, value in content if name == "Reason not analysed"]
        for name, (_, phrase) in cases.items():
            assert any(phrase in r for r in reasons), f"{name}: the SR does not say why ({phrase})"
        figure("out-of-scope images", len(cases), "instances", flagged=0, sr_reasons=len(reasons) - 1)
    finally:
        pacs.stop()

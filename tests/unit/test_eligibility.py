"""Eligibility from the header: real CR chest PA header (pydicom-data RG1_UNCR) and variants of it."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import data_store
import pydicom
import pytest
from pydicom.dataset import Dataset

from screener.core.config import EligibilityConfig
from screener.imaging.eligibility import Eligibility, decide

RULES = EligibilityConfig()
SOURCE = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
HEADER = pydicom.dcmread(SOURCE, stop_before_pixels=True)  # CR, CHEST, PA; StudyDescription THORAX
DELETE = object()

# Each case: changes to the real CR chest PA header (DELETE removes the attribute), expected flag,
# expected reason substring (None where eligible).
CASES: list[tuple[str, dict[str, Any], bool, str | None]] = [
    ("cr-pa-chest", {}, True, None),
    ("dx-ap", {"Modality": "DX", "ViewPosition": "AP"}, True, None),
    ("lowercase-modality", {"Modality": "dx"}, True, None),
    (
        "lateral-ll",
        {"ViewPosition": "LL"},
        False,
        "view position LL is not frontal (eligibility.view_positions = PA, AP)",
    ),
    (
        "ct",
        {"Modality": "CT"},
        False,
        "modality CT is not a radiograph modality (eligibility.modalities = CR, DX)",
    ),
    (
        "sc-without-chest",
        {"Modality": "OT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "BodyPartExamined": DELETE},
        False,
        "secondary capture with body part examined <absent> is not a chest image",
    ),
    ("sc-with-chest", {"Modality": "OT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, True, None),
    (
        "body-part-absent-chest-series",
        {"BodyPartExamined": DELETE, "SeriesDescription": "CHEST PA"},
        True,
        None,
    ),
    (
        "body-part-absent-thoracic-protocol",
        {"BodyPartExamined": DELETE, "ProtocolName": "Thoracic_AP"},
        True,
        None,
    ),
    (
        "body-part-absent-no-keyword",
        {"BodyPartExamined": DELETE, "StudyDescription": DELETE, "SeriesDescription": "ABDOMEN"},
        False,
        "body part examined is absent and no series description",
    ),
    ("body-part-skull", {"BodyPartExamined": "SKULL"}, False, "body part examined SKULL is not a chest"),
    (
        "lat-description-no-view",
        {"ViewPosition": DELETE, "SeriesDescription": "CHEST LAT"},
        False,
        "view position is absent and a description names a lateral view (LAT)",
    ),
    ("plate-is-not-lat", {"ViewPosition": DELETE, "StudyDescription": "CHEST PLATE"}, True, None),
    ("no-view-frontal-description", {"ViewPosition": DELETE, "SeriesDescription": "CHEST PA"}, True, None),
    (
        "rgb",
        {"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3},
        False,
        "photometric interpretation RGB is not monochrome",
    ),
    ("monochrome2", {"PhotometricInterpretation": "MONOCHROME2"}, True, None),
    (
        "oversized",
        {"Rows": 60000, "Columns": 60000},
        False,
        "image is oversized: 60000 x 60000 x 1 frame(s) = 3600000000 pixels, "
        "more than eligibility.max_pixels = 100000000",
    ),
    (
        "multi-frame",
        {"NumberOfFrames": "3"},
        False,
        "image has 3 frames, more than eligibility.max_frames = 1",
    ),
]


def variant(changes: dict[str, Any]) -> Dataset:
    ds = copy.deepcopy(HEADER)
    for keyword, value in changes.items():
        if value is DELETE:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # the lowercase modality case, on purpose
@pytest.mark.parametrize(("changes", "eligible", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_header_variants(changes: dict[str, Any], eligible: bool, reason: str | None) -> None:
    decision = decide(variant(changes), RULES)
    assert decision.eligible is eligible
    if reason is None:
        assert decision == Eligibility(eligible=True, reason=None)
    else:
        assert decision.reason is not None
        assert reason in decision.reason


def test_missing_view_can_be_refused() -> None:
    rules = dataclasses.replace(RULES, allow_missing_view_position=False)
    decision = decide(variant({"ViewPosition": DELETE}), rules)
    assert not decision.eligible
    assert decision.reason == "view position is absent (eligibility.allow_missing_view_position = false)"


def test_secondary_capture_rule_can_be_relaxed() -> None:
    rules = dataclasses.replace(RULES, secondary_capture_needs_chest_body_part=False)
    sc = {"Modality": "SC", "BodyPartExamined": DELETE, "SeriesDescription": "CXR summary"}
    assert decide(variant(sc), rules).eligible
    assert not decide(variant(sc), RULES).eligible


def test_settings_drive_the_decision() -> None:
    rules = dataclasses.replace(RULES, modalities=("DX",), max_pixels=1000)
    assert (
        decide(variant({}), rules).reason
        == "modality CR is not a radiograph modality (eligibility.modalities = DX)"
    )
    assert "eligibility.max_pixels = 1000" in str(decide(variant({"Modality": "DX"}), rules).reason)


def test_reasons_never_carry_patient_identifiers() -> None:
    phi = {
        "PatientName": "Doe^Jane",
        "PatientID": "PID-778899",
        "PatientBirthDate": "19700101",
        "AccessionNumber": "ACC-4455",
        "StudyDate": "20240229",
        # A description is free text and may carry anything: reasons name the matched keyword only.
        "SeriesDescription": "LAT Doe^Jane PID-778899",
    }
    reasons = [
        decide(variant({**phi, **changes}), RULES).reason for _, changes, eligible, _ in CASES if not eligible
    ]
    reasons.append(decide(variant({**phi, "ViewPosition": DELETE}), RULES).reason)
    assert all(reasons)
    for reason in reasons:
        for value in ("Doe", "Jane", "778899", "19700101", "4455", "20240229"):
            assert value not in str(reason)

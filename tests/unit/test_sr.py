"""The SR and Secondary Capture we send to the PACS: valid DICOM, the right content, stable UIDs."""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import data_store
import highdicom as hd
import pytest
from pydicom import Dataset, dcmread

from screener.results.sc import SIZE, build_secondary_capture, render_lines
from screener.results.sr import (
    PAPER_CONCEPTS,
    AlgorithmInfo,
    AnalysedImage,
    StudyVerdictInput,
    build_sr,
    derive_uid,
    probability_code,
)

UID_ROOT = "1.2.826.0.1.3680043.10.999"
RG1 = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
COVID = {"normal": 0.05, "covid19": 0.9, "viral_pneumonia": 0.05}
NORMAL = {"normal": 0.8, "covid19": 0.1, "viral_pneumonia": 0.1}
ALGORITHM = AlgorithmInfo(
    name="CXR Screener fused ResNet",
    version="2024.06.1",
    parameters={"architectures": "resnet101+resnet152", "fusion_weight": "0.5200"},
    manufacturer="Example Hospital AI",
    model_name="CXR Screener",
    software_version="0.1.0",
    device_uid=derive_uid(UID_ROOT, "device", "2024.06.1"),
)

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")


@pytest.fixture(scope="module")
def source() -> Dataset:
    return dcmread(RG1, stop_before_pixels=True)


def _images(source: Dataset) -> list[AnalysedImage]:
    cls, series = str(source.SOPClassUID), str(source.SeriesInstanceUID)
    return [
        AnalysedImage(cls, str(source.SOPInstanceUID), series, "classified", "covid19", COVID, None),
        AnalysedImage(cls, derive_uid(UID_ROOT, "img2"), series, "classified", "normal", NORMAL, None),
        AnalysedImage(
            cls,
            derive_uid(UID_ROOT, "img3"),
            series,
            "skipped",
            None,
            None,
            "view position LL is not frontal",
        ),
        AnalysedImage(
            cls, derive_uid(UID_ROOT, "img4"), series, "failed", None, None, "undecodable pixel data"
        ),
    ]


def _verdict(revision: int = 1) -> StudyVerdictInput:
    return StudyVerdictInput(label="covid19", probs=COVID, revision=revision)


def _finding(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> str | None:
    finding = group.finding_type
    return None if finding is None else str(finding.value)


def _dciodvfy(ds: Dataset, path: Path) -> str:
    ds.save_as(path, enforce_file_format=True)
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert not errors, output
    return output


def test_derive_uid_is_valid_and_deterministic() -> None:
    uid = derive_uid(UID_ROOT, "study", "v1", "1", "sr")
    assert uid == derive_uid(UID_ROOT, "study", "v1", "1", "sr")
    assert uid != derive_uid(UID_ROOT, "study", "v1", "2", "sr")
    assert len(uid) <= 64 and uid.startswith(UID_ROOT + ".")
    assert all(c.isdigit() and (c == "0" or not c.startswith("0")) for c in uid.split("."))
    with pytest.raises(ValueError, match="01"):
        derive_uid("1.01", "x")


@needs_dciodvfy
def test_sr_is_valid_and_carries_the_result(source: Dataset, tmp_path: Path) -> None:
    images = _images(source)
    sr = build_sr(
        source, images, _verdict(), ALGORITHM, uid_root=UID_ROOT, institution_name="General Hospital"
    )
    _dciodvfy(sr, tmp_path / "sr.dcm")

    back = hd.sr.srread(tmp_path / "sr.dcm")
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.Modality == "SR" and "not a diagnosis" in back.SeriesDescription
    assert (back.VerificationFlag, back.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert back.InstanceNumber == 1
    assert back.PerformedProcedureCodeSequence[0].CodeValue == "30745-4"
    assert any(item.get("DeviceUID") == ALGORITHM.device_uid for item in back.ContributingEquipmentSequence)
    assert back.PatientID == source.PatientID and back.PatientName == source.PatientName

    report = back.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(images) + 1  # one per image + the study verdict
    by_id = {g.tracking_identifier: g for g in groups}
    assert _finding(by_id["Image 1"]) == "840539006"  # SNOMED CT COVID-19
    assert _finding(by_id["Image 2"]) == "17621005"  # SNOMED CT Normal
    assert _finding(by_id["Study verdict"]) == "840539006"
    for label, probs in (("Image 1", COVID), ("Image 2", NORMAL), ("Study verdict", COVID)):
        got = {m.name.value: m.value for m in by_id[label].get_measurements()}
        assert got == {probability_code(PAPER_CONCEPTS[c]).value: pytest.approx(p) for c, p in probs.items()}
    for label, reason in (
        ("Image 3", "view position LL is not frontal"),
        ("Image 4", "undecodable pixel data"),
    ):
        group = by_id[label]
        assert group.finding_type is None and not group.get_measurements()
        texts = [i.TextValue for i in group[0].ContentSequence if i.ValueType == "TEXT"]
        assert reason in texts
        status = [e[0].ConceptCodeSequence[0].CodeMeaning for e in group.get_qualitative_evaluations()]
        assert status and status[0].startswith("Not analysed")

    algorithm_versions = {
        i.TextValue
        for g in groups
        for i in g[0].ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "111003"
    }
    assert algorithm_versions == {ALGORITHM.version}

    referenced = {uid for _, _, uid, _ in back.get_evidence()}
    assert referenced == {i.sop_instance_uid for i in images}
    library = hd.sr.utils.find_content_items(back, name=hd.sr.CodedConcept("111028", "DCM", "Image Library"))
    in_library = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in hd.sr.utils.find_content_items(library[0], value_type="IMAGE", recursive=True)
    }
    assert in_library == referenced


def test_sr_uids_are_deterministic_per_revision(source: Dataset) -> None:
    first = build_sr(source, _images(source), _verdict(1), ALGORITHM, uid_root=UID_ROOT)
    again = build_sr(source, _images(source), _verdict(1), ALGORITHM, uid_root=UID_ROOT)
    revised = build_sr(source, _images(source), _verdict(2), ALGORITHM, uid_root=UID_ROOT)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert revised.SOPInstanceUID != first.SOPInstanceUID
    assert revised.InstanceNumber == 2


def test_sr_rejects_bad_input(source: Dataset) -> None:
    images = _images(source)
    with pytest.raises(ValueError, match="empty"):
        build_sr(source, [], _verdict(), ALGORITHM, uid_root=UID_ROOT)
    with pytest.raises(ValueError, match="'pneumothorax'"):
        build_sr(source, [replace(images[0], label="pneumothorax")], _verdict(), ALGORITHM, uid_root=UID_ROOT)
    lopsided = {"normal": 0.5, "covid19": 0.9, "viral_pneumonia": 0.05}
    with pytest.raises(ValueError, match=r"sum to 1\.45"):
        build_sr(source, [replace(images[0], probs=lopsided)], _verdict(), ALGORITHM, uid_root=UID_ROOT)
    with pytest.raises(ValueError, match="'flu'"):
        build_sr(source, images, StudyVerdictInput("flu", COVID, 1), ALGORITHM, uid_root=UID_ROOT)


def test_sr_for_a_study_without_an_analysed_image(source: Dataset) -> None:
    image = replace(_images(source)[0], status="skipped", label=None, probs=None, reason="not a chest")
    sr = build_sr(source, [image], StudyVerdictInput("not_analysed", None, 1), ALGORITHM, uid_root=UID_ROOT)
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_image_measurement_groups()
    assert all(g.finding_type is None and not g.get_measurements() for g in groups)


@needs_dciodvfy
def test_secondary_capture_is_valid_and_shows_no_patient_identifier(source: Dataset, tmp_path: Path) -> None:
    canary = source.copy()
    canary.PatientName = "CANARYNAME^PATIENT"
    canary.PatientID = "CANARYID42"
    canary.AccessionNumber = "CANARYACC"
    sc = build_secondary_capture(canary, _verdict(), ALGORITHM, uid_root=UID_ROOT)
    _dciodvfy(sc, tmp_path / "sc.dcm")

    back = dcmread(tmp_path / "sc.dcm")
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.pixel_array.shape == (SIZE, SIZE) and back.BitsAllocated == 8
    assert back.PhotometricInterpretation == "MONOCHROME2"
    assert back.pixel_array.max() == 255  # something is drawn

    drawn = "\n".join(render_lines(_verdict(), ALGORITHM))
    assert "NOT FOR DIAGNOSTIC USE" in drawn and ALGORITHM.version in drawn and "0.900" in drawn
    assert "CANARY" not in drawn.upper()
    again = build_secondary_capture(canary, _verdict(), ALGORITHM, uid_root=UID_ROOT)
    assert again.SOPInstanceUID == sc.SOPInstanceUID


def test_sr_holds_patient_identifiers_only_in_the_patient_module(source: Dataset) -> None:
    canary = source.copy()
    canary.PatientName = "CANARYNAME^PATIENT"
    canary.PatientID = "CANARYID42"
    canary.AccessionNumber = "CANARYACC"
    sr = build_sr(canary, _images(canary), _verdict(), ALGORITHM, uid_root=UID_ROOT)
    for keyword in ("PatientName", "PatientID", "AccessionNumber"):
        del sr[keyword]
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    assert b"CANARY" not in buffer.getvalue()

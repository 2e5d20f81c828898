"""Study result -> DICOM Comprehensive 3D SR, in the style of IHE AI Results (AIR).

The document is a Comprehensive 3D SR (PS3.3 A.35.13, SOP Class 1.2.840.10008.5.1.4.1.1.88.34) whose
content tree is PS3.16 TID 1500 "Measurement Report", built with highdicom:

- TID 1001 observation context with a device observer (TID 1004: device UID, manufacturer, model);
- TID 1600 image library listing every source image;
- one TID 1501 measurement group per image, tracked by TID 4108, carrying the algorithm (TID 4019), a
  coded "Finding" and one probability per class of the model (TID 300), or, for an image that was not
  analysed, a coded status and the reason as text (the coded-question / text-answer row of TID 1501);
- one more TID 1501 group with the study verdict, its probabilities and the disclaimer.

The classes, their finding codes and probability codes come from the model card's ``concepts``
(:class:`screener.model.modelcard.ClassConcept`; SNOMED CT for the paper's three). An image or study whose
label is ``indeterminate`` (no class reached its operating point, or the image-content gate found it
borderline) carries SNOMED CT 82334004 "Indeterminate" as its finding, its probabilities, and the reason.

Patient and study attributes come only from the source header (highdicom copies the Patient and General
Study modules); nothing else in the document identifies the patient. All UIDs are derived from
(study, model version, revision), so building the same result twice gives the same SOP Instance UID and a
re-send to the PACS is idempotent.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from screener.model.modelcard import CLASSES as PAPER_CLASSES
from screener.model.modelcard import ClassConcept, default_concepts
from screener.model.verdict import INDETERMINATE

SR_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
SERIES_DESCRIPTION = "AI result - not a diagnosis (CXR Screener)"
DISCLAIMER = (
    "Result of an automated screening algorithm (CXR Screener). Not a diagnosis; "
    "not verified by a physician. Not for diagnostic use."
)
NOT_ANALYSED = "not_analysed"
IMAGE_STATUSES: tuple[str, ...] = ("classified", "skipped", "failed")
PROBABILITY_TOLERANCE = 1e-3
SERIES_NUMBER = 9801  # high, so the AI series sorts after the acquired ones in most viewers

LOCAL_SCHEME = "99CXRS"
"""Private coding scheme for concepts that no standard terminology names (PS3.16 8.2, "99" prefix)."""


def _local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=LOCAL_SCHEME, meaning=meaning)


PAPER_CONCEPTS: Mapping[str, ClassConcept] = default_concepts(PAPER_CLASSES)
"""The concepts of the paper's three classes, for callers without a model card."""

# SNOMED CT 82334004 "Indeterminate" (qualifier value): the model withheld a label.
INDETERMINATE_CODE = CodedConcept(value="82334004", scheme_designator="SCT", meaning="Indeterminate")
REASON_INDETERMINATE = _local("CXRS-REASON-IND", "Reason indeterminate")


def finding_code(concept: ClassConcept) -> CodedConcept:
    """The coded finding of a class (its card concept, SNOMED CT for the paper's three)."""
    return CodedConcept(value=concept.code, scheme_designator=concept.scheme, meaning=concept.meaning)


def probability_code(concept: ClassConcept) -> CodedConcept:
    """No standard code names "probability that this radiograph shows class X": a local code, declared in
    CodingSchemeIdentificationSequence (PS3.3 C.12.1)."""
    meaning = concept.meaning
    if meaning[1:2].islower():  # "Normal" -> "normal"; "COVID-19" stays
        meaning = meaning[0].lower() + meaning[1:]
    return _local(concept.probability_code, f"Probability of {meaning}"[:64])


PROBABILITY_UNIT = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")

ANALYSIS_STATUS = _local("CXRS-STATUS", "Analysis status")
STATUS_CODES: Mapping[str, CodedConcept] = {
    "classified": _local("CXRS-ANALYSED", "Analysed"),
    "skipped": _local("CXRS-SKIPPED", "Not analysed: not eligible"),
    "failed": _local("CXRS-FAILED", "Not analysed: processing failed"),
    NOT_ANALYSED: _local("CXRS-NOTANALYSED", "Not analysed: no eligible image"),
}
REASON_NOT_ANALYSED = _local("CXRS-REASON", "Reason not analysed")
DISCLAIMER_CONCEPT = _local("CXRS-DISCLAIMER", "Disclaimer")

# LOINC 30745-4 "XR Chest Views": a chest radiograph with an unspecified number of views. The screener
# judges each frontal view of whatever the study holds, so a view-count code (36643-5 "XR Chest 2V") would
# be wrong for a one-view study; LOINC is what RIS/PACS procedure codes use (RSNA/LOINC playbook).
PROCEDURE_CODE = CodedConcept(value="30745-4", scheme_designator="LN", meaning="XR Chest Views")

# CID 7005: the algorithm processed the source images into a new instance -> "Processing Equipment".
EQUIPMENT_PURPOSE = codes.DCM.ProcessingEquipment

_MODALITY_BY_SOP_CLASS: Mapping[str, Mapping[str, str]] = {
    "1.2.840.10008.5.1.4.1.1.1": {"value": "CR", "meaning": "Computed Radiography"},
    "1.2.840.10008.5.1.4.1.1.1.1": {"value": "DX", "meaning": "Digital Radiography"},
    "1.2.840.10008.5.1.4.1.1.1.1.1": {"value": "DX", "meaning": "Digital Radiography"},
}

_UID_COMPONENT = re.compile(r"0|[1-9][0-9]*")
_MAX_UID = 64
_MIN_DERIVED_DIGITS = 20  # ~66 bits of the hash: collisions are not a practical concern


@dataclass(frozen=True)
class AnalysedImage:
    """One source image of the study and what became of it."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str | None
    status: str  # "classified" | "skipped" | "failed"
    label: str | None
    probs: Mapping[str, float] | None
    reason: str | None


@dataclass(frozen=True)
class AlgorithmInfo:
    """The model that produced the result (TID 4019) and the device that ran it (TID 1004)."""

    name: str
    version: str
    parameters: Mapping[str, str]
    manufacturer: str
    model_name: str
    software_version: str
    device_uid: str


@dataclass(frozen=True)
class StudyVerdictInput:
    """The study verdict: a class of ``concepts`` (the card's, in output order), "indeterminate" or
    "not_analysed"; ``reason`` says why it is indeterminate."""

    label: str
    probs: Mapping[str, float] | None
    revision: int
    concepts: Mapping[str, ClassConcept] = field(default_factory=lambda: dict(PAPER_CONCEPTS))
    reason: str | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        """The model's classes, in output order."""
        return tuple(self.concepts)


def derive_uid(uid_root: str, *parts: str) -> str:
    """A deterministic UID under ``uid_root`` for ``parts`` (PS3.5 9.1).

    The sha256 of the parts, as a decimal number, is appended as one more component, cut to keep the
    whole within 64 characters (a leading digit of a Python int is never 0, so no component starts with
    one). Raises ValueError for a root that is not a valid UID prefix or leaves too little room.
    """
    root = uid_root.rstrip(".")
    if not root or any(_UID_COMPONENT.fullmatch(c) is None for c in root.split(".")):
        raise ValueError(f"uid_root {uid_root!r} is not a valid DICOM UID prefix (PS3.5 9.1)")
    room = _MAX_UID - len(root) - 1
    if room < _MIN_DERIVED_DIGITS:
        raise ValueError(
            f"uid_root {uid_root!r} is {len(root)} characters; at most {_MAX_UID - 1 - _MIN_DERIVED_DIGITS} "
            "leave room for a derived component"
        )
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return f"{root}.{str(int(digest, 16))[:room]}"


def check_probabilities(
    probs: Mapping[str, float], what: str, classes: Sequence[str] = PAPER_CLASSES
) -> None:
    """Raise ValueError unless ``probs`` has one probability in [0, 1] per class and they sum to 1."""
    if set(probs) != set(classes):
        raise ValueError(f"{what}: probabilities for {sorted(probs)}, expected {sorted(classes)}")
    for cls, p in probs.items():
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise ValueError(f"{what}: probability of {cls} is {p!r}, not in [0, 1]")
    total = math.fsum(probs.values())
    if abs(total - 1.0) > PROBABILITY_TOLERANCE:
        raise ValueError(f"{what}: probabilities {dict(probs)} sum to {total!r}, not 1")


def _validate(source: Dataset, images: Sequence[AnalysedImage], verdict: StudyVerdictInput) -> None:
    classes = verdict.classes
    labels = (*classes, INDETERMINATE)
    if not images:
        raise ValueError("images is empty: an SR needs at least one source image")
    if verdict.revision < 1:
        raise ValueError(f"revision {verdict.revision!r} is not a positive integer")
    seen: set[str] = set()
    for n, image in enumerate(images, start=1):
        what = f"image {n} ({image.sop_instance_uid})"
        if image.sop_instance_uid in seen:
            raise ValueError(f"{what}: SOP Instance UID listed twice")
        seen.add(image.sop_instance_uid)
        if image.status not in IMAGE_STATUSES:
            raise ValueError(f"{what}: status {image.status!r} is not one of {IMAGE_STATUSES}")
        if image.status == "classified":
            if image.label not in labels:
                raise ValueError(f"{what}: label {image.label!r} is not one of {labels}")
            if image.probs is None:
                raise ValueError(f"{what}: classified but has no probabilities")
            check_probabilities(image.probs, what, classes)
    if source.SOPInstanceUID not in seen:
        raise ValueError(f"source SOP Instance UID {source.SOPInstanceUID} is not one of the images")
    if verdict.label == NOT_ANALYSED:
        if verdict.probs is not None:
            raise ValueError(f"study verdict {NOT_ANALYSED!r} carries probabilities {dict(verdict.probs)}")
    elif verdict.label not in labels:
        raise ValueError(f"study verdict label {verdict.label!r} is not one of {(*labels, NOT_ANALYSED)}")
    elif verdict.probs is None:
        raise ValueError(f"study verdict {verdict.label!r} has no probabilities")
    else:
        check_probabilities(verdict.probs, "study verdict", classes)


def _finding(label: str, concepts: Mapping[str, ClassConcept]) -> CodedConcept:
    return INDETERMINATE_CODE if label == INDETERMINATE else finding_code(concepts[label])


def _probability_measurements(
    probs: Mapping[str, float], concepts: Mapping[str, ClassConcept]
) -> list[hd.sr.Measurement]:
    return [
        hd.sr.Measurement(name=probability_code(concept), value=float(probs[cls]), unit=PROBABILITY_UNIT)
        for cls, concept in concepts.items()
    ]


def _add_text(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: CodedConcept, text: str) -> None:
    """A coded question with a text answer (TID 1501 row 12); highdicom only builds coded answers."""
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(name=name, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    )


def _image_group(
    image: AnalysedImage,
    number: int,
    tracking_uid: str,
    algorithm_id: hd.sr.AlgorithmIdentification,
    concepts: Mapping[str, ClassConcept],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one image: finding + probabilities, or status + reason when not analysed."""
    classified = image.status == "classified" and image.label is not None and image.probs is not None
    sources = None
    if image.series_instance_uid is not None:
        sources = [
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=image.sop_class_uid,
                referenced_sop_instance_uid=image.sop_instance_uid,
            )
        ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"Image {number}"),
        finding_type=_finding(image.label, concepts) if classified and image.label else None,
        algorithm_id=algorithm_id if classified else None,
        measurements=_probability_measurements(image.probs, concepts) if classified and image.probs else None,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=ANALYSIS_STATUS, value=STATUS_CODES[image.status])
        ],
        source_images=sources,
    )
    if not classified:
        _add_text(group, REASON_NOT_ANALYSED, image.reason or "no reason recorded")
    elif image.label == INDETERMINATE:
        _add_text(group, REASON_INDETERMINATE, image.reason or "no reason recorded")
    return group


def _verdict_group(
    verdict: StudyVerdictInput,
    images: Sequence[AnalysedImage],
    tracking_uid: str,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for the study: the verdict over all classified images, and the disclaimer."""
    analysed = verdict.label != NOT_ANALYSED and verdict.probs is not None
    sources = [
        hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=i.sop_class_uid, referenced_sop_instance_uid=i.sop_instance_uid
        )
        for i in images
        if i.status == "classified" and i.series_instance_uid is not None
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier="Study verdict"),
        finding_type=_finding(verdict.label, verdict.concepts) if analysed else None,
        algorithm_id=algorithm_id,
        measurements=(
            _probability_measurements(verdict.probs, verdict.concepts) if analysed and verdict.probs else None
        ),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=ANALYSIS_STATUS, value=STATUS_CODES["classified" if analysed else NOT_ANALYSED]
            )
        ],
        source_images=sources or None,
    )
    if not analysed:
        _add_text(group, REASON_NOT_ANALYSED, "no image of the study could be analysed")
    elif verdict.label == INDETERMINATE:
        why = verdict.reason or next(
            (i.reason for i in images if i.label == INDETERMINATE and i.reason), "no reason recorded"
        )
        _add_text(group, REASON_INDETERMINATE, why)
    _add_text(group, DISCLAIMER_CONCEPT, DISCLAIMER)
    return group


def _image_library(images: Sequence[AnalysedImage]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library: one group, one TID 1601 entry per referenceable source image.

    highdicom's ImageLibrary wants each image's full header (rows, columns, pixel spacing); we hold only
    the UIDs, and every TID 1602 descriptor is optional, so the entries carry the modality alone.
    """
    entries = []
    for image in images:
        if image.series_instance_uid is None:
            continue  # without its series it cannot be listed as evidence, so it cannot be referenced
        entry = hd.sr.ImageContentItem(
            name=codes.SCT.Source,
            referenced_sop_class_uid=image.sop_class_uid,
            referenced_sop_instance_uid=image.sop_instance_uid,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        modality = _MODALITY_BY_SOP_CLASS.get(image.sop_class_uid)
        if modality is not None:
            entry.ContentSequence = hd.sr.ContentSequence(
                [
                    hd.sr.CodeContentItem(
                        name=codes.DCM.Modality,
                        value=CodedConcept(
                            value=modality["value"], scheme_designator="DCM", meaning=modality["meaning"]
                        ),
                        relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
                    )
                ]
            )
        entries.append(entry)
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence(entries)
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group] if entries else [])
    return library


# Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1): Type 2, so present even when empty.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def with_type2_defaults(source: Dataset) -> Dataset:
    """A copy of ``source`` with every Type 2 patient/study attribute present (empty where it was absent)."""
    header = copy.deepcopy(source)
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _evidence(source: Dataset, images: Sequence[AnalysedImage]) -> list[Dataset]:
    """The source header first (highdicom copies patient and study from it), then every image's UIDs."""
    evidence = [with_type2_defaults(source)]
    for image in images:
        if image.series_instance_uid is None or image.sop_instance_uid == source.SOPInstanceUID:
            continue
        ref = Dataset()
        ref.StudyInstanceUID = source.StudyInstanceUID
        ref.SeriesInstanceUID = image.series_instance_uid
        ref.SOPClassUID = image.sop_class_uid
        ref.SOPInstanceUID = image.sop_instance_uid
        evidence.append(ref)
    return evidence


def build_sr(
    source: Dataset,
    images: Sequence[AnalysedImage],
    verdict: StudyVerdictInput,
    algorithm: AlgorithmInfo,
    *,
    uid_root: str,
    institution_name: str | None = None,
) -> Dataset:
    """The study result as a Comprehensive 3D SR (PS3.3 A.35.13) with a TID 1500 root (PS3.16).

    ``source`` is the header of one of ``images``: the document joins its study (same Study Instance UID)
    in a new series, and copies its Patient and General Study modules. Series and SOP Instance UIDs are
    ``derive_uid(uid_root, study, model version, revision, "series" | "sr")``; Instance Number is the
    revision. The document is COMPLETE and UNVERIFIED (nobody has signed it).

    Raises ValueError, naming the offending value, for an empty image list, an unknown status or label,
    probabilities that are missing, out of [0, 1] or do not sum to 1, a source that is not one of the
    images, or a bad UID root.
    """
    _validate(source, images, verdict)
    study_uid = str(source.StudyInstanceUID)
    key = (study_uid, algorithm.version, str(verdict.revision))

    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"{k}={v}" for k, v in sorted(algorithm.parameters.items())] or None,
        manufacturer=algorithm.manufacturer,
    )
    groups = [
        _image_group(
            image,
            n,
            derive_uid(uid_root, *key, "image", image.sop_instance_uid),
            algorithm_id,
            verdict.concepts,
        )
        for n, image in enumerate(images, start=1)
    ]
    groups.append(_verdict_group(verdict, images, derive_uid(uid_root, *key, "verdict"), algorithm_id))

    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=algorithm.device_uid,
                name=algorithm.model_name,
                manufacturer_name=algorithm.manufacturer,
                model_name=algorithm.model_name,
            ),
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE_CODE,
        imaging_measurements=groups,
    )
    # TID 1500 row 5: the image library comes before the imaging measurements container.
    root_items = report[0].ContentSequence
    root_items.insert(len(root_items) - 1, _image_library(images))

    equipment = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=EQUIPMENT_PURPOSE,
        manufacturer_model_name=algorithm.model_name,
        software_versions=[algorithm.software_version, algorithm.version],
        contribution_description=f"{algorithm.name} {algorithm.version}: automated classification",
    )
    equipment.DeviceUID = algorithm.device_uid  # PS3.3 C.12.1.1.8: the device that made the result

    sr = hd.sr.Comprehensive3DSR(
        evidence=_evidence(source, images),
        content=report[0],
        series_instance_uid=derive_uid(uid_root, *key, "series"),
        series_number=SERIES_NUMBER,
        sop_instance_uid=derive_uid(uid_root, *key, "sr"),
        instance_number=verdict.revision,
        manufacturer=algorithm.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        performed_procedure_codes=[PROCEDURE_CODE],
        contributing_equipment=[equipment],
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=algorithm.model_name,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME,
                name="CXR Screener local codes",
                responsible_organization=algorithm.manufacturer,
            )
        ],
    )
    # General Equipment (PS3.3 C.7.5.1): the equipment that made this instance is the algorithm itself.
    sr.add_new("SoftwareVersions", "LO", [algorithm.software_version, algorithm.version])
    sr.DeviceUID = algorithm.device_uid
    return sr

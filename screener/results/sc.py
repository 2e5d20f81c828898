"""Study verdict -> a Secondary Capture summary image, for PACS viewers that cannot show SR.

A Secondary Capture Image (PS3.3 A.8.1, SOP Class 1.2.840.10008.5.1.4.1.1.7): 512 x 512, 8-bit
MONOCHROME2, white text on black, in the source's study, in its own series. The pixels show the verdict,
the probability of each of the model card's classes, the model version and "NOT FOR DIAGNOSTIC USE"; they
never show a patient identifier. ``render_lines`` is the only source of drawn text, so a test can check
every drawn string. Where the model has a heatmap output, the image is RGB, 512 x 1024: the radiograph that
carries the verdict with the model's heatmap over it on the left (:func:`compose_with_overlay`), the text
on the right.
"""

from __future__ import annotations

import datetime

import cv2
import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from screener.model.verdict import INDETERMINATE
from screener.results.sr import (
    NOT_ANALYSED,
    PATIENT_STUDY_TYPE2,
    AlgorithmInfo,
    StudyVerdictInput,
    check_probabilities,
    derive_uid,
)

SC_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
SIZE = 512
SERIES_NUMBER = 9802
SERIES_DESCRIPTION = "AI summary - not a diagnosis (CXR Screener)"

_DISPLAY = {NOT_ANALYSED: "Not analysed", INDETERMINATE: "Indeterminate"}

_PATIENT_STUDY_TYPE3 = ("IssuerOfPatientID", "StudyDescription")


def render_lines(
    verdict: StudyVerdictInput, algorithm: AlgorithmInfo, *, heatmap_label: str | None = None
) -> list[str]:
    """The text drawn into the image, line by line: built from the verdict and model alone
    (``heatmap_label``: the class whose heatmap is drawn beside the text, where one is).

    Raises ValueError for an unknown label or bad probabilities.
    """
    display = {name: concept.meaning for name, concept in verdict.concepts.items()} | _DISPLAY
    if verdict.label not in display:
        raise ValueError(f"study verdict label {verdict.label!r} is not one of {tuple(display)}")
    lines = ["CXR Screener - AI result", f"Verdict: {display[verdict.label]}"]
    if verdict.probs is not None:
        check_probabilities(verdict.probs, "study verdict", verdict.classes)
        lines += [f"  P({display[c]}) = {verdict.probs[c]:.3f}" for c in verdict.classes]
    else:
        lines.append("  no image could be analysed")
    if heatmap_label is not None:
        lines.append(f"Left: heatmap for {display.get(heatmap_label, heatmap_label)}")
    lines += [
        f"Model version: {algorithm.version}",
        f"Revision: {verdict.revision}",
        "",
        "NOT FOR DIAGNOSTIC USE",
        "Automated screening result,",
        "not verified by a physician.",
    ]
    return lines


def render_pixels(lines: list[str]) -> npt.NDArray[np.uint8]:
    """The lines drawn with OpenCV's Hershey font, white on black, SIZE x SIZE."""
    image = np.zeros((SIZE, SIZE), dtype=np.uint8)
    y = 48
    for line in lines:
        if line:
            scale = 0.9 if line == "NOT FOR DIAGNOSTIC USE" else 0.7
            # ASCII only: Hershey fonts draw '?' for anything else, and model versions are ASCII anyway.
            text = line.encode("ascii", "replace").decode("ascii")
            cv2.putText(image, text, (24, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, 2, cv2.LINE_AA)
        y += 38
    return image


def compose_with_overlay(
    text: npt.NDArray[np.uint8], overlay: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    """RGB ``[SIZE, 2 * SIZE, 3]``: the heatmap ``overlay`` (RGB, square, any size) left, the text right."""
    if overlay.ndim != 3 or overlay.shape[2] != 3 or overlay.shape[0] != overlay.shape[1]:
        raise ValueError(f"overlay shape {overlay.shape} must be a square RGB image [S, S, 3]")
    left = overlay.astype(np.uint8)
    if left.shape[0] != SIZE:
        left = np.asarray(cv2.resize(left, (SIZE, SIZE), interpolation=cv2.INTER_AREA), dtype=np.uint8)
    return np.concatenate([left, np.repeat(text[:, :, None], 3, axis=2)], axis=1)


def build_secondary_capture(
    source: Dataset,
    verdict: StudyVerdictInput,
    algorithm: AlgorithmInfo,
    *,
    uid_root: str,
    overlay: npt.NDArray[np.uint8] | None = None,
    heatmap_label: str | None = None,
) -> Dataset:
    """A Secondary Capture summary of ``verdict`` in the study of ``source`` (PS3.3 A.8.1).

    Series and SOP Instance UIDs are ``derive_uid(uid_root, study, model version, revision, "sc-series" |
    "sc")``, so a re-send is idempotent; Instance Number is the revision. Patient and study attributes
    are copied from ``source``; no patient identifier is drawn (BurnedInAnnotation YES refers to the
    verdict text). With ``overlay`` (an RGB image of the radiograph carrying the verdict with its heatmap,
    :func:`screener.model.heatmap.overlay`, of class ``heatmap_label``) the image is RGB, 512 x 1024: the
    overlay left, the text right. Raises ValueError for a bad verdict, UID root or overlay.
    """
    if verdict.revision < 1:
        raise ValueError(f"revision {verdict.revision!r} is not a positive integer")
    label = heatmap_label if overlay is not None else None
    pixels = render_pixels(render_lines(verdict, algorithm, heatmap_label=label))
    if overlay is not None:
        pixels = compose_with_overlay(pixels, overlay)
    study_uid = str(source.StudyInstanceUID)
    key = (study_uid, algorithm.version, str(verdict.revision))
    now = datetime.datetime.now()

    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    for keyword in PATIENT_STUDY_TYPE2 + _PATIENT_STUDY_TYPE3:
        if keyword in source:
            ds[keyword] = source[keyword]
        elif keyword in PATIENT_STUDY_TYPE2:
            setattr(ds, keyword, "")  # type 2: present, maybe empty
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet

    # SOP Common (C.12.1)
    ds.SOPClassUID = SC_SOP_CLASS_UID
    ds.SOPInstanceUID = derive_uid(uid_root, *key, "sc")
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    # General Series (C.7.3.1); Modality OT: a synthesised summary, not an acquisition
    ds.Modality = "OT"
    ds.SeriesInstanceUID = derive_uid(uid_root, *key, "sc-series")
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.Laterality = ""  # type 2C: the summary is of no one side
    # General Equipment (C.7.5.1) and SC Equipment (C.8.6.1)
    ds.Manufacturer = algorithm.manufacturer
    ds.ManufacturerModelName = algorithm.model_name
    ds.SoftwareVersions = [algorithm.software_version, algorithm.version]
    ds.DeviceUID = algorithm.device_uid
    ds.ConversionType = "WSD"  # workstation: the image is drawn, not digitised
    # General Image (C.7.6.1) and SC Image (C.8.6.2)
    ds.InstanceNumber = verdict.revision
    ds.PatientOrientation = ""  # type 2C: a text panel has no patient orientation
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.BurnedInAnnotation = "YES"
    ds.RecognizableVisualFeatures = "NO"
    ds.ImageComments = "AI result - not a diagnosis. NOT FOR DIAGNOSTIC USE."
    # Image Pixel (C.7.6.3)
    if pixels.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0  # colour-by-pixel, as numpy holds it
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds

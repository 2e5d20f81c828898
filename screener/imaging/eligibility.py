"""Is this instance a frontal chest radiograph we may analyse? Decided from the DICOM header alone.

:func:`decide` reads only header attributes (a dataset read with ``stop_before_pixels=True`` is enough)
and answers with a reason a PACS administrator can act on: the offending value and the setting that
refused it. Reasons carry coded or technical values only (modality, body part, view, sizes, matched
keywords), never a patient identifier, date or the free text of a description.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

from screener.core.config import EligibilityConfig

# PS3.4 B.5: Secondary Capture Image Storage and its multi-frame grayscale byte/word variants.
SECONDARY_CAPTURE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
    }
)
SECONDARY_CAPTURE_MODALITIES = frozenset({"OT", "SC"})
DESCRIPTION_KEYWORDS = ("SeriesDescription", "StudyDescription", "ProtocolName")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class Eligibility:
    """The decision for one instance: ``reason`` says why it is not eligible, None when it is."""

    eligible: bool
    reason: str | None


ELIGIBLE = Eligibility(eligible=True, reason=None)


def _skip(reason: str) -> Eligibility:
    return Eligibility(eligible=False, reason=reason)


# PS3.5 6.2: a Code String is at most 16 characters of upper-case letters, digits, space and underscore.
_CODE_STRING = re.compile(r"[A-Z0-9 _]{0,16}")


class _Undecodable(Exception):
    """A header attribute whose bytes pydicom cannot turn into a value (a damaged or lying encoding)."""

    def __init__(self, keyword: str, error: Exception) -> None:
        super().__init__(keyword)
        self.keyword = keyword
        self.error = error


def _get(ds: Dataset, keyword: str, default: object = None) -> object:
    """``ds.get(keyword)``, with a value pydicom cannot decode raised as :class:`_Undecodable`.

    pydicom decodes values lazily, on first access, so a damaged element fails here and not at read time.
    """
    try:
        return ds.get(keyword, default)
    except Exception as exc:  # pydicom raises many types for undecodable bytes
        raise _Undecodable(keyword, exc) from exc


def _shown(value: str) -> str:
    """``value`` for a reason if it is a well-formed code string; else only its length.

    A value that breaks its VR may be bytes of another element (a length field that lies), which can be
    a patient name: it is never echoed.
    """
    return value if _CODE_STRING.fullmatch(value) else f"<malformed value of {len(value)} characters>"


def _code(ds: Dataset, keyword: str) -> str:
    """A code string attribute, trimmed and upper-cased; ``""`` where absent or empty."""
    value = _get(ds, keyword)
    return "" if value is None else str(value).strip().upper()


def _listing(values: tuple[str, ...]) -> str:
    return ", ".join(values) if values else "<none>"


def _descriptions(ds: Dataset) -> list[str]:
    return [str(_get(ds, k)).upper() for k in DESCRIPTION_KEYWORDS if _get(ds, k)]


def _find_keyword(texts: list[str], keywords: tuple[str, ...], *, whole_word: bool) -> str | None:
    """The first keyword found in ``texts`` as a word (or, unless ``whole_word``, a word's beginning).

    Words are runs of letters and digits, so ``LAT`` matches ``CHEST LAT`` and ``LAT_L`` but not
    ``PLATE``, and ``THORAC`` (prefix) matches ``THORACIC`` but not ``ABTHORAC``.
    """
    for keyword in keywords:
        end = r"(?![A-Z0-9])" if whole_word else ""
        pattern = re.compile(rf"(?<![A-Z0-9]){re.escape(keyword.strip().upper())}{end}")
        if any(pattern.search(text) for text in texts):
            return keyword
    return None


def _positive_int(value: object) -> int | None:
    try:
        number = int(str(value))
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def decide(ds: Dataset, rules: EligibilityConfig) -> Eligibility:
    """Decide from the header whether ``ds`` is a frontal chest radiograph within the size limits.

    Checked in order, the first failure giving the reason: modality (or Secondary Capture with a chest
    body part), body part (or a chest keyword in a description where it is absent), view position (a
    missing one is accepted when allowed, unless a description names a lateral view), monochrome
    photometric interpretation, one sample per pixel, number of frames, and rows x columns x frames.
    Never raises on odd header values: they become reasons, and a value that cannot be decoded at all
    makes the instance not eligible, naming the attribute (never its bytes).
    """
    try:
        return _decide(ds, rules)
    except _Undecodable as exc:
        return _skip(
            f"header attribute {exc.keyword} cannot be decoded ({type(exc.error).__name__}): the sender's "
            "encoding of it is damaged; the image is not analysed"
        )


def _decide(ds: Dataset, rules: EligibilityConfig) -> Eligibility:
    """:func:`decide`; raises :class:`_Undecodable` for a value pydicom cannot decode."""
    modality = _code(ds, "Modality")
    body_part = _code(ds, "BodyPartExamined")
    body_parts = tuple(p.upper() for p in rules.body_parts)
    texts = _descriptions(ds)

    wanted_modalities = tuple(m.upper() for m in rules.modalities)
    secondary_capture = (
        str(_get(ds, "SOPClassUID", "")) in SECONDARY_CAPTURE_SOP_CLASSES
        or modality in SECONDARY_CAPTURE_MODALITIES
    )
    if modality not in wanted_modalities:
        if not secondary_capture:
            return _skip(
                f"modality {_shown(modality) or '<absent>'} is not a radiograph modality "
                f"(eligibility.modalities = {_listing(rules.modalities)})"
            )
        if rules.secondary_capture_needs_chest_body_part and body_part not in body_parts:
            return _skip(
                f"secondary capture with body part examined {_shown(body_part) or '<absent>'} "
                "is not a chest image "
                "(eligibility.secondary_capture_needs_chest_body_part = true, "
                f"eligibility.body_parts = {_listing(rules.body_parts)})"
            )

    if body_part and body_part not in body_parts:
        return _skip(
            f"body part examined {_shown(body_part)} is not a chest "
            f"(eligibility.body_parts = {_listing(rules.body_parts)})"
        )
    if not body_part and _find_keyword(texts, rules.chest_description_keywords, whole_word=False) is None:
        return _skip(
            "body part examined is absent and no series description, study description or protocol name "
            f"names the chest (eligibility.chest_description_keywords = "
            f"{_listing(rules.chest_description_keywords)})"
        )

    view = _code(ds, "ViewPosition")
    if view:
        if view not in tuple(v.upper() for v in rules.view_positions):
            return _skip(
                f"view position {_shown(view)} is not frontal "
                f"(eligibility.view_positions = {_listing(rules.view_positions)})"
            )
    elif not rules.allow_missing_view_position:
        return _skip("view position is absent (eligibility.allow_missing_view_position = false)")
    else:
        lateral = _find_keyword(texts, rules.lateral_description_keywords, whole_word=True)
        if lateral is not None:
            return _skip(
                f"view position is absent and a description names a lateral view ({lateral.upper()}) "
                f"(eligibility.lateral_description_keywords = {_listing(rules.lateral_description_keywords)})"
            )

    photometric = _code(ds, "PhotometricInterpretation")
    if photometric not in MONOCHROME:
        return _skip(
            f"photometric interpretation {_shown(photometric) or '<absent>'} is not monochrome "
            "(MONOCHROME1 or MONOCHROME2 required)"
        )
    samples = _get(ds, "SamplesPerPixel", 1)
    if samples != 1:
        shown = samples if isinstance(samples, int) else _shown(str(samples))
        return _skip(f"samples per pixel {shown} is not 1 (greyscale images have one sample per pixel)")

    frames_value = _get(ds, "NumberOfFrames")
    frames = 1 if frames_value in (None, "") else _positive_int(frames_value)
    if frames is None:
        return _skip(f"number of frames {_shown(str(frames_value))!r} is not a positive integer")
    if frames > rules.max_frames:
        return _skip(f"image has {frames} frames, more than eligibility.max_frames = {rules.max_frames}")
    rows, columns = _positive_int(_get(ds, "Rows")), _positive_int(_get(ds, "Columns"))
    if rows is None or columns is None:
        return _skip("image size is absent or invalid (Rows and Columns must be positive)")
    pixels = rows * columns * frames
    if pixels > rules.max_pixels:
        return _skip(
            f"image is oversized: {rows} x {columns} x {frames} frame(s) = {pixels} pixels, more than "
            f"eligibility.max_pixels = {rules.max_pixels}"
        )
    return ELIGIBLE

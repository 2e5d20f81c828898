"""Study result -> HL7 v2.5.1 ORU^R01 (unsolicited observation result), and the ACK that answers it.

Built and parsed with hl7apy at its strict 2.5.1 validation level. Every value from a DICOM header is
escaped (``\\F\\``, ``\\S\\``, ``\\T\\``, ``\\R\\``, ``\\E\\``, by hl7apy's ST type) before it is set, so no
header value can add a field, a component or a segment. The message is a PHI channel: PID carries the
patient's identifier, name, birth date and sex from the source data set, because a RIS matches results to
orders and patients by them.

Segments (what a RIS integration engineer reads):

- MSH: sending/receiving application and facility from ``[[hl7.destinations]]``; MSH-10, the message
  control ID, is derived from (study, model version, revision, destination), so a re-send after a crash
  carries the same ID and the receiver can discard the duplicate; MSH-11 ``hl7.processing_id``.
- PID: PID-3 Patient ID (assigning authority: Issuer of Patient ID), PID-5 name, PID-7 birth date, PID-8 sex.
- ORC / OBR: ORC-1 ``RE``; ORC-3 and OBR-3, the filler order number, are the Accession Number; OBR-2 the
  Placer Order Number when the header has one; OBR-4 LOINC 30745-4 "XR Chest Views"; OBR-5 and TQ1-9 the
  priority (``S`` STAT when the verdict flags a finding, ``hl7.priority_on_finding``; else
  ``hl7.priority_otherwise``); OBR-7 the observation time (Study Date/Time); OBR-22 when the result was
  made; OBR-24 ``RAD``; OBR-25 result status ``P`` (preliminary: no physician verified it).
- NTE: the disclaimer (automated screening result, not a diagnosis).
- OBX, all with status ``P``: the Study Instance UID (DCM 110180); the verdict (CWE, the class's code from
  the model card, SNOMED CT for the paper's three; OBX-8 ``A`` when it flags a finding, ``N`` otherwise);
  one probability per class (NM, unit UCUM ``1``, the card's local probability code); one reason per image
  that was not analysed (TX); the algorithm name and version (DCM 111001, 111003); the revision.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.factories import datatype_factory
from hl7apy.parser import parse_message
from pydicom import Dataset

from screener.core.config import Hl7Config, Hl7Destination

HL7_VERSION = "2.5.1"
LOCAL_SCHEME = "99CXRS"  # the screener's local coding scheme, as in its SR
DISCLAIMER = (
    "Preliminary result of an automated screening algorithm (CXR Screener). Not a diagnosis; "
    "not verified by a physician."
)
# PS3.3 C.7.1.1 Patient's Sex (M, F, O) -> HL7 table 0001 (M, F, O, U).
_SEX = {"M": "M", "F": "F", "O": "O"}
HL7_NULL = '""'  # HL7 2.5.1 2.5.3: a field explicitly empty
MAX_VALUE = 199  # hl7apy's strict limit for an OBX-5 value (ST); a longer reason is shortened
MAX_CONTROL_ID = 20  # MSH-10 is ST, at most 20 characters in 2.5.1


class Hl7Error(ValueError):
    """A message that cannot be built or an answer that is not an HL7 ACK; names what was wrong."""


@dataclass(frozen=True)
class Coded:
    """A coded value: code, coding scheme (HL7 table 0396: SCT, LN, DCM, 99CXRS ...), meaning."""

    code: str
    scheme: str
    meaning: str


PROCEDURE = Coded("30745-4", "LN", "XR Chest Views")
STUDY_UID_CONCEPT = Coded("110180", "DCM", "Study Instance UID")
ALGORITHM_NAME = Coded("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Coded("111003", "DCM", "Algorithm Version")
VERDICT_CONCEPT = Coded("CXRS-VERDICT", LOCAL_SCHEME, "AI screening verdict")
REASON_CONCEPT = Coded("CXRS-REASON", LOCAL_SCHEME, "Reason not analysed")
REVISION_CONCEPT = Coded("CXRS-REVISION", LOCAL_SCHEME, "Result revision")


@dataclass(frozen=True)
class ClassProbability:
    name: str
    concept: Coded  # the probability's observation identifier
    probability: float


@dataclass(frozen=True)
class OruFacts:
    """Everything an ORU^R01 reports about one study result, gathered where the verdict is made."""

    study_instance_uid: str
    model_version: str
    revision: int
    verdict: str  # a class name, "indeterminate" or "not_analysed"
    verdict_code: Coded
    flags_finding: bool
    algorithm_name: str
    made_at: datetime
    probabilities: Sequence[ClassProbability] = ()
    reasons: Sequence[str] = ()
    accession_number: str = ""
    placer_order_number: str = ""
    observed_at: str = ""  # HL7 DTM of the Study Date/Time, "" when the header has none
    patient_id: str = ""
    patient_id_issuer: str = ""
    patient_name: tuple[str, ...] = field(default_factory=tuple)  # DICOM PN components: family, given, ...
    birth_date: str = ""
    sex: str = ""


def control_id(study_instance_uid: str, model_version: str, revision: int, destination: str) -> str:
    """MSH-10: the same for every send of this result to this destination, 20 hex characters."""
    key = "\x1f".join((study_instance_uid, model_version, str(revision), destination))
    return hashlib.sha256(key.encode()).hexdigest()[:MAX_CONTROL_ID]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def observed_at(ds: Dataset) -> str:
    """HL7 DTM of the study's Study Date and Time (the observation time), "" without a Study Date."""
    day = _text(ds, "StudyDate")
    if len(day) != 8 or not day.isdigit():
        return ""
    time = _text(ds, "StudyTime").split(".")[0]
    return day + (time if time.isdigit() and len(time) in (2, 4, 6) else "")


def patient_facts(ds: Dataset) -> dict[str, Any]:
    """The PID facts of ``ds`` (the source header) as :class:`OruFacts` keyword arguments."""
    name = ds.get("PatientName")
    components: tuple[str, ...] = ()
    if name is not None and str(name):
        components = tuple(str(c) for c in name.components[0].split("^"))
    birth = _text(ds, "PatientBirthDate")
    return {
        "accession_number": _text(ds, "AccessionNumber"),
        "placer_order_number": _text(ds, "PlacerOrderNumberImagingServiceRequest"),
        "observed_at": observed_at(ds),
        "patient_id": _text(ds, "PatientID"),
        "patient_id_issuer": _text(ds, "IssuerOfPatientID"),
        "patient_name": components,
        "birth_date": birth if len(birth) == 8 and birth.isdigit() else "",
        "sex": _SEX.get(_text(ds, "PatientSex").upper(), "U" if _text(ds, "PatientSex") else ""),
    }


def _dtm(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S%z")


def _escaped(value: str) -> str:
    """``value`` as ER7 text with the delimiters escaped (\\F\\, \\S\\ ...), by hl7apy's ST type: OBX-5 is of
    type "varies", where hl7apy takes ER7 text and would otherwise split a value at a ``^``."""
    # A line break inside a value would end the segment (CR is the segment separator): one space instead,
    # and no other control character either.
    flat = "".join(c if c >= " " else " " for c in value.replace("\r\n", " "))
    text: str = datatype_factory(
        "ST", flat, version=HL7_VERSION, validation_level=VALIDATION_LEVEL.TOLERANT
    ).to_er7()
    return text


def _fitted(value: str, limit: int = MAX_VALUE) -> str:
    """``value`` escaped, shortened (ending in "...") until the escaped text fits ``limit`` characters."""
    text = _escaped(value)
    if len(text) <= limit:
        return text
    low, high = 0, len(value)  # the longest prefix whose escaped text, with "...", still fits
    while low < high:
        middle = (low + high + 1) // 2
        if len(_escaped(value[:middle] + "...")) <= limit:
            low = middle
        else:
            high = middle - 1
    return _escaped(value[:low] + "...")


def _set_value(obx: object, *components: str) -> None:
    obx.obx_5 = "^".join(_fitted(c) for c in components)  # type: ignore[attr-defined]


def _set_ce(field_: object, concept: Coded) -> None:
    field_.ce_1 = concept.code  # type: ignore[attr-defined]
    field_.ce_2 = concept.meaning  # type: ignore[attr-defined]
    field_.ce_3 = concept.scheme  # type: ignore[attr-defined]


def _obx(
    order: object, index: int, value_type: str, concept: Coded, facts: OruFacts, abnormal: str = ""
) -> object:
    obx = order.add_group("ORU_R01_OBSERVATION").obx  # type: ignore[attr-defined]
    obx.obx_1 = str(index)
    obx.obx_2 = value_type
    _set_ce(obx.obx_3, concept)
    if abnormal:
        obx.obx_8 = abnormal
    obx.obx_11 = "P"
    obx.obx_14 = _dtm(facts.made_at)
    return obx


def build_oru(facts: OruFacts, dest: Hl7Destination, settings: Hl7Config) -> str:
    """The ORU^R01 of ``facts`` for ``dest`` as ER7 text (segments separated by CR), validated strictly.

    Raises:
        Hl7Error: a value hl7apy refuses (too long, wrong type), naming it.
    """
    try:
        return _build(facts, dest, settings)
    except HL7apyException as exc:
        raise Hl7Error(f"cannot build the ORU^R01 for destination {dest.name}: {exc}") from exc


def _build(facts: OruFacts, dest: Hl7Destination, settings: Hl7Config) -> str:
    msg = Message("ORU_R01", version=HL7_VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = msg.msh
    msh.msh_3.hd_1 = dest.sending_application
    if dest.sending_facility:
        msh.msh_4.hd_1 = dest.sending_facility
    if dest.receiving_application:
        msh.msh_5.hd_1 = dest.receiving_application
    if dest.receiving_facility:
        msh.msh_6.hd_1 = dest.receiving_facility
    msh.msh_7 = _dtm(facts.made_at)
    msh.msh_9.msg_1 = "ORU"
    msh.msh_9.msg_2 = "R01"
    msh.msh_9.msg_3 = "ORU_R01"
    msh.msh_10 = control_id(facts.study_instance_uid, facts.model_version, facts.revision, dest.name)
    msh.msh_11.pt_1 = settings.processing_id
    msh.msh_12.vid_1 = HL7_VERSION
    msh.msh_18 = "UNICODE UTF-8"

    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    # PID-3 and PID-5 are required: without a Patient ID or name in the header, the HL7 null ("").
    pid.pid_3.cx_1 = _escaped(facts.patient_id) if facts.patient_id else HL7_NULL
    if facts.patient_id and facts.patient_id_issuer:
        pid.pid_3.cx_4.hd_1 = _escaped(facts.patient_id_issuer)
    if facts.patient_id:
        pid.pid_3.cx_5 = "MR"
    name = facts.patient_name
    if not name or not name[0]:
        pid.pid_5.xpn_1.fn_1 = HL7_NULL
    if name:
        # DICOM PN: family^given^middle^prefix^suffix; HL7 XPN: family^given^middle^suffix^prefix.
        xpn = pid.pid_5
        xpn.xpn_1.fn_1 = _escaped(name[0])
        for position, index in ((2, 1), (3, 2), (5, 3), (4, 4)):
            if len(name) > index and name[index]:
                setattr(xpn, f"xpn_{position}", _escaped(name[index]))
    if facts.birth_date:
        pid.pid_7 = facts.birth_date
    if facts.sex:
        pid.pid_8 = facts.sex

    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    priority = settings.priority_on_finding if facts.flags_finding else settings.priority_otherwise
    orc = order.orc
    orc.orc_1 = "RE"
    if facts.placer_order_number:
        orc.orc_2.ei_1 = _escaped(facts.placer_order_number)
    if facts.accession_number:
        orc.orc_3.ei_1 = _escaped(facts.accession_number)
    obr = order.obr
    obr.obr_1 = "1"
    if facts.placer_order_number:
        obr.obr_2.ei_1 = _escaped(facts.placer_order_number)
    if facts.accession_number:
        obr.obr_3.ei_1 = _escaped(facts.accession_number)
    _set_ce(obr.obr_4, PROCEDURE)
    obr.obr_5 = priority
    if facts.observed_at:
        obr.obr_7 = facts.observed_at
    obr.obr_22 = _dtm(facts.made_at)
    obr.obr_24 = "RAD"
    obr.obr_25 = "P"
    order.add_group("ORU_R01_TIMING_QTY").tq1.tq1_9.cwe_1 = priority
    nte = order.add_segment("NTE")
    nte.nte_1 = "1"
    nte.nte_3 = DISCLAIMER

    index = 1
    obx = _obx(order, index, "ST", STUDY_UID_CONCEPT, facts)
    _set_value(obx, facts.study_instance_uid)
    index += 1
    obx = _obx(order, index, "CWE", VERDICT_CONCEPT, facts, "A" if facts.flags_finding else "N")
    code = facts.verdict_code
    _set_value(obx, code.code, code.meaning, code.scheme)
    for item in facts.probabilities:
        index += 1
        obx = _obx(order, index, "NM", item.concept, facts)
        _set_value(obx, f"{item.probability:.4f}")
        obx.obx_6.ce_1 = "1"  # type: ignore[attr-defined]
        obx.obx_6.ce_3 = "UCUM"  # type: ignore[attr-defined]
    for reason in facts.reasons:
        index += 1
        obx = _obx(order, index, "TX", REASON_CONCEPT, facts)
        _set_value(obx, reason)
    index += 1
    obx = _obx(order, index, "ST", ALGORITHM_NAME, facts)
    _set_value(obx, facts.algorithm_name)
    index += 1
    obx = _obx(order, index, "ST", ALGORITHM_VERSION, facts)
    _set_value(obx, facts.model_version)
    index += 1
    obx = _obx(order, index, "NM", REVISION_CONCEPT, facts)
    _set_value(obx, str(facts.revision))

    if not msg.validate():
        raise Hl7Error(f"the ORU^R01 for destination {dest.name} does not validate as HL7 {HL7_VERSION}")
    text: str = msg.to_er7()
    return text


@dataclass(frozen=True)
class Ack:
    """An HL7 acknowledgement: MSA-1 code (AA, AE, AR; CA, CE, CR in enhanced mode), the control ID it
    answers (MSA-2) and the receiver's text (MSA-3 or ERR)."""

    code: str
    control_id: str
    text: str

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")

    @property
    def rejected(self) -> bool:
        """AR / CR: the receiver refuses the message itself; sending it again as it is will not help."""
        return self.code in ("AR", "CR")


def parse_ack(text: str) -> Ack:
    """Read an ACK (any 2.x version the receiver speaks).

    Raises:
        Hl7Error: the answer is not an HL7 message with an MSA segment.
    """
    segments = [s for s in text.replace("\n", "\r").split("\r") if s]
    if not segments or not segments[0].startswith("MSH"):
        raise Hl7Error("the answer is not an HL7 message (no MSH segment)")
    try:
        msg = parse_message("\r".join(segments), validation_level=VALIDATION_LEVEL.TOLERANT)
        msa = msg.msa
        code = str(msa.msa_1.value or "").strip()
        answered = str(msa.msa_2.value or "").strip()
        detail = str(msa.msa_3.value or "").strip() if msa.msa_3 else ""
    except HL7apyException as exc:
        raise Hl7Error(f"the answer is not a readable HL7 ACK: {exc}") from exc
    if code not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        raise Hl7Error(f"the ACK's MSA-1 is {code!r}, not an acknowledgment code (AA, AE, AR)")
    return Ack(code=code, control_id=answered, text=detail[:500])

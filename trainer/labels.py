"""Class names and their aliases, and the import of radiologist-confirmed labels from CSV into SQL.

A confirmed-labels CSV has a header with ``label`` and at least one key column among ``sop_instance_uid``,
``study_instance_uid`` and ``accession_number``; ``confirmed_by`` and ``confirmed_at`` (ISO date or
date-time) are optional; other columns are ignored and never stored. Error messages give line numbers and
column names but never echo a UID, an accession number or a name back: these identify patients and staff.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path

from sqlalchemy.orm import Session

from screener.core.db.models import UID_LENGTH, Label
from screener.core.errors import DataError
from screener.model.modelcard import DEFAULT_CONCEPTS

CLASSES: tuple[str, ...] = tuple(DEFAULT_CONCEPTS)
"""The classes the trainer can train and label: those with a default concept (the paper's three, bacterial
pneumonia, lung nodule), so a card can describe each for the SR without further input. A model's classes are
the ones its training data holds, in this order."""

LABEL_ALIASES: dict[str, str] = {
    "normal": "normal",
    "healthy": "normal",
    "covid19": "covid19",
    "covid": "covid19",
    "covid2019": "covid19",
    "sarscov2": "covid19",
    "viralpneumonia": "viral_pneumonia",
    "viral": "viral_pneumonia",
    "pneumoniaviral": "viral_pneumonia",
    "bacterialpneumonia": "bacterial_pneumonia",
    "pneumoniabacterial": "bacterial_pneumonia",
    "lungnodule": "lung_nodule",
    "nodule": "lung_nodule",
    "pulmonarynodule": "lung_nodule",
}
"""Aliases of :data:`CLASSES`, keyed by the lower-cased name without ``-``, ``_``,
``.`` or spaces (so ``"COVID-19"``, ``"Viral Pneumonia"`` and ``"NORMAL"`` all resolve). Plain "pneumonia" is
deliberately absent: in most public sets it includes bacterial pneumonia (see the COVIDx reader in
:mod:`trainer.data` for the one place it is accepted)."""

KEY_COLUMNS: tuple[str, ...] = ("sop_instance_uid", "study_instance_uid", "accession_number")
MAX_ACCESSION_LENGTH = 64  # the labels column; DICOM SH itself allows 16
MAX_CONFIRMED_BY_LENGTH = 128
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_ALIAS_STRIP_RE = re.compile(r"[\s_.\-]+")
_MAX_ECHO = 32


def canonical_label(value: str) -> str | None:
    """The class in :data:`CLASSES` that ``value`` names (directly or as an alias of
    :data:`LABEL_ALIASES`), or None if it names none."""
    return LABEL_ALIASES.get(_ALIAS_STRIP_RE.sub("", value.strip().lower()))


def describe_label(value: str) -> str:
    """``value`` quoted for an error message, or a description where it is too long to be a label."""
    if len(value) > _MAX_ECHO or not value.isprintable():
        return f"a {len(value)}-character value"
    return repr(value)


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a DICOM UID: digits joined by single dots, at most 64 characters (PS3.5 9.1)."""
    return len(value) <= UID_LENGTH and _UID_RE.match(value) is not None


def _parse_confirmed_at(value: str) -> datetime:
    """ISO date (midnight UTC) or date-time (naive means UTC); raises ValueError."""
    text = value.strip()
    if len(text) == 10:
        return datetime.combine(date.fromisoformat(text), time(0), tzinfo=UTC)
    parsed = datetime.fromisoformat(text)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@dataclass(frozen=True)
class ImportReport:
    """``imported`` rows were added; ``errors`` lists ``(line number, message)`` of every refused row."""

    imported: int
    errors: list[tuple[int, str]] = field(default_factory=list)


def _check_row(row: dict[str | None, str | None], line: int) -> tuple[Label | None, list[str]]:
    """A Label for a good row, else the reasons it was refused (no identifier values in them)."""
    problems: list[str] = []
    if None in row:
        problems.append(f"line {line} has more fields than the header: check the quoting and delimiters")
    values = {str(k): (v or "").strip() for k, v in row.items() if k is not None}

    raw_label = values.get("label", "")
    label = canonical_label(raw_label)
    if not raw_label:
        problems.append(f"label on line {line} is empty: give one of {', '.join(CLASSES)}")
    elif label is None:
        problems.append(
            f"label {describe_label(raw_label)} on line {line} is not one of {', '.join(CLASSES)}: "
            "correct it (aliases such as COVID-19, Viral Pneumonia and NORMAL are accepted)"
        )

    keys: dict[str, str | None] = {}
    for column in ("sop_instance_uid", "study_instance_uid"):
        value = values.get(column, "")
        keys[column] = value or None
        if value and not is_valid_uid(value):
            problems.append(
                f"{column} on line {line} is not a valid DICOM UID (digits separated by dots, at most "
                f"{UID_LENGTH} characters): copy it again from the image header"
            )
    accession = values.get("accession_number", "")
    keys["accession_number"] = accession or None
    if len(accession) > MAX_ACCESSION_LENGTH:
        problems.append(
            f"accession_number on line {line} is longer than {MAX_ACCESSION_LENGTH} characters: "
            "check the column holds the accession number"
        )
    elif accession and not accession.isprintable():
        problems.append(f"accession_number on line {line} contains control characters: remove them")
    if not any(keys.values()):
        problems.append(
            f"line {line} has no {', '.join(KEY_COLUMNS)}: give at least one so the label can be matched"
        )

    confirmed_by = values.get("confirmed_by", "") or None
    if confirmed_by is not None and len(confirmed_by) > MAX_CONFIRMED_BY_LENGTH:
        problems.append(
            f"confirmed_by on line {line} is longer than {MAX_CONFIRMED_BY_LENGTH} characters: shorten it"
        )
    confirmed_at: datetime | None = None
    raw_date = values.get("confirmed_at", "")
    if raw_date:
        try:
            confirmed_at = _parse_confirmed_at(raw_date)
        except ValueError:
            problems.append(
                f"confirmed_at on line {line} is not an ISO date or date-time "
                "(e.g. 2024-03-01 or 2024-03-01T14:30:00+01:00): correct it or leave it empty"
            )
    if problems or label is None:
        return None, problems
    return (
        Label(
            sop_instance_uid=keys["sop_instance_uid"],
            study_instance_uid=keys["study_instance_uid"],
            accession_number=keys["accession_number"],
            label=label,
            confirmed_by=confirmed_by,
            confirmed_at=confirmed_at,
        ),
        [],
    )


def import_labels(session: Session, csv_path: Path) -> ImportReport:
    """Add every good row of ``csv_path`` to the ``labels`` table and report the refused ones.

    Labels are stored as canonical class names; keys are stripped of surrounding spaces; ``source_file``
    is the CSV's file name and ``imported_at`` one timestamp for the whole file. Rows are added and
    flushed in ``session``; committing is the caller's decision. A row is refused (and listed in
    :attr:`ImportReport.errors` with its 1-based line number, the header being line 1) when its label is
    empty or unknown, it has no key, a UID is malformed, ``accession_number`` or ``confirmed_by`` is too
    long, ``confirmed_at`` is not ISO, or it has more fields than the header. A row can have several
    problems; each gets its own entry.

    Raises:
        DataError: the file cannot be read, is not UTF-8 text, or its header lacks ``label`` or every key
            column.
    """
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [name.strip() for name in (reader.fieldnames or [])]
            reader.fieldnames = header
            if "label" not in header or not any(column in header for column in KEY_COLUMNS):
                raise DataError(
                    f"{csv_path}: the header must have a label column and at least one of "
                    f"{', '.join(KEY_COLUMNS)}; found {', '.join(header) or 'no header'}"
                )
            good: list[Label] = []
            errors: list[tuple[int, str]] = []
            for row in reader:
                label, problems = _check_row(dict(row), reader.line_num)
                errors.extend((reader.line_num, problem) for problem in problems)
                if label is not None:
                    good.append(label)
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read the labels file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not UTF-8 text (byte {exc.start}): save the CSV as UTF-8") from exc
    except csv.Error as exc:
        raise DataError(f"{csv_path}: malformed CSV: {exc}") from exc
    imported_at = datetime.now(UTC)
    for label in good:
        label.source_file = csv_path.name
        label.imported_at = imported_at
    session.add_all(good)
    session.flush()
    return ImportReport(imported=len(good), errors=errors)

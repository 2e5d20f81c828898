"""Datasets for training and evaluation: image folders, CSV lists, COVIDx lists, confirmed labels in SQL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``label`` is one of ``screener.modelcard.CLASSES``; ``key`` is a stable identity
    (the SOP Instance UID for DICOM and confirmed labels, else the path relative to the dataset root)."""

    path: Path
    label: str
    key: str

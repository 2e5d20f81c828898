"""Datasets for training and evaluation: image folders, CSV lists, COVIDx lists, confirmed labels in SQL.

Every reader returns :class:`Sample` values sorted by key; :func:`split_samples` makes the reproducible,
stratified, leak-free train / validation / test split; :class:`ImageDataset` turns samples into network
input with exactly the serving preprocessing of :mod:`screener.imaging.pixels`; :func:`balanced_sampler` draws
classes equally often.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import sqlalchemy as sa
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from screener.core.db.models import Instance, InstanceStatus, Label, Study
from screener.core.db.types import as_utc
from screener.core.errors import DataError, ImagingError
from screener.imaging.part10 import accession_of
from screener.imaging.pixels import FloatImage, PreprocessSpec, load_unit, to_model_input
from screener.model.modelcard import CLASSES as PAPER_CLASSES
from trainer.labels import CLASSES, canonical_label, describe_label

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})
"""File name endings an image folder may hold; files without an ending are taken when they are DICOM."""

COVIDX_LABELS: dict[str, str] = {"covid19": "covid19", "pneumonia": "viral_pneumonia", "normal": "normal"}
"""COVIDx label column -> class. COVIDx "pneumonia" is any non-COVID pneumonia (bacterial and viral, from
the RSNA challenge), not necessarily viral: it is mapped to ``viral_pneumonia`` because that is this
model's only non-COVID pneumonia class, and a model trained on it learns "pneumonia other than COVID-19"."""

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
_DEFAULT_MAX_PIXELS = 100_000_000
_SQL_CHUNK = 500


CONFIRMED_SOURCE = "site-confirmed"
"""The ``source`` of images whose labels were confirmed at this site (the ``labels`` table)."""


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``label`` is one of ``screener.model.modelcard.CLASSES``; ``key`` is a stable
    identity
    (the SOP Instance UID for DICOM and confirmed labels, else the path relative to the dataset root).

    ``source`` names where the image came from (a hospital, a collection): the manifest's ``source``
    column, else its ``source_repo``, else the dataset root's folder name (see :func:`load_samples`).
    ``patient`` groups images of one patient (a ``PATIENTS.csv`` beside the manifest); images of one
    patient never straddle splits. Empty means unknown (each image its own patient)."""

    path: Path
    label: str
    key: str
    source: str = field(default="", compare=False)  # metadata: identity is path, label and key
    patient: str = field(default="", compare=False)


# --- readers -------------------------------------------------------------------------------------------


def load_samples(source: Path | str) -> list[Sample]:
    """Every labelled image of a dataset, sorted by key.

    ``source`` is one of:

    - a folder with one sub-folder per class, named by class or alias (``COVID``, ``covid-19``,
      ``Viral Pneumonia``, ``NORMAL`` ..., see :data:`trainer.labels.LABEL_ALIASES`); images are found
      recursively by :data:`IMAGE_SUFFIXES` or, without an ending, by the DICOM ``DICM`` prefix; hidden
      files and folders are ignored; files directly in ``source`` (README, manifest) are ignored; keys are
      POSIX paths relative to ``source``; a ``MANIFEST.csv`` there (column ``file`` relative to the folder)
      gives each image's ``source`` (its ``source`` column, else ``source_repo``) and a ``PATIENTS.csv``
      (``file``, ``patient_key``) its patient; images the manifest does not list, or a folder without
      one, take the folder's name as source;
    - a ``.csv`` with a header holding ``path`` and ``label`` (other columns ignored except optional
      ``source`` and ``patient``); relative paths are resolved against the CSV's folder; keys are the paths
      as written; the source defaults to the CSV's folder name;
    - a COVIDx-style ``.txt`` list, one image per line ``patient_id filename label [data_source]``; each
      image is looked up next to the list, then in a ``train`` and a ``test`` sibling folder (``test``
      first when the list's name contains "test"); labels per :data:`COVIDX_LABELS` (note: COVIDx
      "pneumonia" becomes ``viral_pneumonia``); keys are paths relative to the list's folder.

    Raises:
        DataError: ``source`` is missing or of another kind; a class folder or label is unknown; a listed
            file is missing; a line is malformed; the same image is listed with two labels; or no image is
            found. The message names the file, line and offending value.
    """
    root = Path(source)
    if root.is_dir():
        samples = _folder_samples(root)
    elif not root.exists():
        raise DataError(f"dataset {root} does not exist: give an image folder, a .csv or a COVIDx .txt list")
    elif root.suffix.lower() == ".csv":
        samples = _csv_samples(root)
    elif root.suffix.lower() == ".txt":
        samples = _covidx_samples(root)
    else:
        raise DataError(
            f"dataset {root} is neither a folder, a .csv (path,label) nor a COVIDx .txt list: "
            "give one of those"
        )
    if not samples:
        raise DataError(f"dataset {root} holds no labelled images")
    return sorted(samples, key=lambda s: (s.key, str(s.path)))


def load_roots(roots: Sequence[Path | str]) -> list[Sample]:
    """Every labelled image of one or more datasets (each as :func:`load_samples` reads it), merged.

    With one root the samples are exactly :func:`load_samples`'s (keys, and so a card's training-data
    digest, unchanged). With several, each key and patient is prefixed with its root's name (``cxr3/...``,
    ``cxrx/...``; ``name-2`` for a second root of the same name) so that keys stay unique; an image's
    ``source`` is kept as its root gave it.

    Raises:
        DataError: no root is given, or one cannot be read (see :func:`load_samples`).
    """
    if not roots:
        raise DataError("no dataset given: pass --data DIR (more than once to merge datasets)")
    if len(roots) == 1:
        return load_samples(roots[0])
    merged: list[Sample] = []
    used: Counter[str] = Counter()
    for root in roots:
        path = Path(root)
        name = path.stem if path.is_file() else path.name
        used[name] += 1
        prefix = name if used[name] == 1 else f"{name}-{used[name]}"
        merged.extend(
            replace(
                s,
                key=f"{prefix}/{s.key}",
                patient=f"{prefix}/{s.patient}" if s.patient else "",
            )
            for s in load_samples(path)
        )
    return sorted(merged, key=lambda s: (s.key, str(s.path)))


def source_table(samples: Iterable[Sample]) -> dict[str, dict[str, int]]:
    """``{source: {class: count}}`` (the paper's three classes and any other class present, zeros included),
    sources sorted."""
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for sample in samples:
        table[sample.source or "unknown"][sample.label] += 1
    shown = _shown_classes(c for counts in table.values() for c in counts)
    return {source: {c: table[source].get(c, 0) for c in shown} for source in sorted(table)}


def _shown_classes(labels: Iterable[str]) -> tuple[str, ...]:
    """The paper's three classes, then any other trainable class among ``labels`` (:data:`CLASSES` order)."""
    present = set(labels)
    return tuple(c for c in CLASSES if c in PAPER_CLASSES or c in present)


def dataset_classes(samples: Iterable[Sample]) -> tuple[str, ...]:
    """The classes a model trained on ``samples`` outputs: those present, in :data:`CLASSES` order.

    Raises :class:`DataError` when fewer than two classes are present."""
    present = {s.label for s in samples}
    classes = tuple(c for c in CLASSES if c in present)
    if len(classes) < 2:
        raise DataError(
            f"the data holds {len(classes)} class(es) ({', '.join(classes) or 'none'}): a model needs at "
            f"least two of {', '.join(CLASSES)}"
        )
    return classes


def single_source_classes(table: dict[str, dict[str, int]]) -> dict[str, str]:
    """``{class: its only source}`` for each class present in exactly one source of ``table``."""
    holders: dict[str, list[str]] = defaultdict(list)
    for source, counts in table.items():
        for label, count in counts.items():
            if count:
                holders[label].append(source)
    return {label: names[0] for label, names in holders.items() if len(names) == 1}


def format_source_table(table: dict[str, dict[str, int]], max_rows: int = 40) -> str:
    """The class x source table as aligned text (sources with the most images first, then a total)."""
    ordered = sorted(table.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    width = max([len(s) for s, _ in ordered[:max_rows]] + [6])
    shown = _shown_classes(c for _, counts in ordered for c in counts)
    head = f"{'source':<{width}} " + " ".join(f"{c:>15}" for c in shown) + f" {'total':>7}"
    lines = [head]
    for source, counts in ordered[:max_rows]:
        cells = " ".join(f"{counts.get(c, 0):>15}" for c in shown)
        lines.append(f"{source:<{width}} {cells} {sum(counts.values()):>7}")
    if len(ordered) > max_rows:
        rest = ordered[max_rows:]
        cells = " ".join(f"{sum(r[1].get(c, 0) for r in rest):>15}" for c in shown)
        lines.append(f"{f'({len(rest)} more)':<{width}} {cells} {sum(sum(r[1].values()) for r in rest):>7}")
    totals = " ".join(f"{sum(r[1].get(c, 0) for r in ordered):>15}" for c in shown)
    lines.append(f"{'total':<{width}} {totals} {sum(sum(r[1].values()) for r in ordered):>7}")
    return "\n".join(lines)


def _read_manifest(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``({file: source}, {file: patient})`` from ``root/MANIFEST.csv`` and ``root/PATIENTS.csv``."""
    sources: dict[str, str] = {}
    patients: dict[str, str] = {}
    manifest, roster = root / "MANIFEST.csv", root / "PATIENTS.csv"
    try:
        if manifest.is_file():
            with manifest.open(newline="", encoding="utf-8-sig") as fh:
                for row in csv.DictReader(fh):
                    name = (row.get("file") or "").strip()
                    source = (row.get("source") or "").strip() or (row.get("source_repo") or "").strip()
                    if name and source:
                        sources[name] = source
        if roster.is_file():
            with roster.open(newline="", encoding="utf-8-sig") as fh:
                for row in csv.DictReader(fh):
                    name = (row.get("file") or "").strip()
                    patient = (row.get("patient_key") or "").strip()
                    if name and patient:
                        patients[name] = patient
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"dataset {root}: cannot read its MANIFEST.csv / PATIENTS.csv: {exc}") from exc
    return sources, patients


def _is_dicom_without_suffix(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _walk_images(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            yield from _walk_images(path)
        elif path.is_file() and (
            path.suffix.lower() in IMAGE_SUFFIXES or (not path.suffix and _is_dicom_without_suffix(path))
        ):
            yield path


def _folder_samples(root: Path) -> list[Sample]:
    samples: list[Sample] = []
    sources, patients = _read_manifest(root)
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if not folders:
        raise DataError(f"dataset folder {root} has no class sub-folders: expected {', '.join(CLASSES)}")
    for folder in folders:
        label = canonical_label(folder.name)
        if label is None:
            raise DataError(
                f"dataset folder {folder}: sub-folder name {describe_label(folder.name)} is not a class "
                f"({', '.join(CLASSES)}) or a known alias: rename or remove it"
            )
        for path in _walk_images(folder):
            key = path.relative_to(root).as_posix()
            samples.append(
                Sample(
                    path=path,
                    label=label,
                    key=key,
                    source=sources.get(key, root.name),
                    patient=patients.get(key, ""),
                )
            )
    return samples


def _add_unique(seen: dict[str, tuple[Sample, int]], sample: Sample, where: Path, line: int) -> None:
    """Record ``sample`` unless already listed; refuse the same image under two labels."""
    previous = seen.get(sample.key)
    if previous is None:
        seen[sample.key] = (sample, line)
    elif previous[0].label != sample.label:
        raise DataError(
            f"{where} line {line}: {sample.key} is listed as {sample.label} but line {previous[1]} lists "
            f"it as {previous[0].label}: keep one label"
        )


def _csv_samples(csv_path: Path) -> list[Sample]:
    base = csv_path.parent
    seen: dict[str, tuple[Sample, int]] = {}
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [name.strip() for name in (reader.fieldnames or [])]
            reader.fieldnames = header
            if "path" not in header or "label" not in header:
                raise DataError(
                    f"{csv_path}: the header must have path and label columns; "
                    f"found {', '.join(header) or 'none'}"
                )
            for row in reader:
                line = reader.line_num
                raw_path = (row.get("path") or "").strip()
                raw_label = (row.get("label") or "").strip()
                if not raw_path:
                    raise DataError(f"{csv_path} line {line}: the path is empty")
                label = canonical_label(raw_label)
                if label is None:
                    raise DataError(
                        f"{csv_path} line {line}: label {describe_label(raw_label)} is not one of "
                        f"{', '.join(CLASSES)} or a known alias"
                    )
                path = Path(raw_path)
                resolved = path if path.is_absolute() else base / path
                if not resolved.is_file():
                    raise DataError(f"{csv_path} line {line}: image {raw_path} does not exist ({resolved})")
                sample = Sample(
                    path=resolved,
                    label=label,
                    key=path.as_posix(),
                    source=(row.get("source") or "").strip() or base.name,
                    patient=(row.get("patient") or "").strip(),
                )
                _add_unique(seen, sample, csv_path, line)
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read the list: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not UTF-8 text (byte {exc.start})") from exc
    except csv.Error as exc:
        raise DataError(f"{csv_path}: malformed CSV: {exc}") from exc
    return [sample for sample, _ in seen.values()]


def _covidx_label(token: str) -> str | None:
    normalised = "".join(ch for ch in token.lower() if ch.isalnum())
    return COVIDX_LABELS.get(normalised) or canonical_label(token)


def _covidx_samples(list_path: Path) -> list[Sample]:
    base = list_path.parent
    subfolders = ("test", "train") if "test" in list_path.stem.lower() else ("train", "test")
    search = (base, *(base / name for name in subfolders))
    seen: dict[str, tuple[Sample, int]] = {}
    try:
        lines = list_path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise DataError(f"{list_path}: cannot read the list: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{list_path}: not UTF-8 text (byte {exc.start})") from exc
    for number, text in enumerate(lines, start=1):
        tokens = text.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        if len(tokens) < 3:
            raise DataError(
                f"{list_path} line {number}: expected 'patient_id filename label [data_source]', "
                f"found {len(tokens)} field(s)"
            )
        # The source column is optional and file names may contain spaces: the label is the last field
        # when it is one, else the one before the source.
        if _covidx_label(tokens[-1]) is not None:
            raw_label, name_tokens, data_source = tokens[-1], tokens[1:-1], base.name
        else:
            raw_label, name_tokens, data_source = tokens[-2], tokens[1:-2], tokens[-1]
        label = _covidx_label(raw_label)
        if label is None or not name_tokens:
            raise DataError(
                f"{list_path} line {number}: label {describe_label(raw_label)} is not one of COVID-19, "
                f"pneumonia, normal (or {', '.join(CLASSES)})"
            )
        filename = " ".join(name_tokens)
        found = next((folder / filename for folder in search if (folder / filename).is_file()), None)
        if found is None:
            raise DataError(
                f"{list_path} line {number}: image {filename} not found next to the list or in "
                f"{' or '.join(str(base / name) for name in subfolders)}"
            )
        sample = Sample(
            path=found,
            label=label,
            key=found.relative_to(base).as_posix(),
            source=data_source,
            patient=tokens[0],
        )
        _add_unique(seen, sample, list_path, number)
    return [sample for sample, _ in seen.values()]


# --- confirmed labels from SQL --------------------------------------------------------------------------


def _chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), _SQL_CHUNK):
        yield values[start : start + _SQL_CHUNK]


def confirmed_label_samples(
    engine: sa.Engine, spool_root: Path, since: datetime | None = None
) -> list[Sample]:
    """Samples for every received instance that a confirmed label reaches, sorted by key.

    A label row applies through its most specific key: its SOP Instance UID (that instance), else its
    Study Instance UID (every instance of the study), else its accession number (every instance whose
    spooled header carries that Accession Number; headers are only read when such labels exist, without
    pixel data). Where several labels reach one instance the latest import wins (``imported_at``, then
    row id). With ``since`` (naive means UTC) only labels imported after it count. Instances marked
    ``skipped`` (not an eligible frontal chest radiograph) or ``failed`` (undecodable) are left out, and so
    are instances whose spooled file no longer exists (removed by retention). ``path`` is
    ``spool_root / instances.spool_name``; ``key`` is the SOP Instance UID. Nothing is logged.

    Raises:
        DataError: a stored label is not a known class (the message names the label row id).
    """
    query = sa.select(
        Label.id, Label.sop_instance_uid, Label.study_instance_uid, Label.accession_number, Label.label
    ).order_by(Label.imported_at, Label.id)
    if since is not None:
        query = query.where(Label.imported_at > as_utc(since))  # UTCDateTime binds it the same everywhere
    rows_query = (
        sa.select(Instance.id, Instance.sop_instance_uid, Instance.spool_name, Study.study_instance_uid)
        .join(Study, Instance.study_id == Study.id, isouter=True)
        .where(Instance.status.not_in((InstanceStatus.SKIPPED, InstanceStatus.FAILED)))
    )
    instances: dict[int, tuple[str, str, str | None]] = {}

    def collect(statement: sa.Select[int, str, str, str]) -> None:
        for iid, sop, spool_name, study in conn.execute(statement):
            instances[iid] = (sop, spool_name, study)

    with engine.connect() as conn:
        labels = list(conn.execute(query))
        if not labels:
            return []
        sops = sorted({row.sop_instance_uid for row in labels if row.sop_instance_uid})
        studies = sorted(
            {row.study_instance_uid for row in labels if row.study_instance_uid and not row.sop_instance_uid}
        )
        wants_accession = any(
            row.accession_number and not row.sop_instance_uid and not row.study_instance_uid for row in labels
        )
        if wants_accession:  # any instance may carry the number: every header must be read
            collect(rows_query)
        else:
            for chunk in _chunks(sops):
                collect(rows_query.where(Instance.sop_instance_uid.in_(chunk)))
            for chunk in _chunks(studies):
                collect(rows_query.where(Study.study_instance_uid.in_(chunk)))

    by_sop: dict[str, int] = {}
    by_study: dict[str, list[int]] = defaultdict(list)
    for instance_id, (sop, _, study) in instances.items():
        by_sop[sop] = instance_id
        if study:
            by_study[study].append(instance_id)
    by_accession: dict[str, list[int]] = defaultdict(list)
    present = {iid for iid, (_, spool_name, _) in instances.items() if (spool_root / spool_name).is_file()}
    if wants_accession:
        for instance_id in sorted(present):
            accession = accession_of(spool_root / instances[instance_id][1])
            if accession:
                by_accession[accession].append(instance_id)

    chosen: dict[int, str] = {}
    for row in labels:
        label = canonical_label(row.label)
        if label is None:
            raise DataError(
                f"labels row {row.id}: label {describe_label(row.label)} is not one of {', '.join(CLASSES)}: "
                "correct or delete the row"
            )
        targets: Iterable[int]
        if row.sop_instance_uid:
            target = by_sop.get(row.sop_instance_uid)
            targets = () if target is None else (target,)
        elif row.study_instance_uid:
            targets = by_study.get(row.study_instance_uid, ())
        elif row.accession_number:
            targets = by_accession.get(row.accession_number.strip(), ())
        else:
            targets = ()
        for instance_id in targets:
            chosen[instance_id] = label  # labels arrive oldest first: the latest wins

    samples = [
        Sample(
            path=spool_root / instances[iid][1],
            label=label,
            key=instances[iid][0],
            source=CONFIRMED_SOURCE,
            patient=instances[iid][2] or "",
        )
        for iid, label in chosen.items()
        if iid in present
    ]
    return sorted(samples, key=lambda s: s.key)


# --- perceptual hashing and leak-free splits ----------------------------------------------------------


def image_hash(path: Path, spec: PreprocessSpec, max_pixels: int = _DEFAULT_MAX_PIXELS) -> int:
    """64-bit DCT perceptual hash (pHash) of the image's ``[0, 1]`` grey rendering by
    :func:`screener.imaging.pixels.load_unit`.

    The image is area-averaged to 32 x 32, transformed by a 2-D DCT, and the 8 x 8 lowest frequencies
    (DC term included, bit 63 first in row order) are compared with their median: one bit each. The hash
    survives re-encoding (JPEG, PNG), small brightness and contrast changes and resizing; identical
    pixels give identical hashes.

    Raises:
        DataError: the file cannot be read or decoded (the message names it).
    """
    return _hash_both(path, spec, max_pixels)[0]


def _phash(img01: FloatImage) -> int:
    return int.from_bytes(_phash_bits(img01, 8).tobytes(), "big")


def _phash_bits(img01: FloatImage, side: int) -> np.ndarray:
    """``side * side`` pHash bits, packed: the lowest DCT frequencies of a ``4 side`` square thumbnail
    against their median (the DC term, which only carries mean brightness, left out of the median)."""
    small = cv2.resize(
        img01.astype(np.float32, copy=False), (4 * side, 4 * side), interpolation=cv2.INTER_AREA
    )
    low = cv2.dct(small)[:side, :side].ravel()
    return np.packbits(low > np.median(low[1:]))


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


def _hash_both(path: Path, spec: PreprocessSpec, max_pixels: int) -> tuple[int, np.ndarray]:
    """The 64-bit hash of :func:`image_hash` and a 256-bit one (as 4 uint64), from one decode."""
    try:
        img = load_unit(path, spec, max_pixels)
    except (ImagingError, OSError) as exc:
        raise DataError(f"cannot hash image {path}: {exc}") from exc
    return _phash(img), _phash_bits(img, 16).view(">u8").astype(np.uint64)


def _hashes(
    samples: Sequence[Sample], spec: PreprocessSpec, max_pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes ``[n]`` and 256-bit hashes ``[n, 4]`` (uint64) per sample; each distinct path is
    decoded once, on a few threads (the decoders release the GIL)."""
    paths = sorted({s.path for s in samples})
    with ThreadPoolExecutor(max_workers=4) as pool:
        values = dict(zip(paths, pool.map(lambda p: _hash_both(p, spec, max_pixels), paths), strict=True))
    coarse = np.array([values[s.path][0] for s in samples], dtype=np.uint64)
    fine = np.stack([values[s.path][1] for s in samples]) if samples else np.zeros((0, 4), np.uint64)
    return coarse, fine


def _near_duplicate_groups(coarse: np.ndarray, fine: np.ndarray, max_bits: int) -> np.ndarray:
    """Union-find root (the smallest member index) per item.

    Two items are near-duplicates when their 64-bit hashes differ in at most ``max_bits`` bits and their
    256-bit hashes in at most ``4 * max_bits`` (the same fraction of the bits). The 64-bit test alone is
    too coarse for chest radiographs, which share their low-frequency layout: on cxr3 it chains hundreds
    of different patients into one group at 6 bits, while the pair test keeps only the 4 pairs that are
    near-identical (thumbnail correlation 0.98-0.99). Re-encoded or slightly brightened copies differ by
    0-2 bits in both. Candidate pairs come from a blockwise vectorised XOR + popcount over the 64-bit
    hashes (O(n^2) bit operations in numpy, well under a second for 4,000 images); only they reach Python.
    """
    n = coarse.size
    parent = list(range(n))

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    block = 1024
    fine_limit = 4 * max_bits
    for start in range(0, n, block):
        stop = min(n, start + block)
        distances = np.bitwise_count(coarse[start:stop, None] ^ coarse[None, :])
        rows, cols = np.nonzero(distances <= max_bits)
        rows += start
        keep = cols > rows
        rows, cols = rows[keep], cols[keep]
        fine_distance = np.bitwise_count(fine[rows] ^ fine[cols]).sum(axis=1)
        for i, j in zip(
            rows[fine_distance <= fine_limit].tolist(),
            cols[fine_distance <= fine_limit].tolist(),
            strict=True,
        ):
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def _join_patients(samples: Sequence[Sample], roots: np.ndarray) -> np.ndarray:
    """Merge near-duplicate groups that share a patient: one patient's images stay in one split."""
    parent = roots.tolist()

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for index, sample in enumerate(samples):
        if not sample.patient:
            continue
        other = first.setdefault(sample.patient, index)
        a, b = find(index), find(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(len(parent))], dtype=np.int64)


@dataclass(frozen=True)
class Splits:
    """A train / validation / test split; each sample is in exactly one list, lists sorted by key."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def items(self) -> Iterator[tuple[str, list[Sample]]]:
        """``(split name, samples)`` in the order train, val, test."""
        yield from zip(SPLIT_NAMES, (self.train, self.val, self.test), strict=True)

    def digest(self) -> str:
        """sha256 (hex) of the sorted ``split, key, label`` lines: the training-data digest of a card."""
        lines = sorted(f"{name}\t{s.key}\t{s.label}" for name, samples in self.items() for s in samples)
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {class: count}}`` for every split (see :func:`class_counts`)."""
        return {name: class_counts(samples) for name, samples in self.items()}


def split_samples(
    samples: list[Sample],
    *,
    spec: PreprocessSpec,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    near_duplicate_bits: int = 6,
    max_pixels: int = _DEFAULT_MAX_PIXELS,
) -> Splits:
    """Reproducible, class-stratified, leak-free split.

    ``test_fraction`` of each class is held out for test first; ``val_fraction`` of the rest of each class
    is validation and the remainder training (the defaults give 10 % test and a 9:1 train/validation split
    of the other 90 %, the paper's 9:1). Images whose perceptual hashes (:func:`image_hash`) differ in at
    most ``near_duplicate_bits`` of 64 bits are grouped (transitively, union-find), and a group is never
    divided between splits, so identical files, re-encodings and slightly altered copies stay together.
    Images of one ``patient`` are grouped the same way. A group is stratified by its most common label;
    groups are shuffled per class with ``seed`` and assigned whole, a group going to test or validation
    only while it fits that split's quota, so the fractions are met exactly for singletons and to within
    a group's size otherwise. The result depends only on the samples (not their order), the parameters
    and the image contents.

    Raises:
        ValueError: a fraction is outside ``[0, 1)``, their sum leaves no training data, or
            ``near_duplicate_bits`` is negative.
        DataError: ``samples`` is empty, a label is not a class, a key is listed twice, or an image cannot
            be decoded.
    """
    if not 0.0 <= test_fraction < 1.0 or not 0.0 <= val_fraction < 1.0:
        raise ValueError(
            f"test_fraction {test_fraction!r} and val_fraction {val_fraction!r} must each be in [0, 1)"
        )
    if near_duplicate_bits < 0:
        raise ValueError(f"near_duplicate_bits {near_duplicate_bits!r} must be >= 0")
    if not samples:
        raise DataError("cannot split an empty dataset")
    _check_labels(samples)
    ordered = sorted(samples, key=lambda s: (s.key, str(s.path)))
    duplicates = [key for key, count in Counter(s.key for s in ordered).items() if count > 1]
    if duplicates:
        raise DataError(
            f"sample key {duplicates[0]} is listed {Counter(s.key for s in ordered)[duplicates[0]]} times"
        )

    roots = _join_patients(
        ordered, _near_duplicate_groups(*_hashes(ordered, spec, max_pixels), near_duplicate_bits)
    )
    members: dict[int, list[int]] = defaultdict(list)
    for index, root in enumerate(roots.tolist()):
        members[root].append(index)
    by_class: dict[str, list[list[int]]] = defaultdict(list)
    for root in sorted(members):  # roots are the smallest member index: a deterministic order
        group = members[root]
        votes = Counter(ordered[i].label for i in group)
        majority = min(votes, key=lambda label: (-votes[label], CLASSES.index(label)))
        by_class[majority].append(group)

    assigned: dict[str, list[Sample]] = {name: [] for name in SPLIT_NAMES}
    rng = np.random.default_rng(seed)
    for label in CLASSES:
        groups = by_class.get(label, [])
        total = sum(len(g) for g in groups)
        test_quota = round(total * test_fraction)
        val_quota = round((total - test_quota) * val_fraction)
        taken = {"test": 0, "val": 0}
        for position in rng.permutation(len(groups)).tolist():
            group = groups[position]
            if taken["test"] + len(group) <= test_quota:
                name = "test"
            elif taken["val"] + len(group) <= val_quota:
                name = "val"
            else:
                name = "train"
            if name != "train":
                taken[name] += len(group)
            assigned[name].extend(ordered[i] for i in group)
    for name in SPLIT_NAMES:
        assigned[name].sort(key=lambda s: (s.key, str(s.path)))
    return Splits(train=assigned["train"], val=assigned["val"], test=assigned["test"])


def limit_per_class(samples: list[Sample], n: int, seed: int = 0) -> list[Sample]:
    """At most ``n`` samples of each class, drawn reproducibly with ``seed``; sorted by key.

    Raises:
        ValueError: ``n`` is not positive.
    """
    if n < 1:
        raise ValueError(f"limit per class {n!r} must be at least 1")
    rng = np.random.default_rng(seed)
    kept: list[Sample] = []
    by_label: dict[str, list[Sample]] = defaultdict(list)
    for sample in sorted(samples, key=lambda s: (s.key, str(s.path))):
        by_label[sample.label].append(sample)
    for label in sorted(by_label):
        group = by_label[label]
        if len(group) <= n:
            kept.extend(group)
        else:
            kept.extend(group[i] for i in sorted(rng.choice(len(group), size=n, replace=False).tolist()))
    return sorted(kept, key=lambda s: (s.key, str(s.path)))


def class_counts(samples: Iterable[Sample]) -> dict[str, int]:
    """``{class: count}`` for the paper's three classes and every other trainable class found (in
    :data:`CLASSES` order, zeros included), plus any other label found."""
    counts = Counter(s.label for s in samples)
    return {label: counts.get(label, 0) for label in _shown_classes(counts)} | {
        label: count for label, count in sorted(counts.items()) if label not in CLASSES
    }


def _check_labels(samples: Iterable[Sample], classes: Sequence[str] = CLASSES) -> None:
    for sample in samples:
        if sample.label not in classes:
            raise DataError(
                f"sample {sample.key} has label {describe_label(sample.label)}, "
                f"not one of {', '.join(classes)}"
            )


# --- torch ----------------------------------------------------------------------------------------------


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Samples as ``(float32 [3, S, S] tensor, class index into classes)``, preprocessed as in serving.

    Item ``i`` is ``to_model_input(augment(load_unit(path)))`` (augmentation only when ``augment`` is
    given), so training sees exactly the screener's input. The augmentation of item ``i`` is drawn from
    ``np.random.default_rng((seed, epoch, i))``: reproducible whatever the worker, worker count or order.
    The epoch lives in shared memory, so :meth:`set_epoch` reaches DataLoader workers, persistent ones
    included. With ``cache=True`` decoded ``[0, 1]`` images are kept in memory (per worker process).
    With ``crop`` (a :class:`screener.model.lungs.LungCrop`, the module the exported graph runs first) the
    tensor is cropped to its lung fields, the box jittered by ``crop_jitter`` when augmenting.

    Raises:
        DataError: from the constructor, a label is not a class; from ``__getitem__``, the image cannot be
            read or decoded (the message names the file).
    """

    def __init__(
        self,
        samples: list[Sample],
        spec: PreprocessSpec,
        *,
        augment: Callable[[FloatImage, np.random.Generator], FloatImage] | None = None,
        max_pixels: int = _DEFAULT_MAX_PIXELS,
        seed: int = 0,
        cache: bool = False,
        crop: torch.nn.Module | None = None,
        crop_jitter: float = 0.0,
        classes: Sequence[str] = CLASSES,
    ) -> None:
        _check_labels(samples, classes)
        self.classes = tuple(classes)
        self.crop = crop
        self.crop_jitter = crop_jitter
        self.samples = list(samples)
        self.spec = spec
        self.augment = augment
        self.max_pixels = max_pixels
        self.seed = seed
        self.cache = cache
        self._epoch = torch.zeros(1, dtype=torch.int64)
        self._epoch.share_memory_()  # type: ignore[no-untyped-call]
        self._images: dict[int, FloatImage] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (>= 0) for every worker.

        Raises:
            ValueError: ``epoch`` is negative.
        """
        if epoch < 0:
            raise ValueError(f"epoch {epoch!r} must be >= 0")
        self._epoch[0] = epoch

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> FloatImage:
        """The ``[0, 1]`` image of item ``index`` before augmentation (cached when ``cache``)."""
        image = self._images.get(index)
        if image is None:
            sample = self.samples[index]
            try:
                image = load_unit(sample.path, self.spec, self.max_pixels)
            except (ImagingError, OSError) as exc:
                raise DataError(f"cannot load training image {sample.path}: {exc}") from exc
            if self.cache:
                self._images[index] = image
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} samples")
        image = self.load(index)
        if self.augment is not None:
            image = self.augment(image, np.random.default_rng((self.seed, self.epoch, index)))
        tensor = torch.from_numpy(to_model_input(image, self.spec))
        if self.crop is not None:
            jitter = self.crop_jitter if self.augment is not None else 0.0
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 100_003 + index)
            with torch.no_grad():
                tensor = self.crop(tensor[None], jitter, generator)[0]
        return tensor, self.classes.index(self.samples[index].label)


def sampling_weights(samples: Sequence[Sample], source_power: float | None = None) -> list[float]:
    """Per-sample weights that give every present class the same total.

    Without ``source_power`` each sample of a class weighs the same (``1 / count(class)``). With it, the
    class's total is shared among its sources in proportion to ``count(class, source) ** source_power``
    and, within a source, equally: 0 gives every source of a class the same share (a 5-image source as
    much as a 1,500-image one), 1 is plain class balance, 0.5 (the ``robust`` preset) is in between, so
    that small sources are seen far more often than their size alone would allow without a handful of
    images being repeated hundreds of times.

    Raises:
        ValueError: ``source_power`` is outside ``[0, 1]``.
    """
    counts = Counter(s.label for s in samples)
    if source_power is None:
        return [1.0 / counts[s.label] for s in samples]
    if not 0.0 <= source_power <= 1.0:
        raise ValueError(f"source_power {source_power!r} must be between 0 and 1")
    per_source = Counter((s.label, s.source) for s in samples)
    mass: dict[str, float] = defaultdict(float)
    for (label, _), n in per_source.items():
        mass[label] += n**source_power
    return [
        per_source[(s.label, s.source)] ** source_power / mass[s.label] / per_source[(s.label, s.source)]
        for s in samples
    ]


def balanced_sampler(
    samples: list[Sample],
    *,
    seed: int = 0,
    num_samples: int | None = None,
    source_power: float | None = None,
) -> WeightedRandomSampler:
    """A sampler (with replacement) that draws every present class equally often in expectation.

    Each sample weighs ``1 / count(its class)`` (or, with ``source_power``, see :func:`sampling_weights`:
    the class's draws are also spread over its sources). With augmentation this is the online equivalent
    of the paper's expansion of the minority COVID-19 class by augmented copies (section II): a minority
    image is drawn more often, each time differently augmented, instead of being stored as 17 fixed
    copies. ``num_samples`` draws per epoch (default ``len(samples)``); the draws are reproducible with
    ``seed``.

    Raises:
        DataError: ``samples`` is empty.
        ValueError: ``num_samples`` is not positive, or ``source_power`` outside ``[0, 1]``.
    """
    if not samples:
        raise DataError("cannot build a balanced sampler over no samples")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples {num_samples!r} must be at least 1")
    weights = sampling_weights(samples, source_power)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        weights, num_samples=num_samples or len(samples), replacement=True, generator=generator
    )

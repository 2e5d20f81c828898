"""trainer.data / trainer.augment / trainer.labels on the real cxr3 images and real DICOM files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session
from torch.utils.data import DataLoader

from screener.core.db.migrate import upgrade
from screener.core.db.models import Instance, InstanceStatus, Label, Study
from screener.core.errors import DataError
from screener.imaging.pixels import PreprocessSpec, preprocess_file
from screener.model.modelcard import CLASSES
from tests.helpers import rg1_pixels, small_cr
from trainer.augment import Augmenter
from trainer.data import (
    ImageDataset,
    Sample,
    balanced_sampler,
    class_counts,
    confirmed_label_samples,
    hamming,
    image_hash,
    limit_per_class,
    load_samples,
    split_samples,
)
from trainer.labels import import_labels

SPEC = PreprocessSpec(input_size=64)
ALIAS_FOLDERS = {"covid19": "COVID", "normal": "NORMAL", "viral_pneumonia": "Viral Pneumonia"}


def _files(cxr3: Path, label: str, n: int) -> list[Path]:
    return sorted((cxr3 / label).glob("*.png"))[:n]


@pytest.fixture
def small_set(cxr3_dir: Path, tmp_path: Path) -> Path:
    """A class-folder dataset under alias folder names: symlinks to 40 / 40 / 20 cxr3 images."""
    root = tmp_path / "small"
    for label, count in (("covid19", 40), ("normal", 40), ("viral_pneumonia", 20)):
        folder = root / ALIAS_FOLDERS[label]
        folder.mkdir(parents=True)
        for src in _files(cxr3_dir, label, count):
            (folder / src.name).symlink_to(src)
    (root / "README.md").write_text("not an image\n")
    return root


# --- readers ------------------------------------------------------------------------------------------


def test_cxr3_folder_loads_every_image_with_its_label(cxr3_dir: Path) -> None:
    samples = load_samples(cxr3_dir)
    assert len(samples) == 3612
    assert class_counts(samples) == {"normal": 1500, "covid19": 1500, "viral_pneumonia": 612}
    assert all(s.path.parent.name == s.label for s in samples)
    assert samples == sorted(samples, key=lambda s: s.key)
    assert samples[0].key == "covid19/covid19-00000.png"


def test_alias_folders_and_dicom_without_suffix(small_set: Path) -> None:
    ds = small_cr(rg1_pixels(64), study_uid=generate_uid())
    ds.save_as(small_set / "NORMAL" / "IM0001", enforce_file_format=True)
    (small_set / "NORMAL" / "notes.txt").write_text("ignored")
    samples = load_samples(str(small_set))
    assert class_counts(samples) == {"normal": 41, "covid19": 40, "viral_pneumonia": 20}
    assert Sample(small_set / "NORMAL" / "IM0001", "normal", "NORMAL/IM0001") in samples


def test_unknown_class_folder_is_refused(small_set: Path) -> None:
    (small_set / "bacterial").mkdir()
    with pytest.raises(DataError, match="'bacterial'"):
        load_samples(small_set)


def test_csv_list(cxr3_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    rows = ["path,label,comment"]
    for label, alias in (("covid19", "COVID-19"), ("normal", "Normal"), ("viral_pneumonia", "viral")):
        for src in _files(cxr3_dir, label, 3):
            (tmp_path / "img" / src.name).symlink_to(src)
            rows.append(f"img/{src.name},{alias},x")
    rows.append(f"{_files(cxr3_dir, 'normal', 5)[4]},normal,absolute path")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    samples = load_samples(tmp_path / "list.csv")
    assert class_counts(samples) == {"normal": 4, "covid19": 3, "viral_pneumonia": 3}
    assert all(s.path.is_file() for s in samples)
    assert any(s.key == "img/covid19-00000.png" and s.label == "covid19" for s in samples)


def test_csv_bad_label_and_missing_file_name_the_line(cxr3_dir: Path, tmp_path: Path) -> None:
    src = _files(cxr3_dir, "normal", 1)[0]
    bad_label = tmp_path / "bad.csv"
    bad_label.write_text(f"path,label\n{src},normal\n{src},bacterial\n")
    with pytest.raises(DataError, match=r"line 3: label 'bacterial'"):
        load_samples(bad_label)
    missing = tmp_path / "missing.csv"
    missing.write_text(f"path,label\n{src},normal\nnope/absent.png,covid19\n")
    with pytest.raises(DataError, match=r"line 3: image nope/absent.png does not exist"):
        load_samples(missing)
    with pytest.raises(DataError, match="does not exist"):
        load_samples(tmp_path / "absent.csv")
    empty = tmp_path / "empty"
    (empty / "normal").mkdir(parents=True)
    with pytest.raises(DataError, match="no labelled images"):
        load_samples(empty)


def test_covidx_list(cxr3_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    lines = []
    for label, token in (("covid19", "COVID-19"), ("normal", "normal"), ("viral_pneumonia", "pneumonia")):
        for i, src in enumerate(_files(cxr3_dir, label, 2)):
            (tmp_path / "train" / src.name).symlink_to(src)
            lines.append(f"P{label}{i} {src.name} {token} sirm")
    next_to_list = _files(cxr3_dir, "normal", 3)[2]
    (tmp_path / next_to_list.name).symlink_to(next_to_list)
    lines.append(f"P9 {next_to_list.name} normal")  # the older three-column form
    (tmp_path / "train_COVIDx.txt").write_text("\n".join(lines) + "\n\n")
    samples = load_samples(tmp_path / "train_COVIDx.txt")
    assert class_counts(samples) == {"normal": 3, "covid19": 2, "viral_pneumonia": 2}
    assert any(s.key == "train/covid19-00000.png" for s in samples)

    (tmp_path / "bad.txt").write_text(f"P1 {next_to_list.name} bacterial rsna\n")
    with pytest.raises(DataError, match=r"line 1: label 'bacterial'"):
        load_samples(tmp_path / "bad.txt")
    (tmp_path / "gone.txt").write_text(f"P1 {next_to_list.name} normal rsna\nP2 absent.png COVID-19 sirm\n")
    with pytest.raises(DataError, match=r"line 2: image absent.png not found"):
        load_samples(tmp_path / "gone.txt")


# --- splits -------------------------------------------------------------------------------------------


def _with_copies(samples: list[Sample], root: Path) -> tuple[list[Sample], list[set[str]]]:
    """Add, for three images, an identical copy, a JPEG re-encoding and a 1 % brighter copy."""
    copies = root / "copies"
    copies.mkdir()
    families: list[set[str]] = []
    out = list(samples)
    for original in (samples[0], samples[len(samples) // 2], samples[-1]):
        pixels = np.asarray(Image.open(original.path))
        stem = original.path.stem
        (copies / f"{stem}-same.png").write_bytes(original.path.read_bytes())
        Image.fromarray(pixels).save(copies / f"{stem}.jpg", quality=85)
        brighter = np.clip(np.rint(pixels.astype(np.float64) * 1.01), 0, 255).astype(np.uint8)
        Image.fromarray(brighter).save(copies / f"{stem}-bright.png")
        family = {original.key}
        for name in (f"{stem}-same.png", f"{stem}.jpg", f"{stem}-bright.png"):
            out.append(Sample(copies / name, original.label, f"copies/{name}"))
            family.add(f"copies/{name}")
        families.append(family)
    return out, families


def test_split_is_reproducible_stratified_disjoint_and_leak_free(cxr3_dir: Path, tmp_path: Path) -> None:
    base = limit_per_class(load_samples(cxr3_dir), 100, seed=1)
    assert class_counts(base) == {"normal": 100, "covid19": 100, "viral_pneumonia": 100}
    samples, families = _with_copies(base, tmp_path)
    first = split_samples(samples, spec=SPEC, seed=0)
    again = split_samples(list(reversed(samples)), spec=SPEC, seed=0)
    assert first == again and first.digest() == again.digest()
    other = split_samples(samples, spec=SPEC, seed=1)
    assert other.digest() != first.digest()

    for seed in range(4):
        splits = split_samples(samples, spec=SPEC, seed=seed)
        keys = {name: {s.key for s in part} for name, part in splits.items()}
        assert not (keys["train"] & keys["val"] or keys["train"] & keys["test"] or keys["val"] & keys["test"])
        assert sum(len(k) for k in keys.values()) == len(samples)
        for family in families:
            assert sum(1 for k in keys.values() if family & k) == 1, f"seed {seed}: a copy leaked"
        counts = splits.counts()
        for label in CLASSES:
            total = sum(counts[name][label] for name in ("train", "val", "test"))
            assert abs(counts["test"][label] - 0.1 * total) <= 4
            assert abs(counts["val"][label] - 0.09 * total) <= 4
    total = len(samples)
    assert abs(len(first.test) / total - 0.1) < 0.02
    assert abs(len(first.val) / (total - len(first.test)) - 0.1) < 0.02


def test_image_hash_tolerates_reencoding_but_tells_images_apart(cxr3_dir: Path, tmp_path: Path) -> None:
    a, b = _files(cxr3_dir, "covid19", 2)
    jpeg = tmp_path / "a.jpg"
    Image.open(a).save(jpeg, quality=80)
    ha, hb, hj = (image_hash(p, SPEC) for p in (a, b, jpeg))
    assert 0 <= ha < 2**64
    assert hamming(ha, hj) <= 2
    assert hamming(ha, hb) > 6


def test_full_cxr3_split_is_fast_and_balanced(cxr3_dir: Path) -> None:
    """All 3,612 images hashed, grouped and split (about 3 s): no chaining of distinct patients."""
    splits = split_samples(load_samples(cxr3_dir), spec=SPEC)
    assert splits.counts()["test"] == {"normal": 150, "covid19": 150, "viral_pneumonia": 61}


# --- torch dataset, augmentation, sampler ---------------------------------------------------------------


def test_dataset_matches_serving_preprocessing_and_augments_reproducibly(small_set: Path) -> None:
    samples = load_samples(small_set)[:6]
    plain = ImageDataset(samples, SPEC)
    tensor, label = plain[0]
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 64, 64)
    assert label == CLASSES.index(samples[0].label)
    assert torch.equal(tensor, torch.from_numpy(preprocess_file(samples[0].path, SPEC, 100_000_000)))

    augmented = ImageDataset(samples, SPEC, augment=Augmenter(), seed=3, cache=True)
    first = augmented[1][0]
    assert torch.equal(first, augmented[1][0])
    assert not torch.equal(first, plain[1][0])
    augmented.set_epoch(1)
    assert not torch.equal(first, augmented[1][0])
    augmented.set_epoch(0)
    assert torch.equal(first, augmented[1][0])
    assert not torch.equal(first, ImageDataset(samples, SPEC, augment=Augmenter(), seed=4)[1][0])


def test_dataset_in_dataloader_workers_follows_the_epoch(small_set: Path) -> None:
    samples = load_samples(small_set)[:8]
    dataset = ImageDataset(samples, SPEC, augment=Augmenter(), seed=0)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        images, labels = zip(*loader, strict=True)
        epochs.append(torch.cat(images))
        assert torch.cat(labels).tolist() == [CLASSES.index(s.label) for s in samples]
    in_process = torch.stack([dataset[i][0] for i in range(len(samples))])  # epoch 1 here
    assert torch.equal(epochs[1], in_process)
    assert not torch.equal(epochs[0], epochs[1])


def test_augmenter_is_pure_and_bounded() -> None:
    image = np.linspace(0, 1, 128 * 96, dtype=np.float32).reshape(128, 96)
    before = image.copy()
    augmenter = Augmenter(sharpen_probability=1.0)
    out = augmenter(image, np.random.default_rng(7))
    assert out.dtype == np.float32 and out.shape == image.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.array_equal(out, augmenter(image, np.random.default_rng(7)))
    assert np.array_equal(image, before)
    assert not np.allclose(out, image)
    identity = Augmenter(rotation_degrees=0, translate_fraction=0, brightness=0, sharpen_probability=0)
    assert np.array_equal(identity(image, np.random.default_rng(1)), image)
    with pytest.raises(ValueError, match="brightness"):
        Augmenter(brightness=-0.1)


def test_balanced_sampler_draws_classes_equally() -> None:
    samples = [
        Sample(Path(f"{label}{i}.png"), label, f"{label}{i}")
        for label, n in (("normal", 600), ("covid19", 30), ("viral_pneumonia", 120))
        for i in range(n)
    ]
    sampler = balanced_sampler(samples, seed=5, num_samples=9000)
    draws = list(sampler)
    assert draws == list(balanced_sampler(samples, seed=5, num_samples=9000))
    counts = class_counts(samples[i] for i in draws)
    for label in CLASSES:
        assert abs(counts[label] / 9000 - 1 / 3) < 0.03, counts


# --- confirmed labels ------------------------------------------------------------------------------------


@pytest.fixture
def engine(tmp_path: Path) -> sa.Engine:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'screener.db'}")
    upgrade(engine)
    return engine


def test_import_labels_keeps_good_rows_and_reports_bad_ones(engine: sa.Engine, tmp_path: Path) -> None:
    long_accession = "A" * 70
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(
        "sop_instance_uid,study_instance_uid,accession_number,label,confirmed_by,confirmed_at,patient_name\n"
        "1.2.3.4,,,COVID-19,Dr A,2024-03-01,Doe^John\n"  # line 2: good
        ",1.2.3,,Viral Pneumonia,,2024-03-01T14:30:00+01:00,\n"  # 3: good
        ",,ACC123,normal,,,\n"  # 4: good
        "1.2.3.5,,,bacterial,,,\n"  # 5: unknown label
        ",,,normal,,,\n"  # 6: no key
        "1.2.x.5,,,normal,,,\n"  # 7: malformed UID
        f",,{long_accession},normal,,,\n"  # 8: too long
        "1.2.3.6,,,normal,,yesterday,\n"  # 9: bad date
    )
    with Session(engine) as session:
        report = import_labels(session, csv_path)
        session.commit()
    assert report.imported == 3
    assert [line for line, _ in report.errors] == [5, 6, 7, 8, 9]
    messages = dict(report.errors)
    assert "'bacterial'" in messages[5]
    assert "no sop_instance_uid" in messages[6]
    assert "sop_instance_uid on line 7 is not a valid DICOM UID" in messages[7]
    assert messages[8].startswith("accession_number on line 8 is longer than 64 characters")
    assert "confirmed_at on line 9" in messages[9]
    text = " ".join(messages.values())
    assert long_accession not in text and "1.2.x.5" not in text and "yesterday" not in text
    with Session(engine) as session:
        rows = session.scalars(sa.select(Label).order_by(Label.id)).all()
    assert [r.label for r in rows] == ["covid19", "viral_pneumonia", "normal"]
    assert rows[1].confirmed_at is not None and rows[1].confirmed_at.hour == 13
    assert all(r.source_file == "labels.csv" for r in rows)

    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("patient_id,label\nX,normal\n")
    with Session(engine) as session, pytest.raises(DataError, match="at least one of"):
        import_labels(session, bad_header)


def _spool(engine: sa.Engine, spool: Path, study_uid: str, accession: str, n: int) -> list[str]:
    """``n`` real CR instances of one study in the spool and in the instances table; their SOP UIDs."""
    pixels = rg1_pixels(64)
    sops = []
    with Session(engine) as session:
        study = Study(study_instance_uid=study_uid)
        session.add(study)
        session.flush()
        for _ in range(n):
            ds = small_cr(pixels, study_uid=study_uid, accession=accession)
            name = f"ab/{ds.SOPInstanceUID[-12:]}.dcm"
            (spool / name).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(spool / name, enforce_file_format=True)
            session.add(
                Instance(
                    sop_instance_uid=ds.SOPInstanceUID,
                    sop_class_uid=ds.SOPClassUID,
                    study_id=study.id,
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    calling_ae_title="TEST",
                    spool_name=name,
                    sha256="0" * 64,
                    size_bytes=(spool / name).stat().st_size,
                )
            )
            sops.append(ds.SOPInstanceUID)
        session.commit()
    return sops


def test_confirmed_labels_resolve_sop_study_and_accession(engine: sa.Engine, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    study_a, study_b, study_c = generate_uid(), generate_uid(), generate_uid()
    sops_a = _spool(engine, spool, study_a, "ACC-A", 2)
    sops_b = _spool(engine, spool, study_b, "ACC-B", 2)
    sops_c = _spool(engine, spool, study_c, "ACC-C", 1)
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    with Session(engine) as session:
        session.add_all(
            [
                Label(study_instance_uid=study_a, label="normal", imported_at=t0),
                Label(sop_instance_uid=sops_a[1], label="covid19", imported_at=t0 + timedelta(hours=1)),
                Label(accession_number="ACC-B", label="viral_pneumonia", imported_at=t0 + timedelta(hours=2)),
                Label(sop_instance_uid="1.2.999", label="covid19", imported_at=t0),  # never received
            ]
        )
        session.execute(
            sa.update(Instance)
            .where(Instance.sop_instance_uid == sops_c[0])
            .values(status=InstanceStatus.SKIPPED)
        )
        session.add(Label(sop_instance_uid=sops_c[0], label="normal", imported_at=t0))
        session.commit()

    samples = confirmed_label_samples(engine, spool)
    got = {s.key: s.label for s in samples}
    assert got == {
        sops_a[0]: "normal",
        sops_a[1]: "covid19",
        sops_b[0]: "viral_pneumonia",
        sops_b[1]: "viral_pneumonia",
    }
    assert all(s.path.is_file() and s.path.is_relative_to(spool) for s in samples)
    assert [s.key for s in samples] == sorted(got)

    later = confirmed_label_samples(engine, spool, since=t0 + timedelta(minutes=30))
    assert {s.key: s.label for s in later} == {
        sops_a[1]: "covid19",
        sops_b[0]: "viral_pneumonia",
        sops_b[1]: "viral_pneumonia",
    }
    naive_since = datetime(2024, 1, 1, 1, 30)
    assert {s.key for s in confirmed_label_samples(engine, spool, since=naive_since)} == set(sops_b)

    dataset = ImageDataset(samples, SPEC)
    assert dataset[0][0].shape == (3, 64, 64)


def test_limit_per_class_is_reproducible() -> None:
    samples = [Sample(Path(f"{i}.png"), CLASSES[i % 3], f"{i:03d}") for i in range(90)]
    picked = limit_per_class(samples, 5, seed=2)
    assert class_counts(picked) == {label: 5 for label in CLASSES}
    assert picked == limit_per_class(list(reversed(samples)), 5, seed=2)
    assert limit_per_class(samples, 100) == sorted(samples, key=lambda s: s.key)

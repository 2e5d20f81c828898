"""Reduced-resolution JPEG 2000 decoding: the level choice, its fallbacks, and what it changes downstream."""

from __future__ import annotations

import copy
import dataclasses
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless

from screener.core.config import Config, EligibilityConfig, InferenceConfig
from screener.core.errors import ImageDecodeError
from screener.imaging.pixels import (
    PreprocessSpec,
    codestream_info,
    dicom_to_unit,
    preprocess_dataset,
    read_dicom,
    reduced_side,
    reduction_level,
)
from screener.inference.classify import classify_files
from screener.inference.prepare import prepare_instance
from tests.helpers import reuid, rg1_dir, small_cr, wrap_png_as_dx

DATA = rg1_dir()
SPEC = PreprocessSpec()
STD = np.asarray(SPEC.std, np.float32)[:, None, None]
MAX_PIXELS = 100_000_000

# Mean absolute difference of the model input (in [0, 1] units, i.e. times the channel std) between a
# reduced and a full decode. Measured here on RG1_J2KR / RG1_J2KI (1955 x 1841, decoded at 489 x 461 for
# both model sizes): 0.0082 / 0.0086 at 224 px and 0.0070 / 0.0075 at 64 px. That is ten times the
# lossy-vs-lossless difference test_imaging.py accepts (0.0007, bound 0.003) because it has another
# cause: CLAHE runs on the decoded image with a fixed tile grid, so its output depends on resolution; a
# full decode area-downsized to the same size differs from the full-size pipeline by as much (0.0077).
# The bounds leave about 1.5x margin for other OpenJPEG builds.
MAD_224 = 0.012
MAD_64 = 0.011
# How far the random-weight fused models' probabilities may move. Measured: 0.008 / 0.012 for the 64 px
# model, 0.10 / 0.04 for the 224 px ResNet-101 + ResNet-152, which is that sensitive to any change: the
# lossy copy of the same radiograph (RG1_J2KI vs RG1_J2KR, full decode) moves it by 0.044 already.
PROB_TOLERANCE = {64: 0.02, 224: 0.15}


def unit(ds: Dataset, reduce_for: int = 0) -> np.ndarray:
    return dicom_to_unit(
        ds, max_pixels=MAX_PIXELS, window_percentiles=SPEC.window_percentiles, reduce_for=reduce_for
    )


@cache
def rg1(name: str) -> Dataset:
    return read_dicom(DATA / f"{name}.dcm")


def first_frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


# --- the level choice --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "columns", "levels", "size", "expected"),
    [
        (1955, 1841, 5, 224, 2),  # 489 x 461: 3 would give 245 < 448
        (2000, 2000, 5, 224, 2),  # 500
        (2500, 2500, 5, 224, 2),  # 625; 313 is too small
        (3000, 2500, 5, 224, 2),  # the long side decides: 750
        (4096, 4096, 5, 224, 3),  # 512
        (4096, 4096, 1, 224, 1),  # no more levels than the codestream has
        (448, 448, 5, 224, 0),  # already at the headroom: nothing to drop
        (256, 256, 5, 224, 0),  # smaller than the model needs: never reduced (nor upsampled further)
        (2500, 2500, 5, 512, 1),  # 1250 >= 2 x 512
        (1955, 1841, 5, 64, 2),  # small model: CLAHE still gets 56 px tiles (448 px), so 489 and not 245
        (1024, 1024, 5, 64, 1),
        (256, 256, 5, 64, 0),  # 128 would leave 16 px CLAHE tiles
        (1955, 1841, 0, 64, 0),  # a codestream without decomposition levels
    ],
)
def test_reduction_level(rows: int, columns: int, levels: int, size: int, expected: int) -> None:
    side = reduced_side(dataclasses.replace(SPEC, input_size=size))
    assert reduction_level(rows, columns, levels, side) == expected


def test_reduction_level_keeps_the_headroom_and_takes_the_coarsest_level() -> None:
    for size in (64, 224, 299, 384):
        side = reduced_side(dataclasses.replace(SPEC, input_size=size))
        assert side >= 2 * size
        for long_side in range(size, 6000, 37):
            for levels in (0, 1, 3, 5, 8):
                level = reduction_level(long_side, long_side // 2, levels, side)
                reduced = -(-long_side // 2**level)
                assert 0 <= level <= levels
                if level > 0:
                    assert reduced >= side  # never below what the letterbox and CLAHE need
                if level < levels:
                    assert -(-long_side // 2 ** (level + 1)) < side  # and the coarsest such level


def test_codestream_header_is_read() -> None:
    info = codestream_info(first_frame(rg1("RG1_J2KR")))
    assert info is not None
    assert (info.rows, info.columns, info.components) == (1955, 1841, 1)
    assert (info.precision, info.signed, info.levels) == (15, False, 5)
    assert codestream_info(b"\xff\xd8\xff\xe0" + bytes(64)) is None  # a JPEG, not JPEG 2000
    assert codestream_info(b"\xff\x4f\xff\x51" + bytes(range(256))) is None  # no COD


# --- the real radiographs ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["RG1_J2KR", "RG1_J2KI"])
@pytest.mark.parametrize(("size", "shape", "bound"), [(224, (489, 461), MAD_224), (64, (489, 461), MAD_64)])
def test_rg1_reduced_decode_is_close_to_full_decode(
    name: str, size: int, shape: tuple[int, int], bound: float
) -> None:
    ds = rg1(name)
    spec = dataclasses.replace(SPEC, input_size=size)
    reduced_unit = unit(ds, reduce_for=reduced_side(spec))
    assert reduced_unit.shape == shape
    assert reduced_unit.dtype == np.float32
    assert 0.0 <= reduced_unit.min() < reduced_unit.max() <= 1.0
    full = preprocess_dataset(ds, spec, MAX_PIXELS)
    reduced = preprocess_dataset(ds, spec, MAX_PIXELS, reduced_decode=True)
    assert reduced.shape == full.shape == (3, size, size)
    assert reduced.flags.c_contiguous
    assert (np.abs(reduced - full) * STD).mean() < bound


def block_image(side: int = 1024, block: int = 128, bits: int = 12) -> np.ndarray:
    """Constant blocks of distinct values spread over the stored range (a deterministic shuffle)."""
    count = side // block
    values = np.linspace(40, 2**bits - 40, count * count).astype(np.uint16)
    values = values[np.random.default_rng(5).permutation(values.size)].reshape(count, count)
    return np.kron(values, np.ones((block, block), dtype=np.uint16))


@cache
def block_dataset() -> Dataset:
    """A 1024 px, 12-bit CR of constant 128 px blocks, JPEG 2000 lossless."""
    ds = small_cr(block_image(), study_uid="1.2.3.4")
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return ds


def _voi_lut(ds: Dataset) -> None:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [round(65535 * (v / 4095) ** 0.5) for v in range(4096)]
    ds.VOILUTSequence = Sequence([item])
    del ds.WindowCenter, ds.WindowWidth


VARIANTS = {
    "window": lambda ds: None,
    "window, MONOCHROME1": lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME1"),
    "rescale and window": lambda ds: (
        setattr(ds, "RescaleSlope", 2.5),
        setattr(ds, "RescaleIntercept", -1000),
        setattr(ds, "WindowCenter", 3000),
        setattr(ds, "WindowWidth", 6000),
    ),
    "VOI LUT sequence": _voi_lut,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_grey_levels_follow_the_same_luts(variant: str) -> None:
    """Where the reduced image holds the stored value of a block, it shows exactly the full image's grey."""
    ds = copy.deepcopy(block_dataset())
    ds.WindowCenter, ds.WindowWidth = 1800, 3000
    VARIANTS[variant](ds)
    full, reduced = unit(ds), unit(ds, reduce_for=128)
    assert reduced.shape == (128, 128)  # level 3: 1024 / 8
    # Block centres: far enough from every edge that the wavelet's low-pass band equals the block value.
    centres = np.arange(64, 1024, 128)
    np.testing.assert_array_equal(reduced[np.ix_(centres // 8, centres // 8)], full[np.ix_(centres, centres)])
    # and the MONOCHROME1 copy is the inverse of the MONOCHROME2 one, reduced as in full
    if variant == "window, MONOCHROME1":
        plain = copy.deepcopy(block_dataset())
        plain.WindowCenter, plain.WindowWidth = 1800, 3000
        np.testing.assert_allclose(unit(plain, reduce_for=128), 1.0 - reduced, atol=1e-6)


def test_percentile_window_without_voi_is_taken_on_the_reduced_image() -> None:
    ds = copy.deepcopy(block_dataset())  # no window, no VOI LUT: the 0.5 / 99.5 percentiles decide
    full, reduced = unit(ds), unit(ds, reduce_for=128)
    centres = np.arange(64, 1024, 128)
    # Same rule, applied to the image as decoded: the low-pass band's samples along block edges (a quarter
    # of the reduced image, some overshooting the darkest and brightest blocks) move the percentiles a
    # little. Measured: block greys move by at most 0.0098, under 1% of the window, a fifth of the 64
    # stored values between neighbouring blocks.
    diff = np.abs(reduced[np.ix_(centres // 8, centres // 8)] - full[np.ix_(centres, centres)])
    assert diff.max() < 0.02
    assert full.min() == reduced.min() == 0.0
    assert full.max() == reduced.max() == 1.0


# --- fallbacks: these decode in full, exactly as before ----------------------------------------------


def test_setting_off_gives_exactly_the_full_decode(tmp_path: Path) -> None:
    path = tmp_path / "j2kr.dcm"
    reuid(DATA / "RG1_J2KR.dcm", path)
    rules = EligibilityConfig()
    off = prepare_instance(1, str(path), SPEC, rules, reduced_decode=False)
    on = prepare_instance(1, str(path), SPEC, rules, reduced_decode=True)
    assert off.kind == on.kind == "ok"
    assert off.array is not None and on.array is not None
    np.testing.assert_array_equal(off.array, preprocess_dataset(read_dicom(path), SPEC, MAX_PIXELS))
    assert not np.array_equal(off.array, on.array)  # the setting does reach the decoder
    assert unit(rg1("RG1_J2KR")).shape == (1955, 1841)


@pytest.mark.parametrize("name", ["RG1_UNCR", "RG1_UNCI"])
def test_other_transfer_syntaxes_decode_in_full(name: str) -> None:
    ds = rg1(name)
    np.testing.assert_array_equal(unit(ds, reduce_for=224), unit(ds))


def test_multi_frame_jpeg2000_decodes_in_full() -> None:
    ds = copy.deepcopy(rg1("RG1_J2KR"))
    frame = first_frame(ds)
    ds.PixelData = encapsulate([frame, frame])
    ds.NumberOfFrames = 2
    reduced = unit(ds, reduce_for=224)
    assert reduced.shape == (1955, 1841)
    np.testing.assert_array_equal(reduced, unit(rg1("RG1_J2KR")))


def test_small_jpeg2000_is_not_reduced() -> None:
    ds = copy.deepcopy(block_dataset())
    ds.WindowCenter, ds.WindowWidth = 1800, 3000
    # 1024 px where 1024 are needed: no level can be dropped.
    np.testing.assert_array_equal(unit(ds, reduce_for=1024), unit(ds))


def test_header_disagreeing_with_the_codestream_decodes_in_full() -> None:
    ds = copy.deepcopy(rg1("RG1_J2KR"))
    ds.BitsStored = 16  # the codestream says 15: not ours to second-guess, so pydicom decides
    np.testing.assert_array_equal(unit(ds, reduce_for=224), unit(ds))


def test_without_glymur_decodes_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "glymur", None)  # import glymur now raises ImportError
    np.testing.assert_array_equal(unit(rg1("RG1_J2KR"), reduce_for=224), unit(rg1("RG1_J2KR")))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_jpeg2000_fails_the_same_way(damage: str) -> None:
    ds = copy.deepcopy(rg1("RG1_J2KR"))
    frame = first_frame(ds)
    ds.PixelData = encapsulate(
        [b"\xff\x4f\xff\x51" + bytes(range(256)) * 4 if damage == "garbage" else frame[: len(frame) // 3]]
    )
    with pytest.raises(ImageDecodeError) as caught:
        unit(ds, reduce_for=224)
    assert caught.value.transfer_syntax.startswith("1.2.840.10008.1.2.4.90")
    with pytest.raises(ImageDecodeError) as full:
        unit(ds)
    assert str(caught.value) == str(full.value)


# --- the fused model's answers -----------------------------------------------------------------------


def _classify(model: Path, files: list[Path], reduced: bool) -> list[tuple[str | None, dict[str, float]]]:
    config = dataclasses.replace(
        Config(), inference=InferenceConfig(backend="onnxruntime", threads=1, reduced_decode=reduced)
    )
    _, results = classify_files(config, model, files)
    assert all(r.status == "classified" for r in results), [r.reason for r in results]
    return [(r.label, r.probs or {}) for r in results]


def _assert_same_answers(model: Path, files: list[Path], tolerance: float) -> None:
    full, reduced = _classify(model, files, False), _classify(model, files, True)
    assert [label for label, _ in reduced] == [label for label, _ in full]
    for (_, a), (_, b) in zip(full, reduced, strict=True):
        assert max(abs(a[k] - b[k]) for k in a) < tolerance


@pytest.mark.slow
def test_fused_model_gives_the_same_labels_on_rg1(
    model_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    files = []
    for name in ("RG1_J2KR", "RG1_J2KI"):
        files.append(tmp_path / f"{name}.dcm")
        reuid(DATA / f"{name}.dcm", files[-1])
    _assert_same_answers(model_dir, files, PROB_TOLERANCE[224])  # level 2
    _assert_same_answers(tiny_model_dir, files, PROB_TOLERANCE[64])  # level 2 too (CLAHE's 448 px)


def test_fused_model_gives_the_same_answers_on_small_cxr3_jpeg2000(
    cxr3_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    files = []
    for label in ("normal", "covid19", "viral_pneumonia"):
        for png in sorted((cxr3_dir / label).glob("*.png"))[:2]:
            ds = wrap_png_as_dx(png, study_uid="1.2.826.0.1.3680043.8.498.1")
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
            files.append(tmp_path / f"{label}-{png.stem}.dcm")
            ds.save_as(files[-1], enforce_file_format=True)
    # 256 px images: a 64 px model still needs 448 px for CLAHE, so nothing is reduced and the answers
    # are exactly those of a full decode.
    ds = read_dicom(files[0])
    assert unit(ds, reduce_for=reduced_side(dataclasses.replace(SPEC, input_size=64))).shape == (256, 256)
    assert _classify(tiny_model_dir, files, True) == _classify(tiny_model_dir, files, False)

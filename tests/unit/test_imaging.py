"""Imaging: real CR chest radiographs (pydicom-data RG1_*) and real PNG chest X-rays (cxr3)."""

from __future__ import annotations

import copy
import pickle
from functools import cache
from pathlib import Path

import data_store
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian

from screener.core.errors import ImageDecodeError, ImageTooLargeError
from screener.imaging.pixels import (
    PreprocessSpec,
    dicom_to_unit,
    letterbox,
    load_unit,
    preprocess_dataset,
    preprocess_file,
    raster_to_unit,
    read_dicom,
    to_model_input,
)

DATA = Path(data_store.__file__).parent / "data"
SPEC = PreprocessSpec()
MAX_PIXELS = 100_000_000
LOSSLESS = ("RG1_UNCR", "RG1_J2KR")
LOSSY = ("RG1_UNCI", "RG1_J2KI")  # UNCI is the decompressed J2KI: the same lossy pixels

# Tolerances, as mean absolute difference on the [0, 1] scale after resizing to 224 px:
# - lossless pairs decode to the same stored values, so the images must be bit-identical;
# - the irreversible JPEG 2000 copy differs from the lossless original by 0.0002 here (measured; about
#   1/20 of one 8-bit grey level). 0.002 (half an 8-bit grey level) leaves room for other OpenJPEG
#   builds, and stays far below what would change a radiologist's or a network's reading.
LOSSY_MAD_UNIT = 0.002
# After CLAHE the lossy copy differs by 0.0007 (CLAHE amplifies local differences); same 4x margin and
# measured in [0, 1] units, i.e. after undoing the per-channel std.
LOSSY_MAD_MODEL = 0.003


def unit(ds: Dataset) -> np.ndarray:
    return dicom_to_unit(ds, max_pixels=MAX_PIXELS, window_percentiles=SPEC.window_percentiles)


@cache
def rg1_unit(name: str) -> np.ndarray:
    return unit(read_dicom(DATA / f"{name}.dcm"))


@cache
def rg1_model(name: str) -> np.ndarray:
    return to_model_input(rg1_unit(name), SPEC)


def region_means(img: np.ndarray) -> tuple[float, float, float]:
    """Mean of the mediastinum (central strip) and of the left and right mid-lung fields."""
    h, w = img.shape
    band = slice(int(0.30 * h), int(0.60 * h))
    centre = img[band, int(0.45 * w) : int(0.55 * w)].mean()
    left = img[band, int(0.20 * w) : int(0.35 * w)].mean()
    right = img[band, int(0.65 * w) : int(0.80 * w)].mean()
    return float(centre), float(left), float(right)


@pytest.mark.parametrize("name", LOSSLESS + LOSSY)
def test_rg1_unit_image_is_upright_grey_with_dark_lungs(name: str) -> None:
    img = rg1_unit(name)
    assert img.dtype == np.float32
    assert img.shape == (1955, 1841)
    assert 0.0 <= img.min() < img.max() <= 1.0
    centre, left, right = region_means(img)
    # MONOCHROME1 inverted: air-filled lungs dark, mediastinum and spine bright, by a wide margin.
    assert centre > left + 0.15
    assert centre > right + 0.15


@pytest.mark.parametrize("name", LOSSLESS + LOSSY)
def test_rg1_encodings_agree(name: str) -> None:
    reference = letterbox(rg1_unit("RG1_UNCR"), 224)
    small = letterbox(rg1_unit(name), 224)
    model_diff = (
        np.abs(rg1_model(name) - rg1_model("RG1_UNCR")) * np.asarray(SPEC.std, np.float32)[:, None, None]
    )
    if name in LOSSLESS:
        np.testing.assert_array_equal(rg1_unit(name), rg1_unit("RG1_UNCR"))
        np.testing.assert_array_equal(rg1_model(name), rg1_model("RG1_UNCR"))
    else:
        assert np.abs(small - reference).mean() < LOSSY_MAD_UNIT
        assert model_diff.mean() < LOSSY_MAD_MODEL
    np.testing.assert_array_equal(rg1_unit("RG1_UNCI"), rg1_unit("RG1_J2KI"))


def test_model_input_contract() -> None:
    x = rg1_model("RG1_UNCR")
    assert x.shape == (3, 224, 224)
    assert x.dtype == np.float32
    assert x.flags.c_contiguous
    # The grey plane is replicated, then normalised per channel.
    planes = (
        x * np.asarray(SPEC.std, np.float32)[:, None, None] + np.asarray(SPEC.mean, np.float32)[:, None, None]
    )
    np.testing.assert_allclose(planes[0], planes[1], atol=1e-5)
    np.testing.assert_allclose(planes[0], planes[2], atol=1e-5)
    # 1955 x 1841 letterboxed into 224: 211 columns of image, black bars left and right.
    np.testing.assert_allclose(planes[:, :, :6], 0.0, atol=1e-5)
    np.testing.assert_allclose(planes[:, :, -6:], 0.0, atol=1e-5)
    assert planes[0, 100:124, 100:124].mean() > 0.3


def monochrome2_twin(ds: Dataset, *, keep_window: bool) -> Dataset:
    """The same radiograph stored the other way round: values inverted within Bits Stored."""
    twin = copy.deepcopy(ds)
    top = 2**ds.BitsStored - 1
    twin.PixelData = (top - ds.pixel_array).astype(np.uint16).tobytes()
    twin.PhotometricInterpretation = "MONOCHROME2"
    if keep_window:
        # pydicom's LINEAR window maps x to (x - (c - 0.5)) / (w - 1) + 0.5; for x' = top - x the mirrored
        # centre is c' = top - c + 1 with the same width.
        twin.WindowCenter = top - float(ds.WindowCenter) + 1
    else:
        del twin.WindowCenter, twin.WindowWidth
    return twin


def test_monochrome2_twin_gives_the_same_image() -> None:
    original = read_dicom(DATA / "RG1_UNCR.dcm")
    twin = monochrome2_twin(original, keep_window=True)
    np.testing.assert_allclose(unit(twin), unit(original), atol=1e-5)


def test_monochrome2_twin_without_window_uses_mirrored_percentiles() -> None:
    original = read_dicom(DATA / "RG1_UNCR.dcm")
    windowless = copy.deepcopy(original)
    del windowless.WindowCenter, windowless.WindowWidth
    twin = monochrome2_twin(original, keep_window=False)
    a, b = unit(windowless), unit(twin)
    # Percentiles are taken on discrete values: the mirrored window may differ by one stored value.
    assert np.abs(a - b).mean() < 1e-3
    centre, left, right = region_means(b)
    assert centre > max(left, right) + 0.15


def bomb(ds: Dataset) -> Dataset:
    big = copy.deepcopy(ds)
    big.Rows = 60000
    big.Columns = 60000
    big.PixelData = b"\x01\x02" * 8  # 16 bytes: any decoder would fail on it
    return big


def test_declared_60000_square_is_refused_before_decoding(tmp_path: Path) -> None:
    big = bomb(read_dicom(DATA / "RG1_UNCR.dcm"))
    with pytest.raises(ImageTooLargeError, match="60000 x 60000"):
        unit(big)
    # Proof nothing was decoded: with the limit lifted the same bytes reach the decoder, which fails.
    with pytest.raises(ImageDecodeError, match="less than expected"):
        dicom_to_unit(big, max_pixels=2**40, window_percentiles=SPEC.window_percentiles)
    path = tmp_path / "bomb.dcm"
    big.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageTooLargeError):
        preprocess_file(path, SPEC, MAX_PIXELS)


def test_compressed_bomb_is_refused_before_decoding() -> None:
    big = bomb(read_dicom(DATA / "RG1_J2KR.dcm"))
    big.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    with pytest.raises(ImageTooLargeError):
        preprocess_dataset(big, SPEC, MAX_PIXELS)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_jpeg2000_names_the_transfer_syntax(damage: str) -> None:
    ds = read_dicom(DATA / "RG1_J2KR.dcm")
    if damage == "garbage":
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 4])
    else:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    with pytest.raises(ImageDecodeError) as caught:
        unit(ds)
    assert "1.2.840.10008.1.2.4.90" in str(caught.value)
    assert "JPEG 2000" in str(caught.value)
    assert caught.value.transfer_syntax.startswith("1.2.840.10008.1.2.4.90")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"PhotometricInterpretation": "RGB"}, "photometric interpretation RGB"),
        ({"PhotometricInterpretation": "YBR_FULL_422"}, "photometric interpretation YBR_FULL_422"),
        ({"PixelData": None}, "no Pixel Data"),
    ],
)
def test_unsupported_dicom_is_a_decode_error(change: dict[str, str | None], reason: str) -> None:
    ds = read_dicom(DATA / "RG1_UNCR.dcm")
    for keyword, value in change.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    with pytest.raises(ImageDecodeError, match=reason) as caught:
        unit(ds)
    assert ExplicitVRLittleEndian in str(caught.value)


def test_high_bits_above_bits_stored_are_ignored() -> None:
    ds = read_dicom(DATA / "RG1_UNCR.dcm")
    dirty = copy.deepcopy(ds)
    dirty.PixelData = (ds.pixel_array | 0x8000).astype(np.uint16).tobytes()  # e.g. an overlay bit
    np.testing.assert_array_equal(unit(dirty), rg1_unit("RG1_UNCR"))


def test_cxr3_png_to_model_input(cxr3_dir: Path) -> None:
    path = sorted((cxr3_dir / "normal").glob("*.png"))[0]
    img = raster_to_unit(path)
    assert img.dtype == np.float32
    assert img.shape == (256, 256)
    assert 0.0 <= img.min() < img.max() <= 1.0
    np.testing.assert_array_equal(raster_to_unit(path.read_bytes()), img)
    np.testing.assert_array_equal(load_unit(path, SPEC, MAX_PIXELS), img)
    x = to_model_input(img, SPEC)
    assert x.shape == (3, SPEC.input_size, SPEC.input_size)
    assert x.dtype == np.float32
    assert x.flags.c_contiguous
    for channel, (mean, std) in enumerate(zip(SPEC.mean, SPEC.std, strict=True)):
        assert (0 - mean) / std - 1e-4 <= x[channel].min()
        assert x[channel].max() <= (1 - mean) / std + 1e-4
    np.testing.assert_array_equal(preprocess_file(path, SPEC, MAX_PIXELS), x)


def test_sixteen_bit_png_is_scaled_by_its_range(tmp_path: Path) -> None:
    from PIL import Image

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    np.testing.assert_allclose(raster_to_unit(path), ramp / 65535.0, atol=1e-6)


def test_unreadable_raster_is_a_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageDecodeError, match="PNG/JPEG file"):
        load_unit(path, SPEC, MAX_PIXELS)


def test_load_unit_dispatches_dicom_on_content(tmp_path: Path) -> None:
    path = tmp_path / "no-extension"
    path.write_bytes((DATA / "RG1_UNCR.dcm").read_bytes())
    np.testing.assert_array_equal(load_unit(path, SPEC, MAX_PIXELS), rg1_unit("RG1_UNCR"))


def test_letterbox_keeps_aspect_and_centres() -> None:
    wide = np.ones((50, 200), dtype=np.float32)
    box = letterbox(wide, 100)
    assert box.shape == (100, 100)
    assert box[:37].max() == 0.0 and box[63:].max() == 0.0
    np.testing.assert_allclose(box[38:62], 1.0)
    tall = letterbox(np.ones((20, 10), dtype=np.float32), 100)  # enlarging
    assert tall[:, :25].max() == 0.0 and tall[:, 75:].max() == 0.0
    np.testing.assert_allclose(tall[:, 26:74], 1.0)


def test_pipeline_functions_are_picklable() -> None:
    for function in (preprocess_file, preprocess_dataset):
        assert pickle.loads(pickle.dumps(function)) is function
    assert pickle.loads(pickle.dumps(SPEC)) == SPEC

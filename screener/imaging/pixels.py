"""Pure image functions shared by the screener and the trainer: pixels in, model input out.

The pipeline is ``load -> [0, 1] grey image (higher = brighter) -> contrast enhancement -> letterbox ->
normalised 3-channel tensor``. Pixel functions are pure, ``(array, spec) -> array`` or
``(dataset) -> array`` in the style of ``pydicom.pixels.processing``; only :func:`read_dicom`,
:func:`raster_to_unit`, :func:`load_unit` and :func:`preprocess_file` read input. Every function is a
module-level function, so it can be sent to a ``multiprocessing`` pool.

DICOM grey levels follow the standard's display pipeline (PS3.4 N.2.1.1): stored values, masked to
*Bits Stored* (PS3.3 C.7.6.3.1.1), then the Modality LUT (PS3.3 C.11.1), then the VOI LUT or window
(PS3.3 C.11.2), then *Photometric Interpretation* (PS3.3 C.7.6.3.1.2) decides whether the result is
inverted. The LUT and window arithmetic is pydicom's own (``apply_modality_lut`` / ``apply_voi_lut``).

JPEG 2000 keeps a wavelet pyramid (ITU-T T.800 Annex F): decoding only its first *r* resolution levels
gives the image at ``1 / 2**r`` of its size for a fraction of the work (OpenJPEG's ``reduce``). When a
caller asks for it (``reduce_for``), :func:`dicom_to_unit` decodes the single-frame JPEG 2000 codestream
itself at the coarsest level that still leaves enough pixels for the letterbox and CLAHE
(:func:`reduced_side`), and applies the same LUTs to that smaller array; every other case, and any
codestream the reduced path does not understand, is decoded in full by pydicom.
"""

from __future__ import annotations

import io
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from screener.core.errors import ImageDecodeError, ImageTooLargeError

FloatImage = npt.NDArray[np.float32]

RASTER_SYNTAX = "PNG/JPEG file"
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

# Stored values up to this many bits go through a lookup table built once per image; wider data is
# transformed pixel by pixel.
_MAX_LUT_BITS = 16
# pydicom tries GDCM first, but GDCM's JPEG 2000 path aborts the whole process on some corrupt
# codestreams (an uncaught C++ exception) and is the slowest: use OpenJPEG through pylibjpeg, and CharLS
# through pyjpegls, when installed. The JPEG family (baseline, extended, lossless) is left to pydicom's
# order, which is GDCM here.
_PREFERRED_PLUGINS: dict[str, str] = {
    uid.JPEG2000Lossless: "pylibjpeg",
    uid.JPEG2000: "pylibjpeg",
    uid.HTJ2KLossless: "pylibjpeg",
    uid.HTJ2KLosslessRPCL: "pylibjpeg",
    uid.HTJ2K: "pylibjpeg",
    uid.JPEGLSLossless: "pyjpegls",
    uid.JPEGLSNearLossless: "pyjpegls",
}
# Transfer syntaxes whose frames are plain JPEG 2000 Part 1 codestreams (PS3.5 A.4.4), which OpenJPEG can
# decode at reduced resolution.
_REDUCIBLE_SYNTAXES = frozenset({uid.JPEG2000Lossless, uid.JPEG2000})
REDUCED_HEADROOM = 2
"""A reduced decode keeps the image's long side at least this many times the model's input size.

The letterbox shrinks the long side to the input size anyway, but CLAHE runs before it, on the decoded
image, with a fixed 8 x 8 tile grid, so its output depends on the resolution it sees: fewer pixels per
tile, coarser equalisation. Measured on pydicom-data's RG1_J2KR (1955 x 1841, 15 bits) at 224 px, as
mean absolute difference of the model input from a full decode ([0, 1] units): level 3 (245 x 231,
decode 16 ms instead of 520 ms) 0.024; level 2 (489 x 461, 54 ms) 0.008; level 1 (978 x 921, 190 ms)
0.003. Downsizing the full decode to the same size (area averaging) gives the same differences (0.024,
0.008, 0.003): the drift is CLAHE's, not the wavelet's. Twice the input size takes level 2 for the usual
2,000-3,000 px radiograph, a tenth of the decoding time for a difference of about two 8-bit grey levels;
tests/unit/test_imaging_reduced.py bounds it and checks the fused model's answers.
"""
CLAHE_MIN_TILE = 56
"""Nor below this many pixels per CLAHE tile side (with the card's tile grid; 448 px for the default 8).

For small models twice the input size is not enough: a 64 px model would get a 128 px image, 16 px CLAHE
tiles of 256 pixels for 256 histogram bins, and equalisation that has little to do with the full image's
(fused-model probabilities moved by up to 0.16 on cxr3 images). 56 px tiles hold about 12 pixels per bin;
at 224 px the two rules agree (448).
"""
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class PreprocessSpec:
    """The preprocessing contract a model card carries (timm-style): the screener derives input from it.

    ``clahe_bits`` is the depth (8 or 16) of the image CLAHE runs on. CLAHE's clip limit is relative to
    the mean count per histogram bin, so the same limit only means the same thing for images quantised
    to the same number of bins; 8 matches the 8-bit images the networks are trained on.

    ``working_size`` (0: off, the behaviour of cards written before it existed) is the canonical working
    resolution: the decoded image is resized so its long side is exactly this many pixels (area averaging
    when shrinking, bicubic when enlarging) *before* CLAHE and the letterbox. A 3,000 px original, a
    1,024 px one and a database's 256 px copy then reach the network the same way, with CLAHE tiles of
    the same size in pixels, instead of each source leaving its own resampling signature.
    """

    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    window_percentiles: tuple[float, float] = (0.5, 99.5)
    clahe_bits: int = 8
    working_size: int = 0


# --- DICOM -------------------------------------------------------------------------------------------


def transfer_syntax_label(ds: Dataset) -> str:
    """``"<UID> (<name>)"`` of the dataset's transfer syntax, for error messages; never raises."""
    meta = getattr(ds, "file_meta", None)
    uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if not uid:
        return "<absent> (no Transfer Syntax UID in the file meta information)"
    uid = UID(str(uid))
    return f"{uid} ({uid.name})" if uid.name != str(uid) else f"{uid} (unknown transfer syntax)"


def frame_count(ds: Dataset) -> int:
    """*Number of Frames* (PS3.3 C.7.6.6), 1 where absent or empty.

    Raises:
        ImageDecodeError: the value is not a positive integer.
    """
    value = ds.get("NumberOfFrames")
    if value is None or value == "":
        return 1
    try:
        frames = int(value)
    except (TypeError, ValueError):
        raise ImageDecodeError(
            transfer_syntax_label(ds), f"Number of Frames {value!r} is not an integer"
        ) from None
    if frames < 1:
        raise ImageDecodeError(transfer_syntax_label(ds), f"Number of Frames {frames} is not positive")
    return frames


def check_dimensions(ds: Dataset, max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels, before any decoding.

    Counts *Rows* x *Columns* x *Number of Frames* (PS3.3 C.7.6.3, C.7.6.6) from the header only, so a
    decompression bomb (a small file declaring a huge image) never reaches a decoder.

    Raises:
        ImageTooLargeError: the declared size exceeds ``max_pixels``.
        ImageDecodeError: *Rows* or *Columns* is absent or not positive, or *Number of Frames* is invalid.
    """
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not isinstance(rows, int) or not isinstance(columns, int) or rows < 1 or columns < 1:
        raise ImageDecodeError(
            transfer_syntax_label(ds), f"image size Rows {rows!r} x Columns {columns!r} is absent or invalid"
        )
    frames = frame_count(ds)
    total = rows * columns * frames
    if total > max_pixels:
        raise ImageTooLargeError(
            f"image declares {rows} x {columns} x {frames} frame(s) = {total} pixels, more than "
            f"eligibility.max_pixels = {max_pixels}; refused without decoding"
        )


def read_dicom(source: Path | bytes | BinaryIO) -> Dataset:
    """Parse a DICOM file (Part 10, or a bare dataset without preamble) without decoding its pixels.

    A bare data set has no file meta information, so no Transfer Syntax UID: it gets the one of the
    encoding it was read in (pydicom tells implicit from explicit VR by the first element; PS3.5 A.1 makes
    Implicit VR Little Endian the default), as DCMTK does. Such data sets are never encapsulated.

    Raises:
        ImageDecodeError: the input is not a readable DICOM dataset.
    """
    fp: Path | BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        ds = pydicom.dcmread(fp, force=True)
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError, TypeError) as exc:
        raise ImageDecodeError("<unknown>", f"not a readable DICOM file: {exc}") from exc
    if not ds.file_meta.get("TransferSyntaxUID"):
        implicit, little = ds.original_encoding
        if little is False:
            ds.file_meta.TransferSyntaxUID = uid.ExplicitVRBigEndian
        elif implicit is False:
            ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
        else:
            ds.file_meta.TransferSyntaxUID = uid.ImplicitVRLittleEndian
    return ds


def _decode_first_frame(ds: Dataset) -> np.ndarray:
    """The stored values of frame 1, as decoded by pydicom's plugin for the transfer syntax."""
    label = transfer_syntax_label(ds)
    if "PixelData" not in ds:
        raise ImageDecodeError(label, "the dataset has no Pixel Data (7FE0,0010)")
    try:
        syntax = ds.file_meta.TransferSyntaxUID
        decoder = get_decoder(syntax)
        plugin = _PREFERRED_PLUGINS.get(syntax, "")
        if plugin not in decoder.available_plugins:
            plugin = ""  # let pydicom try each installed plugin in its own order
        array, _ = decoder.as_array(ds, index=0, decoding_plugin=plugin)
    except Exception as exc:  # a decoder may raise anything: turn it into our one typed answer
        detail = " ".join(str(exc).split())  # pydicom lists one line per plugin: keep the reason one line
        raise ImageDecodeError(label, f"{type(exc).__name__}: {detail}") from exc
    if array.ndim != 2:
        raise ImageDecodeError(label, f"decoded frame has shape {array.shape}, expected rows x columns")
    return np.asarray(array)


@dataclass(frozen=True)
class CodestreamInfo:
    """What the main header of a JPEG 2000 codestream says (ITU-T T.800 A.5.1 SIZ, A.6.1 COD, A.6.2 COC)."""

    rows: int
    columns: int
    components: int
    precision: int
    signed: bool
    levels: int
    """Wavelet decomposition levels of component 0: the image can be decoded at ``1 / 2**r``, r <= levels."""


def _u16(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "big")


def _u32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


def codestream_info(codestream: bytes) -> CodestreamInfo | None:
    """Parse the main header of a JPEG 2000 codestream; ``None`` where it is not one this module reads.

    Reads SOC, SIZ, then every marker segment up to the first SOT (ITU-T T.800 A.4 to A.6). The levels
    are COD's *SPcod* decomposition levels, or a COC's for component 0, which overrides it. Tile-part
    headers may override them again; OpenJPEG then refuses a too-large reduction and the caller falls
    back to a full decode.
    """
    if len(codestream) < 4 or _u16(codestream, 0) != 0xFF4F or _u16(codestream, 2) != 0xFF51:
        return None
    at = 2
    size: tuple[int, int, int, int, bool] | None = None
    levels: int | None = None
    component_levels: int | None = None
    while at + 4 <= len(codestream):
        marker, length = _u16(codestream, at), _u16(codestream, at + 2)
        body = codestream[at + 4 : at + 2 + length]
        if marker == 0xFF90 or length < 2 or len(body) != length - 2:  # SOT ends the main header
            break
        if marker == 0xFF51 and len(body) >= 38:  # SIZ
            columns = _u32(body, 2) - _u32(body, 10)
            rows = _u32(body, 6) - _u32(body, 14)
            components = _u16(body, 34)
            if components < 1 or len(body) < 36 + 3 * components:
                return None
            ssiz = body[36]
            size = (rows, columns, components, (ssiz & 0x7F) + 1, bool(ssiz & 0x80))
        elif marker == 0xFF52 and len(body) >= 6:  # COD: Scod, SGcod (4 bytes), then SPcod
            levels = body[5]
        elif marker == 0xFF53 and size is not None:  # COC: Ccoc (1 or 2 bytes), Scoc, then SPcoc
            wide = size[2] >= 257
            if len(body) >= (5 if wide else 4):
                component = _u16(body, 0) if wide else body[0]
                if component == 0:
                    component_levels = body[3 if wide else 2]
        at += 2 + length
    if size is None or levels is None:
        return None
    rows, columns, components, precision, signed = size
    if component_levels is not None:
        levels = component_levels
    return CodestreamInfo(rows, columns, components, precision, signed, levels)


def reduced_side(spec: PreprocessSpec) -> int:
    """The smallest long side a reduced decode may leave for ``spec``: see :data:`REDUCED_HEADROOM`.

    With a ``working_size`` the image is brought to that size before CLAHE anyway, so a reduced decode
    only has to leave twice that much for the area averaging to see full detail.
    """
    if spec.working_size:
        return REDUCED_HEADROOM * spec.working_size
    return max(REDUCED_HEADROOM * spec.input_size, CLAHE_MIN_TILE * spec.clahe_tile_grid)


def reduction_level(rows: int, columns: int, levels: int, min_side: int) -> int:
    """The most resolution levels to drop from a ``rows`` x ``columns`` image, keeping ``min_side``.

    The largest ``r <= levels`` whose reduced long side, ``ceil(max(rows, columns) / 2**r)`` (ITU-T T.800
    B.5), is still at least ``min_side`` (:func:`reduced_side`); 0 where no level qualifies. So the
    letterbox never enlarges a reduced image, and CLAHE keeps enough pixels per tile.
    """
    long_side = max(rows, columns)
    needed = min_side
    level = 0
    while level < levels and -(-long_side // 2 ** (level + 1)) >= needed:
        level += 1
    return level


def _decode_reduced(ds: Dataset, min_side: int) -> np.ndarray | None:
    """Frame 1 of a single-frame JPEG 2000 dataset decoded at reduced resolution, or ``None``.

    ``None`` means "decode in full instead": another transfer syntax, several frames, a codestream whose
    header disagrees with the dataset (size, one component, Bits Stored, Pixel Representation), no
    level to drop, glymur or libopenjp2 not installed, or anything OpenJPEG rejects or warns about at
    reduced resolution. Stored values come back exactly as a full decode would hold them, only fewer.
    """
    if ds.file_meta.get("TransferSyntaxUID") not in _REDUCIBLE_SYNTAXES or frame_count(ds) != 1:
        return None
    try:
        codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    except (ValueError, StopIteration, KeyError, TypeError):
        return None
    info = codestream_info(codestream)
    if (
        info is None
        or (info.rows, info.columns) != (ds.Rows, ds.Columns)
        or info.components != 1
        or info.precision != int(ds.BitsStored)
        or info.signed != (ds.get("PixelRepresentation", 0) == 1)
        or info.precision > _MAX_LUT_BITS
    ):
        return None
    level = reduction_level(info.rows, info.columns, info.levels, min_side)
    if level == 0:
        return None
    try:
        import glymur  # type: ignore[import-untyped]
    except ImportError:
        return None
    # glymur reads files only: hand it the codestream through an unnamed-to-others temporary file.
    with tempfile.NamedTemporaryFile(suffix=".j2c") as fh, warnings.catch_warnings():
        warnings.simplefilter("error")  # a codestream odd enough to warn about is decoded in full
        fh.write(codestream)
        fh.flush()
        try:
            step = 2**level
            array = np.asarray(glymur.Jp2k(fh.name)[::step, ::step])
        except Exception:  # noqa: BLE001 - any refusal of the reduced path means a full decode instead
            return None
    expected = (-(-info.rows // 2**level), -(-info.columns // 2**level))
    if array.shape != expected or not np.issubdtype(array.dtype, np.integer):
        return None
    # OpenJPEG clamps to the component's precision already; clipping again keeps the Bits Stored mask
    # of dicom_to_unit an identity on these values, as it is on a full lossless decode.
    low, high = (
        (-(2 ** (info.precision - 1)), 2 ** (info.precision - 1) - 1)
        if info.signed
        else (0, 2**info.precision - 1)
    )
    clipped: np.ndarray = np.clip(array, low, high).astype(np.int16 if info.signed else np.uint16)
    return clipped


def _check_grey(ds: Dataset) -> str:
    """The photometric interpretation, after checking it is one-sample greyscale (PS3.3 C.7.6.3.1.2)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in MONOCHROME:
        raise ImageDecodeError(
            transfer_syntax_label(ds),
            f"photometric interpretation {photometric or '<absent>'} is not supported: "
            "only greyscale MONOCHROME1 or MONOCHROME2 images can be analysed",
        )
    samples = ds.get("SamplesPerPixel", 1)
    if samples != 1:
        raise ImageDecodeError(
            transfer_syntax_label(ds), f"Samples per Pixel {samples} is not supported: expected 1"
        )
    return photometric


def _has_voi(ds: Dataset) -> bool:
    """Whether the dataset carries a VOI LUT Sequence or a window that ``apply_voi_lut`` will use."""
    sequence = ds.get("VOILUTSequence")
    if sequence and sequence[0].get("LUTDescriptor") is not None and sequence[0].get("LUTData") is not None:
        return True
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _voi_output_range(ds: Dataset) -> tuple[float, float]:
    """The range ``apply_voi_lut`` maps into (PS3.3 C.11.2.1): LUT entries, or the window's y range."""
    sequence = ds.get("VOILUTSequence")
    if sequence and sequence[0].get("LUTDescriptor") is not None and sequence[0].get("LUTData") is not None:
        entries, first_map, _ = sequence[0].LUTDescriptor
        domain = np.arange(first_map, first_map + (entries or 2**16), dtype=np.int64)
        lut = apply_voi_lut(domain, ds)
        return float(lut.min()), float(lut.max())
    # pydicom's apply_windowing maps to the stored-value range carried through the rescale.
    modality_lut = ds.get("ModalityLUTSequence")
    bits = int(ds.BitsStored)
    y_min: float
    y_max: float
    if modality_lut:
        y_min, y_max = 0.0, float(2 ** modality_lut[0].LUTDescriptor[2] - 1)
    elif ds.get("PixelRepresentation", 0) == 0:
        y_min, y_max = 0.0, float(2**bits - 1)
    else:
        y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    return min(y_min, y_max), max(y_min, y_max)


def _percentile_window(
    values: np.ndarray, counts: np.ndarray | None, percentiles: tuple[float, float]
) -> tuple[float, float]:
    """Low and high percentile of ``values`` (each weighted by ``counts`` when given)."""
    if counts is None:
        low, high = np.percentile(values, percentiles)
        return float(low), float(high)
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(counts[order])
    total = int(cumulative[-1])
    ranks = [min(total - 1, max(0, round(p / 100.0 * (total - 1)))) for p in percentiles]
    picks = np.searchsorted(cumulative, np.asarray(ranks) + 1, side="left")
    return float(values[order][picks[0]]), float(values[order][picks[1]])


def _to_unit(values: np.ndarray, low: float, high: float, invert: bool) -> FloatImage:
    """Linear map of ``[low, high]`` onto ``[0, 1]``, clipped; inverted for MONOCHROME1."""
    span = high - low
    if span <= 0:
        out = np.zeros(values.shape, dtype=np.float32)
    else:
        out = ((values - low) * (1.0 / span)).astype(np.float32)
        np.clip(out, 0.0, 1.0, out=out)
    if invert:
        np.subtract(np.float32(1.0), out, out=out)
    return out


def _display_transform(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT (PS3.3 C.11.1) then VOI LUT or first window (PS3.3 C.11.2), as pydicom applies them."""
    return apply_voi_lut(apply_modality_lut(values, ds), ds, index=0)


def dicom_to_unit(
    ds: Dataset, *, max_pixels: int, window_percentiles: tuple[float, float], reduce_for: int = 0
) -> FloatImage:
    """The first frame as float32 ``[0, 1]``, rows x columns, higher = brighter (bone and mediastinum).

    Checks the declared size first (:func:`check_dimensions`), then decodes with pydicom's plugin for the
    transfer syntax, masks stored values to *Bits Stored*, applies the Modality LUT and then the VOI LUT
    Sequence or the first Window Center/Width. Where the file has neither, the window is the
    ``window_percentiles`` of the image after the Modality LUT. MONOCHROME1 is inverted.

    ``reduce_for`` > 0 is the smallest long side the caller needs (:func:`reduced_side` of the model's
    spec): a single-frame JPEG 2000 image is then decoded at the coarsest resolution level that keeps it
    (:func:`reduction_level`), so the result may be smaller than *Rows* x *Columns*; the grey-level
    transforms are the same. Where reduction does not apply, the image is decoded in full, exactly as with
    ``reduce_for = 0``.

    Raises:
        ImageTooLargeError: the header declares more than ``max_pixels`` pixels (nothing decoded).
        ImageDecodeError: not greyscale, no pixel data, no usable decoder, corrupt data or LUTs; the
            message names the transfer syntax.
    """
    check_dimensions(ds, max_pixels)
    photometric = _check_grey(ds)
    reduced = _decode_reduced(ds, reduce_for) if reduce_for > 0 else None
    stored = reduced if reduced is not None else _decode_first_frame(ds)
    invert = photometric == "MONOCHROME1"
    try:
        bits = int(ds.BitsStored)
        signed = ds.get("PixelRepresentation", 0) == 1
        if np.issubdtype(stored.dtype, np.integer) and bits <= _MAX_LUT_BITS:
            # Every step is a function of the stored value: evaluate pydicom's transforms once per
            # possible value (at most 65536) and gather, rather than in float64 per pixel.
            offset = 2 ** (bits - 1) if signed else 0
            if signed:
                index = np.clip(stored.astype(np.int32) + offset, 0, 2**bits - 1).astype(np.uint16)
            else:
                index = (stored & (2**bits - 1)).astype(np.uint16, copy=False)
            domain = np.arange(-offset, 2**bits - offset, dtype=np.int32 if signed else np.uint16)
            if _has_voi(ds):
                table = _display_transform(domain, ds)
                low, high = _voi_output_range(ds)
            else:
                table = apply_modality_lut(domain, ds)
                counts = np.bincount(index.ravel(), minlength=domain.size)
                low, high = _percentile_window(table, counts, window_percentiles)
            return _to_unit(np.asarray(table, dtype=np.float64), low, high, invert)[index]
        values = _display_transform(stored, ds)
        if _has_voi(ds):
            low, high = _voi_output_range(ds)
        else:
            low, high = _percentile_window(values[::2, ::2], None, window_percentiles)
        return _to_unit(np.asarray(values, dtype=np.float32), low, high, invert)
    except (
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        IndexError,
        NotImplementedError,
        OverflowError,
        struct.error,
    ) as exc:
        # struct.error: LUT Data shorter than its LUT Descriptor declares; OverflowError: a descriptor whose
        # first mapped value does not fit the stored values' type (both found by fuzzing).
        raise ImageDecodeError(
            transfer_syntax_label(ds), f"invalid modality or VOI LUT attributes: {type(exc).__name__}: {exc}"
        ) from exc


# --- PNG / JPEG --------------------------------------------------------------------------------------


def raster_to_unit(source: Path | bytes, *, max_pixels: int | None = None) -> FloatImage:
    """A PNG/JPEG (any format Pillow reads) as float32 ``[0, 1]`` grey, honouring EXIF orientation.

    8-bit images are divided by 255, 16-bit ones by 65535; colour is converted to luma (ITU-R 601-2).
    ``max_pixels``, when given, is checked against the header before decoding.

    Raises:
        ImageTooLargeError: the image is larger than ``max_pixels``.
        ImageDecodeError: Pillow cannot read or decode it (``transfer_syntax`` is ``"PNG/JPEG file"``).
    """
    fp: Path | BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(fp) as opened:
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(
                    f"image is {height} x {width} = {width * height} pixels, more than "
                    f"eligibility.max_pixels = {max_pixels}; refused without decoding"
                )
            image = ImageOps.exif_transpose(opened)
            if image.mode == "F":
                floats: FloatImage = np.asarray(image, dtype=np.float32)
                return _to_unit(floats, float(floats.min()), float(floats.max()), invert=False)
            # "I;16*" and "I" are how Pillow opens 16-bit greyscale PNG; the rest are 8 bits per channel.
            sixteen_bit = image.mode.startswith("I")
            if not sixteen_bit and image.mode != "L":
                image = image.convert("L")
            grey: FloatImage = np.asarray(image, dtype=np.float32)
            grey *= np.float32(1.0 / 65535.0 if sixteen_bit else 1.0 / 255.0)
            return np.clip(grey, 0.0, 1.0, out=grey) if sixteen_bit else grey
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(RASTER_SYNTAX, f"{type(exc).__name__}: {exc}") from exc


def _looks_like_dicom(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def load_unit(
    path: Path, spec: PreprocessSpec, max_pixels: int, *, reduced_decode: bool = False
) -> FloatImage:
    """Read a DICOM or raster file and return its first frame as float32 ``[0, 1]``, higher = brighter.

    DICOM is recognised by the ``DICM`` prefix at offset 128; PNG and JPEG by their signatures; anything
    else is tried as a bare DICOM dataset with pixel data, then as a raster image. ``reduced_decode``
    lets JPEG 2000 DICOM decode at reduced resolution for ``spec.input_size`` (see :func:`dicom_to_unit`).

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels declared.
        ImageDecodeError: unreadable, undecodable, or not greyscale DICOM.
        OSError: the file cannot be opened.
    """
    with path.open("rb") as fh:
        head = fh.read(132)
    if head.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
        return raster_to_unit(path, max_pixels=max_pixels)
    if not _looks_like_dicom(head):
        try:
            ds = read_dicom(path)
        except ImageDecodeError:
            return raster_to_unit(path, max_pixels=max_pixels)
        if "PixelData" not in ds:
            return raster_to_unit(path, max_pixels=max_pixels)
    else:
        ds = read_dicom(path)
    return dicom_to_unit(
        ds,
        max_pixels=max_pixels,
        window_percentiles=spec.window_percentiles,
        reduce_for=reduced_side(spec) if reduced_decode else 0,
    )


# --- pixels to model input ---------------------------------------------------------------------------


def enhance_contrast(img01: FloatImage, spec: PreprocessSpec) -> FloatImage:
    """Contrast-limited adaptive histogram equalisation (CLAHE) of a ``[0, 1]`` image.

    The image is quantised to ``spec.clahe_bits`` bits, equalised with clip limit ``spec.clahe_clip_limit``
    on a ``spec.clahe_tile_grid`` square grid of tiles, and returned as float32 ``[0, 1]``.

    Raises:
        ValueError: ``spec.clahe_bits`` is not 8 or 16.
    """
    dtype: type[np.unsignedinteger[Any]]
    if spec.clahe_bits == 8:
        top, dtype = 255.0, np.uint8
    elif spec.clahe_bits == 16:
        top, dtype = 65535.0, np.uint16
    else:
        raise ValueError(f"clahe_bits {spec.clahe_bits} is not supported: use 8 or 16")
    scaled = np.clip(img01, 0.0, 1.0).astype(np.float32, copy=False) * np.float32(top)
    quantised = np.rint(scaled, out=scaled).astype(dtype)
    grid = (spec.clahe_tile_grid, spec.clahe_tile_grid)
    equalised = cv2.createCLAHE(clipLimit=spec.clahe_clip_limit, tileGridSize=grid).apply(quantised)
    out: FloatImage = equalised.astype(np.float32) * np.float32(1.0 / top)
    return out


def to_working_size(img01: FloatImage, size: int) -> FloatImage:
    """Resize so the long side is exactly ``size`` pixels, keeping the aspect ratio (``size`` 0: as is).

    Shrinking averages pixel areas (``cv2.INTER_AREA``); enlarging is bicubic, clipped to ``[0, 1]``.
    """
    height, width = img01.shape
    if size <= 0 or max(height, width) == size:
        return img01
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(img01.astype(np.float32, copy=False), (new_w, new_h), interpolation=interpolation)
    out: FloatImage = np.clip(resized, 0.0, 1.0).astype(np.float32, copy=False)
    return out


def letterbox(img01: FloatImage, size: int) -> FloatImage:
    """Resize to fit ``size`` x ``size`` keeping the aspect ratio, centred on black (zero) padding.

    Shrinking averages pixel areas (``cv2.INTER_AREA``); enlarging interpolates linearly.
    """
    height, width = img01.shape
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(img01.astype(np.float32, copy=False), (new_w, new_h), interpolation=interpolation)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def to_model_input(img01: FloatImage, spec: PreprocessSpec) -> FloatImage:
    """``[0, 1]`` grey image -> C-contiguous float32 ``[3, S, S]`` network input (``S = spec.input_size``).

    The canonical working size (when the spec has one), contrast enhancement, letterbox, the grey plane
    replicated to three channels, then ``(x - mean) / std`` per channel.
    """
    square = letterbox(enhance_contrast(to_working_size(img01, spec.working_size), spec), spec.input_size)
    out = np.empty((3, spec.input_size, spec.input_size), dtype=np.float32)
    for channel, (mean, std) in enumerate(zip(spec.mean, spec.std, strict=True)):
        np.subtract(square, np.float32(mean), out=out[channel])
        out[channel] *= np.float32(1.0 / std)
    return out


def preprocess_file(
    path: Path, spec: PreprocessSpec, max_pixels: int, *, reduced_decode: bool = False
) -> FloatImage:
    """:func:`load_unit` then :func:`to_model_input`; raises what they raise."""
    return to_model_input(load_unit(path, spec, max_pixels, reduced_decode=reduced_decode), spec)


def preprocess_dataset(
    ds: Dataset, spec: PreprocessSpec, max_pixels: int, *, reduced_decode: bool = False
) -> FloatImage:
    """:func:`dicom_to_unit` then :func:`to_model_input`; raises what they raise.

    ``reduced_decode`` decodes single-frame JPEG 2000 at the coarsest resolution level that suits
    ``spec.input_size`` (see :func:`dicom_to_unit`); everything else is decoded in full either way.
    """
    unit = dicom_to_unit(
        ds,
        max_pixels=max_pixels,
        window_percentiles=spec.window_percentiles,
        reduce_for=reduced_side(spec) if reduced_decode else 0,
    )
    return to_model_input(unit, spec)

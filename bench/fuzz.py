"""Fuzz harness: hostile bytes down the path a received instance takes, from the spool to model input.

Each example is a seed file with mutations applied, run through exactly what the listener and the worker
do with received bytes:

1. ``Spool.put`` into a scratch spool (the listener's durable write);
2. ``screener.ingest.receive.read_header`` (study/series UIDs, in the listener's association thread);
3. ``screener.inference.prepare.prepare_instance`` on the spooled file (the worker's pool task: eligibility
from    the header, then decode and preprocess to the model input).

What must hold for every input (an *escape* when it does not):

- ``Spool.put`` raises nothing but ``SpoolError`` (the screener's own tree); ``read_header`` never raises
  (it answers a problem string); ``prepare_instance`` never raises and answers ``ok`` with a finite
  ``3 x S x S`` float32 array, or ``skipped``/``failed`` with a reason. A ``failed`` reason of
  ``unexpected error while decoding (...)`` is an escape too: it means an untyped exception got past
  ``screener.imaging.pixels`` to prepare's last-resort net, so the user gets a class name instead of a reason.
- No reason or header problem carries the seeds' patient name or ID (PHI never reaches a status reason).
- Time and memory per input are bounded (see :class:`Bounds`): peak resident memory is measured per input
  by resetting the kernel's high-water mark (``/proc/self/clear_refs``) and reading ``VmHWM``, so memory
  allocated by C decoders counts too.

Seeds are real radiographs from pydicom-data: RG1 (a chest CR) at full size, and its header with the pixels
block-averaged to about 190 px and re-encoded in each transfer syntax pydicom can write (explicit and
implicit VR, deflated, RLE, JPEG 2000, JPEG-LS), plus RG3 (an extremity CR, so eligibility is exercised)
and a minimal CR built from scratch. Mutations: header fields set to lies (Rows/Columns up to 65535 x 65535,
Bits Allocated/Stored, Photometric Interpretation, frames, windows, rescale, LUT sequences, UIDs,
eligibility tags), elements deleted, the file meta's Transfer Syntax UID swapped for another (the bytes
stay as they were), sequences nested up to 2,000 deep, deflate bombs, element and fragment lengths
overwritten (0xFFFFFFFF and friends), byte flips, insertions and truncations.

    .venv/bin/python bench/fuzz.py                 # 5 minutes
    .venv/bin/python bench/fuzz.py --seconds 900   # longer
    .venv/bin/python bench/fuzz.py --quick         # 30 seconds

It prints examples/s and, as the last line, ``ratio=<full-path throughput / header-only throughput>``,
both measured on the same generated inputs in the same run: the header-only baseline is the listener's
part (spool write + ``read_header``), the full path adds the worker's part. 0.1 means an input costs ten
times as much once the worker decodes it as it did to receive.
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import struct
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import data_element_generator, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from screener.core.config import EligibilityConfig
from screener.core.errors import SpoolError
from screener.core.spool import Spool
from screener.imaging.pixels import PreprocessSpec
from screener.inference.prepare import Prepared, prepare_instance
from screener.ingest.receive import read_header

CANARY_NAME = "FUZZCANARY^PATIENT"
CANARY_ID = "FUZZCANARYID"
UNTYPED = "unexpected error while decoding"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MIB = 1 << 20

# --- bounds -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """What one input may cost: ``base + per_input_byte x len(input) + per_pixel x min(pixels, max_pixels)``.

    ``pixels`` is what the (mutated) header declares. The screener holds a received instance in memory a
    few times (the received bytes, pydicom's copy, the decoded frame, a float32 image, a lookup index), so
    memory proportional to input and declared size is expected; more than that means an input can make
    the process allocate what it did not send and the rules do not allow (a decompression or deflate bomb,
    a length taken on trust). The per-pixel figure covers the decoded frame (up to 8 bytes), the unit image
    (4), the 16-bit index (2), CLAHE's 8-bit copy and its float32 result (5), with room to spare; the base
    covers the interpreter's and decoders' working buffers. The time bound is generous on purpose: the
    slowest legitimate seed (RG1 JPEG 2000 lossless at full resolution) takes about 0.9 s on a 2-core host,
    and the bound is only there to catch an input that makes a stage spin.
    """

    base_bytes: int = 48 * MIB
    per_input_byte: float = 6.0
    per_pixel: float = 32.0
    max_pixels: int = 8_000_000
    seconds: float = 8.0
    # The data segment may grow this much during one input before allocations fail (MemoryError rather
    # than a host out of memory). Large, because reading a value whose length field says 4 GiB reserves
    # 4 GiB of address space that is never touched: that is not memory use, resident memory is.
    address_space: int = 6 << 30

    def memory(self, input_bytes: int, declared_pixels: int) -> int:
        pixels = min(max(declared_pixels, 0), self.max_pixels)
        return int(self.base_bytes + self.per_input_byte * input_bytes + self.per_pixel * pixels)


# --- seeds ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes


def pydicom_data_dir() -> Path:
    import data_store  # the pydicom-data package

    return Path(data_store.__file__).parent / "data"


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _with_canaries(ds: Dataset) -> Dataset:
    ds.PatientName = CANARY_NAME
    ds.PatientID = CANARY_ID
    if 0xFFFCFFFC in ds:  # Data Set Trailing Padding: senders may drop it (PS3.5 7.5.1)
        del ds[0xFFFCFFFC]
    return ds


def _block_average(pixels: np.ndarray, step: int) -> np.ndarray:
    h, w = (pixels.shape[0] // step) * step, (pixels.shape[1] // step) * step
    small = pixels[:h, :w].astype(np.float32).reshape(h // step, step, w // step, step).mean(axis=(1, 3))
    return small.astype(pixels.dtype)


def reduced(source: Path, step: int, syntax: str) -> bytes:
    """``source`` with its real header and its pixels block-averaged by ``step``, in ``syntax``."""
    ds = _with_canaries(dcmread(source))
    small = _block_average(ds.pixel_array, step)
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = small.tobytes()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax)
    return encode(ds)


def minimal_cr(pixels: np.ndarray) -> bytes:
    """The fewest attributes a chest CR can arrive with: no window, MONOCHROME2, 12 of 16 bits."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (pixels >> 4).astype(np.uint16).tobytes()
    return encode(_with_canaries(ds))


def seed_corpus(*, full_size: Sequence[str] = ("RG1_UNCR", "RG1_J2KI")) -> list[Seed]:
    """The seeds: reduced RG1 in every writable syntax, reduced RG3, a minimal CR, and full-size files."""
    data = pydicom_data_dir()
    rg1 = data / "RG1_UNCR.dcm"
    seeds = [
        Seed(f"RG1/10 {name}", reduced(rg1, 10, syntax))
        for name, syntax in (
            ("explicit", ExplicitVRLittleEndian),
            ("implicit", ImplicitVRLittleEndian),
            ("deflated", DeflatedExplicitVRLittleEndian),
            ("rle", RLELossless),
            ("j2k", JPEG2000Lossless),
            ("jpeg-ls", JPEGLSLossless),
        )
    ]
    seeds.append(Seed("RG3/10 j2k", reduced(data / "RG3_UNCR.dcm", 10, JPEG2000Lossless)))
    pixels = _block_average(dcmread(rg1).pixel_array, 12)
    seeds.append(Seed("minimal CR", minimal_cr(pixels)))
    for name in full_size:
        ds = _with_canaries(dcmread(data / f"{name}.dcm"))
        seeds.append(Seed(f"{name} full", encode(ds)))
    return seeds


# --- mutations --------------------------------------------------------------------------------------
# A case is a seed and a list of operations, each a plain tuple so hypothesis can print and shrink it.

Op = tuple[object, ...]


def _us(*values: int) -> list[bytes]:
    return [struct.pack("<H", v) for v in values]


def _text(*values: str) -> list[bytes]:
    out = []
    for v in values:
        raw = v.encode("latin-1")
        out.append(raw + b" " if len(raw) % 2 else raw)
    return out


_DS_LIES = _text("0", "-1", "NaN", "inf", "-inf", "1e400", "1e-300", "1\\2\\3", "abc", "")
# (tag, VR, candidate raw values): every header field the pipeline reads, with lies.
HEADER_FIELDS: tuple[tuple[int, str, list[bytes]], ...] = (
    (0x00280010, "US", _us(0, 1, 2, 7, 255, 40000, 65535)),  # Rows
    (0x00280011, "US", _us(0, 1, 2, 7, 255, 40000, 65535)),  # Columns
    (0x00280100, "US", _us(0, 1, 7, 8, 12, 16, 32, 64, 65535)),  # Bits Allocated
    (0x00280101, "US", _us(0, 1, 8, 12, 15, 16, 17, 32, 65535)),  # Bits Stored
    (0x00280102, "US", _us(0, 7, 15, 31, 65535)),  # High Bit
    (0x00280103, "US", _us(0, 1, 2, 65535)),  # Pixel Representation
    (0x00280002, "US", _us(0, 1, 3, 65535)),  # Samples per Pixel
    (0x00280006, "US", _us(0, 1, 7)),  # Planar Configuration
    (
        0x00280004,
        "CS",
        [*_text("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", ""), b"\xff\x00"],
    ),
    (0x00280008, "IS", _text("0", "1", "2", "-1", "99999999", "x", "1.5", "")),  # Number of Frames
    (0x00281050, "DS", _DS_LIES),  # Window Center
    (0x00281051, "DS", _DS_LIES),  # Window Width
    (0x00281052, "DS", _DS_LIES),  # Rescale Intercept
    (0x00281053, "DS", _DS_LIES),  # Rescale Slope
    (0x00281056, "CS", _text("SIGMOID", "LINEAR_EXACT", "BOGUS", "")),  # VOI LUT Function
    (0x00080060, "CS", _text("CR", "DX", "CT", "OT", "", "cr")),  # Modality
    (0x00180015, "CS", _text("CHEST", "SKULL", "", "chest")),  # Body Part Examined
    (0x00185101, "CS", _text("PA", "AP", "LL", "")),  # View Position
    (0x00080016, "UI", _text(CR_STORAGE, SECONDARY_CAPTURE, "1.2.3", "")),  # SOP Class UID
    (0x0020000D, "UI", [*_text("", "1.2", "1." + "2" * 70, "../../etc/x"), b"\x00" * 8]),  # Study UID
    (0x0020000E, "UI", [*_text("", "1." + "3" * 70, "/abs/x"), b"\xff" * 6]),  # Series UID
    (0x00080008, "CS", _text("DERIVED\\SECONDARY", "ORIGINAL\\PRIMARY", "")),  # Image Type
    (0x0008103E, "LO", _text("CHEST LAT", "CHEST PA", "")),  # Series Description
    (0x7FE00010, "OB", [b"", b"\x00\x01", b"\xfe\xff\x00\xe0\xff\xff\xff\xff"]),  # Pixel Data
)
DELETABLE = (0x7FE00010, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280004, 0x0020000D, 0x00280002)
TRANSFER_SYNTAX_LIES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000,
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.3.4.5",
    "",
)
LENGTH_LIES = (0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x10000000, 0, 1, 3)


def _meta_end(data: bytes) -> int:
    """Offset of the dataset after the preamble and file meta group (0 when there is no valid one)."""
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        return 0
    return 144 + int.from_bytes(data[140:144], "little")


def _transfer_syntax(data: bytes) -> str:
    try:
        fp = io.BytesIO(data)
        read_preamble(fp, force=False)
        from pydicom.filereader import _read_file_meta_info

        return str(_read_file_meta_info(fp).get("TransferSyntaxUID", ""))
    except Exception:  # noqa: BLE001 - a mutated meta group simply has no usable syntax
        return ""


def _set_element(data: bytes, tag: int, vr: str, value: bytes | None) -> bytes:
    """Re-encode with one element's raw value replaced (or deleted): no validation, lies pass through."""
    try:
        ds = dcmread(io.BytesIO(data), force=True)
        if value is None:
            if tag in ds:
                del ds[tag]
        else:
            implicit = bool(ds.original_encoding[0])
            ds[tag] = RawDataElement(Tag(tag), None if implicit else vr, len(value), value, 0, implicit, True)
        return encode(ds)
    except Exception:  # noqa: BLE001 - the mutation does not apply to this input: leave it unchanged
        return data


def _lut_lie(data: bytes, keyword: str, descriptor: tuple[int, int, int], table: bytes) -> bytes:
    try:
        ds = dcmread(io.BytesIO(data), force=True)
        item = Dataset()
        item.add_new(0x00283002, "US", list(descriptor))  # LUT Descriptor
        item.add_new(0x00283006, "OW", table)  # LUT Data
        if keyword == "ModalityLUTSequence":
            item.ModalityLUTType = "OD"
        setattr(ds, keyword, [item])
        return encode(ds)
    except Exception:  # noqa: BLE001 - not applicable to this input
        return data


def _swap_transfer_syntax(data: bytes, syntax: str) -> bytes:
    """The same dataset bytes under a file meta group that names ``syntax``."""
    end = _meta_end(data)
    if not end:
        return data
    try:
        fp = io.BytesIO(data)
        read_preamble(fp, force=False)
        from pydicom.filereader import _read_file_meta_info

        meta = _read_file_meta_info(fp)
        meta.TransferSyntaxUID = syntax
        out = io.BytesIO()
        out.write(data[:132])
        from pydicom.filebase import DicomFileLike

        write_file_meta_info(DicomFileLike(out), meta, enforce_standard=True)
        return out.getvalue() + data[end:]
    except Exception:  # noqa: BLE001 - not applicable to this input
        return data


def _dataset_body(data: bytes) -> tuple[bytes, bytes, bool]:
    """(meta part, dataset part as the parser sees it, deflated?): deflated datasets are inflated."""
    end = _meta_end(data)
    deflated = _transfer_syntax(data) == DeflatedExplicitVRLittleEndian
    body = data[end:]
    if deflated:
        try:
            body = zlib.decompress(body, -zlib.MAX_WBITS)
        except zlib.error:
            deflated = False
    return data[:end], body, deflated


def _rejoin(meta: bytes, body: bytes, deflated: bool) -> bytes:
    if deflated:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = compressor.compress(body) + compressor.flush()
    return meta + body


def _nested_sequence(depth: int, implicit: bool) -> bytes:
    """(0008,1140) holding ``depth`` sequences, each in an undefined-length item (PS3.5 7.5)."""
    tag = struct.pack("<HH", 0x0008, 0x1140)
    head = tag + (b"\xff\xff\xff\xff" if implicit else b"SQ\x00\x00\xff\xff\xff\xff")
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    item_end = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    seq_end = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return (head + item) * depth + (item_end + seq_end) * depth


def _nest(data: bytes, depth: int) -> bytes:
    meta, body, deflated = _dataset_body(data)
    syntax = _transfer_syntax(data)
    if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        syntax = ExplicitVRLittleEndian if syntax != ImplicitVRLittleEndian else syntax
    nested = _nested_sequence(depth, implicit=syntax == ImplicitVRLittleEndian)
    return _rejoin(meta, nested + body, deflated)


def _deflate_bomb(data: bytes, inflated_mib: int) -> bytes:
    """Re-encode as Deflated Explicit VR Little Endian with an OB element of zeros that inflates to MiB."""
    try:
        ds = dcmread(io.BytesIO(data), force=True)
        ds.add_new(0x00291010, "OB", b"")  # private, harmless tag; its value is spliced in below
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        plain = encode(ds)
    except Exception:  # noqa: BLE001 - not applicable to this input
        return data
    end = _meta_end(plain)
    marker = struct.pack("<HH", 0x0029, 0x1010) + b"OB\x00\x00" + b"\x00\x00\x00\x00"
    at = plain.find(marker, end)
    if at < 0:
        return data
    size = inflated_mib * MIB
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(plain[end:at] + marker[:8] + struct.pack("<I", size))]
    zeros = bytes(MIB)
    parts += [compressor.compress(zeros) for _ in range(inflated_mib)]
    parts += [compressor.compress(plain[at + len(marker) :]), compressor.flush()]
    return _with_meta(plain, DeflatedExplicitVRLittleEndian) + b"".join(parts)


def _with_meta(plain: bytes, syntax: str) -> bytes:
    end = _meta_end(plain)
    return _swap_transfer_syntax(plain[:end], syntax) if end else b""


def element_offsets(data: bytes) -> list[tuple[int, int, int]]:
    """(tag, offset of the length field, its size) of each top-level element of the dataset."""
    meta, body, deflated = _dataset_body(data)
    if deflated:
        return []  # offsets would be in the inflated stream; the byte ops work on raw bytes
    syntax = _transfer_syntax(data)
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    out: list[tuple[int, int, int]] = []
    try:
        for elem in data_element_generator(io.BytesIO(body), implicit, little, defer_size=64):
            long_form = implicit or elem.VR in {
                "OB",
                "OW",
                "OF",
                "OD",
                "OL",
                "OV",
                "SQ",
                "UC",
                "UN",
                "UR",
                "UT",
            }
            size = 4 if long_form else 2
            out.append((int(elem.tag), len(meta) + elem.value_tell - size, size))
    except Exception:  # noqa: BLE001 - a damaged dataset: the offsets found so far
        return out
    return out


def _lie_length(data: bytes, pick: int, value: int) -> bytes:
    offsets = element_offsets(data)
    fragments = [i for i in range(_meta_end(data), len(data) - 8) if data[i : i + 4] == b"\xfe\xff\x00\xe0"][
        :64
    ]
    targets = [(off, size) for _, off, size in offsets] + [(i + 4, 4) for i in fragments]
    if not targets:
        return data
    off, size = targets[pick % len(targets)]
    packed = struct.pack("<I", value) if size == 4 else struct.pack("<H", value & 0xFFFF)
    return data[:off] + packed + data[off + size :]


def apply(data: bytes, ops: Sequence[Op]) -> bytes:
    """Apply operations in order; one that does not fit the input leaves it unchanged."""
    for op in ops:
        kind = op[0]
        if kind == "set":
            _, tag, vr, value = op
            data = _set_element(data, int(tag), str(vr), bytes(value))  # type: ignore[call-overload]
        elif kind == "delete":
            data = _set_element(data, int(op[1]), "", None)  # type: ignore[call-overload]
        elif kind == "lut":
            _, keyword, descriptor, table = op
            data = _lut_lie(data, str(keyword), descriptor, bytes(table))  # type: ignore[arg-type,call-overload]
        elif kind == "syntax":
            data = _swap_transfer_syntax(data, str(op[1]))
        elif kind == "nest":
            data = _nest(data, int(op[1]))  # type: ignore[call-overload]
        elif kind == "bomb":
            data = _deflate_bomb(data, int(op[1]))  # type: ignore[call-overload]
        elif kind == "length":
            data = _lie_length(data, int(op[1]), int(op[2]))  # type: ignore[call-overload]
        elif kind == "flip":
            pos = int(op[1]) % max(1, len(data))  # type: ignore[call-overload]
            if data:
                data = data[:pos] + bytes([data[pos] ^ int(op[2])]) + data[pos + 1 :]  # type: ignore[call-overload]
        elif kind == "insert":
            pos = int(op[1]) % (len(data) + 1)  # type: ignore[call-overload]
            data = data[:pos] + bytes(op[2]) + data[pos:]  # type: ignore[call-overload]
        elif kind == "truncate":
            data = data[: int(op[1]) % (len(data) + 1)]  # type: ignore[call-overload]
        else:
            raise ValueError(f"unknown mutation {op!r}")
    return data


@dataclass(frozen=True)
class Scope:
    """Which mutations are generated. The bench runs all of them; the CI test leaves out those that hit
    bugs already reported (each has its own regression test), so it keeps guarding everything else."""

    bombs: bool = True  # deflate bombs
    max_bomb_mib: int = 64
    max_nest: int = 2000  # deepest nested sequence
    luts: bool = True  # VOI/Modality LUT sequences whose data disagrees with their descriptor
    deflated: bool = True  # the deflated seed and "Deflated" transfer syntax lies


def header_ops(scope: Scope) -> st.SearchStrategy[Op]:
    fields = st.sampled_from(HEADER_FIELDS).flatmap(
        lambda f: st.sampled_from(f[2]).map(lambda v, f=f: ("set", f[0], f[1], v))
    )
    syntaxes = [s for s in TRANSFER_SYNTAX_LIES if scope.deflated or s != DeflatedExplicitVRLittleEndian]
    options: list[st.SearchStrategy[Op]] = [
        fields,
        st.tuples(st.just("delete"), st.sampled_from(DELETABLE)),
        st.tuples(st.just("syntax"), st.sampled_from(syntaxes)),
    ]
    if scope.luts:
        descriptor = st.tuples(
            st.sampled_from([0, 1, 256, 4096, 65535]),
            st.sampled_from([0, 1, 1000, 65535]),
            st.sampled_from([0, 8, 16, 64]),
        )
        options.append(
            st.tuples(
                st.just("lut"),
                st.sampled_from(["VOILUTSequence", "ModalityLUTSequence"]),
                descriptor,
                st.sampled_from([b"", b"\x00\x01", bytes(512)]),
            )
        )
    return st.one_of(options)


def structure_ops(scope: Scope) -> st.SearchStrategy[Op]:
    depths = [d for d in (1, 8, 50, 100, 500, 2000) if d <= scope.max_nest]
    options: list[st.SearchStrategy[Op]] = [
        st.tuples(st.just("nest"), st.sampled_from(depths)),
        st.tuples(st.just("length"), st.integers(0, 200), st.sampled_from(LENGTH_LIES)),
    ]
    if scope.bombs:
        options.append(st.tuples(st.just("bomb"), st.integers(1, scope.max_bomb_mib)))
    return st.one_of(options)


def byte_ops() -> st.SearchStrategy[Op]:
    position = st.integers(0, 1 << 24)
    return st.one_of(
        st.tuples(st.just("flip"), position, st.integers(1, 255)),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("truncate"), position),
    )


@dataclass(frozen=True)
class Case:
    seed: str
    ops: tuple[Op, ...]


def cases(seeds: Sequence[Seed], scope: Scope) -> st.SearchStrategy[Case]:
    """A seed (the first ones, small and cheap, are what shrinking goes to) and 0-6 mutations."""
    names = [s.name for s in seeds if scope.deflated or "deflated" not in s.name]
    ops = st.tuples(
        st.lists(header_ops(scope), max_size=3),
        st.lists(structure_ops(scope), max_size=1),
        st.lists(byte_ops(), max_size=2),
    ).map(lambda t: tuple(t[0] + t[1] + t[2]))
    return st.builds(Case, st.sampled_from(names), ops)


# --- running one input ------------------------------------------------------------------------------


def _rss_fields() -> dict[str, int]:
    out = {}
    with Path("/proc/self/status").open() as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "VmData"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)


@contextmanager
def data_limit(extra_bytes: int) -> Iterator[None]:
    """Cap the process's data segment at its current size + ``extra_bytes`` (a runaway input gets
    MemoryError instead of taking the host down); restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = _rss_fields()["VmData"] + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


@dataclass(frozen=True)
class Result:
    outcome: str  # "ok" | "skipped" | "failed" | "spool-refused"
    reason: str | None
    header_problem: str | None
    header_seconds: float  # spool write + read_header (the listener's part)
    full_seconds: float  # the above + prepare_instance (the worker's part)
    peak_bytes: int  # resident memory above the level before the input
    allowed_bytes: int


class Escape(AssertionError):
    """An input got an answer that is not the screener's own typed one, or cost more than its bound."""

    case: object = None


def declared_pixels(data: bytes) -> int:
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True, force=True, specific_tags=["Rows", "Columns"])
        return int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0)
    except Exception:  # noqa: BLE001 - unreadable header: nothing declared
        return 0


def run_one(
    data: bytes,
    spool: Spool,
    spec: PreprocessSpec,
    rules: EligibilityConfig,
    bounds: Bounds,
    *,
    header_must_answer: bool = True,
) -> Result:
    """Run one input down the path; raise :class:`Escape` when an invariant of the module doc breaks.

    With ``header_must_answer`` false, an exception from ``read_header`` is taken as its problem and the
    input goes on to the worker's part (to fuzz that part while a ``read_header`` bug is open).
    """
    allowed = bounds.memory(len(data), declared_pixels(data))
    before = _rss_fields()["VmRSS"]
    _reset_peak()
    started = time.perf_counter()
    try:
        entry = spool.put(data)
    except SpoolError as exc:
        return Result("spool-refused", str(exc), None, 0.0, 0.0, 0, allowed)
    path = spool.path(entry.name)
    header_problem: str | None
    try:
        header_problem = read_header(path).problem
    except Exception as exc:
        if header_must_answer:
            spool.remove(entry.name)
            raise Escape(f"read_header raised {type(exc).__name__}: {exc}") from exc
        header_problem = None
    header_done = time.perf_counter()
    try:
        prepared = prepare_instance(1, str(path), spec, rules)
    except BaseException as exc:
        raise Escape(f"prepare_instance raised {type(exc).__name__}: {exc}") from exc
    finally:
        spool.remove(entry.name)
    done = time.perf_counter()
    peak = _rss_fields()["VmHWM"] - before
    check(prepared, header_problem, spec)
    if peak > allowed:
        raise Escape(f"peak memory {peak / MIB:.1f} MiB above the bound {allowed / MIB:.1f} MiB")
    if done - started > bounds.seconds:
        raise Escape(f"took {done - started:.2f} s, above the bound {bounds.seconds} s")
    return Result(
        prepared.kind, prepared.reason, header_problem, header_done - started, done - started, peak, allowed
    )


def check(prepared: Prepared, header_problem: str | None, spec: PreprocessSpec) -> None:
    for text in (prepared.reason, header_problem):
        if text and (CANARY_NAME.split("^")[0] in text or CANARY_ID in text):
            raise Escape(f"a patient identifier reached a reason: {text!r}")
    if prepared.kind == "ok":
        array = prepared.array
        shape = (3, spec.input_size, spec.input_size)
        if array is None or array.shape != shape or array.dtype != np.float32:
            raise Escape(f"ok without a {shape} float32 array")
        if not np.isfinite(array).all():
            raise Escape("ok with NaN or infinite model input")
        return
    if not prepared.reason:
        raise Escape(f"{prepared.kind} without a reason")
    if prepared.reason.startswith(UNTYPED):
        raise Escape(f"an untyped error reached prepare_instance's last-resort handler: {prepared.reason}")


# --- the harness ------------------------------------------------------------------------------------


@dataclass
class Stats:
    examples: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    header_seconds: list[float] = field(default_factory=list)
    full_seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    escapes: list[str] = field(default_factory=list)

    def add(self, result: Result) -> None:
        self.examples += 1
        self.outcomes[result.outcome] = self.outcomes.get(result.outcome, 0) + 1
        self.header_seconds.append(result.header_seconds)
        self.full_seconds.append(result.full_seconds)
        self.peak_bytes = max(self.peak_bytes, result.peak_bytes)


@dataclass
class Harness:
    """Seeds, a scratch spool, the rules and the bounds; :meth:`property` is the hypothesis test body."""

    seeds: Sequence[Seed]
    spool_dir: Path
    spec: PreprocessSpec = field(default_factory=lambda: PreprocessSpec(input_size=64))
    bounds: Bounds = field(default_factory=Bounds)
    header_must_answer: bool = True
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        self.by_name = {s.name: s.data for s in self.seeds}
        self.spool = Spool(self.spool_dir, min_free_bytes=0)
        self.spool.ensure_layout()
        self.rules = EligibilityConfig(max_pixels=self.bounds.max_pixels)

    def warm_up(self) -> dict[str, Result]:
        """Run every seed unmutated (loads the decoders, so their code is not counted as an input's
        memory) and check each is analysed or skipped, not failed. Returns the results by seed."""
        results = {}
        for s in self.seeds:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = run_one(s.data, self.spool, self.spec, self.rules, self.bounds)
            if result.outcome not in ("ok", "skipped"):
                raise Escape(f"seed {s.name} is not a valid input: {result.outcome} ({result.reason})")
            results[s.name] = result
        return results

    def input_of(self, case: Case) -> bytes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns while it writes the lies
            return apply(self.by_name[case.seed], case.ops)

    def property(self, case: Case) -> None:
        """Run ``case``; raises :class:`Escape` (carrying the case) when an invariant breaks."""
        data = self.input_of(case)
        try:
            with warnings.catch_warnings(), data_limit(self.bounds.address_space):
                warnings.simplefilter("ignore")  # pydicom warns about every odd value it reads
                result = run_one(
                    data,
                    self.spool,
                    self.spec,
                    self.rules,
                    self.bounds,
                    header_must_answer=self.header_must_answer,
                )
        except Escape as exc:
            exc.case = case
            raise
        self.stats.add(result)


def fuzz_settings(examples: int, *, derandomize: bool) -> settings:
    return settings(
        max_examples=examples,
        derandomize=derandomize,
        database=None,
        deadline=None,  # time is bounded per input by Bounds.seconds, not by hypothesis
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        print_blob=False,
    )


def run_batches(
    harness: Harness, strategy: st.SearchStrategy[Case], seconds: float, batch: int, first_seed: int
) -> int:
    """Hypothesis runs of ``batch`` examples each, with seeds ``first_seed``, +1, ... until time is up."""
    deadline = time.monotonic() + seconds
    k = first_seed
    while time.monotonic() < deadline:

        @seed(k)
        @fuzz_settings(batch, derandomize=False)
        @given(case=strategy)
        def prop(case: Case) -> None:
            harness.property(case)

        try:
            prop()
        except (Escape, BaseExceptionGroup) as exc:
            found = list(exc.exceptions) if isinstance(exc, BaseExceptionGroup) else [exc]
            for escape in found:
                case = getattr(escape, "case", None)
                harness.stats.escapes.append(f"{escape} <- {case}")
                print(f"ESCAPE (hypothesis seed {k}): {escape} <- {case}", file=sys.stderr)
        k += 1
    return k - first_seed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz the path from received bytes to model input.")
    parser.add_argument("--seconds", type=float, default=300.0, help="time budget (default 300)")
    parser.add_argument("--quick", action="store_true", help="30 seconds, one full-size seed")
    parser.add_argument("--seed", type=int, default=0, help="first hypothesis seed (default 0)")
    parser.add_argument("--batch", type=int, default=100, help="examples per hypothesis run (default 100)")
    parser.add_argument("--max-bomb-mib", type=int, default=64, help="largest deflate bomb, inflated MiB")
    args = parser.parse_args(argv)
    seconds = 30.0 if args.quick else args.seconds
    full = ("RG1_UNCR",) if args.quick else ("RG1_UNCR", "RG1_J2KI", "RG1_J2KR", "RG3_J2KI")
    with tempfile.TemporaryDirectory(prefix="screener-fuzz-") as tmp:
        seeds = seed_corpus(full_size=full)
        harness = Harness(seeds, Path(tmp) / "spool")
        print(f"seeds: {', '.join(f'{s.name} ({len(s.data)} B)' for s in seeds)}")
        harness.warm_up()
        strategy = cases(seeds, Scope(max_bomb_mib=args.max_bomb_mib))
        started = time.perf_counter()
        runs = run_batches(harness, strategy, seconds, args.batch, args.seed)
        wall = time.perf_counter() - started
    stats = harness.stats
    rate = stats.examples / wall
    print(f"hypothesis runs: {runs}; examples: {stats.examples} in {wall:.1f} s = {rate:.1f} examples/s")
    print(f"outcomes: {dict(sorted(stats.outcomes.items()))}")
    if stats.full_seconds:
        median_ms = statistics.median(stats.full_seconds) * 1000
        print(
            f"per input: median {median_ms:.1f} ms, max {max(stats.full_seconds) * 1000:.1f} ms; "
            f"peak memory above the level before the input: max {stats.peak_bytes / MIB:.1f} MiB"
        )
    header_rate = len(stats.header_seconds) / max(sum(stats.header_seconds), 1e-9)
    full_rate = len(stats.full_seconds) / max(sum(stats.full_seconds), 1e-9)
    print(f"baseline, header-only path (spool write + read_header): {header_rate:.1f} inputs/s")
    print(f"full path (+ eligibility, decode, preprocess): {full_rate:.1f} inputs/s")
    print(f"escapes: {len(stats.escapes)}")
    for text in stats.escapes:
        print(f"  {text}")
    print(f"ratio={full_rate / header_rate if stats.examples else 0.0:.4f}")
    return 1 if stats.escapes else 0


if __name__ == "__main__":
    sys.exit(main())

"""Reading received Part 10 files at a bounded cost, whatever their bytes claim.

pydicom inflates a Deflated Explicit VR Little Endian data set (PS3.5 A.5) whole, with no limit, before it
parses a single element: a few hundred KiB on the wire can become gigabytes in memory (a "deflate bomb").
Here the deflated stream is inflated step by step up to a cap, and parsed from that buffer instead.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pydicom
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from screener.core.errors import ImageTooLargeError

# Inflated bytes allowed for the header elements we look up (group 0020 and 0028 come early): real
# headers are kilobytes; even a large private block in groups 0009/0019 stays far below this.
HEADER_INFLATE_CAP = 4 * 1024 * 1024
_CHUNK = 1024 * 1024


def _meta_end(fh: io.BufferedReader) -> int:
    """Offset of the first data set byte: after the preamble, ``DICM`` and group 0002 (PS3.10 7.1)."""
    fh.seek(0)
    head = fh.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise ValueError("not a Part 10 file (no DICM prefix at offset 128)")
    element = fh.read(12)
    # (0002,0000) File Meta Information Group Length, explicit VR "UL": tag, VR, 2-byte length, 4-byte value.
    if len(element) < 12 or element[:6] != b"\x02\x00\x00\x00UL":
        raise ValueError("file meta information does not start with its group length (0002,0000)")
    return 132 + 12 + int.from_bytes(element[8:12], "little")


def _inflate(path: Path, cap: int, *, prefix_only: bool) -> bytearray:
    """The inflated data set of a deflated Part 10 file, at most ``cap`` bytes of it.

    With ``prefix_only`` the first ``cap`` bytes are enough (a header); otherwise more than ``cap`` raises
    ImageTooLargeError before anything beyond the cap is inflated.
    """
    with path.open("rb") as fh:
        fh.seek(_meta_end(fh))
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        out = bytearray()
        while not inflater.eof and len(out) <= cap:
            chunk = inflater.unconsumed_tail or fh.read(_CHUNK)
            if not chunk:
                break  # truncated stream: parse what there is; pydicom names what is missing
            out += inflater.decompress(chunk, cap + 1 - len(out))
        if len(out) <= cap:
            return out
        if prefix_only:
            del out[cap:]
            return out
        raise ImageTooLargeError(
            f"deflated data set inflates to more than {cap} bytes (a deflate bomb, or pixels beyond "
            "eligibility.max_pixels); refused without inflating further"
        )


def is_deflated(path: Path) -> bool:
    """Whether the file's transfer syntax is Deflated Explicit VR Little Endian (raises when unreadable)."""
    meta = read_file_meta_info(path)
    return str(meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian


def read_header_elements(path: Path, tags: list[int]) -> Dataset:
    """The data set's elements ``tags`` (and those before them), never the pixel data.

    Deflated files are inflated only up to :data:`HEADER_INFLATE_CAP`. Raises whatever pydicom raises for a
    malformed file.
    """
    last = max(tags)

    def past(tag: int, vr: str | None, length: int) -> bool:
        return tag > last

    if not is_deflated(path):
        return dcmread(path, stop_before_pixels=True, specific_tags=list(tags))
    inflated = _inflate(path, HEADER_INFLATE_CAP, prefix_only=True)
    return read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True, stop_when=past)


def read_bounded(path: Path, max_pixels: int) -> Dataset:
    """The whole data set (pixel data still encoded), with deflated files inflated at a bounded cost.

    A deflated file may inflate to its declared pixel bytes (Rows x Columns x Samples x Frames x Bits
    Allocated / 8, at most ``max_pixels`` pixels of 64 bits) plus :data:`HEADER_INFLATE_CAP`; anything
    bigger is refused. Raises pydicom's errors for malformed files and ImageTooLargeError past the cap.
    """
    if not is_deflated(path):
        return dcmread(path)
    header = read_header_elements(path, [0x00280002, 0x00280008, 0x00280010, 0x00280011, 0x00280100])
    try:
        rows = int(header.get("Rows", 0) or 0)
        columns = int(header.get("Columns", 0) or 0)
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        frames = int(str(header.get("NumberOfFrames", 1) or 1))
        bits = int(header.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError):
        rows = columns = 0
        samples = frames = 1
        bits = 16
    pixels = min(max(rows * columns * samples * frames, 0), max_pixels)
    cap = pixels * max(min(bits, 64), 1) // 8 + HEADER_INFLATE_CAP
    inflated = _inflate(path, cap, prefix_only=False)
    ds = read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    ds.file_meta = read_file_meta_info(path)
    ds.set_original_encoding(False, True)
    return ds


def accession_of(path: Path) -> str | None:
    """The Accession Number of a spooled file's header, read without pixel data; None if unreadable.
    Used only to match labels; never logged or shown."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["AccessionNumber"], force=True)
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError, TypeError):
        return None
    value = ds.get("AccessionNumber")
    return (str(value).strip() or None) if value is not None else None

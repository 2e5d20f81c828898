"""Benchmark: DICOM file -> model input (screener.imaging.pixels.preprocess_file), full vs reduced JPEG 2000.

Builds 15-bit MONOCHROME1 CRs of 2,000 x 2,000 and 2,500 x 2,500 pixels from the real pixels of
pydicom-data's RG1_UNCR (centre square crop, resized), stored uncompressed (2,000 only) and as lossless
JPEG 2000, then reports, with the JPEG 2000 files decoded both in full and at reduced resolution
(``inference.reduced_decode``: the coarsest wavelet level that keeps what a 224 px model needs):

- ms per image, single process: median of ``--runs`` timed calls per case, after one warm-up call;
- throughput (images/s) of each case (``--images`` of it) run one by one in this process, and through a
  ``multiprocessing`` pool of ``--workers`` processes (started and warmed before timing; each pool worker
  limits OpenCV to one thread, so the pool does not oversubscribe cores), as the worker runs it.

The line before last is the pool / single-process throughput over all cases. The last line is
``ratio=<full / reduced>``: median ms per JPEG 2000 image decoded in full over decoded reduced, both
sizes summed, single process.

    .venv/bin/python bench/preprocess.py            # defaults
    .venv/bin/python bench/preprocess.py --quick    # well under 2 minutes
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import cv2
import data_store
import numpy as np
import pydicom
from pydicom.uid import JPEG2000Lossless, generate_uid

from screener.core.config import EligibilityConfig
from screener.imaging.pixels import PreprocessSpec, preprocess_file

SIZES = (2000, 2500)
T = TypeVar("T")


def progress(items: Iterable[T], total: int, label: str) -> Iterator[T]:
    """Yield ``items``, drawing a one-line bar on stderr (only when stderr is a terminal)."""
    show = sys.stderr.isatty()
    for done, item in enumerate(items, start=1):
        yield item
        if show:
            filled = round(30 * done / total)
            sys.stderr.write(f"\r{label:<28} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
            sys.stderr.flush()
    if show:
        sys.stderr.write("\n")


def make_inputs(folder: Path) -> dict[str, Path]:
    """Write the uncompressed and JPEG 2000 test files; returns them by case name (without decode mode).

    Raises:
        RuntimeError: pylibjpeg-openjpeg cannot encode JPEG 2000 here.
    """
    source = pydicom.dcmread(Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm")
    pixels = source.pixel_array
    side = min(pixels.shape)
    top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
    square = np.ascontiguousarray(pixels[top : top + side, left : left + side])
    paths: dict[str, Path] = {}
    for size in SIZES:
        resized = cv2.resize(square, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.uint16)
        resized &= np.uint16(2**source.BitsStored - 1)
        ds = source.copy()
        ds.Rows, ds.Columns = size, size
        ds.PixelData = resized.tobytes()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if size == SIZES[0]:
            paths[f"uncompressed {size}x{size}"] = folder / f"uncompressed-{size}.dcm"
            ds.save_as(paths[f"uncompressed {size}x{size}"], enforce_file_format=True)
        j2k = ds.copy()
        try:
            j2k.compress(JPEG2000Lossless, resized, encoding_plugin="pylibjpeg")
        except (RuntimeError, ValueError, ImportError) as exc:
            raise RuntimeError(f"cannot encode JPEG 2000 with pylibjpeg-openjpeg: {exc}") from exc
        paths[f"j2k lossless {size}x{size}"] = folder / f"j2k-{size}.dcm"
        j2k.save_as(paths[f"j2k lossless {size}x{size}"], enforce_file_format=True)
    return paths


def one_thread() -> None:
    """Pool initializer: each worker process gets one core's worth of OpenCV threads."""
    cv2.setNumThreads(1)


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs (under 2 minutes)")
    parser.add_argument("--runs", type=int, help="timed single-process calls per case (default 9, quick 3)")
    parser.add_argument(
        "--images", type=int, help="images of each case in the throughput workload (default 12, quick 4)"
    )
    parser.add_argument("--workers", type=int, default=2, help="pool processes (default 2)")
    args = parser.parse_args(argv)
    runs = args.runs or (3 if args.quick else 9)
    images = args.images or (4 if args.quick else 12)

    spec = PreprocessSpec()
    max_pixels = EligibilityConfig().max_pixels
    full = functools.partial(preprocess_file, spec=spec, max_pixels=max_pixels, reduced_decode=False)
    reduced = functools.partial(preprocess_file, spec=spec, max_pixels=max_pixels, reduced_decode=True)
    print(f"cpus={os.cpu_count()} opencv_threads={cv2.getNumThreads()} workers={args.workers} runs={runs}")

    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        files = make_inputs(Path(tmp))
        print("JPEG 2000: encoded here with pylibjpeg-openjpeg (lossless, 5 decomposition levels)")
        # case -> (file, work); a JPEG 2000 file is timed decoded in full and reduced.
        cases: dict[str, tuple[Path, Callable[[Path], object]]] = {}
        for name, path in files.items():
            cases[f"{name} full" if name.startswith("j2k") else name] = (path, full)
            if name.startswith("j2k"):
                cases[f"{name} reduced"] = (path, reduced)

        median_ms: dict[str, float] = {}
        for case, (path, work) in cases.items():
            work(path)  # warm-up: imports, plugin discovery, page cache
            seconds = [timed(functools.partial(work, path)) for _ in progress(range(runs), runs, case)]
            median_ms[case] = statistics.median(seconds) * 1000
            print(f"{case:<34} {median_ms[case]:9.1f} ms/image (median of {runs})")

        # Throughput: each case's workload one by one here, then through the pool.
        single_s: dict[str, float] = {}
        pooled_s: dict[str, float] = {}
        for case, (path, work) in cases.items():
            batch = progress([path] * images, images, f"single: {case}")
            single_s[case] = timed(functools.partial(list, map(work, batch)))
        context = multiprocessing.get_context("spawn")  # what a daemon with threads must use
        with context.Pool(args.workers, initializer=one_thread) as pool:
            for path, work in cases.values():  # start + warm every worker for every case
                list(pool.map(work, [path] * args.workers, chunksize=1))
            for case, (path, work) in cases.items():
                results = pool.imap_unordered(work, [path] * images, chunksize=1)
                pooled_s[case] = timed(functools.partial(list, progress(results, images, f"pool: {case}")))

    for case in cases:
        print(
            f"{case:<34} single {images / single_s[case]:6.2f} images/s, "
            f"pool of {args.workers} {images / pooled_s[case]:6.2f} images/s "
            f"(x{single_s[case] / pooled_s[case]:.2f}), pool {pooled_s[case] / images * 1000:7.1f} ms/image"
        )
    for size in SIZES:
        name = f"j2k lossless {size}x{size}"
        print(
            f"{name}: reduced decode x{median_ms[f'{name} full'] / median_ms[f'{name} reduced']:.1f} "
            f"single process, x{pooled_s[f'{name} full'] / pooled_s[f'{name} reduced']:.1f} in the pool"
        )
    print(f"pool/single throughput ratio: {sum(single_s.values()) / sum(pooled_s.values()):.3f} (all cases)")
    j2k_full = sum(ms for case, ms in median_ms.items() if case.endswith(" full"))
    j2k_reduced = sum(ms for case, ms in median_ms.items() if case.endswith(" reduced"))
    print(f"ratio={j2k_full / j2k_reduced:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: DICOM file -> model input (screener.imaging.preprocess_file), one process and a pool.

Builds a 2,000 x 2,000 15-bit MONOCHROME1 CR from the real pixels of pydicom-data's RG1_UNCR (centre
square crop, resized), stored uncompressed and as lossless JPEG 2000, then reports:

- ms per image, single process: median of ``--runs`` timed calls per case, after one warm-up call;
- throughput (images/s) of the same mixed workload (both cases, ``--images`` of each) run one by one in
  this process, and through a ``multiprocessing`` pool of ``--workers`` processes (started and warmed
  before timing; each pool worker limits OpenCV to one thread, so the pool does not oversubscribe cores).

The last line is ``ratio=<pool throughput / single-process throughput>`` on that workload.

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

from screener.config import EligibilityConfig
from screener.imaging import PreprocessSpec, preprocess_file

SIZE = 2000
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


def make_inputs(folder: Path) -> tuple[dict[str, Path], str]:
    """Write the uncompressed and JPEG 2000 test files; returns them and a note on how J2K was made."""
    source = pydicom.dcmread(Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm")
    pixels = source.pixel_array
    side = min(pixels.shape)
    top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
    square = np.ascontiguousarray(pixels[top : top + side, left : left + side])
    resized = cv2.resize(square, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR).astype(np.uint16)
    resized &= np.uint16(2**source.BitsStored - 1)

    ds = source.copy()
    ds.Rows, ds.Columns = SIZE, SIZE
    ds.PixelData = resized.tobytes()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    paths = {f"uncompressed {SIZE}x{SIZE}": folder / "uncompressed.dcm"}
    ds.save_as(paths[f"uncompressed {SIZE}x{SIZE}"], enforce_file_format=True)

    j2k = ds.copy()
    try:
        j2k.compress(JPEG2000Lossless, resized, encoding_plugin="pylibjpeg")
    except (RuntimeError, ValueError, ImportError) as exc:
        note = f"JPEG 2000: RG1_J2KR as-is (1955x1841), encoder unavailable: {exc}"
        paths["jpeg2000 lossless 1955x1841"] = Path(data_store.__file__).parent / "data" / "RG1_J2KR.dcm"
        return paths, note
    paths[f"jpeg2000 lossless {SIZE}x{SIZE}"] = folder / "j2k.dcm"
    j2k.save_as(paths[f"jpeg2000 lossless {SIZE}x{SIZE}"], enforce_file_format=True)
    return paths, "JPEG 2000: encoded here with pylibjpeg-openjpeg (lossless)"


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
    work = functools.partial(preprocess_file, spec=spec, max_pixels=max_pixels)
    print(f"cpus={os.cpu_count()} opencv_threads={cv2.getNumThreads()} workers={args.workers} runs={runs}")

    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        paths, note = make_inputs(Path(tmp))
        print(note)

        for case, path in paths.items():
            work(path)  # warm-up: imports, plugin discovery, page cache
            seconds = [timed(functools.partial(work, path)) for _ in progress(range(runs), runs, case)]
            print(f"{case:<30} {statistics.median(seconds) * 1000:9.1f} ms/image (median of {runs})")

        # Throughput: each case's workload one by one here, then through the pool; totals over both.
        single_s: dict[str, float] = {}
        pooled_s: dict[str, float] = {}
        for case, path in paths.items():
            single_s[case] = timed(
                functools.partial(list, map(work, progress([path] * images, images, f"single: {case}")))
            )
        context = multiprocessing.get_context("spawn")  # what a daemon with threads must use
        with context.Pool(args.workers, initializer=one_thread) as pool:
            list(pool.map(work, list(paths.values()) * args.workers, chunksize=1))  # start + warm workers
            for case, path in paths.items():
                results = pool.imap_unordered(work, [path] * images, chunksize=1)
                pooled_s[case] = timed(functools.partial(list, progress(results, images, f"pool: {case}")))

    for case in paths:
        print(
            f"{case:<30} single {images / single_s[case]:6.2f} images/s, "
            f"pool of {args.workers} {images / pooled_s[case]:6.2f} images/s "
            f"(x{single_s[case] / pooled_s[case]:.2f})"
        )
    total = images * len(paths)
    single = total / sum(single_s.values())
    pooled = total / sum(pooled_s.values())
    print(f"throughput single process: {single:.2f} images/s ({total} images, both cases)")
    print(f"throughput pool of {args.workers}:      {pooled:.2f} images/s")
    print(f"ratio={pooled / single:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

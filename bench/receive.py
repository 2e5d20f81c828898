"""Receive throughput: DCMTK ``storescu`` into ``storescp`` versus into ``screener serve --role listener``.

Two data sets are generated once into a temporary folder from the real RG1_UNCR chest radiograph of
pydicom-data: large (2,500 x 2,500 px, 16-bit, uncompressed DX, about 12.5 MB each) and small (512 x 512,
about 0.5 MB each), every instance with its own SOP Instance UID. For each set the same ``storescu``
command (one association) sends the whole folder alternately to (a) ``storescp`` writing files to a
temporary folder and (b) a fresh ``screener serve --role listener`` (SQLite database and spool in a
temporary workdir, metrics endpoint off), a -> b -> a -> b ..., and the medians are compared.

The two receivers do not do the same work: the screener answers 0x0000 only after the file and its
folder are fsynced and the database row is committed (DESIGN "No acknowledged instance is ever lost");
storescp writes the file without fsync. The targets are screener/DCMTK >= 0.8 on the large set and
>= 0.5 on the small set. The last line is ``ratio=<min of the two sets' screener/DCMTK ratios>``.

    python bench/receive.py            # 200 large + 1,000 small instances, 3 repetitions
    python bench/receive.py --quick    # 30 large + 200 small, 3 repetitions (under 2 minutes)
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian

from screener.core.progress import Progress

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CALLED = "CXRSCREENER"
SCREENER = Path(sys.executable).with_name("screener")
# DCMTK's dcmnet reads TCP_NODELAY from the environment at run time ("disabling Nagle algorithm as
# requested at runtime"); without it DCMTK leaves Nagle on and small instances stall ~40 ms each.
DCMTK_ENV = {"TCP_NODELAY": "1"}
STORESCP_PDU = "131072"  # storescp's largest receive PDU; the screener's is unlimited (max_pdu_size = 0)


@dataclass(frozen=True)
class DataSet:
    name: str
    folder: Path
    count: int
    total_bytes: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rg1_pixels(size: int) -> np.ndarray:
    """RG1_UNCR resampled (nearest neighbour) to ``size`` x ``size``, scaled to 12 bits stored."""
    import data_store  # the pydicom-data package

    ds = dcmread(Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm")
    arr = ds.pixel_array.astype(np.float32)
    rows = (np.arange(size) * arr.shape[0] // size).astype(np.intp)
    cols = (np.arange(size) * arr.shape[1] // size).astype(np.intp)
    out = arr[rows][:, cols]
    return (out / out.max() * 4095).astype(np.uint16)


def _fixed_uid(token: str, n: int) -> str:
    return f"{PYDICOM_ROOT_UID}{token}.{n:07d}"


def generate(folder: Path, name: str, count: int, size: int) -> DataSet:
    """Write ``count`` DX instances of ``size`` px; the template is encoded once and its UIDs patched."""
    folder.mkdir(parents=True)
    token = str(secrets.randbelow(9 * 10**9) + 10**9)
    sop_ph, study_ph, series_ph = (_fixed_uid(token, 9_000_000 + k) for k in range(3))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = sop_ph
    ds.SOPClassUID, ds.SOPInstanceUID = DX, sop_ph
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_ph, series_ph
    ds.PatientName, ds.PatientID, ds.Modality = "Bench^Anon", "BENCH", "DX"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    pixels = rg1_pixels(size)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    template = folder / "template.tmp"
    ds.save_as(template, enforce_file_format=True)
    data = template.read_bytes()
    template.unlink()
    assert data.count(sop_ph.encode()) == 2 and data.count(study_ph.encode()) == 1
    total = 0
    for i in range(count):
        blob = (
            data.replace(sop_ph.encode(), _fixed_uid(token, i).encode())
            .replace(study_ph.encode(), _fixed_uid(token, 1_000_000 + i // 2).encode())  # 2-image studies
            .replace(series_ph.encode(), _fixed_uid(token, 2_000_000 + i // 2).encode())
        )
        (folder / f"{i:05d}.dcm").write_bytes(blob)
        total += len(blob)
    return DataSet(name, folder, count, total)


def storescu(port: int, folder: Path) -> float:
    """Send every file of ``folder`` over one association; returns the wall-clock seconds."""
    cmd = ["storescu", "-aet", "BENCHSCU", "-aec", CALLED, "+sd", "127.0.0.1", str(port), str(folder)]
    started = time.perf_counter()
    out = subprocess.run(cmd, env={**os.environ, **DCMTK_ENV}, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"storescu failed ({out.returncode}): {out.stderr[-2000:]}")
    return elapsed


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} not listening on port {port} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def run_dcmtk(data: DataSet, scratch: Path) -> float:
    out_dir = scratch / "storescp-out"
    out_dir.mkdir()
    port = free_port()
    log = (scratch / "storescp.log").open("wb")
    proc = subprocess.Popen(
        ["storescp", "-aet", CALLED, "-pdu", STORESCP_PDU, "-od", str(out_dir), str(port)],
        env={**os.environ, **DCMTK_ENV},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, proc, "storescp")
        elapsed = storescu(port, data.folder)
    finally:
        stop(proc)
        log.close()
    received = sum(1 for _ in out_dir.iterdir())
    shutil.rmtree(out_dir)
    if received != data.count:
        raise SystemExit(f"storescp wrote {received} files, expected {data.count}")
    return elapsed


def run_screener(data: DataSet, scratch: Path) -> float:
    workdir = scratch / "screener"
    workdir.mkdir()
    port = free_port()
    db = workdir / "screener.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER")}
    env.update(
        {
            "SCREENER__LISTENER__PORT": str(port),
            "SCREENER__LOGGING__FORMAT": "json",
            "SCREENER__STORAGE__SPOOL_DIR": str(workdir / "spool"),
            "SCREENER__DATABASE__URL": f"sqlite:///{db}",
            "SCREENER__METRICS__PORT": "0",
        }
    )
    log_path = workdir / "serve.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [str(SCREENER), "serve", "--role", "listener"],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while '"serve.ready"' not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"screener serve did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        elapsed = storescu(port, data.folder)
    finally:
        stop(proc)
        log.close()
    with sqlite3.connect(db) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM instances").fetchone()
    shutil.rmtree(workdir)
    if rows != data.count:
        raise SystemExit(f"the screener committed {rows} rows, expected {data.count}")
    return elapsed


def durable_floor(data: DataSet, scratch: Path, limit: int = 200) -> float:
    """Seconds per instance that durability alone costs here: the work the screener adds to storescp's.

    For up to ``limit`` files of the set: write to a temporary name, fsync, rename into place, fsync the
    folder, then insert one row into SQLite (WAL, synchronous=FULL, as the screener runs it) and commit.
    No DICOM, no network: a floor no receiver with the same guarantee can go below on this disk.
    """
    files = sorted(data.folder.iterdir())[:limit]
    spool = scratch / "spool"
    spool.mkdir()
    db = sqlite3.connect(scratch / "floor.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT UNIQUE, size INTEGER)")
    payloads = [f.read_bytes() for f in files]
    dir_fd = os.open(spool, os.O_RDONLY)
    started = time.perf_counter()
    try:
        for i, payload in enumerate(payloads):
            tmp = spool / f".tmp-{i}"
            with tmp.open("wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.rename(spool / f"{i}.dcm")
            os.fsync(dir_fd)
            db.execute("BEGIN")
            db.execute("INSERT INTO t (name, size) VALUES (?, ?)", (f"{i}.dcm", len(payload)))
            db.execute("COMMIT")
    finally:
        os.close(dir_fd)
        db.close()
    return (time.perf_counter() - started) / len(payloads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30 large + 200 small instances (under 2 minutes)")
    ap.add_argument("--large", type=int, help="number of ~12.5 MB instances (default 200; 30 with --quick)")
    ap.add_argument("--small", type=int, help="number of ~0.5 MB instances (default 1000; 200 with --quick)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of a -> b per set (default 3)")
    ap.add_argument("--workdir", type=Path, help="folder for data and receivers (default: a temp folder)")
    args = ap.parse_args()
    n_large = args.large if args.large is not None else (30 if args.quick else 200)
    n_small = args.small if args.small is not None else (200 if args.quick else 1000)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install DCMTK (Debian package dcmtk)")

    root = Path(tempfile.mkdtemp(prefix="bench-receive-", dir=args.workdir))
    try:
        started = time.perf_counter()
        sizes = (("large", n_large, 2500), ("small", n_small, 512))
        sets = [generate(root / name, name, n, side) for name, n, side in sizes if n > 0]
        os.sync()  # settle the generated files so their write-back does not land in the first run
        print(f"# data: generated in {time.perf_counter() - started:.1f}s under {root}")
        for d in sets:
            print(f"# {d.name}: {d.count} DX instances, {d.total_bytes / d.count / 1e6:.2f} MB each")
        print(
            "# TCP_NODELAY: storescu and storescp via environment TCP_NODELAY=1 (read by DCMTK "
            "dcmnet at run time); the screener sets it on every accepted socket"
        )
        print(f"# a = storescp -pdu {STORESCP_PDU} (file format, no fsync)")
        print(
            "# b = screener serve --role listener (SQLite, file + folder fsync and row commit per instance)"
        )
        print(f"# one storescu association per run, a -> b alternated {args.reps} times; medians")
        print("# ratio = min(large ratio, small ratio), screener/DCMTK instances per second")

        times: dict[tuple[str, str], list[float]] = {}
        with Progress(len(sets) * args.reps * 2) as bar:
            for d in sets:
                for rep in range(args.reps):
                    for who, run in (("dcmtk", run_dcmtk), ("screener", run_screener)):
                        scratch = root / f"run-{d.name}-{who}-{rep}"
                        scratch.mkdir()
                        times.setdefault((d.name, who), []).append(run(d, scratch))
                        shutil.rmtree(scratch)
                        bar.step(f"{d.name} {who} #{rep + 1}")

        ratios = []
        for d in sets:
            med = {who: statistics.median(times[(d.name, who)]) for who in ("dcmtk", "screener")}
            for who in ("dcmtk", "screener"):
                runs = ", ".join(f"{t:.2f}s" for t in times[(d.name, who)])
                mbs = d.total_bytes / med[who] / 1e6
                print(
                    f"{d.name:5s} {who:8s} {d.count / med[who]:8.1f} inst/s {mbs:8.1f} MB/s  (runs: {runs})"
                )
            ratio = med["dcmtk"] / med["screener"]
            ratios.append(ratio)
            target = 0.8 if d.name == "large" else 0.5
            print(f"{d.name:5s} ratio screener/DCMTK = {ratio:.2f} (target >= {target})")
            scratch = root / f"floor-{d.name}"
            scratch.mkdir()
            floor = durable_floor(d, scratch)
            shutil.rmtree(scratch)
            durable_dcmtk = d.count / (med["dcmtk"] + floor * d.count)
            print(
                f"{d.name:5s} durability floor (fsync file + folder + SQLite commit, no DICOM): "
                f"{floor * 1000:.2f} ms/instance; DCMTK plus that floor would reach "
                f"{durable_dcmtk:.1f} inst/s; screener/that = {d.count / med['screener'] / durable_dcmtk:.2f}"
            )
        print(f"ratio={min(ratios):.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

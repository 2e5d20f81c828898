"""End-to-end latency: from the C-STORE response to the prediction row, through a real `screener serve`.

Starts `screener serve` (SQLite, local spool, the configured backend) with a model directory, sends
real chest radiographs (cxr3 PNGs wrapped as DX DICOM) one association at a time at a steady rate,
and reads back each prediction's ``created_at``. Baseline, measured in the same run: the engine alone
on one preprocessed image (no network, no database, no decoding), which is what each instance costs
at least when they arrive one by one. The last line is ``ratio=<p50 end-to-end latency / engine-only
latency of one image>``: the pipeline's overhead factor (1.0 would mean no overhead at all).

    python bench/e2e.py --model var/models/fused-random        # 100 instances
    python bench/e2e.py --model DIR --quick                    # 20 instances
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import create_engine, text

DX = "1.2.840.10008.5.1.4.1.1.1.1"


def progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def wrap(png: Path, study: str) -> Dataset:
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Bench^Anon", "BENCH", "DX"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_baseline(model: Path, pngs: list[Path], batch: int, backend: str) -> float:
    """Median seconds of one engine call on ``batch`` preprocessed images (engine only, after warm-up)."""
    from screener.engine import load_engine
    from screener.imaging import preprocess_file

    engine, loaded = load_engine(model, backend)
    x = np.stack([preprocess_file(p, loaded.card.preprocessing, 100_000_000) for p in pngs[:batch]])
    engine.infer(x)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        engine.infer(x)
        times.append(time.perf_counter() - t)
    engine.close()
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="model directory (trainer init-model / export)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="20 instances")
    ap.add_argument("--rate", type=float, default=2.0, help="instances per second sent")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--cxr3", default=os.environ.get("CXR3_DIR"), help="cxr3 folder (default: $CXR3_DIR)")
    args = ap.parse_args()
    if not args.cxr3:
        sys.exit("set CXR3_DIR (or pass --cxr3) to the folder of the labelled chest X-rays")
    args.cxr3 = Path(args.cxr3)
    n = 20 if args.quick else args.n
    pngs = sorted((args.cxr3 / "normal").glob("*.png"))[:n] + sorted((args.cxr3 / "covid19").glob("*.png"))
    pngs = pngs[:n]
    if len(pngs) < n:
        sys.exit(f"need {n} PNGs under {args.cxr3}; set CXR3_DIR")
    screener = Path(sys.executable).with_name("screener")
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER")}
    env.update(
        {
            "SCREENER__LISTENER__PORT": str(port),
            "SCREENER__DATABASE__URL": f"sqlite:///{work / 'db.sqlite'}",
            "SCREENER__STORAGE__SPOOL_DIR": str(work / "spool"),
            "SCREENER__STORAGE__MIN_FREE_BYTES": "0",
            "SCREENER__INFERENCE__BACKEND": args.backend,
            "SCREENER__INFERENCE__MAX_BATCH": str(args.max_batch),
            "SCREENER__INFERENCE__MAX_WAIT_MS": "50",
            "SCREENER__INFERENCE__POLL_SECONDS": "0.05",
            "SCREENER__LOGGING__FORMAT": "json",
        }
    )
    subprocess.run(
        [str(screener), "models", "register", str(args.model), "--activate"],
        env=env,
        check=True,
        cwd=work,
        capture_output=True,
    )
    log = (work / "serve.log").open("wb")
    proc = subprocess.Popen([str(screener), "serve"], env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while b"model.loaded" not in (work / "serve.log").read_bytes():
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit(f"serve did not load the model:\n{(work / 'serve.log').read_text()}")
            time.sleep(0.1)
        study = generate_uid()
        datasets = [wrap(p, study) for p in pngs]
        acked: dict[str, float] = {}
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(DX, ExplicitVRLittleEndian)
        for i, ds in enumerate(datasets):
            start = time.monotonic()
            assoc = ae.associate("127.0.0.1", port, ae_title="CXRSCREENER")
            rsp = assoc.send_c_store(ds)
            acked[str(ds.SOPInstanceUID)] = datetime.now(UTC).timestamp()
            assoc.release()
            if int(rsp.Status) != 0:
                sys.exit(f"C-STORE answered 0x{int(rsp.Status):04X}")
            progress(i + 1, n, "sending ")
            time.sleep(max(0.0, 1 / args.rate - (time.monotonic() - start)))
        db = create_engine(f"sqlite:///{work / 'db.sqlite'}")
        deadline = time.monotonic() + 600
        while True:
            with db.connect() as conn:
                rows = list(
                    conn.execute(
                        text(
                            "SELECT i.sop_instance_uid, p.created_at FROM predictions p "
                            "JOIN instances i ON i.id = p.instance_id"
                        )
                    )
                )
            progress(len(rows), n, "classified")
            if len(rows) >= n or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    latencies = []
    for uid, created in rows:
        created_dt = datetime.fromisoformat(str(created)).replace(tzinfo=UTC)
        latencies.append(created_dt.timestamp() - acked[uid])
    lat = np.array(latencies)
    baseline = engine_baseline(args.model, pngs, 1, args.backend)
    p50, p95 = float(np.percentile(lat, 50)), float(np.percentile(lat, 95))
    print(f"instances: {len(lat)} at {args.rate}/s, backend {args.backend}, max_batch {args.max_batch}")
    print(
        f"C-STORE response -> prediction row: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
        f"max {lat.max() * 1000:.0f} ms"
    )
    print(f"baseline (engine only, one image, same run): {baseline * 1000:.0f} ms")
    print(f"ratio={p50 / baseline:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

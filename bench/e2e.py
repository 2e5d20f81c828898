"""End to end through a real `screener serve`: C-STORE response -> prediction row -> SR delivered.

Starts `screener serve` (role all, SQLite, local spool) with a PACS destination (a pynetdicom storage
SCP in this process that accepts our SRs), pushes real-sized chest radiographs with DCMTK (``storescu``
for uncompressed files, ``dcmsend`` for JPEG 2000, which it sends in its own transfer syntax; pynetdicom
where DCMTK is not installed), and for
every instance measures, from the moment the sender logged its C-STORE response:

- the prediction row (``predictions.created_at``), and
- the SR delivered to the PACS (``deliveries.sent_at`` of the SR of its study; each instance is its
  own study, so one SR per instance).

It reports p50/p95/p99 of both and the sustained rate: instances / (last prediction row - start of
sending), and the same to the last SR delivered.

Two configurations, run in the same invocation and alternated when ``--rounds`` > 1:

- fast: ``inference.reduced_decode = true``, ``inference.precision = auto`` (INT8 when the model card
  holds a passing INT8 graph);
- baseline: ``inference.reduced_decode = false`` (full-resolution decoding), ``inference.precision = fp32``.

The last line is ``ratio=<fast / baseline sustained instances/s to the prediction row>`` (median over
rounds); with ``--mode fast`` or ``--mode baseline`` only that configuration runs and the ratio is
``nan``.

Data (``--data``), each instance re-UID'd (new study, series and SOP Instance UIDs):

- ``uncompressed`` (default): pydicom-data RG1_UNCR, a 1955 x 1841 15-bit CR chest PA, 7.2 MB;
- ``j2k-lossless``: RG1_J2KR, the same image as lossless JPEG 2000, 4.3 MB;
- ``cxr3``: cxr3 PNGs ($CXR3_DIR or --cxr3) wrapped as DX (12 bits stored; 256 px, not real-sized).

    python bench/e2e.py                                    # 500 instances, random fused model
    python bench/e2e.py --quick                            # 40 instances
    python bench/e2e.py --data j2k-lossless --model DIR    # issue 9's comparison on JPEG 2000
    python bench/e2e.py --settling 50 --settle 10 --rate 4  # C-STORE -> prediction while 50 studies settle

``--settling N`` first sends N other studies (one instance each), waits for their predictions, and starts
sending the measured instances a second before those N studies become due (``--settle`` seconds after the
last of them arrived), so that N verdicts and SRs are made while the measured instances are classified
(``--settle`` must leave time for the N predictions; the run says when it did not). The
table then says when, relative to the start of the measured sending, the N verdicts were made.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import create_engine, text

from screener.core.progress import Progress

DX = "1.2.840.10008.5.1.4.1.1.1.1"
MODES = {
    "fast": {"SCREENER__INFERENCE__REDUCED_DECODE": "true", "SCREENER__INFERENCE__PRECISION": "auto"},
    "baseline": {"SCREENER__INFERENCE__REDUCED_DECODE": "false", "SCREENER__INFERENCE__PRECISION": "fp32"},
}
RESPONSE_RE = re.compile(r"Received (?:C-)?Store Response(?: \((?P<status>[^)]*)\))?", re.IGNORECASE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max of ``values`` (seconds); raises ``ValueError`` when empty."""
    if not values:
        raise ValueError("no latencies to summarise")
    arr = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
    }


def rg1_file(name: str) -> Path:
    import data_store  # the pydicom-data package

    return Path(data_store.__file__).parent / "data" / name


def reuid_copies(src: Path, out: Path, n: int) -> list[Path]:
    """``n`` copies of ``src``, each its own study (new study/series/SOP UIDs), pixel data untouched."""
    ds = dcmread(src)
    if 0xFFFCFFFC in ds:  # trailing padding may be dropped on the wire (PS3.5 7.5.1): send without it
        del ds[0xFFFCFFFC]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName = f"BENCH{i:05d}", "Bench^Anon"
        path = out / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def wrap_png(png: Path, out: Path) -> Path:
    """A cxr3 PNG as a DX For Presentation instance (12 bits stored) in its own study."""
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX  # type: ignore[assignment]
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Bench^Anon", "BENCH", "DX"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def build_data(kind: str, n: int, out: Path, cxr3: str | None) -> list[Path]:
    """The ``n`` files to send for ``--data kind``; exits with a message when the data is missing."""
    if kind == "uncompressed":
        return reuid_copies(rg1_file("RG1_UNCR.dcm"), out, n)
    if kind == "j2k-lossless":
        return reuid_copies(rg1_file("RG1_J2KR.dcm"), out, n)
    if not cxr3:
        sys.exit("bench: --data cxr3 needs the cxr3 images: set CXR3_DIR (or pass --cxr3)")
    folder = Path(cxr3)
    pngs = [p for d in ("normal", "covid19", "viral_pneumonia") for p in sorted((folder / d).glob("*.png"))]
    if len(pngs) < n:
        sys.exit(f"bench: need {n} PNGs under {folder}/{{normal,covid19,viral_pneumonia}}; set CXR3_DIR")
    out.mkdir(parents=True, exist_ok=True)
    step = len(pngs) // n
    return [wrap_png(pngs[i * step], out / f"{i:05d}.dcm") for i in range(n)]


class SrReceiver:
    """The PACS: a pynetdicom storage SCP that accepts everything and notes when each SR arrived."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: dict[str, float] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        with self._lock:
            self.received[str(event.request.AffectedSOPInstanceUID)] = time.time()
        return 0x0000

    def start(self) -> SrReceiver:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title="BENCHPACS")
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


def send_pynetdicom(files: list[Path], port: int, rate: float, bar: Progress) -> list[float]:
    """Send ``files`` with pynetdicom (hosts without DCMTK): one association, each file as stored.

    Returns the wall-clock time of each C-STORE response; exits when one is not Success (0x0000).
    """
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # stream the file's encoded dataset, as DCMTK does
    ae = AE(ae_title="BENCH")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    heads = [dcmread(p, stop_before_pixels=True) for p in files]
    for pair in {(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in heads}:
        ae.add_requested_context(*pair)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRSCREENER")
    if not assoc.is_established:
        sys.exit("bench: the screener refused the association (pynetdicom sender)")
    acks = []
    try:
        for path in files:
            started = time.monotonic()
            rsp = assoc.send_c_store(path)
            acks.append(time.time())
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            if status != 0:
                sys.exit(f"bench: C-STORE of {path.name} answered {status}")
            bar.step("sent")
            if rate > 0:
                time.sleep(max(0.0, 1 / rate - (time.monotonic() - started)))
    finally:
        assoc.release()
    return acks


def send_all(files: list[Path], port: int, compressed: bool, rate: float, bar: Progress) -> list[float]:
    """Send ``files`` with DCMTK; returns the wall-clock time each C-STORE response was logged.

    ``rate`` 0: one association for all files, as fast as the peers go; else one sender process per
    file, started every ``1 / rate`` seconds. Exits when a response is not Success. Without DCMTK on
    the PATH the files go through :func:`send_pynetdicom` instead (said on stderr).
    """
    if shutil.which("storescu") is None or shutil.which("dcmsend") is None:
        print("# DCMTK not found: sending with pynetdicom", file=sys.stderr)
        return send_pynetdicom(files, port, rate, bar)
    tool = ["dcmsend", "-v"] if compressed else ["storescu", "-v"]
    base = [*tool, "-aet", "BENCH", "-aec", "CXRSCREENER", "127.0.0.1", str(port)]
    acks: list[float] = []
    groups = [files] if rate <= 0 else [[f] for f in files]
    for group in groups:
        started = time.monotonic()
        proc = subprocess.Popen(
            [*base, *map(str, group)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        log_tail: list[str] = []
        for line in proc.stdout:
            log_tail = [*log_tail[-20:], line.rstrip()]
            match = RESPONSE_RE.search(line)
            if match is None:
                continue
            acks.append(time.time())
            status = match.group("status")
            if status is not None and status.lower() != "success":
                proc.kill()
                sys.exit(f"bench: C-STORE answered {status}:\n" + "\n".join(log_tail))
            bar.step("sent")
        if proc.wait() != 0:
            sys.exit(f"bench: {tool[0]} exited {proc.returncode}:\n" + "\n".join(log_tail))
        if rate > 0:
            time.sleep(max(0.0, 1 / rate - (time.monotonic() - started)))
    if len(acks) != len(files):
        sys.exit(f"bench: {len(acks)} C-STORE responses logged for {len(files)} files")
    return acks


@dataclass
class RunResult:
    mode: str
    n: int
    to_prediction: dict[str, float]
    to_sr: dict[str, float]
    sustained: float  # instances/s to the last prediction row
    sustained_sr: float  # instances/s to the last SR delivered
    backend: str
    precision: str
    preprocess_ms: float
    inference_ms: float
    batch_mean: float
    srs_at_pacs: int
    settled: tuple[float, float] | None = None  # first and last --settling verdict, s after measured start


def _utc(value: Any) -> float:
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC).timestamp()


def run_once(
    args: argparse.Namespace,
    mode: str,
    model: Path,
    files: list[Path],
    work: Path,
    settling: list[Path] | None = None,
) -> RunResult:
    """One `screener serve` lifecycle in ``mode``: send every file, wait for predictions and SRs.

    ``settling``: studies sent first, classified, and due for their verdict as ``files`` start to go."""
    settling = settling or []
    work.mkdir(parents=True)
    pacs = SrReceiver().start()
    port = free_port()
    db_url = f"sqlite:///{work / 'db.sqlite'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER")}
    env.update(
        {
            "SCREENER__LISTENER__PORT": str(port),
            "SCREENER__DATABASE__URL": db_url,
            "SCREENER__STORAGE__SPOOL_DIR": str(work / "spool"),
            "SCREENER__STORAGE__MIN_FREE_BYTES": "0",
            "SCREENER__METRICS__PORT": "0",
            "SCREENER__INFERENCE__BACKEND": args.backend,
            "SCREENER__INFERENCE__MAX_BATCH": str(args.max_batch),
            "SCREENER__INFERENCE__MAX_WAIT_MS": "50",
            "SCREENER__INFERENCE__POLL_SECONDS": "0.05",
            "SCREENER__INFERENCE__STUDY_SETTLE_SECONDS": str(args.settle),
            "SCREENER__INFERENCE__TRT_CACHE_DIR": str(args.trt_cache or work / "trt-cache"),
            "SCREENER__PACS__DESTINATIONS": f'[{{ae_title="BENCHPACS", host="127.0.0.1", port={pacs.port}}}]',
            "SCREENER__PACS__SWEEP_SECONDS": str(args.sweep),
            "SCREENER__LOGGING__FORMAT": "json",
            **MODES[mode],
        }
    )
    # The interpreter itself, not the console script: a venv moved to another path keeps working.
    screener = [sys.executable, "-c", "import sys; from screener.ops.cli import main; sys.exit(main())"]
    subprocess.run(
        [*screener, "models", "register", str(model), "--activate"],
        env=env,
        check=True,
        cwd=work,
        capture_output=True,
    )
    log_path = work / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*screener, "serve"], env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    n = len(files)
    total = n + len(settling)
    db = create_engine(db_url)
    try:
        deadline = time.monotonic() + 300
        while b'"model.loaded"' not in log_path.read_bytes() or b'"serve.ready"' not in log_path.read_bytes():
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit(f"bench: serve did not load the model:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.1)
        with Progress(3 * total) as bar:
            if settling:
                burst = send_all(settling, port, args.data == "j2k-lossless", 0.0, bar)
                deadline = time.monotonic() + 120 + len(settling) * args.patience
                while time.monotonic() < deadline:
                    with db.connect() as conn:
                        if conn.execute(text("SELECT count(*) FROM predictions")).scalar_one() >= len(
                            settling
                        ):
                            break
                    time.sleep(0.1)
                # They become due settle seconds after the last of them arrived: start sending a second
                # before, so that the measured instances are in flight when the verdicts are made.
                late = time.time() - (burst[-1] + args.settle - 1.0)
                if late > 0:
                    print(
                        f"# the settling studies were due {late:.1f} s early: raise --settle", file=sys.stderr
                    )
                time.sleep(max(0.0, -late))
            sent_at = time.time()
            acks = send_all(files, port, args.data == "j2k-lossless", args.rate, bar)
            deadline = time.monotonic() + 120 + n * args.patience
            done_pred = done_sr = 0
            while True:
                with db.connect() as conn:
                    pred = conn.execute(text("SELECT count(*) FROM predictions")).scalar_one()
                    sent = conn.execute(
                        text("SELECT count(*) FROM deliveries WHERE status = 'sent' AND object_kind = 'sr'")
                    ).scalar_one()
                for _ in range(int(pred) - done_pred):
                    bar.step("classified")
                for _ in range(int(sent) - done_sr):
                    bar.step("SR delivered")
                done_pred, done_sr = int(pred), int(sent)
                if (done_pred >= total and done_sr >= total) or time.monotonic() > deadline:
                    break
                if proc.poll() is not None:
                    sys.exit(f"bench: serve exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.2)
        with db.connect() as conn:
            uid_order = [str(r[0]) for r in conn.execute(text("SELECT sop_instance_uid FROM instances"))]
            predictions = {
                str(r[0]): r[1:]
                for r in conn.execute(
                    text(
                        "SELECT i.sop_instance_uid, p.created_at, p.backend, p.preprocess_ms, "
                        "p.inference_ms, p.batch_size FROM predictions p "
                        "JOIN instances i ON i.id = p.instance_id"
                    )
                )
            }
            verdicts = {
                str(r[0]): _utc(r[1])
                for r in conn.execute(
                    text(
                        "SELECT i.sop_instance_uid, r.created_at FROM study_results r "
                        "JOIN instances i ON i.study_id = r.study_id"
                    )
                )
            }
            srs = {
                str(r[0]): _utc(r[1])
                for r in conn.execute(
                    text(
                        "SELECT i.sop_instance_uid, d.sent_at FROM deliveries d "
                        "JOIN study_results r ON r.id = d.study_result_id "
                        "JOIN instances i ON i.study_id = r.study_id "
                        "WHERE d.status = 'sent' AND d.object_kind = 'sr'"
                    )
                )
            }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        finally:
            db.dispose()
            pacs.stop()
    if len(predictions) < total or len(srs) < total:
        sys.exit(
            f"bench: {mode}: {len(predictions)} predictions and {len(srs)} SRs of {n} within the time "
            f"allowed; see {log_path} (--keep)"
        )
    # The k-th response belongs to the k-th file sent; files were sent in order, so map by SOP UID order.
    sent_uids = [
        str(dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        for p in files
    ]
    assert set(sent_uids) <= set(uid_order), "an instance sent was not recorded"
    ack = dict(zip(sent_uids, acks, strict=True))
    to_pred = [_utc(predictions[u][0]) - ack[u] for u in sent_uids]
    to_sr = [srs[u] - ack[u] for u in sent_uids]
    last_pred = max(_utc(predictions[u][0]) for u in sent_uids)
    settled = None
    if settling:
        burst_uids = [
            str(dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            for p in settling
        ]
        made = [verdicts[u] - sent_at for u in burst_uids if u in verdicts]
        settled = (min(made), max(made)) if made else None
    precision = "?"
    for line in log_path.read_text(errors="replace").splitlines():
        if '"engine.precision"' in line:
            try:
                precision = str(json.loads(line).get("precision", "?"))
            except json.JSONDecodeError:
                continue
    return RunResult(
        mode=mode,
        n=n,
        to_prediction=percentiles(to_pred),
        to_sr=percentiles(to_sr),
        sustained=n / (last_pred - sent_at),
        sustained_sr=n / (max(srs[u] for u in sent_uids) - sent_at),
        backend=",".join(sorted({str(v[1]) for v in predictions.values()})),
        precision=precision,
        preprocess_ms=statistics.median(float(v[2]) for v in predictions.values()),
        inference_ms=statistics.median(float(v[3]) for v in predictions.values()),
        batch_mean=float(np.mean([float(v[4]) for v in predictions.values()])),
        srs_at_pacs=len(pacs.received),
        settled=settled,
    )


def _ms(stats: dict[str, float]) -> str:
    return " / ".join(f"{stats[k] * 1000:,.0f}" for k in ("p50", "p95", "p99"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model directory (default: a random fused resnet101+152)")
    ap.add_argument("--n", type=int, default=500, help="instances per run (default 500)")
    ap.add_argument("--quick", action="store_true", help="40 instances")
    ap.add_argument("--data", choices=("uncompressed", "j2k-lossless", "cxr3"), default="uncompressed")
    ap.add_argument("--mode", choices=("both", "fast", "baseline"), default="both")
    ap.add_argument("--baseline", action="store_true", help="the same as --mode baseline")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each mode, alternating (median)")
    ap.add_argument("--rate", type=float, default=0.0, help="instances/s sent; 0 = as fast as possible")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--max-batch", type=int, default=0, help="inference.max_batch (default 8 CPU, 32 GPU)")
    ap.add_argument("--settle", type=float, default=0.2, help="inference.study_settle_seconds")
    ap.add_argument(
        "--settling", type=int, default=0, help="studies that settle while the measured instances go (above)"
    )
    ap.add_argument("--sweep", type=float, default=0.2, help="pacs.sweep_seconds")
    ap.add_argument(
        "--patience", type=float, default=5.0, help="seconds allowed per instance before giving up"
    )
    ap.add_argument("--trt-cache", type=Path, help="inference.trt_cache_dir (default: per run)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, database, spool)")
    ap.add_argument("--cxr3", default=os.environ.get("CXR3_DIR"), help="cxr3 folder (default: $CXR3_DIR)")
    args = ap.parse_args()
    n = 40 if args.quick else args.n
    mode = "baseline" if args.baseline else args.mode
    modes = ["fast", "baseline"] if mode == "both" else [mode]
    if not args.max_batch:
        import torch

        args.max_batch = 32 if torch.cuda.is_available() else 8

    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        model = args.model.resolve() if args.model is not None else None  # serve runs in the work dir
        if model is None:
            from screener.model.export import create_random_model_dir

            model = work / "model"
            create_random_model_dir(model, seed=0, version="bench-e2e")
        files = build_data(args.data, n, work / "data", args.cxr3)
        settling = build_data(args.data, args.settling, work / "settling", args.cxr3) if args.settling else []
        head = dcmread(files[0], stop_before_pixels=True)
        results: list[RunResult] = []
        for r in range(args.rounds):
            for m in modes if r % 2 == 0 else reversed(modes):
                print(f"# round {r + 1}: {m}", file=sys.stderr)
                results.append(run_once(args, m, model, files, work / f"run-{r}-{m}", settling))
                if not args.keep:
                    shutil.rmtree(work / f"run-{r}-{m}" / "spool", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    pace = "full speed" if args.rate <= 0 else f"{args.rate}/s"
    print(
        f"data {args.data}: {n} instances per run, sent at {pace}; "
        f"max_batch {args.max_batch}, study_settle_seconds {args.settle}, sweep_seconds {args.sweep}; "
        f"{os.cpu_count()} cpus"
    )
    print(
        f"image {head.Rows} x {head.Columns}, {head.BitsStored} bits stored, "
        f"{head.file_meta.TransferSyntaxUID.name}"
    )
    print(
        f"{'mode':<9} {'backend':<18} {'precision':<9} {'->prediction p50/p95/p99 ms':>28} "
        f"{'->SR p50/p95/p99 ms':>22} {'inst/s':>7} {'inst/s SR':>9} {'prep ms':>8} {'infer ms/img':>12}"
    )
    for res in results:
        print(
            f"{res.mode:<9} {res.backend:<18} {res.precision:<9} {_ms(res.to_prediction):>28} "
            f"{_ms(res.to_sr):>22} {res.sustained:>7.2f} {res.sustained_sr:>9.2f} "
            f"{res.preprocess_ms:>8.0f} {res.inference_ms:>12.0f}"
        )
    print("SRs received by the PACS per run: " + ", ".join(f"{r.mode} {r.srs_at_pacs}" for r in results))
    if args.settling:
        print(
            f"{args.settling} settling studies' verdicts made, s after the measured sending began: "
            + ", ".join(
                f"{r.mode} {r.settled[0]:.1f}..{r.settled[1]:.1f}" if r.settled else f"{r.mode} none"
                for r in results
            )
        )
    if args.json:
        args.json.write_text(json.dumps([vars(r) for r in results], indent=2) + "\n")
    by_mode = {m: statistics.median(r.sustained for r in results if r.mode == m) for m in modes}
    if len(by_mode) == 2:
        print("# ratio is fast / baseline sustained instances/s (C-STORE start to last prediction row)")
        print(f"ratio={by_mode['fast'] / by_mode['baseline']:.3f}")
    else:
        print("# one mode only: no ratio")
        print("ratio=nan")
    return 0


if __name__ == "__main__":
    sys.exit(main())

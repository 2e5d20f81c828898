"""Test helpers: a `screener serve` subprocess, real DICOM files, real peers, throwaway PostgreSQL."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import create_engine, text

from screener.core.pynetdicom_compat import keep_responses_for_caller

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
REPO = Path(__file__).resolve().parents[1]
SCREENER = Path(sys.executable).with_name("screener")


def rg1_dir() -> Path:
    import data_store  # the pydicom-data package

    return Path(data_store.__file__).parent / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dataset_offset(data: bytes) -> int:
    """Offset of the first dataset byte after the Part 10 preamble, prefix and file meta group."""
    assert data[128:132] == b"DICM"
    # (0002,0000) UL, explicit VR little endian: tag 4 + VR 2 + length 2 + value 4.
    assert data[132:136] == b"\x02\x00\x00\x00"
    group_length = int.from_bytes(data[140:144], "little")
    return 144 + group_length


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reuid(src: Path, dst: Path, *, study_uid: str | None = None, **tags: Any) -> Dataset:
    """Copy a DICOM file with a new SOP Instance UID (pixel data, compressed or not, untouched)."""
    ds = dcmread(src)
    # Peers may drop Data Set Trailing Padding on the wire (PS3.5 7.5.1 allows it): send without it.
    if 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if study_uid:
        ds.StudyInstanceUID = study_uid
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(dst, enforce_file_format=True)
    return ds


def small_cr(
    pixels: np.ndarray,
    *,
    study_uid: str,
    sop_uid: str | None = None,
    patient_name: str = "Anon^Test",
    patient_id: str = "TEST0001",
    birth_date: str = "",
    accession: str = "",
) -> Dataset:
    """A CR chest PA dataset carrying ``pixels`` (uint16), ready to send."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.AccessionNumber = accession
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def rg1_pixels(size: int = 256) -> np.ndarray:
    """A real chest radiograph (RG1_UNCR, 15-bit CR), block-averaged down to about ``size`` px."""
    ds = dcmread(rg1_dir() / "RG1_UNCR.dcm")
    arr = ds.pixel_array.astype(np.float32)
    step = max(1, min(arr.shape) // size)
    h, w = (arr.shape[0] // step) * step, (arr.shape[1] // step) * step
    small = arr[:h, :w].reshape(h // step, step, w // step, step).mean(axis=(1, 3))
    return (small / small.max() * 4095).astype(np.uint16)[:size, :size]


def store(
    port: int,
    datasets_or_paths: Sequence[Dataset | Path],
    *,
    calling: str = "TESTSCU",
    called: str = "CXRSCREENER",
    on_status: Any = None,
) -> list[int | None]:
    """Send over one pynetdicom association; returns each status (None: no response)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    items = [dcmread(p) if isinstance(p, Path) else p for p in datasets_or_paths]
    for sop_class, ts in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in items}:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return [None] * len(items)
    keep_responses_for_caller(assoc)  # else pynetdicom's reactor may drop a fast response (pynetdicom_compat)
    statuses: list[int | None] = []
    try:
        for ds in items:
            try:
                rsp = assoc.send_c_store(ds)
            except (RuntimeError, OSError, ValueError):
                statuses.append(None)
                continue
            status = int(rsp.Status) if rsp and "Status" in rsp else None
            statuses.append(status)
            if on_status is not None:
                on_status(ds, status)
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    statuses += [None] * (len(items) - len(statuses))
    return statuses


def store_file_raw(
    port: int, path: Path, *, calling: str = "TESTSCU", context_class: str | None = None, timeout: float = 0
) -> int | None:
    """Send one file's encoded dataset exactly as stored on disk (pynetdicom chunked send); the command
    takes its UIDs from the file meta. ``context_class`` proposes that SOP class (and the file's transfer
    syntax) instead of the data set's own; ``timeout`` > 0 sets the association's timeouts."""
    from pynetdicom import _config

    meta = dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title=calling)
    if timeout > 0:
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(context_class or str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID))
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRSCREENER")
        assert assoc.is_established
        try:
            rsp = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return int(rsp.Status) if rsp and "Status" in rsp else None


def associate_result(port: int, *, calling: str = "TESTSCU", called: str = "CXRSCREENER") -> str:
    """'accepted', 'rejected' or 'failed' for a bare association attempt."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if assoc.is_established:
        assoc.release()
        return "accepted"
    return "rejected" if assoc.is_rejected else "failed"


@dataclass
class Server:
    """A `screener serve` subprocess configured through SCREENER__ environment overrides only."""

    workdir: Path
    port: int
    overrides: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
    role: str = "all"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"serve-{self.runs}.log"

    @property
    def spool(self) -> Path:
        return Path(self.overrides.get("SCREENER__STORAGE__SPOOL_DIR", self.workdir / "spool"))

    @property
    def db_url(self) -> str:
        return self.overrides["SCREENER__DATABASE__URL"]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER")}
        env.update(
            {
                "SCREENER__LISTENER__PORT": str(self.port),
                "SCREENER__LOGGING__FORMAT": "json",
                "SCREENER__STORAGE__SPOOL_DIR": str(self.workdir / "spool"),
                "SCREENER__STORAGE__MIN_FREE_BYTES": "0",
                "SCREENER__STORAGE__ORPHAN_GRACE_SECONDS": "0",
                "SCREENER__DATABASE__URL": f"sqlite:///{self.workdir / 'screener.db'}",
                "SCREENER__LISTENER__DRAIN_SECONDS": "20",
                "SCREENER__METRICS__PORT": "0",  # parallel servers must not fight over 9110
            }
        )
        env.update(self.overrides)
        return env

    def start(self, wait: bool = True) -> Server:
        self.runs += 1
        self.overrides.setdefault("SCREENER__DATABASE__URL", f"sqlite:///{self.workdir / 'screener.db'}")
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(SCREENER), "serve", "--role", self.role],
            cwd=self.workdir,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"screener serve exited {self.proc.returncode}:\n{self.log_text()}")
            if '"serve.ready"' in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise AssertionError(f"screener serve not ready after {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("serve-*.log")))

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
        return events

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def rows(self, sql: str, **params: Any) -> list[Any]:
        engine = create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(text(sql), params))
        finally:
            engine.dispose()

    def spool_files(self) -> set[str]:
        root = self.spool
        return {p.relative_to(root).as_posix() for p in root.glob("??/??/*.dcm")}

    def temp_files(self) -> list[Path]:
        return list((self.spool / ".tmp").glob("*"))


def assert_spool_consistent(server: Server) -> None:
    """Every row has its file with the recorded hash, and no spool file lacks a row."""
    rows = server.rows("SELECT spool_name, sha256 FROM instances")
    clash_files = {r[0] for r in server.rows("SELECT spool_name FROM instance_clashes") if r[0]}
    clash_files |= {r[0] for r in server.rows("SELECT spool_name FROM deliveries")}
    files = server.spool_files()
    for name, digest in rows:
        assert name in files, f"row points at missing spool file {name}"
        assert sha256(server.spool / name) == digest, f"spool file {name} does not match its recorded hash"
    orphans = files - {r[0] for r in rows} - clash_files
    assert not orphans, f"orphan spool files: {sorted(orphans)[:5]}"
    assert not server.temp_files(), f"temporary files left: {server.temp_files()}"


# --- PostgreSQL -------------------------------------------------------------------------------------

SHARED_PG = os.environ.get("SCREENER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A fresh database on the shared PostgreSQL server, dropped afterwards. Yields its URL."""
    name = f"screener_t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(SHARED_PG, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        import pytest

        pytest.skip(f"PostgreSQL at {SHARED_PG} not reachable: {exc}")
    base = SHARED_PG.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _pg_bin(name: str) -> str:
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        import pytest

        pytest.skip(f"PostgreSQL binary {name} not installed")
    return found


class ThrowawayCluster:
    """A private PostgreSQL cluster (initdb in a temp dir, own port), never the shared server."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "pgdata"
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            shutil.chown(root, "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def init(self) -> ThrowawayCluster:
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        return self

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.root / "pg.log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")


DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def wrap_png_as_dx(png: Path, *, study_uid: str, view: str = "PA", body_part: str = "CHEST") -> Dataset:
    """A real cxr3 PNG as a DX For Presentation instance (12 bits stored), as a modality would send it."""
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 16
    ds = small_cr(pixels, study_uid=study_uid)
    ds.SOPClassUID = DX_PRESENTATION
    ds.file_meta.MediaStorageSOPClassUID = DX_PRESENTATION
    ds.Modality = "DX"
    ds.ViewPosition = view
    ds.BodyPartExamined = body_part
    ds.SeriesDescription = f"CHEST {view}"
    return ds


def cli(server: Server, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `screener ARGS` against the server's settings."""
    res = subprocess.run(
        [str(SCREENER), *args], cwd=server.workdir, env=server.env(), capture_output=True, text=True
    )
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.25) -> None:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass (AssertionError naming ``what``).

    Sleeps at least as long as the last check took: a check that runs a `screener` command costs about a
    second of CPU, and polling it back to back on two cores starves the very server being waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = time.monotonic()
        if predicate():
            return
        time.sleep(max(interval, time.monotonic() - started))
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- Orthanc as the PACS ------------------------------------------------------------------------------

ROUTE_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags['Modality']
  if (modality == 'CR' or modality == 'DX') then
    SendToModality(instanceId, 'screener')
  end
end
"""


class Orthanc:
    """A real Orthanc (Debian package) on loopback ports that auto-routes CR/DX to the screener."""

    def __init__(self, root: Path, screener_port: int, screener_aet: str = "CXRSCREENER") -> None:
        self.root = root
        self.dicom_port = free_port()
        self.http_port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        (root / "route.lua").write_text(ROUTE_LUA)
        config = {
            "Name": "TestPACS",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "storage"),
            "DicomAet": "ORTHANC",
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {"screener": [screener_aet, "127.0.0.1", screener_port]},
            "LuaScripts": [str(root / "route.lua")],
            "Plugins": [],
            "StableAge": 2,
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        log = (self.root / "orthanc.log").open("wb")
        self.proc = subprocess.Popen(
            ["Orthanc", str(self.root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"Orthanc did not start:\n{(self.root / 'orthanc.log').read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def get(self, path: str) -> Any:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as rsp:
            return json.loads(rsp.read())

    def post(self, path: str, body: Any) -> Any:
        import urllib.request

        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return json.loads(rsp.read())

    def instances_of_modality(self, study_uid: str, modality: str) -> list[dict[str, Any]]:
        """Instances (simplified tags) of ``modality`` in the study, as Orthanc holds them."""
        series = self.post(
            "/tools/find",
            {
                "Level": "Series",
                "Query": {"StudyInstanceUID": study_uid, "Modality": modality},
                "Expand": True,
            },
        )
        out = []
        for s in series:
            for inst_id in s["Instances"]:
                out.append(self.get(f"/instances/{inst_id}/simplified-tags"))
        return out


class FakePacs:
    """A pynetdicom storage SCP whose answer the test switches: refuse, a status code, or success."""

    def __init__(self, ae_title: str = "FAKEPACS") -> None:
        from pynetdicom import evt

        self.port = free_port()
        self.ae_title = ae_title
        self.answer = 0x0000
        self.received: list[tuple[str, int]] = []  # (SOP Instance UID, status answered)
        self._server: Any = None
        self._evt = evt

    def _on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.received.append((uid, self.answer))
        return self.answer

    def start(self, ssl_context: Any = None) -> FakePacs:
        from pynetdicom import AllStoragePresentationContexts

        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=ssl_context,
            evt_handlers=[(self._evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def openssl(*args: str) -> None:
    """Run the openssl command line; raises CalledProcessError with its output on failure."""
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def self_signed_certificate(key: Path, pem: Path, subject: str) -> None:
    """A 2-day self-signed RSA certificate (a test CA, or a client no CA of ours signed)."""
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject,
        "-keyout", str(key), "-out", str(pem),
    )  # fmt: skip


def train_tiny_model(root: Path, cxr3: Path, per_class: int, version: str) -> tuple[Path, Path]:
    """Train and export a tiny fused model (resnet18 + resnet18 at 64 px, one epoch of 16 draws) on the
    first ``per_class`` real cxr3 images of each class, linked into ``root/data``; return
    ``(model directory, data folder)``."""
    from screener.model.modelcard import CLASSES
    from trainer.pipeline import train_and_export

    data = root / "data"
    for cls in CLASSES:
        (data / cls).mkdir(parents=True)
        for png in sorted((cxr3 / cls).glob("*.png"))[:per_class]:
            (data / cls / png.name).symlink_to(png)
    out = root / "model"
    train_and_export(
        preset="quick",
        data=data,
        out=out,
        archs=("resnet18", "resnet18"),
        input_size=64,
        epochs=1,
        batch_size=8,
        samples_per_epoch=16,
        version=version,
        workdir=root / "work",
        progress=False,
    )
    return out, data

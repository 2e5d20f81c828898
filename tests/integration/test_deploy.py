"""Every file under deploy/ is exercised: compose, Dockerfile, systemd units, crontab, Orthanc routing, TLS
certificates, and the example configuration."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from screener.core.config import TLSConfig, load_config
from screener.ingest.listener import build_ssl_context
from screener.results.sc import SC_SOP_CLASS_UID
from tests.helpers import FakePacs, free_port, small_cr

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


# --- compose -----------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_structure() -> None:
    services = _compose()["services"]
    assert {"postgres", "orthanc", "screener"} <= set(services)

    screener = services["screener"]
    env = screener["environment"]
    url = env["SCREENER__DATABASE__URL"]
    assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url
    assert env["SCREENER__LISTENER__HOST"] == "0.0.0.0"
    assert json.loads(env["SCREENER__LISTENER__ALLOWED_CALLING_AETS"]) == ["ORTHANC"]
    # the result destination is the Orthanc service, on its DICOM port
    assert re.search(r'host = "orthanc", port = 4242', env["SCREENER__PACS__DESTINATIONS"])
    assert screener["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / screener["build"]["context"] / screener["build"]["dockerfile"]).is_file()
    assert any(str(p).endswith("11112:11112") for p in screener["ports"])
    assert any(str(p).endswith("9110:9110") for p in screener["ports"])
    assert screener["command"][0] == "--role"
    for dep in ("postgres", "orthanc"):
        assert screener["depends_on"][dep]["condition"] == "service_healthy"
        assert services[dep]["healthcheck"]["test"]
    gpu = screener["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]

    postgres = services["postgres"]
    assert postgres["environment"]["POSTGRES_DB"] in url and postgres["environment"]["POSTGRES_USER"] in url

    orthanc = services["orthanc"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in orthanc["volumes"]}
    config_json = json.loads((DEPLOY / mounts["/etc/orthanc/orthanc.json"]).read_text())
    assert config_json["LuaScripts"] == ["/etc/orthanc/route-to-screener.lua"]
    assert (DEPLOY / mounts["/etc/orthanc/route-to-screener.lua"]).is_file()
    assert any(str(p).endswith("4242:4242") for p in orthanc["ports"])
    screener_modality = config_json["DicomModalities"]["screener"]
    assert screener_modality["Host"] == "screener" and screener_modality["Port"] == 11112

    for volume in screener["volumes"]:
        src = str(volume).split(":")[0]
        if src.startswith("./"):
            assert (DEPLOY / src).is_file(), src


def test_compose_config_with_docker_when_available() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"docker compose plugin not available ({(probe.stderr.strip().splitlines() or [''])[0]})")
    result = subprocess.run(
        [docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


# --- Dockerfile ----------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_lint() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0][0] in {"FROM", "ARG"}
    first_from = next(args for word, args in instructions if word == "FROM")
    assert re.match(
        r"(nvidia/cuda:12\.\S+-cudnn-runtime-ubuntu22\.04|nvcr\.io/nvidia/tensorrt:\S+-py3)", first_from
    )
    final_stage = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    final = instructions[final_stage:]
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert any(word == "HEALTHCHECK" and "/healthz" in args and "9110" in args for word, args in final)
    exposed = {p for word, args in final if word == "EXPOSE" for p in args.split()}
    assert {"11112", "9110"} <= exposed
    assert any(word == "VOLUME" and "var" in args for word, args in final)
    entrypoint = next(json.loads(args) for word, args in final if word == "ENTRYPOINT")
    assert entrypoint[0].endswith("screener") and entrypoint[1] == "serve"
    assert any(word == "RUN" and ".[tensorrt]" in args for word, args in instructions)
    # every file COPYied from the build context exists
    for word, args in instructions:
        if word == "COPY" and "--from" not in args:
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), src


def test_hadolint_when_installed() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- systemd and cron -----------------------------------------------------------------------------------


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def test_systemd_units_parse() -> None:
    serve = _unit("screener.service")
    assert re.search(r"/screener serve(\s|$)", serve["Service"]["ExecStart"])
    assert serve["Service"]["User"] not in {"root", "0"}
    assert serve["Install"]["WantedBy"] == "multi-user.target"

    retrain = _unit("trainer-retrain.service")
    assert re.search(r"/trainer retrain(\s|$)", retrain["Service"]["ExecStart"])
    assert retrain["Service"]["Type"] == "oneshot"
    assert "3" in retrain["Service"]["SuccessExitStatus"].split()

    timer = _unit("trainer-retrain.timer")
    on_calendar = timer["Timer"]["OnCalendar"]
    assert re.fullmatch(r"\*-\*-\* \d{2}:\d{2}(:\d{2})?", on_calendar)
    assert timer["Install"]["WantedBy"] == "timers.target"
    normalized = (
        subprocess.run(["systemd-analyze", "calendar", on_calendar], capture_output=True, text=True)
        if shutil.which("systemd-analyze")
        else None
    )
    if normalized is not None:
        assert normalized.returncode == 0, normalized.stderr


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart binaries exist: point the units at stand-ins under tmp_path.
    prefix = "/srv/cxr-screener"
    root = tmp_path / "srv"
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / "var").mkdir()
    triton = root / "var" / "pytriton" / "pytriton" / "tritonserver" / "bin"
    triton.mkdir(parents=True)
    for stub in (
        root / ".venv" / "bin" / "screener",
        root / ".venv" / "bin" / "trainer",
        triton / "tritonserver",
    ):
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for unit in sorted((DEPLOY / "systemd").iterdir()):
        assert prefix in unit.read_text() or unit.suffix == ".timer"
        (units / unit.name).write_text(unit.read_text().replace(prefix, str(root)))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *sorted(str(p) for p in units.iterdir())],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings; treat any message about our units as a failure.
    ours = [line for line in result.stderr.splitlines() if str(units) in line or ".service" in line]
    assert ours == [], result.stderr


def test_crontab_line() -> None:
    lines = [
        line
        for line in (DEPLOY / "crontab").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(lines) == 1
    fields = lines[0].split(None, 6)
    assert len(fields) == 7, "5 time fields, user, command"
    minute, hour, dom, month, dow, user, command = fields
    assert 0 <= int(minute) <= 59 and 0 <= int(hour) <= 23
    for field in (dom, month, dow):
        assert re.fullmatch(r"\*|[0-9,\-/]+", field)
    assert user not in {"root", "0"}
    assert "trainer retrain" in command


# --- Orthanc --------------------------------------------------------------------------------------------


def _store(port: int, calling: str, datasets: list[Any]) -> list[int]:
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(str(ds.SOPClassUID), ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _secondary_capture(study_uid: str) -> Any:
    import numpy as np

    ds = small_cr(np.zeros((16, 16), dtype=np.uint16), study_uid=study_uid)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(SC_SOP_CLASS_UID)
    ds.Modality = "OT"
    return ds


@pytest.mark.slow
def test_orthanc_config_starts_and_routes_only_cr_dx(tmp_path: Path) -> None:
    import numpy as np

    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc (Debian package orthanc) is not installed")
    fake_screener = FakePacs(ae_title="CXRSCREENER").start()
    config = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    http_port, dicom_port = free_port(), free_port()
    config.update(
        StorageDirectory=str(tmp_path / "db"),
        IndexDirectory=str(tmp_path / "db"),
        HttpPort=http_port,
        DicomPort=dicom_port,
        RemoteAccessAllowed=False,
        AuthenticationEnabled=False,
        LuaScripts=[str(DEPLOY / "orthanc" / "route-to-screener.lua")],
    )
    config["DicomModalities"]["screener"].update(Host="127.0.0.1", Port=fake_screener.port)
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log_path = tmp_path / "orthanc.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["Orthanc", str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        import urllib.request

        deadline = time.monotonic() + 30
        system: dict[str, Any] | None = None
        while system is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=5) as rsp:
                    system = json.loads(rsp.read())
            except OSError:
                assert proc.poll() is None, log_path.read_text()
                time.sleep(0.2)
        assert system is not None, log_path.read_text()
        assert system["DicomAet"] == "ORTHANC"
        assert "route-to-screener: loaded" in log_path.read_text()

        study = generate_uid()
        cr = small_cr(np.zeros((16, 16), dtype=np.uint16), study_uid=study)
        own_cr = small_cr(np.zeros((16, 16), dtype=np.uint16), study_uid=study)
        sc = _secondary_capture(study)
        assert _store(dicom_port, "MODALITY1", [cr, sc]) == [0, 0]
        assert _store(dicom_port, "CXRSCREENER", [own_cr]) == [0]

        deadline = time.monotonic() + 20
        while not fake_screener.received and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # room for any wrongly routed instance to arrive too
        received = {uid for uid, _ in fake_screener.received}
        assert received == {str(cr.SOPInstanceUID)}, log_path.read_text()
        assert "Lua:" not in log_path.read_text(), "the routing script raised an error"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        fake_screener.stop()


# --- TLS and the example configuration -------------------------------------------------------------------


def _make_certs(out: Path) -> None:
    result = subprocess.run(
        ["sh", str(DEPLOY / "tls" / "make-certs.sh"), str(out), "localhost"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_make_certs_produce_a_working_mutual_tls_pair(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    certs = tmp_path / "tls"
    _make_certs(certs)
    for name in ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key"):
        assert (certs / name).is_file(), name
    assert (certs / "server.key").stat().st_mode & 0o077 == 0

    for pair in ("server", "client"):
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(certs / f"{pair}.crt", certs / f"{pair}.key")

    # The listener's own context, with client certificates required, against a client using client.crt.
    from screener.core.config import ListenerConfig

    server_ctx = build_ssl_context(
        ListenerConfig(
            tls=TLSConfig(
                cert_file=certs / "server.crt",
                key_file=certs / "server.key",
                ca_file=certs / "ca.crt",
                require_client_cert=True,
            )
        )
    )
    assert server_ctx is not None
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "ca.crt"))
    client_ctx.load_cert_chain(certs / "client.crt", certs / "client.key")

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    peer: dict[str, Any] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            peer["cert"] = tls.getpeercert()
            peer["version"] = tls.version()
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve)
    thread.start()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.recv(2) == b"ok"
    thread.join(10)
    listener.close()
    assert peer["version"] in {"TLSv1.2", "TLSv1.3"}
    subject = dict(item[0] for item in peer["cert"]["subject"])
    assert subject["commonName"] == "CXR Screener client"


def test_config_example_loads() -> None:
    config = load_config(DEPLOY / "config.example.toml", environ={})
    assert config.database.url.startswith("postgresql+psycopg://")
    assert config.listener.allowed_calling_aets
    assert config.pacs.destinations
    assert config.trainer.preset == "paper"
    assert config.results.mode == "shadow"  # a new site starts in shadow mode
    assert not config.listener.tls.enabled  # TLS lines are commented until the files exist


def test_config_example_tls_lines_load_once_uncommented(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    certs = tmp_path / "tls"
    _make_certs(certs)
    shutil.copy(certs / "ca.crt", certs / "pacs-ca.crt")
    text = (DEPLOY / "config.example.toml").read_text()
    keys = r"cert_file|key_file|ca_file|require_client_cert|tls_ca_file|tls_cert_file|tls_key_file"
    uncommented = re.sub(rf"^# (\[listener\.tls\]|(?:{keys}) = .*)$", r"\1", text, flags=re.MULTILINE)
    uncommented = uncommented.replace("/etc/cxr-screener/tls", str(certs))
    assert uncommented.count(str(certs)) == 6
    path = tmp_path / "config.toml"
    path.write_text(uncommented)
    config = load_config(path, environ={})
    assert config.listener.tls.enabled and config.listener.tls.require_client_cert
    assert config.pacs.destinations[0].tls_cert_file == certs / "client.crt"
    assert build_ssl_context(config.listener) is not None

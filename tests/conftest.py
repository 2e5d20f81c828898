from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    Server,
    ThrowawayCluster,
    free_port,
    openssl,
    scratch_database,
    self_signed_certificate,
)

CXR3_ENV = "CXR3_DIR"
CXRX_ENV = "CXRX_DIR"
JSRT_LUNGS_ENV = "JSRT_LUNGS_DIR"


def _dataset(env: str, what: str) -> Path:
    value = os.environ.get(env)
    if not value or not Path(value).is_dir():
        pytest.skip(f"{env} not set to the {what} folder")
    return Path(value)


@pytest.fixture(scope="session")
def cxr3_dir() -> Path:
    """The real labelled chest X-rays (set CXR3_DIR); tests that need them skip without."""
    return _dataset(CXR3_ENV, "cxr3 dataset")


@pytest.fixture(scope="session")
def cxrx_dir() -> Path:
    """The multi-source supplement (JSRT normals, Cohen COVID-19; set CXRX_DIR); skip without."""
    return _dataset(CXRX_ENV, "cxrx dataset")


@pytest.fixture(scope="session")
def jsrt_lungs_dir() -> Path:
    """Radiographs with lung-field masks (set JSRT_LUNGS_DIR); skip without."""
    return _dataset(JSRT_LUNGS_ENV, "jsrt-lungs dataset")


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[object]:
    """Factory for `screener serve` subprocesses; all are stopped at teardown."""
    servers: list[Server] = []

    def factory(role: str = "all", **overrides: str) -> Server:
        workdir = tmp_path / f"server{len(servers)}"
        workdir.mkdir()
        server = Server(workdir=workdir, port=free_port(), overrides=dict(overrides), role=role)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=30)


@pytest.fixture
def pg_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


@pytest.fixture
def pg_cluster() -> Iterator[ThrowawayCluster]:
    root = Path(tempfile.mkdtemp(prefix="screener-pg-"))
    cluster = ThrowawayCluster(root).init()
    cluster.start()
    try:
        yield cluster
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # the test may have stopped it
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


MODEL_FUSION_WEIGHT = 0.3  # not 0.5, so swapping the two networks would be noticed


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real fused resnet101 + resnet152 (random weights, seeded), exported once per test session."""
    from screener.model.export import create_random_model_dir

    out = tmp_path_factory.mktemp("models") / "fused-random"
    create_random_model_dir(
        out,
        arch_a="resnet101",
        arch_b="resnet152",
        input_size=224,
        fusion_weight=MODEL_FUSION_WEIGHT,
        seed=7,
        version="test-random-0",
    )
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small fused resnet18 + resnet34 at 64 px (random weights): for tests about plumbing, not accuracy."""
    from screener.model.export import create_random_model_dir

    out = tmp_path_factory.mktemp("models") / "fused-tiny"
    create_random_model_dir(
        out, arch_a="resnet18", arch_b="resnet34", input_size=64, seed=3, version="test-tiny-0"
    )
    return out


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path / "pki"
    d.mkdir()
    self_signed_certificate(d / "ca.key", d / "ca.pem", "/CN=Test CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(d / f"{name}.key"),
            "-out",
            str(d / f"{name}.csr"),
        )
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{name}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(d / f"{name}.ext"),
            "-out",
            str(d / f"{name}.pem"),
        )
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}

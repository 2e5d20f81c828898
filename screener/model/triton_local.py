"""Run NVIDIA's ``tritonserver`` on this host: for CPU nodes, tests and benchmarks.

The ``nvidia-pytriton`` wheel ships a complete ``tritonserver`` (2.51) with the Python backend. It is not
installed into the screener's virtualenv (the wheel pins numpy < 2); install it into a folder of its own::

    pip install --no-deps --target var/pytriton nvidia-pytriton
    pip install --no-deps --target var/triton-py onnxruntime   # for the stub's Python (see below)
    apt-get install python3-numpy

Triton's Python backend stub runs the system's ``python3`` (3.11 on Debian 12), so ``model.py`` imports
numpy from ``python3-numpy`` and onnxruntime from the folder passed as ``python_path`` (the server's
``SCREENER_TRITON_PYTHONPATH``: the stub's Python ignores ``PYTHONPATH``). :class:`LocalTriton` lays
out a backend directory (the wheel's ``backends/python`` plus the stub built for this Python), starts
the server on loopback ports and stops it.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from screener.core.errors import EngineUnavailableError

HOME_ENV = "SCREENER_TRITON_HOME"
PYTHONPATH_ENV = "SCREENER_TRITON_PYTHONPATH"
DEFAULT_HOME = Path("var/pytriton")
DEFAULT_PYTHONPATH = Path("var/triton-py")
STUB_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel's ``tritonserver`` lives (``root`` is its ``pytriton/tritonserver`` folder)."""

    root: Path

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def stub(self) -> Path:
        return self.root / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    @property
    def libs(self) -> Path:
        """The wheel's bundled shared libraries (the stub finds them by a relative RPATH, lost in a copy)."""
        return self.root.parent.parent / "nvidia_pytriton.libs"


def find_tritonserver(home: Path | None = None) -> TritonInstall:
    """The ``tritonserver`` in ``home`` (a ``pip --target`` folder of ``nvidia-pytriton``), else in
    ``$SCREENER_TRITON_HOME``, else ``var/pytriton``; raises :class:`EngineUnavailableError` saying how
    to install it."""
    base = home or Path(os.environ.get(HOME_ENV) or DEFAULT_HOME)
    for root in (base / "pytriton" / "tritonserver", base / "tritonserver", base):
        install = TritonInstall(root)
        if install.binary.is_file() and install.stub.is_file() and install.python_backend.is_dir():
            return install
    raise EngineUnavailableError(
        f"no tritonserver with a Python {STUB_PYTHON} backend stub under {base}: install it with "
        f"`pip install --no-deps --target {base} nvidia-pytriton` (or set {HOME_ENV})"
    )


def prepare_backends(install: TritonInstall, dest: Path) -> Path:
    """A backend directory for ``--backend-directory``: the wheel's Python backend and its stub."""
    python = dest / "python"
    if python.exists():
        shutil.rmtree(python)
    shutil.copytree(install.python_backend, python, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(install.stub, python / "triton_python_backend_stub")
    return dest


class LocalTriton:
    """One ``tritonserver`` process serving ``repo`` on loopback ``http_port`` and ``grpc_port``.

    ``poll_seconds`` > 0 starts it with ``--model-control-mode=poll`` (new versions exported into the
    repository are loaded, removed ones unloaded, without a restart). ``python_path`` (default
    ``$SCREENER_TRITON_PYTHONPATH``, else ``var/triton-py``) is where ``model.py`` finds onnxruntime. The
    server's output goes to ``log_path``.
    """

    def __init__(
        self,
        repo: Path,
        workdir: Path,
        *,
        http_port: int,
        grpc_port: int,
        python_path: Path | None = None,
        poll_seconds: int = 0,
        install: TritonInstall | None = None,
    ) -> None:
        self.install = install or find_tritonserver()
        self.repo = Path(repo)
        self.workdir = Path(workdir)
        self.http_port = http_port
        self.grpc_port = grpc_port
        default_path = Path(os.environ.get(PYTHONPATH_ENV) or DEFAULT_PYTHONPATH)
        self.python_path = python_path if python_path is not None else default_path
        self.poll_seconds = poll_seconds
        self.log_path = self.workdir / "tritonserver.log"
        self.backends = prepare_backends(self.install, self.workdir / "backends")
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        cmd = [
            str(self.install.binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={self.backends}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--strict-readiness=false",
            "--exit-on-error=false",
        ]
        if self.poll_seconds > 0:
            cmd += ["--model-control-mode=poll", f"--repository-poll-secs={self.poll_seconds}"]
        return cmd

    def start(self, timeout: float = 120.0) -> None:
        """Start the server and wait until its HTTP endpoint says it is live; raises
        :class:`EngineUnavailableError` with the log's tail when it exits or does not answer."""
        if self.process is not None and self.process.poll() is None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env[PYTHONPATH_ENV] = str(self.python_path.resolve())  # read by model.py (triton_model.py)
        libs = [str(self.install.libs.resolve()), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineUnavailableError(
                    f"tritonserver exited with {self.process.returncode}: {self.log_tail()}"
                )
            if self.live():
                return
            time.sleep(0.2)
        self.stop()
        raise EngineUnavailableError(f"tritonserver did not answer within {timeout:g}s: {self.log_tail()}")

    def live(self) -> bool:
        """Whether the server answers ``/v2/health/live`` with 200."""
        return self._get("/v2/health/live") == 200

    def model_ready(self, name: str, version: int | None = None) -> bool:
        """Whether ``name`` (at ``version``) is loaded and ready."""
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version is not None else "") + "/ready"
        return self._get(path) == 200

    def wait_model(self, name: str, version: int | None = None, timeout: float = 120.0) -> None:
        """Wait until ``name`` (at ``version``) is ready; raises :class:`EngineUnavailableError` with the
        log's tail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.model_ready(name, version):
                return
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise EngineUnavailableError(
            f"Triton model {name} version {version} not ready within {timeout:g}s: {self.log_tail()}"
        )

    def _get(self, path: str) -> int | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=2)
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        except OSError:
            return None
        finally:
            conn.close()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server (and its backend stubs), SIGKILL after ``timeout``; a no-op when stopped."""
        proc = self.process
        self.process = None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

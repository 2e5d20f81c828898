"""A real Triton Inference Server for tests: the ``tritonserver`` of the nvidia-pytriton wheel.

Tests skip (with the command that fixes it) only where the pieces cannot be installed here: tritonclient
in the venv (the ``triton`` extra), the wheel's server (``pip install --no-deps --target var/pytriton
nvidia-pytriton``) and an onnxruntime for the system Python the Python-backend stub runs
(``pip install --no-deps --target var/triton-py onnxruntime``; numpy from Debian's python3-numpy).
``tests/run`` installs them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from screener.core.errors import EngineUnavailableError
from screener.model.triton_local import DEFAULT_PYTHONPATH, PYTHONPATH_ENV, LocalTriton, find_tritonserver
from tests.helpers import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


def triton_python_path() -> Path:
    """Where the stub's Python finds onnxruntime: ``$SCREENER_TRITON_PYTHONPATH``, else var/triton-py."""
    value = os.environ.get(PYTHONPATH_ENV)
    return Path(value) if value else REPO_ROOT / DEFAULT_PYTHONPATH


def require_triton() -> None:
    """Skip the calling test unless a real Triton can run here."""
    try:
        import tritonclient.grpc
        import tritonclient.http  # noqa: F401
    except ImportError:
        pytest.skip("tritonclient is not installed: pip install -e '.[triton]'")
    try:
        find_tritonserver(None if os.environ.get("SCREENER_TRITON_HOME") else REPO_ROOT / "var/pytriton")
    except EngineUnavailableError as exc:
        pytest.skip(str(exc))
    if not (triton_python_path() / "onnxruntime").is_dir():
        pytest.skip(
            f"no onnxruntime for the Python backend stub in {triton_python_path()}: "
            f"pip install --no-deps --target {triton_python_path()} onnxruntime"
        )


@contextmanager
def running_triton(repo: Path, workdir: Path, *, poll_seconds: int = 1) -> Iterator[LocalTriton]:
    """A started :class:`LocalTriton` on free loopback ports, stopped on exit."""
    home = os.environ.get("SCREENER_TRITON_HOME")
    server = LocalTriton(
        repo,
        workdir,
        http_port=free_port(),
        grpc_port=free_port(),
        python_path=triton_python_path(),
        poll_seconds=poll_seconds,
        install=find_tritonserver(Path(home) if home else REPO_ROOT / "var/pytriton"),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()

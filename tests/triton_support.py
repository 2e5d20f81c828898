"""A real Triton Inference Server for tests: the ``tritonserver`` of the nvidia-pytriton wheel.

Tests skip (with the command that fixes it) only where the pieces cannot be installed here: tritonclient
in the venv (the ``triton`` extra), the wheel's server (``pip install --no-deps --target var/pytriton
nvidia-pytriton``) and an onnxruntime for the system Python the Python-backend stub runs
(``pip install --no-deps --target var/triton-py onnxruntime``; numpy from Debian's python3-numpy).
``tests/run`` installs them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from screener.core.errors import EngineUnavailableError
from screener.model.triton_local import DEFAULT_PYTHONPATH, PYTHONPATH_ENV, LocalTriton, find_tritonserver
from tests.helpers import Server, cli, free_port, rg1_pixels, small_cr, store, wait_for

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


def run_fleet(
    make_server: Callable[..., Server],
    pg_url: str,
    model_dir: Path,
    tmp_path: Path,
    *,
    instances: int,
    outage: bool,
) -> list[Server]:
    """A listener and two workers on one PostgreSQL sharing one Triton (``inference.backend = "triton"``,
    the model exported with ``screener models export-triton``); ``instances`` CR images are sent, and with
    ``outage`` Triton is stopped once a quarter is classified and started again a few seconds later.
    Asserts that every instance ends classified with exactly one prediction, none failed, no attempt
    counted for the outage, and (with ``outage``) that the workers backed off and recovered."""
    require_triton()
    repo = tmp_path / "triton-repo"
    common = {
        "SCREENER__DATABASE__URL": pg_url,
        "SCREENER__STORAGE__SPOOL_DIR": str(tmp_path / "shared-spool"),
        "SCREENER__STORAGE__ORPHAN_GRACE_SECONDS": "300",
        "SCREENER__INFERENCE__BACKEND": "triton",
        "SCREENER__INFERENCE__PRECISION": "fp32",
        "SCREENER__INFERENCE__MAX_BATCH": "16",
        "SCREENER__INFERENCE__POLL_SECONDS": "0.1",
        "SCREENER__INFERENCE__PREPROCESS_WORKERS": "1",
        "SCREENER__INFERENCE__TRITON__PROTOCOL": "grpc",
        "SCREENER__INFERENCE__TRITON__RETRY_SECONDS": "0.2",
        "SCREENER__INFERENCE__TRITON__MAX_RETRY_SECONDS": "1.0",
        "SCREENER__INFERENCE__TRITON__REQUEST_TIMEOUT_SECONDS": "20",
    }
    listener = make_server(**common, role="listener")
    cli(listener, "db", "upgrade")
    cli(listener, "models", "register", str(model_dir), "--activate")
    exported = cli(listener, "models", "export-triton", "test-tiny-0", str(repo))
    assert "Triton version" in exported.stdout, exported.stdout + exported.stderr
    with running_triton(repo, tmp_path / "triton") as triton:
        triton.wait_model("cxr-screener")
        url = {"SCREENER__INFERENCE__TRITON__URL": triton.grpc_url}
        workers = [make_server(**common, **url, role="worker") for _ in range(2)]
        for server in (listener, *workers):
            server.start()
        studies = [generate_uid() for _ in range(max(1, instances // 30))]
        pixels = rg1_pixels(128)
        datasets = [small_cr(pixels, study_uid=studies[i % len(studies)]) for i in range(instances)]
        statuses: list[int | None] = []
        sender = threading.Thread(target=lambda: statuses.extend(store(listener.port, datasets)))
        sender.start()

        def classified() -> int:
            return int(listener.rows("SELECT count(*) FROM instances WHERE status = 'classified'")[0][0])

        if outage:
            wait_for(lambda: classified() >= instances // 4, 300, "a quarter classified before the outage")
            triton.stop()
            wait_for(
                lambda: any(e["event"] == "engine.unavailable" for w in workers for e in w.log_events()),
                60,
                "a worker noticing the outage",
            )
            time.sleep(2)  # several back-offs while Triton is down
            assert classified() < instances, "the outage came too late to matter"
            triton.start()
        sender.join(timeout=600)
        assert len(statuses) == instances and all(s == 0x0000 for s in statuses)
        wait_for(lambda: classified() == instances, 600, f"{instances} instances classified")
    by_status = dict(listener.rows("SELECT status, count(*) FROM instances GROUP BY status"))
    assert by_status == {"classified": instances}, by_status
    counts = listener.rows("SELECT instance_id, count(*) FROM predictions GROUP BY instance_id")
    assert len(counts) == instances and all(c == 1 for _, c in counts), "exactly one prediction each"
    assert listener.rows("SELECT max(attempts) FROM instances")[0][0] == 1, "the outage counted as attempts"
    assert {r[0] for r in listener.rows("SELECT DISTINCT backend FROM predictions")} == {"triton"}
    events = [e for w in workers for e in w.log_events()]
    assert all(any(e["event"] == "batch.done" for e in w.log_events()) for w in workers), "both took work"
    if outage:
        assert any(e["event"] == "engine.recovered" for e in events)
        assert not any(e["event"] in ("worker.step_failed", "worker.instance_gave_up") for e in events)
    return [listener, *workers]

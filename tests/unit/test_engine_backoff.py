"""The worker's back-off after a remote engine (Triton) fault: delays, /healthz and metrics."""

from __future__ import annotations

import pytest

from screener.core.errors import RemoteEngineError
from screener.core.metrics import Health, Metrics
from screener.inference.engine_backoff import EngineBackoff


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_faults_double_the_wait_fail_the_engine_check_and_clear_on_the_first_answer():
    metrics = Metrics()
    backoff = EngineBackoff(0.5, 3.0, metrics)
    health = Health()
    health.register("engine", backoff.check)
    assert health.check().healthy and _value(metrics, "screener_engine_available") == 1
    fault = RemoteEngineError("Triton at 127.0.0.1:8001 (grpc): inference of a batch of 4 failed")
    delays = [backoff.failed(fault, backend="triton", released=4) for _ in range(5)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    report = health.check()
    assert report.failing == ["engine"]
    error = report.as_dict()["checks"]["engine"]["error"]
    assert error.startswith("5 fault(s) in a row, backing off: Triton at 127.0.0.1:8001 (grpc)")
    assert _value(metrics, "screener_engine_available") == 0
    assert _value(metrics, "screener_engine_faults_total", backend="triton") == 5
    with pytest.raises(RemoteEngineError):
        backoff.check()
    backoff.succeeded("triton")
    assert health.check().healthy and backoff.faults == 0
    assert _value(metrics, "screener_engine_available") == 1
    assert backoff.failed(fault, backend="triton", released=1) == 0.5  # a new episode starts over

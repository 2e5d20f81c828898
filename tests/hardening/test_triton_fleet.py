"""Two workers on one PostgreSQL sharing one real Triton; Triton stopped mid-run and started again.

300 instances in the full hardening run (``tests/hardening/run``, HARDENING_ROUNDS >= 5), 60 in CI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.hardening.conftest import Figure, rounds
from tests.triton_support import run_fleet


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_share_one_triton_through_an_outage_and_classify_each_instance_once(
    make_server: Any, pg_url: str, tiny_model_dir: Path, tmp_path: Path, figure: Figure
):
    instances = 300 if rounds(2) >= 5 else 60
    servers = run_fleet(make_server, pg_url, tiny_model_dir, tmp_path, instances=instances, outage=True)
    events = [e for s in servers for e in s.log_events()]
    faults = [e for e in events if e["event"] == "engine.unavailable"]
    recovered = [e for e in events if e["event"] == "engine.recovered"]
    figure("instances classified exactly once", instances, "instances", lost=0, failed=0)
    figure("batches released during the outage", sum(e.get("released", 0) > 0 for e in faults), "batches")
    figure("longest back-off episode", max(float(e["down_s"]) for e in recovered), "s")

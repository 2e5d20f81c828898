"""A lost database is signalled where alerting can see it: a log event and ``screener_database_lost``.

The in-process alerts (issue 17) are outbox rows, which need a database; the metric and the log event do
not, so a Prometheus rule or a log shipper can page someone when the database itself is what was lost.
"""

from __future__ import annotations

import time
from pathlib import Path

from structlog.testing import capture_logs

from screener.core.config import DatabaseConfig
from screener.core.db.migrate import upgrade
from screener.core.db.session import make_engine
from screener.core.identity import DatabaseGuard, bind_store
from screener.core.metrics import Metrics
from screener.core.spool import Spool


def _lost_value(metrics: Metrics) -> str:
    for line in metrics.exposition().decode().splitlines():
        if line.startswith("screener_database_lost "):
            return line.split()[1]
    raise AssertionError("screener_database_lost is not exported")


def test_deleting_the_sqlite_file_sets_the_metric_and_logs_the_reason(tmp_path: Path):
    db_file = tmp_path / "screener.db"
    engine = make_engine(DatabaseConfig(url=f"sqlite:///{db_file}"))
    upgrade(engine)
    spool = Spool(tmp_path / "spool", 0)
    spool.ensure_layout()
    guard = DatabaseGuard(engine, bind_store(spool, engine), interval=0.1)
    metrics = Metrics()
    metrics.watch_store(lambda: guard.problem)
    assert _lost_value(metrics) == "0.0"
    with capture_logs() as logs:
        guard.start()
        try:
            time.sleep(0.3)
            assert guard.problem is None and _lost_value(metrics) == "0.0", "a healthy store is not lost"
            db_file.unlink()
            deadline = time.monotonic() + 5
            while guard.problem is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            guard.stop()
            engine.dispose()
    assert _lost_value(metrics) == "1.0"
    lost = [e for e in logs if e["event"] == "database.lost"]
    assert len(lost) == 1 and lost[0]["log_level"] == "error"
    assert "was deleted" in lost[0]["reason"] and "db rebuild --from-spool" in lost[0]["hint"]

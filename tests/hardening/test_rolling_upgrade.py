"""Rolling upgrade: the next schema version applied while listeners and a worker serve; 0 lost.

The deployment that upgrades in place is the multi-process one: two listeners (a load balancer in front)
and a worker, all on one PostgreSQL and one shared spool, ``database.auto_migrate = false``. The next
release ("v2") is this checkout's daemon plus one real migration
(``tests/hardening/rolling_upgrade_migration.py``: a NOT NULL column with a server default on
``instances``, a backfill of every row, a new index), put in its own import root. The operator's
procedure, run here while four associations keep storing:

1. v2's ``screener db upgrade`` against the live database (the current release keeps serving on it);
2. each process in turn (listener 1, listener 2, worker) stopped with SIGTERM (it drains) and started
   again on v2, which now finds the database at its head.

A sender whose listener is restarting goes to the other one, as through a load balancer; what was refused
is resent at the end, as a PACS does. Checked: every 0x0000 is a row with its file, classified exactly
once; the database is at v2's head and v2's column is filled; nothing in the spool without its row.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from screener.core.db.migrate import head_revision
from screener.core.pynetdicom_compat import keep_responses_for_caller
from tests.hardening.conftest import Figure
from tests.helpers import (
    CR_STORAGE,
    REPO,
    SCREENER,
    Server,
    assert_spool_consistent,
    cli,
    rg1_pixels,
    small_cr,
    store,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

MIGRATION = Path(__file__).with_name("rolling_upgrade_migration.py")
V2_REVISION = "rolling_upgrade_v2"
STREAMS = 4
PACE_S = 1.0  # between stores on one association: ~4 instances/s in all, what the worker keeps up with
SETTINGS = {
    "SCREENER__DATABASE__AUTO_MIGRATE": "false",  # the upgrade is the operator's explicit step
    "SCREENER__DATABASE__STATEMENT_TIMEOUT_SECONDS": "2",
    # Several listeners share the spool: a starting one must not sweep another's file that is waiting for
    # its row (the tests' default is 0 s; this is the shipped default).
    "SCREENER__STORAGE__ORPHAN_GRACE_SECONDS": "300",
    "SCREENER__INFERENCE__POLL_SECONDS": "0.2",
    "SCREENER__INFERENCE__PREPROCESS_WORKERS": "1",
    "SCREENER__INFERENCE__MAX_BATCH": "32",
    "SCREENER__INFERENCE__STUDY_SETTLE_SECONDS": "2",
}

Result = tuple[Dataset, int | None, float, int]  # data set, status, answered at, listener port


def release_v2(root: Path) -> Path:
    """The next release in its own import root: this daemon plus the migration, after the current head."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "screener", root / "screener", ignore=ignore)
    shutil.copytree(REPO / "migrations", root / "screener" / "_migrations", ignore=ignore)
    marker = "down_revision: str | None = None"
    source = MIGRATION.read_text(encoding="utf-8")
    assert marker in source, f"{MIGRATION.name} lost its down_revision marker"
    versions = root / "screener" / "_migrations" / "versions"
    (versions / "9000_rolling_upgrade_v2.py").write_text(
        source.replace(marker, f'down_revision = "{head_revision()}"'), encoding="utf-8"
    )
    return root


def _stream(ports: tuple[int, int], study: str, stop: threading.Event, out: list[Result]) -> None:
    """Store fresh instances until ``stop``; an association refused or cut goes to the other listener."""
    pixels = rg1_pixels(128)
    turn = 0
    while not stop.is_set():
        port = ports[turn % 2]
        ae = AE(ae_title="UPGRADE")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(CR_STORAGE, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRSCREENER")
        if not assoc.is_established:
            turn += 1
            time.sleep(0.1)
            continue
        keep_responses_for_caller(assoc)
        try:
            for _ in range(20):  # a PACS forwards a few studies per association, then lets it go
                if stop.is_set() or not assoc.is_established:
                    break
                ds = small_cr(pixels, study_uid=study)
                try:
                    rsp = assoc.send_c_store(ds)
                    status = int(rsp.Status) if rsp and "Status" in rsp else None
                except (RuntimeError, OSError, ValueError):
                    status = None
                out.append((ds, status, time.monotonic(), port))
                if status != 0x0000:
                    turn += 1
                    break
                stop.wait(PACE_S)
        finally:
            if assoc.is_established:
                assoc.release()


def test_next_schema_version_applied_under_load_then_processes_rolled_one_by_one(
    make_server, tiny_model_dir: Path, pg_url: str, tmp_path: Path, figure: Figure
):
    v2 = release_v2(tmp_path / "release-v2")
    common = {
        **SETTINGS,
        "SCREENER__DATABASE__URL": pg_url,
        "SCREENER__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
    }
    listener_1: Server = make_server(role="listener", **common)
    listener_2: Server = make_server(role="listener", **common)
    worker: Server = make_server(role="worker", **common)
    cli(listener_1, "db", "upgrade")
    cli(listener_1, "models", "register", str(tiny_model_dir), "--activate")
    for process in (listener_1, listener_2, worker):
        process.start()

    study = generate_uid()
    results: list[Result] = []
    stop = threading.Event()
    ports = (listener_1.port, listener_2.port)
    streams = [
        threading.Thread(target=_stream, args=(ports if k % 2 == 0 else ports[::-1], study, stop, results))
        for k in range(STREAMS)
    ]
    started = time.monotonic()
    for t in streams:
        t.start()
    time.sleep(3)

    # 1. The schema's next version, by v2's own command, while this release serves.
    rows_before = listener_1.rows("SELECT count(*) FROM instances")[0][0]
    migrate_at = time.monotonic()
    upgrade = subprocess.run(
        [str(SCREENER), "db", "upgrade"],
        cwd=listener_1.workdir,
        env={**listener_1.env(), "PYTHONPATH": str(v2)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    migrated_at = time.monotonic()
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert listener_1.rows("SELECT version_num FROM alembic_version") == [(V2_REVISION,)]
    time.sleep(2)
    served_by_v1_on_v2 = sum(1 for _, s, at, _ in results if s == 0x0000 and at > migrated_at)

    # 2. Every process in turn: SIGTERM (drains), then v2 in its place.
    gaps: dict[str, float] = {}
    for name, process in (("listener_1", listener_1), ("listener_2", listener_2), ("worker", worker)):
        down = time.monotonic()
        assert process.stop() == 0, f"{name} did not stop cleanly:\n{process.log_text()[-3000:]}"
        process.overrides["PYTHONPATH"] = str(v2)
        process.start()
        gaps[name] = round(time.monotonic() - down, 1)
        time.sleep(2)
    time.sleep(2)
    stop.set()
    for t in streams:
        t.join(timeout=120)
    load_seconds = time.monotonic() - started
    v2_started = [p for p in (listener_1, listener_2, worker) if str(v2) in p.env().get("PYTHONPATH", "")]
    assert len(v2_started) == 3

    acked = {str(ds.SOPInstanceUID) for ds, s, _, _ in results if s == 0x0000}
    refused = [(ds, s) for ds, s, _, _ in results if s != 0x0000]
    during_migration = [s for _, s, at, _ in results if migrate_at <= at <= migrated_at]
    stored = {r[0] for r in listener_1.rows("SELECT sop_instance_uid FROM instances")}
    lost = acked - stored
    resent = store(listener_2.port, [ds for ds, _ in refused], calling="UPGRADE") if refused else []
    assert all(s == 0x0000 for s in resent), f"resend on v2 refused: {sorted(set(map(str, resent)))}"
    everything = {str(ds.SOPInstanceUID) for ds, *_ in results}
    wait_for(
        lambda: (
            listener_1.rows("SELECT count(*) FROM instances WHERE status = 'classified'")[0][0]
            >= len(everything)
        ),
        300,
        "every instance classified by the v2 worker",
    )
    assert_spool_consistent(listener_1)
    once = dict(
        listener_1.rows(
            "SELECT i.sop_instance_uid, count(p.id) FROM instances i "
            "LEFT JOIN predictions p ON p.instance_id = i.id GROUP BY i.sop_instance_uid"
        )
    )
    not_once = {u: n for u, n in once.items() if n != 1}
    priorities = dict(listener_1.rows("SELECT priority, count(*) FROM instances GROUP BY priority"))

    figure(
        "upgrade.stores",
        len(results),
        "C-STOREs",
        acked=len(acked),
        refused_or_unanswered=len(refused),
        load_s=round(load_seconds, 1),
        listeners=2,
        workers=1,
    )
    figure(
        "upgrade.migration",
        round(migrated_at - migrate_at, 2),
        "s",
        stores_answered_meanwhile=len(during_migration),
        of_them_0x0000=during_migration.count(0x0000),
        acked_by_v1_on_v2_schema=served_by_v1_on_v2,
        rows_at_migration=rows_before,
    )
    figure("upgrade.restart_gaps", max(gaps.values()), "s", **gaps)
    figure("upgrade.lost", len(lost), "instances", not_classified_once=len(not_once), resent=len(refused))
    assert not lost, f"{len(lost)} acknowledged instances lost across the upgrade"
    assert not not_once, f"instances not classified exactly once: {list(not_once.values())[:5]}"
    assert set(once) == everything, "every instance stored once, nothing else"
    assert served_by_v1_on_v2 > 0, "the current release kept storing on the new schema"
    assert sum(priorities.values()) == len(everything) and set(priorities) <= {0, 1}
    assert listener_1.rows("SELECT version_num FROM alembic_version") == [(V2_REVISION,)]

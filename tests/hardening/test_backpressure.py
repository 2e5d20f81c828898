"""Back-pressure: with classification stalled, the listener answers 0xA700 past listener.queue_high_water.

A listener runs alone (no worker) with a small high-water mark; a PACS pushes more instances than that.
The first ones are accepted, the rest refused with 0xA700 (Out of Resources, PS3.4 B.2.3), and nothing
accepted is lost. A worker started later on the same database and spool classifies every accepted
instance exactly once; the refused ones, sent again, are then accepted.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid

from tests.hardening.conftest import Figure
from tests.helpers import assert_spool_consistent, cli, rg1_pixels, small_cr, store, wait_for

HIGH_WATER = 50
SENT = 80


def test_queue_high_water_refuses_then_everything_accepted_is_classified(
    make_server, tiny_model_dir: Path, tmp_path: Path, figure: Figure
):
    common = {
        "SCREENER__DATABASE__URL": f"sqlite:///{tmp_path / 'shared.db'}",
        "SCREENER__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
        "SCREENER__STORAGE__ORPHAN_GRACE_SECONDS": "300",
        "SCREENER__LISTENER__QUEUE_HIGH_WATER": str(HIGH_WATER),
        "SCREENER__INFERENCE__POLL_SECONDS": "0.1",
        "SCREENER__INFERENCE__PREPROCESS_WORKERS": "1",
        "SCREENER__INFERENCE__MAX_BATCH": "16",
        "SCREENER__INFERENCE__STUDY_SETTLE_SECONDS": "1",
    }
    listener = make_server(role="listener", **common)
    cli(listener, "db", "upgrade")
    cli(listener, "models", "register", str(tiny_model_dir), "--activate")
    listener.start()

    studies = [generate_uid() for _ in range(8)]
    pixels = rg1_pixels(128)
    instances = [small_cr(pixels, study_uid=studies[i % 8]) for i in range(SENT)]
    statuses = store(listener.port, instances)
    accepted = [str(ds.SOPInstanceUID) for ds, s in zip(instances, statuses, strict=True) if s == 0x0000]
    refused = [ds for ds, s in zip(instances, statuses, strict=True) if s == 0xA700]
    assert statuses == [0x0000] * HIGH_WATER + [0xA700] * (SENT - HIGH_WATER)

    rows = {r[0] for r in listener.rows("SELECT sop_instance_uid FROM instances WHERE status = 'queued'")}
    assert rows == set(accepted), "every accepted instance has its row, no refused one has"
    assert len(listener.spool_files()) == len(accepted)
    assert_spool_consistent(listener)
    full = [e for e in listener.log_events() if e.get("outcome") == "queue_full"]
    assert len(full) == len(refused) and all(e["status"] == "0xA700" for e in full)
    assert "listener.queue_high_water = 50" in full[0]["detail"]

    worker = make_server(role="worker", **common).start()
    classified = "SELECT count(*) FROM instances WHERE status = 'classified'"
    wait_for(lambda: worker.rows(classified)[0][0] == len(accepted), 300, "accepted instances classified")
    # The queue has drained: the PACS retries what was refused and is served this time.
    wait_for(lambda: store(listener.port, refused[:1]) == [0x0000], 10, "the listener to accept again")
    assert store(listener.port, refused[1:]) == [0x0000] * (len(refused) - 1)
    wait_for(lambda: worker.rows(classified)[0][0] == SENT, 300, "all instances classified")

    per_instance = worker.rows(
        "SELECT i.sop_instance_uid, count(p.id) FROM instances i "
        "LEFT JOIN predictions p ON p.instance_id = i.id GROUP BY i.sop_instance_uid"
    )
    assert len(per_instance) == SENT and all(n == 1 for _, n in per_instance), "one prediction each"
    lost = set(accepted) - {uid for uid, n in per_instance if n == 1}
    assert not lost
    assert_spool_consistent(listener)
    figure("accepted", len(accepted), "instances", high_water=HIGH_WATER, sent=SENT)
    figure("refused", len(refused), "instances", status="0xA700")
    figure("classified", worker.rows(classified)[0][0], "instances")
    figure("lost", len(lost), "instances")

"""Reporting views and `screener report`: a real listener -> worker -> sender run fills the database, on
SQLite and on PostgreSQL; each report must give back the numbers that run produced."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from pydicom.uid import generate_uid
from sqlalchemy import Engine, create_engine, inspect, text

from screener.core.db.migrate import _alembic_config, current_revision, head_revision, upgrade
from screener.ops.reporting import (
    REPORTS,
    ReportError,
    class_metrics,
    confusion_counts,
    delivery_summary,
    percentile,
    run_report,
    turnaround_summary,
)
from tests.helpers import (
    FakePacs,
    Server,
    cli,
    free_port,
    rg1_pixels,
    scratch_database,
    small_cr,
    store,
    wait_for,
)

VIEWS = {
    "report_daily_volume",
    "report_daily_verdicts",
    "report_positives",
    "report_turnaround",
    "report_performance",
    "report_delivery_failures",
}
POSITIVE = {"covid19", "viral_pneumonia"}
PHI = ("Doe^Jane", "PID-778899", "19610203", "ACC-5566")


# --- pure functions -------------------------------------------------------------------------------------


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(list(range(1, 101)), 90) == pytest.approx(90.1)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="outside 0-100"):
        percentile(values, 101)


def test_sensitivity_and_ppv_from_confusion_counts() -> None:
    pairs = [("covid19", "covid19")] * 3 + [("covid19", "normal")] + [("normal", "covid19")] * 2
    pairs += [("normal", "normal")] * 4
    counts = confusion_counts(pairs)
    assert counts == {("covid19", "covid19"): 3, ("covid19", "normal"): 1, ("normal", "covid19"): 2,
                      ("normal", "normal"): 4}  # fmt: skip
    metrics = {m.label: m for m in class_metrics(counts)}
    assert metrics["covid19"].sensitivity == 3 / 4 and metrics["covid19"].ppv == 3 / 5
    assert metrics["normal"].sensitivity == 4 / 6 and metrics["normal"].ppv == 4 / 5
    vp = metrics["viral_pneumonia"]
    assert (vp.support, vp.predicted, vp.sensitivity, vp.ppv) == (0, 0, None, None)


def test_delivery_summary_is_the_worst_status() -> None:
    assert delivery_summary([]) == "none"
    assert delivery_summary(["sent", "sent"]) == "sent"
    assert delivery_summary(["sent", "pending"]) == "pending"
    assert delivery_summary(["pending", "failed", "sent"]) == "failed"
    assert delivery_summary(["failed", "dead"]) == "dead"


def test_turnaround_summary_leaves_undelivered_results_out_of_the_delivery_line() -> None:
    rows = [
        {"seconds_to_result": float(s), "seconds_to_delivery": None if s == 3 else s + 1.0} for s in (1, 2, 3)
    ]
    result, delivery = turnaround_summary(rows)
    assert result == {
        "measure": "seconds_to_result",
        "n": 3,
        "missing": 0,
        "p50": 2.0,
        "p90": 2.8,
        "p99": 2.98,
    }
    assert delivery["n"] == 2 and delivery["missing"] == 1 and delivery["p50"] == 2.5


# --- migration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_views_are_created_by_upgrade_and_dropped_by_downgrade(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    engine = create_engine(url)
    try:
        # Up and down across 0006 alone: later revisions' own downgrades are not this test's subject.
        upgrade(engine, "0006")
        assert set(inspect(engine).get_view_names()) >= VIEWS
        cfg = _alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0005")
        assert not VIEWS & set(inspect(engine).get_view_names())
        upgrade(engine)
        assert set(inspect(engine).get_view_names()) >= VIEWS
        # An empty database gives empty reports, not errors.
        for name in REPORTS:
            doc = json.loads(run_report(engine, name, None, None, "json"))
            if name == "turnaround":  # the percentile lines are always there, over nothing
                assert [row["n"] for row in doc["tables"][0]["rows"]] == [0, 0]
                assert doc["tables"][0]["rows"][0]["p50"] is None
                doc["tables"] = doc["tables"][1:]
            assert all(t["rows"] == [] for t in doc["tables"]), name
            assert "(no rows)" in run_report(engine, name, None, None, "table")
    finally:
        engine.dispose()


# --- one real end-to-end run per backend ------------------------------------------------------------------


@dataclass
class Run:
    server: Server
    engine: Engine
    backend: str
    studies: dict[str, str]  # name -> Study Instance UID
    sops: dict[str, str]  # name -> SOP Instance UID

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params))


def _report(
    run: Run, name: str, since: date | None = None, until: date | None = None
) -> list[dict[str, Any]]:
    """The report's tables (JSON format), as a list of {title, columns, rows}."""
    doc = json.loads(run_report(run.engine, name, since, until, "json"))
    assert doc["report"] == name
    return list(doc["tables"])


def _label_rows(run: Run) -> None:
    """Confirmed labels: by SOP UID (an older and a newer import: the newer wins), by study UID (overridden
    for instances that have their own SOP label), and one for a skipped instance that has no prediction."""
    old = datetime.now(UTC) - timedelta(days=1)
    now = datetime.now(UTC)
    rows = [
        ("a1", None, "normal", old),
        ("a1", None, "covid19", now),
        (None, "A", "viral_pneumonia", now),  # reaches a2 only: a1 has its own label
        (None, "B", "normal", now),
        ("c1", None, "covid19", now),
        ("d1", None, "normal", now),  # skipped, never predicted: not in the report
    ]
    with run.engine.begin() as conn:
        for sop, study, label, imported in rows:
            conn.execute(
                text(
                    "INSERT INTO labels (sop_instance_uid, study_instance_uid, label, confirmed_by,"
                    " confirmed_at, imported_at) VALUES (:sop, :study, :label, 'radiologist', :at, :at)"
                ),
                {
                    "sop": run.sops[sop] if sop else None,
                    "study": run.studies[study] if study else None,
                    "label": label,
                    "at": imported,
                },
            )


EXPECTED_TRUTH = {"a1": "covid19", "a2": "viral_pneumonia", "b1": "normal", "c1": "covid19"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Run]:
    """Studies A (2 frontal) and B (1 frontal) delivered to the PACS; C (frontal) and D (lateral, so not
    analysed) refused by it with 0xC000 (dead letters). Then the server is stopped and labels imported."""
    backend: str = request.param
    with contextlib.ExitStack() as stack:
        workdir = tmp_path_factory.mktemp(f"report-{backend}")
        pacs = FakePacs()
        overrides = {
            "SCREENER__PACS__DESTINATIONS": f'[{{ae_title="FAKEPACS", host="127.0.0.1", port={pacs.port}}}]',
            "SCREENER__PACS__BACKOFF_INITIAL_SECONDS": "0.3",
            "SCREENER__PACS__BACKOFF_MAX_SECONDS": "1",
            "SCREENER__PACS__SWEEP_SECONDS": "0.2",
            "SCREENER__PACS__TIMEOUT_SECONDS": "5",
            "SCREENER__INFERENCE__STUDY_SETTLE_SECONDS": "1",
            "SCREENER__INFERENCE__MAX_WAIT_MS": "100",
            "SCREENER__INFERENCE__POLL_SECONDS": "0.2",
            "SCREENER__INFERENCE__PREPROCESS_WORKERS": "1",
        }
        if backend == "postgresql":
            overrides["SCREENER__DATABASE__URL"] = stack.enter_context(scratch_database())
        server = Server(workdir=workdir, port=free_port(), overrides=overrides)
        cli(server, "db", "upgrade")
        # the reports, not the model, are under test: the small model starts and classifies in less time
        cli(server, "models", "register", str(tiny_model_dir), "--activate")
        pacs.start()
        stack.callback(pacs.stop)
        server.start()

        def kill_if_running() -> None:
            if server.proc is not None and server.proc.poll() is None:
                server.kill9()

        stack.callback(kill_if_running)

        studies = {name: str(generate_uid()) for name in "ABCD"}
        pixels = rg1_pixels(256)
        phi = dict(zip(("patient_name", "patient_id", "birth_date", "accession"), PHI, strict=True))
        datasets = {
            "a1": small_cr(pixels, study_uid=studies["A"], **phi),
            "a2": small_cr(pixels[:, ::-1].copy(), study_uid=studies["A"], **phi),
            "b1": small_cr(4095 - pixels, study_uid=studies["B"], **phi),
            "c1": small_cr(pixels[::-1, :].copy(), study_uid=studies["C"], **phi),
            "d1": small_cr(pixels, study_uid=studies["D"], **phi),
        }
        datasets["d1"].ViewPosition = "LL"
        sops = {name: str(ds.SOPInstanceUID) for name, ds in datasets.items()}
        r = Run(server, create_engine(server.db_url), backend, studies, sops)
        stack.callback(r.engine.dispose)

        assert store(server.port, [datasets[n] for n in ("a1", "a2", "b1")]) == [0x0000] * 3

        def delivered() -> bool:
            statuses = {s for (s,) in r.rows("SELECT status FROM deliveries")}
            return statuses == {"sent"} and len(r.rows("SELECT id FROM study_results")) == 2

        wait_for(delivered, 240, "results of A and B delivered")
        pacs.answer = 0xC000  # the PACS now refuses everything as unreadable: fatal, dead at once
        assert store(server.port, [datasets["c1"], datasets["d1"]]) == [0x0000] * 2

        def settled() -> bool:
            statuses = [s for (s,) in r.rows("SELECT status FROM deliveries")]
            return (
                len(r.rows("SELECT id FROM study_results")) == 4
                and "dead" in statuses
                and not {"pending", "failed"} & set(statuses)
            )

        wait_for(settled, 240, "results of C and D, refused by the PACS")
        assert server.stop() == 0
        _label_rows(r)
        yield r


@pytest.mark.slow
def test_views_exist_after_the_run(run: Run) -> None:
    assert current_revision(run.engine) == head_revision()
    assert set(inspect(run.engine).get_view_names()) >= VIEWS


@pytest.mark.slow
def test_daily_counts_the_instances_and_verdicts_of_the_run(run: Run) -> None:
    (daily,) = _report(run, "daily")
    today = datetime.now(UTC).date()
    # Around midnight UTC the run may straddle two days; the totals must still match.
    assert {row["day"] for row in daily["rows"]} <= {
        today.isoformat(),
        (today - timedelta(days=1)).isoformat(),
    }

    def total(column: str) -> int:
        return sum(int(row[column]) for row in daily["rows"])

    statuses = Counter(s for (s,) in run.rows("SELECT status FROM instances"))
    assert total("received") == 5
    assert statuses["classified"] == 4 and statuses["skipped"] == 1
    for status in ("queued", "processing", "classified", "skipped", "failed"):
        assert total(status) == statuses[status], status
    verdicts = Counter(v for (v,) in run.rows("SELECT verdict FROM study_results"))
    assert total("results") == 4 and verdicts["not_analysed"] == 1
    for verdict in ("normal", "covid19", "viral_pneumonia", "not_analysed"):
        assert total(verdict) == verdicts[verdict], verdict


def _latest_results(run: Run) -> dict[str, tuple[int, str]]:
    """Study UID -> (id, verdict) of its latest study result."""
    rows = run.rows(
        "SELECT s.study_instance_uid, r.id, r.verdict FROM study_results r"
        " JOIN studies s ON s.id = r.study_id ORDER BY r.id"
    )
    return {uid: (rid, verdict) for uid, rid, verdict in rows}


def _statuses_by_result(run: Run) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for rid, status in run.rows("SELECT study_result_id, status FROM deliveries"):
        out.setdefault(rid, []).append(status)
    return out


@pytest.mark.slow
def test_positives_lists_exactly_the_positive_studies_with_their_delivery_status(run: Run) -> None:
    (positives,) = _report(run, "positives")
    latest = _latest_results(run)
    by_result = _statuses_by_result(run)
    expected = {uid for uid, (_, verdict) in latest.items() if verdict in POSITIVE}
    listed = {row["study_instance_uid"]: row for row in positives["rows"]}
    assert set(listed) == expected
    for uid, row in listed.items():
        rid, verdict = latest[uid]
        assert row["verdict"] == verdict
        assert row["delivery_status"] == delivery_summary(by_result.get(rid, []))
        assert row["model_version"] == "test-tiny-0"
        assert row["p_normal"] + row["p_covid19"] + row["p_viral_pneumonia"] == pytest.approx(1.0, abs=1e-3)
        assert row["arrived_at"] <= row["result_at"]
    # The same rows through the view and SQL an analyst would type.
    with_sql = {uid for (uid,) in run.rows("SELECT study_instance_uid FROM report_positives")}
    assert with_sql == expected


@pytest.mark.slow
def test_turnaround_has_one_row_per_study_result_and_percentiles_over_them(run: Run) -> None:
    summary, per_result = _report(run, "turnaround")
    assert len(per_result["rows"]) == len(run.rows("SELECT id FROM study_results")) == 4
    by_result = _statuses_by_result(run)
    latest = _latest_results(run)
    delivered = {r["study_instance_uid"] for r in per_result["rows"] if r["seconds_to_delivery"] is not None}
    assert delivered == {run.studies["A"], run.studies["B"]}, "only A and B reached the PACS"
    for row in per_result["rows"]:
        assert 0 <= row["seconds_to_result"] < 300
        rid, _ = latest[row["study_instance_uid"]]
        assert row["delivery_status"] == delivery_summary(by_result.get(rid, []))
        if row["seconds_to_delivery"] is not None:
            assert row["seconds_to_delivery"] >= row["seconds_to_result"]
            assert row["delivered_at"] >= row["result_at"]
    result_line, delivery_line = summary["rows"]
    seconds = sorted(r["seconds_to_result"] for r in per_result["rows"])
    assert result_line["n"] == 4 and result_line["p50"] == pytest.approx(percentile(seconds, 50), abs=1e-3)
    assert seconds[0] <= result_line["p90"] <= result_line["p99"] <= seconds[-1] + 1e-3
    assert delivery_line["n"] == 2 and delivery_line["missing"] == 2


@pytest.mark.slow
def test_performance_confusion_counts_match_predictions_and_labels(run: Run) -> None:
    confusion, metrics = _report(run, "performance")
    predicted = dict(
        run.rows(
            "SELECT i.sop_instance_uid, p.label FROM predictions p JOIN instances i ON i.id = p.instance_id"
        )
    )
    expected = Counter((EXPECTED_TRUTH[n], predicted[run.sops[n]]) for n in EXPECTED_TRUTH)
    got: Counter[tuple[str, str]] = Counter()
    for row in confusion["rows"]:
        assert row["model_version"] == "test-tiny-0"
        for key, n in row.items():
            if key.startswith("pred_") and n:
                got[(row["true_label"], key.removeprefix("pred_"))] = n
    assert got == expected
    for m in metrics["rows"]:
        tp = expected[(m["label"], m["label"])]
        support = sum(n for (t, _), n in expected.items() if t == m["label"])
        called = sum(n for (_, p), n in expected.items() if p == m["label"])
        assert (m["support"], m["predicted"], m["true_positives"]) == (support, called, tp)
        assert m["sensitivity"] == (round(tp / support, 4) if support else None)
        assert m["ppv"] == (round(tp / called, 4) if called else None)
    sources = dict(run.rows("SELECT sop_instance_uid, label_source FROM report_performance"))
    assert sources == {
        run.sops["a1"]: "sop_instance_uid",
        run.sops["a2"]: "study_instance_uid",
        run.sops["b1"]: "study_instance_uid",
        run.sops["c1"]: "sop_instance_uid",
    }


@pytest.mark.slow
def test_deliveries_lists_the_dead_letters_of_the_run(run: Run) -> None:
    (failures,) = _report(run, "deliveries")
    dead = run.rows(
        "SELECT s.study_instance_uid, d.attempts FROM deliveries d"
        " JOIN study_results r ON r.id = d.study_result_id"
        " JOIN studies s ON s.id = r.study_id WHERE d.status IN ('failed', 'dead')"
    )
    assert len(dead) >= 1
    assert (
        {r["study_instance_uid"] for r in failures["rows"]}
        == {uid for uid, _ in dead}
        <= {
            run.studies["C"],
            run.studies["D"],
        }
    )
    for row in failures["rows"]:
        assert row["status"] == "dead" and row["attempts"] >= 1
        assert row["destination"].startswith("FAKEPACS") and "0xC000" in row["last_error"]


@pytest.mark.slow
def test_since_until_filter_by_day_and_formats_carry_no_phi(run: Run) -> None:
    today = datetime.now(UTC).date()
    tomorrow = today + timedelta(days=1)
    assert _report(run, "turnaround", since=tomorrow)[1]["rows"] == []
    assert len(_report(run, "turnaround", since=today - timedelta(days=1), until=tomorrow)[1]["rows"]) == 4
    assert _report(run, "daily", until=today - timedelta(days=2))[0]["rows"] == []
    for name in REPORTS:
        for fmt in ("table", "csv", "json"):
            out = run_report(run.engine, name, None, None, fmt)
            assert not any(value in out for value in PHI), (name, fmt)
    table = run_report(run.engine, "positives", None, None, "table")
    for uid, (_, verdict) in _latest_results(run).items():
        assert (uid in table) == (verdict in POSITIVE)
    rows = list(csv.DictReader(io.StringIO(run_report(run.engine, "daily", None, None, "csv"))))
    assert sum(int(r["received"]) for r in rows) == 5


@pytest.mark.slow
def test_bad_arguments_raise_report_errors(run: Run) -> None:
    with pytest.raises(ReportError, match="unknown report 'weekly'"):
        run_report(run.engine, "weekly", None, None, "table")
    with pytest.raises(ReportError, match="unknown report format 'xml'"):
        run_report(run.engine, "daily", None, None, "xml")
    with pytest.raises(ReportError, match="--since 2026-02-02 is after --until 2026-02-01"):
        run_report(run.engine, "daily", date(2026, 2, 2), date(2026, 2, 1), "table")

"""Shadow mode (`results.mode`), `screener report site-performance` and `screener report drift`.

The statistics are checked on their own; the reports on a database filled with known rows, on SQLite and
PostgreSQL; shadow mode end to end through `screener serve` against a real storage SCP."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from itertools import product
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from screener.core.db.migrate import upgrade
from screener.core.db.models import (
    Instance,
    InstanceStatus,
    Label,
    ModelStatus,
    ModelVersion,
    Prediction,
    Study,
)
from screener.core.stats import (
    binary_auc,
    calibration,
    class_figures,
    macro_auc,
    psi,
    psi_flag,
    wilson_interval,
)
from screener.ops.drift import CardReferenceError, card_reference, size_bin
from screener.ops.reporting import ReportError, ReportOptions, run_report
from tests.helpers import FakePacs, cli, rg1_pixels, scratch_database, small_cr, store, wait_for

CLASSES = ("normal", "covid19", "viral_pneumonia")

# --- pure statistics ------------------------------------------------------------------------------------


def test_wilson_interval_matches_the_published_values() -> None:
    low, high = wilson_interval(8, 10) or (0.0, 0.0)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # Brown, Cai, DasGupta 2001 style check
    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(0, 5) or (1.0, 1.0)
    assert low == 0.0 and 0.4 < high < 0.45
    with pytest.raises(ValueError, match="outside"):
        wilson_interval(3, 2)


def test_auc_is_the_share_of_correctly_ordered_pairs() -> None:
    positive = [True, True, False, False, True, False]
    scores = [0.9, 0.4, 0.4, 0.1, 0.7, 0.8]
    pairs = [
        1.0 if a > b else 0.5 if a == b else 0.0
        for (a, pa), (b, pb) in product(zip(scores, positive, strict=True), repeat=2)
        if pa and not pb
    ]
    assert binary_auc(positive, scores) == pytest.approx(sum(pairs) / len(pairs))
    assert binary_auc([True, True], [0.1, 0.2]) is None
    truth = ["normal", "covid19", "covid19", "normal"]
    probs = [[0.8, 0.2, 0.0], [0.3, 0.7, 0.0], [0.6, 0.4, 0.0], [0.4, 0.6, 0.0]]
    # viral pneumonia is absent: the mean is over normal and covid19 only
    assert macro_auc(truth, probs, CLASSES) == pytest.approx(0.75)
    assert macro_auc(["normal"], [[1.0, 0.0, 0.0]], CLASSES) is None


def test_ece_and_class_figures() -> None:
    truth = ["normal", "normal", "covid19", "covid19"]
    probs = [[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.2, 0.8, 0.0]]
    ece, bins = calibration(truth, probs, CLASSES)
    # 0.9 bin: 3 images, 2 right (0.667 vs 0.9); 0.8 bin: 1 image, right (1 vs 0.8)
    assert ece == pytest.approx(3 / 4 * abs(2 / 3 - 0.9) + 1 / 4 * abs(1 - 0.8))
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 4
    figures = {f.label: f for f in class_figures(truth, ["normal", "normal", "normal", "covid19"], CLASSES)}
    covid = figures["covid19"]
    assert (covid.sensitivity.value, covid.specificity.value, covid.ppv.value) == (0.5, 1.0, 1.0)
    assert figures["viral_pneumonia"].sensitivity.value is None


def test_psi_and_its_flags() -> None:
    assert psi({"a": 0.5, "b": 0.5}, {"a": 50, "b": 50}) == pytest.approx(0.0)
    expected = (0.6 - 0.5) * math.log(0.6 / 0.5) + (0.4 - 0.5) * math.log(0.4 / 0.5)
    assert psi({"a": 1, "b": 1}, {"a": 3, "b": 2}) == pytest.approx(expected)
    # a bin empty on one side counts as 0.0001, not as infinity
    assert math.isfinite(psi({"a": 1.0}, {"b": 1.0}))
    assert [psi_flag(v) for v in (0.05, 0.1, 0.2, 0.25, None)] == [
        "stable",
        "moderate",
        "moderate",
        "major",
        "no data",
    ]


def test_card_reference_schema_and_size_bins() -> None:
    reference = {"source": "validation split", "n": 3, "prediction_mix": {"normal": 1, "covid19": 0}}
    card = {"metrics": {"reference": reference}}  # as trainer.pipeline writes it
    assert card_reference(json.dumps(card)) == {"prediction_mix": {"normal": 1.0, "covid19": 0.0}}
    assert card_reference(json.dumps({"metrics": {}})) == {}
    bad = {"metrics": {"reference": {"intensity_histogram": {"edges": [0, 1], "counts": [1, 2]}}}}
    with pytest.raises(CardReferenceError, match="intensity_histogram"):
        card_reference(json.dumps(bad))
    assert size_bin(2000, 2500) == "4-6 MP"
    assert size_bin(256, 256) == "0-0.25 MP"
    assert size_bin(4000, 4000) == ">= 9 MP"


# --- the reports over known rows, on SQLite and PostgreSQL -------------------------------------------------

DAY0 = date(2026, 10, 1)
REFERENCE = {
    "prediction_mix": {"normal": 0.5, "covid19": 0.25, "viral_pneumonia": 0.25},
    "intensity_histogram": {"edges": [0.0, 0.5, 1.0], "counts": [50, 50]},
}
# site-performance cases of model m1: (truth, predicted, probabilities, how many)
M1_CASES = [
    ("covid19", "covid19", (0.1, 0.8, 0.1), 3),
    ("covid19", "normal", (0.6, 0.3, 0.1), 1),
    ("normal", "normal", (0.7, 0.2, 0.1), 3),
    ("normal", "covid19", (0.3, 0.6, 0.1), 1),
    ("viral_pneumonia", "viral_pneumonia", (0.1, 0.2, 0.7), 2),
]


def _at(day: date, hour: int = 12) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


class _Filler:
    def __init__(self, session: Session, spool: Path) -> None:
        self.session = session
        self.spool = spool
        self.n = 0

    def model(self, version: str, card: dict[str, Any]) -> ModelVersion:
        row = ModelVersion(
            version=version,
            path=f"/models/{version}",
            status=ModelStatus.CANDIDATE,
            architectures="resnet18+resnet34",
            fusion_weight=0.5,
            onnx_sha256="0" * 64,
            card_json=json.dumps({"version": version, **card}),
        )
        self.session.add(row)
        self.session.flush()
        return row

    def instance(
        self,
        model: ModelVersion,
        when: datetime,
        *,
        status: InstanceStatus = InstanceStatus.CLASSIFIED,
        study: str | None = None,
        accession: str | None = None,
        manufacturer: str | None = "ACME",
        size: tuple[int, int] = (2000, 2500),
        mean: float = 0.6,
    ) -> Instance:
        self.n += 1
        study_row = Study(
            study_instance_uid=study or generate_uid(), first_received_at=when, last_received_at=when
        )
        existing = (
            self.session.query(Study).filter_by(study_instance_uid=study_row.study_instance_uid).first()
        )
        if existing is None:
            self.session.add(study_row)
            self.session.flush()
        else:
            study_row = existing
        name = f"aa/bb/{self.n:04d}.dcm"
        if accession is not None:  # the accession number lives only in the spooled header
            ds = small_cr(rg1_pixels(16), study_uid=study_row.study_instance_uid, accession=accession)
            (self.spool / name).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(self.spool / name, enforce_file_format=True)
        row = Instance(
            sop_instance_uid=generate_uid(),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            study_id=study_row.id,
            series_instance_uid=generate_uid(),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            calling_ae_title="TEST",
            spool_name=name,
            sha256="0" * 64,
            size_bytes=1,
            status=status,
            received_at=when,
            updated_at=when,
            attempts=1,
            manufacturer=manufacturer,
            image_rows=size[0],
            image_columns=size[1],
            mean_intensity=mean,
            model_version_id=model.id,
        )
        self.session.add(row)
        self.session.flush()
        return row

    def predict(self, model: ModelVersion, inst: Instance, label: str, probs: tuple[float, ...]) -> None:
        self.session.add(
            Prediction(
                instance_id=inst.id,
                model_version_id=model.id,
                label=label,
                probs=dict(zip(("normal", "covid19", "viral_pneumonia"), probs, strict=True)),
                probs_a=list(probs),
                probs_b=list(probs),
                disagreement=0.0,
                backend="test",
                batch_size=1,
                preprocess_ms=1.0,
                inference_ms=1.0,
                created_at=inst.received_at,
            )
        )

    def label(self, label: str, imported: datetime, **key: str) -> None:
        self.session.add(Label(label=label, imported_at=imported, **key))


def _fill(engine: Engine, spool: Path) -> None:
    """m1: labelled cases (by SOP UID, study UID, accession number; one skipped). m2: drift against its
    card reference and its own baseline."""
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        f = _Filler(session, spool)
        m1 = f.model("m1", {})
        m2 = f.model("m2", {"metrics": {"reference": REFERENCE}})
        case = 0
        for truth, predicted, probs, count in M1_CASES:
            for _ in range(count):
                case += 1
                inst = f.instance(m1, _at(DAY0), accession="ACC-1" if case == 1 else None)
                f.predict(m1, inst, predicted, probs)
                if case == 1:
                    f.label(truth, now, accession_number="ACC-1")
                elif case == 2:  # an older SOP label, then a newer study label: the latest import wins
                    f.label(
                        "viral_pneumonia", now - timedelta(days=2), sop_instance_uid=inst.sop_instance_uid
                    )
                    f.label(
                        truth, now, study_instance_uid=session.get(Study, inst.study_id).study_instance_uid
                    )  # type: ignore[union-attr]
                else:
                    f.label(truth, now, sop_instance_uid=inst.sop_instance_uid)
        skipped = f.instance(m1, _at(DAY0), status=InstanceStatus.SKIPPED)
        f.label("normal", now, sop_instance_uid=skipped.sop_instance_uid)
        unlabelled = f.instance(m1, _at(DAY0))
        f.predict(m1, unlabelled, "normal", (0.9, 0.05, 0.05))
        odd = f.instance(m1, _at(DAY0))
        f.predict(m1, odd, "normal", (0.9, 0.05, 0.05))
        f.label("pneumonia", now, sop_instance_uid=odd.sop_instance_uid)  # no such class: ignored
        # m2: a baseline week of ACME 5 MP images, then a recent window where half come from elsewhere
        mix = ["normal", "normal", "covid19", "viral_pneumonia"]
        for d in range(7):
            for label in mix:
                inst = f.instance(m2, _at(DAY0 + timedelta(days=d)), mean=0.6)
                f.predict(m2, inst, label, (0.4, 0.3, 0.3))
        for d in (20, 21, 22):
            for n, label in enumerate(mix):
                other = n % 2 == 1
                inst = f.instance(
                    m2,
                    _at(DAY0 + timedelta(days=d)),
                    manufacturer="OTHER" if other else "ACME",
                    size=(1024, 1024) if other else (2000, 2500),
                    mean=0.3,
                )
                f.predict(m2, inst, label, (0.4, 0.3, 0.3))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def filled(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Engine, Path]]:
    with contextlib.ExitStack() as stack:
        workdir = tmp_path_factory.mktemp(f"site-{request.param}")
        url = (
            f"sqlite:///{workdir / 'db.sqlite'}"
            if request.param == "sqlite"
            else stack.enter_context(scratch_database())
        )
        engine = create_engine(url)
        stack.callback(engine.dispose)
        upgrade(engine)
        spool = workdir / "spool"
        _fill(engine, spool)
        yield engine, spool


def _json(engine: Engine, name: str, options: ReportOptions, **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        run_report(engine, name, kw.get("since"), kw.get("until"), "json", options)
    )
    return doc


def test_site_performance_figures_per_model_version(filled: tuple[Engine, Path]) -> None:
    engine, spool = filled
    doc = _json(engine, "site-performance", ReportOptions(spool_root=spool))
    summary = {r["model_version"]: r for r in doc["tables"][0]["rows"]}
    assert set(summary) == {"m1"}
    m1 = summary["m1"]
    assert (m1["labelled"], m1["n"], m1["not_analysed"]) == (11, 10, 1)
    assert m1["not_analysed_share"] == pytest.approx(1 / 11, abs=1e-4)
    assert m1["accuracy"] == pytest.approx(0.8)
    assert doc["labels_ignored"] == 1
    per_class = {r["label"]: r for r in doc["tables"][1]["rows"]}
    covid = per_class["covid19"]
    assert (covid["support"], covid["predicted"]) == (4, 4)
    assert covid["sensitivity"] == 0.75 and covid["ppv"] == 0.75
    assert covid["specificity"] == pytest.approx(5 / 6, abs=1e-4)
    low, high = wilson_interval(3, 4) or (0, 0)
    assert (covid["sensitivity_low"], covid["sensitivity_high"]) == (round(low, 4), round(high, 4))
    assert per_class["viral_pneumonia"]["sensitivity"] == 1.0
    truth = [t for t, _, _, n in M1_CASES for _ in range(n)]
    probs = [p for _, _, p, n in M1_CASES for _ in range(n)]
    assert m1["macro_roc_auc"] == pytest.approx(macro_auc(truth, probs, CLASSES), abs=1e-4)
    assert m1["ece"] == pytest.approx(calibration(truth, probs, CLASSES)[0], abs=1e-4)
    # Without the spool the accession-number label reaches nothing; a window without predictions is empty.
    assert _json(engine, "site-performance", ReportOptions())["tables"][0]["rows"][0]["n"] == 9
    assert _json(engine, "site-performance", ReportOptions(model="m2"))["tables"][0]["rows"] == []
    later = _json(engine, "site-performance", ReportOptions(spool_root=spool), since=DAY0 + timedelta(days=1))
    assert later["tables"][0]["rows"] == []


def test_drift_against_the_card_reference_and_the_baseline(
    filled: tuple[Engine, Path], tmp_path: Path
) -> None:
    engine, _ = filled
    plot = tmp_path / "drift.png"
    doc = _json(
        engine, "drift", ReportOptions(model="m2", plot=plot if "sqlite" in str(engine.url) else None)
    )
    assert doc["thresholds"]["moderate"] == 0.1 and doc["thresholds"]["major"] == 0.25
    rows = {r["feature"]: r for r in doc["tables"][0]["rows"]}
    assert set(rows) == {"prediction_mix", "image_size", "manufacturer", "mean_intensity"}
    mix = rows["prediction_mix"]
    assert (mix["reference"], mix["psi"], mix["flag"]) == ("model card", 0.0, "stable")
    assert mix["recent_window"] == f"{DAY0 + timedelta(days=16)}..{DAY0 + timedelta(days=22)}"
    assert mix["n_recent"] == 12
    manufacturer = rows["manufacturer"]
    assert manufacturer["reference"] == "baseline" and manufacturer["n_reference"] == 28
    assert manufacturer["reference_window"] == f"{DAY0}..{DAY0 + timedelta(days=6)}"
    expected = (0.5 - 1) * math.log(0.5 / 1) + (0.5 - 1e-4) * math.log(0.5 / 1e-4)
    assert manufacturer["psi"] == pytest.approx(expected, abs=1e-4) and manufacturer["flag"] == "major"
    assert rows["image_size"]["psi"] == pytest.approx(expected, abs=1e-4)
    intensity = rows["mean_intensity"]  # card: half below 0.5, half above; recent: all at 0.3
    assert intensity["reference"] == "model card" and intensity["flag"] == "major"
    bins = [r for r in doc["tables"][1]["rows"] if r["feature"] == "mean_intensity"]
    assert {r["bin"]: (r["reference_share"], r["recent_share"]) for r in bins} == {
        "0-0.5": (0.5, 1.0),
        "0.5-1": (0.5, 0.0),
    }
    # A short baseline moves the recent window forward; the window never overlaps the baseline.
    short = _json(engine, "drift", ReportOptions(model="m2", baseline_days=1), since=DAY0)
    assert {r["recent_window"] for r in short["tables"][0]["rows"]} == {
        f"{DAY0 + timedelta(days=1)}..{DAY0 + timedelta(days=22)}"
    }
    # m1 has one day of predictions: all baseline, nothing recent.
    m1 = _json(engine, "drift", ReportOptions(model="m1"))["tables"][0]["rows"]
    assert {r["flag"] for r in m1} == {"no data"}
    if "sqlite" in str(engine.url):
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_rows = list(
        csv.DictReader(
            io.StringIO(run_report(engine, "drift", None, None, "csv").split("\n\n")[0].split("\n", 1)[1])
        )
    )
    assert {r["model_version"] for r in csv_rows} == {"m1", "m2"}
    with pytest.raises(ReportError, match="--model and --plot apply to"):
        run_report(engine, "daily", None, None, "json", ReportOptions(model="m1"))
    with pytest.raises(ReportError, match="--baseline-days 0"):
        run_report(engine, "drift", None, None, "json", ReportOptions(baseline_days=0))


# --- shadow mode, end to end ---------------------------------------------------------------------------

PIPELINE = {
    "SCREENER__INFERENCE__STUDY_SETTLE_SECONDS": "1",
    "SCREENER__INFERENCE__MAX_WAIT_MS": "100",
    "SCREENER__INFERENCE__POLL_SECONDS": "0.2",
    "SCREENER__INFERENCE__PREPROCESS_WORKERS": "1",
    "SCREENER__PACS__SWEEP_SECONDS": "0.2",
    "SCREENER__PACS__BACKOFF_INITIAL_SECONDS": "0.3",
    "SCREENER__PACS__TIMEOUT_SECONDS": "5",
}


@pytest.mark.slow
def test_shadow_mode_records_everything_and_delivers_nothing(make_server, tiny_model_dir, tmp_path) -> None:
    pacs = FakePacs().start()
    try:
        server = make_server(
            SCREENER__PACS__DESTINATIONS=f'[{{ae_title="FAKEPACS", host="127.0.0.1", port={pacs.port}}}]',
            SCREENER__RESULTS__MODE="shadow",
            **PIPELINE,
        )
        cli(server, "db", "upgrade")
        cli(server, "models", "register", str(tiny_model_dir), "--activate")
        server.start()
        studies = [str(generate_uid()) for _ in range(2)]
        datasets = [small_cr(rg1_pixels(256), study_uid=s, accession="ACC-SHADOW") for s in studies]
        for ds in datasets:
            ds.Manufacturer = "ACME Imaging"
        assert store(server.port, datasets) == [0x0000, 0x0000]
        wait_for(lambda: len(server.rows("SELECT id FROM study_results")) == 2, 120, "two verdicts")
        time.sleep(1.5)  # several sender sweeps
        assert pacs.received == []
        assert server.rows("SELECT count(*) FROM deliveries")[0][0] == 0
        assert server.rows("SELECT count(*) FROM predictions")[0][0] == 2
        withheld = server.rows("SELECT subject, detail FROM audit_events WHERE action = 'result.withheld'")
        assert sorted(s for s, _ in withheld) == sorted(studies)
        assert all(json.loads(d)["destinations"] == [f"FAKEPACS@127.0.0.1:{pacs.port}"] for _, d in withheld)
        facts = server.rows(
            "SELECT manufacturer, image_rows, image_columns, mean_intensity, model_version_id FROM instances"
        )
        assert all(
            m == "ACME Imaging" and (r, c) == (256, 256) and 0 < mean < 1 and mv
            for m, r, c, mean, mv in facts
        )
        modes = [e for e in server.log_events() if e.get("event") == "results.mode"]
        assert modes and modes[0]["mode"] == "shadow" and modes[0]["level"] == "warning"
        status = json.loads(cli(server, "status", "--json").stdout)
        assert status["results"] == {"mode": "shadow", "withheld": 2, "deliveries_waiting": 0}
        assert "results:   shadow" in cli(server, "status").stdout

        # A radiologist confirms both (one by accession number): the site-performance report sees them.
        engine = create_engine(server.db_url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO labels (sop_instance_uid, label, imported_at) VALUES (:s, 'normal', :t)"
                    ),
                    {"s": str(datasets[0].SOPInstanceUID), "t": datetime.now(UTC)},
                )
                conn.execute(
                    text(
                        "INSERT INTO labels (accession_number, label, imported_at)"
                        " VALUES ('ACC-SHADOW', 'covid19', :t)"
                    ),
                    {"t": datetime.now(UTC)},
                )
        finally:
            engine.dispose()
        plot = tmp_path / "site.png"
        out = cli(server, "report", "site-performance", "--format", "json", "--plot", str(plot))
        doc = json.loads(out.stdout)  # stdout holds the JSON alone
        (row,) = doc["tables"][0]["rows"]
        assert (row["model_version"], row["labelled"], row["n"]) == ("test-tiny-0", 2, 2)
        assert plot.read_bytes()[:4] == b"\x89PNG"
        assert "ACC-SHADOW" not in out.stdout + out.stderr
        drift = json.loads(cli(server, "report", "drift", "--format", "json").stdout)
        assert {r["feature"] for r in drift["tables"][0]["rows"]} >= {"manufacturer", "mean_intensity"}
        assert server.stop() == 0

        # Live again: a new study goes out; the verdicts withheld in shadow mode are not sent afterwards.
        server.overrides["SCREENER__RESULTS__MODE"] = "live"
        server.start()
        assert store(server.port, [small_cr(rg1_pixels(256), study_uid=str(generate_uid()))]) == [0x0000]
        wait_for(lambda: len(pacs.received) == 1, 120, "the live SR")
        time.sleep(1.0)
        assert len(pacs.received) == 1
        assert server.stop() == 0
    finally:
        pacs.stop()

"""PHI canaries through every path at DEBUG: listener, worker, sender, reports, metrics, and the trainer.

Instances carry a canary patient name, patient ID, birth date and accession number
(tests/integration/test_phi.py) and travel the whole way: C-STORE (pynetdicom and DCMTK), eligibility (a
lateral view is skipped, broken pixel data fails), classification, the SR and Secondary Capture back to a
PACS, `/metrics` and `/healthz`, every `screener report`, `status` and `deliveries list`, the HL7 ORU^R01 to
a RIS (a PHI channel by design: it must carry them), the webhook and email alerts (which must not, with
``alerts.include_phi`` off), then `trainer labels import` keyed by the canary accession number, `trainer
train` on DICOM files carrying the canaries and `trainer retrain` over the base data and the spooled
instances. No canary may appear in any log line, stdout, stderr, metrics body, webhook, email or text file
the trainer writes, while the spool and the data still hold them (so the test cannot pass by losing the
data).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from screener.core.db.migrate import upgrade
from screener.model.modelcard import CARD_FILE
from screener.model.registry import register
from screener.ops.reporting import FORMATS, REPORTS, run_report
from tests.channel_peers import Hl7Receiver, SmtpReceiver, WebhookReceiver
from tests.helpers import SCREENER, FakePacs, cli, free_port, rg1_pixels, small_cr, store, wait_for
from tests.integration.test_phi import CANARIES, _needles

TRAINER = SCREENER.with_name("trainer")
CLASS_DIRS = ("normal", "covid19", "viral_pneumonia")
SECONDS: dict[str, float] = {}  # wall time of each trainer step, for the figure
TEXT_SUFFIXES = {".log", ".txt", ".csv", ".json", ".jsonl", ".md", ".yaml", ".toml"}


def _leaks(name: str, text: str) -> list[str]:
    lowered = text.lower()
    return [f"{name}: {needle}" for needle in _needles() if needle.lower() in lowered]


def _dicom_dataset(root: Path, per_class: int) -> Path:
    """A class-per-folder dataset of CR files that carry the canaries.

    Each image is a different coarse random pattern: the trainer groups near-duplicate images into one
    split, so copies of one radiograph would leave the validation split empty.
    """
    rng = np.random.default_rng(11)
    for cls in CLASS_DIRS:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            coarse = rng.integers(0, 4096, (8, 8))
            pixels = np.kron(coarse, np.ones((16, 16), dtype=np.int64)).astype(np.uint16)
            ds = small_cr(pixels, study_uid=generate_uid(), **CANARIES)
            ds.save_as(root / cls / f"{i}.dcm", enforce_file_format=True)
    return root


def _run(cmd: list[str], server, outputs: dict[str, str], name: str, ok=(0,)) -> None:
    started = time.monotonic()
    res = subprocess.run(
        cmd, cwd=server.workdir, env=server.env(), capture_output=True, text=True, timeout=600
    )
    outputs[f"{name} stdout"] = res.stdout
    outputs[f"{name} stderr"] = res.stderr
    SECONDS[name] = round(time.monotonic() - started, 1)
    assert res.returncode in ok, f"{name} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"


@pytest.mark.slow
def test_phi_canaries_reach_no_log_metric_report_or_trainer_output(
    make_server, tiny_model_dir, tmp_path, figure
):
    pacs = FakePacs().start()
    metrics_port = free_port()
    ris, smtp = Hl7Receiver(free_port()).start(), SmtpReceiver(free_port()).start()
    hooks = WebhookReceiver("phi-canary-webhook-secret").start()
    # Every verdict of this copy of the tiny model flags a finding, so the study alert is sent.
    finding_model = tmp_path / "tiny-finding"
    shutil.copytree(tiny_model_dir, finding_model)
    card = json.loads((finding_model / CARD_FILE).read_text())
    card.update(version="phi-finding", thresholds={"covid19": 0.0})
    (finding_model / CARD_FILE).write_text(json.dumps(card))
    server = make_server(
        SCREENER__LOGGING__LEVEL="DEBUG",
        SCREENER__LOGGING__PYNETDICOM_LEVEL="DEBUG",
        SCREENER__METRICS__PORT=str(metrics_port),
        SCREENER__PACS__DESTINATIONS=f'[{{ae_title="FAKEPACS", host="127.0.0.1", port={pacs.port}}}]',
        SCREENER__PACS__SEND_SECONDARY_CAPTURE="true",
        SCREENER__PACS__SWEEP_SECONDS="0.2",
        SCREENER__INFERENCE__STUDY_SETTLE_SECONDS="0.5",
        SCREENER__INFERENCE__POLL_SECONDS="0.1",
        SCREENER__INFERENCE__PREPROCESS_WORKERS="1",
        SCREENER__TRAINER__WORKDIR=str(tmp_path / "training"),
        SCREENER__TRAINER__LOCK_FILE=str(tmp_path / "training" / "retrain.lock"),
        SCREENER__TRAINER__EPOCHS="1",
        SCREENER__TRAINER__SAMPLES_PER_EPOCH="12",
        SCREENER__TRAINER__BASE_DATA=str(_dicom_dataset(tmp_path / "base", 10)),
    )
    server.overrides.setdefault("SCREENER__DATABASE__URL", f"sqlite:///{server.workdir / 'screener.db'}")
    channels = server.workdir / "channels.toml"
    channels.write_text(
        f'[[hl7.destinations]]\nname = "ris"\nhost = "127.0.0.1"\nport = {ris.port}\n\n'
        f'[[webhooks]]\nurl = "{hooks.url}"\nsecret = "{hooks.secret}"\n\n'
        f'[email]\nsmtp_host = "127.0.0.1"\nsmtp_port = {smtp.port}\nfrom = "s@example.org"\n'
        'to = ["r@example.org"]\n\n[alerts]\nlink_template = "https://viewer.example.org/?h={study_hash}"\n'
    )
    server.overrides["SCREENER_CONFIG"] = str(channels)
    engine = create_engine(server.db_url)
    try:
        upgrade(engine)
        with Session(engine) as session, session.begin():
            register(session, finding_model, activate=True)
    finally:
        engine.dispose()
    outputs: dict[str, str] = {}
    started = time.monotonic()
    try:
        server.start()
        study = generate_uid()
        pixels = rg1_pixels(128)
        eligible = [small_cr(pixels, study_uid=study, **CANARIES) for _ in range(2)]
        lateral = small_cr(pixels, study_uid=study, **CANARIES)
        lateral.ViewPosition = "LL"
        broken = small_cr(pixels, study_uid=study, **CANARIES)
        broken.PixelData = broken.PixelData[:100]  # too short for its rows x columns: fails to decode
        assert store(server.port, [*eligible, lateral, broken]) == [0x0000] * 4
        via_dcmtk = tmp_path / "dcmtk.dcm"
        small_cr(pixels, study_uid=study, **CANARIES).save_as(via_dcmtk, enforce_file_format=True)
        _run(
            ["storescu", "-aec", "CXRSCREENER", "127.0.0.1", str(server.port), str(via_dcmtk)],
            server,
            {},
            "dcmtk",
        )
        done = "SELECT count(*) FROM instances WHERE status IN ('classified', 'skipped', 'failed')"
        wait_for(lambda: server.rows(done)[0][0] == 5, 120, "every instance classified, skipped or failed")
        wait_for(
            lambda: server.rows("SELECT count(*) FROM deliveries WHERE status = 'sent'")[0][0] >= 2,
            120,
            "the SR and the Secondary Capture delivered",
        )
        wait_for(lambda: len(ris.accepted()) == 1 or bool(ris.errors), 120, "the ORU^R01 at the RIS")
        assert not ris.errors, ris.errors
        wait_for(
            lambda: any(h.document["event"] == "finding" for h in hooks.hooks), 60, "the finding webhook"
        )
        wait_for(lambda: any("finding" in m["Subject"] for m in smtp.messages), 60, "the finding email")
        for n, hook in enumerate(hooks.hooks):
            outputs[f"webhook {n} {hook.document['event']}"] = json.dumps(hook.headers) + hook.body.decode()
        for n, mail in enumerate(smtp.messages):
            outputs[f"email {n} {mail['Subject']}"] = mail.as_string()
        # The HL7 message is the one channel meant to carry PHI: it does (and is not scanned).
        assert (
            CANARIES["patient_id"] in ris.accepted()[0].text
            and CANARIES["accession"] in ris.accepted()[0].text
        )
        statuses = dict(server.rows("SELECT status, count(*) FROM instances GROUP BY status"))
        assert statuses == {"classified": 3, "skipped": 1, "failed": 1}, statuses
        for path in ("/metrics", "/healthz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}{path}", timeout=10) as rsp:
                outputs[f"GET {path}"] = rsp.read().decode()
        assert "screener_" in outputs["GET /metrics"]
        # `screener report` through the CLI once per report; every format in-process (the same function).
        for report in REPORTS:
            res = cli(server, "report", report, "--format", "table") if report == "positives" else None
            if res is not None:
                outputs[f"screener report {report}"] = res.stdout + res.stderr
            engine = create_engine(server.db_url)
            try:
                for fmt in FORMATS:
                    outputs[f"report {report} {fmt}"] = run_report(engine, report, None, None, fmt)
            finally:
                engine.dispose()
        for args in (("status", "--json"), ("deliveries", "list", "--json")):
            res = cli(server, *args)
            outputs[" ".join(args)] = res.stdout + res.stderr
    finally:
        if server.proc is not None and server.proc.poll() is None:
            assert server.stop() == 0
        pacs.stop()
        ris.stop()
        hooks.stop()
        smtp.stop()
    outputs["serve log"] = server.log_text()
    SECONDS["serve, reports, metrics"] = round(time.monotonic() - started, 1)
    assert any('"level": "debug"' in line for line in outputs["serve log"].splitlines()), "DEBUG lines logged"

    # Trainer: confirmed labels keyed by the canary accession number (and one by a bad key, so the
    # error path runs), then retrain over the DICOM base data plus the spooled canary instances.
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "accession_number,sop_instance_uid,label,confirmed_by\n"
        f"{CANARIES['accession']},,covid19,Dr {CANARIES['patient_name']}\n"
        f",{eligible[0].SOPInstanceUID},normal,\n"
        f"{CANARIES['patient_id']},not-a-uid,pneumonia?,\n"
    )
    _run([str(TRAINER), "labels", "import", str(labels)], server, outputs, "labels import", ok=(0, 1))
    _run([str(TRAINER), "retrain"], server, outputs, "retrain", ok=(0, 3))
    assert outputs["retrain stdout"].startswith("retrain: "), outputs["retrain stdout"]
    _run(
        [
            str(TRAINER),
            "train",
            "--data",
            str(tmp_path / "base"),
            "--preset",
            "quick",
            "--epochs",
            "1",
            "--samples-per-epoch",
            "12",
            "--out",
            str(tmp_path / "trained"),
            "--model-version",
            "phi-train",
        ],
        server,
        outputs,
        "train",
    )
    written = [
        p
        for p in [
            *(tmp_path / "training").rglob("*"),
            *tmp_path.glob("trained/**/*"),
            *tmp_path.glob("phi-train*"),
        ]
        if p.is_file() and p.suffix in TEXT_SUFFIXES
    ]
    for path in written:
        outputs[f"file {path.relative_to(tmp_path)}"] = path.read_text(errors="replace")

    assert CANARIES["patient_id"].encode() in via_dcmtk.read_bytes()
    spooled = list(server.spool.glob("??/??/*.dcm"))
    assert spooled and all(CANARIES["accession"].encode() in p.read_bytes() for p in spooled)
    leaked = [leak for name, text in outputs.items() for leak in _leaks(name, text)]
    assert leaked == [], f"PHI found: {leaked}"
    assert study not in outputs["serve log"], "UIDs are logged only as hashes"
    figure(
        "phi_canary_outputs_scanned",
        len(outputs),
        "outputs",
        bytes_scanned=sum(len(t) for t in outputs.values()),
        needles=len(_needles()),
        hits=len(leaked),
        seconds=SECONDS,
    )

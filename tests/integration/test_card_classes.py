"""Classes come from the model card: a 2-class and a 4-class model register, serve, report and give valid SRs.

The 2-class model (normal / COVID-19) has operating points no image reaches, so every verdict is
``indeterminate``; the 4-class model adds ``lung_nodule`` (the JSRT database's nodule radiographs) and is
trained on a few real images with a target sensitivity for COVID-19. Both run through ``screener serve``
with a real loopback PACS; each SR is checked with dciodvfy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from screener.model.modelcard import CARD_FILE, read_card
from screener.results.sr import INDETERMINATE_CODE, REASON_INDETERMINATE
from tests.helpers import FakePacs, Server, cli, store, wait_for, wrap_png_as_dx

PIPELINE = {
    "SCREENER__INFERENCE__STUDY_SETTLE_SECONDS": "1",
    "SCREENER__INFERENCE__MAX_WAIT_MS": "100",
    "SCREENER__INFERENCE__POLL_SECONDS": "0.2",
    "SCREENER__INFERENCE__PREPROCESS_WORKERS": "1",
    "SCREENER__PACS__SWEEP_SECONDS": "0.2",
}
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")


@pytest.fixture(scope="module")
def two_class_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """normal / COVID-19 (random weights), with operating points no probability reaches."""
    from screener.model.export import create_random_model_dir

    out = tmp_path_factory.mktemp("models") / "two-class"
    create_random_model_dir(
        out, arch_a="resnet18", arch_b="resnet18", input_size=64, seed=5, version="two-class-0",
        classes=("normal", "covid19"),
    )  # fmt: skip
    card = json.loads((out / CARD_FILE).read_text())
    card["thresholds"] = {"normal": 1.0, "covid19": 1.0}  # the card is not in its own sha256 list
    (out / CARD_FILE).write_text(json.dumps(card))
    return out


@pytest.fixture(scope="module")
def four_class_model(tmp_path_factory: pytest.TempPathFactory, cxr3_dir: Path, jsrt_lungs_dir: Path) -> Path:
    """The paper's three classes and lung nodule, trained on eight real images of each."""
    from trainer.pipeline import train_and_export

    root = tmp_path_factory.mktemp("four-class")
    data = root / "data"
    sources = {c: sorted((cxr3_dir / c).glob("*.png")) for c in ("normal", "covid19", "viral_pneumonia")}
    sources["lung_nodule"] = sorted((jsrt_lungs_dir / "images").glob("JPCLN*.png"))
    for cls, pngs in sources.items():
        (data / cls).mkdir(parents=True)
        for png in pngs[:8]:
            (data / cls / png.name).symlink_to(png)
    out = root / "model"
    train_and_export(
        preset="quick", data=data, out=out, archs=("resnet18", "resnet18"), input_size=64, epochs=1,
        batch_size=8, samples_per_epoch=16, version="four-class-0", workdir=root / "work", progress=False,
        target_sensitivity={"covid19": 0.95},
    )  # fmt: skip
    return out


def _serve(make_server: Any, model: Path, pacs: FakePacs) -> Server:
    server = make_server(
        SCREENER__PACS__DESTINATIONS=f'[{{ae_title="{pacs.ae_title}", host="127.0.0.1", port={pacs.port}}}]',
        **PIPELINE,
    )
    cli(server, "db", "upgrade")
    cli(server, "models", "register", str(model), "--activate")
    return server.start()


def _send(server: Server, pngs: list[Path], tmp_path: Path) -> list[str]:
    studies = [generate_uid(), generate_uid()]
    paths = []
    for n, png in enumerate(pngs):
        path = tmp_path / f"dx{n}.dcm"
        wrap_png_as_dx(png, study_uid=studies[n % 2]).save_as(path, enforce_file_format=True)
        paths.append(path)
    assert store(server.port, paths) == [0x0000] * len(paths)
    return studies


def _settled(server: Server, studies: int) -> bool:
    results = server.rows("SELECT count(*) FROM study_results")[0][0]
    built = server.rows("SELECT count(*) FROM deliveries WHERE object_kind = 'sr' AND status = 'sent'")[0][0]
    return bool(results >= studies and built >= studies)


def _dciodvfy(path: Path) -> None:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert not errors, out.stdout + out.stderr


def _sr_content(server: Server) -> list[tuple[Path, Any]]:
    rows = server.rows("SELECT spool_name FROM deliveries WHERE object_kind = 'sr'")
    return [(server.spool / name, dcmread(server.spool / name)) for (name,) in rows]


def _codes(ds: Any) -> list[str]:
    """Every concept code value in the SR content tree (names and coded values)."""
    found: list[str] = []

    def walk(items: Any) -> None:
        for item in items:
            for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
                if seq in item:
                    found.append(str(item[seq][0].CodeValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return found


def _report(server: Server, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(cli(server, "report", name, "--format", "json").stdout)
    return doc


@pytest.mark.slow
@needs_dciodvfy
def test_two_class_model_serves_indeterminate_verdicts_with_a_valid_sr(
    make_server: Any, two_class_model: Path, cxr3_dir: Path, tmp_path: Path
) -> None:
    pacs = FakePacs().start()
    server = _serve(make_server, two_class_model, pacs)
    try:
        pngs = [sorted((cxr3_dir / c).glob("*.png"))[0] for c in ("normal", "covid19", "viral_pneumonia")]
        _send(server, pngs, tmp_path)
        wait_for(lambda: _settled(server, 2), 180, "two verdicts and their SRs sent")
        predictions = server.rows("SELECT label, probs, reason FROM predictions")
        assert len(predictions) == 3
        for label, probs, reason in predictions:
            assert set(json.loads(probs)) == {"normal", "covid19"}
            assert label == "indeterminate" and "no class reached its operating point" in reason
        verdicts = server.rows("SELECT verdict, flagged, reason FROM study_results")
        assert {v for v, _, _ in verdicts} == {"indeterminate"}
        assert not any(flagged for _, flagged, _ in verdicts)
        assert all("operating point" in reason for _, _, reason in verdicts)

        daily = _report(server, "daily")["tables"][0]
        assert {"normal", "covid19", "indeterminate", "not_analysed"} <= set(daily["columns"])
        assert "viral_pneumonia" not in daily["columns"]
        assert sum(row["indeterminate"] for row in daily["rows"]) == 2
        assert _report(server, "positives")["tables"][0]["rows"] == []

        srs = _sr_content(server)
        assert len(srs) == 2
        for path, sr in srs:
            _dciodvfy(path)
            codes = _codes(sr)
            assert INDETERMINATE_CODE.value in codes and REASON_INDETERMINATE.value in codes
            assert "CXRS-P-COVID19" in codes and "CXRS-P-VIRALPNEU" not in codes
    finally:
        server.stop()
        pacs.stop()


@pytest.mark.slow
@needs_dciodvfy
def test_four_class_model_trained_on_real_images_registers_serves_and_reports(
    make_server: Any, four_class_model: Path, cxr3_dir: Path, jsrt_lungs_dir: Path, tmp_path: Path
) -> None:
    card = read_card(four_class_model)
    assert card.classes == ("normal", "covid19", "viral_pneumonia", "lung_nodule")
    assert card.findings == ("covid19", "viral_pneumonia", "lung_nodule")
    assert set(card.thresholds) == set(card.classes)
    points = card.metrics["operating_points"]["classes"]
    assert points["covid19"]["rule"] == "target_sensitivity" and points["covid19"]["val_sensitivity"] >= 0.95
    assert card.concept("lung_nodule").code == "427359005"

    pacs = FakePacs().start()
    server = _serve(make_server, four_class_model, pacs)
    try:
        pngs = [sorted((cxr3_dir / c).glob("*.png"))[-1] for c in ("normal", "covid19", "viral_pneumonia")]
        pngs.append(sorted((jsrt_lungs_dir / "images").glob("JPCLN*.png"))[-1])
        _send(server, pngs, tmp_path)
        wait_for(lambda: _settled(server, 2), 180, "two verdicts and their SRs sent")
        for (probs,) in server.rows("SELECT probs FROM predictions"):
            assert list(json.loads(probs)) == list(card.classes)
        labels = {*card.classes, "indeterminate"}
        for verdict, flagged in server.rows("SELECT verdict, flagged FROM study_results"):
            assert verdict in labels | {"not_analysed"}
            assert bool(flagged) == (verdict in card.findings)

        positives = _report(server, "positives")["tables"][0]
        assert {f"p_{c}" for c in card.classes} <= set(positives["columns"])
        daily = _report(server, "daily")["tables"][0]
        assert {*card.classes, "indeterminate"} <= set(daily["columns"])
        assert sum(row["results"] for row in daily["rows"]) == 2

        for path, sr in _sr_content(server):
            _dciodvfy(path)
            codes = _codes(sr)
            assert "CXRS-P-NODULE" in codes and "CXRS-P-COVID19" in codes
    finally:
        server.stop()
        pacs.stop()


def test_registration_refuses_a_card_whose_classes_do_not_match_the_graph(
    two_class_model: Path, tmp_path: Path
) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from screener.core.db.migrate import upgrade
    from screener.core.errors import ModelError
    from screener.model.registry import register

    lying = tmp_path / "lying"
    shutil.copytree(two_class_model, lying)
    card = json.loads((lying / CARD_FILE).read_text())
    card["classes"] = ["normal", "covid19", "viral_pneumonia"]
    card["thresholds"] = {}
    card["version"] = "lying-0"
    (lying / CARD_FILE).write_text(json.dumps(card))
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        upgrade(engine)
        with Session(engine) as session:
            with pytest.raises(ModelError, match=r"outputs 2 class probabilities but the card names 3"):
                register(session, lying)
            assert register(session, two_class_model).version == "two-class-0"
    finally:
        engine.dispose()

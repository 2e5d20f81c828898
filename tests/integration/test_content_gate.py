"""The image-content gate: a Mahalanobis novelty score inside the graph, fitted at training time.

One tiny model (resnet18 + resnet18 at 64 px, one short epoch on 8 real cxr3 images per class) is trained
once per module by ``train_and_export``, which fits the gate; the tests check the card, the graph's
``novelty`` output against torch, the INT8 head exclusion, and that ``screener classify`` and the worker
refuse an image above the threshold with a reason naming the score and the threshold. Whether the gate
separates real non-chests from chests needs a properly trained model: ``bench/gate.py`` measures that.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pydicom import dcmread
from pydicom.uid import UID
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from screener.core.config import load_config
from screener.core.db.migrate import upgrade
from screener.core.db.models import Instance, InstanceStatus, Prediction
from screener.core.errors import ModelError
from screener.core.spool import Spool
from screener.imaging.pixels import preprocess_file
from screener.inference.classify import classify_files
from screener.inference.worker import Worker
from screener.model.engine import load_engine
from screener.model.engine.torch_backend import HalfFused
from screener.model.fused import FusedResNet, load_fused_from_safetensors
from screener.model.modelcard import CARD_FILE, CLASSES, GateSpec, ModelCard, load_model_dir, read_card
from screener.model.registry import register
from tests.helpers import rg1_dir, train_tiny_model
from trainer.gate import energy_scores, fit_mahalanobis, ledoit_wolf, pass_threshold
from trainer.quantize import head_nodes

PER_CLASS = 8


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model directory with a fitted gate, the data folder it was trained on)."""
    value = os.environ.get("CXR3_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("CXR3_DIR not set to the cxr3 dataset folder")
    return train_tiny_model(tmp_path_factory.mktemp("gate"), Path(value), PER_CLASS, "gate-test")


def _with_threshold(model: Path, dest: Path, threshold: float, version: str) -> Path:
    """A copy of ``model`` whose card's gate threshold (not a file the card's digests cover) is changed."""
    shutil.copytree(model, dest)
    card = json.loads((dest / CARD_FILE).read_text())
    card["gate"]["threshold"] = threshold
    card["gate"]["borderline"] = None  # the band below the old threshold means nothing under the new one
    card["version"] = version
    (dest / CARD_FILE).write_text(json.dumps(card))
    return dest


def _scores(model: Path, files: list[Path]) -> np.ndarray:
    engine, loaded = load_engine(model, "onnxruntime", threads=1)
    try:
        batch = np.stack([preprocess_file(f, loaded.card.preprocessing, 100_000_000) for f in files])
        out = engine.infer(batch.astype(np.float32))
    finally:
        engine.close()
    assert out.novelty is not None
    return out.novelty


# --- the fit, on synthetic features ---------------------------------------------------------------------


def test_mahalanobis_fit_recovers_known_gaussians_and_scores_outliers_high() -> None:
    rng = np.random.default_rng(0)
    d, n = 8, 4000
    a = rng.normal(size=(d, d))
    cov = a @ a.T / d + 0.1 * np.eye(d)
    means = np.stack([np.zeros(d), np.full(d, 3.0), np.linspace(-2, 2, d)])
    labels = rng.integers(0, 3, size=n)
    x = means[labels] + rng.multivariate_normal(np.zeros(d), cov, size=n)
    fit = fit_mahalanobis(x, labels, 3)

    assert fit.counts == tuple(int(np.sum(labels == c)) for c in range(3))
    assert fit.shrinkage < 0.05  # plenty of data: almost no shrinkage
    # W W^T is the precision; the whitened means are mu W.
    precision = np.linalg.inv(cov)
    assert np.linalg.norm(fit.whitening @ fit.whitening.T - precision) < 0.1 * np.linalg.norm(precision)
    fresh = means[1] + rng.multivariate_normal(np.zeros(d), cov, size=2000)
    scores = fit.scores(fresh)
    assert abs(float(np.mean(scores)) - d) < 0.1 * d + 0.5  # chi-square with d degrees of freedom, min'd
    threshold = pass_threshold(fit.scores(x), 0.995)
    assert np.mean(scores <= threshold) > 0.98
    outliers = rng.normal(size=(200, d)) * 4.0 + 10.0
    assert np.all(fit.scores(outliers) > threshold)
    # The graph's float32 module gives the same scores.
    model = FusedResNet("resnet18", "resnet18")
    gate = model.add_gate()
    assert tuple(gate.whitening.shape) == (1024, 1024)
    small = type(gate)(d, 3)
    small.set_statistics(torch.from_numpy(fit.whitening), torch.from_numpy(fit.means))
    got = small(torch.from_numpy(fresh[:50].astype(np.float32))).double().numpy()
    np.testing.assert_allclose(got, scores[:50], rtol=1e-4)


def test_ledoit_wolf_shrinks_hard_when_features_outnumber_images() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 200))
    shrunk, shrinkage = ledoit_wolf(x - x.mean(axis=0))
    assert shrinkage > 0.5
    assert np.linalg.eigvalsh(shrunk).min() > 0  # invertible although the sample covariance is not
    with pytest.raises(ValueError, match="at least two"):
        ledoit_wolf(x[:1])


def test_energy_score_is_higher_for_flat_logits() -> None:
    confident = np.array([[10.0, 0.0, 0.0]])
    flat = np.array([[0.0, 0.0, 0.0]])
    assert energy_scores(flat, flat)[0] > energy_scores(confident, confident)[0]


# --- the card -------------------------------------------------------------------------------------------


def test_gate_section_validates_and_cards_without_it_still_load(tiny_model_dir: Path) -> None:
    old = read_card(tiny_model_dir)
    assert old.gate is None and "gate" not in json.loads(old.to_json())
    data = json.loads(old.to_json())
    data["gate"] = {"method": "mahalanobis", "threshold": 12.5, "feature_dims": [512, 512]}
    card = ModelCard.from_dict(data)
    assert card.gate == GateSpec("mahalanobis", 12.5, (512, 512))
    assert ModelCard.from_json(card.to_json()) == card
    assert card.gate.refuses(13.0) and card.gate.refuses(float("nan")) and not card.gate.refuses(12.5)
    assert card.gate.reason(812.44) == (
        "image-content gate: novelty 812.4 > threshold 12.5: not like the frontal chest radiographs the "
        "model was trained on"
    )
    for key, value, message in (
        ("threshold", -1, "gate.threshold = -1: must be > 0"),
        ("method", "knn", "gate.method = 'knn': unknown method"),
        ("feature_dims", [512], "gate.feature_dims"),
        ("colour", 1, "gate.colour = 1: unknown key"),
    ):
        bad = json.loads(json.dumps(data))
        bad["gate"][key] = value
        with pytest.raises(ModelError, match=message):
            ModelCard.from_dict(bad)


# --- the trained model ----------------------------------------------------------------------------------


def test_training_fits_the_gate_into_the_graph_and_the_card(gated: tuple[Path, Path]) -> None:
    model_dir, data = gated
    loaded = load_model_dir(model_dir)
    gate = loaded.card.gate
    assert (
        gate is not None and gate.method == "mahalanobis+view+consistency" and gate.feature_dims == (512, 512)
    )
    view = gate.fitted_on["view_check"]
    assert 0.5 <= view["threshold"] < 1.0 and view["scale"] == pytest.approx(
        gate.threshold / view["threshold"], rel=1e-3
    )
    assert set(view["trained_on"]) >= {"inverted", "part", "rotated", "limb phantom", "positives"}
    assert {"energy", "mahalanobis_alone", "view_alone", "view_without_consistency"} <= set(gate.alternatives)
    assert gate.fitted_on["split"] == "train" and gate.fitted_on["n"] == sum(
        gate.fitted_on["per_class"].values()
    )
    assert gate.validation["pass_rate"] >= 0.9 and gate.validation["n"] >= 2
    assert gate.alternatives["energy"]["threshold"] is not None
    cases = {c["name"]: c for c in gate.checks["cases"]}
    assert "novelty" in cases["RG3_J2KR.dcm"] and cases["US1_UNCR.dcm"]["refused_by"].startswith("decoding")
    assert any(name.endswith("rotated 90") for name in cases)

    graph = onnx.load(str(loaded.onnx_path))
    assert [o.name for o in graph.graph.output][:4] == ["probs", "probs_a", "probs_b", "novelty"]
    kept_fp32 = head_nodes(loaded.onnx_path)
    assert any("novelty_gate" in name for name in kept_fp32)  # INT8 leaves the gate in FP32

    files = sorted((data / "covid19").glob("*.png"))[:2] + sorted((data / "normal").glob("*.png"))[:2]
    batch = np.stack([preprocess_file(f, loaded.card.preprocessing, 100_000_000) for f in files])
    session = ort.InferenceSession(str(loaded.onnx_path), providers=["CPUExecutionProvider"])
    onnx_out = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {"image": batch}), strict=True)
    )
    net = load_fused_from_safetensors(loaded.weights_path, loaded.card)
    with torch.no_grad():
        torch_out = [t.numpy() for t in net(torch.from_numpy(batch))]
    assert onnx_out["novelty"].shape == (4,) and onnx_out["novelty"].dtype == np.float32
    np.testing.assert_allclose(onnx_out["novelty"], torch_out[3], rtol=1e-3)
    np.testing.assert_allclose(onnx_out["probs"], torch_out[0], atol=1e-5)
    half = HalfFused(load_fused_from_safetensors(loaded.weights_path, loaded.card), torch.contiguous_format)
    with torch.no_grad():
        half_out = half(torch.from_numpy(batch))  # FP16 networks (CUDA's path), the gate in FP32
    assert half_out[3].dtype == torch.float32
    np.testing.assert_allclose(half_out[3].numpy(), torch_out[3], rtol=2e-2)
    for backend in ("onnxruntime", "torch"):
        engine, _ = load_engine(model_dir, backend, threads=1)
        try:
            got = engine.infer(batch)
        finally:
            engine.close()
        assert got.novelty is not None
        np.testing.assert_allclose(got.novelty, torch_out[3], rtol=1e-3, err_msg=backend)


REWRITTEN_NON_CHESTS = (
    "RG3_UNCI.dcm",
    "RG3_UNCR.dcm",
    "RG3_J2KI.dcm",
    "RG3_J2KR.dcm",
    "MR_small.dcm",
    "MR2_UNCR.dcm",
    "CT_small.dcm",
    "693_UNCR.dcm",
    "JPEG2000_UNC.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "mlut_18.dcm",
    "vlut_04.dcm",
)
"""pydicom-data images that are not chests: a CR tibia in four encodings, MR, CT, NM, grey US and OT."""
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")


def _as_cr_chest_pa(name: str, dest: Path) -> Path:
    """A copy of pydicom-data's ``name`` whose header says CR, CHEST, PA (pixels untouched)."""
    from pydicom.data import get_testdata_file

    ds = dcmread(str(get_testdata_file(name)))
    ds.Modality = "CR"
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    for keyword in ("SeriesDescription", "StudyDescription", "ProtocolName"):
        if keyword in ds:
            delattr(ds, keyword)
    path = dest / name
    ds.save_as(path)
    return path


def test_non_chests_with_headers_rewritten_to_cr_chest_pa_are_refused_by_the_image_content_gate(
    gated: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir, _ = gated
    files = [_as_cr_chest_pa(name, tmp_path) for name in (*REWRITTEN_NON_CHESTS, "RG1_UNCR.dcm")]
    config = load_config(
        environ={"SCREENER__INFERENCE__BACKEND": "onnxruntime", "SCREENER__INFERENCE__THREADS": "1"}
    )
    _, results = classify_files(config, model_dir, files)
    threshold = read_card(model_dir).gate.threshold  # type: ignore[union-attr]
    by_name = {f.name: r for f, r in zip(files, results, strict=True)}
    for name in REWRITTEN_NON_CHESTS:
        result = by_name[name]
        assert result.status == "skipped" and result.label is None and result.probs is None, name
        assert result.reason is not None and result.reason.startswith("image-content gate: novelty"), name
        assert result.novelty is not None and result.novelty > threshold, name
    chest = by_name["RG1_UNCR.dcm"]  # a real CR chest PA (another source than the training images)
    # Classified: a label, or indeterminate where it falls in the gate's borderline band.
    assert chest.status == "classified" and chest.novelty is not None
    assert chest.label in CLASSES or (chest.label == "indeterminate" and "borderline" in str(chest.reason))


def test_classify_refuses_an_image_above_the_threshold_naming_score_and_threshold(
    gated: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir, data = gated
    files = [rg1_dir() / "RG1_UNCR.dcm", *sorted((data / "normal").glob("*.png"))[:1]]
    scores = _scores(model_dir, files)
    low, high = sorted(scores)
    between = _with_threshold(model_dir, tmp_path / "between", float((low + high) / 2), "gate-between")
    config = load_config(
        environ={"SCREENER__INFERENCE__BACKEND": "onnxruntime", "SCREENER__INFERENCE__THREADS": "1"}
    )
    version, results = classify_files(config, between, files)
    assert version == "gate-between"
    refused = [r for r in results if r.status == "skipped"]
    passed = [r for r in results if r.status == "classified"]
    assert len(refused) == 1 and len(passed) == 1
    assert refused[0].label is None and refused[0].probs is None
    assert refused[0].novelty == pytest.approx(float(high), rel=1e-5)
    assert refused[0].reason == (
        f"image-content gate: novelty {high:.1f} > threshold {(low + high) / 2:.1f}: not like the frontal "
        "chest radiographs the model was trained on"
    )
    assert passed[0].label in CLASSES and passed[0].novelty == pytest.approx(float(low), rel=1e-5)


def test_the_worker_skips_a_refused_instance_and_records_its_score(
    gated: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir, _ = gated
    rg1 = rg1_dir() / "RG1_UNCR.dcm"
    (score,) = _scores(model_dir, [rg1])
    strict = _with_threshold(model_dir, tmp_path / "strict", float(score) / 2, "gate-strict")
    url = f"sqlite:///{tmp_path / 'screener.db'}"
    engine = create_engine(url)
    upgrade(engine)
    spool = Spool(tmp_path / "spool", 0)
    config = load_config(
        environ={
            "SCREENER__DATABASE__URL": url,
            "SCREENER__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
            "SCREENER__INFERENCE__BACKEND": "onnxruntime",
            "SCREENER__INFERENCE__THREADS": "1",
            "SCREENER__INFERENCE__MAX_WAIT_MS": "0",
        }
    )
    ds = dcmread(rg1)
    spool.ensure_layout()
    entry = spool.put(rg1.read_bytes())
    with Session(engine) as session, session.begin():
        register(session, strict, activate=True)
        session.add(
            Instance(
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                calling_ae_title="TEST",
                spool_name=entry.name,
                sha256=entry.sha256,
                size_bytes=entry.size_bytes,
            )
        )
    # In-process preprocessing: the behaviour under test is after it.
    worker = Worker(
        config.inference,
        config.eligibility,
        engine,
        spool,
        threading.Event(),
        pool_factory=lambda: ThreadPoolExecutor(1),
    )
    try:
        pending = worker.step(None)
        assert pending is not None
        report = worker.open().finish(pending)
        assert (report.size, report.skipped, report.gated, report.classified) == (1, 1, 1, 0)
    finally:
        worker.close()
    with Session(engine) as session:
        row = session.scalars(select(Instance)).one()
        assert row.status == InstanceStatus.SKIPPED
        assert row.status_reason is not None and row.status_reason.startswith(
            f"image-content gate: novelty {score:.1f} > threshold {score / 2:.1f}"
        )
        assert row.novelty == pytest.approx(float(score), rel=1e-5)
        assert session.scalars(select(Prediction)).first() is None
    engine.dispose()

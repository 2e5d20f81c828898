"""Multi-source data, leave-source-out validation and the robust recipe, on a few real images of cxr3, cxrx
and jsrt-lungs (tiny budgets: one epoch, a handful of draws), so the file runs in about a minute."""

from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from screener.imaging.pixels import PreprocessSpec, raster_to_unit, to_model_input
from screener.model.fused import FusedResNet, load_fused_from_safetensors
from screener.model.lungs import LungCrop
from screener.model.modelcard import LungCropSpec, OutputCalibration, load_model_dir
from trainer.augment import SiteAugmenter
from trainer.calibrate import IN_GRAPH
from trainer.cli import main as trainer_main
from trainer.crossval import assign_folds, out_of_source_figures, sensitivity_at_specificity
from trainer.data import (
    Sample,
    load_roots,
    load_samples,
    sampling_weights,
    single_source_classes,
    source_table,
    split_samples,
)
from trainer.evaluate import out_of_source_gate
from trainer.segment import train_segmenter

CXR3_REPO = "rtchanon/Machine-Learning-for-COVID-19-detection-from-chest-X-RAYS"


def _copy_subset(root: Path, dest: Path, per_label: int, sources: tuple[str, ...] | None = None) -> Path:
    """A small dataset folder: ``per_label`` real images per class (and per source where given) with the
    matching MANIFEST.csv and PATIENTS.csv rows."""
    with (root / "MANIFEST.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    taken: dict[tuple[str, str], int] = defaultdict(int)
    kept = []
    for row in rows:
        source = row.get("source") or row["source_repo"]
        if sources is not None and source not in sources:
            continue
        if taken[(row["label"], source)] >= per_label:
            continue
        taken[(row["label"], source)] += 1
        kept.append(row)
        (dest / row["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / row["file"], dest / row["file"])
    with (dest / "MANIFEST.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    if (root / "PATIENTS.csv").is_file():
        names = {row["file"] for row in kept}
        with (root / "PATIENTS.csv").open(newline="") as fh:
            patients = [r for r in csv.DictReader(fh) if r["file"] in names]
        with (dest / "PATIENTS.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["file", "patient_key"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(patients)
    return dest


@pytest.fixture
def small_roots(cxr3_dir: Path, cxrx_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """cxr3 (10 per class) and cxrx (4 JSRT normals, 4 each from two Cohen hospitals) as two roots."""
    first = _copy_subset(cxr3_dir, tmp_path / "cxr3", 10)
    second = _copy_subset(cxrx_dir, tmp_path / "cxrx", 4, sources=("jsrt", "cohen-italy", "cohen-hong-kong"))
    return first, second


def test_several_roots_merge_with_a_source_per_image(cxr3_dir: Path, cxrx_dir: Path) -> None:
    single = load_roots([cxr3_dir])
    assert [s.key for s in single] == [s.key for s in load_samples(cxr3_dir)]  # one root: keys unchanged
    merged = load_roots([cxr3_dir, cxrx_dir])
    assert len(merged) == len(single) + len(load_samples(cxrx_dir))
    assert len({s.key for s in merged}) == len(merged)
    by_key = {s.key: s for s in merged}
    assert by_key["cxr3/covid19/covid19-00000.png"].source == CXR3_REPO
    jsrt = [s for s in merged if s.key.startswith("cxrx/normal/")]
    assert jsrt and {s.source for s in jsrt} == {"jsrt"}
    cohen = [s for s in merged if s.key.startswith("cxrx/covid19/")]
    assert all(s.source.startswith("cohen-") for s in cohen)
    assert any(s.patient.startswith("cxrx/cohen-") for s in cohen)

    table = source_table(merged)
    assert table["jsrt"] == {"normal": 93, "covid19": 0, "viral_pneumonia": 0}
    assert table[CXR3_REPO]["covid19"] == 1500
    # Viral pneumonia comes from one collection only: the trainer warns about it.
    assert single_source_classes(table) == {"viral_pneumonia": "skytells-research/COVID-19-XRay-Dataset"}


def test_a_folder_without_manifest_takes_its_name_as_source(cxr3_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "site-a"
    (root / "normal").mkdir(parents=True)
    shutil.copyfile(cxr3_dir / "normal" / "normal-01500.png", root / "normal" / "a.png")
    (sample,) = load_samples(root)
    assert sample.source == "site-a"
    assert sample.patient == ""


def test_one_patients_images_never_straddle_splits(cxrx_dir: Path) -> None:
    samples = load_samples(cxrx_dir)
    splits = split_samples(
        samples, spec=PreprocessSpec(input_size=64), seed=0, val_fraction=0.2, test_fraction=0.2
    )
    where: dict[str, set[str]] = defaultdict(set)
    for name, part in splits.items():
        for sample in part:
            if sample.patient:
                where[sample.patient].add(name)
    multi = [p for p in where if sum(1 for s in samples if s.patient == p) > 1]
    assert len(multi) >= 30  # the roster groups 38 Cohen patients with several films
    assert all(len(where[p]) == 1 for p in multi)


def test_source_power_spreads_each_class_over_its_sources() -> None:
    def make(label: str, source: str, n: int) -> list[Sample]:
        return [Sample(Path(f"{source}-{i}.png"), label, f"{source}/{i}", source) for i in range(n)]

    samples = make("normal", "big", 400) + make("normal", "small", 25) + make("covid19", "c", 100)
    flat = sampling_weights(samples)
    tempered = sampling_weights(samples, source_power=0.5)
    for weights in (flat, tempered):
        normal = sum(w for w, s in zip(weights, samples, strict=True) if s.label == "normal")
        covid = sum(w for w, s in zip(weights, samples, strict=True) if s.label == "covid19")
        assert normal == pytest.approx(covid)
    small_share = sum(w for w, s in zip(tempered, samples, strict=True) if s.source == "small")
    assert small_share == pytest.approx(5 / (20 + 5))  # sqrt(25) / (sqrt(400) + sqrt(25))
    assert sum(w for w, s in zip(flat, samples, strict=True) if s.source == "small") == pytest.approx(
        25 / 425
    )
    with pytest.raises(ValueError, match="source_power"):
        sampling_weights(samples, source_power=1.5)


def test_site_augmenter_is_reproducible_in_range_and_never_inverts(cxr3_dir: Path) -> None:
    import cv2

    image = raster_to_unit(cxr3_dir / "covid19" / "covid19-00000.png")
    ramp = np.tile(np.linspace(0.0, 1.0, 256, dtype=np.float32), (256, 1))  # brighter to the right
    augment = SiteAugmenter()
    for seed in range(16):
        out = augment(image, np.random.default_rng(seed))
        assert np.array_equal(out, augment(image, np.random.default_rng(seed)))
        assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
        # Tone curves, windows, blur, noise, compression, resampling, crops, borders and erasing all keep
        # the order of grey levels: the ramp still rises (inversion would make it fall).
        ramped = cv2.resize(augment(ramp, np.random.default_rng(seed)), (256, 256))
        profile = ramped[64:192].mean(axis=0)
        assert np.corrcoef(profile[32:224], np.arange(192))[0, 1] > 0.8, seed
    assert np.array_equal(SiteAugmenter(strength=0.0)(image, np.random.default_rng(0)), image)
    with pytest.raises(ValueError, match="strength"):
        SiteAugmenter(strength=2.0)


def test_the_working_size_makes_an_original_and_its_downsized_copy_meet(cxr3_dir: Path) -> None:
    import cv2

    copy = raster_to_unit(cxr3_dir / "normal" / "normal-01500.png")  # a database's 256 px copy
    original = np.clip(cv2.resize(copy, (1024, 1024), interpolation=cv2.INTER_CUBIC), 0, 1).astype(np.float32)
    legacy = PreprocessSpec(input_size=128)
    canonical = PreprocessSpec(input_size=128, working_size=256)
    gap_legacy = np.abs(to_model_input(original, legacy) - to_model_input(copy, legacy)).mean()
    gap_canonical = np.abs(to_model_input(original, canonical) - to_model_input(copy, canonical)).mean()
    assert gap_canonical < 0.5 * gap_legacy
    assert gap_canonical < 0.02


def test_lung_crop_uses_the_whole_image_when_it_finds_no_lungs() -> None:
    crop = LungCrop(LungCropSpec(seg_size=64, crop_size=64)).eval()
    with torch.no_grad():
        crop.unet.head.bias.fill_(-50.0)  # no pixel is lung
        image = torch.randn(2, 3, 64, 64)
        box, found = crop.boxes(image)
        out = crop(image)
    assert not found.any()
    assert torch.equal(box, torch.tensor([[-1.0, -1.0, 1.0, 1.0]] * 2))
    assert torch.allclose(out, image, atol=1e-5)  # the whole image at the same size: unchanged


@pytest.fixture(scope="module")
def segmenter(request: pytest.FixtureRequest) -> LungCrop:
    root = request.getfixturevalue("jsrt_lungs_dir")
    result = train_segmenter(
        root,
        PreprocessSpec(input_size=128, working_size=128),
        LungCropSpec(seg_size=64, crop_size=64),
        epochs=2,
    )
    summary = result.summary
    assert summary["train_images"] == 196 and summary["test_images"] == 51  # the manifest's test split
    assert summary["test_dice_mean"] > 0.75, summary
    assert summary["test_not_found"] < 0.2, summary
    result.crop.spec = LungCropSpec(seg_size=64, crop_size=64, segmenter=summary)
    return result.crop


def test_the_segmenter_crops_real_chests_to_their_lungs(segmenter: LungCrop, cxr3_dir: Path) -> None:
    spec = PreprocessSpec(input_size=128, working_size=128)
    names = [
        "normal/normal-01500.png",
        "covid19/covid19-00000.png",
        "viral_pneumonia/viral_pneumonia-03000.png",
    ]
    batch = torch.from_numpy(np.stack([to_model_input(raster_to_unit(cxr3_dir / n), spec) for n in names]))
    with torch.no_grad():
        box, found = segmenter.boxes(batch)
    assert found.all()
    widths, heights = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    assert ((widths > 0.6) & (widths < 2.2) & (heights > 0.6) & (heights < 2.2)).all(), box


def test_a_model_with_lung_crop_and_temperatures_exports_exactly(segmenter: LungCrop, tmp_path: Path) -> None:
    from screener.model.export import export_model_dir

    model = FusedResNet(
        "resnet18",
        "resnet18",
        lung_crop=segmenter.spec,
        temperatures=(1.7, 0.6),
        output_calibration=OutputCalibration((0.8, 1.3, 1.1), (0.2, -0.4, 0.1)),
    )
    assert model.lung_crop is not None
    model.lung_crop.load_state_dict(segmenter.state_dict())
    card = export_model_dir(
        model.eval(),
        tmp_path / "m",
        version="t",
        preprocessing=PreprocessSpec(input_size=128, working_size=128),
    )
    assert card.calibration == {
        "temperature_a": 1.7,
        "temperature_b": 0.6,
        "vector_scale": [0.8, 1.3, 1.1],
        "vector_bias": [0.2, -0.4, 0.1],
    }
    assert card.lung_crop is not None and card.lung_crop.segmenter["test_dice_mean"] > 0.75
    loaded = load_model_dir(tmp_path / "m")
    torch_model = load_fused_from_safetensors(loaded.weights_path, loaded.card)
    image = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        expected = torch_model(image)
    session = ort.InferenceSession(str(loaded.onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": image.numpy()})
    for ours, theirs in zip(got, expected, strict=True):
        assert np.abs(ours - theirs.numpy()).max() < 1e-4
    # The graph's `probs` is what the trainer fitted: the mixture, then the vector scaling.
    from trainer.calibrate import apply_graph_calibration

    step = {k: v for k, v in card.calibration.items() if k.startswith("vector")}
    graph = apply_graph_calibration(
        step, got[1].astype(np.float64), got[2].astype(np.float64), card.fusion_weight
    )
    assert np.abs(got[0] - graph).max() < 1e-4

    # INT8 keeps the whole lung crop FP32 and finds the ResNet stems behind it, not the U-Net's pools.
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from trainer.quantize import early_nodes, lung_crop_nodes

    prepared = tmp_path / "prepared.onnx"
    quant_pre_process(str(loaded.onnx_path), str(prepared), skip_symbolic_shape=True)
    crop_nodes = lung_crop_nodes(prepared)
    assert any("GridSample" in n for n in crop_nodes) and any("/unet/" in n for n in crop_nodes)
    early = early_nodes(prepared, 1)
    assert early and not set(early) & set(crop_nodes)
    # both networks' stems and first stages (named by layer, /conv1/ and /conv1_1/, since the graph with the
    # heatmap output calls the backbones' layers one by one)
    stems = [n for n in early if n.endswith("/Conv") and n.split("/")[1] in ("conv1", "conv1_1")]
    assert sorted(stems) == ["/conv1/Conv", "/conv1_1/Conv"]


def test_robust_train_evaluate_by_source_and_crossval(
    small_roots: tuple[Path, Path], jsrt_lungs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cxr3, cxrx = small_roots
    out = tmp_path / "robust"
    code = trainer_main(
        [
            "train", "--data", str(cxr3), "--data", str(cxrx), "--preset", "robust",
            "--segmentation-data", str(jsrt_lungs_dir), "--segmenter-epochs", "1",
            "--epochs", "1", "--samples-per-epoch", "8", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    card = load_model_dir(out).card
    assert card.preprocessing.working_size == 256 and card.input_size == 256
    assert card.lung_crop is not None and card.lung_crop.crop_size == 128
    assert card.lung_crop.segmenter["epochs"] == 1
    # The card holds what the kept in-graph method fitted (trainer.calibrate), nothing else.
    kept = card.metrics["calibration"]["method"].split()[0]
    fitted = card.metrics["calibration"]["alternatives"][kept]["params"]
    assert kept in IN_GRAPH and set(card.calibration) == set(fitted)
    for key, value in fitted.items():
        assert card.calibration[key] == pytest.approx(value, abs=1e-5)
    assert card.sources["jsrt"]["normal"] == 4
    assert card.sources["cohen-italy"]["covid19"] == 4
    assert card.metrics["calibration"]["val_ece_after"] is not None

    split = out.with_name(f"{out.name}-test-split.csv")
    report_dir = tmp_path / "eval"
    capsys.readouterr()
    assert trainer_main(
        ["evaluate", "--model", str(out), "--data", str(split), "--group-by", "source",
         "--out", str(report_dir), "--bootstrap", "20"]
    ) == 0  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads((report_dir / "report.json").read_text())
    assert report["group_by"] == "source"
    assert sum(g["n"] for g in report["per_group"].values()) == report["n"]
    assert "per source:" in printed
    for group in report["per_group"]:
        assert group in printed

    groups = tmp_path / "groups.csv"
    groups.write_text("source,group\njsrt,cxrx\ncohen-*,cxrx\n")
    cv_out = tmp_path / "cv"
    assert trainer_main(
        ["crossval", "--data", str(cxr3), "--data", str(cxrx), "--leave-source-out", "--groups", str(groups),
         "--preset", "quick", "--epochs", "1", "--samples-per-epoch", "8", "--out", str(cv_out)]
    ) == 0  # fmt: skip
    result = json.loads((cv_out / "crossval.json").read_text())
    fold = result["folds"]["cxrx"]
    assert fold["n"] == 12 and fold["classes"] == {"normal": 4, "covid19": 8, "viral_pneumonia": 0}
    assert fold["macro_auc"] is not None  # two classes present
    assert set(fold["sensitivity"]) == {"normal", "covid19"}
    assert result["left_out_sources"]["cxrx"] == ["cohen-hong-kong", "cohen-italy", "jsrt"]
    assert "| cxrx | 12 (4 / 8 / 0) |" in (cv_out / "crossval.md").read_text()
    figures = out_of_source_figures(cv_out / "crossval.json", "quick")
    assert figures["mean_macro_auc"] == fold["macro_auc"]
    with pytest.raises(Exception, match="preset"):
        out_of_source_figures(cv_out / "crossval.json", "robust")


def test_fold_assignment_by_patterns() -> None:
    sources = ["jsrt", "cohen-italy", "cohen-wuhan-china", "rtchanon/x", "skytells"]
    folds = assign_folds(sources, [("jsrt", "asia"), ("cohen-*china", "asia"), ("cohen-*", "west")])
    assert folds == {"asia": ["cohen-wuhan-china", "jsrt"], "west": ["cohen-italy"]}
    assert assign_folds(["a", "b"], None) == {"a": ["a"], "b": ["b"]}
    with pytest.raises(Exception, match="matches no source"):
        assign_folds(sources, [("cohen-mars", "x")])


def test_sensitivity_at_a_specificity_floor() -> None:
    positive = np.array([True, True, True, False, False, False, False, False])
    scores = np.array([0.9, 0.6, 0.2, 0.1, 0.3, 0.5, 0.05, 0.7])
    point = sensitivity_at_specificity(positive, scores, 0.8)
    assert point is not None
    assert point["specificity"] >= 0.8 and point["sensitivity"] == pytest.approx(2 / 3)
    assert sensitivity_at_specificity(np.array([True, True]), np.array([0.1, 0.2])) is None


def test_the_gate_compares_out_of_source_figures_when_the_candidate_has_them() -> None:
    good = {"out_of_source": {"mean_macro_auc": 0.86, "mean_covid19_sensitivity": 0.9}}
    worse = {"out_of_source": {"mean_macro_auc": 0.70, "mean_covid19_sensitivity": 0.9}}
    ok, reason = out_of_source_gate(worse, good)
    assert not ok and reason is not None and "out-of-source macro ROC AUC 0.7000 vs active 0.8600" in reason
    assert out_of_source_gate(good, worse)[0]
    assert out_of_source_gate(worse, good, tolerance=0.2)[0]
    assert out_of_source_gate({}, good) == (True, None)  # nothing measured: the in-distribution gate decides
    ok, reason = out_of_source_gate(good, {})
    assert ok and reason is not None and "vs active undefined" in reason

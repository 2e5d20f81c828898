"""Heatmaps: the class activation map in the fused graph, its mapping back from the lung crop, the PNG
it is stored as, the overlay, the border-mass measure, and the Secondary Capture that draws it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import Dataset, dcmread

from screener.imaging.pixels import letterbox
from screener.model.cam import backbone_maps, class_map, to_input_frame
from screener.model.export import calibrate_batchnorm
from screener.model.fused import FusedResNet
from screener.model.heatmap import (
    border_mask,
    check_heatmap,
    content_region,
    corner_mask,
    decode_png,
    encode_png,
    mass_share,
    overlay,
    stored_png,
)
from screener.model.modelcard import HeatmapSpec
from screener.results.sc import SIZE, build_secondary_capture, render_lines
from screener.results.sr import AlgorithmInfo, StudyVerdictInput

SIDE = 128


def _square(row: int, col: int, size: int = 32) -> torch.Tensor:
    image = torch.full((1, 3, SIDE, SIDE), -1.0)
    image[:, :, row : row + size, col : col + size] = 2.5
    return image


@pytest.fixture(scope="module")
def square_detector() -> FusedResNet:
    """Two random ResNet-18s (BatchNorm calibrated) whose class-1 heads detect a bright square: each head's
    weights are the mean feature of the cell holding the square minus the mean of the other cells, over
    every cell of the 4 x 4 map. A correct class activation map must then follow the square around."""
    torch.manual_seed(0)
    net = FusedResNet("resnet18", "resnet18", fusion_weight=0.3, heatmap_size=64)
    calibrate_batchnorm(net, input_size=SIDE, seed=0)
    net.eval()
    with torch.no_grad():
        squares = torch.cat([_square(32 * i, 32 * j) for i in range(4) for j in range(4)])
        for sub in (net.net_a, net.net_b):
            fmaps, _, _ = backbone_maps(sub, squares)  # [16, D, 4, 4], one image per cell
            on, off = [], []
            for k in range(16):
                i, j = divmod(k, 4)
                others = torch.ones(4, 4, dtype=torch.bool)
                others[i, j] = False
                on.append(fmaps[k, :, i, j])
                off.append(fmaps[k][:, others].mean(dim=1))
            direction = torch.stack(on).mean(0) - torch.stack(off).mean(0)
            sub.fc.weight.zero_()
            sub.fc.bias.zero_()
            sub.fc.weight[1] = direction / direction.norm()
            sub.fc.bias[1] = 10.0  # class 1 is the prediction, so its map is the one drawn
    return net


def _quadrant_masses(heatmap: np.ndarray) -> np.ndarray:
    half = heatmap.shape[0] // 2
    return np.array(
        [
            [heatmap[:half, :half].sum(), heatmap[:half, half:].sum()],
            [heatmap[half:, :half].sum(), heatmap[half:, half:].sum()],
        ]
    )


def test_the_heatmap_follows_a_bright_square_into_its_quadrant(square_detector):
    corners = [(8, 8), (8, 88), (88, 8), (88, 88)]
    with torch.no_grad():
        outputs = square_detector(torch.cat([_square(row, col) for row, col in corners]))
    assert len(outputs) == 4  # probs, probs_a, probs_b, heatmap (no gate)
    assert outputs[0].argmax(dim=1).tolist() == [1, 1, 1, 1]
    heatmaps = outputs[-1].numpy()
    assert heatmaps.shape == (4, 64, 64) and heatmaps.dtype == np.float32
    for heatmap, (row, col) in zip(heatmaps, corners, strict=True):
        assert heatmap.min() >= 0.0 and heatmap.max() == pytest.approx(1.0, abs=1e-4)
        masses = _quadrant_masses(heatmap)
        assert np.unravel_index(masses.argmax(), masses.shape) == (row // 64, col // 64)
        assert masses.max() > 0.4 * masses.sum()


def test_without_a_heatmap_size_the_model_returns_what_it_always_did(square_detector):
    plain = FusedResNet("resnet18", "resnet18", fusion_weight=0.3)
    plain.load_state_dict(square_detector.state_dict())
    plain.eval()
    with torch.no_grad():
        old = plain(_square(8, 8))
        new = square_detector(_square(8, 8))
    assert len(old) == 3
    for a, b in zip(old, new[:3], strict=True):
        torch.testing.assert_close(a, b)


def test_a_cell_of_a_cropped_map_lands_where_the_crop_box_put_it():
    cam = torch.zeros(1, 4, 4)
    cam[0, 1, 3] = 1.0  # row 1, column 3 of the crop
    box = torch.tensor([[0.0, -1.0, 1.0, 0.0]])  # the crop covered the top-right quarter of the input
    heat = to_input_frame(cam, box, 64)[0].numpy()
    assert heat.shape == (64, 64)
    assert heat[32:, :].max() == 0.0 and heat[:, :32].max() == 0.0  # nothing outside the box
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    # Cell (1, 3) of a 4 x 4 grid over rows 0-31, columns 32-63: rows 8-15, columns 56-63.
    assert 8 <= y <= 15 and 56 <= x <= 63
    whole = to_input_frame(cam, torch.tensor([[-1.0, -1.0, 1.0, 1.0]]), 64)[0].numpy()
    y, x = np.unravel_index(whole.argmax(), whole.shape)
    assert 16 <= y <= 31 and 48 <= x <= 63
    assert whole[:, :40].max() == 0.0  # bilinear weights reach one cell, not the far side


def test_class_map_is_rectified_and_scaled_per_image():
    fmap = torch.zeros(2, 2, 2, 2)
    fmap[0, 0, 0, 0] = 5.0
    fmap[0, 1, 1, 1] = 3.0
    fmap[1, 0] = -1.0  # image 1: everything speaks against its class
    head = torch.nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    with torch.no_grad():
        cam = class_map(fmap, head, torch.tensor([1, 0]))
    np.testing.assert_allclose(cam[0].numpy(), [[0.0, 0.0], [0.0, 1.0]], atol=1e-5)
    assert cam[1].abs().max() == 0.0


def test_png_round_trip_and_bad_maps_are_refused():
    heat = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    data = encode_png(heat)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 12_000
    np.testing.assert_allclose(decode_png(data), heat, atol=1 / 255)
    with pytest.raises(ValueError, match="must lie in"):
        check_heatmap(heat * 2.0)
    with pytest.raises(ValueError, match="non-finite"):
        check_heatmap(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="grey PNG"):
        decode_png(b"not a png")
    assert stored_png(np.full((4, 4), np.nan)) is None and stored_png(heat) == data


def test_border_and_corner_shares():
    heat = np.zeros((100, 100), dtype=np.float32)
    heat[0:10, 0:10] = 1.0  # a marker in the top-left corner
    heat[40:60, 40:60] = 0.25  # and the lungs
    total = 100 + 400 * 0.25
    assert mass_share(heat, border_mask(heat.shape, 0.08)) == pytest.approx(
        (8 * 10 + 2 * 8) / total, abs=1e-6
    )
    assert mass_share(heat, corner_mask(heat.shape, 0.2)) == pytest.approx(100 / total)
    assert mass_share(np.zeros((8, 8), np.float32), corner_mask((8, 8))) is None
    # A 200 x 100 (portrait) original letterboxed to 64: the map's content is the middle 32 columns.
    assert content_region(np.ones((64, 64), np.float32), 200, 100).shape == (64, 32)


def test_overlay_colours_only_where_the_map_is_hot():
    picture = np.full((128, 128), 0.5, dtype=np.float32)
    heat = np.zeros((16, 16), dtype=np.float32)
    heat[:4, :4] = 1.0
    rgb = overlay(picture, heat)
    assert rgb.shape == (128, 128, 3) and rgb.dtype == np.uint8
    cold = rgb[100, 100]
    assert cold[0] == cold[1] == cold[2] == 128  # untouched grey
    hot = rgb[5, 5].astype(int)
    assert hot.max() - hot.min() > 40  # coloured


def test_card_heatmap_section_is_validated():
    HeatmapSpec(method="cam", size=64).validate()
    with pytest.raises(Exception, match=r"heatmap\.method"):
        HeatmapSpec(method="gradcam", size=64).validate()
    with pytest.raises(Exception, match=r"heatmap\.size"):
        HeatmapSpec(method="cam", size=4).validate()


ALGORITHM = AlgorithmInfo(
    name="CXR Screener fused ResNet (resnet18+resnet34)",
    version="test-1",
    parameters={},
    manufacturer="Test",
    model_name="CXR Screener",
    software_version="0",
    device_uid="1.2.826.0.1.3680043.8.498.1",
)


def _source() -> Dataset:
    from tests.helpers import rg1_dir

    ds = dcmread(rg1_dir() / "RG1_UNCR.dcm", stop_before_pixels=True)
    ds.PatientName = "CANARY^PHI"
    ds.PatientID = "CANARY-ID-77"
    ds.AccessionNumber = "ACC-CANARY-9"
    return ds


def _verdict() -> StudyVerdictInput:
    return StudyVerdictInput(
        label="covid19", probs={"normal": 0.1, "covid19": 0.8, "viral_pneumonia": 0.1}, revision=1
    )


def test_secondary_capture_with_overlay_is_rgb_valid_and_draws_no_phi(tmp_path: Path, rg1_pixels_256):
    source = _source()
    verdict = _verdict()
    heat = np.zeros((64, 64), dtype=np.float32)
    heat[20:40, 10:30] = 1.0
    picture = letterbox(rg1_pixels_256, 512)
    sc = build_secondary_capture(
        source,
        verdict,
        ALGORITHM,
        uid_root="1.2.826.0.1.3680043.8.498",
        overlay=overlay(picture, heat),
        heatmap_label="covid19",
    )
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.PlanarConfiguration == 0
    assert (sc.Rows, sc.Columns) == (SIZE, 2 * SIZE)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    pixels = dcmread(path).pixel_array
    assert pixels.shape == (SIZE, 2 * SIZE, 3)
    left = pixels[:, :SIZE].astype(int)
    assert (left.max(axis=2) - left.min(axis=2)).max() > 40  # the colour map is there
    lines = render_lines(verdict, ALGORITHM, heatmap_label="covid19")
    assert any(line.startswith("Left: heatmap for") for line in lines)
    for secret in ("CANARY", "ACC-CANARY-9"):
        assert not any(secret in line for line in lines)
    if shutil.which("dciodvfy") is not None:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], errors


@pytest.fixture
def rg1_pixels_256() -> np.ndarray:
    from tests.helpers import rg1_pixels

    image = rg1_pixels(256).astype(np.float32)
    return (image - image.min()) / max(float(image.max() - image.min()), 1.0)

"""Training, checkpoint/resume, fusion and the train -> export pipeline, on a few dozen real cxr3 images with
tiny backbones (resnet18 at 64 px) so the file runs in a couple of minutes on two CPU cores."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from screener.imaging.pixels import PreprocessSpec
from screener.model.fused import FusedResNet
from screener.model.modelcard import CLASSES
from trainer.data import ImageDataset, Sample, limit_per_class, load_samples
from trainer.fuse import fuse, fuse_probs, fused_probs
from trainer.train import (
    BEST_WEIGHTS,
    CHECKPOINT_JSON,
    CHECKPOINT_TENSORS,
    CSV_FIELDS,
    CURVES_PNG,
    METRICS_CSV,
    TrainConfig,
    build_backbone,
    load_checkpoint,
    train_backbone,
)

SPEC = PreprocessSpec(input_size=64)


@pytest.fixture
def few(cxr3_dir: Path) -> list[Sample]:
    """Eight real images per class."""
    return limit_per_class(load_samples(cxr3_dir), 8, seed=0)


def _fixed_batch(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    ds = ImageDataset(samples, SPEC)
    images, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(images), torch.tensor(labels)


def test_loss_decreases_when_overfitting_a_fixed_batch(few: list[Sample]) -> None:
    torch.manual_seed(0)
    images, labels = _fixed_batch(few[::2])
    net, pretrained = build_backbone("resnet18", pretrained_dir=None)
    assert pretrained is False
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(images), labels)
        torch.autograd.backward(loss)
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def _next_step_loss(out_dir: Path, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, nn.Module]:
    net, _ = build_backbone("resnet18", pretrained_dir=None)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    load_checkpoint(out_dir, net, optimizer)
    net.train()
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(net(batch[0]), batch[1])
    torch.autograd.backward(loss)
    optimizer.step()
    return float(loss), net


def test_resume_gives_the_same_weights_and_next_step_as_training_straight(
    few: list[Sample], tmp_path: Path
) -> None:
    train_ds = ImageDataset(few, SPEC, cache=True)
    val_ds = ImageDataset(few[:6], SPEC, cache=True)
    cfg = TrainConfig(arch="resnet18", input_size=64, epochs=2, batch_size=8, limit_batches=2)
    straight = train_backbone(cfg, train_ds, val_ds, tmp_path / "straight", progress=False)
    one = TrainConfig(arch="resnet18", input_size=64, epochs=1, batch_size=8, limit_batches=2)
    train_backbone(one, train_ds, val_ds, tmp_path / "resumed", progress=False)
    resumed = train_backbone(cfg, train_ds, val_ds, tmp_path / "resumed", resume=True, progress=False)

    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert resumed.history[1]["train_loss"] == pytest.approx(straight.history[1]["train_loss"], abs=1e-6)
    assert resumed.val_loss == pytest.approx(straight.val_loss, abs=1e-6)
    batch = _fixed_batch(few[:6])
    loss_a, net_a = _next_step_loss(tmp_path / "straight", batch)
    loss_b, net_b = _next_step_loss(tmp_path / "resumed", batch)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name

    for name in (CHECKPOINT_TENSORS, CHECKPOINT_JSON, BEST_WEIGHTS, METRICS_CSV, CURVES_PNG):
        assert (tmp_path / "resumed" / name).is_file(), name
    header, *rows = (tmp_path / "resumed" / METRICS_CSV).read_text().splitlines()
    assert header.split(",") == list(CSV_FIELDS) and len(rows) == 2
    assert (tmp_path / "resumed" / CURVES_PNG).read_bytes().startswith(b"\x89PNG")
    assert b"pickle" not in (tmp_path / "resumed" / CHECKPOINT_JSON).read_bytes()


def test_fused_output_is_the_weighted_sum_of_both_softmaxes() -> None:
    torch.manual_seed(0)
    model = FusedResNet("resnet18", "resnet18", fusion_weight=0.3).eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        probs, probs_a, probs_b = model(image)
        expected = 0.3 * torch.softmax(model.net_a(image), 1) + 0.7 * torch.softmax(model.net_b(image), 1)
    assert torch.allclose(probs, expected, atol=1e-6)
    fused = fused_probs(0.3, probs_a.double().numpy(), probs_b.double().numpy())
    assert np.allclose(fused, expected.double().numpy(), atol=1e-6)


class _Oracle(nn.Module):
    """Logits from the label stored in pixel (0, 0, 0): right with probability ``skill`` (seeded)."""

    def __init__(self, skill: float, seed: int) -> None:
        super().__init__()
        self.skill, self.seed = skill, seed
        self.scale = nn.Parameter(torch.tensor(3.0))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        labels = image[:, 0, 0, 0].long()
        rng = np.random.default_rng([self.seed, *image[:, 0, 0, 1].long().tolist()])
        wrong = torch.from_numpy(rng.random(labels.shape[0]) > self.skill)
        shown = torch.where(wrong, (labels + 1) % len(CLASSES), labels)
        return self.scale * nn.functional.one_hot(shown, len(CLASSES)).float()


def test_fusion_weight_moves_toward_the_more_accurate_net() -> None:
    n = 300
    labels = torch.arange(n) % len(CLASSES)
    images = torch.zeros(n, 3, 4, 4)
    images[:, 0, 0, 0] = labels.float()
    images[:, 0, 0, 1] = torch.arange(n).float()
    loader = DataLoader(TensorDataset(images, labels), batch_size=50)
    strong, weak = _Oracle(0.95, seed=1), _Oracle(0.5, seed=2)

    result = fuse(strong, weak, loader, method="accuracy", rounds=8, device="cpu")
    assert result.acc_a > 0.9 and result.acc_b < 0.6
    weights = [step["w"] for step in result.trajectory]
    assert weights[0] > 0.5 and result.weight > 0.6
    assert result.weight == pytest.approx(weights[-1])
    assert not any(p.requires_grad for p in strong.parameters()) and not strong.training
    assert set(result.trajectory[0]) == {"round", "acc_a", "acc_b", "w", "acc_fused", "logloss_fused"}

    swapped = fuse(weak, strong, loader, method="accuracy", rounds=8, device="cpu")
    assert swapped.weight < 0.4
    by_loss = fuse(strong, weak, loader, method="logloss", device="cpu")
    assert by_loss.weight > 0.6
    assert by_loss.logloss_fused <= min(
        fuse_probs(*_probs(strong, weak, loader), method="accuracy").logloss_fused, by_loss.logloss_fused
    )


def _probs(a: nn.Module, b: nn.Module, loader: DataLoader[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from trainer.fuse import predict_probs

    return predict_probs(a, b, loader, torch.device("cpu"))


def test_train_and_export_gives_a_model_whose_onnx_matches_torch(few: list[Sample], tmp_path: Path) -> None:
    import onnxruntime as ort

    from screener.imaging.pixels import preprocess_file
    from screener.model.fused import load_fused_from_safetensors
    from screener.model.modelcard import load_model_dir
    from trainer.pipeline import train_and_export

    outcome = train_and_export(
        preset="quick",
        data=few,
        out=tmp_path / "model",
        archs=("resnet18", "resnet18"),
        input_size=64,
        epochs=1,
        batch_size=8,
        samples_per_epoch=16,
        version="test-trained-1",
        progress=False,
    )
    loaded = load_model_dir(tmp_path / "model")
    card = loaded.card
    assert card.version == "test-trained-1" and card.architectures == ("resnet18", "resnet18")
    assert card.training_data_digest == outcome.splits_digest and card.input_size == 64
    assert card.metrics["pretrained"] is False and len(card.metrics["candidates"]) == 2
    assert card.fusion_weight == pytest.approx(outcome.fusion.weight, abs=1e-6)
    assert outcome.test_samples and not {s.key for s in outcome.test_samples} & {
        s.key for s in outcome.splits.train + outcome.splits.val
    }

    image = preprocess_file(outcome.test_samples[0].path, card.preprocessing, 50_000_000)[None]
    model = load_fused_from_safetensors(loaded.weights_path, card)
    with torch.no_grad():
        expected = [t.numpy() for t in model(torch.from_numpy(image))]
    session = ort.InferenceSession(str(loaded.onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": image})
    for a, b in zip(got, expected, strict=True):
        assert np.allclose(a, b, atol=1e-4)


_DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from screener.imaging.pixels import PreprocessSpec
    from trainer.data import ImageDataset, balanced_sampler, limit_per_class, load_samples
    from trainer.train import TrainConfig, shutdown_distributed, train_backbone

    samples = limit_per_class(load_samples(Path(sys.argv[1])), 8, seed=0)
    spec = PreprocessSpec(input_size=64)
    cfg = TrainConfig(arch="resnet18", input_size=64, epochs=1, batch_size=8)
    result = train_backbone(
        cfg, ImageDataset(samples, spec), ImageDataset(samples[:6], spec), Path(sys.argv[2]),
        sampler=balanced_sampler(samples, seed=0), progress=False,
    )
    # One write per rank: print() writes the text and the newline separately, and two ranks sharing
    # the launcher's stdout could interleave them.
    sys.stdout.write(f"VAL {result.val_accuracy} {result.val_loss}\\n")
    sys.stdout.flush()
    shutdown_distributed()
    """
)


@pytest.mark.slow
def test_ddp_with_two_gloo_processes_writes_the_single_process_layout(cxr3_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "tiny_train.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    single = subprocess.run(
        [sys.executable, str(script), str(cxr3_dir), str(tmp_path / "single")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = (
        [shutil.which("torchrun")]
        if shutil.which("torchrun")
        else [sys.executable, "-m", "torch.distributed.run"]
    )
    ddp = subprocess.run(
        [
            *launcher,
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            str(cxr3_dir),
            str(tmp_path / "ddp"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("VAL") == 2  # both ranks return a result

    def layout(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    assert layout(tmp_path / "ddp") == layout(tmp_path / "single")
    rows = (tmp_path / "ddp" / METRICS_CSV).read_text().splitlines()
    assert len(rows) == 2
    # Validation is all-reduced over both shards: the same images, so the same accuracy as one process.
    val_single = re.findall(r"VAL (\S+) (\S+)", single.stdout)
    val_ddp = re.findall(r"VAL (\S+) (\S+)", ddp.stdout)
    assert len(val_single) == 1 and len(val_ddp) == 2, (single.stdout, ddp.stdout)
    assert all(float(acc) >= 0.0 for acc, _ in val_ddp)

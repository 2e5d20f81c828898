"""Transfer learning of one backbone (Wang, Liu & Xu 2020, section II.B): new 3-class head, Adam at lr 1e-4,
dropped once to 1e-5 when the validation loss stops improving, batch 64, fixed seeds.

Laid out like torchvision's ``references/classification/train.py``: :func:`train_one_epoch`,
:func:`evaluate`, and :func:`train_backbone` as the loop around them. Every epoch leaves a resumable
checkpoint (safetensors + a JSON sidecar; nothing is pickled), ``metrics.csv`` and ``curves.png``.

Distributed training: launch the trainer with ``torchrun --nproc-per-node 2 -m trainer.cli train ...``.
When ``WORLD_SIZE > 1`` the process group is initialised (gloo on CPU, nccl on CUDA), the model is wrapped
in ``DistributedDataParallel``, each rank takes its shard of the (balanced) sampler's draw, validation
sums are all-reduced, and only rank 0 writes files. ``out_dir`` must be on a filesystem all ranks share.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterator, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from screener.core.errors import TrainingError
from screener.core.logs import get_logger
from screener.core.progress import Progress
from screener.model.fused import ARCHITECTURES, make_backbone

if TYPE_CHECKING:
    from torchvision.models import ResNet

log = get_logger("trainer.train")

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
BEST_WEIGHTS = "best.safetensors"
METRICS_CSV = "metrics.csv"
CURVES_PNG = "curves.png"
CSV_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s", "seconds")

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """How to train one backbone. ``amp`` and ``channels_last`` only take effect on CUDA.

    ``limit_batches`` caps the batches per epoch (training and validation alike), for smoke runs.
    ``pretrained_dir`` holds local torchvision ImageNet weights; without it training starts from scratch.
    """

    arch: str
    input_size: int
    epochs: int
    batch_size: int = 64
    lr: float = 1e-4
    lr_low: float = 1e-5
    plateau_patience: int = 2
    seed: int = 0
    workers: int = 0
    pretrained_dir: Path | None = None
    device: str | None = None
    amp: bool = True
    channels_last: bool = True
    limit_batches: int | None = None
    num_classes: int = 3  # outputs of the new head: the classes the training data holds


@dataclass(frozen=True)
class BackboneResult:
    """One trained backbone: ``weights_path`` is the safetensors state dict of its best-val-loss epoch,
    and ``val_accuracy`` / ``val_loss`` are that epoch's. ``images_per_s`` is the training throughput."""

    arch: str
    weights_path: Path
    val_accuracy: float
    val_loss: float
    history: list[dict[str, float]]
    pretrained: bool
    images_per_s: float


@dataclass(frozen=True)
class EpochStats:
    """Mean loss and accuracy over the images seen, with their count and the wall time."""

    loss: float
    accuracy: float
    images: int
    seconds: float


@dataclass
class _LoopState:
    """What the checkpoint's JSON sidecar carries besides tensors."""

    epoch: int = 0  # epochs completed
    lr_level: int = 0  # 0: cfg.lr, 1: cfg.lr_low
    best_val_loss: float = math.inf
    best_val_acc: float = 0.0
    best_epoch: int = 0
    bad_epochs: int = 0
    pretrained: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


# --- distributed -------------------------------------------------------------------------------------


def distributed_rank_world() -> tuple[int, int]:
    """``(rank, world_size)``, initialising the process group when launched by torchrun with WORLD_SIZE > 1.

    Idempotent. Uses nccl when CUDA is available, else gloo. Single process: ``(0, 1)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    """Destroy the process group if one was initialised (call once, at the end of the command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ShardedSampler(Sampler[int]):
    """Rank ``rank``'s share ``[rank::world]`` of another sampler's draw.

    Every rank seeds the inner sampler identically, so the shards partition one draw. Unlike
    ``DistributedSampler`` nothing is padded: the last shard may be one shorter.
    """

    def __init__(self, inner: Sampler[int], rank: int, world: int) -> None:
        self.inner, self.rank, self.world = inner, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.inner)[self.rank :: self.world])

    def __len__(self) -> int:
        total = len(self.inner) if isinstance(self.inner, Sized) else 0
        return max(0, (total - self.rank + self.world - 1) // self.world)


class _RangeSampler(Sampler[int]):
    """Plain ``0..n-1`` (shuffled with a generator when given); the default train sampler."""

    def __init__(self, n: int, generator: torch.Generator | None) -> None:
        self.n, self.generator = n, generator

    def __iter__(self) -> Iterator[int]:
        if self.generator is None:
            return iter(range(self.n))
        return iter(torch.randperm(self.n, generator=self.generator).tolist())

    def __len__(self) -> int:
        return self.n


# --- model construction ------------------------------------------------------------------------------


def load_pretrained(arch: str, pretrained_dir: Path | None, num_classes: int = 3) -> ResNet | None:
    """``arch`` with torchvision ImageNet weights read from a LOCAL file, its fc replaced by a
    ``num_classes`` head.

    Looks in ``pretrained_dir`` for ``<arch>.safetensors`` first, then torchvision's own file name
    ``<arch>-<hash>.pth``. Returns None when ``pretrained_dir`` is None (training starts from scratch).
    Raises :class:`TrainingError` when the directory holds no weights for ``arch`` or they do not fit.
    """
    if pretrained_dir is None:
        return None
    net = make_backbone(arch, num_classes)
    safetensors_path = pretrained_dir / f"{arch}.safetensors"
    pth = sorted(pretrained_dir.glob(f"{arch}-*.pth"))
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        state = load_file(str(safetensors_path), device="cpu")
        source = safetensors_path
    elif pth:
        # torchvision publishes .pth pickles; weights_only=True is torch's safe loader: it rebuilds tensors
        # and plain containers only and refuses to execute arbitrary code. The only pickle we ever read.
        state = torch.load(pth[0], map_location="cpu", weights_only=True)
        source = pth[0]
    else:
        raise TrainingError(
            f"no ImageNet weights for {arch} in {pretrained_dir}: expected {arch}.safetensors or "
            f"{arch}-<hash>.pth (torchvision's name); add one or train without --pretrained-dir"
        )
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}  # ImageNet's 1000-class head
    missing, unexpected = net.load_state_dict(backbone, strict=False)
    if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
        raise TrainingError(
            f"{source} does not fit {arch}: "
            f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )
    log.info("pretrained_weights_loaded", arch=arch, file=source.name)
    return net


def build_backbone(
    arch: str,
    *,
    pretrained_dir: Path | None,
    init_state: Mapping[str, torch.Tensor] | None = None,
    num_classes: int = 3,
) -> tuple[ResNet, bool]:
    """The backbone to train and whether it starts from ImageNet weights.

    ``init_state`` (a parent model's backbone state dict, for fine-tuning) wins over ``pretrained_dir``;
    the flag then says whether the parent was pretrained is unknown, so it is True (not from scratch).
    Raises :class:`TrainingError` when the weights do not fit ``arch``.
    """
    if arch not in ARCHITECTURES:
        raise TrainingError(f"unknown backbone {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    if init_state is not None:
        head = init_state.get("fc.bias")
        net = make_backbone(arch, int(head.shape[0]) if head is not None else num_classes)
        try:
            net.load_state_dict(dict(init_state), strict=True)
        except RuntimeError as exc:
            raise TrainingError(f"parent weights do not fit {arch}: {str(exc).splitlines()[0]}") from None
        return net, True
    pretrained = load_pretrained(arch, pretrained_dir, num_classes)
    if pretrained is not None:
        return pretrained, True
    log.warning("training_from_scratch", arch=arch, reason="no pretrained_dir: no ImageNet weights")
    return make_backbone(arch, num_classes), False


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a device, or CUDA when available, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- one epoch ---------------------------------------------------------------------------------------


def _batches(loader: DataLoader[Batch], limit: int | None) -> Iterator[Batch]:
    for index, batch in enumerate(loader):
        if limit is not None and index >= limit:
            return
        yield batch


def _n_batches(loader: DataLoader[Batch], limit: int | None) -> int:
    n = len(loader)
    return n if limit is None else min(n, limit)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    limit_batches: int | None = None,
    progress: bool = False,
    label: str = "",
) -> EpochStats:
    """One pass of cross-entropy training; returns this rank's mean loss and accuracy.

    ``scaler`` (CUDA only) enables float16 autocast with loss scaling.
    """
    model.train()
    criterion = nn.CrossEntropyLoss()
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = Progress(_n_batches(loader, limit_batches)) if progress else None
    for images, targets in _batches(loader, limit_batches):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=scaler is not None):
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = int(targets.shape[0])
        loss_sum += float(loss.detach()) * n
        correct += int((logits.detach().argmax(dim=1) == targets).sum())
        seen += n
        if bar is not None:
            bar.step(f"{label} loss {loss_sum / seen:.4f} acc {correct / seen:.3f}")
    if bar is not None:
        bar.__exit__(None, None, None)
    seconds = time.perf_counter() - start
    if seen == 0:
        raise TrainingError("the training loader yielded no batches: is the training split empty?")
    return EpochStats(loss=loss_sum / seen, accuracy=correct / seen, images=seen, seconds=seconds)


def evaluate(
    model: nn.Module,
    loader: DataLoader[Batch],
    device: torch.device,
    *,
    channels_last: bool = False,
    limit_batches: int | None = None,
) -> EpochStats:
    """Mean cross-entropy and accuracy over ``loader``, summed across ranks when distributed.

    Raises :class:`TrainingError` when no image was evaluated on any rank.
    """
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, seen
    start = time.perf_counter()
    with torch.no_grad():
        for images, targets in _batches(loader, limit_batches):
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images).float()
            sums[0] += criterion(logits, targets).double()
            sums[1] += (logits.argmax(dim=1) == targets).sum().double()
            sums[2] += targets.shape[0]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    loss_sum, correct, seen = (float(v) for v in sums.cpu())
    if seen == 0:
        raise TrainingError("the validation loader yielded no images: is the validation split empty?")
    return EpochStats(loss_sum / seen, correct / seen, int(seen), time.perf_counter() - start)


# --- checkpoints (no pickle) -------------------------------------------------------------------------


def _flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``optim.<param>.<name>``) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    for param_id, per_param in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(per_param)
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _replace_atomically(tmp: Path, final: Path) -> None:
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(final)


def save_checkpoint(
    out_dir: Path,
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loop: _LoopState,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Write ``checkpoint.safetensors`` (model, optimizer tensors, torch RNG) and ``checkpoint.json``.

    The JSON (epoch, best metrics, lr level, optimizer hyperparameters, numpy/python RNG state, history)
    is replaced last and names the tensors file's sha256, so a crash mid-write leaves the previous
    checkpoint usable or a detectable mismatch, never a silently mixed one.
    """
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    tmp = out_dir / f".{CHECKPOINT_TENSORS}.tmp"
    save_file(tensors, str(tmp), metadata={"arch": cfg.arch, "epoch": str(loop.epoch)})
    _replace_atomically(tmp, out_dir / CHECKPOINT_TENSORS)
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    meta = {
        "arch": cfg.arch,
        "input_size": cfg.input_size,
        "tensors_sha256": _sha256(out_dir / CHECKPOINT_TENSORS),
        "loop": {
            "epoch": loop.epoch,
            "lr_level": loop.lr_level,
            "best_val_loss": loop.best_val_loss,
            "best_val_acc": loop.best_val_acc,
            "best_epoch": loop.best_epoch,
            "bad_epochs": loop.bad_epochs,
            "pretrained": loop.pretrained,
            "history": loop.history,
        },
        "optimizer": optim_meta,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {"numpy": np_state, "python": random.getstate()},
    }
    tmp_json = out_dir / f".{CHECKPOINT_JSON}.tmp"
    tmp_json.write_text(json.dumps(meta), encoding="utf-8")
    _replace_atomically(tmp_json, out_dir / CHECKPOINT_JSON)


def load_checkpoint(
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    *,
    restore_rng: bool = True,
) -> _LoopState:
    """Restore model, optimizer, scaler and (by default) RNG state from ``out_dir``'s checkpoint.

    Raises :class:`TrainingError` when the files are missing, disagree with each other, or do not fit.
    """
    from safetensors.torch import load_file

    tensors_path, json_path = out_dir / CHECKPOINT_TENSORS, out_dir / CHECKPOINT_JSON
    if not (tensors_path.is_file() and json_path.is_file()):
        raise TrainingError(
            f"no checkpoint in {out_dir}: expected {CHECKPOINT_TENSORS} and {CHECKPOINT_JSON}"
        )
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    if _sha256(tensors_path) != meta["tensors_sha256"]:
        raise TrainingError(
            f"{tensors_path} does not match {json_path} (interrupted write?): delete both to start over"
        )
    tensors = load_file(str(tensors_path), device="cpu")
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_state, strict=True)
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise TrainingError(
            f"checkpoint in {out_dir} does not fit {meta.get('arch')}: {str(exc).splitlines()[0]}"
        ) from None
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        np_state = meta["rng"]["numpy"]
        np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
        np.random.set_state(np_state)
        version, internal, gauss = meta["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
    loop = meta["loop"]
    return _LoopState(
        epoch=int(loop["epoch"]),
        lr_level=int(loop["lr_level"]),
        best_val_loss=float(loop["best_val_loss"]),
        best_val_acc=float(loop["best_val_acc"]),
        best_epoch=int(loop["best_epoch"]),
        bad_epochs=int(loop["bad_epochs"]),
        pretrained=bool(loop["pretrained"]),
        history=list(loop["history"]),
    )


# --- reports -----------------------------------------------------------------------------------------


def write_metrics_csv(history: list[dict[str, float]], path: Path) -> None:
    """One row per epoch with the columns of :data:`CSV_FIELDS`."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row[k] for k in CSV_FIELDS})


def plot_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    """Loss and accuracy per epoch (train and validation) as a PNG; uses the Agg canvas, no GUI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    for ax, key, name in zip(fig.subplots(1, 2), ("loss", "acc"), ("cross-entropy", "accuracy"), strict=True):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], marker="o", label="train")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(str(path), dpi=100)


# --- the loop ----------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Derived from (seed, epoch), not carried over, so a resumed run draws exactly what a straight one does.
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def _reseed_sampler(sampler: Sampler[int] | None, seed: int, epoch: int) -> None:
    inner = sampler.inner if isinstance(sampler, ShardedSampler) else sampler
    generator = getattr(inner, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed * 100_003 + epoch)
    set_epoch = getattr(inner, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)


def _val_sampler(n: int, rank: int, world: int) -> Sampler[int]:
    return ShardedSampler(_RangeSampler(n, None), rank, world) if world > 1 else _RangeSampler(n, None)


def train_backbone(
    cfg: TrainConfig,
    train_ds: Dataset[Any],
    val_ds: Dataset[Any],
    out_dir: Path,
    *,
    sampler: Sampler[int] | None = None,
    resume: bool = True,
    progress: bool = True,
    init_state: Mapping[str, torch.Tensor] | None = None,
) -> BackboneResult:
    """Train ``cfg.arch`` for ``cfg.epochs`` epochs and return its best-validation-loss weights.

    Adam at ``cfg.lr``: the paper's 1e-4 is an Adam-scale rate (SGD would need ~1e-2). The rate drops
    once, to ``cfg.lr_low``, after ``cfg.plateau_patience`` epochs without a lower validation loss.
    ``sampler`` (e.g. a balanced ``WeightedRandomSampler``) replaces the shuffled order; when distributed
    each rank takes its shard of it. ``init_state`` starts from a parent's backbone (fine-tuning).
    With ``resume`` an existing checkpoint in ``out_dir`` is continued (epochs already done are skipped);
    without it any checkpoint there is overwritten. Writes into ``out_dir``: ``checkpoint.safetensors`` +
    ``checkpoint.json``, ``best.safetensors``, ``metrics.csv`` and ``curves.png`` (rank 0 only).
    Datasets with ``set_epoch(epoch)`` are told the epoch (fresh augmentation per epoch).

    Raises :class:`TrainingError` on a bad configuration, empty loaders, or an unusable checkpoint.
    """
    if cfg.epochs < 1:
        raise TrainingError(f"epochs {cfg.epochs} must be at least 1")
    if cfg.batch_size < 1:
        raise TrainingError(f"batch_size {cfg.batch_size} must be at least 1")
    rank, world = distributed_rank_world()
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    cuda = device.type == "cuda"
    channels_last = cfg.channels_last and cuda
    out_dir.mkdir(parents=True, exist_ok=True)
    barrier()

    seed_everything(cfg.seed)
    model, pretrained = build_backbone(
        cfg.arch, pretrained_dir=cfg.pretrained_dir, init_state=init_state, num_classes=cfg.num_classes
    )
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and cuda else None
    loop = _LoopState(pretrained=pretrained)
    if resume and (out_dir / CHECKPOINT_JSON).is_file():
        loop = load_checkpoint(out_dir, model, optimizer, scaler)
        log.info("training_resumed", arch=cfg.arch, epoch=loop.epoch, out=str(out_dir))
    train_model: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

    n_train = len(train_ds) if isinstance(train_ds, Sized) else 0
    n_val = len(val_ds) if isinstance(val_ds, Sized) else 0
    generator = torch.Generator()
    base: Sampler[int] = sampler if sampler is not None else _RangeSampler(n_train, generator)
    train_sampler: Sampler[int] = ShardedSampler(base, rank, world) if world > 1 else base
    per_rank_batch = max(1, cfg.batch_size // world)
    train_loader: DataLoader[Batch] = DataLoader(
        train_ds,
        batch_size=per_rank_batch,
        sampler=train_sampler,
        num_workers=cfg.workers,
        pin_memory=cuda,
        drop_last=False,
        persistent_workers=False,
    )
    val_loader: DataLoader[Batch] = DataLoader(
        val_ds, batch_size=per_rank_batch, sampler=_val_sampler(n_val, rank, world), num_workers=cfg.workers
    )
    log.info(
        "training_started",
        arch=cfg.arch,
        input_size=cfg.input_size,
        epochs=cfg.epochs,
        start_epoch=loop.epoch + 1,
        train_images=n_train,
        val_images=n_val,
        device=str(device),
        world_size=world,
        pretrained=loop.pretrained,
    )
    for epoch in range(loop.epoch + 1, cfg.epochs + 1):
        lr = cfg.lr if loop.lr_level == 0 else cfg.lr_low
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator.manual_seed(cfg.seed * 100_003 + epoch)
        _reseed_sampler(sampler, cfg.seed, epoch)
        for ds in (train_ds, val_ds):
            set_epoch = getattr(ds, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
        train_stats = train_one_epoch(
            train_model,
            train_loader,
            optimizer,
            device,
            scaler=scaler,
            channels_last=channels_last,
            limit_batches=cfg.limit_batches,
            progress=progress and rank == 0,
            label=f"{cfg.arch} epoch {epoch}/{cfg.epochs}",
        )
        val_stats = evaluate(
            model, val_loader, device, channels_last=channels_last, limit_batches=cfg.limit_batches
        )
        images_per_s = train_stats.images * world / max(train_stats.seconds, 1e-9)
        loop.history.append(
            {
                "epoch": epoch,
                "lr": lr,
                "train_loss": train_stats.loss,
                "train_acc": train_stats.accuracy,
                "val_loss": val_stats.loss,
                "val_acc": val_stats.accuracy,
                "images_per_s": images_per_s,
                "seconds": train_stats.seconds + val_stats.seconds,
            }
        )
        improved = val_stats.loss < loop.best_val_loss
        if improved:
            loop.best_val_loss, loop.best_val_acc, loop.best_epoch = val_stats.loss, val_stats.accuracy, epoch
            loop.bad_epochs = 0
        else:
            loop.bad_epochs += 1
            if loop.lr_level == 0 and loop.bad_epochs >= cfg.plateau_patience:
                loop.lr_level, loop.bad_epochs = 1, 0
                log.info("lr_lowered", arch=cfg.arch, epoch=epoch, lr=cfg.lr_low)
        loop.epoch = epoch
        if rank == 0:
            if improved:
                _save_weights(model, out_dir / BEST_WEIGHTS, cfg.arch, epoch)
            save_checkpoint(out_dir, cfg, model, optimizer, loop, scaler)
            write_metrics_csv(loop.history, out_dir / METRICS_CSV)
            plot_curves(loop.history, out_dir / CURVES_PNG, f"{cfg.arch} @ {cfg.input_size} px")
        barrier()
        log.info("epoch_done", arch=cfg.arch, **loop.history[-1], best_epoch=loop.best_epoch)

    if not (out_dir / BEST_WEIGHTS).is_file():
        raise TrainingError(f"{out_dir / BEST_WEIGHTS} is missing: delete {out_dir} and train again")
    rates = [row["images_per_s"] for row in loop.history]
    return BackboneResult(
        arch=cfg.arch,
        weights_path=out_dir / BEST_WEIGHTS,
        val_accuracy=loop.best_val_acc,
        val_loss=loop.best_val_loss,
        history=list(loop.history),
        pretrained=loop.pretrained,
        images_per_s=sum(rates) / len(rates) if rates else 0.0,
    )


def _save_weights(model: nn.Module, path: Path, arch: str, epoch: int) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"arch": arch, "epoch": str(epoch)})
    _replace_atomically(tmp, path)


def load_backbone_weights(arch: str, path: Path) -> ResNet:
    """A backbone in eval mode holding the state dict at ``path`` (as :func:`train_backbone` writes it).

    Raises :class:`TrainingError` when the file is unreadable or does not fit ``arch``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise TrainingError(f"cannot read backbone weights {path}: {exc}") from None
    net, _ = build_backbone(arch, pretrained_dir=None, init_state=state)
    return net.eval()

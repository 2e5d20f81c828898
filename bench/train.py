"""Training throughput of the paper's backbones: ResNet-101 and ResNet-152 at 224 px.

One training step is forward + cross-entropy + backward + Adam update (lr 1e-4, as the trainer uses) on
a synthetic batch (speed does not depend on the pixels). On a CUDA host the step runs with automatic
mixed precision (FP16 autocast + gradient scaling) and channels-last. The baseline, measured in the same
run and alternating with the training steps, is the eval-mode forward pass of the same network on the
same batch (no gradients; the same precision): what the network costs when it only classifies.

    python bench/train.py            # batch 8 on CPU (64 on GPU), 5 timed rounds
    python bench/train.py --quick    # 2 timed rounds, under 2 minutes on 2 cores

The last line is ``ratio=<training images/s / eval-forward images/s>`` over both networks together
(sum of seconds per image of each), i.e. how much slower learning is than classifying.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from screener.core.progress import Progress
from screener.model.fused import make_backbone


@dataclass(frozen=True)
class ArchResult:
    arch: str
    batch: int
    train_s: float  # median seconds per training step
    eval_s: float  # median seconds per eval forward

    @property
    def train_images_per_s(self) -> float:
        return self.batch / self.train_s

    @property
    def eval_images_per_s(self) -> float:
        return self.batch / self.eval_s


def pair_ratio(results: list[ArchResult]) -> float:
    """Training throughput of all networks together over their eval-forward throughput."""
    train = sum(r.train_s / r.batch for r in results)
    evaluate = sum(r.eval_s / r.batch for r in results)
    return evaluate / train


def make_steps(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one training step, one eval forward) for ``net`` on the batch ``x`` with labels ``y``."""
    device_type = x.device.type
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device_type, enabled=amp)
    loss_fn = nn.CrossEntropyLoss()

    def sync() -> None:
        if device_type == "cuda":
            torch.cuda.synchronize()

    def train_step() -> None:
        net.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.float16, enabled=amp):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sync()

    def eval_forward() -> None:
        net.eval()
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.float16, enabled=amp):
            net(x)
        sync()

    return train_step, eval_forward


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 timed rounds (under 2 minutes on 2 cores)")
    ap.add_argument("--archs", default="resnet101,resnet152", help="comma list of backbones")
    ap.add_argument("--batch", type=int, help="batch size (default 8 on CPU, 64 on GPU)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--runs", type=int, help="timed rounds (default 5, quick 2)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--no-amp", action="store_true", help="FP32 training on a GPU too")
    args = ap.parse_args()

    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("bench: --device cuda but torch sees no CUDA GPU; use --device cpu")
    device = torch.device("cuda" if cuda else "cpu")
    amp = cuda and not args.no_amp
    batch = args.batch or (64 if cuda else 8)
    runs = args.runs or (2 if args.quick else 5)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    if cuda:
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    results: list[ArchResult] = []
    with Progress(len(archs) * (runs + 1)) as bar:
        for arch in archs:
            net = make_backbone(arch).to(device).to(memory_format=memory_format)
            x = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
            x = x.contiguous(memory_format=memory_format)
            y = torch.randint(0, 3, (batch,), device=device)
            train_step, eval_forward = make_steps(net, x, y, amp)
            train_step()  # warm-up: allocator, cuDNN autotuning, optimizer state
            eval_forward()
            bar.step(f"{arch} warmed up")
            train_times: list[float] = []
            eval_times: list[float] = []
            for r in range(runs):
                pair = [(train_times, train_step), (eval_times, eval_forward)]
                for times, fn in pair if r % 2 == 0 else reversed(pair):
                    times.append(timed(fn))
                bar.step(f"{arch} round {r + 1}: train {batch / train_times[-1]:.2f} img/s")
            results.append(
                ArchResult(arch, batch, statistics.median(train_times), statistics.median(eval_times))
            )
            del net, x, y, train_step, eval_forward
            if cuda:
                torch.cuda.empty_cache()

    where = (
        f"cuda ({torch.cuda.get_device_name(0)}), AMP FP16"
        if cuda
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"training step (fwd + bwd + Adam) at {args.image_size}px, batch {batch}, {where}, median of {runs}"
    )
    header = f"{'network':<10} {'train ms/step':>14} {'train img/s':>12} {'eval img/s (baseline)':>22}"
    print(f"{header} {'ratio':>6}")
    for res in results:
        print(
            f"{res.arch:<10} {res.train_s * 1000:>14.0f} {res.train_images_per_s:>12.2f} "
            f"{res.eval_images_per_s:>22.2f} {res.train_images_per_s / res.eval_images_per_s:>6.3f}"
        )
    print("# ratio is training images/s / eval-mode forward images/s, all networks together")
    print(f"ratio={pair_ratio(results):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

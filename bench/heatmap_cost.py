"""What the ``heatmap`` output costs: ONNX Runtime latency of the same model with and without it.

    nice -n 19 .venv/bin/python -m bench.heatmap_cost [--model DIR] [--batch 1 --batch 8] [--repeats 20]
    nice -n 19 .venv/bin/python -m bench.heatmap_cost --compare consistency --model DIR_WITH_GATE

With ``--compare consistency`` the two graphs differ instead in the image-content gate's view check: with
its seven turned and inverted copies (card method ``mahalanobis+view+consistency``) and reading the input
as it is (``mahalanobis+view``), same weights, same statistics; the model must have such a gate.

Without ``--model`` the production architecture is measured: a seeded random resnet101 + resnet152 at
224 px (latency does not depend on the weights). The model's weights are exported twice into a temporary
folder, once with the class activation map output (:mod:`screener.model.cam`) and once without, and both
graphs run on CPU (ONNX Runtime, the screener's default engine) on the same batches, alternating, so both
see the same machine load. Prints the median and p90 milliseconds per batch for each, and as the last
line ``ratio=<with heatmap / without, median latency at the largest batch>`` (1.00 = free; with
``--compare consistency``: with the copies / without).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from screener.model.engine.onnx_backend import OnnxRuntimeEngine
from screener.model.export import DEFAULT_HEATMAP, create_random_model_dir, export_model_dir
from screener.model.fused import FusedResNet, load_fused_from_safetensors
from screener.model.modelcard import LoadedModel, load_model_dir
from screener.model.novelty import MahalanobisGate


def _without_consistency(model: FusedResNet) -> None:
    """Give ``model`` the same gate with a view check that reads the input as it is (no copies)."""
    gate = model.novelty_gate
    if gate is None or gate.view is None or not gate.view.consistency:
        raise SystemExit("--compare consistency needs a model whose gate is mahalanobis+view+consistency")
    plain = MahalanobisGate(gate.whitening.shape[0], gate.means.shape[0], view=True)
    plain.set_statistics(gate.whitening, gate.means)
    plain.set_view(gate.view, float(gate.view_scale))
    model.novelty_gate = plain


def _variants(model_dir: Path, work: Path, compare: str) -> tuple[LoadedModel, LoadedModel]:
    """The model exported twice: (with, without) the heatmap output, or the gate's consistency copies."""
    loaded = load_model_dir(model_dir)
    card = loaded.card
    out = []
    for name in ("with", "without"):
        target = work / name
        model = load_fused_from_safetensors(loaded.weights_path, card)
        heatmap, gate = (DEFAULT_HEATMAP if name == "with" else None), card.gate
        if compare == "consistency":
            heatmap = card.heatmap
            if name == "without":
                _without_consistency(model)
                gate = dataclasses.replace(card.gate, method="mahalanobis+view") if card.gate else None
        export_model_dir(
            model,
            target,
            version=f"{card.version[:50]}-{name}",
            preprocessing=card.preprocessing,
            gate=gate,
            heatmap=heatmap,
        )
        out.append(load_model_dir(target))
    return out[0], out[1]


def _time(engine: OnnxRuntimeEngine, batch: np.ndarray) -> float:
    started = time.perf_counter()
    engine.infer(batch)
    return (time.perf_counter() - started) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model directory (default: random resnet101+resnet152)")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default: 1 and 8)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per batch size and variant")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per core)")
    parser.add_argument(
        "--compare",
        choices=("heatmap", "consistency"),
        default="heatmap",
        help="what the two graphs differ in (default: the heatmap output)",
    )
    args = parser.parse_args(argv)
    if args.compare == "consistency" and args.model is None:
        parser.error(
            "--compare consistency needs --model DIR (a model with a mahalanobis+view+consistency gate)"
        )
    batches = sorted(set(args.batch or [1, 8]))
    with tempfile.TemporaryDirectory(prefix="heatmap-cost-") as tmp:
        work = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            model_dir = work / "random"
            create_random_model_dir(model_dir, input_size=224, seed=0, version="bench-heatmap-cost")
        with_map, without = _variants(model_dir, work, args.compare)
        engines = {
            f"with {args.compare}": OnnxRuntimeEngine(with_map, threads=args.threads),
            "without": OnnxRuntimeEngine(without, threads=args.threads),
        }
        size = with_map.card.input_size
        arch = "+".join(with_map.card.architectures)
        gate = with_map.card.gate.method if with_map.card.gate else None
        print(f"model {arch} at {size} px, heatmap {with_map.card.heatmap}, gate {gate}, onnxruntime CPU")
        rng = np.random.default_rng(0)
        medians: dict[tuple[str, int], float] = {}
        for n in batches:
            batch = rng.standard_normal((n, 3, size, size), dtype=np.float32)
            for engine in engines.values():  # warm-up
                engine.infer(batch)
            times: dict[str, list[float]] = {name: [] for name in engines}
            for _ in range(args.repeats):
                for name, engine in engines.items():  # alternating: both see the same load
                    times[name].append(_time(engine, batch))
            for name, values in times.items():
                ordered = sorted(values)
                medians[(name, n)] = statistics.median(ordered)
                p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
                print(f"batch {n:3d}  {name:16s} median {medians[(name, n)]:8.1f} ms  p90 {p90:8.1f} ms")
        for engine in engines.values():
            engine.close()
    largest = batches[-1]
    print(f"ratio={medians[(f'with {args.compare}', largest)] / medians[('without', largest)]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

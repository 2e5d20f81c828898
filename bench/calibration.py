"""Compare calibration methods on a trained model's own validation split (and check them on its test split).

    nice -n 19 .venv/bin/python bench/calibration.py var/models/robust-1 \\
        --data ../shared/data/cxr3 --data ../shared/data/cxrx [--limit N] [--seed 0] [--json FILE]

``--data``, ``--limit`` and ``--seed`` must be those of ``trainer train`` (the split is checked against
the card's digest). Each network's raw probabilities (temperature 1) are computed by the model itself,
lung crop included, on the validation and test splits; every method of :mod:`trainer.calibrate` is
fitted on validation with the card's fusion weight and reported with its in-sample validation ECE, its
two-fold cross-fitted validation ECE and log-loss (the rule `trainer train` now chooses by), and its ECE
on the test split (fitted on validation). The issue's target: ECE <= 0.05 on validation.

Two more things make the figures readable. The noise floor: the ECE a perfectly calibrated model with the
same probabilities would show on the same number of images (labels drawn from the probabilities;
:func:`trainer.calibrate.ece_noise_floor`). And, with ``--pool N``, up to N images per class of
``--data`` that are in none of the model's splits (never trained, validated or tested on; the same
sources, so in distribution): an ECE measured on many more images than the validation split holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from screener.model.fused import load_fused_from_safetensors
from screener.model.modelcard import CLASSES, load_model_dir
from trainer.calibrate import (
    METHODS,
    apply_method,
    choose_calibration,
    compare_methods,
    ece,
    ece_noise_floor,
)
from trainer.data import ImageDataset, Sample, limit_per_class, load_roots
from trainer.fuse import log_loss
from trainer.quantize import model_split


def raw_probs(model: torch.nn.Module, samples: list[Sample], spec: object) -> tuple[np.ndarray, ...]:
    """``(probs_a, probs_b, labels)`` at temperature 1."""
    loader = torch.utils.data.DataLoader(ImageDataset(samples, spec), batch_size=16)  # type: ignore[arg-type]
    pa, pb, ys = [], [], []
    with torch.no_grad():
        for images, labels in loader:
            out = model(images)
            pa.append(out[1].double().numpy())
            pb.append(out[2].double().numpy())
            ys.append(labels.numpy())
    return np.concatenate(pa), np.concatenate(pb), np.concatenate(ys).astype(np.int64)


def _bootstrap_ece(
    labels: np.ndarray, probs: np.ndarray, seed: int, replicates: int = 200
) -> tuple[float, float]:
    """95% percentile bootstrap interval of the ECE over images."""
    rng = np.random.default_rng(seed)
    n = labels.size
    values = [ece(labels[idx], probs[idx]) for idx in (rng.integers(0, n, n) for _ in range(replicates))]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--pool", type=int, default=0, help="images per class outside every split (0: none)")
    args = parser.parse_args(argv)

    loaded = load_model_dir(args.model_dir)
    everything = load_roots(args.data)
    splits = model_split(loaded, everything, seed=args.seed, limit=args.limit)
    model = load_fused_from_safetensors(loaded.weights_path, loaded.card)
    model.set_temperatures(1.0, 1.0)
    model.set_output_calibration(None)
    model.novelty_gate = None
    model.heatmap_size = None
    spec = loaded.card.preprocessing
    va, vb, vy = raw_probs(model, splits.val, spec)
    ta, tb, ty = raw_probs(model, splits.test, spec)
    used = {s.path for s in (*splits.train, *splits.val, *splits.test)}
    unused = [s for s in everything if s.path not in used]
    pool = limit_per_class(unused, args.pool, seed=args.seed) if args.pool > 0 else []
    pa, pb, py = raw_probs(model, pool, spec) if pool else (ta[:0], tb[:0], ty[:0])
    w = loaded.card.fusion_weight
    table = compare_methods(va, vb, vy, w, seed=args.seed)
    from trainer.calibrate import fit_method

    print(
        f"model {loaded.card.version}: validation n={vy.size}, test n={ty.size}, pool n={py.size} "
        f"(per class {np.bincount(py, minlength=len(CLASSES)).tolist()}), fusion weight {w:.3f}"
    )
    print(f"classes {', '.join(CLASSES)}")
    print(
        "| method | in graph | val ECE (in-sample) | val ECE (2-fold cross-fitted) | val log-loss "
        "| val log-loss (cross-fitted) | test ECE | test log-loss | pool ECE [95% CI] |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    chosen, _ = choose_calibration(table)
    for method in METHODS:
        params = fit_method(method, va, vb, vy, w)
        test_probs = apply_method(method, params, ta, tb, w)
        test_ece = ece(ty, test_probs)
        test_ll = log_loss(test_probs, ty)
        table[method]["test_ece"] = round(test_ece, 4)
        table[method]["test_logloss"] = round(test_ll, 4)
        pool_cell = "n/a"
        if py.size:
            pool_probs = apply_method(method, params, pa, pb, w)
            pool_ece = ece(py, pool_probs)
            low, high = _bootstrap_ece(py, pool_probs, args.seed)
            table[method]["pool_ece"] = [round(pool_ece, 4), round(low, 4), round(high, 4)]
            pool_cell = f"{100 * pool_ece:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
        row = table[method]
        cross, cross_ll = row["cross_fitted_ece"], row["cross_fitted_logloss"]
        name = f"**{method}** (kept)" if method == chosen else method
        print(
            f"| {name} | {'yes' if row['in_graph'] else 'no'} | {100 * row['val_ece']:.1f} | "
            f"{'n/a' if cross is None else f'{100 * cross:.1f}'} | {row['val_logloss']:.3f} | "
            f"{'n/a' if cross_ll is None else f'{cross_ll:.3f}'} | {100 * test_ece:.1f} | {test_ll:.3f} | "
            f"{pool_cell} |"
        )
    kept_params = fit_method(chosen, va, vb, vy, w)
    floor = ece_noise_floor(apply_method(chosen, kept_params, va, vb, w))
    print(
        f"noise floor (validation, n={vy.size}, the kept method's probabilities): a perfectly calibrated "
        f"model would show ECE {100 * floor[0]:.1f}% on average, up to {100 * floor[1]:.1f}% (95th pct.)"
    )
    table["noise_floor_val"] = {"mean": round(floor[0], 4), "p95": round(floor[1], 4)}
    if py.size:
        pool_floor = ece_noise_floor(apply_method(chosen, kept_params, pa, pb, w))
        print(
            f"noise floor (pool, n={py.size}): {100 * pool_floor[0]:.1f}% on average, up to "
            f"{100 * pool_floor[1]:.1f}%"
        )
        table["noise_floor_pool"] = {"mean": round(pool_floor[0], 4), "p95": round(pool_floor[1], 4)}
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

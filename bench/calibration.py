"""Compare calibration methods on a trained model's own validation split (and check them on its test split).

    nice -n 19 .venv/bin/python bench/calibration.py var/models/robust-1 \\
        --data ../shared/data/cxr3 --data ../shared/data/cxrx [--limit N] [--seed 0] [--json FILE]

``--data``, ``--limit`` and ``--seed`` must be those of ``trainer train`` (the split is checked against
the card's digest). Each network's raw probabilities (temperature 1) are computed by the model itself,
lung crop included, on the validation and test splits; every method of :mod:`trainer.calibrate` is
fitted on validation with the card's fusion weight and reported with its in-sample validation ECE, its
two-fold cross-fitted validation ECE, and its ECE on the test split (fitted on validation). The issue's
target: ECE <= 0.05 on validation.
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
from trainer.calibrate import METHODS, apply_method, compare_methods, ece
from trainer.data import ImageDataset, Sample, load_roots
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    loaded = load_model_dir(args.model_dir)
    splits = model_split(loaded, load_roots(args.data), seed=args.seed, limit=args.limit)
    model = load_fused_from_safetensors(loaded.weights_path, loaded.card)
    model.set_temperatures(1.0, 1.0)
    model.novelty_gate = None
    model.heatmap_size = None
    spec = loaded.card.preprocessing
    va, vb, vy = raw_probs(model, splits.val, spec)
    ta, tb, ty = raw_probs(model, splits.test, spec)
    w = loaded.card.fusion_weight
    table = compare_methods(va, vb, vy, w, seed=args.seed)
    from trainer.calibrate import fit_method

    print(f"model {loaded.card.version}: validation n={vy.size}, test n={ty.size}, fusion weight {w:.3f}")
    print(f"classes {', '.join(CLASSES)}")
    print(
        "| method | in graph | val ECE (in-sample) | val ECE (2-fold cross-fitted) | val log-loss "
        "| test ECE |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for method in METHODS:
        params = fit_method(method, va, vb, vy, w)
        test_ece = ece(ty, apply_method(method, params, ta, tb, w))
        table[method]["test_ece"] = round(test_ece, 4)
        row = table[method]
        cross = row["cross_fitted_ece"]
        print(
            f"| {method} | {'yes' if row['in_graph'] else 'no'} | {100 * row['val_ece']:.1f} | "
            f"{'n/a' if cross is None else f'{100 * cross:.1f}'} | {row['val_logloss']:.3f} | "
            f"{100 * test_ece:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

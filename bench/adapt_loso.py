"""Site adaptation by leave-one-source-out: how good is a model at a new hospital after `trainer adapt`?

    nice -n 19 .venv/bin/python bench/adapt_loso.py --data ../shared/data/cxr3 --data ../shared/data/cxrx \\
        --groups docs/model-results/loso-groups.csv --out var/adapt-loso --only cxrx-asia \\
        [--preset quick] [--archs resnet18,resnet34] [--input-size 96] [--limit 300] [--epochs 2] \\
        [--samples-per-epoch 384] \\
        [--adapt-epochs 2] [--adapt-samples-per-epoch 256] [--adapt-fraction 0.3] \\
        [--target-sensitivity covid19=0.95]

For each fold (a group of sources of ``--groups``): a base model is trained on every other source
(:func:`trainer.pipeline.train_and_export`); the left-out group is split leak-free (by patient and
near-duplicate, stratified by class) into ``--adapt-fraction`` (30%) for adaptation and the rest (70%)
for evaluation; :func:`trainer.adapt.adapt_model` fine-tunes the base on the 30% (re-fitting fusion,
calibration and the gate on it) and both models are evaluated on the 70%, which neither saw. Prints and
writes (``adapt-loso.json``, ``adapt-loso.md``) macro ROC AUC and COVID-19 sensitivity before and
after, against the issue's targets (macro ROC AUC >= 0.90, COVID-19 sensitivity >= 0.90 after). With
``--target-sensitivity`` the adapted model's operating points are chosen on the site's validation split
(as ``trainer adapt --target-sensitivity`` does) and its figures are read at them; without, by argmax.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from screener.model.modelcard import CLASSES, read_card
from trainer.adapt import adapt_model
from trainer.crossval import assign_folds, read_groups
from trainer.data import limit_per_class, load_roots, split_samples
from trainer.operating_points import parse_targets
from trainer.pipeline import PRESETS, train_and_export


def _pct(value: Any) -> str:
    return f"{100 * float(value):.1f}" if isinstance(value, int | float) else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--groups", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", action="append", help="fold (group) to run; repeat (default: every fold)")
    parser.add_argument("--preset", choices=list(PRESETS), default="quick")
    parser.add_argument("--archs", help="comma-separated backbones (default: the preset's)")
    parser.add_argument("--limit", type=int, help="at most N training images per class for the base model")
    parser.add_argument("--input-size", type=int, help="input size in pixels (default: the preset's)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--samples-per-epoch", type=int)
    parser.add_argument("--adapt-epochs", type=int)
    parser.add_argument("--adapt-samples-per-epoch", type=int)
    parser.add_argument("--adapt-fraction", type=float, default=0.3)
    parser.add_argument("--segmentation-data", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--target-sensitivity",
        action="append",
        default=[],
        metavar="CLASS=SENSITIVITY",
        help="operating point of the adapted model, chosen on the site's validation split (repeatable)",
    )
    args = parser.parse_args(argv)
    targets = parse_targets(args.target_sensitivity) if args.target_sensitivity else None

    samples = load_roots(args.data)
    folds = assign_folds([s.source for s in samples], read_groups(args.groups))
    chosen = args.only or sorted(folds)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {}
    for fold in chosen:
        started = time.perf_counter()
        left_out = set(folds[fold])
        site = [s for s in samples if s.source in left_out]
        rest = [s for s in samples if s.source not in left_out]
        if args.limit:
            rest = limit_per_class(rest, args.limit, seed=args.seed)
        base_dir = args.out / fold / "base"
        archs = tuple(args.archs.split(",")) if args.archs else None
        if not base_dir.exists():
            train_and_export(
                preset=args.preset,
                data=rest,
                out=base_dir,
                archs=archs,
                input_size=args.input_size,
                epochs=args.epochs,
                samples_per_epoch=args.samples_per_epoch,
                seed=args.seed,
                version=f"loso-{fold}-base"[:64],
                workdir=args.out / fold / "base-work",
                segmentation_data=args.segmentation_data,
            )
        # The adaptation share is the split's "train"; its "test" (1 - fraction) is the evaluation.
        parts = split_samples(
            site,
            spec=read_card(base_dir).preprocessing,
            seed=args.seed,
            val_fraction=0.0,
            test_fraction=1.0 - args.adapt_fraction,
        )
        adapt_set, evaluation = parts.train, parts.test
        outcome = adapt_model(
            base_dir,
            adapt_set,
            args.out / fold / "adapted",
            evaluation=evaluation,
            preset=args.preset,
            epochs=args.adapt_epochs,
            samples_per_epoch=args.adapt_samples_per_epoch,
            seed=args.seed,
            version=f"loso-{fold}-adapted"[:64],
            workdir=args.out / fold / "adapt-work",
            source=f"{args.adapt_fraction:.0%} of left-out group {fold}",
            target_sensitivity=targets,
        )
        rows[fold] = {
            "n_base_training": len(rest),
            "n_adapt": len(adapt_set),
            "n_eval": len(evaluation),
            "eval_per_class": {c: sum(1 for s in evaluation if s.label == c) for c in CLASSES},
            "before": outcome.before,
            "after": outcome.after,
            "after_thresholds": outcome.card.thresholds,
            "minutes": round((time.perf_counter() - started) / 60, 1),
        }
        print(json.dumps({fold: rows[fold]}, indent=2, default=str))
    (args.out / "adapt-loso.json").write_text(
        json.dumps(rows, indent=2, default=str) + "\n", encoding="utf-8"
    )
    lines = [
        "| left out | adapt / eval images | macro ROC AUC before -> after | COVID-19 sens. before -> after | "
        "accuracy before -> after | ECE before -> after |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for fold, row in rows.items():
        b, a = row["before"], row["after"]
        lines.append(
            f"| {fold} | {row['n_adapt']} / {row['n_eval']} | "
            f"{_pct(b['macro_auc'])} -> {_pct(a['macro_auc'])} | "
            f"{_pct(b['sensitivity'].get('covid19'))} -> {_pct(a['sensitivity'].get('covid19'))} | "
            f"{_pct(b['accuracy'])} -> {_pct(a['accuracy'])} | {_pct(b['ece'])} -> {_pct(a['ece'])} |"
        )
    table = "\n".join(lines)
    (args.out / "adapt-loso.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

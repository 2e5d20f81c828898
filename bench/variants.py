"""Ablation of the robust recipe: each variant trained without a left-out source group and scored on it.

Each variant is the ``robust`` preset with one part changed (or the ``quick`` preset for reference), run
through ``trainer crossval --leave-source-out`` on the folds named with ``--fold`` (default
``cxrx-asia``: JSRT normals and Cohen COVID-19 images from Asian hospitals, neither seen in training).
Results land in ``OUT/<variant>/crossval.json``; a finished fold is reused on a re-run. The table at the
end is what MODEL_RESULTS.md's variant table is made from.

    .venv/bin/python bench/variants.py --out var/variants                      # every variant
    .venv/bin/python bench/variants.py --out var/variants --variant no-crop    # one of them

Not a speed benchmark: there is no baseline ratio; the figure of merit is the left-out fold's macro
ROC AUC and COVID-19 sensitivity.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from screener.model.modelcard import LungCropSpec
from trainer.crossval import CROSSVAL_JSON, run_crossval
from trainer.pipeline import PRESETS, Preset


def variants() -> dict[str, Preset]:
    """Name -> preset; every variant differs from ``robust`` in one respect."""
    robust = PRESETS["robust"]
    return {
        "robust": robust,
        "quick": PRESETS["quick"],
        "no-crop": dataclasses.replace(robust, lung_crop=None, input_size=128, crop_jitter=0.0),
        "no-site-augment": dataclasses.replace(robust, site_augment=False),
        "class-balance-only": dataclasses.replace(robust, source_power=None),
        "crop-96": dataclasses.replace(robust, lung_crop=LungCropSpec(seg_size=128, crop_size=96)),
        "crop-160": dataclasses.replace(robust, lung_crop=LungCropSpec(seg_size=128, crop_size=160)),
        "no-working-size": dataclasses.replace(robust, working_size=0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", action="append", help="run only these (default: all)")
    parser.add_argument("--fold", action="append", help="fold(s) of the groups file (default cxrx-asia)")
    shared = Path(os.environ.get("SHARED_DATA", "../shared/data"))
    parser.add_argument("--data", action="append", type=Path)
    parser.add_argument("--groups", type=Path, default=Path("docs/model-results/loso-groups.csv"))
    parser.add_argument("--segmentation-data", type=Path, default=shared / "jsrt-lungs")
    args = parser.parse_args()
    data = args.data or [shared / "cxr3", shared / "cxrx"]
    table = variants()
    chosen = args.variant or list(table)
    rows = []
    for name in chosen:
        PRESETS[f"variant-{name}"] = table[name]
        out = args.out / name
        run_crossval(
            argparse.Namespace(
                data=data,
                limit=None,
                groups=args.groups,
                only=args.fold or ["cxrx-asia"],
                out=out,
                preset=f"variant-{name}",
                segmentation_data=args.segmentation_data,
                segmenter_epochs=None,
                epochs=None,
                samples_per_epoch=None,
                seed=0,
            )
        )
        result = json.loads((out / CROSSVAL_JSON).read_text())
        for fold, row in result["folds"].items():
            at = row.get("covid19_at_specificity_0.80") or {}
            rows.append((name, fold, row, at.get("sensitivity"), result["seconds"]))
    print(
        "| variant | fold | n | accuracy | macro ROC AUC | sens. normal | sens. COVID-19 | "
        "COVID-19 sens. @ spec >= 0.80 | ECE | minutes |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, fold, row, at, seconds in rows:
        sens = row["sensitivity"]
        cells = [row["accuracy"], row["macro_auc"], sens.get("normal"), sens.get("covid19"), at, row["ece"]]
        shown = " | ".join("n/a" if v is None else f"{100 * v:.1f}" for v in cells)
        print(f"| {name} | {fold} | {row['n']} | {shown} | {seconds / 60:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

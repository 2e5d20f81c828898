"""The image-content gate's two parts, apart: real chests passing and non-chests refused per view threshold.

    nice -n 19 .venv/bin/python bench/gate_tradeoff.py var/models/MODEL --data ../shared/data/cxr3 \\
        --data ../shared/data/cxrx [--limit 400] [--json FILE]

For a model whose gate has a view check (card ``gate.method = "mahalanobis+view"``), every image is
preprocessed as the screener does and scored by the model itself (torch, FP32): the squared Mahalanobis
distance of its pooled features and the view check's "not a frontal chest" probability. Images: real
frontal chests of ``--data`` (every k-th, at most ``--limit`` per root), RG1 (a real CR chest PA) in its
four encodings, and the check cases of :mod:`trainer.gate` (pydicom-data non-chests, and chests rotated
by 90 degrees or inverted, taken from the first roots' images). Prints, for the card's view threshold and
a few others, the share of real chests that pass and the number of check cases that pass (the issue's
bar: >= 99% and 0), with the Mahalanobis threshold of the card unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from screener.core.errors import ImagingError
from screener.imaging.pixels import preprocess_file
from screener.model.fused import FusedResNet, load_fused_from_safetensors
from screener.model.modelcard import load_model_dir
from screener.model.novelty import backbone_features
from trainer.data import Sample, load_roots
from trainer.gate import non_chest_cases, transformed_chest_cases

RG1 = ("RG1_UNCI.dcm", "RG1_UNCR.dcm", "RG1_J2KI.dcm", "RG1_J2KR.dcm")
THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)


def scores(model: FusedResNet, arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(mahalanobis, p_not_chest)`` of model inputs, in batches of 16."""
    gate = model.novelty_gate
    if gate is None or gate.view is None:
        raise SystemExit("the model's gate has no view check")
    maha, prob = [], []
    with torch.no_grad():
        for start in range(0, len(arrays), 16):
            image = torch.from_numpy(np.stack(arrays[start : start + 16]).astype(np.float32))
            whole = image
            if model.lung_crop is not None:
                image = model.lung_crop(image)
            fa, _ = backbone_features(model.net_a, image)
            fb, _ = backbone_features(model.net_b, image)
            maha.append(gate.mahalanobis(torch.cat((fa, fb), dim=1)).double().numpy())
            prob.append(torch.sigmoid(gate.view(whole)).double().numpy())
    return np.concatenate(maha), np.concatenate(prob)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--limit", type=int, default=400, help="chests per root, evenly spread (default 400)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    loaded = load_model_dir(args.model_dir)
    gate = loaded.card.gate
    if gate is None or gate.method != "mahalanobis+view":
        print(f"{args.model_dir}: the gate has no view check", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    model = load_fused_from_safetensors(loaded.weights_path, loaded.card)
    model.heatmap_size = None
    spec = loaded.card.preprocessing
    view_threshold = float(gate.fitted_on["view_check"]["threshold"])
    samples = load_roots(args.data)
    by_root: dict[str, list[Sample]] = {}
    for sample in samples:
        by_root.setdefault(sample.key.split("/", 1)[0], []).append(sample)
    chests: list[np.ndarray] = []
    for group in by_root.values():
        for sample in group[:: max(1, len(group) // args.limit)][: args.limit]:
            try:
                chests.append(preprocess_file(sample.path, spec, 100_000_000, reduced_decode=True))
            except (ImagingError, OSError):
                continue
    from pydicom.data import get_testdata_file

    for name in RG1:
        chests.append(
            preprocess_file(Path(str(get_testdata_file(name))), spec, 100_000_000, reduced_decode=True)
        )
    cases = [
        c
        for c in non_chest_cases(spec) + transformed_chest_cases(samples[::97], spec, 16)
        if c.array is not None
    ]
    chest_maha, chest_p = scores(model, chests)
    case_maha, case_p = scores(model, [c.array for c in cases if c.array is not None])
    rows = []
    print(f"model {loaded.card.version}: {len(chests)} real chests (4 RG1), {len(cases)} check cases")
    print(
        f"Mahalanobis alone (threshold {gate.threshold:g}): chests pass "
        f"{100 * np.mean(chest_maha <= gate.threshold):.2f}%, "
        f"checks pass {int(np.sum(case_maha <= gate.threshold))}"
    )
    print("| view threshold | real chests passing | check cases passing | which |")
    print("| --- | --- | --- | --- |")
    for t in sorted({view_threshold, *THRESHOLDS}):
        chest_pass = (chest_maha <= gate.threshold) & (chest_p <= t)
        case_pass = (case_maha <= gate.threshold) & (case_p <= t)
        leaks = [cases[i].name for i in np.flatnonzero(case_pass)]
        tag = " (card)" if t == view_threshold else ""
        print(
            f"| {t:g}{tag} | {100 * chest_pass.mean():.2f}% of {chest_pass.size} | "
            f"{len(leaks)} of {len(cases)} | "
            f"{', '.join(leaks[:4])}{' ...' if len(leaks) > 4 else ''} |"
        )
        rows.append({"view_threshold": t, "chest_pass_rate": float(chest_pass.mean()), "case_leaks": leaks})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

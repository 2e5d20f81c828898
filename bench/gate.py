"""Measure a model's image-content gate: how many real chests pass, and the score of every non-chest case.

    nice -n 19 .venv/bin/python bench/gate.py var/models/robust-1-gate \\
        --data ../shared/data/cxr3 --data ../shared/data/cxrx [--limit 300] [--json var/gate.json]

Runs the model directory's own ``model.onnx`` (ONNX Runtime, CPU) on every image as the screener would
(``screener.imaging.pixels``, reduced JPEG 2000 decoding), reads the graph's ``novelty`` output and compares
it with the card's ``gate.threshold``. Prints:
- the pass rate of the real frontal chests of each ``--data`` root, and per split (train / val / test)
  where the roots reproduce the model's training split (same ``--data`` as ``trainer train``): the test
  split is the honest figure, training images are what the gate was fitted on;
- RG1 (a real CR chest PA in pydicom-data) in its four encodings: must pass;
- the score of every non-chest case: the pydicom-data non-chest images (RG3 tibia in four encodings, MR,
  CT, NM, US, OT; colour images are refused by decoding, before the gate) and test-split chests rotated by
  90 degrees or inverted (``--transformed N`` of them; ``--every-turn`` adds 180, 270 and inverted then
  turned): none may pass.
The issue's bar: no non-chest passes; at least 99% of real chests pass. Exit status 0 when both hold, 3
when not, 2 for a model without a gate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from screener.core.errors import DataError, ImagingError
from screener.imaging.pixels import preprocess_file
from screener.model.engine.onnx_backend import OnnxRuntimeEngine
from screener.model.modelcard import load_model_dir
from trainer.data import Sample, load_roots
from trainer.gate import CheckCase, non_chest_cases, transformed_chest_cases
from trainer.quantize import model_split

MAX_PIXELS = 100_000_000
BATCH = 16
RG1 = ("RG1_UNCI.dcm", "RG1_UNCR.dcm", "RG1_J2KI.dcm", "RG1_J2KR.dcm")


def _scores(engine: OnnxRuntimeEngine, arrays: list[np.ndarray]) -> np.ndarray:
    out = []
    for start in range(0, len(arrays), BATCH):
        result = engine.infer(np.stack(arrays[start : start + BATCH]).astype(np.float32))
        assert result.novelty is not None
        out.append(result.novelty)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data", action="append", help="chest data roots (default: $CXR3_DIR, $CXRX_DIR)")
    parser.add_argument(
        "--limit", type=int, help="at most N chests per root (evenly spread), for a quick look"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--transformed",
        type=int,
        default=16,
        help="test-split chests to turn and invert as non-chest cases (default 16)",
    )
    parser.add_argument(
        "--every-turn",
        action="store_true",
        help="also rotate them by 180 and 270 degrees and invert then rotate (default: 90 and inverted)",
    )
    parser.add_argument("--json", type=Path, help="write every score here")
    args = parser.parse_args(argv)

    loaded = load_model_dir(args.model_dir)
    gate = loaded.card.gate
    if gate is None:
        print(
            f"{args.model_dir}: model {loaded.card.version} has no image-content gate; add one with "
            "`trainer gate fit --model DIR --data ... --out DIR2`",
            file=sys.stderr,
        )
        return 2
    spec = loaded.card.preprocessing
    engine = OnnxRuntimeEngine(loaded, threads=args.threads)
    roots = args.data or [v for v in (os.environ.get("CXR3_DIR"), os.environ.get("CXRX_DIR")) if v]
    samples = load_roots([Path(r) for r in roots]) if roots else []
    split_of: dict[str, str] = {}
    test: list[Sample] = []
    try:
        splits = model_split(loaded, samples)
        split_of = {s.key: name for name, group in splits.items() for s in group}
        test = splits.test
    except DataError as exc:
        print(f"(no per-split figures: {str(exc)[:160]}...)")
    by_root: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_root[sample.key.split("/", 1)[0] if len(roots) > 1 else Path(roots[0]).name].append(sample)
    if args.limit:
        by_root = {k: v[:: max(1, len(v) // args.limit)][: args.limit] for k, v in by_root.items()}

    print(f"model {loaded.card.version}: gate {gate.method}, threshold {gate.threshold:g}")
    report: dict[str, Any] = {"model": loaded.card.version, "threshold": gate.threshold, "chests": {}}
    all_pass: list[bool] = []
    for root, group in sorted(by_root.items()):
        arrays, kept = [], []
        for sample in group:
            try:
                arrays.append(preprocess_file(sample.path, spec, MAX_PIXELS, reduced_decode=True))
                kept.append(sample)
            except (ImagingError, OSError) as exc:
                print(f"  {sample.key}: not decodable ({type(exc).__name__})")
        scores = _scores(engine, arrays)
        passed = scores <= gate.threshold
        all_pass.extend(passed.tolist())
        print(f"chests {root}: {passed.sum()}/{passed.size} pass ({100 * passed.mean():.2f}%)")
        per_split: dict[str, list[bool]] = defaultdict(list)
        for sample, ok in zip(kept, passed, strict=True):
            per_split[split_of.get(sample.key, "all")].append(bool(ok))
        for name, oks in sorted(per_split.items()):
            if split_of:
                print(f"  split {name}: {sum(oks)}/{len(oks)} pass ({100 * np.mean(oks):.2f}%)")
        refused = [(s.key, float(v)) for s, v, ok in zip(kept, scores, passed, strict=True) if not ok]
        for key, value in sorted(refused, key=lambda kv: -kv[1])[:10]:
            print(f"  refused: {key} novelty {value:.1f}")
        report["chests"][root] = {
            "n": int(passed.size),
            "passed": int(passed.sum()),
            "per_split": {k: [sum(v), len(v)] for k, v in per_split.items()},
            "refused": refused,
        }

    from pydicom.data import get_testdata_file

    rg1 = [Path(str(get_testdata_file(name))) for name in RG1]
    rg1_scores = _scores(engine, [preprocess_file(p, spec, MAX_PIXELS, reduced_decode=True) for p in rg1])
    for name, value in zip(RG1, rg1_scores, strict=True):
        print(f"RG1 chest {name}: novelty {value:.1f} {'pass' if value <= gate.threshold else 'REFUSED'}")
        all_pass.append(bool(value <= gate.threshold))
    report["rg1"] = {n: float(v) for n, v in zip(RG1, rg1_scores, strict=True)}

    cases: list[CheckCase] = non_chest_cases(spec)
    cases += transformed_chest_cases(
        test or samples[: args.transformed], spec, args.transformed, every_turn=args.every_turn
    )
    scored = [c for c in cases if c.array is not None]
    values = _scores(engine, [c.array for c in scored if c.array is not None])
    value_of = {c.name: float(v) for c, v in zip(scored, values, strict=True)}
    leaks = 0
    print("non-chest cases (none may pass):")
    report["non_chest"] = []
    for case in cases:
        if case.array is None:
            print(f"  {case.name} ({case.kind}): refused by {case.refused_by}")
            report["non_chest"].append({"name": case.name, "kind": case.kind, "refused_by": case.refused_by})
            continue
        value = value_of[case.name]
        ok = value <= gate.threshold
        leaks += int(ok)
        print(f"  {case.name} ({case.kind}): novelty {value:.1f} {'PASSES' if ok else 'refused'}")
        report["non_chest"].append({"name": case.name, "kind": case.kind, "novelty": value, "passes": ok})
    engine.close()
    rate = float(np.mean(all_pass)) if all_pass else float("nan")
    print(
        f"real chests passing: {100 * rate:.2f}% of {len(all_pass)} (bar: >= 99%); "
        f"non-chest cases passing: {leaks} of {len(scored)} (bar: 0)"
    )
    report.update({"chest_pass_rate": rate, "non_chest_passing": leaks})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if rate >= 0.99 and leaks == 0 else 3


if __name__ == "__main__":
    sys.exit(main())

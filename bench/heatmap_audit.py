"""Shortcut audit with heatmaps: how much of each model's class activation map lies near the image borders
and in the corners, where burned-in text, markers and collimation edges sit.

    nice -n 19 .venv/bin/python -m bench.heatmap_audit --model var/models/hm-quick \\
        --model var/models/hm-robust --data ../shared/data/cxr3 --data ../shared/data/cxrx --limit 250 \\
        --out var/heatmap-audit --sheet docs/model-results/heatmaps/contact-sheet.png

For each model (a model directory without the ``heatmap`` output is re-exported with it into ``--out``,
weights unchanged) the images are those of the models' held-out test splits (the split ``trainer train``
made with the same ``--data``, ``--seed`` and ``--limit``; only images no model trained on), run through
``model.onnx`` on ONNX Runtime as the screener runs them. Per image, on the part of the map over the image
itself (the letterbox padding cut away):
- border share: the map's mass within 8% of any edge (29.4% of the area: a map spread evenly scores that);
- corner share: its mass in the four corner squares of 20% x 20% (16% of the area);
- peak at the border: whether the map's maximum lies in the border band.
Prints a table (mean with a 95% bootstrap interval, per model, and per source and class), writes it as
``audit.md`` and ``audit.json`` under ``--out``, and a contact sheet of overlays (the same test images for
every model, one row per model) to ``--sheet``. Nothing drawn or printed names a patient: the public
datasets' file names are not drawn either.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from screener.core.errors import ImagingError
from screener.core.progress import Progress
from screener.imaging.pixels import load_unit, to_model_input
from screener.model.engine.onnx_backend import OnnxRuntimeEngine
from screener.model.export import add_heatmap
from screener.model.heatmap import (
    BORDER_BAND,
    CORNER_SIDE,
    border_mask,
    content_region,
    corner_mask,
    input_picture,
    mass_share,
    overlay,
)
from screener.model.modelcard import LoadedModel, load_model_dir
from trainer.data import Sample, load_roots
from trainer.quantize import model_split

MAX_PIXELS = 100_000_000
BATCH = 8
BOOTSTRAP = 2000
SHEET_TILE = 192


@dataclass(frozen=True)
class Measured:
    sample: Sample
    border: float
    corner: float
    peak_at_border: bool
    picture: np.ndarray  # the overlay, for the contact sheet (RGB uint8)


def _with_heatmap(model_dir: Path, out: Path) -> LoadedModel:
    loaded = load_model_dir(model_dir)
    if loaded.card.heatmap is not None:
        return loaded
    target = out / f"{model_dir.name}+cam"
    if not target.exists():
        add_heatmap(model_dir, target)
    return load_model_dir(target)


def _interval(values: list[float], seed: int = 0) -> tuple[float, float, float]:
    array = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, len(array), size=(BOOTSTRAP, len(array)))].mean(axis=1)
    return float(array.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _measure(loaded: LoadedModel, samples: list[Sample], threads: int, label: str) -> list[Measured]:
    spec = loaded.card.preprocessing
    engine = OnnxRuntimeEngine(loaded, threads=threads)
    results: list[Measured] = []
    try:
        with Progress(len(range(0, len(samples), BATCH))) as bar:
            for start in range(0, len(samples), BATCH):
                chunk = samples[start : start + BATCH]
                arrays, shapes, kept = [], [], []
                for sample in chunk:
                    try:
                        unit = load_unit(sample.path, spec, MAX_PIXELS)
                    except (ImagingError, OSError) as exc:
                        print(f"skipped an unreadable image: {exc}", file=sys.stderr)
                        continue
                    arrays.append(to_model_input(unit, spec))
                    shapes.append(unit.shape)
                    kept.append(sample)
                if arrays:
                    out = engine.infer(np.stack(arrays).astype(np.float32))
                    assert out.heatmap is not None
                    for k, sample in enumerate(kept):
                        region = content_region(out.heatmap[k], *shapes[k])
                        border = border_mask(region.shape, BORDER_BAND)
                        share = mass_share(region, border)
                        corner = mass_share(region, corner_mask(region.shape, CORNER_SIDE))
                        if share is None or corner is None:
                            continue
                        peak = np.unravel_index(int(region.argmax()), region.shape)
                        picture = overlay(input_picture(arrays[k], spec), out.heatmap[k])
                        results.append(Measured(sample, share, corner, bool(border[peak]), picture))
                bar.step(f"heatmaps {label}")
    finally:
        engine.close()
    return results


def _summary(rows: list[Measured]) -> dict[str, Any]:
    border = _interval([r.border for r in rows])
    corner = _interval([r.corner for r in rows])
    return {
        "n": len(rows),
        "border_share": {"mean": border[0], "ci95": [border[1], border[2]]},
        "corner_share": {"mean": corner[0], "ci95": [corner[1], corner[2]]},
        "peak_at_border": float(np.mean([r.peak_at_border for r in rows])),
    }


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _table(report: dict[str, Any], uniform: tuple[float, float]) -> str:
    lines = [
        "| model | images | border share % [95% CI] | corner share % [95% CI] | peak in border band % |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, doc in report["models"].items():
        s = doc["all"]
        b, c = s["border_share"], s["corner_share"]
        lines.append(
            f"| `{name}` | {s['n']} | {_pct(b['mean'])} [{_pct(b['ci95'][0])}, {_pct(b['ci95'][1])}] | "
            f"{_pct(c['mean'])} [{_pct(c['ci95'][0])}, {_pct(c['ci95'][1])}] | {_pct(s['peak_at_border'])} |"
        )
    lines.append(
        f"| (a map spread evenly) | | {_pct(uniform[0])} | {_pct(uniform[1])} | {_pct(uniform[0])} |"
    )
    lines += ["", "| model | group | images | border share % | corner share % | peak in border band % |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for name, doc in report["models"].items():
        for group, s in doc["groups"].items():
            lines.append(
                f"| `{name}` | {group} | {s['n']} | {_pct(s['border_share']['mean'])} | "
                f"{_pct(s['corner_share']['mean'])} | {_pct(s['peak_at_border'])} |"
            )
    return "\n".join(lines) + "\n"


def _sheet(measured: dict[str, list[Measured]], keys: list[str], path: Path) -> None:
    rows = []
    for name, items in measured.items():
        by_key = {m.sample.key: m for m in items}
        tiles = []
        for key in keys:
            m = by_key.get(key)
            tile = (
                cv2.resize(m.picture, (SHEET_TILE, SHEET_TILE), interpolation=cv2.INTER_AREA)
                if m is not None
                else np.zeros((SHEET_TILE, SHEET_TILE, 3), np.uint8)
            )
            if m is not None:
                cv2.putText(
                    tile,
                    m.sample.label,
                    (4, SHEET_TILE - 6),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    0.45,
                    (255, 255, 255),
                    1,
                )
            tiles.append(tile)
        strip = np.concatenate(tiles, axis=1)
        caption = np.zeros((22, strip.shape[1], 3), np.uint8)
        text = f"{name} (heatmap of its prediction; under each image: the true class)"
        cv2.putText(caption, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
        rows += [caption, strip]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, action="append", required=True, help="model directory")
    parser.add_argument("--data", action="append", help="data roots as given to `trainer train`")
    parser.add_argument("--seed", type=int, default=0, help="the seed given to `trainer train`")
    parser.add_argument("--limit", type=int, help="the --limit given to `trainer train`, if any")
    parser.add_argument("--max-images", type=int, default=0, help="at most this many test images (0: all)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("var/heatmap-audit"))
    parser.add_argument("--sheet", type=Path, help="contact sheet PNG (default: OUT/contact-sheet.png)")
    parser.add_argument("--sheet-images", type=int, default=8, help="images per row of the contact sheet")
    args = parser.parse_args(argv)
    roots = args.data or [p for p in (os.environ.get("CXR3_DIR"), os.environ.get("CXRX_DIR")) if p]
    if not roots:
        parser.error("give --data (or set CXR3_DIR / CXRX_DIR)")
    args.out.mkdir(parents=True, exist_ok=True)
    samples = load_roots(roots)
    models = {str(d.name): _with_heatmap(d, args.out) for d in args.model}
    test_keys: set[str] | None = None
    trained: set[str] = set()
    for loaded in models.values():
        splits = model_split(loaded, samples, seed=args.seed, limit=args.limit)
        held_out = {s.key for s in splits.test}
        test_keys = held_out if test_keys is None else test_keys & held_out
        trained |= {s.key for s in splits.train} | {s.key for s in splits.val}
    chosen = sorted(
        (s for s in samples if test_keys is not None and s.key in test_keys and s.key not in trained),
        key=lambda s: s.key,
    )
    if args.max_images:
        step = max(1, len(chosen) // args.max_images)
        chosen = chosen[::step][: args.max_images]
    print(f"{len(chosen)} test images no model trained on", file=sys.stderr)
    measured = {name: _measure(loaded, chosen, args.threads, name) for name, loaded in models.items()}
    report: dict[str, Any] = {
        "border_band": BORDER_BAND,
        "corner_side": CORNER_SIDE,
        "images": len(chosen),
        "models": {},
    }
    for name, rows in measured.items():
        groups: dict[str, list[Measured]] = defaultdict(list)
        for r in rows:
            groups[f"{r.sample.source or '?'} / {r.sample.label}"].append(r)
        report["models"][name] = {
            "version": models[name].card.version,
            "all": _summary(rows),
            "groups": {g: _summary(v) for g, v in sorted(groups.items()) if len(v) >= 3},
        }
    side = 100
    uniform = (
        float(border_mask((side, side), BORDER_BAND).mean()),
        float(corner_mask((side, side), CORNER_SIDE).mean()),
    )
    report["uniform"] = {"border_share": uniform[0], "corner_share": uniform[1]}
    table = _table(report, uniform)
    print(table)
    (args.out / "audit.md").write_text(table, encoding="utf-8")
    (args.out / "audit.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    by_label: dict[str, list[str]] = defaultdict(list)
    for s in chosen:
        by_label[s.label].append(s.key)
    keys: list[str] = []
    while len(keys) < args.sheet_images and any(by_label.values()):
        for label in sorted(by_label):
            if by_label[label] and len(keys) < args.sheet_images:
                keys.append(by_label[label].pop(0))
    sheet = args.sheet or args.out / "contact-sheet.png"
    _sheet(measured, keys, sheet)
    print(f"contact sheet: {sheet}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``trainer crossval --leave-source-out``: how a recipe does on hospitals it has never seen.

For each source (or each group of sources from ``--groups``) the preset is trained on every other image
and evaluated on that source's images only: no image, patient or near-duplicate of the left-out source
is seen in training, validation, calibration or fusion. The figures per fold: n, accuracy, macro ROC AUC
over the classes present, per-class sensitivity and specificity, ECE, and COVID-19 sensitivity at the
first operating point that keeps specificity at or above 0.80 (``None`` where the fold lacks positives or
negatives). ``crossval.json`` holds every fold's full evaluation report; ``crossval.md`` the table with the
mean and the worst fold. A fold whose report already exists is not trained again (re-running after an
interruption resumes).

Many public sources hold a single class, where AUC is undefined: a groups file pools sources (by
country, collection, ...) so that a left-out group holds two classes, and single-class folds still
report their sensitivity (or, for normal, the specificity).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from screener.core.errors import DataError, TrainingError
from screener.core.logs import get_logger
from screener.model.modelcard import CLASSES
from trainer.data import Sample, limit_per_class, load_roots
from trainer.evaluate import LABELS_NPY, PROBS_NPY

log = get_logger("trainer.crossval")

CROSSVAL_JSON = "crossval.json"
CROSSVAL_MD = "crossval.md"
FOLD_REPORT = "fold.json"
TARGET_SPECIFICITY = 0.80
"""COVID-19 sensitivity is also reported at the operating point that keeps this specificity."""


def read_groups(path: Path) -> list[tuple[str, str]]:
    """``[(source pattern, group)]`` from a CSV with ``source`` and ``group`` columns, in file order.

    Raises:
        DataError: the file is unreadable, lacks a column, or has an empty cell.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = {"source", "group"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"groups file {path}: missing column(s) {', '.join(sorted(missing))}")
            rows = []
            for row in reader:
                source, group = (row.get("source") or "").strip(), (row.get("group") or "").strip()
                if not source or not group:
                    raise DataError(
                        f"groups file {path} line {reader.line_num}: source and group are both needed"
                    )
                rows.append((source, group))
    except OSError as exc:
        raise DataError(f"groups file {path}: cannot read it: {exc.strerror or exc}") from exc
    if not rows:
        raise DataError(f"groups file {path} names no source")
    return rows


def assign_folds(sources: Sequence[str], groups: list[tuple[str, str]] | None) -> dict[str, list[str]]:
    """``{fold name: [sources left out together]}``; without ``groups`` every source is its own fold.

    A source takes the group of the first pattern that matches it (``fnmatch``); sources matching none stay
    in training in every fold.

    Raises:
        DataError: a pattern matches no source (a typo would otherwise silently shrink the evaluation).
    """
    names = sorted(set(sources))
    if groups is None:
        return {name: [name] for name in names}
    folds: dict[str, list[str]] = {}
    used: set[str] = set()
    for pattern, _ in groups:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise DataError(f"groups file: source pattern {pattern!r} matches no source of the data")
    for name in names:
        for pattern, group in groups:
            if fnmatch.fnmatchcase(name, pattern):
                folds.setdefault(group, []).append(name)
                used.add(name)
                break
    return folds


def sensitivity_at_specificity(
    positive: np.ndarray, scores: np.ndarray, specificity: float = TARGET_SPECIFICITY
) -> dict[str, float] | None:
    """The highest sensitivity whose threshold on ``scores`` keeps specificity >= ``specificity``, with
    that threshold and the specificity reached; ``None`` without positives or negatives."""
    pos, neg = scores[positive], scores[~positive]
    if pos.size == 0 or neg.size == 0:
        return None
    best: dict[str, float] | None = None
    for threshold in np.unique(np.concatenate([scores, [1.0 + 1e-9]])):
        spec = float(np.mean(neg < threshold))
        if spec >= specificity:
            sens = float(np.mean(pos >= threshold))
            if best is None or sens > best["sensitivity"]:
                best = {"threshold": float(threshold), "sensitivity": sens, "specificity": spec}
    return best


def fold_summary(report: dict[str, Any], covid_scores: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The crossval row of one fold's evaluation report."""
    per_class = report.get("per_class") or {}
    present = [c for c in CLASSES if (per_class.get(c) or {}).get("support")]
    row: dict[str, Any] = {
        "n": report["n"],
        "classes": {c: (per_class.get(c) or {}).get("support", 0) for c in CLASSES},
        "accuracy": report.get("accuracy"),
        "macro_auc": report.get("macro_auc"),
        "ece": report.get("ece"),
        "sensitivity": {c: (per_class.get(c) or {}).get("sensitivity") for c in present},
        "specificity": {c: (per_class.get(c) or {}).get("specificity") for c in present},
    }
    covid = CLASSES.index("covid19")
    row["covid19_at_specificity_0.80"] = sensitivity_at_specificity(y == covid, covid_scores)
    return row


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _worst(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(min(defined)) if defined else None


def summarise(folds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and worst over folds of accuracy, macro AUC, COVID-19 sensitivity (at argmax and at
    specificity 0.80); ECE mean and worst (highest)."""
    rows = list(folds.values())
    covid_sens = [r["sensitivity"].get("covid19") for r in rows]
    at_spec = [(r.get("covid19_at_specificity_0.80") or {}).get("sensitivity") for r in rows]
    eces = [r.get("ece") for r in rows]
    defined_ece = [e for e in eces if e is not None]
    return {
        "folds": len(rows),
        "mean_accuracy": _mean([r.get("accuracy") for r in rows]),
        "worst_accuracy": _worst([r.get("accuracy") for r in rows]),
        "mean_macro_auc": _mean([r.get("macro_auc") for r in rows]),
        "worst_macro_auc": _worst([r.get("macro_auc") for r in rows]),
        "mean_covid19_sensitivity": _mean(covid_sens),
        "worst_covid19_sensitivity": _worst(covid_sens),
        "mean_covid19_sensitivity_at_specificity_0.80": _mean(at_spec),
        "mean_ece": _mean(eces),
        "worst_ece": float(max(defined_ece)) if defined_ece else None,
    }


def out_of_source_figures(path: Path, preset: str) -> dict[str, Any]:
    """The card's ``metrics.out_of_source`` from a ``crossval.json`` of the same preset: the recipe's
    leave-source-out mean and worst figures, which the promotion gate compares.

    Raises:
        DataError: the file is unreadable, not a crossval result, or of another preset.
    """
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        summary = result["summary"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"--crossval {path}: not a readable crossval.json ({exc})") from exc
    if result.get("preset") != preset:
        raise DataError(
            f"--crossval {path} measured preset {result.get('preset')!r}, not {preset!r}: run "
            f"`trainer crossval --preset {preset}` first"
        )
    return {
        "method": "leave-source-out",
        "preset": preset,
        "file": str(path),
        "left_out": result.get("left_out_sources", {}),
        **{key: summary.get(key) for key in sorted(summary)},
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def markdown_table(result: dict[str, Any]) -> str:
    """``crossval.md``: one row per left-out fold, then the mean and the worst."""
    lines = [
        f"Leave-source-out, preset `{result['preset']}`, {result['summary']['folds']} folds "
        f"({result['seconds'] / 60:.1f} min). Percent; n/a where undefined (a class absent from the fold).",
        "",
        "| left out | n (normal / COVID-19 / viral) | accuracy | macro ROC AUC | sens. normal | "
        "sens. COVID-19 | sens. viral | spec. COVID-19 | COVID-19 sens. @ spec >= 0.80 | ECE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["folds"].items():
        counts = " / ".join(str(row["classes"].get(c, 0)) for c in CLASSES)
        at = row.get("covid19_at_specificity_0.80")
        lines.append(
            f"| {name} | {row['n']} ({counts}) | {_pct(row['accuracy'])} | {_pct(row['macro_auc'])} | "
            f"{_pct(row['sensitivity'].get('normal'))} | {_pct(row['sensitivity'].get('covid19'))} | "
            f"{_pct(row['sensitivity'].get('viral_pneumonia'))} | "
            f"{_pct(row['specificity'].get('covid19'))} | "
            f"{_pct(at['sensitivity']) if at else 'n/a'} | {_pct(row['ece'])} |"
        )
    s = result["summary"]
    lines.append(
        f"| **mean** | | {_pct(s['mean_accuracy'])} | {_pct(s['mean_macro_auc'])} | | "
        f"{_pct(s['mean_covid19_sensitivity'])} | | | "
        f"{_pct(s['mean_covid19_sensitivity_at_specificity_0.80'])} | "
        f"{_pct(s['mean_ece'])} |"
    )
    lines.append(
        f"| **worst** | | {_pct(s['worst_accuracy'])} | {_pct(s['worst_macro_auc'])} | | "
        f"{_pct(s['worst_covid19_sensitivity'])} | | | | {_pct(s['worst_ece'])} |"
    )
    return "\n".join(lines) + "\n"


def run_crossval(args: argparse.Namespace) -> int:
    """The ``trainer crossval`` command: prints the table, writes ``crossval.json`` and ``crossval.md``."""
    from trainer.pipeline import PRESETS

    started = time.perf_counter()
    samples = load_roots(args.data)
    if args.limit:
        samples = limit_per_class(samples, args.limit, seed=args.seed)
    groups = read_groups(args.groups) if args.groups else None
    folds = assign_folds([s.source for s in samples], groups)
    if args.only:
        unknown = sorted(set(args.only) - set(folds))
        if unknown:
            raise DataError(f"--only {unknown[0]}: no such fold; folds are {', '.join(folds)}")
        folds = {name: folds[name] for name in args.only}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    recipe = PRESETS.get(args.preset)
    if recipe is None:
        raise TrainingError(f"unknown preset {args.preset!r}")
    segmenter = None
    if recipe.lung_crop is not None:
        if args.segmentation_data is None:
            raise TrainingError(
                f"preset {args.preset} crops to the lungs: give --segmentation-data DIR (e.g. "
                "../shared/data/jsrt-lungs); the segmenter is trained once and shared by every fold"
            )
        segmenter = _segmenter(out, args, recipe)
    print(f"{len(folds)} folds: " + ", ".join(f"{k} ({len(v)} source(s))" for k, v in folds.items()))
    results: dict[str, dict[str, Any]] = {}
    reports: dict[str, Any] = {}
    for number, (name, left_out) in enumerate(folds.items(), start=1):
        row, report = _fold(name, set(left_out), samples, out / _safe(name), args, segmenter)
        results[name] = row
        reports[name] = report
        print(
            f"[{number}/{len(folds)}] {name}: n={row['n']} accuracy {_pct(row['accuracy'])} "
            f"macro AUC {_pct(row['macro_auc'])} COVID-19 sens. {_pct(row['sensitivity'].get('covid19'))}"
        )
    result = {
        "preset": args.preset,
        "data": [str(d) for d in args.data],
        "groups": [{"source": s, "group": g} for s, g in groups] if groups else None,
        "seed": args.seed,
        "epochs": args.epochs,
        "limit": args.limit,
        "samples_per_epoch": args.samples_per_epoch,
        "folds": results,
        "left_out_sources": {name: sorted(v) for name, v in folds.items()},
        "summary": summarise(results),
        "seconds": round(time.perf_counter() - started, 1),
        "reports": reports,
    }
    (out / CROSSVAL_JSON).write_text(json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n")
    table = markdown_table(result)
    (out / CROSSVAL_MD).write_text(table)
    print(table)
    print(f"crossval: {out / CROSSVAL_JSON}, {out / CROSSVAL_MD}")
    return 0


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:80] or "fold"


def _segmenter(out: Path, args: argparse.Namespace, recipe: Any) -> Any:
    """Train the preset's lung segmenter once (kept as ``segmenter.safetensors`` + ``.json`` for a re-run)."""
    import dataclasses

    from safetensors.torch import load_file, save_file

    from screener.imaging.pixels import PreprocessSpec
    from screener.model.lungs import LungCrop
    from trainer.segment import train_segmenter

    spec = PreprocessSpec(input_size=recipe.input_size, working_size=recipe.working_size)
    weights, meta = out / "segmenter.safetensors", out / "segmenter.json"
    if weights.is_file() and meta.is_file():
        crop = LungCrop(dataclasses.replace(recipe.lung_crop, segmenter=json.loads(meta.read_text())))
        crop.load_state_dict(load_file(str(weights)))
        return crop.eval()
    trained = train_segmenter(
        args.segmentation_data,
        spec,
        recipe.lung_crop,
        epochs=args.segmenter_epochs or recipe.segmenter_epochs,
        seed=args.seed,
    )
    save_file({k: v.contiguous() for k, v in trained.crop.state_dict().items()}, str(weights))
    meta.write_text(json.dumps(trained.summary, indent=2, sort_keys=True))
    trained.crop.spec = dataclasses.replace(recipe.lung_crop, segmenter=trained.summary)
    return trained.crop


def _fold(
    name: str,
    left_out: set[str],
    samples: list[Sample],
    folder: Path,
    args: argparse.Namespace,
    segmenter: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    from trainer.evaluate import evaluate_model
    from trainer.pipeline import train_and_export

    saved = folder / FOLD_REPORT
    if saved.is_file():
        data = json.loads(saved.read_text())
        log.info("fold_reused", fold=name, report=str(saved))
        return data["row"], data["report"]
    train = [s for s in samples if s.source not in left_out]
    test = [s for s in samples if s.source in left_out]
    if not test:
        raise DataError(f"fold {name}: no image comes from {sorted(left_out)}")
    missing = [c for c, n in Counter(s.label for s in train).items() if n == 0]
    log.info("fold_started", fold=name, train=len(train), test=len(test), missing=missing)
    model_dir = folder / "model"
    if not (model_dir / "card.json").is_file():
        train_and_export(
            preset=args.preset,
            data=train,
            out=model_dir,
            epochs=args.epochs,
            samples_per_epoch=args.samples_per_epoch,
            seed=args.seed,
            version=f"crossval-{_safe(name)[:40]}",
            workdir=folder / "work",
            segmenter=segmenter,
            progress=True,
        )
    report = evaluate_model(
        model_dir, test, folder / "eval", bootstrap=200, group_by="source", progress=False
    )
    probs = np.load(folder / "eval" / PROBS_NPY)
    y = np.load(folder / "eval" / LABELS_NPY)
    row = fold_summary(report, probs[:, CLASSES.index("covid19")], y)
    folder.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"row": row, "report": report}, indent=2, sort_keys=True, allow_nan=False))
    return row, report

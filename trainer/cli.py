"""``trainer``: train, evaluate, retrain (nightly), labels import, models list/promote/rollback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from screener import __version__
from screener.core.cliargs import add_config_option, load_from_args, stdout_closed
from screener.core.config import Config, as_dict
from screener.core.db.migrate import open_database
from screener.core.errors import ConfigError, ScreenerError
from screener.model.modelcard import CARD_FILE


def _fraction(text: str) -> float:
    """An argparse type: a number in (0, 0.8]; anything else is refused naming the value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a share such as 0.2") from None
    if not 0.0 < value <= 0.8:
        raise argparse.ArgumentTypeError(f"{value} must be more than 0 and at most 0.8 (a share of the data)")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="CXR Screener trainer")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_config_option(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        add_config_option(p, top=False)
        return p

    command("config", "print the effective settings the trainer would use, as JSON")

    p = command("train", "transfer learning of the candidate backbones, model integration, export")
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="image folder per class, CSV (path,label) or COVIDx list; repeat to merge datasets",
    )
    p.add_argument("--preset", choices=["quick", "robust", "paper"], default="quick")
    p.add_argument(
        "--segmentation-data",
        type=Path,
        help="radiographs with lung masks (MANIFEST.csv: file,mask[,split]), e.g. ../shared/data/jsrt-lungs: "
        "the robust and paper presets train their lung segmenter on it",
    )
    p.add_argument("--segmenter-epochs", type=int, help="lung segmenter epochs (default: the preset's)")
    p.add_argument(
        "--crossval",
        type=Path,
        help="crossval.json of `trainer crossval --leave-source-out` for this preset: its out-of-source "
        "figures go into the card, where the promotion gate compares them",
    )
    p.add_argument("--out", type=Path, required=True, help="new model directory")
    p.add_argument("--epochs", type=int, help="epochs per backbone (default: the preset's)")
    p.add_argument("--limit", type=int, help="at most N images per class")
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.1,
        help="share of each class (after the test share) for validation, where calibration, the fusion "
        "weight, the operating points and the gate's threshold are fitted (default 0.1); a calibration "
        "figure needs several hundred validation images to mean anything",
    )
    p.add_argument(
        "--samples-per-epoch", type=int, help="class-balanced draws per epoch (default: the preset's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pretrained-dir", type=Path, help="local torchvision ImageNet weights (never downloaded)"
    )
    p.add_argument(
        "--fusion", choices=["accuracy", "logloss"], default="accuracy", help="how to set the weight"
    )
    p.add_argument("--model-version", help="version for the card (default: preset + timestamp)")
    p.add_argument(
        "--target-sensitivity",
        action="append",
        default=[],
        metavar="CLASS=SENSITIVITY",
        help="operating point: the highest threshold on CLASS that keeps this validation sensitivity "
        "(e.g. covid19=0.95; repeatable); other classes get Youden's optimum, and an image whose classes "
        "all fall short is indeterminate. Default: no thresholds (argmax)",
    )
    p.add_argument(
        "--register", action="store_true", help="record the model as a candidate in model_versions"
    )
    p.add_argument("--activate", action="store_true", help="register, then promote through the gate")

    p = command("evaluate", "accuracy, per-class sensitivity/specificity/PPV/F1 with CIs, AUC, ECE, plots")
    p.add_argument("--model", type=Path, required=True, help="model directory")
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="image folder per class, CSV (path,label) or COVIDx list; repeat to merge datasets",
    )
    p.add_argument(
        "--group-by",
        choices=["source"],
        help="also report every figure per source (report.json per_group and the printed table)",
    )
    p.add_argument("--out", type=Path, help="folder for report.json and the PNG plots")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")

    p = command("export", "add artefacts to a model directory: --int8, a proven INT8 graph for CPU serving")
    p.add_argument(
        "model_dir", type=Path, metavar="MODEL_DIR", help="model directory made by `trainer train`"
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="quantise model.onnx to model.int8.onnx (calibrated on the training split) and gate it",
    )
    p.add_argument(
        "--heatmap",
        action="store_true",
        help="write a NEW model directory (--out) whose graph also outputs the heatmap (class activation "
        "map), for models exported before it existed",
    )
    p.add_argument("--out", type=Path, help="with --heatmap: the new model directory (must not exist)")
    p.add_argument(
        "--data",
        action="append",
        help="the data the model was trained on, exactly as given to `trainer train` (repeated as there)",
    )
    p.add_argument("--seed", type=int, default=0, help="the seed given to `trainer train` (default 0)")
    p.add_argument("--limit", type=int, help="the --limit given to `trainer train`, if any")
    p.add_argument(
        "--calibration-images", type=int, default=200, help="training images to calibrate on (default 200)"
    )
    p.add_argument("--min-agreement", type=float, default=0.99, help="gate: share of identical labels")
    p.add_argument("--max-f1-drop", type=float, default=0.01, help="gate: largest macro-F1 drop allowed")
    p.add_argument(
        "--max-sensitivity-drop", type=float, default=0.01, help="gate: largest COVID-19 sensitivity drop"
    )
    p.add_argument("--min-eval-images", type=int, default=100, help="gate: evaluation images needed")
    p.add_argument(
        "--activations",
        choices=["uint8", "int8"],
        help="activation type (default: ONNX Runtime's advice for this CPU: uint8 on x86-64, int8 on ARM)",
    )
    p.add_argument(
        "--fp32-stages",
        type=int,
        choices=range(5),
        help="ResNet stages kept FP32 with the stem (0: quantise every conv; default 1: stem and stage 1)",
    )
    p.add_argument("--replace", action="store_true", help="replace an existing INT8 model")

    p = command("gate", "the image-content gate (novelty of an image against the model's training data)")
    gsub = p.add_subparsers(dest="gate_command", required=True, metavar="ACTION")
    gp = gsub.add_parser(
        "fit",
        help="fit the gate on an existing model's training split and write a NEW model directory with it",
    )
    add_config_option(gp, top=False)
    gp.add_argument("--model", type=Path, required=True, help="model directory made by `trainer train`")
    gp.add_argument(
        "--data",
        action="append",
        required=True,
        help="the data the model was trained on, exactly as given to `trainer train` (repeated as there)",
    )
    gp.add_argument("--out", type=Path, required=True, help="new model directory (must not exist)")
    gp.add_argument("--seed", type=int, default=0, help="the seed given to `trainer train` (default 0)")
    gp.add_argument("--limit", type=int, help="the --limit given to `trainer train`, if any")
    gp.add_argument(
        "--version", dest="model_version", default=None, help="new model version (default: VERSION+gate)"
    )

    p = command("crossval", "validation by source: train without each source (group) and test on it")
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="image folder per class, CSV (path,label) or COVIDx list; repeat to merge datasets",
    )
    p.add_argument(
        "--leave-source-out",
        action="store_true",
        required=True,
        help="leave each source (or each group of --groups) out of training in turn and evaluate on it",
    )
    p.add_argument(
        "--groups",
        type=Path,
        help="CSV source,group: the sources of one group are left out together (fnmatch patterns such as "
        "cohen-* allowed); sources named in no group always stay in training",
    )
    p.add_argument("--preset", choices=["quick", "robust", "paper"], default="quick")
    p.add_argument(
        "--out", type=Path, required=True, help="folder for crossval.json, crossval.md and per-fold runs"
    )
    p.add_argument("--segmentation-data", type=Path, help="as for train: lung masks for the lung segmenter")
    p.add_argument("--segmenter-epochs", type=int, help="lung segmenter epochs (default: the preset's)")
    p.add_argument("--epochs", type=int, help="epochs per backbone (default: the preset's)")
    p.add_argument("--limit", type=int, help="at most N images per class (smoke runs)")
    p.add_argument("--samples-per-epoch", type=int, help="balanced draws per epoch (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", action="append", help="run only this fold (group name); repeat for several")

    p = command("adapt", "fine-tune a model on a site's labelled images; figures before/after on the site")
    p.add_argument("--model", type=Path, required=True, help="base model directory (e.g. the active model)")
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="the site's labelled images, in any form `train` reads; repeat to merge",
    )
    p.add_argument("--out", type=Path, required=True, help="new model directory (must not exist)")
    p.add_argument(
        "--eval-data",
        action="append",
        help="site images kept apart for the before/after figures (default: hold out 25%% of --data)",
    )
    p.add_argument(
        "--preset", choices=["quick", "robust", "paper"], help="recipe (default: the base model's)"
    )
    p.add_argument("--epochs", type=int, help="epochs per backbone (default: the preset's)")
    p.add_argument("--samples-per-epoch", type=int, help="balanced draws per epoch (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-version", help="version for the card (default: BASE+site)")
    p.add_argument(
        "--target-sensitivity",
        action="append",
        default=[],
        metavar="CLASS=SENSITIVITY",
        help="operating points re-chosen on the site's validation split, as for train (repeatable)",
    )
    p.add_argument(
        "--register", action="store_true", help="record the model as a candidate in model_versions"
    )

    command(
        "retrain", "the nightly job: fine-tune on new confirmed labels, evaluate, promote through the gate"
    )

    p = command("labels", "radiologist-confirmed labels")
    lsub = p.add_subparsers(dest="labels_command", required=True, metavar="ACTION")
    lp = lsub.add_parser(
        "import", help="load a CSV keyed by sop_instance_uid, study_instance_uid or accession_number"
    )
    add_config_option(lp, top=False)
    lp.add_argument("file", type=Path, metavar="FILE.csv")

    p = command("models", "model registry")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    add_config_option(msub.add_parser("list", help="registered models, their status and metrics"), top=False)
    mp = msub.add_parser("promote", help="make VERSION active if it is not worse than the active model")
    add_config_option(mp, top=False)
    mp.add_argument("model_version", metavar="VERSION")
    mp.add_argument("--data", help="evaluation set both models are compared on (default: trainer.eval_data)")
    mp.add_argument("--force", action="store_true", help="skip the gate (recorded in model_events)")
    add_config_option(msub.add_parser("rollback", help="re-activate the previously active model"), top=False)

    p = command("init-model", "write a randomly initialised (untrained) fused model directory, for plumbing")
    p.add_argument("--out", type=Path, required=True, help="new model directory (must not exist)")
    p.add_argument("--arch-a", default="resnet101", help="first backbone (default resnet101)")
    p.add_argument("--arch-b", default="resnet152", help="second backbone (default resnet152)")
    p.add_argument("--input-size", type=int, default=224, help="square input size in pixels (default 224)")
    p.add_argument("--fusion-weight", type=float, default=0.5, help="weight of the first network, 0..1")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--version", dest="model_version", default=None, help="model version (default: derived)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_from_args(args)
    except ConfigError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "config":
            print(json.dumps(as_dict(config), indent=2))
            return 0
        from screener.core.logs import configure_logging

        configure_logging(config.logging, stream=sys.stderr)
        handler = _COMMANDS[args.command]
        return handler(config, args)
    except BrokenPipeError:
        return stdout_closed()
    except ScreenerError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 1


def _init_model(config: Config, args: argparse.Namespace) -> int:
    from screener.model.export import create_random_model_dir

    card = create_random_model_dir(
        args.out,
        arch_a=args.arch_a,
        arch_b=args.arch_b,
        input_size=args.input_size,
        fusion_weight=args.fusion_weight,
        seed=args.seed,
        version=args.model_version,
    )
    print(f"{args.out / CARD_FILE} version {card.version}")
    return 0


def _labels(config: Config, args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from trainer.labels import import_labels

    engine = open_database(config.database)
    try:
        with Session(engine) as session, session.begin():
            report = import_labels(session, args.file)
    finally:
        engine.dispose()
    for line, message in report.errors:
        print(f"{args.file}:{line}: {message}", file=sys.stderr)
    print(f"imported {report.imported} labels; {len(report.errors)} rows rejected")
    return 0 if report.imported or not report.errors else 1


def _evaluate(config: Config, args: argparse.Namespace) -> int:
    from trainer.data import load_roots
    from trainer.evaluate import evaluate_model, format_summary

    report = evaluate_model(
        args.model,
        load_roots(args.data),
        args.out,
        backend=args.backend,
        bootstrap=args.bootstrap,
        group_by=args.group_by,
    )
    print(format_summary(report))
    if args.out:
        print(f"report: {args.out / 'report.json'}")
    return 0


def _models(config: Config, args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from screener.model.registry import list_versions
    from trainer.registry import promote, rollback

    engine = open_database(config.database)
    try:
        with Session(engine) as session, session.begin():
            if args.models_command == "list":
                rows = list_versions(session)
                if not rows:
                    print("no models registered")
                for r in rows:
                    metrics = json.loads(r.card_json).get("metrics", {})
                    acc = metrics.get("test_accuracy", metrics.get("accuracy"))
                    shown = f"acc={acc:.3f}" if isinstance(acc, int | float) else ""
                    print(
                        f"{r.version:<36} {r.status.value:<9} {r.architectures:<20} {shown} "
                        f"{_cpu_precision(Path(r.path)):<11} {r.path}"
                    )
                return 0
            if args.models_command == "rollback":
                decision = rollback(session)
                print(f"active model: {decision.version} ({decision.reason})")
                return 0
            candidate_report, active_report = _gate_reports(config, session, args)
            decision = promote(
                session,
                args.model_version,
                candidate_report=candidate_report,
                active_report=active_report,
                force=args.force,
                tolerance=config.trainer.gate_tolerance,
            )
    finally:
        engine.dispose()
    verb = "promoted" if decision.promoted else "not promoted"
    print(f"{decision.version} {verb}: {decision.reason}")
    return 0 if decision.promoted else 3


def _cpu_precision(model_dir: Path) -> str:
    """What the screener would run on CPU with inference.precision = auto: ``cpu=int8``, ``cpu=fp32`` or
    ``cpu=fp32*`` (an INT8 graph exists but failed its gate), read from the card on disk (INT8 may be
    added after registration); ``cpu=?`` when the card cannot be read."""
    from screener.model.modelcard import read_card

    try:
        int8 = read_card(model_dir).int8
    except ScreenerError:
        return "cpu=?"
    if int8 is None:
        return "cpu=fp32"
    return "cpu=int8" if int8.passed else "cpu=fp32*"


def _gate_reports(config: Config, session: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """Evaluate candidate and active model on the same data (only when the gate needs it)."""
    from sqlalchemy import select

    from screener.core.db.models import ModelVersion
    from screener.model.registry import active_version

    active = active_version(session)
    data = args.data or config.trainer.eval_data
    if args.force or active is None or not data:
        return None, None
    candidate = session.scalar(select(ModelVersion).where(ModelVersion.version == args.model_version))
    if candidate is None:
        return None, None
    from trainer.data import load_samples
    from trainer.evaluate import evaluate_model

    samples = load_samples(data)
    return (
        evaluate_model(Path(candidate.path), samples, None, bootstrap=0, progress=False),
        evaluate_model(Path(active.path), samples, None, bootstrap=0, progress=False),
    )


def _export_heatmap(args: argparse.Namespace) -> int:
    from screener.model.export import add_heatmap

    out = args.out
    if out is None or args.int8:
        print(
            "trainer export --heatmap needs --out NEW_DIR (model directories are immutable) and no --int8: "
            "quantise the new directory afterwards",
            file=sys.stderr,
        )
        return 2
    card = add_heatmap(args.model_dir, out)
    print(f"model {card.version} with heatmap output written to {out}")
    return 0


def _export(config: Config, args: argparse.Namespace) -> int:
    from trainer.quantize import GateThresholds, default_settings, export_int8

    if args.heatmap:
        return _export_heatmap(args)
    if not args.int8:
        print(
            "trainer export: nothing to export: give --int8 or --heatmap (model.onnx and the weights are "
            "written by `trainer train`)",
            file=sys.stderr,
        )
        return 2
    if not args.data:
        print(
            "trainer export --int8 needs --data: the dataset the model was trained on, as given to "
            "`trainer train`; calibration uses its training split only",
            file=sys.stderr,
        )
        return 2
    gate = GateThresholds(
        min_agreement=args.min_agreement,
        max_macro_f1_drop=args.max_f1_drop,
        max_covid_sensitivity_drop=args.max_sensitivity_drop,
        min_images=args.min_eval_images,
    )
    try:
        gate.validate()
    except ValueError as exc:
        print(f"trainer export: {exc}", file=sys.stderr)
        return 2
    settings = default_settings()
    if args.fp32_stages is not None:
        settings = dataclasses.replace(settings, fp32_stages=args.fp32_stages)
    if args.activations:
        settings = dataclasses.replace(settings, activations=args.activations)
    from trainer.data import load_roots

    outcome = export_int8(
        args.model_dir,
        load_roots(args.data),
        seed=args.seed,
        limit=args.limit,
        calibration_images=args.calibration_images,
        gate=gate,
        settings=settings,
        replace=args.replace,
        threads=config.inference.threads,
    )
    int8 = outcome.int8
    print(f"{args.model_dir / 'model.int8.onnx'} sha256 {int8.sha256}")
    print(f"calibrated on {outcome.n_calibration} training images; evaluated on {outcome.n_eval}")
    print(int8.summary())
    for failure in int8.gate.get("failures", []):
        print(f"  gate: {failure}")
    if not int8.passed:
        print("the screener keeps serving FP32 for this model (the card records the failed gate)")
    return 0 if int8.passed else 3


def _gate(config: Config, args: argparse.Namespace) -> int:
    from trainer.data import load_roots
    from trainer.gate import add_gate, gate_with_checks_summary

    card = add_gate(
        args.model,
        load_roots(args.data),
        args.out,
        seed=args.seed,
        limit=args.limit,
        version=args.model_version,
    )
    assert card.gate is not None
    print(f"{args.out}: model {card.version} (from {card.parent_version}) with an image-content gate")
    print(gate_with_checks_summary(card.gate))
    for case in card.gate.checks.get("cases", []):
        if "novelty" in case:
            verdict = "refused" if case["refused"] else "PASSED"
            print(f"  {case['name']} ({case['kind']}): novelty {case['novelty']:.1f} {verdict}")
        else:
            print(f"  {case['name']} ({case['kind']}): refused by {case['refused_by']}")
    return 0


def _train(config: Config, args: argparse.Namespace) -> int:
    from trainer.jobs import run_train

    return run_train(config, args)


def _crossval(config: Config, args: argparse.Namespace) -> int:
    from trainer.crossval import run_crossval

    return run_crossval(args)


def _adapt(config: Config, args: argparse.Namespace) -> int:
    from trainer.jobs import run_adapt

    return run_adapt(config, args)


def _retrain(config: Config, args: argparse.Namespace) -> int:
    from trainer.jobs import run_retrain

    return run_retrain(config)


_COMMANDS = {
    "init-model": _init_model,
    "labels": _labels,
    "evaluate": _evaluate,
    "models": _models,
    "train": _train,
    "export": _export,
    "gate": _gate,
    "retrain": _retrain,
    "adapt": _adapt,
    "crossval": _crossval,
}


if __name__ == "__main__":
    sys.exit(main())

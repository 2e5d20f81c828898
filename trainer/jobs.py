"""`trainer train` and `trainer retrain` (the nightly job): orchestration around pipeline, evaluate, registry.

`trainer retrain` exit codes: 0 promoted (also: another run holds the lock, nothing done), 3 kept the
active model (gate refused, or no new confirmed labels), 1 failed. It prints one summary line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from screener.core.config import Config
from screener.core.db.migrate import open_database
from screener.core.db.models import Label, TrainingRun, utcnow
from screener.core.errors import DataError, ScreenerError, TrainingError
from screener.core.logs import get_logger
from screener.model.registry import active_version, register
from trainer.data import Sample, confirmed_label_samples, limit_per_class, load_roots, load_samples
from trainer.evaluate import evaluate_model
from trainer.registry import promote, record_registration
from trainer.runs import finish_run, open_run, prune_runs, run_dir_for

log = get_logger("trainer.jobs")

EXIT_PROMOTED = 0
EXIT_FAILED = 1
EXIT_KEPT = 3


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive, non-blocking lock on ``path``; yields False when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _version(preset: str) -> str:
    return f"{preset}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"


def run_train(config: Config, args: argparse.Namespace) -> int:
    """`trainer train` (also under ``torchrun --nproc-per-node N -m trainer.cli train ...``)."""
    from trainer.train import shutdown_distributed

    try:
        return _run_train(config, args)
    finally:
        shutdown_distributed()


def _run_train(config: Config, args: argparse.Namespace) -> int:
    """`trainer train`: train, fuse, export to ``--out``; register and activate on request (gated).

    The run trains in ``<out>-run/`` beside ``--out`` (:mod:`trainer.runs`), printed at the start; the same
    command re-run after an interruption resumes it.
    """
    from trainer.crossval import out_of_source_figures
    from trainer.operating_points import parse_targets
    from trainer.pipeline import train_and_export
    from trainer.train import barrier, distributed_rank_world

    if args.out.exists():
        raise TrainingError(f"{args.out} already exists: model directories are immutable; choose a new one")
    run_dir = run_dir_for(args.out)
    rank, _ = distributed_rank_world()
    if rank == 0:
        recipe = {
            "preset": args.preset,
            "data": [str(Path(d).resolve()) for d in args.data],
            "limit": args.limit,
            "val_fraction": args.val_fraction,
            "seed": args.seed,
            "epochs": args.epochs,
            "samples_per_epoch": args.samples_per_epoch,
            "pretrained_dir": args.pretrained_dir or config.trainer.pretrained_dir,
            "segmentation_data": args.segmentation_data,
            "segmenter_epochs": args.segmenter_epochs,
        }
        resumed = open_run(run_dir, kind="train", model_dir=args.out, recipe=recipe)
        verb = "resuming the interrupted run in" if resumed else "training run folder:"
        print(f"{verb} {run_dir} (checkpoints while training; best weights, metrics.csv, curves.png after)")
    barrier()
    samples = load_roots(args.data)
    if args.limit:
        samples = limit_per_class(samples, args.limit, seed=args.seed)
    targets = parse_targets(args.target_sensitivity, sorted({s.label for s in samples}))
    version = args.model_version or _version(args.preset)
    outcome = train_and_export(
        preset=args.preset,
        data=samples,
        out=args.out,
        epochs=args.epochs,
        samples_per_epoch=args.samples_per_epoch,
        seed=args.seed,
        pretrained_dir=args.pretrained_dir or config.trainer.pretrained_dir,
        fusion_method=args.fusion,
        version=version,
        workdir=run_dir,
        segmentation_data=args.segmentation_data,
        segmenter_epochs=args.segmenter_epochs,
        out_of_source=out_of_source_figures(args.crossval, args.preset) if args.crossval else None,
        target_sensitivity=targets,
        val_fraction=args.val_fraction,
    )
    from trainer.train import is_main_process

    if not is_main_process():  # under torchrun only rank 0 reports and registers
        return 0
    card = outcome.card
    finish_run(run_dir, card.version)
    print(f"model {card.version} written to {outcome.model_dir}")
    split_csv = write_split_csv(
        outcome.test_samples, outcome.model_dir.with_name(f"{outcome.model_dir.name}-test-split.csv")
    )
    print(f"held-out test split ({len(outcome.test_samples)} images): {split_csv}")
    print(json.dumps({k: v for k, v in card.metrics.items() if not isinstance(v, list | dict)}, indent=2))
    if not (args.register or args.activate):
        return 0
    engine = open_database(config.database)
    try:
        report = (
            evaluate_model(
                outcome.model_dir,
                outcome.test_samples,
                outcome.model_dir.parent / f"{card.version}-eval",
                progress=False,
            )
            if outcome.test_samples
            else None
        )
        with Session(engine) as session, session.begin():
            register(session, outcome.model_dir)
            record_registration(session, card.version, "trainer train", report)
            if args.activate:
                active = active_version(session)
                active_report = (
                    evaluate_model(Path(active.path), outcome.test_samples, None, bootstrap=0, progress=False)
                    if active is not None and outcome.test_samples
                    else None
                )
                decision = promote(
                    session,
                    card.version,
                    candidate_report=report,
                    active_report=active_report,
                    tolerance=config.trainer.gate_tolerance,
                )
                print(
                    f"{card.version} {'promoted' if decision.promoted else 'not promoted'}: {decision.reason}"
                )
                return EXIT_PROMOTED if decision.promoted else EXIT_KEPT
        print(f"registered {card.version} as a candidate")
    finally:
        engine.dispose()
    return 0


def run_adapt(config: Config, args: argparse.Namespace) -> int:
    """`trainer adapt`: fine-tune ``--model`` on the site's ``--data``, print the site figures before and
    after, and with ``--register`` record the new model as a candidate (promote it with `trainer models
    promote`, whose gate compares it with the active model on the site's evaluation data)."""
    from trainer.adapt import adapt_model, summary_line
    from trainer.operating_points import parse_targets

    if args.out.exists():
        raise TrainingError(f"{args.out} already exists: model directories are immutable; choose a new one")
    run_dir = run_dir_for(args.out)
    open_run(run_dir, kind="adapt", model_dir=args.out, recipe={"base": str(args.model), "data": args.data})
    evaluation = load_roots(args.eval_data) if args.eval_data else None
    site = load_roots(args.data)
    targets = parse_targets(args.target_sensitivity, sorted({s.label for s in site}))
    outcome = adapt_model(
        args.model,
        site,
        args.out,
        evaluation=evaluation,
        preset=args.preset,
        epochs=args.epochs,
        samples_per_epoch=args.samples_per_epoch,
        seed=args.seed,
        version=args.model_version,
        workdir=run_dir,
        source="trainer adapt --data " + " ".join(str(d) for d in args.data),
        target_sensitivity=targets,
    )
    finish_run(run_dir, outcome.card.version)
    print(f"model {outcome.card.version} (adapted from {outcome.card.parent_version}) written to {args.out}")
    print(summary_line(outcome))
    split_csv = write_split_csv(outcome.test_samples, args.out.with_name(f"{args.out.name}-site-test.csv"))
    print(f"site test images ({len(outcome.test_samples)}): {split_csv}")
    if not outcome.improved:
        print("the adapted model is NOT better than its base on the site test split: do not promote it")
    if args.register:
        engine = open_database(config.database)
        try:
            with Session(engine) as session, session.begin():
                register(session, outcome.model_dir)
                record_registration(session, outcome.card.version, "trainer adapt", None)
        finally:
            engine.dispose()
        print(f"registered {outcome.card.version} as a candidate")
    return 0 if outcome.improved else EXIT_KEPT


def write_split_csv(samples: list[Sample], path: Path) -> Path:
    """The held-out test split as a `path,label,source` CSV that `trainer evaluate --data` reads."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "source"])
        for sample in samples:
            writer.writerow([str(sample.path.resolve()), sample.label, sample.source])
    return path


def run_retrain(config: Config) -> int:
    """The nightly job. Prints one summary line; returns the exit code (see module docstring).

    Each run trains in ``trainer.workdir/models/<version>-run/``; afterwards, whatever the outcome, only the
    newest ``trainer.keep_runs`` of those folders are kept (:func:`trainer.runs.prune_runs`).
    """
    with exclusive_lock(config.trainer.lock_file) as held:
        if not held:
            print(f"retrain: another run holds {config.trainer.lock_file}; nothing to do")
            return EXIT_PROMOTED
        engine = open_database(config.database)
        try:
            return _retrain_locked(config, engine)
        finally:
            engine.dispose()
            prune_runs(config.trainer.workdir / "models", config.trainer.keep_runs)


def _retrain_locked(config: Config, engine: Engine) -> int:
    started = time.monotonic()
    with Session(engine) as session, session.begin():
        last = session.scalar(
            select(TrainingRun)
            .where(TrainingRun.kind == "retrain", TrainingRun.status.in_(["promoted", "kept"]))
            .order_by(TrainingRun.id.desc())
            .limit(1)
        )
        since = last.labels_until if last is not None else None
        newest = session.scalar(select(func.max(Label.imported_at)))
        new_labels = (
            session.scalar(
                select(func.count()).select_from(Label).where(Label.imported_at > since)
                if since
                else select(func.count()).select_from(Label)
            )
            or 0
        )
        run = TrainingRun(kind="retrain", status="running", labels_until=newest or since)
        session.add(run)
        session.flush()
        run_id = run.id
    if last is not None and new_labels < config.trainer.min_new_labels:
        reason = (
            f"{new_labels} new confirmed labels since the last run "
            f"(trainer.min_new_labels = {config.trainer.min_new_labels})"
        )
        _finish_run(engine, run_id, "kept", None, {"outcome": "kept", "reason": reason})
        print(f"retrain: kept the active model: {reason}")
        return EXIT_KEPT
    try:
        outcome, decision = _train_evaluate_promote(config, engine, run_id)
    except (ScreenerError, OSError, RuntimeError, ValueError) as exc:
        log.exception("retrain.failed", error=type(exc).__name__)
        _finish_run(
            engine, run_id, "failed", None, {"outcome": "failed", "error": f"{type(exc).__name__}: {exc}"}
        )
        print(f"retrain: failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    status = "promoted" if decision.promoted else "kept"
    minutes = (time.monotonic() - started) / 60
    summary: dict[str, Any] = {
        "outcome": status,
        "version": outcome.card.version,
        "reason": decision.reason,
        "new_labels": new_labels,
        "minutes": round(minutes, 1),
    }
    _finish_run(engine, run_id, status, outcome.card.version, summary)
    verb = "promoted" if decision.promoted else "kept the active model; candidate"
    took = f"{new_labels} new labels; {minutes:.1f} min"
    print(f"retrain: {verb} {outcome.card.version} ({decision.reason}; {took})")
    return EXIT_PROMOTED if decision.promoted else EXIT_KEPT


def _gather(config: Config, engine: Engine) -> list[Sample]:
    samples: list[Sample] = []
    if config.trainer.base_data:
        base = load_samples(config.trainer.base_data)
        if config.trainer.limit_per_class:
            base = limit_per_class(base, config.trainer.limit_per_class)
        samples.extend(base)
    samples.extend(confirmed_label_samples(engine, config.storage.spool_dir))
    if not samples:
        raise DataError(
            "no training data: set trainer.base_data and/or import confirmed labels (trainer labels import)"
        )
    return samples


def _train_evaluate_promote(config: Config, engine: Engine, run_id: int) -> tuple[Any, Any]:
    """With an active model: :func:`trainer.adapt.adapt_model` on the gathered images (the same code as
    `trainer adapt`, the site data being the confirmed labels in SQL); without one: train from scratch.
    Then both are evaluated on ``trainer.eval_data`` (default: the held-out site test split) and the
    candidate goes through the promotion gate."""
    from trainer.adapt import adapt_model
    from trainer.pipeline import train_and_export

    samples = _gather(config, engine)
    with Session(engine) as session:
        active = active_version(session)
    version = _version(config.trainer.preset)
    out = config.trainer.workdir / "models" / version
    run_dir = run_dir_for(out)
    open_run(run_dir, kind="retrain", model_dir=out, recipe={"version": version})
    log.info("retrain.run", folder=str(run_dir))
    if active is not None:
        adapted = adapt_model(
            Path(active.path),
            samples,
            out,
            preset=config.trainer.preset,
            epochs=config.trainer.epochs or None,
            samples_per_epoch=config.trainer.samples_per_epoch or None,
            version=version,
            workdir=run_dir,
            progress=False,
            source="confirmed labels in SQL" + (" + trainer.base_data" if config.trainer.base_data else ""),
        )
        outcome: Any = adapted.training
        test_samples = adapted.test_samples
    else:
        outcome = train_and_export(
            preset=config.trainer.preset,
            data=samples,
            out=out,
            epochs=config.trainer.epochs or None,
            samples_per_epoch=config.trainer.samples_per_epoch or None,
            pretrained_dir=config.trainer.pretrained_dir,
            version=version,
            workdir=run_dir,
        )
        test_samples = outcome.test_samples
    finish_run(run_dir, version)
    eval_samples = load_samples(config.trainer.eval_data) if config.trainer.eval_data else test_samples
    candidate_report = evaluate_model(
        outcome.model_dir, eval_samples, out.parent / f"{version}-eval", progress=False
    )
    active_report = (
        evaluate_model(Path(active.path), eval_samples, None, bootstrap=0, progress=False) if active else None
    )
    with Session(engine) as session, session.begin():
        register(session, outcome.model_dir)
        record_registration(session, version, f"trainer retrain (run {run_id})", candidate_report)
        decision = promote(
            session,
            version,
            candidate_report=candidate_report,
            active_report=active_report,
            tolerance=config.trainer.gate_tolerance,
            actor="trainer retrain",
        )
    return outcome, decision


def _finish_run(
    engine: Engine, run_id: int, status: str, version: str | None, summary: dict[str, Any]
) -> None:
    with Session(engine) as session, session.begin():
        run = session.get(TrainingRun, run_id)
        assert run is not None
        run.status = status
        run.model_version = version
        run.finished_at = utcnow()
        run.summary = json.dumps(summary, sort_keys=True)

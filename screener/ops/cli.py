"""``screener``: serve, db upgrade|current, status, config."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from screener import __version__
from screener.core.cliargs import add_config_option, load_from_args, stdout_closed
from screener.core.config import Config, as_dict
from screener.core.errors import EXIT_STORE_MISMATCH, ConfigError, ScreenerError, StoreIdentityError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="screener", description="CXR Screener: chest X-ray screening daemon"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_config_option(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon (listener, worker, sender) until SIGTERM/SIGINT")
    add_config_option(p, top=False)
    p.add_argument(
        "--role",
        choices=["all", "listener", "worker", "settler", "sender", "console"],
        default="all",
        help="run only one part, for several processes or hosts sharing one PostgreSQL and spool",
    )

    p = sub.add_parser("db", help="database schema")
    add_config_option(p, top=False)
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    add_config_option(
        dbsub.add_parser("upgrade", help="migrate the database to the newest revision"), top=False
    )
    add_config_option(
        dbsub.add_parser("current", help="print the database revision and the newest one"), top=False
    )
    r = dbsub.add_parser(
        "rebuild",
        help="re-create instances and studies from the spool files' headers (after a lost database)",
    )
    add_config_option(r, top=False)
    r.add_argument(
        "--from-spool",
        action="store_true",
        required=True,
        help="read every file of storage.spool_dir (the record of truth); idempotent",
    )

    p = sub.add_parser("status", help="counts of instances by status and of studies")
    add_config_option(p, top=False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("config", help="print the effective settings (file + environment overrides) as JSON")
    add_config_option(p, top=False)

    p = sub.add_parser("models", help="model registry: register, activate, list")
    add_config_option(p, top=False)
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    r = msub.add_parser("register", help="verify a model directory and record it as a candidate")
    add_config_option(r, top=False)
    r.add_argument("model_dir", metavar="DIR", type=Path)
    r.add_argument("--activate", action="store_true", help="make it the active model at once")
    a = msub.add_parser(
        "activate", help="make a registered version the active model (hot-reloaded by workers)"
    )
    add_config_option(a, top=False)
    a.add_argument("version")
    add_config_option(msub.add_parser("list", help="registered models and their status"), top=False)
    t = msub.add_parser(
        "export-triton", help="write a registered version into a Triton model repository (docs/scaling.md)"
    )
    add_config_option(t, top=False)
    t.add_argument("version")
    t.add_argument("repo_dir", metavar="REPO_DIR", type=Path)
    t.add_argument(
        "--kind",
        choices=("python", "onnxruntime", "tensorrt"),
        default="python",
        help="python: ONNX Runtime in Triton's Python backend (default); onnxruntime: Triton's ONNX Runtime "
        "backend; tensorrt: the plan built for this GPU (inference.trt_cache_dir)",
    )
    t.add_argument("--model-name", help="Triton model name (default: inference.triton.model_name)")
    t.add_argument("--max-batch", type=int, help="max_batch_size (default: inference.max_batch)")
    t.add_argument("--keep", type=int, default=2, help="versions left in the entry, this one included")
    t.add_argument("--plan", type=Path, help="--kind tensorrt: this plan instead of the cached one")

    p = sub.add_parser(
        "report",
        help="reports: daily, positives, turnaround, performance, deliveries, site-performance, drift",
    )
    add_config_option(p, top=False)
    p.add_argument(
        "report_name",
        metavar="REPORT",
        choices=[
            "daily",
            "positives",
            "turnaround",
            "performance",
            "deliveries",
            "site-performance",
            "drift",
        ],
    )
    p.add_argument("--since", type=date.fromisoformat, metavar="DATE", help="first day (YYYY-MM-DD, UTC)")
    p.add_argument("--until", type=date.fromisoformat, metavar="DATE", help="last day (YYYY-MM-DD, UTC)")
    p.add_argument("--format", dest="fmt", choices=["table", "csv", "json"], default="table")
    p.add_argument("--model", metavar="VERSION", help="site-performance, drift: only this model version")
    p.add_argument(
        "--baseline-days",
        type=int,
        default=7,
        metavar="N",
        help="drift: reference = the first N days of the version's predictions, where its card has none",
    )
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="site-performance, drift: also draw a PNG")

    p = sub.add_parser(
        "deliveries", help="results outbox (DICOM, HL7, webhook, email): list and re-drive deliveries"
    )
    add_config_option(p, top=False)
    dsub = p.add_subparsers(dest="deliveries_command", required=True, metavar="ACTION")
    d = dsub.add_parser("list", help="recent deliveries with status, attempts and last error")
    add_config_option(d, top=False)
    d.add_argument("--status", choices=["pending", "sent", "failed", "dead"])
    d.add_argument("--channel", choices=["dicom", "hl7", "webhook", "email"], help="only this channel")
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("retry", help="re-drive deliveries: by ID, or --dead for every dead one")
    add_config_option(d, top=False)
    d.add_argument("ids", metavar="ID", nargs="*", type=int)
    d.add_argument("--dead", action="store_true", help="re-drive every dead delivery")
    d.add_argument(
        "--channel", choices=["dicom", "hl7", "webhook", "email"], help="with --dead: only this one"
    )

    from screener.ops.console.users_cli import add_users_parser

    add_users_parser(sub, add_config_option)

    p = sub.add_parser(
        "bench",
        help="images/s per inference backend and batch size, ratio to torch eager (see `screener bench -h`)",
        add_help=False,
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER)

    p = sub.add_parser("classify", help="classify DICOM/PNG/JPEG files without the daemon")
    add_config_option(p, top=False)
    p.add_argument("--model", metavar="DIR", type=Path, help="model directory (default: the active model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--heatmap",
        metavar="DIR",
        type=Path,
        help="write one PNG per classified image into DIR: the image with the model's heatmap over it",
    )
    p.add_argument("files", metavar="FILE", nargs="+", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["bench"]:  # its own options, parsed by the benchmark (no settings needed)
        from screener.ops.benchmark import main as bench_main

        return bench_main(raw[1:], prog="screener bench")
    args = _parser().parse_args(raw)
    try:
        config = load_from_args(args)
    except ConfigError as exc:
        print(f"screener: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, config)
    except BrokenPipeError:
        return stdout_closed()
    except StoreIdentityError as exc:
        print(f"screener: {exc}", file=sys.stderr)
        return EXIT_STORE_MISMATCH
    except ScreenerError as exc:
        print(f"screener: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, config: Config) -> int:
    from screener.core.logs import configure_logging

    if args.command == "config":
        print(json.dumps(as_dict(config), indent=2))
        return 0

    if args.command == "serve":
        from screener.ops.app import serve

        configure_logging(config.logging)  # the daemon's JSON log lines are its output: stdout
        return serve(config, role=args.role)
    # Every other command prints its result on stdout (`--json`, `--format csv|json` pipe into a parser):
    # its log lines go to stderr.
    configure_logging(config.logging, stream=sys.stderr)

    from screener.core.db.migrate import current_revision, ensure_at_head, head_revision, upgrade
    from screener.core.db.session import make_engine

    if args.command == "classify" and args.model is not None:
        return _classify(config, args.model, args.files, args.json, args.heatmap)
    # Commands that only read open the database read-only: they never create, migrate or write anything
    # (a missing SQLite file is an error, not a new empty database). Commands that write follow
    # database.auto_migrate.
    read_only = (
        args.command in ("status", "report", "classify")
        or (args.command == "db" and args.db_command == "current")
        or (args.command == "models" and args.models_command in ("list", "export-triton"))
        or (args.command == "deliveries" and args.deliveries_command == "list")
        or (args.command == "users" and args.users_command == "list")
    )
    engine = make_engine(config.database, read_only=read_only)
    try:
        if args.command == "db" and args.db_command == "upgrade":
            upgrade(engine)
            print(f"database at revision {current_revision(engine)}")
            return 0
        if args.command == "db" and args.db_command == "rebuild":
            from screener.ops.rebuild import rebuild_from_spool

            ensure_at_head(engine, auto_migrate=True)
            summary = rebuild_from_spool(config, engine)
            print(summary.render())
            return 0
        if args.command == "db":
            print(f"current: {current_revision(engine) or '<empty>'}\nhead:    {head_revision()}")
            return 0
        from screener.ops.status import collect_status, render_status

        ensure_at_head(engine, auto_migrate=config.database.auto_migrate and not read_only)
        if args.command == "models":
            return _models(engine, args, config)
        if args.command == "users":
            from screener.ops.console.users_cli import users_command

            return users_command(engine, args)
        if args.command == "deliveries":
            return _deliveries(engine, args)
        if args.command == "report":
            from screener.ops.reporting import ReportOptions, run_report

            options = ReportOptions(
                model=args.model,
                baseline_days=args.baseline_days,
                spool_root=config.storage.spool_dir,
                plot=args.plot,
            )
            print(run_report(engine, args.report_name, args.since, args.until, args.fmt, options))
            if args.plot is not None:
                print(f"screener: plot written to {args.plot}", file=sys.stderr)
            return 0
        if args.command == "classify":
            from sqlalchemy.orm import Session

            from screener.core.errors import ModelError
            from screener.model.registry import active_version

            with Session(engine) as session:
                row = active_version(session)
            if row is None:
                raise ModelError(
                    "no active model: pass --model DIR or run `screener models register DIR --activate`"
                )
            return _classify(config, Path(row.path), args.files, args.json, args.heatmap)
        status = collect_status(engine, config.results.mode)
        print(json.dumps(status, indent=2) if args.json else render_status(status))
        return 0
    finally:
        engine.dispose()


def _models(engine: object, args: argparse.Namespace, config: Config) -> int:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from screener.model.registry import activate_version, list_versions, register

    assert isinstance(engine, Engine)
    with Session(engine) as session, session.begin():
        if args.models_command == "export-triton":
            from screener.model.triton_repo import export_registered

            done = export_registered(
                session,
                args.version,
                args.repo_dir,
                model_name=args.model_name or config.inference.triton.model_name,
                kind=args.kind,
                max_batch=args.max_batch or config.inference.max_batch,
                keep=args.keep,
                plan=args.plan,
                trt_cache_dir=config.inference.trt_cache_dir,
            )
            print(done.summary())
        elif args.models_command == "register":
            row = register(session, args.model_dir, activate=args.activate)
            print(f"registered {row.version} ({row.status.value}) from {row.path}")
        elif args.models_command == "activate":
            row = activate_version(session, args.version)
            print(f"active model: {row.version}")
        else:
            rows = list_versions(session)
            if not rows:
                print("no models registered: screener models register DIR --activate")
            for r in rows:
                weight = f"w={r.fusion_weight:.3f}"
                print(f"{r.version:<32} {r.status.value:<9} {r.architectures:<20} {weight} {r.path}")
    return 0


def _deliveries(engine: object, args: argparse.Namespace) -> int:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from screener.results.sender import list_deliveries, retry_deliveries

    assert isinstance(engine, Engine)
    with Session(engine) as session, session.begin():
        if args.deliveries_command == "retry":
            if not args.ids and not args.dead:
                print("screener: deliveries retry needs IDs or --dead", file=sys.stderr)
                return 2
            count = retry_deliveries(session, args.ids, args.dead, channel=args.channel)
            print(f"re-driven: {count}")
            return 0
        rows = list_deliveries(session, args.status, channel=args.channel)
        data = [
            {
                "id": r.id,
                "study_result_id": r.study_result_id,
                "channel": r.channel,
                "event": r.event,
                "destination": r.destination,
                "object": r.object_kind,
                "status": r.status.value,
                "attempts": r.attempts,
                "next_attempt_at": r.next_attempt_at.isoformat() if r.next_attempt_at else None,
                "sent_at": r.sent_at.isoformat() if r.sent_at else None,
                "last_error": r.last_error,
            }
            for r in rows
        ]
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if not data:
        print("no deliveries")
    for d in data:
        print(
            f"{d['id']:>6} {d['status']:<8} {d['channel']:<7} {d['object']:<7} {d['destination']:<40} "
            f"attempts={d['attempts']:<3} "
            f"{d['last_error'] or ''}"
        )
    return 0


def _classify(
    config: Config, model_dir: Path, files: list[Path], as_json: bool, heatmap_dir: Path | None = None
) -> int:
    from screener.inference.classify import classify_files

    version, results = classify_files(config, model_dir, files, heatmap_dir=heatmap_dir)
    if as_json:
        print(json.dumps({"model_version": version, "results": [r.as_dict() for r in results]}, indent=2))
    else:
        print(f"model {version}")
        for r in results:
            if r.status == "classified" and r.probs:
                probs = "  ".join(f"{k}={v:.3f}" for k, v in r.probs.items())
                gate = f"  novelty {r.novelty:.1f}" if r.novelty is not None else ""
                print(f"{r.path}: {r.label}  ({probs}){gate}")
            else:
                print(f"{r.path}: {r.status}: {r.reason}")
            if r.note:
                print(f"{r.path}: note: {r.note}")
            if r.heatmap:
                print(f"{r.path}: heatmap: {r.heatmap}")
    return 0 if all(r.status != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""``screener``: serve, db upgrade|current, status, config."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from screener import __version__
from screener.config import Config, as_dict, load_config, resolve_config_path
from screener.errors import ConfigError, ScreenerError


def add_config_option(parser: argparse.ArgumentParser, top: bool) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None if top else argparse.SUPPRESS,
        help="settings file (default: $SCREENER_CONFIG, else ./config.toml, else built-in defaults)",
    )


def load_from_args(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(args.config, os.environ))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="screener", description="CXR Screener: chest X-ray screening daemon"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_config_option(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the DICOM listener until SIGTERM/SIGINT")
    add_config_option(p, top=False)

    p = sub.add_parser("db", help="database schema")
    add_config_option(p, top=False)
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    add_config_option(
        dbsub.add_parser("upgrade", help="migrate the database to the newest revision"), top=False
    )
    add_config_option(
        dbsub.add_parser("current", help="print the database revision and the newest one"), top=False
    )

    p = sub.add_parser("status", help="counts of instances by status and of studies")
    add_config_option(p, top=False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("config", help="print the effective settings (file + environment overrides) as JSON")
    add_config_option(p, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_from_args(args)
    except ConfigError as exc:
        print(f"screener: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, config)
    except ScreenerError as exc:
        print(f"screener: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, config: Config) -> int:
    from screener.logs import configure_logging

    if args.command == "config":
        print(json.dumps(as_dict(config), indent=2))
        return 0
    configure_logging(config.logging)
    if args.command == "serve":
        from screener.app import serve

        return serve(config)

    from screener.db.migrate import current_revision, ensure_at_head, head_revision, upgrade
    from screener.db.session import make_engine

    engine = make_engine(config.database)
    try:
        if args.command == "db" and args.db_command == "upgrade":
            upgrade(engine)
            print(f"database at revision {current_revision(engine)}")
            return 0
        if args.command == "db":
            print(f"current: {current_revision(engine) or '<empty>'}\nhead:    {head_revision()}")
            return 0
        from screener.status import collect_status, render_status

        ensure_at_head(engine, auto_migrate=False)
        status = collect_status(engine)
        print(json.dumps(status, indent=2) if args.json else render_status(status))
        return 0
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())

"""``trainer``: offline training and model management. Subcommands arrive with the trainer issue."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from screener import __version__
from screener.cli import add_config_option, load_from_args
from screener.config import as_dict
from screener.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="CXR Screener trainer")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_config_option(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("config", help="print the effective settings the trainer would use, as JSON")
    add_config_option(p, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_from_args(args)
    except ConfigError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(json.dumps(as_dict(config), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

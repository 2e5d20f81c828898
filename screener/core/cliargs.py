"""The ``--config`` option shared by the ``screener`` and ``trainer`` command lines."""

from __future__ import annotations

import argparse
import os
import sys

from screener.core.config import Config, load_config, resolve_config_path


def add_config_option(parser: argparse.ArgumentParser, top: bool) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None if top else argparse.SUPPRESS,
        help="settings file (default: $SCREENER_CONFIG, else ./config.toml, else built-in defaults)",
    )


def load_from_args(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(args.config, os.environ))


def stdout_closed() -> int:
    """What a command returns when its reader went away (``screener report | head``): point stdout at
    /dev/null so the interpreter's final flush cannot raise again, and exit 141 (128 + SIGPIPE) quietly,
    as a shell pipeline expects."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141

"""The ``--config`` option shared by the ``screener`` and ``trainer`` command lines."""

from __future__ import annotations

import argparse
import os

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

"""``trainer``: offline training and model management. Subcommands arrive with the trainer issue."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from screener import __version__
from screener.cli import add_config_option, load_from_args
from screener.config import as_dict
from screener.errors import ConfigError, ModelError
from screener.modelcard import CARD_FILE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="CXR Screener trainer")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_config_option(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("config", help="print the effective settings the trainer would use, as JSON")
    add_config_option(p, top=False)

    p = sub.add_parser(
        "init-model",
        help="write a randomly initialised (untrained) fused model directory, for plumbing and benchmarks",
    )
    add_config_option(p, top=False)
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
    if args.command == "config":
        print(json.dumps(as_dict(config), indent=2))
    elif args.command == "init-model":
        return _init_model(args)
    return 0


def _init_model(args: argparse.Namespace) -> int:
    from screener.export import create_random_model_dir

    try:
        card = create_random_model_dir(
            args.out,
            arch_a=args.arch_a,
            arch_b=args.arch_b,
            input_size=args.input_size,
            fusion_weight=args.fusion_weight,
            seed=args.seed,
            version=args.model_version,
        )
    except ModelError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out / CARD_FILE} version {card.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

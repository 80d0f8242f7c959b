"""`notpu`: the product's command line.

Each subcommand lives with the code it drives and registers itself here:
data commands (generate, prepare, baseline, predict, demo) in `models.cli`,
training in `runner.train_cli`. Handlers take the parsed namespace and return
an exit code; a `NotpuError` becomes a one-line message and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from pserver.errors import NotpuError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="notpu", description="Churn prediction from event logs, trained on CPUs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    from models import cli as data_cli
    from runner import train_cli

    data_cli.register(sub)
    train_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.handler(args) or 0)
    except NotpuError as exc:
        print(f"notpu {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"notpu {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

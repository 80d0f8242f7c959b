"""`notpu`: the product's command line.

Each subcommand lives with the code it drives and registers itself here:
data commands (generate, prepare, baseline, predict) in `models.cli`,
training and the demo in `runner.train_cli`. Handlers take the parsed namespace and return
an exit code; a `NotpuError` (a `models.errors.DataError` is one) becomes a one-line message and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pserver.cli import program_parser, run_command


def build_parser() -> argparse.ArgumentParser:
    parser, sub = program_parser("notpu", "Churn prediction from event logs, trained on CPUs.")
    from models import cli as data_cli
    from runner import train_cli

    data_cli.register(sub)
    train_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("notpu", build_parser().parse_args(argv))

if __name__ == "__main__":
    sys.exit(main())

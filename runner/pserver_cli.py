"""`pserver`: start a parameter server, or read its statistics (the `pserver` console script).

    pserver start --port 5555 --shards 2 --workers 4 --rule adag
    pserver keys KEYS --workers 4
    pserver stats 127.0.0.1:5555 [--json] [--keys KEYS]

The parser is `pserver.cli`'s, with the run options (--rule, --window,
--epochs, ...) from `runner.run_config`, which also hands the shards the
rules' package to import (`optimizers.SHARD_PLUGINS`, for any shard-side
apply a rule defines itself): `pserver` itself does not import the update
rules. `python -m runner.pserver_cli` is the same program.
"""
from __future__ import annotations

import sys
from typing import Sequence

from pserver.cli import build_parser as _build_parser
from pserver.cli import run_command
from runner.run_config import RuleRunOptions


def build_parser():
    return _build_parser(RuleRunOptions())


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("pserver", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""`worker`: join a parameter server and train, or watch the centre and evaluate.

    worker start --ps HOST:PORT --data DIR [--threads T] [--keys DIR [--key NAME]]
    worker evaluate --ps HOST:PORT --data DIR --out RUN [--target-auc A] [--keys DIR [--key NAME]]

Thread counts are set before TensorFlow is imported.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from models.errors import DataError
from pserver.cli import run_command
from pserver.errors import NotpuError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worker", description="a notpu training worker")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="join the parameter server at --ps and train on this host")
    s.add_argument("--ps", required=True, help="the coordinator's host:port")
    s.add_argument("--data", required=True, help="a prepared DIR (X.npy, y.npy, ...) on this host")
    s.add_argument("--threads", type=int, default=0, help="TensorFlow threads (default: all cores)")
    s.add_argument("--name", default="", help="shown in `pserver stats` (default host:pid)")
    s.add_argument("--rank", type=int, default=-1, help="rejoin with this rank after a restart")
    s.add_argument("--keys", default=None, help="CurveZMQ keys DIR (see `pserver keys`)")
    s.add_argument("--key", default=None, metavar="NAME",
                   help="use the key pair NAME (workers/NAME.key_secret) in --keys (default: the only or first one)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(handler=cmd_start)

    e = sub.add_parser("evaluate", help="pull the centre every few seconds, log val AUC, save the final model")
    e.add_argument("--ps", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--out", required=True, help="RUN directory for history.jsonl, model.keras, summary.json")
    e.add_argument("--interval-s", type=float, default=3.0)
    e.add_argument("--target-auc", type=float, default=None, help="stop the run when val AUC reaches this")
    e.add_argument("--started-at", type=float, default=None, help=argparse.SUPPRESS)
    e.add_argument("--finish-file", default=None, help=argparse.SUPPRESS)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--keys", default=None, help="CurveZMQ keys DIR (see `pserver keys`)")
    e.add_argument("--key", default=None, metavar="NAME", help="the key pair NAME in --keys (default: the first one)")
    e.set_defaults(handler=cmd_evaluate)
    return parser


def cmd_start(args: argparse.Namespace) -> int:
    from runner.worker import WorkerConfig, configure_threads

    threads = args.threads or os.cpu_count() or 1
    configure_threads(threads)
    from runner.worker import run_worker

    name = args.name or f"{os.uname().nodename}:{os.getpid()}"
    report = run_worker(WorkerConfig(ps=args.ps, data_dir=args.data, threads=threads, name=name, rank=args.rank,
                                     keys_dir=args.keys, key_name=args.key, seed=args.seed))
    print(json.dumps(report), flush=True)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from runner.worker import configure_threads

    configure_threads(args.threads)
    from runner.evaluator import Evaluator, EvaluatorConfig

    summary = Evaluator(EvaluatorConfig(ps=args.ps, data_dir=args.data, out_dir=args.out, interval_s=args.interval_s,
                                        target_auc=args.target_auc, started_at=args.started_at,
                                        finish_file=args.finish_file, keys_dir=args.keys,
                                        key_name=args.key)).run_until_done()
    print(f"val AUC {summary['val_auc']:.4f}, test AUC {summary['test_auc']:.4f} -> {args.out}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("worker", args, f"%(asctime)s %(levelname)s {args.command}[{os.getpid()}] %(name)s: %(message)s",
                       expected=(NotpuError, DataError))

if __name__ == "__main__":
    sys.exit(main())

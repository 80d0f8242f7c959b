"""`worker`: join a parameter server and train, or watch the centre and evaluate.

    worker start --ps HOST:PORT --data DIR [--threads T] [--keys KEYS [--key NAME]]
    worker evaluate --ps HOST:PORT --data DIR --out RUN [--target-auc A] [--keys KEYS [--key NAME]]
    worker start --config-json '{"ps": ..., "data_dir": ...}'   (a WorkerConfig; how notpu train starts them)

Thread counts are set before TensorFlow is imported.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Sequence

from pserver import precision
from pserver.cli import program_parser, run_command
from pserver.errors import ConfigError
from pserver.server import config_from_json
from runner.callbacks import MONITORS
from runner.evaluator import EvaluatorConfig  # neither imports TensorFlow: configure_threads still comes first
from runner.worker import WorkerConfig, configure_threads


def build_parser() -> argparse.ArgumentParser:
    w, e = WorkerConfig, EvaluatorConfig  # every default is the field's
    parser, sub = program_parser("worker", "a notpu training worker")
    s = sub.add_parser("start", help="join the parameter server at --ps and train on this host")
    s.add_argument("--ps", metavar="HOST:PORT", help="the coordinator's address (required)")
    s.add_argument("--data", metavar="DIR", help="a prepared DIR (X.npy, y.npy, ...) on this host (required)")
    # 0: all cores, for a person starting one worker per host; `WorkerConfig.threads` (1) is for programs,
    # which pass cores / workers (notpu train).
    s.add_argument("--threads", type=int, default=0, help="TensorFlow threads (default: all cores)")
    s.add_argument("--name", default=w.name, help="shown in `pserver stats` (default: host:pid)")
    s.add_argument("--rank", type=int, default=w.rank, help="rejoin with this rank after a restart; -1: the next free one")
    s.add_argument("--keys", default=w.keys_dir, metavar="KEYS", help="CurveZMQ keys directory (see `pserver keys`)")
    s.add_argument("--key", default=w.key_name, metavar="NAME",
                   help="use the key pair NAME (workers/NAME.key_secret) in --keys (default: the only or first one)")
    s.add_argument("--seed", type=int, default=w.seed, help="the worker's shuffling and the model's first weights")
    s.add_argument("--server-wait-s", type=float, default=w.server_wait_s,
                   help="how long to wait for a lost server to come back (pserver start --restore) before giving up")
    s.add_argument("--wire", default=w.wire, choices=list(precision.WIRE),
                   help="precision of pushes and pulls to shards on other hosts, with error feedback")
    s.add_argument("--config-json", default=None, metavar="JSON",
                   help="the whole WorkerConfig as one JSON object, instead of the other options (notpu train)")
    s.set_defaults(handler=cmd_start, sub_parser=s)

    v = sub.add_parser("evaluate", help="pull the centre every few seconds, log val AUC, save the final model")
    v.add_argument("--ps", metavar="HOST:PORT", help="the coordinator's address (required)")
    v.add_argument("--data", metavar="DIR", help="a prepared DIR (required)")
    v.add_argument("--out", metavar="RUN", help="RUN directory for history.jsonl, model.keras, summary.json (required)")
    v.add_argument("--eval-interval-s", type=float, default=e.interval_s,
                   help="seconds between evaluations of the centre on the validation split")
    v.add_argument("--target-auc", type=float, default=e.target_auc, help="stop the run when val AUC reaches this")
    v.add_argument("--started-at", type=float, default=e.started_at, help=argparse.SUPPRESS)
    v.add_argument("--finish-file", default=e.finish_file, help=argparse.SUPPRESS)
    v.add_argument("--early-stopping-patience", type=int, default=e.early_stopping_patience, metavar="N",
                   help="stop the run after N evaluations without improvement of --monitor")
    v.add_argument("--monitor", default=e.monitor, choices=sorted(MONITORS),
                   help="what an evaluation is judged by: the best one is kept, and early stopping watches it")
    v.add_argument("--min-delta", type=float, default=e.min_delta,
                   help="an improvement must exceed this to reset the patience")
    v.add_argument("--restore-best", action=argparse.BooleanOptionalAction, default=e.restore_best,
                   help="model.keras and the test scores from the evaluation with the best --monitor "
                        "; --no-restore-best: from the last centre of the run")
    v.add_argument("--tensorboard", default=e.tensorboard, metavar="LOGDIR",
                   help="TensorBoard scalars per evaluation, to LOGDIR")
    v.add_argument("--threads", type=int, default=EVALUATOR_THREADS, help="TensorFlow threads")
    v.add_argument("--server-wait-s", type=float, default=e.server_wait_s,
                   help="how long to wait for a lost server to come back (pserver start --restore) before giving up")
    v.add_argument("--keys", default=e.keys_dir, metavar="KEYS", help="CurveZMQ keys directory (see `pserver keys`)")
    v.add_argument("--key", default=e.key_name, metavar="NAME",
                   help="the key pair NAME in --keys (default: the only or first one)")
    v.add_argument("--config-json", default=None, metavar="JSON",
                   help="the whole EvaluatorConfig as one JSON object, instead of the other options (notpu train)")
    v.set_defaults(handler=cmd_evaluate, sub_parser=v)
    return parser


#: The evaluator scores a small validation split between the workers' steps: one thread leaves them the cores.
EVALUATOR_THREADS = 1

_NOT_OPTIONS = {"command", "verbose", "handler", "sub_parser", "config_json"}


def _from_options(args: argparse.Namespace, cls, allowed: tuple[str, ...] = (), **values):
    """`cls` from --config-json, or from the options (`values`); --config-json allows no other option but `allowed`."""
    if args.config_json is None:
        missing = [k for k in ("ps", "data", "out") if k in vars(args) and getattr(args, k) is None]
        if missing:
            raise ConfigError(f"{', '.join('--' + m for m in missing)} required (or --config-json)")
        return cls(**values)
    given = sorted(k for k, v in vars(args).items()
                   if k not in _NOT_OPTIONS and k not in allowed and v != args.sub_parser.get_default(k))
    if given:
        flags = ", ".join("--" + g.replace("_", "-") for g in given)
        raise ConfigError(f"--config-json is the whole configuration; drop {flags}")
    return config_from_json(cls, args.config_json)


def cmd_start(args: argparse.Namespace) -> int:
    cfg = _from_options(args, WorkerConfig, ps=args.ps, data_dir=args.data, threads=args.threads, name=args.name,
                        rank=args.rank, keys_dir=args.keys, key_name=args.key, seed=args.seed,
                        server_wait_s=args.server_wait_s, wire=args.wire)
    threads = cfg.threads or os.cpu_count() or 1
    configure_threads(threads)
    from runner.worker import run_worker

    name = cfg.name or f"{os.uname().nodename}:{os.getpid()}"
    report = run_worker(replace(cfg, threads=threads, name=name))
    print(json.dumps(report), flush=True)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _from_options(args, EvaluatorConfig, allowed=("threads",), ps=args.ps, data_dir=args.data, out_dir=args.out,
                        interval_s=args.eval_interval_s, target_auc=args.target_auc, started_at=args.started_at,
                        finish_file=args.finish_file, keys_dir=args.keys, key_name=args.key,
                        early_stopping_patience=args.early_stopping_patience, monitor=args.monitor,
                        min_delta=args.min_delta, restore_best=args.restore_best, tensorboard=args.tensorboard,
                        server_wait_s=args.server_wait_s)
    configure_threads(args.threads)
    from runner.evaluator import Evaluator

    summary = Evaluator(cfg).run_until_done()
    print(f"val AUC {summary['val_auc']:.4f}, test AUC {summary['test_auc']:.4f} -> {cfg.out_dir}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("worker", args, f"%(asctime)s %(levelname)s {args.command}[{os.getpid()}] %(name)s: %(message)s")

if __name__ == "__main__":
    sys.exit(main())

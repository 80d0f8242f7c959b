"""`notpu train` (local multiprocess training, see runner.local; on Spark, runner.spark) and `notpu demo` (the whole path, see runner.demo)."""
from __future__ import annotations

import argparse

from pserver import precision
from runner.callbacks import MONITORS
from runner.local import TrainConfig
from runner.run_config import add_run_options


def register(sub: argparse._SubParsersAction) -> None:
    d = TrainConfig  # every default is the field's (runner.local imports no TensorFlow)
    t = sub.add_parser("train", help="train the GRU on one machine with N workers and a sharded parameter server")
    t.add_argument("dir", help="a prepared DIR (from `notpu prepare`)")
    t.add_argument("--out", required=True, help="RUN directory: model.keras, history.jsonl, summary.json, test_scores.csv")
    t.add_argument("--workers", type=int, default=d.workers, help=f"default {d.workers}")
    t.add_argument("--shards", type=int, default=d.shards, help=f"default {d.shards}")
    t.add_argument("--engine", choices=("local", "spark"), default=d.engine,
                   help="where the workers run: child processes of this one (local), or Spark tasks (spark: the "
                        f"server and the evaluator stay on this host, the driver; default {d.engine})")
    t.add_argument("--master", default=d.master, metavar="URL",
                   help="--engine spark: the Spark master (default: spark-submit's, else local[WORKERS,4])")
    add_run_options(t)
    t.add_argument("--model", default=d.model, metavar="MODULE:FUNCTION",
                   help="your own Keras model: FUNCTION(steps, features) in MODULE returns it compiled "
                        "(default: the GRU of width --hidden)")
    t.add_argument("--early-stopping-patience", type=int, default=d.early_stopping_patience, metavar="N",
                   help="stop after N evaluations without improvement of --monitor")
    t.add_argument("--keep-last", dest="restore_best", action="store_false", default=d.restore_best,
                   help="model.keras and the test scores from the last centre of the run (default: from the "
                        "evaluation with the best --monitor)")
    t.add_argument("--monitor", default=d.monitor, choices=sorted(MONITORS), help=f"default {d.monitor}")
    t.add_argument("--min-delta", type=float, default=d.min_delta,
                   help=f"an improvement must exceed this to reset the patience (default {d.min_delta:g})")
    t.add_argument("--tensorboard", default=d.tensorboard, metavar="DIR",
                   help="write val AUC, val loss, samples/s, mean staleness and refused updates per evaluation as "
                        "TensorBoard scalars to DIR")
    t.add_argument("--threads", type=int, default=d.threads,
                   help="TensorFlow threads per worker (default cores/workers)")
    t.add_argument("--target-auc", type=float, default=d.target_auc, help="stop when val AUC reaches this")
    t.add_argument("--eval-interval-s", type=float, default=d.eval_interval_s, help=f"default {d.eval_interval_s:g}")
    t.add_argument("--round-timeout-s", type=float, default=d.round_timeout_s,
                   help=f"a synchronous round closes without a dead worker after this (default {d.round_timeout_s:g})")
    t.add_argument("--worker-timeout-s", type=float, default=d.worker_timeout_s,
                   help="a worker silent this long is declared lost; on Spark, a retried task then takes its rank "
                        f"back (default {d.worker_timeout_s:g})")
    t.add_argument("--checkpoint-every-s", type=float, default=d.checkpoint_every_s,
                   help="shards checkpoint to RUN/checkpoints this often; a shard that dies is restarted from its "
                        f"checkpoint and the run goes on (0: no checkpoints; default {d.checkpoint_every_s:g})")
    t.add_argument("--wire", default=d.wire, choices=list(precision.WIRE),
                   help="precision of pushes and pulls between hosts (--engine spark), with error feedback; workers "
                        f"on the server's host use shared memory (default {d.wire})")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(handler=cmd_train)

    from runner.demo import DemoConfig as m  # its defaults

    d = sub.add_parser("demo", help="generate, prepare, baseline, train and report, in a few minutes")
    d.add_argument("--out", default=m.out, help=f"default {m.out}")
    d.add_argument("--players", type=int, default=m.players, help=f"default {m.players}")
    d.add_argument("--seed", type=int, default=m.seed)
    d.add_argument("--epochs", type=int, default=m.epochs, help=f"default {m.epochs}")
    d.add_argument("--hidden", type=int, default=m.hidden, help=f"default {m.hidden}")
    d.set_defaults(handler=cmd_demo)


def cmd_train(args: argparse.Namespace) -> int:
    from pserver.errors import ConfigError

    if args.master is not None and args.engine != "spark":
        raise ConfigError("--master is the Spark master URL; add --engine spark")
    config = TrainConfig(
        data_dir=args.dir, out_dir=args.out, workers=args.workers, rule=args.rule, window=args.window,
        alpha=args.alpha, epochs=args.epochs, batch_size=args.batch_size, hidden=args.hidden,
        learning_rate=args.learning_rate, overlap=args.overlap, wire=args.wire, shards=args.shards, target_auc=args.target_auc, threads=args.threads,
        eval_interval_s=args.eval_interval_s, round_timeout_s=args.round_timeout_s,
        worker_timeout_s=args.worker_timeout_s, checkpoint_every_s=args.checkpoint_every_s, progress=not args.no_progress, seed=args.seed, model=args.model,
        early_stopping_patience=args.early_stopping_patience, monitor=args.monitor, min_delta=args.min_delta,
        restore_best=args.restore_best, tensorboard=args.tensorboard, engine=args.engine,
        master=args.master)
    if config.engine == "spark":
        from runner.spark import train_with_session

        summary = train_with_session(config)
    else:
        from runner.local import train

        summary = train(config)
    lost = f", lost worker(s) {summary['lost_workers']}" if summary["lost_workers"] else ""
    print(f"{summary['rule']} × {summary['workers']}: test AUC {summary['test_auc']:.4f} (val {summary['val_auc']:.4f}), "
          f"{summary['samples_per_s']:.0f} samples/s, {summary['wall_s']:.0f} s, mean staleness "
          f"{summary['staleness']['mean']:.2f}{lost} -> {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from runner.demo import DemoConfig, demo

    return demo(DemoConfig(out=args.out, players=args.players, seed=args.seed, epochs=args.epochs, hidden=args.hidden))

"""`notpu train` (local multiprocess training, see runner.local; on Spark, runner.spark) and `notpu demo` (the whole path, see runner.demo)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pserver import precision
from runner.callbacks import MONITORS
from runner.train_config import TrainConfig
from runner.run_config import add_run_options


def register(sub: argparse._SubParsersAction) -> None:
    d = TrainConfig  # every default is the field's (runner.train_config imports no TensorFlow)
    t = sub.add_parser("train", help="train the GRU on one machine with N workers and a sharded parameter server")
    data = t.add_argument_group("data", "what the workers read, how often and in what order")
    model = t.add_argument_group("model")
    rule = t.add_argument_group("rule", "how the workers' updates reach the centre")
    engine = t.add_argument_group("engine", "where the workers, shards and threads run")
    fault = t.add_argument_group("fault tolerance", "when a worker or shard is declared lost, and what survives it")
    output = t.add_argument_group("output", "what RUN receives, and when the run stops")

    data.add_argument("dir", metavar="DIR", help="a prepared DIR (from `notpu prepare`)")
    add_run_options(rule, data=data, model=model)
    data.add_argument("--seed", type=int, default=d.seed, help="the workers' shuffling and the model's first weights")

    model.add_argument("--model", default=d.model, metavar="MODULE:FUNCTION",
                       help="your own Keras model: FUNCTION(steps, features) in MODULE returns it compiled "
                            "(default: the GRU of width --hidden)")

    engine.add_argument("--engine", choices=("local", "spark"), default=d.engine,
                        help="where the workers run; local: child processes of this one; spark: Spark tasks, with the "
                             "server and the evaluator on this host, the driver")
    engine.add_argument("--master", default=d.master, metavar="URL",
                        help="--engine spark: the Spark master (default: spark-submit's, else local[WORKERS,4])")
    engine.add_argument("--workers", type=int, default=d.workers, help="training processes, or Spark tasks")
    engine.add_argument("--shards", type=int, default=d.shards, help="parameter server shard processes")
    engine.add_argument("--threads", type=int, default=d.threads,
                        help="TensorFlow threads per worker (default: cores / workers)")
    engine.add_argument("--wire", default=d.wire, choices=list(precision.WIRE),
                        help="precision of pushes and pulls between hosts (--engine spark), with error feedback; "
                             "workers on the server's host use shared memory")

    fault.add_argument("--round-timeout-s", type=float, default=d.round_timeout_s,
                       help="a synchronous round closes without a dead worker after this")
    fault.add_argument("--worker-timeout-s", type=float, default=d.worker_timeout_s,
                       help="a worker silent this long is declared lost; on Spark, a retried task then takes its "
                            "rank back")
    fault.add_argument("--checkpoint-every-s", type=float, default=d.checkpoint_every_s,
                       help="shards checkpoint to RUN/checkpoints this often; a shard that dies is restarted from "
                            "its checkpoint and the run goes on; 0: no checkpoints")
    fault.add_argument("--max-delta-norm", type=float, default=d.max_delta_norm,
                       help="refuse a push whose update norm (per shard) exceeds this; our runs push norms below 1; "
                            "0: no limit")

    output.add_argument("--out", required=True, metavar="RUN",
                        help="RUN directory: model.keras, history.jsonl, summary.json, test_scores.csv")
    output.add_argument("--overwrite", action="store_true", default=d.overwrite,
                        help="write into an --out directory that holds other files; without it RUN must be absent, "
                             "empty or a previous run")
    output.add_argument("--eval-interval-s", type=float, default=d.eval_interval_s,
                        help="seconds between evaluations of the centre on the validation split")
    output.add_argument("--monitor", default=d.monitor, choices=sorted(MONITORS),
                        help="what an evaluation is judged by: the best one is kept, and early stopping watches it")
    output.add_argument("--restore-best", action=argparse.BooleanOptionalAction, default=d.restore_best,
                        help="model.keras and the test scores from the evaluation with the best --monitor "
                             "; --no-restore-best: from the last centre of the run")
    output.add_argument("--early-stopping-patience", type=int, default=d.early_stopping_patience, metavar="N",
                        help="stop after N evaluations without improvement of --monitor")
    output.add_argument("--min-delta", type=float, default=d.min_delta,
                        help="an improvement must exceed this to reset the patience")
    output.add_argument("--target-auc", type=float, default=d.target_auc, help="stop when val AUC reaches this")
    output.add_argument("--tensorboard", default=d.tensorboard, metavar="LOGDIR",
                        help="write val AUC, val loss, samples/s, mean staleness and refused updates per "
                             "evaluation as TensorBoard scalars to LOGDIR")
    output.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
                        help="a progress bar on the terminal")
    t.set_defaults(handler=cmd_train)

    from runner.demo import DemoConfig as m  # its defaults

    d = sub.add_parser("demo", help="generate, prepare, baseline, train and report, in a few minutes")
    d.add_argument("--out", default=m.out, metavar="DEMO",
                   help="directory for the events, the prepared data, the run and the report")
    d.add_argument("--players", type=int, default=m.players, help="players in the generated log")
    d.add_argument("--seed", type=int, default=m.seed, help="the log's, and so the whole demo's")
    d.add_argument("--epochs", type=int, default=m.epochs, help="passes over each worker's part of the data")
    d.add_argument("--hidden", type=int, default=m.hidden, help="GRU width")
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
        worker_timeout_s=args.worker_timeout_s, checkpoint_every_s=args.checkpoint_every_s,
        max_delta_norm=args.max_delta_norm, progress=args.progress, seed=args.seed, model=args.model,
        overwrite=args.overwrite,
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
          f"{summary['staleness']['mean']:.2f}{lost}")
    print(f"wrote {args.out}: {', '.join(written(Path(args.out)))}")
    return 0


#: What a finished run writes in --out, in the order a person reads them.
RUN_FILES = ("model.keras", "test_scores.csv", "history.jsonl", "summary.json", "report.png", "logs/")


def written(out: Path) -> list[str]:
    """RUN_FILES that exist in `out` (report.png is missing if it could not be drawn)."""
    return [name for name in RUN_FILES if (out / name.rstrip("/")).exists()]


def cmd_demo(args: argparse.Namespace) -> int:
    from runner.demo import DemoConfig, demo

    return demo(DemoConfig(out=args.out, players=args.players, seed=args.seed, epochs=args.epochs, hidden=args.hidden))

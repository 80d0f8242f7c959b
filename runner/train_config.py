"""`notpu train`'s settings: one frozen dataclass whatever the engine, `runner.fit` and `notpu train` alike.

It lives apart from the engines (`runner.local`, `runner.spark`) because the driver they share
(`runner.launcher.run`) is typed on it. Importing it imports no TensorFlow.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pserver.server import ServerConfig
from runner.callbacks import CallbackSettings
from runner.evaluator import EvaluatorConfig
from runner.run_config import RunConfig
from runner.worker import WorkerConfig


@dataclass(frozen=True)
class TrainConfig:
    """`notpu train`'s configuration; its options default to these fields. The run's own settings (rule to
    hidden) default to `RunConfig`'s, the server's to `ServerConfig`'s, each defined once there."""

    data_dir: str
    out_dir: str
    workers: int = 2  # two processes share a laptop's cores and show the parameter server at work
    rule: str = RunConfig.rule
    window: int | None = RunConfig.window  # λ; None: the rule's default
    alpha: float | None = RunConfig.alpha
    epochs: int = RunConfig.epochs
    batch_size: int = RunConfig.batch_size
    hidden: int = RunConfig.hidden
    learning_rate: float | None = RunConfig.learning_rate  # what one plain Keras process would use
    overlap: bool = RunConfig.overlap  # asynchronous rules: exchange beside the next window's steps
    # Workers' pushes and pulls over TCP in float16 or bfloat16 (pserver.precision); a worker beside a shard
    # (every worker in local mode) exchanges through shared memory, in float32.
    wire: str = "float32"
    shards: int = ServerConfig.shards
    target_auc: float | None = None
    threads: int | None = None  # per worker; None: cores // workers (at least 1)
    eval_interval_s: float = EvaluatorConfig.interval_s
    round_timeout_s: float = ServerConfig.round_timeout_s  # a synchronous round closes without a dead worker after this
    # A worker silent this long is declared lost. `pserver start` never declares one lost (ServerConfig: 0, a
    # worker on another host may be restarted by hand); here the driver sees its workers die, and the run goes on.
    worker_timeout_s: float = 30.0
    startup_timeout_s: float = 60.0
    finish_timeout_s: float = 300.0  # after the last worker exits, how long the evaluator may take
    checkpoint_every_s: float = ServerConfig.checkpoint_every_s  # shards checkpoint to RUN/checkpoints. 0: off
    # A push whose update norm (per shard slice) exceeds this is refused (too_large): a guard against one
    # exploding worker, on by default here (`pserver start` leaves it off). 1000 is over a thousand times the
    # largest norm any rule pushed in our runs (bench/RESULTS.md, "Why the defaults are what they are"); 0: off.
    max_delta_norm: float = 1000.0
    progress: bool = True
    # RUN may be absent, empty or a previous run; any other directory is written into only when this is set,
    # so a typo in --out cannot mix a run's files (and its clean-up) into a directory of other files.
    overwrite: bool = False
    seed: int = WorkerConfig.seed
    # Where the workers run: "local" (child processes, runner.local) or "spark" (tasks, runner.spark); `master` is
    # the Spark master URL `notpu train --engine spark` starts its session with (None: spark-submit's, else local[N]).
    engine: str = "local"
    master: str | None = None
    # Your own model: `--model package.module:build`, called as build(steps, features) (runner.keras_model), or
    # what runner.api.fit describes from a model object: the architecture JSON, compile config and custom modules.
    model: str | None = None
    architecture: str | None = RunConfig.architecture
    compile_config: dict[str, Any] | None = RunConfig.compile_config
    custom_modules: tuple[str, ...] = RunConfig.custom_modules
    initial_weights: str | None = RunConfig.initial_weights
    # the evaluator's callbacks (runner.callbacks.CallbackSettings, flat; defaults defined there)
    monitor: str = CallbackSettings.monitor
    early_stopping_patience: int | None = CallbackSettings.early_stopping_patience
    min_delta: float = CallbackSettings.min_delta
    restore_best: bool = CallbackSettings.restore_best
    checkpoint: str | None = CallbackSettings.checkpoint
    checkpoint_best_only: bool = CallbackSettings.checkpoint_best_only
    checkpoint_weights_only: bool = CallbackSettings.checkpoint_weights_only
    tensorboard: str | None = CallbackSettings.tensorboard

    def run_config(self) -> RunConfig:
        return RunConfig(rule=self.rule, window=self.window, alpha=self.alpha, learning_rate=self.learning_rate,
                         epochs=self.epochs, batch_size=self.batch_size, hidden=self.hidden,
                         architecture=self.architecture, compile_config=self.compile_config,
                         custom_modules=tuple(self.custom_modules), initial_weights=self.initial_weights,
                         overlap=self.overlap)

    def callbacks(self) -> dict[str, Any]:
        """The evaluator's callback fields, checked."""
        return asdict(CallbackSettings.of(self))

"""Local multiprocess mode: `notpu train DIR --workers N` on one machine.

The driver imports no TensorFlow. It starts `pserver start` (coordinator +
shards), N `worker start` processes and one `worker evaluate` process, shows
progress from RUN/history.jsonl, and leaves no process behind: children are
stopped on success, on error, on Ctrl-C, and when the server dies. A worker
that dies does not end the run: asynchronous rules go on without it,
synchronous rounds close without it after the round timeout, and the summary
names it. Shards checkpoint to RUN/checkpoints; one that dies is restarted
from its checkpoint on the same port and the workers go on.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, IO

from models.dataset import load_dataset
from optimizers import SHARD_PLUGINS
from pserver.errors import ConfigError, NotpuError, ProcessExited, WaitTimeout
from pserver.fileio import atomic_write_json
from pserver.procs import stop_trees, wait_for_file
from pserver.server import ServerConfig
from runner.callbacks import CallbackSettings
from runner.evaluator import EvaluatorConfig
from runner.run_config import RunConfig
from runner.worker import WorkerConfig

log = logging.getLogger(__name__)


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
    progress: bool = True
    seed: int = WorkerConfig.seed
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
                         custom_modules=tuple(self.custom_modules), initial_weights=self.initial_weights)

    def callbacks(self) -> dict[str, Any]:
        """The evaluator's callback fields, checked."""
        return asdict(CallbackSettings.of(self))


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _json(config: Any) -> str:
    """A child's whole configuration (a dataclass) as one JSON document, for its --config-json."""
    return json.dumps(asdict(config))


class _Children:
    """The processes of one run, each logging to RUN/logs/NAME.log."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self._files: list[IO[bytes]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        f = open(self.log_dir / f"{name}.log", "wb")
        self._files.append(f)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.procs[name] = proc
        return proc

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(text[-lines:])

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every child, SIGKILL to what is left of their trees after `grace_s`."""
        try:
            stop_trees(self.procs.values(), grace_s=grace_s)
        finally:
            for f in self._files:
                f.close()


def _wait_ready(path: Path, server: subprocess.Popen, children: _Children, timeout_s: float) -> str:
    try:
        wait_for_file(path, timeout_s, alive=lambda: server.poll() is None)
    except ProcessExited:
        raise NotpuError(f"pserver exited with code {server.returncode} before it was ready:\n"
                         f"{children.tail('pserver')}") from None
    except WaitTimeout:
        raise NotpuError(f"pserver was not ready within {timeout_s:g} s; "
                         f"see {children.log_dir / 'pserver.log'}") from None
    return json.loads(path.read_text())["address"]


def train(config: TrainConfig) -> dict[str, Any]:
    """Run a whole local training; returns the summary also written to RUN/summary.json."""
    if config.workers < 1 or config.shards < 1:
        raise ConfigError("--workers and --shards must be at least 1")
    config.run_config().to_wire(config.workers)  # checks the rule and the options early
    callbacks = config.callbacks()
    data = load_dataset(config.data_dir)  # checks the data before any process starts
    steps, features = data.X.shape[1:]
    del data
    if config.model:  # only here does the driver import Keras: to call your build and check what it returns
        from runner.keras_model import from_builder

        spec = from_builder(config.model, steps, features, seed=config.seed)
        config = replace(config, architecture=spec.architecture, compile_config=spec.compile_config,
                         custom_modules=spec.custom_modules,
                         learning_rate=config.learning_rate if config.learning_rate is not None else spec.learning_rate)
    run_cfg = config.run_config().to_wire(config.workers)
    env = _child_env(config.custom_modules)
    out = Path(config.out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for stale in ("history.jsonl", "summary.json", ".finish", ".pserver.json"):
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a shard must never restart from another run's slice
    threads = config.threads or max((os.cpu_count() or 1) // config.workers, 1)
    started_at = time.time()
    children = _Children(out / "logs")
    ready = out / ".pserver.json"
    finish = out / ".finish"
    server_config = ServerConfig(
        port=0, shards=config.shards, workers=config.workers, run=run_cfg, round_timeout_s=config.round_timeout_s,
        worker_timeout_s=config.worker_timeout_s, ready_file=str(ready), plugins=SHARD_PLUGINS,
        **({"checkpoint_dir": str(out / "checkpoints"), "checkpoint_every_s": config.checkpoint_every_s}
           if config.checkpoint_every_s > 0 else {}))
    try:
        server = children.start("pserver", _python("pserver.cli", "start", "--config-json", server_config.to_json()),
                                env)
        address = _wait_ready(ready, server, children, config.startup_timeout_s)
        log.info("pserver at %s; starting %d worker(s) with %d thread(s) each, rule %s", address, config.workers,
                 threads, run_cfg["rule"])
        workers = [children.start(f"worker{i}", _python("runner.worker_cli", "start", "--config-json", _json(
            WorkerConfig(ps=address, data_dir=config.data_dir, threads=threads, name=f"local-{i}", seed=config.seed))),
            env) for i in range(config.workers)]
        evaluator = children.start("evaluator", _python("runner.worker_cli", "evaluate", "--config-json", _json(
            EvaluatorConfig(ps=address, data_dir=config.data_dir, out_dir=str(out), interval_s=config.eval_interval_s,
                            target_auc=config.target_auc or None, started_at=started_at, finish_file=str(finish),
                            **callbacks))), env)
        dead = _supervise(config, children, server, workers, evaluator, out, finish)
        summary = json.loads((out / "summary.json").read_text())
    finally:
        children.stop_all()
        ready.unlink(missing_ok=True)
        finish.unlink(missing_ok=True)
    names = summary.get("worker_names", {})
    lost = set(summary.get("lost_workers", []))
    lost.update(int(rank) for rank, name in names.items() if int(name.rsplit("-", 1)[-1]) in dead)
    summary["lost_workers"] = sorted(lost)
    summary["threads_per_worker"] = threads
    summary["seed"] = config.seed
    summary["wall_s"] = round(time.time() - started_at, 3)
    atomic_write_json(out / "summary.json", summary, indent=2)
    if lost:
        log.warning("the run finished without worker(s) %s", sorted(lost))
    return summary


def _child_env(custom_modules) -> dict[str, str]:
    """PYTHONPATH for the children: where this process found the run's custom modules, so they find them too."""
    if not custom_modules:
        return {}
    from runner.keras_model import module_roots

    roots = module_roots(custom_modules)
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join([*roots, *([old] if old else [])])}


def _supervise(config: TrainConfig, children: _Children, server: subprocess.Popen, workers: list[subprocess.Popen],
               evaluator: subprocess.Popen, out: Path, finish: Path) -> set[int]:
    """Wait for the evaluator to finish the run; returns the indices of workers that died."""
    bar = _progress(config)
    dead: set[int] = set()
    all_exited_at = None
    history = out / "history.jsonl"
    seen = 0
    try:
        while True:
            time.sleep(0.25)
            if history.exists():
                lines = history.read_text().splitlines()
                for line in lines[seen:]:
                    h = json.loads(line)
                    if bar is not None:
                        bar.set_postfix_str(f"val_auc={h['val_auc']:.4f} updates={h['updates']}")
                        bar.n = h["samples"]
                        bar.refresh()
                seen = len(lines)
            for i, p in enumerate(workers):
                if p.poll() not in (None, 0) and i not in dead:
                    dead.add(i)
                    log.warning("worker %d (pid %d) exited with code %s; the run goes on without it:\n%s",
                                i, p.pid, p.returncode, children.tail(f"worker{i}", 5))
            if all_exited_at is None and all(p.poll() is not None for p in workers):
                all_exited_at = time.monotonic()
                finish.touch()  # workers that never joined cannot say DONE: tell the evaluator to finish
            if evaluator.poll() is not None:
                if evaluator.returncode != 0:
                    raise NotpuError(f"the evaluator exited with code {evaluator.returncode}:\n{children.tail('evaluator')}")
                return dead
            if server.poll() is not None:
                raise NotpuError(f"pserver exited with code {server.returncode} during the run:\n{children.tail('pserver')}")
            if all_exited_at is not None and time.monotonic() - all_exited_at > config.finish_timeout_s:
                raise NotpuError(f"the evaluator did not finish within {config.finish_timeout_s:g} s of the last worker; "
                                 f"see {children.log_dir / 'evaluator.log'}")
    finally:
        if bar is not None:
            bar.close()


def _progress(config: TrainConfig):
    if not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(desc=f"{config.rule} × {config.workers}", unit=" samples", dynamic_ncols=True, file=sys.stderr)

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
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, IO

from models.dataset import load_dataset
from optimizers import RECOMMENDED_RULE, rule_config
from pserver.errors import ConfigError, NotpuError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str
    out_dir: str
    workers: int = 2
    rule: str = RECOMMENDED_RULE
    window: int | None = None  # λ; None: the rule's default
    alpha: float | None = None
    epochs: int = 3
    batch_size: int = 64
    hidden: int = 64
    learning_rate: float | None = None  # what one plain Keras process would use; None: the local optimizer's default
    shards: int = 1
    target_auc: float | None = None
    threads: int | None = None  # per worker; None: cores // workers (at least 1)
    eval_interval_s: float = 3.0
    round_timeout_s: float = 30.0  # a synchronous round closes without a dead worker after this
    worker_timeout_s: float = 30.0  # a worker silent this long is declared lost
    startup_timeout_s: float = 60.0
    finish_timeout_s: float = 300.0  # after the last worker exits, how long the evaluator may take
    checkpoint_every_s: float = 30.0  # shards checkpoint to RUN/checkpoints; a dead shard restarts from it. 0: off
    progress: bool = True
    seed: int = 0


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


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
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name, p in self.procs.items():
            try:
                p.wait(max(deadline - time.monotonic(), 0.05))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop in %.0f s; killing it", name, p.pid, grace_s)
                p.kill()
                p.wait(10)
        for f in self._files:
            f.close()


def _wait_ready(path: Path, server: subprocess.Popen, children: _Children, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            return json.loads(path.read_text())["address"]
        if server.poll() is not None:
            raise NotpuError(f"pserver exited with code {server.returncode} before it was ready:\n{children.tail('pserver')}")
        time.sleep(0.05)
    raise NotpuError(f"pserver was not ready within {timeout_s:g} s; see {children.log_dir / 'pserver.log'}")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run a whole local training; returns the summary also written to RUN/summary.json."""
    if config.workers < 1 or config.shards < 1:
        raise ConfigError("--workers and --shards must be at least 1")
    run_cfg = rule_config(config.rule, config.window, config.alpha, config.learning_rate,
                          config.workers)  # checks the rule early
    data = load_dataset(config.data_dir)  # checks the data before any process starts
    del data
    out = Path(config.out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for stale in ("history.jsonl", "summary.json", ".finish", ".pserver.json"):
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a shard must never restart from another run's slice
    checkpoints = ["--checkpoint-dir", str(out / "checkpoints"), "--checkpoint-every-s",
                   str(config.checkpoint_every_s)] if config.checkpoint_every_s > 0 else []
    overrides = [*(["--window", str(run_cfg["window"])] if run_cfg["window"] is not None else []),
                 *(["--alpha", str(run_cfg["alpha"])] if run_cfg["alpha"] is not None else []),
                 *(["--learning-rate", str(run_cfg["learning_rate"])] if run_cfg["learning_rate"] is not None else [])]
    threads = config.threads or max((os.cpu_count() or 1) // config.workers, 1)
    started_at = time.time()
    children = _Children(out / "logs")
    ready = out / ".pserver.json"
    finish = out / ".finish"
    try:
        server = children.start("pserver", _python(
            "pserver.cli", "start", "--port", "0", "--shards", str(config.shards), "--workers", str(config.workers),
            "--rule", run_cfg["rule"], *overrides,
            "--epochs", str(config.epochs), "--batch-size", str(config.batch_size), "--hidden", str(config.hidden),
            "--round-timeout-s", str(config.round_timeout_s),
            "--worker-timeout-s", str(config.worker_timeout_s), "--ready-file", str(ready), *checkpoints))
        address = _wait_ready(ready, server, children, config.startup_timeout_s)
        log.info("pserver at %s; starting %d worker(s) with %d thread(s) each, rule %s", address, config.workers,
                 threads, run_cfg["rule"])
        workers = [children.start(f"worker{i}", _python(
            "runner.worker_cli", "start", "--ps", address, "--data", config.data_dir, "--threads", str(threads),
            "--name", f"local-{i}", "--seed", str(config.seed))) for i in range(config.workers)]
        eval_args = ["--ps", address, "--data", config.data_dir, "--out", str(out), "--interval-s",
                     str(config.eval_interval_s), "--started-at", str(started_at), "--finish-file", str(finish)]
        if config.target_auc:
            eval_args += ["--target-auc", str(config.target_auc)]
        evaluator = children.start("evaluator", _python("runner.worker_cli", "evaluate", *eval_args))
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
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if lost:
        log.warning("the run finished without worker(s) %s", sorted(lost))
    return summary


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

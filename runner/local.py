"""Local multiprocess mode: `notpu train DIR --workers N` on one machine.

The driver imports no TensorFlow. It starts `pserver start` (coordinator +
shards), N `worker start` processes and one `worker evaluate` process, shows
progress from RUN/history.jsonl, and leaves no process behind: children are
stopped on success, on error, on Ctrl-C, and when the server dies. A worker
that dies does not end the run: asynchronous rules go on without it,
synchronous rounds close without it after the round timeout, and the summary
names it. Shards checkpoint to RUN/checkpoints; one that dies is restarted
from its checkpoint on the same port and the workers go on.

`LocalLauncher` is local mode's `runner.launcher.Launcher`; the driver
(`runner.launcher.run`) is the one Spark (runner.spark) shares.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from pserver.errors import ConfigError
from runner.launcher import Children, Endpoints, Launcher, WorkerExit, WorkerSpec, child_json, python, run
from runner.train_config import TrainConfig

log = logging.getLogger(__name__)


class LocalLauncher(Launcher):
    """Workers as child processes of this one, on this machine."""

    engine = "local"

    def threads(self, config: TrainConfig) -> int:
        return config.threads or max((os.cpu_count() or 1) // config.workers, 1)

    def start_workers(self, workers: list[WorkerSpec], endpoints: Endpoints, children: Children) -> None:
        self._children = children
        self._workers = {w.rank: children.start(f"worker{w.rank}", python(
            "runner.worker_cli", "start", "--config-json", child_json(w.config(endpoints.keys_dir, f"local-{w.rank}"))))
            for w in workers}
        self._ended: set[int] = set()

    def poll(self) -> list[WorkerExit]:
        ended = [WorkerExit(rank, p.returncode, f"(pid {p.pid})\n{self._children.tail(f'worker{rank}', 5)}")
                 for rank, p in self._workers.items() if rank not in self._ended and p.poll() is not None]
        self._ended.update(e.rank for e in ended)
        return ended

    def running(self) -> bool:
        return any(p.poll() is None for p in self._workers.values())


def train(config: TrainConfig) -> dict[str, Any]:
    """Run a whole local training; returns the summary also written to RUN/summary.json."""
    if config.engine != "local":
        raise ConfigError(f"runner.local.train runs --engine local, not {config.engine!r}; "
                          f"for Spark call runner.spark.train(spark, config)")
    return run(config, LocalLauncher())

"""The worker loop: a Keras model trained on one data partition, exchanging with the PS.

A worker joins the coordinator, gets its rank r of n and the run config,
trains on partition r of the training split (memory-mapped; its own part of
a DIR prepared in n parts, `training_rows`), and every λ
local steps lets the rule exchange its flat weights with the shards. The
first worker to join initialises the centre with its freshly built model.

Threads: `configure_threads` must run before TensorFlow is imported (the
`worker` command does this), so that n workers on one machine share its
cores instead of each spawning a thread per core.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.dataset import load_dataset, load_part, num_parts, split_indices
from optimizers import Effective, effective_settings, make_rule
from pserver.client import Client, ClientConfig
from pserver.errors import NotpuError, RemoteError
from pserver.layout import Layout, flatten, unflatten
from runner.run_config import RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    ps: str  # the coordinator's host:port
    data_dir: str
    threads: int = 1  # TensorFlow intra-op threads (and OMP); local mode: cores / workers
    name: str = ""
    rank: int = -1  # ask for this rank back (a restarted worker); -1: the next free one
    keys_dir: str | None = None  # CurveZMQ keys (see `pserver keys`)
    key_name: str | None = None  # which worker key pair in keys_dir; None: the only (or first) one
    heartbeat_s: float = 1.0
    seed: int = 0
    # one request's wait (a shard being restarted costs this once); retries follow
    timeout_s: float = ClientConfig.timeout_s
    retries: int = 8  # with back-off up to 5 s: over a minute and a half before a worker gives up...
    # ...unless the whole server is lost (its host, SIGKILL): a person or a service manager restarts it with
    # `pserver start --restore` on the same address, which takes minutes, and the worker waits this long for it,
    # keeping its rank and its pushes' sequence numbers (pserver.client.ClientConfig.server_wait_s). The
    # evaluator waits as long (runner.evaluator.EvaluatorConfig).
    server_wait_s: float = 300.0
    # A restarted worker asking for its rank back (a Spark task retried) waits this long for the coordinator to
    # declare the rank's previous holder lost, which it does once that one's heartbeats have stopped for the
    # server's worker timeout. 0: no wait (a rank still held is refused).
    rejoin_wait_s: float = 0.0
    # float16 or bfloat16: pushes and pulled centres travel in 16 bits to shards on other hosts, with error
    # feedback (pserver.precision); shards on this host are reached through shared memory, in float32.
    wire: str = ClientConfig.wire


def configure_threads(threads: int) -> None:
    """Before TensorFlow is imported: cap its thread pools and OpenMP's at `threads`."""
    threads = max(int(threads), 1)
    for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _apply_tf_threads(threads: int) -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(threads, 1))
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised (e.g. tests in one process): the env vars still hold
        pass


def client_curve(keys_dir: str | None, key_name: str | None = None) -> dict[str, bytes] | None:
    """CurveZMQ keys for a `Client`, or None (plain TCP) without a keys directory."""
    if not keys_dir:
        return None
    from pserver.security import client_curve as curve

    return curve(keys_dir, key_name)


class _Heartbeat(threading.Thread):
    """Tells the coordinator we are alive and how far we got; learns whether to stop early."""

    def __init__(self, cfg: WorkerConfig, rank: int) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.client = Client(cfg.ps, ClientConfig(timeout_s=5.0, retries=2),
                             curve=client_curve(cfg.keys_dir, cfg.key_name))
        self.client.rank = rank
        self.interval_s = cfg.heartbeat_s
        self.samples = 0
        self.nan_recoveries = 0
        self.stop_reason = ""
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                reply = self.client.ask({"op": "HEARTBEAT", "rank": self.client.rank, "samples": self.samples,
                                         "nan_recoveries": self.nan_recoveries})
                self.stop_reason = reply.get("stop") or ""
            except NotpuError as exc:
                log.warning("heartbeat failed: %s", exc)
        self.client.close()

    def finish(self) -> None:
        self._done.set()
        self.join(10)


def partition(train: np.ndarray, world: int, rank: int) -> tuple[np.ndarray, int]:
    """Rank r's contiguous share of the training rows, and the share size every rank trains on per epoch.

    Every rank takes the same number of steps per epoch (from the smallest
    share), so synchronous rounds line up without anyone waiting for a
    worker that has one batch more.
    """
    parts = np.array_split(train, world)
    return parts[rank], min(len(p) for p in parts)


def training_share(data_dir: str, world: int) -> int:
    """The training rows every rank trains on per epoch (the smallest rank's share), as `training_rows` gives it.

    On a DIR in as many parts as there are workers it is the smallest part's training rows, not a share of the
    whole DIR's: the evaluator calls this too, so summary.json reports the steps and λ the workers used.
    """
    if world > 1 and num_parts(data_dir) == world:
        return min(len(load_part(data_dir, k).split().train) for k in range(world))
    return partition(split_indices(len(load_dataset(data_dir).y)).train, world, 0)[1]


def run_settings(run: dict[str, Any], world: int, share: int) -> Effective:
    """Steps per epoch (``share`` rows in batches) and the settings they imply (λ, α, rate): the one place
    they are computed, by every worker and by the evaluator from the same inputs."""
    spe = max(math.ceil(share / int(RunConfig.with_defaults(run)["batch_size"])), 1)
    return effective_settings(run, world, spe)


def training_rows(data_dir: str, world: int, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(X, y, rank r's training rows into X, the rows every rank trains on per epoch).

    A DIR written in as many parts as there are workers (`notpu prepare --engine spark`) gives rank r its own
    part, and no other part's arrays are read (memory maps: only their headers, for the shortest share);
    otherwise rank r takes `partition` r of the whole DIR's training rows. Either way the rows are the
    whole DIR's `split_indices` training rows.
    """
    if world > 1 and num_parts(data_dir) == world:
        part = load_part(data_dir, rank)
        log.info("rank %d reads only part %d of %d of %s", rank, rank, world, data_dir)
        return part.X, part.y, part.split().train, training_share(data_dir, world)
    data = load_dataset(data_dir)
    mine, share = partition(split_indices(len(data.y)).train, world, rank)
    return data.X, data.y, mine, share


def _reset_optimizer(model) -> None:
    """Zero the optimizer's slots (Adam's moments, momentum): after a NaN step they hold NaN too."""
    for v in model.optimizer.variables:
        v.assign(np.zeros(v.shape, dtype=v.dtype))


def run_worker(cfg: WorkerConfig) -> dict[str, Any]:
    """Join, train, report DONE. Returns this worker's report."""
    load_part(cfg.data_dir, 0)  # a missing or malformed DIR is reported before any wait for the server
    curve = client_curve(cfg.keys_dir, cfg.key_name)
    client = Client(cfg.ps, ClientConfig(timeout_s=cfg.timeout_s, retries=cfg.retries,
                                         server_wait_s=cfg.server_wait_s, wire=cfg.wire), curve=curve)
    try:
        return _run(cfg, client)
    finally:
        client.close()


def _rank_state(client: Client, rank: int) -> str:
    """"free", "done", "lost" or "running": what the coordinator knows of `rank`."""
    w = client.stats()["coordinator"]["workers"].get(str(rank))
    return "free" if w is None else "done" if w["done"] else "lost" if w["lost"] else "running"


def _wait_for_rank(client: Client, rank: int, timeout_s: float, poll_s: float = 0.5) -> str:
    """Wait until `rank` is free or its holder was declared lost (or is done); returns that state."""
    deadline = time.monotonic() + timeout_s
    while (state := _rank_state(client, rank)) == "running":
        if time.monotonic() > deadline:
            raise NotpuError(f"rank {rank} is still held at {client.address} after {timeout_s:g} s: its previous "
                             f"worker still sends heartbeats, or the server's --worker-timeout-s is longer than "
                             f"rejoin_wait_s")
        time.sleep(poll_s)
    return state


def _run(cfg: WorkerConfig, client: Client) -> dict[str, Any]:
    if cfg.rank >= 0 and cfg.rejoin_wait_s > 0:
        state = _wait_for_rank(client, cfg.rank, cfg.rejoin_wait_s)
        if state == "done":  # a restart after the work was done (the task died reporting it): nothing left to do
            log.info("rank %d is already done; not training again", cfg.rank)
            return {"rank": cfg.rank, "already_done": True}
        if state == "lost":
            log.info("rank %d was declared lost; taking it back", cfg.rank)
    info = client.join(cfg.name, cfg.rank)
    rank, world = client.rank, client.world
    # Heartbeats start at once: importing TensorFlow and building the model can take longer than the
    # server's --worker-timeout-s on a busy machine, and a worker declared lost then is left out of every round.
    beat = _Heartbeat(cfg, rank)
    beat.start()
    run = RunConfig.with_defaults(info["config"])  # a hand-written --run-json may leave keys out
    X, y, mine, share = training_rows(cfg.data_dir, world, rank)  # (customers, days, features), (customers,)
    batch_size = int(run["batch_size"])
    eff = run_settings(run, world, share)  # every rank takes as many steps: synchronous rounds line up
    spe = eff.steps_per_epoch
    window = eff.window
    epochs = int(run["epochs"])
    log.info("worker %d of %d: %d rows, %d steps/epoch, rule %s, λ=%d, α=%g, %s at %g, wire %s%s", rank, world,
             len(mine), spe, eff.rule, window, eff.alpha, eff.local_optimizer, eff.learning_rate, cfg.wire,
             ", overlapped" if run.get("overlap") else "")

    _apply_tf_threads(cfg.threads)
    import keras

    from models.gru import ModelConfig, build_model, compile_model
    from models.outputs import targets
    from runner.keras_model import build_for_run, run_kind

    optimizer, lr = eff.local_optimizer, eff.learning_rate
    kind = run_kind(run)  # how the labels are fed: the GRU's one-hot, or what the run's own model's loss wants
    if run.get("architecture"):  # the user's own model (runner.keras_model)
        model = build_for_run(run, optimizer, lr, seed=cfg.seed)
    elif info.get("architecture"):
        model = keras.models.model_from_json(info["architecture"])
        compile_model(model, optimizer, lr)
    else:
        model = build_model(ModelConfig(days=X.shape[1], features=X.shape[2], hidden=int(run["hidden"]),
                                        learning_rate=lr, optimizer=optimizer, seed=cfg.seed))
    weights = model.get_weights()
    layout = Layout.of(weights, [w.path for w in model.weights])
    first = client.init(flatten(weights), layout, model.to_json())
    log.info("worker %d %s the centre (%d floats)", rank, "initialised" if first else "joined", layout.total)

    # round_timeout_s: the client's default, the server's round timeout (learned at join) and one request's more
    rule = make_rule(eff.rule, client, window=window, alpha=eff.alpha, overlap=bool(run.get("overlap")))
    w = rule.start(flatten(weights))
    model.set_weights(unflatten(w, layout))

    rng = np.random.default_rng(cfg.seed * 1_000 + rank)
    samples = steps = nan_recoveries = 0
    losses: list[float] = []
    t0 = time.monotonic()
    stop_reason = ""
    try:
        for epoch in range(epochs):
            order = rng.permutation(len(mine))
            for s in range(spe):
                take = order[np.arange(s * batch_size, (s + 1) * batch_size) % len(order)]
                rows = np.sort(mine[take])  # sorted: the memory map reads forward
                xb = np.asarray(X[rows], dtype=np.float32)  # (batch, days, features)
                # return_dict: a model compiled with metrics returns [loss, *metrics]; the loss is what we need
                loss = float(model.train_on_batch(xb, targets(y[rows], kind), return_dict=True)["loss"])
                samples += len(rows)
                steps += 1
                beat.samples = samples
                if not math.isfinite(loss):
                    # a local explosion must not reach the centre: start again from it, with fresh optimizer state
                    nan_recoveries += 1
                    beat.nan_recoveries = nan_recoveries
                    log.warning("worker %d: local loss %s at step %d; pulling the centre", rank, loss, steps)
                    w = rule.recover()
                    model.set_weights(unflatten(w, layout))
                    _reset_optimizer(model)
                    continue
                losses.append(loss)
                if steps % window == 0:
                    w = rule.step(flatten(model.get_weights()))
                    model.set_weights(unflatten(w, layout))
                    if beat.stop_reason:
                        stop_reason = beat.stop_reason
                        break
            if stop_reason:
                log.info("worker %d stops early: %s", rank, stop_reason)
                break
        # the last partial window still reaches the centre; an exchange in flight lands
        rule.finish(flatten(model.get_weights()), unsent=bool(steps % window) and not stop_reason)
    finally:
        rule.close()
        beat.finish()
    elapsed = time.monotonic() - t0
    if run.get("sync"):
        client.bye()
    report = {"rank": rank, "samples": samples, "steps": steps, "exchanges": rule.exchanges,
              "wall_s": round(elapsed, 3), "samples_per_s": round(samples / max(elapsed, 1e-9), 2),
              "mean_staleness": float(np.mean(rule.staleness)) if rule.staleness else 0.0,
              "final_loss": float(np.mean(losses[-20:])) if losses else float("nan"),
              "nan_recoveries": nan_recoveries, "stopped_early": bool(stop_reason)}
    try:
        client.done(report)
    except RemoteError as exc:
        log.warning("DONE not acknowledged: %s", exc)
    log.info("worker %d done: %d samples in %.1f s (%.0f/s)", rank, samples, elapsed, report["samples_per_s"])
    return report

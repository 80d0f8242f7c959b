"""Training on Spark: `notpu train DIR --engine spark --workers N [--master URL]`, or from a notebook

    from runner.train_config import TrainConfig
    from runner.spark import predict, train
    summary = train(spark, TrainConfig(data_dir="data/", out_dir="run/", workers=4, rule="adag"))
    scores = predict(spark, "run/", "s3a://logs/new/*.parquet")    # `notpu predict --engine spark`

(the session's executors must run a Python that has notpu: `spark.pyspark.python`). Scoring is
`models.spark_predict`'s; the rest of this module is training.

The coordinator, the shards and the evaluator run on the driver, as in
local mode (runner.launcher.run); the server binds the driver's host
(`spark.driver.host`) behind CurveZMQ keys made for this run, and each
task receives only its own key pair and the server's public key. The N
workers run as Spark tasks, one per partition of an N-element RDD whose
partition index is the worker's rank; each task starts `worker start` as
a child process (thread counts set before TensorFlow is imported: the
task's `spark.task.cpus`, or --threads) and reports its exit status.

- Synchronous rules (EASGD, averaging): one barrier stage, so that all N
  start together; a cluster with fewer than N free task slots is refused
  before anything starts. A worker that dies is not restarted (a barrier
  stage would restart all N): its rounds close without it after the round
  timeout, as in local mode, and the summary names it lost.
- Asynchronous rules: plain tasks. A worker that dies fails its task and
  Spark retries it (up to `spark.task.maxFailures`; `local[N,F]` in local
  mode); the new attempt waits until the coordinator has declared the old
  one lost (the server's worker timeout) and rejoins with its rank.

Nothing is pickled into the parameter server: the model travels as Keras
JSON, the weights through the shards. The RUN directory holds what local
mode writes; a task whose host sees RUN/logs (local mode, a shared
filesystem) writes its worker's log there as workerK.log, otherwise to
its executor's stderr.
"""
from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from pserver.errors import ConfigError, NotpuError
from pserver.server import ServerConfig
from runner.launcher import Children, Endpoints, Launcher, WorkerExit, WorkerSpec, child_json, run, run_keys

log = logging.getLogger(__name__)

#: How long `stop` waits for the cancelled job's tasks to end.
CANCEL_WAIT_S = 30.0
#: A retried task waits for its rank this much longer than the server's worker timeout.
REJOIN_MARGIN_S = 30.0


def train(spark, config) -> dict[str, Any]:
    """Train with the workers as tasks of `spark` (a SparkSession, left running); returns the summary."""
    return run(replace(config, engine="spark"), SparkLauncher(spark))


def predict(spark, run_or_model, events, **options: Any):  # noqa: ANN201 - a pyspark DataFrame
    """`notpu predict --engine spark` on `spark` (left running): a DataFrame `id, churn_probability`, sorted by id.

    `run_or_model` is a RUN directory, RUN/model.keras or a FitResult, at a path every executor can read;
    `events` a Spark DataFrame or any path or URI Spark reads (CSV or Parquet: a file, a directory, a glob).
    `options` are `runner.predict`'s: out (a path ending .csv: one CSV file; else a Parquet directory), spec,
    cutoff, columns, custom_modules, batch_size. Without `out` the frame is lazy and each action scores again;
    with it the scores are written first and the frame holds them. Event types the training log never had
    become an `UnseenTypesWarning`.
    """
    import inspect
    import warnings

    from models.errors import DataError
    from models.spark_predict import predict_frame
    from runner.frames import UnseenTypesWarning, predict_config

    allowed = {name for name, p in inspect.signature(predict_config).parameters.items()
               if p.kind is p.KEYWORD_ONLY} - {"engine"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DataError(f"predict() got unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    scores, warning = predict_frame(spark, predict_config(run_or_model, events, engine="spark", **options))
    if warning:
        warnings.warn(warning, UnseenTypesWarning, stacklevel=2)
    return scores


def slots(sc) -> int:
    """Tasks the cluster can run at once (executors' cores / spark.task.cpus)."""
    try:
        jsc = sc._jsc.sc()
        return int(jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()))
    except Exception:  # an older or changed JVM API: Spark's own estimate
        return sc.defaultParallelism // max(int(sc.getConf().get("spark.task.cpus", "1")), 1)


def registered_slots(sc, want: int) -> int:
    """`slots`, once it reaches ``want`` or Spark's own wait for executors to register has passed
    (spark.scheduler.maxRegisteredResourcesWaitingTime, 30 s): a cluster's executors register with the driver
    after the session is made, one at a time, so a count taken at once can see only the first."""
    have = slots(sc)
    if have >= want or local_slots(sc.master) is not None:
        return have
    wait_s = _seconds(sc.getConf().get("spark.scheduler.maxRegisteredResourcesWaitingTime", "30s"))
    deadline = time.monotonic() + wait_s
    while have < want and time.monotonic() < deadline:
        time.sleep(0.2)
        have = slots(sc)
    return have


def _seconds(text: str) -> float:
    """A Spark duration ("30s", "500ms", "2min"; a bare number is milliseconds) in seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h)?\s*", text)
    if m is None:
        return 30.0
    scale = {"ms": 1e-3, "s": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, None: 1e-3}[m.group(2)]
    return float(m.group(1)) * scale


def local_slots(master: str) -> int | None:
    """The task slots of a local master (local, local[N], local[N,F], local[*]); None for a cluster's URL."""
    m = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?", master.strip())
    if m is None:
        return None
    return (os.cpu_count() or 1) if m.group(1) == "*" else int(m.group(1) or 1)


def check_slots(config, sync: bool, have: int, master: str, task_cpus: str = "1") -> None:
    """A synchronous rule's barrier stage needs a slot per worker at once: refuse fewer, saying what to pass."""
    if sync and have < config.workers:
        raise ConfigError(
            f"rule {config.rule} is synchronous: its {config.workers} workers run as one Spark barrier stage, "
            f"which needs {config.workers} task slots at once, and {master} has {have} (executor cores / "
            f"spark.task.cpus {task_cpus}); pass --workers {have} or fewer, a master with more cores "
            f"(e.g. --master local[{config.workers}]), or an asynchronous rule")
    if have < config.workers:
        log.warning("%s has %d task slot(s) for %d workers: the others start as the first ones finish",
                    master, have, config.workers)


class SparkLauncher(Launcher):
    """The workers as Spark tasks; the server (and the evaluator) on the driver."""

    engine = "spark"

    def __init__(self, spark) -> None:
        self.sc = spark.sparkContext
        self.group = f"notpu-{uuid.uuid4().hex[:12]}"
        self._keys: str | None = None
        self._thread: threading.Thread | None = None
        self._results: list[dict[str, Any]] | None = None
        self._error: BaseException | None = None
        self._reported = False
        self.sync = False  # set by check(): a barrier stage, or plain tasks that Spark retries

    def threads(self, config) -> int:
        return config.threads or max(int(self.sc.getConf().get("spark.task.cpus", "1")), 1)

    def rejoin_wait_s(self, config) -> float:
        return config.worker_timeout_s + REJOIN_MARGIN_S if not self.sync else 0.0

    def check(self, config, sync: bool) -> None:
        self.sync = sync
        if config.worker_timeout_s <= 0 and not sync:
            raise ConfigError("--engine spark restarts a failed worker once the server has declared it lost; "
                              "--worker-timeout-s must be above 0")
        check_slots(config, sync, registered_slots(self.sc, config.workers), self.sc.master,
                    self.sc.getConf().get("spark.task.cpus", "1"))

    def start_server(self, config: ServerConfig, children: Children, startup_timeout_s: float) -> Endpoints:
        self._keys = tempfile.mkdtemp(prefix="notpu-keys-")  # mode 0700: the secrets stay on the driver
        run_keys(self._keys, config.workers)
        host = self.sc.getConf().get("spark.driver.host") or "127.0.0.1"
        return super().start_server(replace(config, host=host, keys_dir=self._keys), children, startup_timeout_s)

    def start_workers(self, workers: list[WorkerSpec], endpoints: Endpoints, children: Children) -> None:
        keys = Path(str(endpoints.keys_dir))
        server_key = (keys / "server.key").read_text()
        # one record per partition: each task holds its own key pair and no other
        records = [(w.rank, child_json(w.config(None, f"spark-{w.rank}")),
                    (keys / "workers" / f"{w.key_name}.key_secret").read_text()) for w in workers]
        common = {"server_key": server_key, "log_dir": str(children.log_dir), "env": children.env,
                  "sync": self.sync}
        rdd = self.sc.parallelize(records, len(records))
        if self.sync:
            rdd = rdd.barrier()
        job = rdd.mapPartitions(functools.partial(run_task, common))

        def collect() -> None:
            self.sc.setJobGroup(self.group, f"notpu: {len(records)} workers", interruptOnCancel=True)
            try:
                self._results = [json.loads(line) for line in job.collect()]
            except BaseException as exc:  # noqa: BLE001 - the driver reads it in poll()
                self._error = exc

        self._ranks = [w.rank for w in workers]
        self._thread = threading.Thread(target=collect, name="spark-workers", daemon=True)
        self._thread.start()

    def poll(self) -> list[WorkerExit]:
        if self.running() or self._reported:
            return []
        self._reported = True
        if self._error is not None:
            detail = _first_lines(str(self._error))
            return [WorkerExit(rank, -1, detail) for rank in self._ranks]
        return [WorkerExit(r["rank"], r["code"], r.get("tail", "")) for r in self._results or []]

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        try:
            if self.running():
                self.sc.cancelJobGroup(self.group)
                self._thread.join(CANCEL_WAIT_S)
                if self._thread.is_alive():
                    log.warning("the Spark job %s did not end within %g s of its cancellation", self.group,
                                CANCEL_WAIT_S)
        finally:
            if self._keys:
                shutil.rmtree(self._keys, ignore_errors=True)

    def reports(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spark_master": self.sc.master}
        if self._results:
            out["task_attempts"] = {str(r["rank"]): r["attempt"] + 1 for r in self._results}
            out["task_executors"] = {str(r["rank"]): r.get("executor") for r in self._results}
        return out


def _first_lines(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[:lines])


def _die_with_parent() -> None:
    """In the worker child, before exec: SIGKILL when the task's Python process dies (Linux), so that a task
    Spark kills or cancels leaves no worker behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_task(common: dict[str, Any], records: Iterator[tuple[int, str, str]]) -> Iterator[str]:
    """One Spark task: the worker of this partition's rank, as a child process; yields its result as JSON.

    Asynchronous rules: a worker that fails raises, so Spark retries the task. Synchronous ones (a barrier
    stage, which Spark would restart whole): the failure is reported and the run goes on without it.
    """
    from pyspark import BarrierTaskContext, TaskContext

    ctx = BarrierTaskContext.get() if common["sync"] else TaskContext.get()
    (rank, worker_json, key_secret), = list(records)
    attempt = ctx.attemptNumber()
    executor = executor_id()
    cfg = json.loads(worker_json)
    cfg["threads"] = cfg["threads"] or max(int(ctx.cpus()), 1)
    if common["sync"]:
        ctx.barrier()  # every worker of the stage is up: they start together
    keys = tempfile.mkdtemp(prefix=f"notpu-worker{rank}-")
    try:
        Path(keys, "server.key").write_text(common["server_key"])
        secret = Path(keys, f"worker{rank}.key_secret")
        secret.write_text(key_secret)
        secret.chmod(0o600)
        cfg.update(keys_dir=keys, key_name=f"worker{rank}")
        log_dir = Path(common["log_dir"])
        log_path = log_dir / f"worker{rank}.log" if log_dir.is_dir() else Path(keys, "worker.log")
        with open(log_path, "ab") as out:
            out.write(f"--- Spark task attempt {attempt} of partition {rank} on {os.uname().nodename}, "
                      f"executor {executor}\n".encode())
            out.flush()
            proc = subprocess.Popen([sys.executable, "-m", "runner.worker_cli", "start", "--config-json",
                                     json.dumps(cfg)], stdout=subprocess.PIPE, stderr=out,
                                    env={**os.environ, **common["env"]}, preexec_fn=_die_with_parent)
            try:
                stdout, _ = proc.communicate()  # bounded by the worker's own waits (its server_wait_s at most)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-10:])
        if not log_dir.is_dir():
            sys.stderr.write(log_path.read_text(errors="replace"))  # the executor's log keeps it
    finally:
        shutil.rmtree(keys, ignore_errors=True)
    if proc.returncode != 0 and not common["sync"]:
        raise RuntimeError(f"worker {rank} (task attempt {attempt}) exited with code {proc.returncode}:\n{tail}")
    report = next((json.loads(line) for line in reversed(stdout.decode(errors="replace").splitlines())
                   if line.startswith("{")), {})
    yield json.dumps({"rank": rank, "attempt": attempt, "code": proc.returncode, "report": report, "tail": tail,
                      "executor": executor})


def executor_id() -> str | None:
    """The id of the Spark executor this task runs in: the `--executor-id` of the executor JVM above this
    Python worker (every cluster manager starts executors that way), "driver" in local mode (the driver's
    JVM runs the tasks), None if no JVM is found. PySpark's TaskContext does not say."""
    import psutil

    try:
        proc = psutil.Process().parent()
        for _ in range(4):  # Python worker <- PySpark daemon <- JVM
            if proc is None:
                break
            cmd = proc.cmdline()
            if "--executor-id" in cmd[:-1]:
                return cmd[cmd.index("--executor-id") + 1]
            if cmd and os.path.basename(cmd[0]).startswith("java"):
                return "driver"
            proc = proc.parent()
    except psutil.Error:
        pass
    return None


#: A task that fails is tried this often in all with the default master, local[N, 4]: Spark's cluster default.
LOCAL_TASK_TRIES = 4


def session(master: str | None, workers: int):
    """The SparkSession `notpu train --engine spark` runs in: --master; else spark-submit's master (it starts
    this Python with PYSPARK_GATEWAY_PORT set); else local[N, 4], whose failed tasks are retried."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("notpu train").config("spark.ui.showConsoleProgress", "false")
    if master is None and "PYSPARK_GATEWAY_PORT" in os.environ:
        return builder.getOrCreate()
    master = master or f"local[{workers},{LOCAL_TASK_TRIES}]"
    builder = builder.master(master)
    if master.startswith("local"):
        builder = builder.config("spark.pyspark.python", sys.executable)  # the tasks run this Python, with notpu
    return builder.getOrCreate()


def train_with_session(config) -> dict[str, Any]:
    """`notpu train --engine spark`: a session of its own, stopped when the run ends, however it ends."""
    if config.workers < 1:
        raise ConfigError("--workers must be at least 1")
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise NotpuError("--engine spark needs PySpark (pip install pyspark) and Java 17 on this host") from None
    sync = bool(config.run_config().to_wire(config.workers).get("sync"))  # also checks the run options
    have = local_slots(config.master) if config.master else None
    if sync and have is not None:  # refused before a JVM starts; a cluster's slots are counted once it is up
        check_slots(config, sync, have, config.master)
    spark = session(config.master, config.workers)
    try:
        return train(spark, config)
    finally:
        spark.stop()

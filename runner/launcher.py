"""How a run's processes start: one small interface that local mode and Spark implement, and the driver they share.

A `Launcher` starts the parameter server and says where it is and which keys
it admits (`Endpoints`), starts N workers, each with its rank, the
endpoints, its part of the data and its keys (`WorkerSpec`), tells the
driver which workers have ended (`WorkerExit`) and adds its own figures to
the summary. `run` is the driver: it checks the configuration, prepares RUN,
starts the evaluator on this host, shows progress (runner.progress),
decides when the run is over and writes RUN/summary.json and RUN/report.png
(models.report); it stops every
process it or the launcher started, on success, on error and on Ctrl-C.

The base class runs `pserver start` as a child of this process, which is
where both engines want it: local mode (runner.local) starts workers as
child processes, Spark (runner.spark) as tasks. Another engine (Ray,
Kubernetes) is one more subclass: `start_workers`, `poll`, `running`, and
`stop` if it starts anything that is not a child of this process.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

from pserver import precision
from pserver.errors import ConfigError, NotpuError, ProcessExited, TrainingFailed, WaitTimeout
from pserver.fileio import atomic_write_json
from pserver.procs import stop_trees, wait_for_file
from pserver.server import ServerConfig
from runner.evaluator import EvaluatorConfig
from runner.progress import Progress, bar_total
from runner.worker import WorkerConfig

if TYPE_CHECKING:
    from runner.train_config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoints:
    """Where the server is, and the keys it admits."""

    address: str  # the coordinator's host:port; workers learn the shards from it
    keys_dir: str | None = None  # the run's CurveZMQ keys on this host (`run_keys`); None: plain TCP on loopback


@dataclass(frozen=True)
class WorkerSpec:
    """One worker to start: its rank, where the server is, its part of the data and its key pair's name."""

    rank: int
    ps: str
    data_dir: str  # the prepared DIR it reads its part from (partition `rank` of the training rows)
    threads: int
    seed: int
    key_name: str | None = None  # its key pair in the run's keys; None: plain TCP
    rejoin_wait_s: float = 0.0  # WorkerConfig.rejoin_wait_s: a restarted worker's wait for its old rank
    wire: str = WorkerConfig.wire  # pushes and pulls over TCP in this precision (a co-located shard: shared memory)

    def config(self, keys_dir: str | None, name: str) -> WorkerConfig:
        """The worker's whole configuration, with the keys where this host holds them."""
        return WorkerConfig(ps=self.ps, data_dir=self.data_dir, threads=self.threads, name=name, rank=self.rank,
                            keys_dir=keys_dir if self.key_name else None, key_name=self.key_name, seed=self.seed,
                            rejoin_wait_s=self.rejoin_wait_s, wire=self.wire)


@dataclass(frozen=True)
class WorkerExit:
    rank: int
    code: int  # 0: it finished its epochs (or was stopped early); otherwise it died
    detail: str = ""  # the end of its log, or the task's error


def child_json(config: Any) -> str:
    """A child's whole configuration (a dataclass) as one JSON document, for its --config-json."""
    return json.dumps(asdict(config))


def python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


#: The evaluator's key pair in the run's keys (`run_keys`): it runs on the driver, beside the server.
EVALUATOR_KEY = "evaluator"


def run_keys(keys_dir: str | Path, workers: int) -> Path:
    """CurveZMQ keys for one run (`pserver keys` layout): the server's pair, workerK's for each rank, and the
    evaluator's, all in the allow-list."""
    import zmq.auth

    from pserver.security import create_keys

    root = create_keys(keys_dir, workers)
    public, secret = zmq.auth.create_certificates(str(root / "workers"), EVALUATOR_KEY)
    shutil.copy(public, root / "allowed" / f"{EVALUATOR_KEY}.key")
    Path(secret).chmod(0o600)
    return root


class Children:
    """The processes this host starts for one run, each logging to RUN/logs/NAME.log."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.env = env or {}  # for every child: PYTHONPATH to the run's custom modules
        self.procs: dict[str, subprocess.Popen] = {}
        self._files: list[IO[bytes]] = []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        f = open(self.log_dir / f"{name}.log", "wb")
        self._files.append(f)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
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


class Launcher(ABC):
    """Starts a run's server and workers. The server is `pserver start`, a child of this process."""

    #: shown in the progress bar and recorded in the summary
    engine = ""

    def threads(self, config: "TrainConfig") -> int:
        """TensorFlow threads per worker (`--threads`, else the engine's share of a host's cores)."""
        return config.threads or 1

    def rejoin_wait_s(self, config: "TrainConfig") -> float:
        """How long a restarted worker waits for its old rank (0: this engine restarts no worker)."""
        return 0.0

    def check(self, config: "TrainConfig", sync: bool) -> None:
        """Refuse, before anything starts, a run this engine cannot start (a ConfigError saying what to pass)."""

    def start_server(self, config: ServerConfig, children: Children, startup_timeout_s: float) -> Endpoints:
        self._server = children.start("pserver", python("pserver.cli", "start", "--config-json", config.to_json()))
        self._children = children
        ready = Path(str(config.ready_file))
        try:
            wait_for_file(ready, startup_timeout_s, alive=lambda: self._server.poll() is None)
        except ProcessExited:
            raise NotpuError(f"pserver exited with code {self._server.returncode} before it was ready:\n"
                             f"{children.tail('pserver')}") from None
        except WaitTimeout:
            raise NotpuError(f"pserver was not ready within {startup_timeout_s:g} s; "
                             f"see {children.log_dir / 'pserver.log'}") from None
        return Endpoints(address=json.loads(ready.read_text())["address"], keys_dir=config.keys_dir)

    def check_server(self) -> None:
        """A NotpuError if the server has died."""
        if self._server.poll() is not None:
            raise NotpuError(f"pserver exited with code {self._server.returncode} during the run:\n"
                             f"{self._children.tail('pserver')}")

    @abstractmethod
    def start_workers(self, workers: list[WorkerSpec], endpoints: Endpoints, children: Children) -> None:
        """Start every worker; returns at once."""

    @abstractmethod
    def poll(self) -> list[WorkerExit]:
        """The workers that ended since the last call."""

    @abstractmethod
    def running(self) -> bool:
        """Whether any worker may still train (False once every one has ended for good)."""

    def stop(self) -> None:
        """Stop whatever this launcher started outside `children` (which the driver stops); bounded, idempotent."""

    def reports(self) -> dict[str, Any]:
        """The engine's own figures for the summary."""
        return {}


def _say(message: str) -> None:
    log.warning("%s", message)


def run(config: "TrainConfig", launcher: Launcher, warn: Callable[[str], None] = _say) -> dict[str, Any]:
    """Run a whole training with `launcher`; returns the summary also written to RUN/summary.json.

    A run that did not train (every worker failed, or the centre received no update) raises TrainingFailed
    naming the first worker's error and its log, after writing summary.json with `"status": "failed"` and the
    `"reason"`; otherwise the status is "ok", and each of the summary's `warnings` (lost workers among them) is
    passed to `warn`: a log warning, which `notpu train` shows on the terminal; `runner.fit` raises Python
    warnings instead.
    """
    from models.dataset import load_dataset
    from models.outdir import start_run_dir
    from optimizers import SHARD_PLUGINS

    if config.workers < 1 or config.shards < 1:
        raise ConfigError("--workers and --shards must be at least 1")
    config.run_config().to_wire(config.workers)  # checks the rule and the options early
    if config.wire not in precision.WIRE:
        raise ConfigError(f"--wire {config.wire!r}: expected one of {', '.join(precision.WIRE)}")
    callbacks = config.callbacks()
    data = load_dataset(config.data_dir)  # checks the data before any process starts
    steps, features = data.X.shape[1:]
    customers = len(data.y)
    del data
    if config.model:  # only here does the driver import Keras: to call your build and check what it returns
        from runner.keras_model import from_builder

        spec = from_builder(config.model, steps, features, seed=config.seed)
        config = replace(config, architecture=spec.architecture, compile_config=spec.compile_config,
                         custom_modules=spec.custom_modules,
                         learning_rate=config.learning_rate if config.learning_rate is not None else spec.learning_rate)
    run_cfg = config.run_config().to_wire(config.workers)
    launcher.check(config, bool(run_cfg.get("sync")))
    out = Path(config.out_dir)
    start_run_dir(out, config.overwrite)  # absent, empty or a previous run (else --overwrite); its stale state gone
    (out / "logs").mkdir(parents=True, exist_ok=True)
    threads = launcher.threads(config)
    started_at = time.time()
    progress = _progress(config, launcher.engine, out, started_at, customers)
    children = Children(out / "logs", _child_env(config.custom_modules))
    ready = out / ".pserver.json"
    finish = out / ".finish"
    server_config = ServerConfig(
        port=0, shards=config.shards, workers=config.workers, run=run_cfg, round_timeout_s=config.round_timeout_s,
        worker_timeout_s=config.worker_timeout_s, ready_file=str(ready), plugins=SHARD_PLUGINS,
        max_delta_norm=config.max_delta_norm,
        **({"checkpoint_dir": str(out / "checkpoints"), "checkpoint_every_s": config.checkpoint_every_s}
           if config.checkpoint_every_s > 0 else {}))
    try:
        progress.phase(0, f"{config.shards} shard(s)")
        endpoints = launcher.start_server(server_config, children, config.startup_timeout_s)
        log.info("pserver at %s; starting %d worker(s) with %d thread(s) each, rule %s, engine %s", endpoints.address,
                 config.workers, threads, run_cfg["rule"], launcher.engine)
        keyed = endpoints.keys_dir is not None
        rejoin_wait_s = launcher.rejoin_wait_s(config)
        progress.phase(1, f"{config.workers} {launcher.engine} worker(s) and the evaluator")
        evaluator = children.start("evaluator", python("runner.worker_cli", "evaluate", "--config-json", child_json(
            EvaluatorConfig(ps=endpoints.address, data_dir=config.data_dir, out_dir=str(out),
                            interval_s=config.eval_interval_s, target_auc=config.target_auc or None,
                            started_at=started_at, finish_file=str(finish), keys_dir=endpoints.keys_dir,
                            key_name=EVALUATOR_KEY if keyed else None, wait_for_lost=rejoin_wait_s > 0,
                            **callbacks))))
        launcher.start_workers([WorkerSpec(rank=r, ps=endpoints.address, data_dir=config.data_dir, threads=threads,
                                           seed=config.seed, key_name=f"worker{r}" if keyed else None,
                                           rejoin_wait_s=rejoin_wait_s, wire=config.wire)
                                for r in range(config.workers)], endpoints, children)
        try:
            dead = _supervise(config, launcher, children, evaluator, out, finish, progress)
        except NotpuError as exc:  # the evaluator failed or hung: if every worker had failed first, that is why
            failed = [f"worker {r}: {_worker_error(out / 'logs', r)}" for r in range(config.workers)
                      if _has_traceback(out / "logs", r)]
            if len(failed) < config.workers or launcher.running():
                raise
            reason = f"every worker failed, the model did not train; {failed[0]}"
            atomic_write_json(out / "summary.json", {"status": "failed", "reason": reason,
                                                      "detail": str(exc).splitlines()[0]}, indent=2)
            raise TrainingFailed(reason) from exc
        summary = json.loads((out / "summary.json").read_text())
    finally:
        try:
            launcher.stop()
        finally:
            children.stop_all()
            ready.unlink(missing_ok=True)
            finish.unlink(missing_ok=True)
    done = {int(rank) for rank, report in summary.get("worker_reports", {}).items() if report}
    lost = (set(summary.get("lost_workers", [])) | dead) - done  # a failed Spark job names no rank: all are "dead"
    summary["lost_workers"] = sorted(lost)
    summary["threads_per_worker"] = threads
    summary["seed"] = config.seed
    summary["wire"] = config.wire
    summary["engine"] = launcher.engine
    summary.update(launcher.reports())
    summary["wall_s"] = round(time.time() - started_at, 3)
    errors = [f"worker {rank}: {_worker_error(out / 'logs', rank)}" for rank in sorted(lost)]
    reason = _failure(summary, lost, done, errors)
    if lost and not reason:
        summary["warnings"] = [f"the run finished without worker(s) {sorted(lost)}: {'; '.join(errors)}",
                               *summary.get("warnings", [])]
    summary["status"] = "failed" if reason else "ok"
    if reason:
        summary["reason"] = reason
    atomic_write_json(out / "summary.json", summary, indent=2)
    _report(out, config.data_dir, progress)
    if reason:
        raise TrainingFailed(reason)
    for message in summary.get("warnings", []):
        warn(message)
    return summary


def _failure(summary: dict[str, Any], lost: set[int], done: set[int], errors: list[str]) -> str:
    """Why the run did not train ("" if it did): every worker failed, or the centre received no update."""
    updates = sum(int(v) for v in summary.get("updates", {}).values())
    first = f"; {errors[0]}" if errors else ""
    if lost and not done:
        return f"every worker failed, the model did not train{first}"
    if updates == 0:
        return f"the centre received no update from the workers, the model did not train{first}"
    return ""


def _has_traceback(log_dir: Path, rank: int) -> bool:
    path = log_dir / f"worker{rank}.log"
    return path.is_file() and "Traceback (most recent call last)" in path.read_text(errors="replace")


def _worker_error(log_dir: Path, rank: int) -> str:
    """The last line of worker `rank`'s traceback (or its log's last line) and the log that holds it."""
    path = log_dir / f"worker{rank}.log"
    if not path.is_file():
        return "its log is not on this host (see the engine's task logs)"
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    line = f"no traceback (killed?), its log ends: {lines[-1].strip()}" if lines else "its log is empty"
    starts = [i for i, text in enumerate(lines) if text.startswith("Traceback (most recent call last)")]
    if starts:  # the exception: the first unindented line after the last traceback's frames, and its message's
        tail = lines[starts[-1] + 1:]  # further lines (Keras writes the layer's own message on the next ones)
        first = next((i for i, text in enumerate(tail) if not text[:1].isspace()), None)
        if first is not None:
            message = []
            for text in tail[first:]:
                if _LOG_LINE.match(text) or text.startswith("Arguments received by"):  # a log line; Keras' call args
                    break
                message.append(_ANSI.sub("", text).strip())
            line = " ".join(message)
    if len(line) > MAX_ERROR_CHARS:
        line = line[:MAX_ERROR_CHARS - 1] + "…"
    return f"{line} (see {path})"


#: A worker's error in a one-line message is cut to this; its log holds the rest.
MAX_ERROR_CHARS = 400
_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d [A-Z]+ ")  # pserver.cli.LOG_FORMAT's start
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Keras' bold


def _child_env(custom_modules) -> dict[str, str]:
    """PYTHONPATH for the children: where this process found the run's custom modules, so they find them too."""
    if not custom_modules:
        return {}
    from runner.keras_model import module_roots

    roots = module_roots(custom_modules)
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join([*roots, *([old] if old else [])])}


def _supervise(config: "TrainConfig", launcher: Launcher, children: Children, evaluator: subprocess.Popen,
               out: Path, finish: Path, progress: Progress) -> set[int]:
    """Wait for the evaluator to finish the run; returns the ranks of workers that died for good."""
    dead: set[int] = set()
    all_exited_at = None
    try:
        while True:
            time.sleep(0.25)
            progress.poll()
            for ended in launcher.poll():
                if ended.code != 0 and ended.rank not in dead:
                    dead.add(ended.rank)
                    log.warning("worker %d exited with code %s; the run goes on without it:\n%s",
                                ended.rank, ended.code, ended.detail)
            if all_exited_at is None and not launcher.running():
                all_exited_at = time.monotonic()
                finish.touch()  # workers that never joined cannot say DONE: tell the evaluator to finish
            if evaluator.poll() is not None:
                if evaluator.returncode != 0:
                    raise NotpuError(f"the evaluator exited with code {evaluator.returncode}:\n{children.tail('evaluator')}")
                progress.poll()  # the last evaluation
                progress.close(json.loads((out / "summary.json").read_text()))
                return dead
            launcher.check_server()
            if all_exited_at is not None and time.monotonic() - all_exited_at > config.finish_timeout_s:
                raise NotpuError(f"the evaluator did not finish within {config.finish_timeout_s:g} s of the last worker; "
                                 f"see {children.log_dir / 'evaluator.log'}")
    finally:
        progress.close(None)  # on an error: the bar stops where it was


def _progress(config: "TrainConfig", engine: str, out: Path, started_at: float, customers: int) -> Progress:
    """The phases and the bar (silent with progress=False / --no-progress)."""
    from models.dataset import split_indices

    label = f"{config.rule} × {config.workers}" + (f" on {engine}" if engine != "local" else "")
    total = bar_total(config.epochs, len(split_indices(customers).train))
    return Progress(config.progress, label, total, out, started_at)


def _report(out: Path, data_dir: str, progress: Progress) -> None:
    """RUN/report.png. The model is trained and saved by now: a figure that cannot be drawn costs a warning."""
    from models.report import write_run_report

    progress.done("drawing report.png")
    try:
        write_run_report(out, Path(data_dir))
    except Exception as exc:  # noqa: BLE001 (matplotlib's errors have no common base)
        log.warning("%s was not drawn: %s", out / "report.png", exc)

"""`pserver start`: a coordinator in this process and S shard processes.

The shards are separate processes (one event loop and one core's worth of
memory bandwidth each); each binds a port chosen by the OS and REGISTERs its
endpoint with the coordinator. The server is ready when every shard has
registered; it then prints its address and, if asked, writes it to a ready
file that scripts and tests wait for.

SIGINT or SIGTERM stops the coordinator, which stops its shards (SIGTERM,
then SIGKILL after a grace period). A shard whose parent disappears stops
by itself, so a killed server leaves nothing behind.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

import zmq

from pserver import applies, checkpoint, security, supervisor
from pserver.coordinator import Coordinator
from pserver.errors import ConfigError, ServerUnreachable
from pserver.fileio import atomic_write_json
from pserver.procs import stop_trees
from pserver.shard import ShardConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Everything `pserver start` needs; `pserver start`'s options default to these fields.

    Settings the shards share take their defaults from `ShardConfig`, so each is defined once.
    """

    host: str = ShardConfig.host
    port: int = 0  # 0: a port chosen by the OS (printed when ready)
    shards: int = 1
    workers: int = 1  # the world size workers are told
    run: dict[str, Any] = field(default_factory=dict)  # rule, hyper-parameters, epochs, model: passed to workers
    max_message_bytes: int = ShardConfig.max_message_bytes
    max_delta_norm: float = ShardConfig.max_delta_norm
    round_timeout_s: float = ShardConfig.round_timeout_s  # also handed to workers in the run config (their wait)
    worker_timeout_s: float = 0.0
    startup_timeout_s: float = 30.0  # how long to wait for every shard to register
    ready_file: str | None = None
    exit_when_done: bool = False  # stop once every worker said DONE (or was lost)
    insecure: bool = False
    keys_dir: str | None = None  # CurveZMQ on every socket, admitting DIR/allowed (pserver.security)
    checkpoint_dir: str | None = None  # shards checkpoint here; a dead shard is restarted from it
    checkpoint_every_s: float = 30.0
    restore: str | None = None  # resume the model and every shard from this checkpoint directory
    max_delta_norm_factor: float = ShardConfig.max_delta_norm_factor
    max_staleness: int = ShardConfig.max_staleness
    plugins: tuple[str, ...] = ShardConfig.plugins  # modules registering the run's shard-side applies

    def __post_init__(self) -> None:
        object.__setattr__(self, "plugins", tuple(self.plugins))  # a JSON list, as --config-json gives it

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServerConfig":
        """A `ServerConfig` from one JSON object (fields by name; missing ones take their defaults)."""
        return config_from_json(cls, text)

    def shard(self, index: int, port: int = 0) -> ShardConfig:
        """Shard `index`'s config: the settings the shards share, from this one."""
        return ShardConfig(index=index, host=self.host, port=port, max_message_bytes=self.max_message_bytes,
                           max_delta_norm=self.max_delta_norm, round_timeout_s=self.round_timeout_s,
                           max_delta_norm_factor=self.max_delta_norm_factor, max_staleness=self.max_staleness,
                           keys_dir=self.keys_dir, plugins=self.plugins)

    def run_for_workers(self) -> dict[str, Any]:
        """The run config workers are handed: the run's, and the round timeout the shards close rounds after
        (a worker waits that long, and a little more, for a round's reply)."""
        return {**self.run, "round_timeout_s": self.round_timeout_s}


def config_from_json(cls: type, text: str) -> Any:
    """An instance of the dataclass `cls` from one JSON object; unknown or ill-typed fields are a ConfigError."""
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{cls.__name__}: not JSON ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(values).__name__}")
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def _check(config: ServerConfig) -> None:
    if config.shards < 1:
        raise ConfigError(f"--shards must be at least 1, got {config.shards}")
    if config.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {config.workers}")
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.keys_dir:
        if not config.insecure:
            raise ConfigError(f"binding {config.host} exposes the server beyond this machine; pass --keys DIR "
                              f"to encrypt and authenticate, or --insecure to accept the risk")
        log.warning("--insecure: %s is bound without encryption or authentication; anyone who can reach it "
                    "can read and overwrite the model. Use --keys DIR (see `pserver keys`)", config.host)
    if config.keys_dir:
        security.server_keys(config.keys_dir)  # fails early, naming the missing file
    applies.load_plugins(config.plugins)  # fails early, naming the module, not in every shard process


def spawn_shard(config: ServerConfig, index: int, coordinator: str, port: int = 0,
                restore: bool = False) -> subprocess.Popen:
    """Start shard `index` (`python -m pserver.shard_process --index K --config-json ...`): its whole
    configuration in one JSON document, a `ShardProcessConfig`."""
    from pserver.shard_process import ShardProcessConfig

    proc_config = ShardProcessConfig(shard=config.shard(index, port), coordinator=coordinator, parent=os.getpid(),
                                     checkpoint_dir=config.checkpoint_dir,
                                     checkpoint_every_s=config.checkpoint_every_s,
                                     restore=bool(restore and config.checkpoint_dir))
    return subprocess.Popen([sys.executable, "-m", "pserver.shard_process", "--index", str(index),
                             "--config-json", proc_config.to_json()])


def run_server(config: ServerConfig, on_ready: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run in the foreground until SIGINT/SIGTERM (or all workers are done). Returns the final summary."""
    if config.restore and not config.checkpoint_dir:
        config = replace(config, checkpoint_dir=config.restore)  # go on checkpointing where we resumed from
    _check(config)
    restored = checkpoint.check_restore(config.restore, config.shards) if config.restore else None
    context = zmq.Context.instance()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 1 << 24)  # the coordinator carries headers only
    if config.keys_dir:
        security.secure_server_socket(sock, config.keys_dir)
    try:
        port = config.port or sock.bind_to_random_port(f"tcp://{config.host}")
        if config.port:
            sock.bind(f"tcp://{config.host}:{config.port}")
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot bind {config.host}:{config.port}: {exc}; pick another --port") from None
    address = f"{config.host}:{port}"
    coord = Coordinator(sock, shards=config.shards, world=config.workers, run_config=config.run_for_workers(),
                        worker_timeout_s=config.worker_timeout_s)
    if config.keys_dir:
        coord.curve = security.internal_curve(config.keys_dir)
    if restored is not None:
        supervisor.restore_model(coord, restored, config.restore)
    if config.checkpoint_dir:
        coord.on_model = lambda: supervisor.persist_model(coord, config.checkpoint_dir)
    notifier = supervisor.LivenessNotifier(coord, coord.curve)
    procs: list[subprocess.Popen] = []
    stopping = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum
        coord.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        procs += [spawn_shard(config, k, address, restore=restored is not None) for k in range(config.shards)]
        deadline = time.monotonic() + config.startup_timeout_s

        def started() -> bool:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                raise ServerUnreachable(f"shard process {dead[0].pid} exited with code {dead[0].returncode} "
                                        f"before registering; see its log above")
            if time.monotonic() > deadline:
                raise ServerUnreachable(f"{len(coord.endpoints)} of {config.shards} shards registered with {address} "
                                        f"within {config.startup_timeout_s:g} s")
            return coord.ready

        coord.serve(until=started, poll_s=0.02)
        if stopping["signal"] is None:
            log.info("pserver ready at %s with %d shard(s), world %d", address, config.shards, config.workers)
            if config.ready_file:
                atomic_write_json(config.ready_file, {"address": address, "pid": os.getpid(),
                                                      "shards": coord.shard_map()})
            if on_ready:
                on_ready(address)

            respawn = (lambda k, port: spawn_shard(config, k, address, port=port, restore=True)) \
                if config.checkpoint_dir else None
            watch = supervisor.ShardWatch(coord, procs, respawn)

            def finished() -> bool:
                watch.check()
                notifier.check()
                return config.exit_when_done and coord.finished

            coord.serve(until=finished)
        return coord.summary()
    finally:
        stop_trees(procs, grace_s=5.0)
        notifier.close()
        sock.close(linger=0)
        security.stop_authenticators()
        for s, h in old.items():
            signal.signal(s, h)

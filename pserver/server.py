"""`pserver start`: a coordinator in this process and S shard processes.

The shards are separate processes (one event loop and one core's worth of
memory bandwidth each); each binds a port chosen by the OS and REGISTERs its
endpoint with the coordinator. The server is ready when every shard has
registered; it then prints its address and, if asked, writes it to a ready
file that scripts and tests wait for.

Memory under hostile peers: ZeroMQ holds at most `pserver.router.RCVHWM` + 1 messages per
connection of each socket, each frame at most its MAXMSGSIZE (the
coordinator's `pserver.coordinator.MAX_MESSAGE_BYTES`, a shard's
`ShardConfig.max_message_bytes` or less; see `pserver.shard`), and drops a
peer that sends a larger frame. It has no limit on connections: with
``--keys`` only listed clients get past the CurveZMQ handshake to send a
frame at all; without, the bound is per connection, and the OS's limit on
open files caps the connections.

SIGINT or SIGTERM stops the coordinator, which stops its shards (SIGTERM,
then SIGKILL after a grace period). A shard whose parent disappears stops
by itself (writing its checkpoint, if it keeps them), so a killed server
leaves nothing behind.

Losing the whole server (SIGKILL, a lost host): with ``--checkpoint-dir``,
`pserver start --restore CHECKPOINTS` on the same address resumes it: the
coordinator's state (`pserver.coordinator`, Restarts) and every shard's
slice and seq table come back, the shards bind their old ports, and running
workers and the evaluator, which wait for a silent server
(`pserver.client.ClientConfig.server_wait_s`), retry and go on with their
ranks. With port 0, a restored server takes the port it had.
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

from pserver import applies, checkpoint, router, security, shm, supervisor
from pserver.coordinator import MAX_MESSAGE_BYTES, Coordinator
from pserver.errors import ConfigError, ServerUnreachable
from pserver.fileio import atomic_write_json
from pserver.procs import stop_trees
from pserver.shard_state import ShardConfig

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
    max_message_bytes: int = ShardConfig.max_message_bytes  # a shard's frame limit; must hold its slice
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
                           keys_dir=self.keys_dir, plugins=self.plugins, world=self.workers)

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
            raise ConfigError(f"binding {config.host} exposes the server beyond this machine; pass --keys KEYS "
                              f"to encrypt and authenticate, or --insecure to accept the risk")
        log.warning("--insecure: %s is bound without encryption or authentication; anyone who can reach it "
                    "can read and overwrite the model. Use --keys KEYS (see `pserver keys`)", config.host)
    if config.keys_dir:
        security.server_keys(config.keys_dir)  # fails early, naming the missing file
    applies.load_plugins(config.plugins)  # fails early, naming the module, not in every shard process


def spawn_shard(config: ServerConfig, index: int, coordinator: str, port: int = 0,
                restore: bool = False, secret: bytes | None = None) -> subprocess.Popen:
    """Start shard `index` (`python -m pserver.shard_process --index K --config-json ...`): its whole
    configuration in one JSON document, a `ShardProcessConfig`, and the server's ``secret`` in its environment
    (`pserver.security.SECRET_ENV`: a command line is readable by every user of the host, an environment by
    this user only)."""
    from pserver.shard_process import ShardProcessConfig

    proc_config = ShardProcessConfig(shard=config.shard(index, port), coordinator=coordinator, parent=os.getpid(),
                                     checkpoint_dir=config.checkpoint_dir,
                                     checkpoint_every_s=config.checkpoint_every_s,
                                     restore=bool(restore and config.checkpoint_dir))
    return subprocess.Popen([sys.executable, "-m", "pserver.shard_process", "--index", str(index),
                             "--config-json", proc_config.to_json()],
                            env={**os.environ, security.SECRET_ENV: secret.hex()} if secret else None)


def _port(endpoint: str | None) -> int:
    """The port of a ``host:port`` endpoint; 0 (one chosen by the OS) for None."""
    return int(endpoint.rsplit(":", 1)[1]) if endpoint else 0


def run_server(config: ServerConfig, on_ready: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run in the foreground until SIGINT/SIGTERM (or all workers are done). Returns the final summary."""
    if config.restore and not config.checkpoint_dir:
        config = replace(config, checkpoint_dir=config.restore)  # go on checkpointing where we resumed from
    if config.restore and os.path.abspath(config.restore) != os.path.abspath(str(config.checkpoint_dir)):
        raise ConfigError(f"--restore {config.restore} with --checkpoint-dir {config.checkpoint_dir}: a restored "
                          f"server goes on checkpointing where it resumed from; drop --checkpoint-dir")
    _check(config)
    restored = checkpoint.check_restore(config.restore, config.shards, config.workers) if config.restore else None
    if restored is not None and not config.port and restored.get("address"):
        # the same address: the running workers and the evaluator look for the coordinator there
        config = replace(config, port=int(restored["address"].rsplit(":", 1)[1]))
    context = zmq.Context.instance()
    try:  # the coordinator carries headers only: MAX_MESSAGE_BYTES
        sock, port = router.bind_router(context, config.host, config.port, MAX_MESSAGE_BYTES, config.keys_dir)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot bind {config.host}:{config.port}: {exc}; pick another --port") from None
    address = f"{config.host}:{port}"
    # Signs the coordinator's tickets (pserver.security). Kept beside the checkpoints, so that the workers of a
    # restored server go on with theirs; otherwise new each start.
    secret = security.stored_secret(config.checkpoint_dir) if config.checkpoint_dir else security.new_secret()
    coord = Coordinator(sock, shards=config.shards, world=config.workers, run_config=config.run_for_workers(),
                        worker_timeout_s=config.worker_timeout_s, max_slice_bytes=config.max_message_bytes,
                        secret=secret, roles=security.key_roles(config.keys_dir) if config.keys_dir else None)
    coord.address = address
    if config.keys_dir:
        coord.curve = security.internal_curve(config.keys_dir)
    if restored is not None:
        checkpoint.restore_coordinator(coord, restored, config.restore)
        if restored.get("address") and restored["address"] != address:
            log.warning("restored a run served at %s, now at %s: workers still looking for %s will not find it",
                        restored["address"], address, restored["address"])
    saver = checkpoint.CoordinatorCheckpointer(coord, config.checkpoint_dir, config.checkpoint_every_s) \
        if config.checkpoint_dir else None
    if saver is not None and restored is not None:
        saver.restored()
    notifier = supervisor.LivenessNotifier(coord, coord.curve)
    procs: list[subprocess.Popen] = []
    stopping = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum
        coord.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # restored shards bind their old ports: running workers look for them there
        procs += [spawn_shard(config, k, address, port=_port(coord.restored_endpoints.get(k)),
                              restore=restored is not None, secret=secret) for k in range(config.shards)]
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

            respawn = (lambda k, port: spawn_shard(config, k, address, port=port, restore=True, secret=secret)) \
                if config.checkpoint_dir else None
            watch = supervisor.ShardWatch(coord, procs, respawn)

            def finished() -> bool:
                watch.check()
                notifier.check()
                if saver is not None:
                    saver.tick()
                return config.exit_when_done and coord.finished

            coord.serve(until=finished)
            if saver is not None:
                saver.save()  # stopped or done: the last word on disk
        return coord.summary()
    finally:
        stop_trees(procs, grace_s=5.0)
        shm.remove_stale()  # a shard that died without removing its shared-memory segments
        notifier.close()
        coord.close()
        sock.close(linger=0)
        security.stop_authenticators()
        for s, h in old.items():
            signal.signal(s, h)

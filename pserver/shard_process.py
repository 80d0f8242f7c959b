"""Entry point of one shard process: `python -m pserver.shard_process --index K --config-json JSON`.

`pserver start` runs one of these per shard; they are not meant to be started
by hand. The JSON document is a `ShardProcessConfig` (the `ShardConfig` the
server derived from its own, and where to register and checkpoint); `--index`
repeats the shard's index so that process listings show it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

import zmq

from pserver import checkpoint, security, shm
from pserver.client import ClientConfig, request
from pserver.errors import ConfigError, NotpuError
from pserver.memory import HeapTrimmer
from pserver.shard import Shard
from pserver.shard_state import ShardConfig

log = logging.getLogger("pserver.shard")


@dataclass(frozen=True)
class ShardProcessConfig:
    """One shard process's whole configuration, as `pserver start` hands it over."""

    shard: ShardConfig
    coordinator: str  # host:port to register with
    checkpoint_every_s: float  # no default here: `ServerConfig.checkpoint_every_s` is the one
    parent: int = 0  # stop when this process is gone (0: never)
    checkpoint_dir: str | None = None
    restore: bool = False  # resume from checkpoint_dir/shard-K.npz if it exists

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ShardProcessConfig":
        try:
            values = json.loads(text)
            shard = ShardConfig(**values.pop("shard"))
            return cls(shard=shard, **values)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(f"--config-json is not a ShardProcessConfig: {exc!r}") from None


#: A restarted shard serves only once registered, and its REGISTER can queue at the coordinator behind STATS
#: requests (an evaluator sends one every 0.5 s) that each wait up to 5 s for this very shard. A retry goes on a
#: fresh socket, so an answer later than the timeout is lost. Long enough for a few STATS ahead of it
#: (bench/RESULTS.md, "Why the defaults are what they are").
REGISTER_TIMEOUT_S = 20.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pserver.shard_process")
    p.add_argument("--index", type=int, required=True, help="the shard's index (as in --config-json)")
    p.add_argument("--config-json", required=True, metavar="JSON", help="a ShardProcessConfig as one JSON object")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("NOTPU_LOG", "INFO"),
                        format=f"%(asctime)s %(levelname)s shard{args.index}: %(message)s", datefmt="%H:%M:%S")
    try:
        proc = ShardProcessConfig.from_json(args.config_json)
        if proc.shard.index != args.index:
            raise ConfigError(f"--index {args.index} but --config-json is shard {proc.shard.index}'s")
    except NotpuError as exc:
        log.error("%s", exc)
        return 2
    config = proc.shard
    try:
        secret = security.secret_from_env()
        shard = _bind(config, secret)
    except NotpuError as exc:
        log.error("%s", exc)
        return 2
    shard.install_signal_handlers()
    shm.remove_stale()  # segments of shards killed before they could remove them (a predecessor of this one)
    saver = None
    try:
        if proc.checkpoint_dir:
            saver = checkpoint.Checkpointer(shard, proc.checkpoint_dir, proc.checkpoint_every_s)
            if proc.restore and checkpoint.restore_newest(shard, proc.checkpoint_dir) is not None:
                saver.mark_saved()
            elif proc.restore:
                log.warning("no checkpoint %s: starting empty, waiting for an INIT",
                            checkpoint.shard_file(proc.checkpoint_dir, config.index))
        parent_gone = (lambda: os.getppid() != proc.parent) if proc.parent else (lambda: False)

        trimmer = HeapTrimmer(name=f"shard {config.index}")  # what closed connections' buffers held goes back

        def tick() -> None:
            if parent_gone():
                shard.stop()
            if saver is not None:
                saver.tick()
            trimmer.tick()

        shard.on_tick = tick
        curve = security.internal_curve(config.keys_dir) if config.keys_dir else None
        proof = {"proof": security.register_proof(secret, config.index, shard.endpoint)} if secret else {}
        request(proc.coordinator, {"op": "REGISTER", "shard": config.index, "endpoint": shard.endpoint, **proof},
                config=ClientConfig(timeout_s=REGISTER_TIMEOUT_S, retries=3), curve=curve)
        shard.serve()
        if saver is not None:
            saver.save()  # SIGTERM: the last word on disk
    except NotpuError as exc:
        log.error("%s", exc)
        return 2
    finally:
        shard.close()
        security.stop_authenticators()
    return 0


def _bind(config: ShardConfig, secret: bytes | None, wait_s: float = 10.0) -> Shard:
    """A shard restarted on its old port may find it held for a moment by its predecessor's connections."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return Shard(config, secret=secret)
        except zmq.ZMQError as exc:
            if not config.port or exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise NotpuError(f"shard {config.index} cannot bind {config.host}:{config.port}: {exc}") from None
            time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())

"""Entry point of one shard process: `python -m pserver.shard_process --index K --coordinator H:P`.

`pserver start` runs one of these per shard; they are not meant to be started by hand.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import zmq

from pserver import checkpoint, security
from pserver.client import ClientConfig, request
from pserver.errors import NotpuError
from pserver.shard import Shard, ShardConfig

log = logging.getLogger("pserver.shard")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pserver.shard_process")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--coordinator", required=True, help="host:port to register with")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--advertise-host", default=None)
    p.add_argument("--parent", type=int, default=0, help="stop when this process is gone")
    p.add_argument("--max-message-bytes", type=int, default=1 << 31)
    p.add_argument("--max-delta-norm", type=float, default=0.0)
    p.add_argument("--round-timeout-s", type=float, default=60.0)
    p.add_argument("--max-delta-norm-factor", type=float, default=0.0)
    p.add_argument("--max-staleness", type=int, default=-1)
    p.add_argument("--keys", default=None, help="CurveZMQ keys directory (pserver keys)")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every-s", type=float, default=30.0)
    p.add_argument("--restore", action="store_true", help="resume from --checkpoint-dir/shard-K.npz if it exists")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("NOTPU_LOG", "INFO"),
                        format=f"%(asctime)s %(levelname)s shard{args.index}: %(message)s", datefmt="%H:%M:%S")
    config = ShardConfig(index=args.index, host=args.host, port=args.port, advertise_host=args.advertise_host,
                         max_message_bytes=args.max_message_bytes, max_delta_norm=args.max_delta_norm,
                         round_timeout_s=args.round_timeout_s, max_delta_norm_factor=args.max_delta_norm_factor,
                         max_staleness=args.max_staleness, keys_dir=args.keys)
    try:
        shard = _bind(config)
    except NotpuError as exc:
        log.error("%s", exc)
        return 2
    shard.install_signal_handlers()
    saver = None
    try:
        if args.checkpoint_dir:
            saver = checkpoint.Checkpointer(shard, args.checkpoint_dir, args.checkpoint_every_s)
            path = checkpoint.shard_file(args.checkpoint_dir, args.index)
            if args.restore and path.exists():
                checkpoint.restore_shard(shard, path)
                saver.mark_saved()
            elif args.restore:
                log.warning("no checkpoint %s: starting empty, waiting for an INIT", path)
        parent_gone = (lambda: os.getppid() != args.parent) if args.parent else (lambda: False)

        def tick() -> None:
            if parent_gone():
                shard.stop()
            if saver is not None:
                saver.tick()

        shard.on_tick = tick
        curve = security.internal_curve(args.keys) if args.keys else None
        request(args.coordinator, {"op": "REGISTER", "shard": args.index, "endpoint": shard.endpoint},
                config=ClientConfig(timeout_s=2.0, retries=10), curve=curve)
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


def _bind(config: ShardConfig, wait_s: float = 10.0) -> Shard:
    """A shard restarted on its old port may find it held for a moment by its predecessor's connections."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return Shard(config)
        except zmq.ZMQError as exc:
            if not config.port or exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise NotpuError(f"shard {config.index} cannot bind {config.host}:{config.port}: {exc}") from None
            time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())

"""Entry point of one shard process: `python -m pserver.shard_process --index K --coordinator H:P`.

`pserver start` runs one of these per shard; they are not meant to be started by hand.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

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
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("NOTPU_LOG", "INFO"),
                        format=f"%(asctime)s %(levelname)s shard{args.index}: %(message)s", datefmt="%H:%M:%S")
    shard = Shard(ShardConfig(index=args.index, host=args.host, port=args.port, advertise_host=args.advertise_host,
                              max_message_bytes=args.max_message_bytes, max_delta_norm=args.max_delta_norm,
                              round_timeout_s=args.round_timeout_s))
    shard.install_signal_handlers()
    if args.parent:
        shard.on_tick = lambda: os.getppid() != args.parent and shard.stop()
    try:
        request(args.coordinator, {"op": "REGISTER", "shard": args.index, "endpoint": shard.endpoint},
                config=ClientConfig(timeout_s=2.0, retries=10))
        shard.serve()
    except NotpuError as exc:
        log.error("%s", exc)
        return 2
    finally:
        shard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

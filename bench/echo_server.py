"""A bare pyzmq ROUTER that echoes every message back: the transport baseline.

    python -m bench.echo_server --ready-file F [--port 0] [--parent PID]

It runs in its own process, like a shard, binds like a shard (LINGER 0,
MAXMSGSIZE) and answers each multipart message with the same frames, sent
zero-copy. Whatever a shard spends beyond this is the parameter server's cost.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import zmq


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.echo_server")
    p.add_argument("--ready-file", required=True, help="write {endpoint, pid} here as JSON once bound")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--parent", type=int, default=0, help="stop when this process is gone")
    args = p.parse_args(argv)
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 1 << 31)
    if args.port:
        sock.bind(f"tcp://{args.host}:{args.port}")
        port = args.port
    else:
        port = sock.bind_to_random_port(f"tcp://{args.host}")
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"endpoint": f"{args.host}:{port}", "pid": os.getpid()}, f)
    os.replace(tmp, args.ready_file)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stopping:
        if args.parent and os.getppid() != args.parent:
            break
        if poller.poll(100):
            for _ in range(64):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                sock.send_multipart(frames, copy=False)
    sock.close(linger=0)
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A simulated worker: no compute, only push+pull of the model as fast as it can.

    python -m bench.sim_worker PLAN.json READY_FILE

The plan lists phases, each against a parameter server (`{"kind": "ps",
"address": host:port}`) or bare echo servers (`{"kind": "bare", "endpoints":
[...]}`, the model split over them the way shards split it), with a common
wall-clock start and a duration, so that every worker process runs each phase
at the same time: once connected it writes READY_FILE, then waits for
PLAN.json's `go_file`, which holds the start of the first phase. Prints one JSON line: the exchanges completed in each phase.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

from pserver.client import Client, ClientConfig
from pserver.layout import shard_ranges

TIMEOUT_MS = 60_000


class BareClient:
    """One DEALER per echo server; sends each its slice and waits for every echo, like Client.push."""

    def __init__(self, context: zmq.Context, endpoints: list[str], delta: np.ndarray) -> None:
        self.sockets = []
        for e in endpoints:
            s = context.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"tcp://{e}")
            self.sockets.append(s)
        header = msgpack.packb({"v": 1, "op": "PUSH", "worker": 0, "seq": 1, "pulled": 1, "mode": "add", "scale": 1.0,
                                "pull": True})
        self.frames = [[header, memoryview(delta[a:b]).cast("B")]
                       for a, b in shard_ranges(delta.size, len(endpoints))]
        self.poller = zmq.Poller()
        for s in self.sockets:
            self.poller.register(s, zmq.POLLIN)

    def exchange(self) -> None:
        for s, f in zip(self.sockets, self.frames):
            s.send_multipart(f, copy=False)
        waiting = set(self.sockets)
        while waiting:
            events = dict(self.poller.poll(TIMEOUT_MS))
            if not events:
                raise TimeoutError(f"no echo within {TIMEOUT_MS} ms")
            for s in list(waiting):
                if s in events:
                    s.recv_multipart(copy=False)
                    waiting.discard(s)

    def close(self) -> None:
        for s in self.sockets:
            s.close(linger=0)


def main(argv: list[str]) -> int:
    plan = json.loads(open(argv[0]).read())
    total = int(plan["floats"])
    delta = (np.random.default_rng(plan.get("seed", 0)).standard_normal(total) * 1e-7).astype(np.float32)  # (total,)
    out = np.empty(total, np.float32)  # (total,)
    context = zmq.Context.instance()
    exchanges: dict[str, object] = {}
    ps: dict[str, Client] = {}
    bare: dict[str, BareClient] = {}
    for target in plan["targets"]:  # connect and join everything up front, outside the timed phases
        if target["kind"] == "ps":
            # a bare echo moves the bytes over TCP: so does the PS side, unless the plan asks for shared memory
            c = Client(target["address"], ClientConfig(shared_memory=bool(plan.get("shared_memory", False))),
                       context=context)
            c.join(plan.get("name", "sim"))
            c.pull(out=out)
            ps[target["name"]] = c
            exchanges[target["name"]] = lambda c=c: c.push(delta, pull=True, out=out)
        else:
            b = BareClient(context, target["endpoints"], delta)
            bare[target["name"]] = b
            exchanges[target["name"]] = b.exchange
    Path(argv[1]).write_text("ready")
    deadline = time.monotonic() + plan.get("go_timeout_s", 120)
    go = Path(plan["go_file"])
    while not go.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {go} within {plan.get('go_timeout_s', 120)} s")
        time.sleep(0.01)
    start = json.loads(go.read_text())["start"]
    counts = []
    for phase in plan["phases"]:
        phase = dict(phase, start=start + phase["offset_s"])
        fn = exchanges[phase["target"]]
        fn()  # warm: the first exchange after a pause pays for waking sockets up
        while time.time() < phase["start"]:
            time.sleep(0.001)
        end = phase["start"] + phase["duration_s"]
        n = 0
        while time.time() < end:
            fn()
            n += 1
        counts.append(n)
    for c in ps.values():
        c.close()
    for b in bare.values():
        b.close()
    print(json.dumps({"counts": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

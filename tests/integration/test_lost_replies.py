"""Lost replies: a proxy between a `Client` and `pserver start` drops the first reply of each op.

The proxy (a thread of this test) has a ROUTER front for the coordinator and
one for each shard, and one DEALER upstream per front connection, so that the
server sees each client socket as its own peer, as it would without the
proxy. It rewrites the shard endpoints in the coordinator's replies to its own
fronts. For each (endpoint, op) it drops the first reply: the request was
served, the client never hears of it, times out and re-sends the request on a
fresh socket. Everything must then happen exactly once.
"""
from __future__ import annotations

import threading
from collections import Counter

import msgpack
import numpy as np
import pytest
import zmq

from pserver import protocol, shm
from pserver.client import Client, ClientConfig
from pserver.layout import Layout

pytestmark = pytest.mark.integration
LAYOUT = Layout.from_shapes([(50, 30), (30,), (1001,)])  # 2531 floats


class DroppingProxy:
    """Forwards requests to the coordinator and the shards; drops the first reply of each (endpoint, op)."""

    def __init__(self, context: zmq.Context, coordinator: str, shards: list[str]) -> None:
        self.context = context
        self.upstream = {"coordinator": coordinator, **{f"shard{k}": e for k, e in enumerate(shards)}}
        self.fronts: dict[str, zmq.Socket] = {}
        self.address: dict[str, str] = {}
        for name in self.upstream:  # made here, used only by the thread from now on
            s = context.socket(zmq.ROUTER)
            s.setsockopt(zmq.LINGER, 0)
            self.address[name] = f"127.0.0.1:{s.bind_to_random_port('tcp://127.0.0.1')}"
            self.fronts[name] = s
        self.dropped: Counter = Counter()  # (endpoint name, op) -> replies dropped
        self.forwarded: Counter = Counter()  # (endpoint name, op) -> replies passed on
        self.requests: Counter = Counter()  # (endpoint name, op) -> requests passed on
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dropping-proxy", daemon=True)

    def __enter__(self) -> "DroppingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the proxy thread did not stop within 10 s"

    def _rewrite(self, body: list[bytes]) -> list[bytes]:
        """A coordinator reply naming the shards names the proxy's fronts for them instead."""
        header = msgpack.unpackb(body[0], raw=False)
        if isinstance(header.get("shards"), list):
            for s in header["shards"]:
                s["endpoint"] = self.address[f"shard{s['index']}"]
            body = [msgpack.packb(header, use_bin_type=True), *body[1:]]
        return body

    def _run(self) -> None:
        backs: dict[tuple[str, bytes], zmq.Socket] = {}
        owner: dict[zmq.Socket, tuple[str, bytes]] = {}
        pending: dict[tuple[str, bytes], str] = {}  # the op of the request in flight on each connection
        poller = zmq.Poller()
        by_front = {s: name for name, s in self.fronts.items()}
        for s in self.fronts.values():
            poller.register(s, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(50):
                    if sock in by_front:
                        name = by_front[sock]
                        identity, *body = sock.recv_multipart()
                        key = (name, identity)
                        if key not in backs:
                            back = self.context.socket(zmq.DEALER)
                            back.setsockopt(zmq.LINGER, 0)
                            back.connect(f"tcp://{self.upstream[name]}")
                            backs[key], owner[back] = back, key
                            poller.register(back, zmq.POLLIN)
                        op = msgpack.unpackb(body[0], raw=False)["op"]
                        pending[key] = op
                        self.requests[(name, op)] += 1
                        backs[key].send_multipart(body)
                    else:
                        name, identity = key = owner[sock]
                        body = sock.recv_multipart()
                        op = pending.pop(key)
                        if not self.dropped[(name, op)]:
                            self.dropped[(name, op)] += 1  # served upstream; the client never hears of it
                            continue
                        if name == "coordinator":
                            body = self._rewrite(body)
                        self.forwarded[(name, op)] += 1
                        self.fronts[name].send_multipart([identity, *body])
        except BaseException as exc:  # reported by the test, not lost in a thread
            self.error = exc
        finally:
            for s in [*backs.values(), *self.fronts.values()]:
                s.close(linger=0)


def deltas(n: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(-8, 8, n).astype(np.float32) for _ in range(count)]  # whole numbers: sums are exact


def test_every_op_survives_losing_its_first_reply(pserver):
    server = pserver("--shards", "2", "--workers", "2")
    direct = Client(server.address, ClientConfig(timeout_s=10.0, retries=0))
    shard_endpoints = [s["endpoint"] for s in direct.ask({"op": "PING"})["shards"]]
    initial = np.random.default_rng(7).integers(-100, 100, LAYOUT.total).astype(np.float32)
    pushes = deltas(LAYOUT.total, 3)

    with DroppingProxy(zmq.Context.instance(), server.address, shard_endpoints) as proxy:
        c = Client(proxy.address["coordinator"], ClientConfig(timeout_s=1.0, retries=3, backoff_s=0.05))
        joined = c.join("through a lossy proxy")
        first = c.init(initial, LAYOUT)
        for d in pushes:
            c.push(d)
        centre = c.pull()
        c.done({"samples": 1})
        retries = c.retries
        c.close()
    assert proxy.error is None, proxy.error

    # The drops happened: the first reply of each op, at each endpoint, and only that one.
    expected = {("coordinator", "JOIN"), ("coordinator", "INIT"), ("coordinator", "DONE"),
                *((f"shard{k}", op) for k in range(2) for op in ("INIT", "PUSH", "PULL"))}
    if shm.available():  # the shards are on this host: the client asked each for shared memory, once answered
        expected |= {(f"shard{k}", "SHM") for k in range(2)}
    assert dict(proxy.dropped) == dict.fromkeys(expected, 1), proxy.dropped
    assert retries == len(expected)  # each drop cost one retry, on a fresh socket
    assert proxy.requests[("coordinator", "JOIN")] == 2 and proxy.requests[("shard0", "PUSH")] == 4
    print(f"\nlost replies: dropped {sum(proxy.dropped.values())} ({dict(proxy.dropped)}), "
          f"client retries {retries}, requests {dict(proxy.requests)}")

    # ...and every request took effect once, and its retry got the first answer.
    assert joined["rank"] == 0 and first is True
    expected_centre = initial.copy()
    for d in pushes:
        expected_centre += d
    np.testing.assert_array_equal(centre, expected_centre)
    direct.use_shards(direct.ask({"op": "MODEL"})["shards"])  # the shards themselves, not the proxy's fronts
    np.testing.assert_array_equal(direct.pull(), expected_centre)
    stats = direct.stats()
    coord = stats["coordinator"]
    assert list(coord["workers"]) == ["0"] and coord["workers"]["0"]["done"] is True  # one rank taken, not two
    assert coord["repeats"] == 2  # the retried JOIN and INIT were answered from memory
    for s in stats["shards"]:
        assert s["version"] == len(pushes) and s["updates"] == {"0": len(pushes)}
        assert s["duplicates"] == {"0": 1} and s["refused"] == {}
    direct.close()

"""The coordinator's STATS gather, in process: a real Coordinator and real Shards on 127.0.0.1, driven a
message at a time, so that which shard answers when is the test's to choose."""
import time

import numpy as np
import pytest
import zmq

from pserver import protocol
from pserver.coordinator import Coordinator
from pserver.shard import Shard
from pserver.shard_state import ShardConfig

from conftest import wait_for

pytestmark = pytest.mark.integration


class Peer:
    """A DEALER at the coordinator, as a `pserver stats` has."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(f"tcp://{address}")

    def send(self, header: dict) -> None:
        self.socket.send_multipart(protocol.encode(header))

    def reply(self, coord: Coordinator, shards: list[Shard] = (), timeout_s: float = 10.0) -> dict | None:
        """Turn the coordinator's and the shards' loops by hand until this peer has a reply (None: none came)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            serve_once(coord, shards)
            if self.socket.poll(0):
                return protocol.decode(self.socket.recv_multipart()).header
        return None


def serve_once(coord: Coordinator, shards: list[Shard]) -> None:
    """One turn of each loop, as `Coordinator.serve` and `Shard.serve` take them."""
    coord.serve(until=_once(), poll_s=0.01)
    for shard in shards:
        while shard.socket.poll(0):
            shard.handle(shard.socket.recv_multipart(copy=False))


def _once():
    turns = iter([False, True])
    return lambda: next(turns)


@pytest.fixture
def cluster():
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    coord = Coordinator(router, shards=2, world=1, run_config={}, shard_timeout_s=1.0)
    shards = [Shard(ShardConfig(index=k)) for k in range(2)]
    for k, shard in enumerate(shards):
        coord.endpoints[k] = shard.endpoint
    peers = []

    def peer() -> Peer:
        peers.append(Peer(ctx, f"127.0.0.1:{port}"))
        return peers[-1]

    yield coord, shards, peer
    for p in peers:
        p.socket.close(linger=0)
    for shard in shards:
        shard.close()
    coord.close()
    router.close(linger=0)


def test_every_requester_of_a_gather_gets_every_shards_stats(cluster):
    coord, shards, peer = cluster
    a, b = peer(), peer()
    a.send({"op": "STATS"})
    b.send({"op": "STATS", "observer": "evaluator"})
    turns = time.monotonic() + 0.3
    while time.monotonic() < turns:  # the coordinator's loop turns; the shards' do not
        serve_once(coord, [])
    assert not a.socket.poll(0) and not b.socket.poll(0), "answered before the shards were"
    ra, rb = a.reply(coord, shards), b.reply(coord, shards)
    for r in (ra, rb):
        assert r["ok"] is True and [s["shard"] for s in r["shards"]] == [0, 1]
        assert all("error" not in s and s["version"] == 0 for s in r["shards"])
        assert r["coordinator"]["world"] == 1
    assert "evaluator" in coord.observers
    assert coord.gather.gathers <= 2  # b's STATS may have come after a's gather had started: it waited for the next


def test_a_silent_shard_is_an_error_entry_and_holds_up_nobody_else(cluster):
    coord, shards, peer = cluster
    stats, worker = peer(), peer()
    stats.send({"op": "STATS"})
    t0 = time.monotonic()
    worker.send({"op": "PING"})
    ping = worker.reply(coord, shards[:1])  # shard 1 never turns its loop: stopped, dead, or busy
    assert ping["ok"] is True and time.monotonic() - t0 < coord.shard_timeout_s
    reply = stats.reply(coord, shards[:1])
    assert time.monotonic() - t0 >= coord.shard_timeout_s
    s0, s1 = reply["shards"]
    assert s0["shard"] == 0 and "error" not in s0
    assert s1 == {"shard": 1, "endpoint": shards[1].endpoint, "error": s1["error"]} and "no reply" in s1["error"]
    # shard 1 now reads the request it let wait and answers it, too late: the next gather asks on a fresh socket
    serve_once(coord, shards)
    stats.send({"op": "STATS"})
    again = stats.reply(coord, shards)
    assert [s.get("version") for s in again["shards"]] == [0, 0]


def test_a_stats_after_a_push_sees_it(cluster):
    coord, shards, peer = cluster
    ranges = [(0, 10), (10, 20)]
    init = np.arange(20, dtype=np.float32)
    for shard, (start, end) in zip(shards, ranges):
        frames = protocol.encode({"op": "INIT", "start": start, "end": end, "total": 20, "world": 1,
                                  "rid": [1, 1]}, [init[start:end]])
        shard.handle([zmq.Frame(b"w"), *(zmq.Frame(bytes(f)) for f in frames)])
    p = peer()
    p.send({"op": "STATS"})
    reply = p.reply(coord, shards)
    assert [s["initialised"] for s in reply["shards"]] == [True, True]


def test_more_requesters_than_the_limit_are_answered_at_once_from_the_last_gather(cluster):
    coord, shards, peer = cluster
    coord.gather.limit = 1
    first, second = peer(), peer()
    first.send({"op": "STATS"})
    assert first.reply(coord, shards)["shards"][0]["shard"] == 0
    first.send({"op": "STATS"})  # waits for the next gather, filling the queue
    wait_for(lambda: serve_once(coord, []) or coord.gather.sockets(), 10, "the STATS to be asked of the shards")
    second.send({"op": "STATS"})
    quick = second.reply(coord, [])  # no shard turns: only the last gather can answer it
    assert [s["shard"] for s in quick["shards"]] == [0, 1]
    assert first.reply(coord, shards)["ok"] is True

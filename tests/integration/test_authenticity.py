"""Who may do what, against `pserver start`: forged worker ids and sequence numbers, shard INITs, REGISTER and
LOST from strangers, and, with --keys, the role of each key. Every probe is a raw ZeroMQ DEALER with a msgpack
header (with --keys, holding a listed key: a hostile insider), as an attacker would send it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq

from pserver import protocol
from pserver.client import Client
from pserver.errors import RemoteError
from pserver.layout import Layout
from pserver.security import client_curve, internal_curve

sys.path.insert(0, str(Path(__file__).parent))

pytestmark = pytest.mark.integration
LAYOUT = Layout.from_shapes([(50, 30), (30,), (1001,)])  # 2531 floats


def initial() -> np.ndarray:
    return np.random.default_rng(7).integers(-100, 100, LAYOUT.total).astype(np.float32)


def raw(endpoint: str, header: dict, arrays=(), curve: dict | None = None, timeout_s: float = 10.0) -> dict:
    """One request on a fresh DEALER; its reply's header (the test fails if none comes)."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if curve:
        s.curve_secretkey, s.curve_publickey, s.curve_serverkey = curve["secret"], curve["public"], curve["server"]
    s.connect(f"tcp://{endpoint}")
    try:
        s.send_multipart(protocol.encode(header, arrays))
        assert s.poll(int(timeout_s * 1000)), f"no reply to {header['op']} from {endpoint}"
        return protocol.decode(s.recv_multipart()).header
    finally:
        s.close()


def refused(reply: dict, *codes: str) -> bool:
    return reply["ok"] is False and reply["code"] in codes and bool(reply["reason"])


def shard_stats(c: Client) -> list[dict]:
    return c.stats()["shards"]


def test_a_forged_seq_sent_before_a_worker_starts_cannot_void_it(pserver):
    server = pserver("--shards", "2", "--workers", "2")
    a = Client(server.address)
    assert a.join("a")["rank"] == 0
    assert a.init(initial(), LAYOUT)
    for s in a.shards:  # a zero push for worker 1, seq 2^64 − 1, before worker 1 exists
        reply = raw(s.endpoint, {"op": "PUSH", "worker": 1, "seq": 2**64 - 1, "pulled": 0, "mode": "add"},
                    [np.zeros(s.end - s.start, np.float32)])
        assert refused(reply, "ticket", "malformed"), reply
    b = Client(server.address)
    assert b.join("b")["rank"] == 1
    for _ in range(5):
        b.push(np.ones(LAYOUT.total, np.float32))
    np.testing.assert_array_equal(a.pull(), initial() + 5)
    assert [s["updates"].get("1") for s in shard_stats(a)] == [5, 5]
    a.close()
    b.close()


def test_a_worker_whose_pushes_are_voided_fails_instead_of_training_on(pserver):
    server = pserver("--workers", "1")
    a = Client(server.address)
    a.join("a")
    a.init(initial(), LAYOUT)
    # another process holding this very rank's ticket (a copy of the worker) pushes far ahead within the
    # incarnation: the worker's own pushes would be answered as retries, never applied
    raw(a.shards[0].endpoint, {"op": "PUSH", **a.who(), "seq": (1 << 40) - 1, "pulled": 0, "mode": "add"},
        [np.zeros(LAYOUT.total, np.float32)])
    with pytest.raises(RemoteError, match="was not applied"):
        a.push(np.ones(LAYOUT.total, np.float32))
    a.close()


def test_forged_worker_ids_leave_no_state_and_init_must_be_the_coordinators(pserver):
    server = pserver("--shards", "2", "--workers", "2")
    shards = raw(server.address, {"op": "PING"})["shards"]
    n0 = LAYOUT.total // 2 + LAYOUT.total % 2
    # before any worker: an INIT of a world of 10^7, and one of the right world but a range of the attacker's
    for header in ({"start": 0, "end": n0, "total": LAYOUT.total, "world": 10**7},
                   {"start": 0, "end": 10, "total": 10, "world": 2}):
        size = header["end"] - header["start"]
        reply = raw(shards[0]["endpoint"], {"op": "INIT", **header}, [np.zeros(size, np.float32)])
        assert refused(reply, "malformed", "ticket"), reply
    a = Client(server.address)
    a.join("a")
    assert a.init(initial(), LAYOUT)
    endpoint = a.shards[0].endpoint
    n = a.shards[0].end - a.shards[0].start
    for w in (2, 3, 1000, 200_000, 2**31 - 2):
        for op, arrays in (("PUSH", [np.zeros(n, np.float32)]), ("PULL", [])):
            reply = raw(endpoint, {"op": op, "worker": w, "seq": 1, "pulled": 0, "mode": "add"}, arrays)
            assert refused(reply, "malformed", "ticket"), (op, w, reply)
    stats = shard_stats(a)[0]
    assert stats["world"] == 2 and stats["version"] == 0
    assert set(stats["updates"]) | set(stats["pulls"]) <= {"0", "1", str(protocol.OBSERVER)}, stats["pulls"]
    a.close()


def test_register_and_lost_from_a_stranger_are_refused(pserver):
    server = pserver("--shards", "2", "--workers", "2")
    before = raw(server.address, {"op": "PING"})["shards"]
    reply = raw(server.address, {"op": "REGISTER", "shard": 0, "endpoint": "127.0.0.1:9"})
    assert refused(reply, "ticket"), reply
    assert raw(server.address, {"op": "PING"})["shards"] == before
    a = Client(server.address)
    a.join("a")
    a.init(initial(), LAYOUT)
    assert refused(raw(a.shards[0].endpoint, {"op": "LOST", "lost": [0, 1]}), "ticket")
    assert shard_stats(a)[0]["lost"] == []
    a.close()


def test_keys_have_roles(pserver, tmp_path):
    from runner.launcher import EVALUATOR_KEY, run_keys

    keys = run_keys(tmp_path / "keys", workers=2)
    server = pserver("--keys", str(keys), "--shards", "1", "--workers", "2")
    curves = {name: client_curve(keys, name) for name in ("worker0", "worker1", EVALUATOR_KEY)}
    w0, w1 = Client(server.address, curve=curves["worker0"]), Client(server.address, curve=curves["worker1"])
    r0, r1 = w0.join("w0")["rank"], w1.join("w1")["rank"]
    # worker1's key sends a shard INIT of its own range first: refused, and the real INIT goes through
    endpoint = w0.shards[0].endpoint
    reply = raw(endpoint, {"op": "INIT", "start": 0, "end": 10, "total": 10, "world": 2},
                [np.zeros(10, np.float32)], curve=curves["worker1"])
    assert refused(reply, "ticket"), reply
    assert w0.init(initial(), LAYOUT)
    assert not w1.init(initial(), LAYOUT)  # as a worker does: it learns the slices
    # worker0's key: another rank, another rank's DONE and heartbeat, STOP, REGISTER, LOST, and a push as rank 1
    for header in ({"op": "JOIN", "name": "again"}, {"op": "DONE", "rank": r1}, {"op": "HEARTBEAT", "rank": r1},
                   {"op": "STOP", "reason": "w0 says so"}, {"op": "REGISTER", "shard": 0, "endpoint": "127.0.0.1:9"}):
        assert refused(raw(server.address, header, curve=curves["worker0"]), "role"), header
    assert refused(raw(endpoint, {"op": "LOST", "lost": [r1]}, curve=curves["worker0"]), "role")
    reply = raw(endpoint, {"op": "PUSH", **w1.who(), "seq": 1, "pulled": 0, "mode": "add"},
                [np.zeros(LAYOUT.total, np.float32)], curve=curves["worker0"])
    assert refused(reply, "ticket"), reply
    # the rightful workers go on
    w1.push(np.ones(LAYOUT.total, np.float32))
    w0.heartbeat()
    w1.done({})
    # the operator reads stats, and may not stop the run; the evaluator may
    out = subprocess.run([sys.executable, "-m", "pserver.cli", "stats", server.address, "--json", "--keys", str(keys)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["shards"][0]["version"] == 1 and data["coordinator"]["stop"] == ""
    assert data["coordinator"]["workers"][str(r1)]["done"] and not data["coordinator"]["workers"][str(r0)]["done"]
    from pserver.security import operator_curve

    assert refused(raw(server.address, {"op": "STOP"}, curve=operator_curve(keys)), "role")
    assert raw(server.address, {"op": "STOP", "reason": "target"}, curve=curves[EVALUATOR_KEY])["ok"]
    # the server's own key moves nothing it should not either: its REGISTER is the shard's business, and passes
    assert raw(server.address, {"op": "REGISTER", "shard": 0, "endpoint": endpoint}, curve=internal_curve(keys))["ok"]
    w0.close()
    w1.close()

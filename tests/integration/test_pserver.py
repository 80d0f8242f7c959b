"""`pserver start` as a real process: invariants, idempotent retries, stats."""
import json
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import psutil
import pytest
import zmq

from pserver import protocol
from pserver.client import Client, ClientConfig
from pserver.errors import RemoteError, ServerUnreachable
from pserver.layout import Layout

sys.path.insert(0, str(Path(__file__).parent))
from pusher import deltas  # noqa: E402

pytestmark = pytest.mark.integration
LAYOUT = Layout.from_shapes([(50, 30), (30,), (1001,)])  # 2531 floats, odd on purpose


def initial() -> np.ndarray:
    return np.random.default_rng(7).integers(-100, 100, LAYOUT.total).astype(np.float32)


def test_centre_equals_initial_plus_everything_pushed(pserver):
    server = pserver("--shards", "2", "--workers", "3")
    driver = Client(server.address, worker=1000)
    assert driver.init(initial(), LAYOUT)
    pushes, seeds = 40, [11, 12, 13]
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "pusher.py"), server.address,
                               str(w), str(pushes), str(s)]) for w, s in enumerate(seeds)]
    for p in procs:
        assert p.wait(120) == 0
    expected = initial().copy()
    for s in seeds:
        for d in deltas(LAYOUT.total, pushes, s):
            expected += d
    centre = driver.pull()
    np.testing.assert_array_equal(centre, expected)
    # every shard applied every push exactly once
    stats = driver.stats()
    assert [s["version"] for s in stats["shards"]] == [3 * pushes] * 2
    for s in stats["shards"]:
        assert sum(s["updates"].values()) == 3 * pushes
        assert sum(sum(h) for h in s["staleness"].values()) == 3 * pushes
    assert all(w["done"] for w in stats["coordinator"]["workers"].values())
    driver.close()


def raw_request(endpoint: str, frames, timeout_s: float = 5.0):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{endpoint}")
    try:
        s.send_multipart(frames)
        if not s.poll(int(timeout_s * 1000)):
            return None
        return protocol.decode(s.recv_multipart())
    finally:
        s.close()


def test_retried_push_is_applied_once(pserver):
    server = pserver("--workers", "2")
    c = Client(server.address)
    c.join("a")
    c.init(initial(), LAYOUT)
    endpoint = c.shards[0].endpoint
    delta = np.ones(LAYOUT.total, np.float32)
    push = protocol.encode({"op": "PUSH", **c.who(), "seq": 1, "pulled": 0, "mode": "add"}, [delta])
    first = raw_request(endpoint, [bytes(f) for f in push])
    again = raw_request(endpoint, [bytes(f) for f in push])  # as a retry after a lost reply would
    assert first.header["applied"] is True and again.header["applied"] is False
    assert again.header["version"] == 1
    np.testing.assert_array_equal(c.pull(), initial() + 1)
    stats = c.stats()["shards"][0]
    assert stats["duplicates"] == {"0": 1} and stats["version"] == 1
    # another worker's first push carries seq 1 too: it is a different worker id, so it applies
    other = Client(server.address)
    other.join("b")
    other.push(delta)
    np.testing.assert_array_equal(c.pull(), initial() + 2)
    other.close()
    c.close()


def checksum(c: Client) -> bytes:
    return c.pull().tobytes()


def bad_messages(n: int, who: dict):
    """(name, frames, expected error code) for every kind of bad input, from the joined worker ``who``."""
    ok_header = {"v": 1, "op": "PUSH", **who, "seq": 1, "pulled": 0, "mode": "add"}
    good = np.ones(n, np.float32)
    nan = good.copy(); nan[n // 2] = np.nan
    inf = good.copy(); inf[0] = np.inf
    pack = lambda h: msgpack.packb(h)
    return [
        ("bad msgpack", [b"\xc1\xc1"], "malformed"),
        ("not a map", [pack([1, 2, 3])], "malformed"),
        ("wrong version", [pack({**ok_header, "v": 2, "arrays": [["<f4", n]]}), good.tobytes()], "version"),
        ("unknown op", [pack({"v": 1, "op": "DROP_TABLES"})], "unknown_op"),
        ("missing field", [pack({"v": 1, "op": "PUSH", **who, "arrays": [["<f4", n]]}), good.tobytes()], "malformed"),
        ("wrong field type", [pack({**ok_header, "seq": "1", "arrays": [["<f4", n]]}), good.tobytes()], "malformed"),
        ("unknown mode", [pack({**ok_header, "mode": "exec", "arrays": [["<f4", n]]}), good.tobytes()], "malformed"),
        ("truncated frame", [pack({**ok_header, "arrays": [["<f4", n]]}), good.tobytes()[:-4]], "size"),
        ("missing frame", [pack({**ok_header, "arrays": [["<f4", n]]})], "frames"),
        ("extra frame", [pack({**ok_header, "arrays": [["<f4", n]]}), good.tobytes(), b"x"], "frames"),
        ("wrong dtype", [pack({**ok_header, "arrays": [["<f8", n]]}), np.ones(n).tobytes()], "dtype"),
        ("int64 delta", [pack({**ok_header, "arrays": [["<i8", n]]}), np.ones(n, np.int64).tobytes()], "dtype"),
        ("wrong length", [pack({**ok_header, "arrays": [["<f4", n + 1]]}), np.ones(n + 1, np.float32).tobytes()], "size"),
        ("negative length", [pack({**ok_header, "arrays": [["<f4", -4]]}), b""], "size"),
        ("huge length", [pack({**ok_header, "arrays": [["<f4", 2**60]]}), b"\0" * 16], "size"),
        ("NaN delta", [pack({**ok_header, "arrays": [["<f4", n]]}), nan.tobytes()], "not_finite"),
        ("Inf delta", [pack({**ok_header, "arrays": [["<f4", n]]}), inf.tobytes()], "not_finite"),
        ("NaN scale", [pack({**ok_header, "mode": "scaled", "scale": float("nan"), "arrays": [["<f4", n]]}),
                       good.tobytes()], "not_finite"),
        ("re-INIT other range", [pack({"v": 1, "op": "INIT", "start": 0, "end": n, "total": n + 5, "world": 1,
                                       "arrays": [["<f4", n]]}), good.tobytes()], "ticket"),  # not the coordinator's slice
    ]


def test_bad_input_gets_an_error_reply_and_leaves_the_centre(pserver):
    server = pserver("--max-message-mb", "1")
    c = Client(server.address)
    c.join("a")
    c.init(initial(), LAYOUT)
    endpoint = c.shards[0].endpoint
    before = checksum(c)
    cases = bad_messages(LAYOUT.total, c.who())
    for name, frames, code in cases:
        reply = raw_request(endpoint, frames)
        assert reply is not None, name
        assert reply.header["ok"] is False, name
        assert reply.header["code"] == code, (name, reply.header)
        assert reply.header["reason"], name
        assert checksum(c) == before, name
    # a frame over MAXMSGSIZE: ZeroMQ drops the peer; no reply, and the shard goes on
    assert raw_request(endpoint, [msgpack.packb({"v": 1, "op": "PING"}), b"\0" * (2 << 20)], timeout_s=1.0) is None
    assert raw_request(endpoint, [msgpack.packb({"v": 1, "op": "PING"})]).header["ok"] is True
    assert checksum(c) == before
    stats = c.stats()["shards"][0]
    assert stats["version"] == 0 and sum(stats["refused"].values()) == len(cases)
    assert stats["refused"]["not_finite"] == 3 and stats["refused"]["size"] == 4
    # the coordinator too
    for frames in ([b"\xc1"], [msgpack.packb({"v": 1, "op": "JOIN", "rank": "x"})], [msgpack.packb({"v": 0, "op": "JOIN"})]):
        reply = raw_request(server.address, frames)
        assert reply.header["ok"] is False and reply.header["reason"]
    # a model of another shape is refused by name
    with pytest.raises(RemoteError, match=r"mismatch.*tensor 2 \('w2'\) has shape \(1000,\)"):
        Client(server.address).init(np.zeros(2530, np.float32), Layout.from_shapes([(50, 30), (30,), (1000,)]))
    assert checksum(c) == before
    c.close()


def test_unreachable_shard_is_named_with_the_wait():
    c = Client("127.0.0.1:9", ClientConfig(timeout_s=0.2, retries=1, backoff_s=0.05))
    with pytest.raises(ServerUnreachable, match=r"127\.0\.0\.1:9 after 2 attempt\(s\) of 0\.2 s"):
        c.ask({"op": "PING"})
    c.close()


def test_stats_cli(pserver):
    server = pserver("--shards", "2", "--workers", "2")
    c = Client(server.address)
    c.join("a")
    c.init(initial(), LAYOUT)
    c.pull()
    for _ in range(3):
        c.push(np.ones(LAYOUT.total, np.float32))
    out = subprocess.run([sys.executable, "-m", "pserver.cli", "stats", server.address, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["coordinator"]["pid"] == server.proc.pid  # `pserver start` runs the coordinator itself
    shard_pids = {p.pid for p in psutil.Process(server.proc.pid).children() if "pserver.shard_process" in p.cmdline()}
    assert {s["pid"] for s in data["shards"]} == shard_pids and len(shard_pids) == 2
    assert [s["version"] for s in data["shards"]] == [3, 3]
    assert [s["start"] for s in data["shards"]] == [0, 1266]
    # three pushes on one pull: the shard's clock moved on under the second and third
    assert data["shards"][0]["staleness"]["0"][:4] == [1, 1, 1, 0]
    text = subprocess.run([sys.executable, "-m", "pserver.cli", "stats", server.address],
                          capture_output=True, text=True, timeout=60).stdout
    assert "version 3" in text and "worker 0: 3 updates" in text
    c.close()

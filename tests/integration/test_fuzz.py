"""Seeded fuzzing of a live shard and coordinator with raw DEALER sockets.

Every message is built to be invalid: random bytes, truncated or bit-flipped
headers, wrong frame counts, huge, negative and wrong-length sizes, wrong
versions, unknown ops, known ops with fields of the wrong type, NaN/Inf
deltas, and frames above MAXMSGSIZE. Messages made by random mutation are
checked against the protocol decoder and regenerated in the rare case that
the mutation produced a message that could be valid.

What is checked, with the messages counted as they are handed to ZeroMQ (per
endpoint and per op):

- at least 10,000 were sent, and every op of the templates was fuzzed;
- every message that expects an answer got exactly one reply, an error with a
  known, non-internal code. Error replies carry no request id or seq (only
  ok, code, reason), so replies are matched by position: one request in flight
  per socket, and after the last one each socket is drained for strays. The
  shard's and the coordinator's own refusal counters must equal, code by code,
  the error replies received (+ the one NO_SUCH_OP probe each);
- frames above MAXMSGSIZE get no reply (ZeroMQ drops them with the connection),
  and the endpoint answers a PING on a fresh connection;
- the coordinator and every shard process are alive at the end, the same
  processes as at the start (none restarted), and each answers a PING;
- the centre's SHA-256 and versions are what a pull returned before;
- each shard's RSS grows by at most RSS_GROWTH_BOUND from after a warm-up of
  WARMUP messages (lazily compiled kernels and allocator pools settle) to the end.
"""
import hashlib
import random
import re
import time
from collections import Counter

import msgpack
import numpy as np
import psutil
import pytest
import zmq

from pserver import protocol
from pserver.client import Client
from pserver.coordinator import MAX_MESSAGE_BYTES
from pserver.errors import ProtocolError
from pserver.layout import Layout

pytestmark = pytest.mark.integration
LAYOUT = Layout.from_shapes([(50, 30), (30,), (1001,)])  # 2531 floats
MESSAGES = 12_000
WARMUP = 1_000  # messages before the RSS baseline
RSS_GROWTH_BOUND = 4 * 2**20  # bytes per shard over the other 11,000 messages: a leak of 400 B a message fails
REPLY_TIMEOUT_S = 5.0
SEED = 20240606
FUZZ_WORKER = 7777  # never pushes anything valid, so no seq of it is ever "a duplicate"
BAD_VALUES = ["x", 1.5, None, [1], {"a": 1}, True, -(2**40), 2**62]


class Target:
    def __init__(self, name: str, endpoint: str, context: zmq.Context) -> None:
        self.name, self.endpoint, self.context = name, endpoint, context
        self.socket = None
        self.connect()
        # Learn the ops this endpoint serves from its own unknown_op reply (robust to ops added later).
        reply = self.ask([msgpack.packb({"v": 1, "op": "NO_SUCH_OP"})])
        self.ops = set(re.findall(r"'([A-Z_]+)'", reply.header["reason"].split("expected one of", 1)[1]))
        assert self.ops, reply.header

    def connect(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDTIMEO, int(REPLY_TIMEOUT_S * 1000))  # a send can fail, not hang
        self.socket.connect(f"tcp://{self.endpoint}")

    def send(self, frames) -> None:
        """Returns once ZeroMQ has taken the message (zmq.Again if it would not within the timeout)."""
        self.socket.send_multipart(frames, copy=True)

    def receive(self, timeout_s: float = REPLY_TIMEOUT_S):
        if not self.socket.poll(int(timeout_s * 1000)):
            return None
        return protocol.decode(self.socket.recv_multipart())

    def ask(self, frames, timeout_s: float = REPLY_TIMEOUT_S):
        self.send(frames)
        return self.receive(timeout_s)


def could_be_valid(frames, ops) -> bool:
    """The decoder accepts it and the op is served: only the handler could tell."""
    try:
        msg = protocol.decode(frames)
    except ProtocolError:
        return False
    return msg.op in ops


def templates(n: int, total: int):
    """(header, arrays) of messages each endpoint serves; the raw material for mutations."""
    f4 = np.arange(n, dtype=np.float32)
    shard = [
        ({"op": "PUSH", "worker": FUZZ_WORKER, "seq": 1, "pulled": 0, "mode": "add"}, [f4]),
        ({"op": "PUSH", "worker": FUZZ_WORKER, "seq": 2, "pulled": 0, "mode": "scaled", "scale": 0.5}, [f4]),
        ({"op": "PULL", "worker": FUZZ_WORKER}, []),
        ({"op": "ROUND", "worker": 0, "seq": 1, "round": 0, "mode": "average"}, [f4]),
        ({"op": "INIT", "start": 0, "end": n, "total": total, "world": 1}, [f4]),
        ({"op": "BYE", "worker": FUZZ_WORKER}, []),
        ({"op": "LOST", "lost": [FUZZ_WORKER], "done": []}, []),
        ({"op": "STATS"}, []),
        ({"op": "PING"}, []),
    ]
    coord = [
        ({"op": "JOIN", "name": "fuzz", "rank": 0}, []),
        ({"op": "INIT", "layout": LAYOUT.to_wire(), "architecture": ""}, []),
        ({"op": "HEARTBEAT", "rank": 0}, []),
        ({"op": "DONE", "rank": 0, "report": {}}, []),
        ({"op": "REGISTER", "shard": 0, "endpoint": "127.0.0.1:1"}, []),
        ({"op": "STOP", "reason": "fuzz"}, []),
        ({"op": "STATS"}, []),
        ({"op": "PING"}, []),
    ]
    return shard, coord


# Required fields per op: replacing one with a value of another type must be refused.
REQUIRED = {
    "PULL": ["worker"], "PUSH": ["worker", "seq", "pulled", "mode"], "ROUND": ["worker", "round", "mode"],
    "BYE": ["worker"], "LOST": ["lost"], "INIT": ["start", "end", "total", "world", "layout"],
    "JOIN": ["rank", "name"], "HEARTBEAT": ["rank"], "DONE": ["rank"], "REGISTER": ["shard", "endpoint"],
    "STOP": ["reason"],
}


def bad_for(name: str, value, rnd: random.Random):
    """A value that the field ``name`` (currently ``value``) cannot take."""
    while True:
        bad = rnd.choice(BAD_VALUES)
        if type(bad) is type(value) and name not in ("worker", "shard"):
            continue  # another value of the right type may be valid (any int is a valid JOIN rank)
        return bad  # worker and shard ids: the huge and negative ints are out of range


def make(rnd: random.Random, target: Target, pool, n: int) -> tuple[str, str, list[bytes]]:
    """One invalid message: (category, the op it was made from, frames)."""
    header, arrays = rnd.choice(pool)
    op_label = header["op"]
    frames = [bytes(f) for f in protocol.encode(header, arrays)]
    kind = rnd.choice(["random_bytes", "truncated", "bitflip", "frame_count", "sizes", "version",
                       "wrong_length", "random_op", "field_type", "not_map", "non_finite"])
    if kind == "random_bytes":
        op_label = "(random bytes)"
        out = [rnd.randbytes(rnd.randrange(0, 64)) for _ in range(rnd.randrange(1, 4))]
    elif kind == "truncated":
        out = [frames[0][: rnd.randrange(0, len(frames[0]))], *frames[1:]]
    elif kind == "bitflip":
        head = bytearray(frames[0])
        for _ in range(rnd.randrange(1, 4)):
            head[rnd.randrange(len(head))] ^= 1 << rnd.randrange(8)
        out = [bytes(head), *frames[1:]]
    elif kind == "frame_count":
        h = dict(header, v=1, arrays=[["<f4", n]] * rnd.randrange(0, 4))
        k = len(h["arrays"])
        count = rnd.choice([c for c in range(5) if c != k])
        out = [msgpack.packb(h), *[np.zeros(n, np.float32).tobytes()] * count]
    elif kind == "sizes":
        spec = rnd.choice([["<f4", -1], ["<f4", -(2**63)], ["<f4", 2**40], ["<f4", 2**64 - 1], ["<f4", n + 1],
                           ["<f4", n - 1], ["<f4", 0], ["<f4", 1.5], ["<f4", "n"], ["<f4", None], ["<f8", n],
                           ["|u1", n], ["<f4"], "f4", ["<f4", n, 1], [None, n], ["<i8", n]])
        if spec == ["<f4", 0]:
            out = [msgpack.packb(dict(header, v=1, arrays=[spec])), np.zeros(n, np.float32).tobytes()]
        elif spec == ["<i8", n]:  # the right size for int64: refused by dtype, not by size
            out = [msgpack.packb(dict(header, v=1, arrays=[spec])), np.zeros(n, np.int64).tobytes()]
        else:
            out = [msgpack.packb(dict(header, v=1, arrays=[spec])), np.zeros(n, np.float32).tobytes()]
    elif kind == "version":
        h = dict(header, arrays=[["<f4", a.size] for a in arrays]) if arrays else dict(header)
        v = rnd.choice([0, 2, -1, 1.0, True, "1", None, [1], 2**40, "missing"])
        if v == "missing":
            h.pop("v", None)
        else:
            h["v"] = v
        out = [msgpack.packb(h), *frames[1:]]
    elif kind == "wrong_length":
        h = dict(header, v=1, arrays=[["<f4", n]])
        size = rnd.choice([0, 3, 4 * n - 4, 4 * n - 1, 4 * n + 1, 4 * n + 4, 8 * n, rnd.randrange(0, 8 * n)])
        if size == 4 * n:
            size += 4
        out = [msgpack.packb(h), rnd.randbytes(size)]
    elif kind == "random_op":
        op = rnd.choice([rnd.randbytes(rnd.randrange(1, 12)).hex().upper(), "", "push", "Pull", "INIT ", 5, None,
                         ["PUSH"], {"op": "PUSH"}, 1.0, "EVAL", "__import__"])
        if isinstance(op, str) and op in target.ops:
            op = op + "_"
        op_label = "(unknown op)"
        out = [msgpack.packb(dict(header, v=1, op=op, arrays=[["<f4", a.size] for a in arrays])), *frames[1:]]
    elif kind == "field_type":
        ops = [(h, a) for h, a in pool if REQUIRED.get(h["op"]) and h["op"] in target.ops]
        header, arrays = rnd.choice(ops)
        op_label = header["op"]
        name = rnd.choice([f for f in REQUIRED[header["op"]] if f in header])
        h = dict(header, v=1, arrays=[["<f4", a.size] for a in arrays])
        h[name] = bad_for(name, header[name], rnd)
        if h[name] == "x" and name in ("name", "reason", "endpoint", "mode"):
            h[name] = 5 if name != "mode" else "exec"  # strings are valid there
        if name == "endpoint":
            h[name] = rnd.choice([5, None, [1], "no-port", "h:" + "9" * 400])
        if name == "mode":
            h[name] = rnd.choice([5, None, [1], "exec", "ADD", ""])
        out = [msgpack.packb(h), *[bytes(a.tobytes()) for a in arrays]]
    elif kind == "not_map":
        op_label = "(header not a map)"
        out = [msgpack.packb(rnd.choice([[1, 2, 3], 7, "PUSH", None, 1.5, [{"v": 1, "op": "PING"}], True])),
               *frames[1:]]
    else:  # non_finite: a well-formed PUSH whose delta or scale is NaN/Inf
        op_label = "PUSH"
        delta = np.ones(n, np.float32)
        for _ in range(rnd.randrange(1, 4)):
            delta[rnd.randrange(n)] = rnd.choice([np.nan, np.inf, -np.inf])
        h = {"op": "PUSH", "worker": FUZZ_WORKER, "seq": rnd.randrange(1, 2**40), "pulled": 0, "mode": "add"}
        if rnd.random() < 0.3:
            delta[:] = 1
            h.update(mode="scaled", scale=rnd.choice([float("nan"), float("inf")]))
        out = [bytes(f) for f in protocol.encode(h, [delta])]
        if target.name == "coordinator":
            out[0] = msgpack.packb(dict(msgpack.unpackb(out[0]), op="PUSH"))  # not served there: unknown_op
    return kind, op_label, out


def shard_processes(server) -> dict[int, psutil.Process]:
    """The `pserver.shard_process` children of `pserver start`, by shard index."""
    out = {}
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        cmd = p.cmdline()
        if "pserver.shard_process" in cmd:
            out[int(cmd[cmd.index("--index") + 1])] = p
    return out


def running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def is_error_reply(reply) -> bool:
    h = reply.header
    return (h.get("ok") is False and isinstance(h.get("reason"), str) and bool(h["reason"])
            and h.get("code") in protocol.ERROR_CODES and h["code"] != "internal")


def test_fuzz_shard_and_coordinator(pserver):
    server = pserver("--max-message-mb", "1", "--shards", "2")
    c = Client(server.address, worker=1)
    c.join("honest")
    start = np.random.default_rng(1).standard_normal(LAYOUT.total).astype(np.float32)
    c.init(start, LAYOUT)
    c.push(np.ones(LAYOUT.total, np.float32))
    centre = c.pull()
    np.testing.assert_array_equal(centre, start + 1)
    checksum = hashlib.sha256(centre.tobytes()).hexdigest()
    versions = list(c.versions)
    shard0 = c.shards[0]
    n = shard0.end - shard0.start
    shards = shard_processes(server)
    assert sorted(shards) == [0, 1], shards
    coordinator = psutil.Process(server.proc.pid)
    family = {p.pid for p in coordinator.children(recursive=True)}

    ctx = zmq.Context.instance()
    targets = {"shard": Target("shard", shard0.endpoint, ctx), "coordinator": Target("coordinator", server.address, ctx)}
    pools = dict(zip(("shard", "coordinator"), templates(n, LAYOUT.total)))
    assert "LOST" in targets["shard"].ops and "JOIN" in targets["coordinator"].ops
    rnd = random.Random(SEED)
    sent = {name: Counter() for name in targets}  # op -> messages ZeroMQ took
    codes = {name: Counter() for name in targets}  # error code -> error replies received
    kinds: Counter = Counter()
    expected = dict.fromkeys(targets, 0)  # messages that must be answered
    answered = dict.fromkeys(targets, 0)
    bad = []  # (message, endpoint, kind, what went wrong): no reply, or not a proper error reply
    regenerated = 0
    rss_before: dict[int, int] = {}
    t0 = time.perf_counter()
    for i in range(MESSAGES):
        if i == WARMUP:
            rss_before = {k: p.memory_info().rss for k, p in shards.items()}
        name = "shard" if rnd.random() < 0.6 else "coordinator"
        target = targets[name]
        while True:
            kind, op, frames = make(rnd, target, pools[name], n)
            if kind not in ("field_type", "non_finite") and could_be_valid(frames, target.ops):
                regenerated += 1  # a mutation that might be a real request: not a fuzz case
                continue
            break
        try:
            target.send(frames)
        except zmq.Again:
            bad.append((i, name, kind, "ZeroMQ would not take it"))
            break
        sent[name][op] += 1
        kinds[kind] += 1
        expected[name] += 1
        reply = target.receive()  # one request in flight per socket: this is its reply
        if reply is None:
            bad.append((i, name, kind, f"no reply within {REPLY_TIMEOUT_S} s to {frames[:1]!r}"))
            break  # the endpoint may be gone: waiting on every remaining message would take hours
        answered[name] += 1
        codes[name][reply.header.get("code")] += 1
        if not is_error_reply(reply):
            bad.append((i, name, kind, f"{frames[:1]!r} answered {reply.header}"))
    stray = {}
    for name, target in targets.items():  # a request answered twice would leave a reply behind
        stray[name] = 0
        while target.receive(timeout_s=0.2) is not None:
            stray[name] += 1
    # Frames above MAXMSGSIZE: ZeroMQ drops the connection, so no reply; the server goes on.
    oversized = 0
    for name, target in targets.items():
        limit = 1 << 20 if name == "shard" else MAX_MESSAGE_BYTES  # --max-message-mb 1; the coordinator's
        for size in (limit + 16, limit * 3):
            frames = [msgpack.packb({"v": 1, "op": "PING"}), b"\0" * size]
            assert target.ask(frames, timeout_s=0.5) is None, f"{name} answered a frame of {size} bytes"
            oversized += 1
            target.connect()
            assert target.ask([msgpack.packb({"v": 1, "op": "PING"})]).header["ok"] is True
    elapsed = time.perf_counter() - t0
    rss_after = {k: p.memory_info().rss for k, p in shards.items() if running(p)}
    for t in targets.values():
        t.socket.close(linger=0)

    total = sum(sum(ops.values()) for ops in sent.values()) + oversized
    print(f"\nfuzz: {total} messages sent in {elapsed:.1f} s ({regenerated} mutations regenerated), "
          f"of which {oversized} oversized\n  to shard 0, by op: {dict(sent['shard'])}\n"
          f"  to the coordinator, by op: {dict(sent['coordinator'])}\n  kinds {dict(kinds)}\n"
          f"  error codes: shard {dict(codes['shard'])}, coordinator {dict(codes['coordinator'])}\n"
          f"  shard RSS after the warm-up → at the end: "
          + ", ".join(f"{k}: {rss_before.get(k, 0) / 2**20:.1f} → {rss_after.get(k, 0) / 2**20:.1f} MiB"
                      for k in sorted(shards)))
    # Every message was sent, answered once, and with an error.
    assert not bad, bad[:10]
    assert total >= 10_000 and total == MESSAGES + oversized, (total, sent)
    for name in targets:
        assert set(sent[name]) >= {h["op"] for h, _ in pools[name] if h["op"] in targets[name].ops}, sent[name]
    assert answered == expected and sum(expected.values()) == MESSAGES, (answered, expected)
    assert stray == {"shard": 0, "coordinator": 0}, stray
    # The processes: alive, none restarted, and answering.
    assert server.proc.poll() is None and running(coordinator), "the coordinator (`pserver start`) exited"
    for k, p in shards.items():
        assert running(p), f"shard {k} (pid {p.pid}) is gone"
    assert {p.pid for p in coordinator.children(recursive=True)} == family  # no shard restarted
    stats = c.stats()
    assert [s.get("error") for s in stats["shards"]] == [None, None], stats["shards"]  # each answered STATS
    # Each endpoint counted exactly the refusals we were answered with (+ its NO_SUCH_OP probe).
    probe = Counter({"unknown_op": 1})
    assert Counter(stats["shards"][0]["refused"]) == codes["shard"] + probe
    assert stats["shards"][1]["refused"] == {}  # never addressed
    assert Counter(stats["coordinator"]["refused"]) == codes["coordinator"] + probe
    # The centre: untouched by any of it.
    after = c.pull()
    assert hashlib.sha256(after.tobytes()).hexdigest() == checksum and c.versions == versions
    # Memory: no per-message growth.
    for k in shards:
        growth = rss_after[k] - rss_before[k]
        assert growth <= RSS_GROWTH_BOUND, \
            f"shard {k} RSS grew by {growth / 2**20:.1f} MiB (bound {RSS_GROWTH_BOUND / 2**20:.0f} MiB)"
    c.close()

"""Seeded fuzzing of a live shard and coordinator with raw DEALER sockets, shared by the CI test
(tests/integration/test_fuzz.py, 12,000 messages) and the benchmark (bench/test_bench_fuzz.py, 100,000).

Every message is built to be invalid: random bytes, truncated or bit-flipped
headers, wrong frame counts, huge, negative and wrong-length sizes, wrong
versions, unknown ops, known ops with fields of the wrong type, NaN/Inf
deltas, and frames above MAXMSGSIZE. Messages made by random mutation are
checked against the protocol decoder and regenerated in the rare case that
the mutation produced a message that could be valid. With CurveZMQ the fuzzer
holds a listed worker key (a hostile insider: its messages reach the
handlers), and a peer with an unlisted key is checked to get no reply at all.

`baseline` starts an honest client (JOIN, INIT, one push) and records the
centre, `fuzz` sends the messages, `verify` asserts:

- every op of the templates was fuzzed, at each endpoint;
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
- each shard's RSS grows by at most `rss_bound` bytes from after a warm-up
  (lazily compiled kernels and allocator pools settle) to the end.
"""
from __future__ import annotations

import hashlib
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import msgpack
import numpy as np
import psutil
import zmq

from pserver import protocol
from pserver.client import Client
from pserver.coordinator import MAX_MESSAGE_BYTES
from pserver.errors import ProtocolError
from pserver.layout import Layout

LAYOUT = Layout.from_shapes([(50, 30), (30,), (1001,)])  # 2531 floats
MAX_MESSAGE_MB = 1  # `pserver start --max-message-mb` the fuzzed server must be given
WARMUP = 1_000  # messages before the RSS baseline
RSS_GROWTH_BOUND = 4 * 2**20  # bytes per shard after the warm-up: a leak of 400 B a message over 11,000 fails
REPLY_TIMEOUT_S = 5.0
SEED = 20240606
SHARD_SHARE = 0.6  # of the messages, to shard 0; the rest to the coordinator
FUZZ_WORKER = 7777  # never pushes anything valid, so no seq of it is ever "a duplicate"
BAD_VALUES = ["x", 1.5, None, [1], {"a": 1}, True, -(2**40), 2**62]
PING = [msgpack.packb({"v": 1, "op": "PING"})]


class Target:
    """A raw DEALER to one endpoint; `curve` is a Client's curve dict (None: plain TCP)."""

    def __init__(self, name: str, endpoint: str, context: zmq.Context, curve: dict[str, bytes] | None = None,
                 probe: bool = True) -> None:
        self.name, self.endpoint, self.context, self.curve = name, endpoint, context, curve
        self.socket = None
        self.connect()
        self.ops: set[str] = set()
        if probe:  # learn the ops this endpoint serves from its own unknown_op reply (robust to ops added later)
            reply = self.ask([msgpack.packb({"v": 1, "op": "NO_SUCH_OP"})])
            assert reply is not None, f"{name} at {endpoint} did not answer the NO_SUCH_OP probe"
            self.ops = set(re.findall(r"'([A-Z_]+)'", reply.header["reason"].split("expected one of", 1)[1]))
            assert self.ops, reply.header

    def connect(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDTIMEO, int(REPLY_TIMEOUT_S * 1000))  # a send can fail, not hang
        if self.curve:
            self.socket.curve_secretkey = self.curve["secret"]
            self.socket.curve_publickey = self.curve["public"]
            self.socket.curve_serverkey = self.curve["server"]
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

    def close(self) -> None:
        self.socket.close(linger=0)


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
        if spec == ["<i8", n]:  # the right size for int64: refused by dtype, not by size
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


def running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def server_processes() -> tuple[psutil.Process, dict[int, psutil.Process]]:
    """The one `pserver start` this process started (the coordinator), and its shard processes by index."""
    found = [p for p in psutil.Process().children(recursive=True)
             if running(p) and "runner.pserver_cli" in p.cmdline()]
    assert len(found) == 1, f"expected one `pserver start` among this process's children, found {found}"
    shards = {}
    for p in found[0].children(recursive=True):
        cmd = p.cmdline()
        if "pserver.shard_process" in cmd:
            shards[int(cmd[cmd.index("--index") + 1])] = p
    return found[0], shards


def is_error_reply(reply) -> bool:
    h = reply.header
    return (h.get("ok") is False and isinstance(h.get("reason"), str) and bool(h["reason"])
            and h.get("code") in protocol.ERROR_CODES and h["code"] != "internal")


@dataclass
class Baseline:
    """An honest client's view before the fuzzing: the centre and the processes to find unchanged after."""
    client: Client
    checksum: str
    versions: list[int]
    coordinator: psutil.Process
    shards: dict[int, psutil.Process]
    family: set[int]


def baseline(address: str, curve: dict[str, bytes] | None = None) -> Baseline:
    c = Client(address, worker=1, curve=curve)
    c.join("honest")
    start = np.random.default_rng(1).standard_normal(LAYOUT.total).astype(np.float32)
    c.init(start, LAYOUT)
    c.push(np.ones(LAYOUT.total, np.float32))
    centre = c.pull()
    np.testing.assert_array_equal(centre, start + 1)
    coordinator, shards = server_processes()
    assert len(shards) >= 2, shards  # shard 1 is never addressed: its refusal counter must stay empty
    return Baseline(c, hashlib.sha256(centre.tobytes()).hexdigest(), list(c.versions), coordinator, shards,
                    {p.pid for p in coordinator.children(recursive=True)})


@dataclass
class FuzzRun:
    messages: int
    curve: bool
    ops: dict[str, set[str]] = field(default_factory=dict)  # endpoint -> ops it serves
    fuzzed: dict[str, set[str]] = field(default_factory=dict)  # endpoint -> template ops that were fuzzed
    sent: dict[str, Counter] = field(default_factory=dict)  # endpoint -> op -> messages ZeroMQ took
    codes: dict[str, Counter] = field(default_factory=dict)  # endpoint -> error code -> error replies
    kinds: Counter = field(default_factory=Counter)
    expected: dict[str, int] = field(default_factory=dict)  # messages that must be answered
    answered: dict[str, int] = field(default_factory=dict)
    bad: list = field(default_factory=list)  # (message, endpoint, kind, what went wrong)
    stray: dict[str, int] = field(default_factory=dict)
    oversized: int = 0
    outsider_answered: int = -1  # replies to a peer with an unlisted key (CurveZMQ only)
    regenerated: int = 0
    seconds: float = 0.0  # wall time of the fuzzing, oversized frames and their timeouts included
    loop_seconds: float = 0.0  # wall time of the `messages` alone: what messages/s is made of
    rss_before: dict[int, int] = field(default_factory=dict)
    rss_after: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(sum(ops.values()) for ops in self.sent.values()) + self.oversized

    def summary(self) -> str:
        return (f"fuzz{' (CurveZMQ)' if self.curve else ''}: {self.total} messages sent in {self.seconds:.1f} s "
                f"({self.messages / self.loop_seconds:.0f}/s before the oversized, {self.regenerated} mutations regenerated), of which "
                f"{self.oversized} oversized\n  to shard 0, by op: {dict(self.sent['shard'])}\n"
                f"  to the coordinator, by op: {dict(self.sent['coordinator'])}\n  kinds {dict(self.kinds)}\n"
                f"  error codes: shard {dict(self.codes['shard'])}, coordinator {dict(self.codes['coordinator'])}\n"
                f"  shard RSS after the warm-up → at the end: "
                + ", ".join(f"{k}: {self.rss_before.get(k, 0) / 2**20:.1f} → {self.rss_after.get(k, 0) / 2**20:.1f} MiB"
                            for k in sorted(self.rss_before)))

    def rss_growth(self) -> dict[int, int]:
        return {k: self.rss_after.get(k, 0) - self.rss_before[k] for k in self.rss_before}


def fuzz(address: str, base: Baseline, messages: int, curve: dict[str, bytes] | None = None,
         outsider: dict[str, bytes] | None = None, seed: int = SEED, warmup: int = WARMUP) -> FuzzRun:
    """Send `messages` invalid messages (SHARD_SHARE of them to shard 0), then the oversized frames.

    `curve` is the fuzzer's own (listed) curve dict; `outsider` a curve dict
    with an unlisted key pair, whose one message per endpoint must go unanswered.
    """
    shard0 = base.client.shards[0]
    n = shard0.end - shard0.start
    ctx = zmq.Context.instance()
    targets = {"shard": Target("shard", shard0.endpoint, ctx, curve),
               "coordinator": Target("coordinator", address, ctx, curve)}
    pools = dict(zip(("shard", "coordinator"), templates(n, LAYOUT.total)))
    run = FuzzRun(messages, curve is not None, ops={k: t.ops for k, t in targets.items()},
                  fuzzed={k: {h["op"] for h, _ in pools[k] if h["op"] in targets[k].ops} for k in targets},
                  sent={k: Counter() for k in targets}, codes={k: Counter() for k in targets},
                  expected=dict.fromkeys(targets, 0), answered=dict.fromkeys(targets, 0))
    rnd = random.Random(seed)
    t0 = time.perf_counter()
    try:
        for i in range(messages):
            if i == warmup:
                run.rss_before = {k: p.memory_info().rss for k, p in base.shards.items()}
            name = "shard" if rnd.random() < SHARD_SHARE else "coordinator"
            target = targets[name]
            while True:
                kind, op, frames = make(rnd, target, pools[name], n)
                if kind not in ("field_type", "non_finite") and could_be_valid(frames, target.ops):
                    run.regenerated += 1  # a mutation that might be a real request: not a fuzz case
                    continue
                break
            try:
                target.send(frames)
            except zmq.Again:
                run.bad.append((i, name, kind, "ZeroMQ would not take it"))
                break
            run.sent[name][op] += 1
            run.kinds[kind] += 1
            run.expected[name] += 1
            reply = target.receive()  # one request in flight per socket: this is its reply
            if reply is None:
                run.bad.append((i, name, kind, f"no reply within {REPLY_TIMEOUT_S} s to {frames[:1]!r}"))
                break  # the endpoint may be gone: waiting on every remaining message would take hours
            run.answered[name] += 1
            run.codes[name][reply.header.get("code")] += 1
            if not is_error_reply(reply):
                run.bad.append((i, name, kind, f"{frames[:1]!r} answered {reply.header}"))
        run.loop_seconds = time.perf_counter() - t0
        for name, target in targets.items():  # a request answered twice would leave a reply behind
            run.stray[name] = 0
            while target.receive(timeout_s=0.2) is not None:
                run.stray[name] += 1
        # Frames above MAXMSGSIZE: ZeroMQ drops the connection, so no reply; the server goes on.
        for name, target in targets.items():
            limit = MAX_MESSAGE_MB << 20 if name == "shard" else MAX_MESSAGE_BYTES
            for size in (limit + 16, limit * 3):
                if target.ask([*PING, b"\0" * size], timeout_s=0.5) is not None:
                    run.bad.append(("oversized", name, size, "answered a frame above MAXMSGSIZE"))
                run.oversized += 1
                target.connect()
                reply = target.ask(PING)
                if reply is None or reply.header.get("ok") is not True:
                    run.bad.append(("oversized", name, size, f"no PING reply on a fresh connection: {reply}"))
        if outsider is not None:  # the handshake never completes: not a reply, not a refusal counted
            run.outsider_answered = 0
            for name, target in targets.items():
                intruder = Target(name, target.endpoint, ctx, outsider, probe=False)
                try:
                    run.outsider_answered += intruder.ask(PING, timeout_s=1.0) is not None
                finally:
                    intruder.close()
        run.seconds = time.perf_counter() - t0
        run.rss_after = {k: p.memory_info().rss for k, p in base.shards.items() if running(p)}
    finally:
        for t in targets.values():
            t.close()
    return run


def verify(base: Baseline, run: FuzzRun, rss_bound: int = RSS_GROWTH_BOUND) -> None:
    """Every assertion of the module docstring; an AssertionError names the first that failed."""
    # Every message was sent, answered once, and with an error.
    assert not run.bad, run.bad[:10]
    assert run.total == run.messages + run.oversized, (run.total, run.sent)
    for name in run.sent:
        assert set(run.sent[name]) >= run.fuzzed[name], (name, run.sent[name])
    assert run.answered == run.expected and sum(run.expected.values()) == run.messages, (run.answered, run.expected)
    assert run.stray == {"shard": 0, "coordinator": 0}, run.stray
    assert run.outsider_answered <= 0, f"{run.outsider_answered} answer(s) to a peer with an unlisted key"
    # The processes: alive, none restarted, and answering.
    assert running(base.coordinator), "the coordinator (`pserver start`) exited"
    for k, p in base.shards.items():
        assert running(p), f"shard {k} (pid {p.pid}) is gone"
    assert {p.pid for p in base.coordinator.children(recursive=True)} == base.family  # no shard restarted
    c = base.client
    stats = c.stats()
    assert [s.get("error") for s in stats["shards"]] == [None] * len(base.shards), stats["shards"]
    # Each endpoint counted exactly the refusals we were answered with (+ its NO_SUCH_OP probe).
    probe = Counter({"unknown_op": 1})
    assert Counter(stats["shards"][0]["refused"]) == run.codes["shard"] + probe
    assert all(s["refused"] == {} for s in stats["shards"][1:])  # never addressed
    assert Counter(stats["coordinator"]["refused"]) == run.codes["coordinator"] + probe
    # The centre: untouched by any of it.
    after = c.pull()
    assert hashlib.sha256(after.tobytes()).hexdigest() == base.checksum and c.versions == base.versions
    # Memory: no per-message growth.
    for k, growth in run.rss_growth().items():
        assert growth <= rss_bound, \
            f"shard {k} RSS grew by {growth / 2**20:.1f} MiB (bound {rss_bound / 2**20:.0f} MiB)"

"""The shard's state machine, in process: fabricated frames into `Shard.handle`, replies out of a
stand-in socket. No sockets are bound and no processes started; the kernels are the real Numba ones
(loaded once per test session, ~0.8 s from numba's cache), so what is checked is what serves."""
from __future__ import annotations

import json
import sys
from dataclasses import replace

import msgpack
import numpy as np
import pytest
import zmq

from pserver import applies, checkpoint, protocol
from pserver.errors import ConfigError
from pserver.shard import Shard, numba_kernels
from pserver.shard_state import ShardConfig
from wire import Wire  # noqa: E402

N = 10  # floats in the test shard's slice


@pytest.fixture(scope="module")
def kernels():
    return numba_kernels()


@pytest.fixture
def make(kernels):
    def make(**config) -> tuple[Shard, Wire]:
        wire = Wire()
        return Shard(ShardConfig(**config), kernels=kernels, socket=wire), wire
    return make


def frames(identity: bytes, header: dict, arrays=()) -> list[zmq.Frame]:
    return [zmq.Frame(identity), *(zmq.Frame(bytes(f)) for f in protocol.encode(header, arrays))]


def ask(shard: Shard, wire: Wire, header: dict, arrays=(), identity: bytes = b"peer") -> protocol.Message | None:
    """Handle one request; its reply, or None if none was sent (parked)."""
    shard.handle(frames(identity, header, arrays))
    replies = [m for who, m in wire.sent if who == identity]
    wire.sent = [(who, m) for who, m in wire.sent if who != identity]  # replies to others stay to be taken
    assert len(replies) <= 1
    return replies[0] if replies else None


def refused(reply: protocol.Message | None, code: str) -> bool:
    return reply is not None and reply.header["ok"] is False and reply.header["code"] == code and bool(reply.header["reason"])


def vec(seed: int, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def init(shard: Shard, wire: Wire, x: np.ndarray, world: int = 1, start: int = 0, total: int | None = None):
    return ask(shard, wire, {"op": "INIT", "start": start, "end": start + x.size, "total": total or start + x.size,
                             "world": world, "fingerprint": "f" * 64}, [x])


def push(shard: Shard, wire: Wire, worker: int, seq: int, delta: np.ndarray, mode: str = "add", scale: float = 1.0,
         pulled: int = 0, pull: bool = False, identity: bytes | None = None) -> protocol.Message | None:
    return ask(shard, wire, {"op": "PUSH", "worker": worker, "seq": seq, "pulled": pulled, "mode": mode,
                             "scale": scale, "pull": pull}, [delta], identity or b"w%d" % worker)


def norm64(x: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.asarray(x, np.float64) ** 2)))


# ---- INIT ------------------------------------------------------------------------------------------

def test_first_init_sets_the_centre_and_range(make):
    shard, wire = make(index=3)
    x = vec(0)
    reply = init(shard, wire, x, world=4, start=20, total=100)
    assert reply.header == {"op": "REPLY", "ok": True, "first": True, "version": 0, "v": 1}
    np.testing.assert_array_equal(shard.centre.current, x)
    assert (shard.start, shard.end, shard.total, shard.world) == (20, 30, 100, 4)
    assert shard.fingerprint == "f" * 64


def test_later_init_of_the_same_range_is_answered_not_applied(make):
    shard, wire = make()
    x = vec(0)
    init(shard, wire, x)
    push(shard, wire, 0, 1, np.ones(N, np.float32))
    reply = init(shard, wire, vec(1))  # another worker's initial weights: ignored
    assert reply.header["ok"] is True and reply.header["first"] is False and reply.header["version"] == 1
    np.testing.assert_array_equal(shard.centre.current, x + 1)


@pytest.mark.parametrize("start, total", [(5, 15), (0, 11)])
def test_init_of_another_range_is_a_mismatch(make, start, total):
    shard, wire = make()
    x = vec(0)
    init(shard, wire, x)
    assert refused(init(shard, wire, vec(1), start=start, total=total), "mismatch")
    np.testing.assert_array_equal(shard.centre.current, x)
    assert (shard.start, shard.end, shard.total) == (0, N, N)


def test_init_is_checked_before_anything_is_kept(make):
    shard, wire = make()
    bad = vec(0)
    bad[3] = np.inf
    assert refused(init(shard, wire, bad), "not_finite")
    assert refused(ask(shard, wire, {"op": "INIT", "start": 5, "end": 5, "total": 10, "world": 1}, [vec(0, 0)]),
                   "malformed")
    assert refused(ask(shard, wire, {"op": "INIT", "start": 0, "end": N, "total": N, "world": 1}, [vec(0, N - 1)]),
                   "size")
    assert refused(ask(shard, wire, {"op": "INIT", "start": 0, "end": N, "total": N, "world": 0}, [vec(0)]),
                   "malformed")
    assert shard.centre is None and shard.stats.refused == {"not_finite": 1, "malformed": 2, "size": 1}


def test_requests_before_init_are_not_ready(make):
    shard, wire = make()
    assert refused(push(shard, wire, 0, 1, vec(0)), "not_ready")
    assert refused(ask(shard, wire, {"op": "PULL", "worker": 0}), "not_ready")
    assert refused(ask(shard, wire, {"op": "ROUND", "worker": 0, "round": 0, "mode": "average"}, [vec(0)]),
                   "not_ready")


# ---- PUSH, one mode at a time, against numpy ------------------------------------------------------

def test_push_add(make):
    shard, wire = make()
    c, d = vec(0), vec(1)
    init(shard, wire, c)
    reply = push(shard, wire, 0, 1, d)
    assert reply.header["applied"] is True and reply.header["version"] == 1 and reply.header["staleness"] == 0
    assert reply.arrays == []
    np.testing.assert_array_equal(shard.centre.current, c + d)
    assert reply.header["norm"] == pytest.approx(norm64(d), rel=1e-12)


def test_push_scaled(make):
    shard, wire = make()
    c, d = vec(0), vec(1)
    init(shard, wire, c)
    push(shard, wire, 0, 1, d, mode="scaled", scale=0.25)
    np.testing.assert_array_equal(shard.centre.current, c + np.float32(0.25) * d)


def test_push_staleness_divides_by_versions_missed(make):
    shard, wire = make()
    c, d1, d2, d3 = vec(0), vec(1), vec(2), vec(3)
    init(shard, wire, c, world=2)
    push(shard, wire, 1, 1, d1)
    push(shard, wire, 1, 2, d2)  # version 2 now; worker 0 pulled at version 0: staleness 2
    reply = push(shard, wire, 0, 1, d3, mode="staleness", scale=0.9, pulled=0)
    assert reply.header["staleness"] == 2
    expected = (c + d1) + d2
    np.testing.assert_array_equal(shard.centre.current, expected + np.float32(0.9 / 3) * d3)
    assert shard.stats.staleness[0][2] == 1 and shard.stats.staleness[1][:2].tolist() == [1, 1]


def test_push_elastic_returns_the_difference(make):
    shard, wire = make()
    c, w = vec(0), vec(1)
    init(shard, wire, c)
    reply = push(shard, wire, 0, 1, w, mode="elastic", scale=0.3)
    e = np.float32(0.3) * (w - c)
    assert len(reply.arrays) == 1
    np.testing.assert_array_equal(reply.arrays[0], e)
    np.testing.assert_array_equal(shard.centre.current, c + e)
    assert reply.header["norm"] == pytest.approx(norm64(e), rel=1e-12)


def test_push_with_pull_carries_the_new_centre(make):
    shard, wire = make()
    c, w = vec(0), vec(1)
    init(shard, wire, c)
    reply = push(shard, wire, 0, 1, w, mode="elastic", scale=0.5, pull=True)
    e = np.float32(0.5) * (w - c)
    assert len(reply.arrays) == 2
    np.testing.assert_array_equal(reply.arrays[0], e)
    np.testing.assert_array_equal(reply.arrays[1], c + e)


def test_pull_answers_the_centre_and_version(make):
    shard, wire = make()
    c = vec(0)
    init(shard, wire, c, world=8)
    push(shard, wire, 0, 1, np.ones(N, np.float32))
    reply = ask(shard, wire, {"op": "PULL", "worker": 7})
    assert reply.header["version"] == 1
    np.testing.assert_array_equal(reply.arrays[0], c + 1)
    assert shard.stats.pulls[7] == 1
    assert refused(ask(shard, wire, {"op": "PULL", "worker": 7}, [c]), "frames")


# ---- retries -------------------------------------------------------------------------------------

def test_a_retried_push_is_applied_once(make):
    shard, wire = make()
    c, d = vec(0), vec(1)
    init(shard, wire, c)
    first = push(shard, wire, 0, 1, d)
    again = push(shard, wire, 0, 1, d, identity=b"fresh socket")
    assert first.header["applied"] is True and again.header["applied"] is False
    assert again.header["version"] == 1 and shard.version == 1
    np.testing.assert_array_equal(shard.centre.current, c + d)
    assert shard.stats.duplicates[0] == 1 and shard.stats.updates[0] == 1
    older = push(shard, wire, 0, 0, d)
    assert older.header["applied"] is False
    push(shard, wire, 0, 2, d)  # the next seq applies
    np.testing.assert_array_equal(shard.centre.current, (c + d) + d)


def test_a_retried_elastic_push_gets_its_difference_again(make):
    shard, wire = make()
    c, w = vec(0), vec(1)
    init(shard, wire, c)
    first = push(shard, wire, 0, 1, w, mode="elastic", scale=0.5)
    again = push(shard, wire, 0, 1, w, mode="elastic", scale=0.5)
    assert again.header["applied"] is False
    np.testing.assert_array_equal(again.arrays[0], first.arrays[0])
    np.testing.assert_array_equal(shard.centre.current, c + first.arrays[0])


# ---- refusals leave the centre -------------------------------------------------------------------

def test_the_absolute_norm_limit_refuses_and_leaves_the_centre(make):
    shard, wire = make(max_delta_norm=10.0)
    c = vec(0)
    init(shard, wire, c)
    big = np.full(N, 4.0, np.float32)  # norm 12.6
    assert refused(push(shard, wire, 0, 1, big), "too_large")
    np.testing.assert_array_equal(shard.centre.current, c)
    assert shard.version == 0 and shard.stats.updates[0] == 0
    assert push(shard, wire, 0, 1, big / 2).header["applied"] is True  # the same seq, once acceptable


def test_the_norm_guard_refuses_an_explosion_after_warmup(make):
    shard, wire = make(max_delta_norm_factor=10.0)
    c = vec(0)
    init(shard, wire, c)
    small = np.full(N, 0.01, np.float32)
    explosion = small * 50
    for seq in range(1, 21):  # the warm-up: 20 accepted updates
        assert push(shard, wire, 0, seq, small).header["applied"] is True
    before = shard.centre.current.copy()
    reply = push(shard, wire, 0, 21, explosion)
    assert refused(reply, "too_large") and "median" in reply.header["reason"]
    np.testing.assert_array_equal(shard.centre.current, before)
    assert shard.version == 20
    assert push(shard, wire, 0, 21, small * 5).header["applied"] is True


def test_the_norm_guard_lets_anything_through_during_warmup(make):
    shard, wire = make(max_delta_norm_factor=10.0)
    init(shard, wire, vec(0))
    for seq in range(1, 20):
        push(shard, wire, 0, seq, np.full(N, 0.01, np.float32))
    assert push(shard, wire, 0, 20, np.full(N, 5.0, np.float32)).header["applied"] is True


def test_non_finite_updates_leave_the_centre(make):
    shard, wire = make()
    c = vec(0)
    init(shard, wire, c)
    for mode in ("add", "scaled", "staleness", "elastic"):
        d = vec(1)
        d[4] = np.nan
        assert refused(push(shard, wire, 0, 1, d, mode=mode), "not_finite"), mode
    assert refused(push(shard, wire, 0, 1, vec(1), mode="scaled", scale=float("inf")), "not_finite")
    overflow = np.full(N, 3e38, np.float32)  # finite, but c + 2·overflow is not
    assert refused(push(shard, wire, 0, 1, overflow, mode="scaled", scale=2.0), "not_finite")
    np.testing.assert_array_equal(shard.centre.current, c)
    assert shard.version == 0


@pytest.mark.parametrize("name, body, code", [
    ("unknown op", [msgpack.packb({"v": 1, "op": "JOIN"})], "unknown_op"),
    ("not msgpack", [b"\xc1"], "malformed"),
    ("other version", [msgpack.packb({"v": 2, "op": "PING"})], "version"),
    ("missing field", [msgpack.packb({"v": 1, "op": "PUSH", "worker": 0, "arrays": [["<f4", N]]}), bytes(4 * N)],
     "malformed"),
    ("unknown mode", [msgpack.packb({"v": 1, "op": "PUSH", "worker": 0, "seq": 1, "pulled": 0, "mode": "exec",
                                     "arrays": [["<f4", N]]}), bytes(4 * N)], "malformed"),
    ("worker out of range", [msgpack.packb({"v": 1, "op": "PUSH", "worker": -1, "seq": 1, "pulled": 0, "mode": "add",
                                            "arrays": [["<f4", N]]}), bytes(4 * N)], "malformed"),
    ("int64 delta", [msgpack.packb({"v": 1, "op": "PUSH", "worker": 0, "seq": 1, "pulled": 0, "mode": "add",
                                    "arrays": [["<i8", N]]}), bytes(8 * N)], "dtype"),
    ("wrong length", [msgpack.packb({"v": 1, "op": "PUSH", "worker": 0, "seq": 1, "pulled": 0, "mode": "add",
                                     "arrays": [["<f4", N + 1]]}), bytes(4 * N + 4)], "size"),
    ("two arrays", [msgpack.packb({"v": 1, "op": "PUSH", "worker": 0, "seq": 1, "pulled": 0, "mode": "add",
                                   "arrays": [["<f4", N], ["<f4", N]]}), bytes(4 * N), bytes(4 * N)], "frames"),
])
def test_bad_requests_get_an_error_reply_and_change_nothing(make, name, body, code):
    shard, wire = make()
    c = vec(0)
    init(shard, wire, c)
    shard.handle([zmq.Frame(b"peer"), *(zmq.Frame(b) for b in body)])
    [(who, reply)] = wire.take()
    assert who == b"peer" and refused(reply, code), reply.header
    np.testing.assert_array_equal(shard.centre.current, c)
    assert shard.version == 0 and shard.stats.refused == {code: 1}


def test_a_request_without_a_header_is_counted_not_answered(make):
    shard, wire = make()
    shard.handle([zmq.Frame(b"peer")])
    assert wire.take() == [] and shard.stats.refused == {"malformed": 1}


def test_a_bug_in_a_handler_is_an_internal_error_reply(make, monkeypatch):
    shard, wire = make()
    monkeypatch.setitem(shard.handlers, "PING", lambda identity, msg: 1 / 0)
    reply = ask(shard, wire, {"op": "PING"})
    assert refused(reply, "internal") and "ZeroDivisionError" in reply.header["reason"]


# ---- synchronous rounds --------------------------------------------------------------------------

def round_push(shard, wire, worker, number, value, mode, alpha=1.0, identity=None):
    return ask(shard, wire, {"op": "ROUND", "worker": worker, "seq": number + 1, "round": number, "mode": mode,
                             "alpha": alpha}, [value], identity or b"w%d" % worker)


def test_elastic_round_closes_when_every_worker_has_sent(make):
    shard, wire = make()
    c, w0, w1 = vec(0), vec(1), vec(2)
    init(shard, wire, c, world=2)
    assert round_push(shard, wire, 0, 0, w0, "elastic", alpha=0.2) is None  # waits for worker 1
    np.testing.assert_array_equal(shard.centre.current, c)
    shard.handle(frames(b"w1", {"op": "ROUND", "worker": 1, "seq": 1, "round": 0, "mode": "elastic", "alpha": 0.2},
                        [w1]))
    replies = dict(wire.take())
    a = np.float32(0.2)
    e0, e1 = (w0 - c) * a, (w1 - c) * a
    expected = (c.astype(np.float64) + (e0.astype(np.float64) + e1.astype(np.float64))).astype(np.float32)
    np.testing.assert_array_equal(shard.centre.current, expected)
    assert set(replies) == {b"w0", b"w1"}
    for who, e in ((b"w0", e0), (b"w1", e1)):
        assert replies[who].header["round"] == 1 and replies[who].header["workers"] == 2
        np.testing.assert_array_equal(replies[who].arrays[0], e)
        np.testing.assert_array_equal(replies[who].arrays[1], expected)
    assert shard.version == 1 and shard.round.number == 1


def test_average_round_replaces_the_centre_with_the_mean(make):
    shard, wire = make()
    c, xs = vec(0), [vec(1), vec(2), vec(3)]
    init(shard, wire, c, world=3)
    for k, x in enumerate(xs):
        round_push(shard, wire, k, 0, x, "average")
    expected = (((xs[0].astype(np.float64) + xs[1]) + xs[2]) * (1 / 3)).astype(np.float32)
    np.testing.assert_array_equal(shard.centre.current, expected)
    assert shard.round.number == 1


def test_round_closes_without_a_worker_the_coordinator_declared_lost(make):
    shard, wire = make()
    c, x0, x1 = vec(0), vec(1), vec(2)
    init(shard, wire, c, world=3)
    round_push(shard, wire, 0, 0, x0, "average")
    round_push(shard, wire, 1, 0, x1, "average")
    assert shard.round.number == 0 and wire.take() == []  # worker 2 is still awaited
    reply = ask(shard, wire, {"op": "LOST", "lost": [2], "done": []}, identity=b"coordinator")
    assert reply.header["ok"] is True
    replies = dict(wire.take())
    assert set(replies) == {b"w0", b"w1"} and replies[b"w0"].header["workers"] == 2
    np.testing.assert_array_equal(shard.centre.current, ((x0.astype(np.float64) + x1) * 0.5).astype(np.float32))
    assert shard.round.number == 1 and shard.lost == {2}


def test_round_closes_without_a_worker_that_said_bye(make):
    shard, wire = make()
    init(shard, wire, vec(0), world=2)
    round_push(shard, wire, 0, 0, vec(1), "average")
    assert ask(shard, wire, {"op": "BYE", "worker": 1}, identity=b"w1").header["ok"] is True
    assert [who for who, _ in wire.take()] == [b"w0"]
    np.testing.assert_array_equal(shard.centre.current, vec(1))
    assert shard.left == {1}


def test_round_times_out_without_the_missing_workers_and_marks_them_lost(make):
    shard, wire = make(round_timeout_s=5.0)
    init(shard, wire, vec(0), world=3)
    round_push(shard, wire, 0, 0, vec(1), "average")
    opened = shard.round.opened_at
    shard.tick(opened + 4.0)
    assert shard.round.number == 0 and wire.take() == []
    shard.tick(opened + 5.1)
    assert [who for who, _ in wire.take()] == [b"w0"]
    assert shard.lost == {1, 2} and shard.round.number == 1
    np.testing.assert_array_equal(shard.centre.current, vec(1))
    # a lost worker that comes back joins the next round, and is waited for again
    round_push(shard, wire, 1, 1, vec(2), "average")
    assert 1 not in shard.lost and shard.round.number == 1
    round_push(shard, wire, 0, 1, vec(3), "average")
    assert shard.round.number == 2


def test_round_out_of_order_or_of_another_mode_is_refused(make):
    shard, wire = make()
    c = vec(0)
    init(shard, wire, c, world=2)
    assert refused(round_push(shard, wire, 0, 1, vec(1), "average"), "round")
    round_push(shard, wire, 0, 0, vec(1), "average")
    assert refused(round_push(shard, wire, 1, 0, vec(2), "elastic"), "round")
    assert refused(round_push(shard, wire, 2, 0, vec(2), "average"), "malformed")  # outside the world
    np.testing.assert_array_equal(shard.centre.current, c)
    assert list(shard.round.contributors) == [0]


def test_a_retried_round_push_is_answered_on_its_new_socket_once(make):
    shard, wire = make()
    init(shard, wire, vec(0), world=2)
    round_push(shard, wire, 0, 0, vec(1), "average", identity=b"old")
    round_push(shard, wire, 0, 0, vec(1), "average", identity=b"new")
    assert round_push(shard, wire, 1, 0, vec(2), "average").header["round"] == 1
    assert [who for who, _ in wire.take()] == [b"new"]  # not b"old"
    np.testing.assert_array_equal(shard.centre.current, ((vec(1).astype(np.float64) + vec(2)) / 2).astype(np.float32))


# ---- SSP -----------------------------------------------------------------------------------------

def test_ssp_parks_a_push_too_far_ahead_and_releases_it_when_the_laggard_catches_up(make):
    shard, wire = make(max_staleness=1)
    c = np.arange(N, dtype=np.float32)  # whole numbers: adding ones is exact in any order
    one = np.ones(N, np.float32)
    init(shard, wire, c, world=2)
    assert push(shard, wire, 0, 1, one).header["applied"]  # gap 0
    assert push(shard, wire, 0, 2, one).header["applied"]  # gap 1
    assert push(shard, wire, 0, 3, one) is None  # gap 2 > 1: parked, not applied
    np.testing.assert_array_equal(shard.centre.current, c + 2)
    assert shard.gate.to_wire()["parked"] == [0] and shard.gate.waits == 1
    assert push(shard, wire, 0, 3, one, identity=b"w0 again") is None  # a retry of the parked push: re-addressed
    shard.handle(frames(b"w1", {"op": "PUSH", "worker": 1, "seq": 1, "pulled": 0, "mode": "add"}, [one]))
    replies = wire.take()
    assert [who for who, _ in replies] == [b"w0 again", b"w1"]  # released as worker 1's update was applied
    assert replies[0][1].header["applied"] is True and replies[0][1].header["version"] == 4
    np.testing.assert_array_equal(shard.centre.current, c + 4)
    assert shard.stats.updates == {0: 3, 1: 1}
    assert shard.gate.to_wire()["parked"] == [] and dict(shard.gate.gaps) == {0: 2, 1: 2}


def test_ssp_after_a_shard_restart_parks_and_releases_from_the_restored_clocks(make, tmp_path):
    """A shard restarted from its checkpoint while a push was parked: the gate waits as the first shard did.

    The parked push was never applied, so the checkpoint does not hold it; the worker's client re-sends it to
    the restarted shard, whose SSP clocks come from the restored update counts: it is parked again, and released
    when the laggard's update is applied. The centre ends where an uninterrupted shard's does.
    """
    c, one = np.arange(N, dtype=np.float32), np.ones(N, np.float32)
    first, wire = make(max_staleness=1)
    init(first, wire, c, world=2)
    push(first, wire, 0, 1, one)
    push(first, wire, 0, 2, one)
    assert push(first, wire, 0, 3, one) is None  # parked: 2 ahead of worker 1
    path = checkpoint.save_shard(tmp_path, first.snapshot())  # the shard dies here, its parked push with it

    again, again_wire = make(max_staleness=1)
    checkpoint.restore_shard(again, path)
    assert again.stats.updates == {0: 2} and again.version == 2
    retried = push(again, again_wire, 0, 2, one)  # a retry of an applied push: answered, not applied
    assert retried.header["applied"] is False
    assert push(again, again_wire, 0, 3, one) is None  # the parked push, re-sent: parked again
    np.testing.assert_array_equal(again.centre.current, c + 2)
    assert again.gate.to_wire()["parked"] == [0]
    again.handle(frames(b"w1", {"op": "PUSH", "worker": 1, "seq": 1, "pulled": 0, "mode": "add"}, [one]))
    replies = again_wire.take()
    assert [who for who, _ in replies] == [b"w0", b"w1"]  # released as worker 1's update was applied
    assert all(m.header["applied"] is True for _, m in replies)
    np.testing.assert_array_equal(again.centre.current, c + 4)
    assert again.stats.updates == {0: 3, 1: 1} and again.version == 4


def test_ids_outside_the_world_are_refused_not_held(make):
    shard, wire = make(max_staleness=0)
    init(shard, wire, vec(0), world=2)
    for seq in range(1, 4):
        assert refused(push(shard, wire, 9, seq, np.ones(N, np.float32)), "malformed")
    assert shard.version == 0 and 9 not in shard.stats.updates


def test_ssp_releases_when_the_laggard_is_declared_lost(make):
    shard, wire = make(max_staleness=0)
    init(shard, wire, vec(0), world=2)
    push(shard, wire, 0, 1, np.ones(N, np.float32))
    assert push(shard, wire, 0, 2, np.ones(N, np.float32)) is None
    ask(shard, wire, {"op": "LOST", "lost": [1]}, identity=b"coordinator")
    assert [who for who, _ in wire.take()] == [b"w0"]
    assert shard.version == 2


def test_ssp_releases_a_push_parked_too_long_and_marks_the_laggard_lost(make):
    shard, wire = make(max_staleness=0, round_timeout_s=5.0)
    init(shard, wire, vec(0), world=3)
    push(shard, wire, 0, 1, np.ones(N, np.float32))
    push(shard, wire, 1, 1, np.ones(N, np.float32))
    assert push(shard, wire, 0, 2, np.ones(N, np.float32)) is None  # worker 2 has pushed nothing
    since = shard.gate.parked[0].since
    shard.tick(since + 4.0)
    assert wire.take() == [] and shard.lost == set()
    shard.tick(since + 5.1)
    assert [who for who, _ in wire.take()] == [b"w0"] and shard.lost == {2}


def test_a_refused_push_released_by_the_gate_gets_its_error(make):
    shard, wire = make(max_staleness=0, max_delta_norm=5.0)
    c = vec(0)
    init(shard, wire, c, world=2)
    push(shard, wire, 0, 1, np.ones(N, np.float32))
    assert push(shard, wire, 0, 2, np.full(N, 3.0, np.float32)) is None  # too large, but parked first
    assert push(shard, wire, 1, 1, np.ones(N, np.float32)).header["applied"]
    [(who, reply)] = wire.take()  # the parked push, released and refused
    assert who == b"w0" and refused(reply, "too_large")
    np.testing.assert_array_equal(shard.centre.current, (c + 1) + 1)


# ---- checkpoints ---------------------------------------------------------------------------------

def busy_shard(make):
    shard, wire = make(index=2)
    init(shard, wire, vec(0), world=3, start=10, total=40)
    push(shard, wire, 0, 4, vec(1))
    push(shard, wire, 1, 7, vec(2), mode="scaled", scale=0.5)
    ask(shard, wire, {"op": "LOST", "lost": [2], "done": [1]}, identity=b"coordinator")
    round_push(shard, wire, 0, 0, vec(3), "average")  # closes: 1 left, 2 lost
    return shard, wire


def test_snapshot_is_a_read_only_copy(make):
    shard, wire = busy_shard(make)
    snap = shard.snapshot()
    assert (snap.index, snap.start, snap.end, snap.total, snap.world) == (2, 10, 20, 40, 3)
    assert (snap.version, snap.round, snap.seqs, snap.updates) == (3, 1, {0: 4, 1: 7}, {0: 2, 1: 1})
    assert (snap.lost, snap.left, snap.fingerprint) == ((2,), (1,), "f" * 64)
    np.testing.assert_array_equal(snap.centre, shard.centre.current)
    before = snap.centre.copy()
    for seq in range(5, 10):  # enough updates for the shard to reuse each of its buffers
        assert push(shard, wire, 0, seq, vec(seq)).header["applied"]
    np.testing.assert_array_equal(snap.centre, before)
    with pytest.raises(ValueError):
        snap.centre[0] = 1.0


def test_snapshot_of_an_empty_shard_is_refused(make):
    shard, _ = make()
    with pytest.raises(ValueError, match="no weights"):
        shard.snapshot()


def test_restore_resumes_from_a_snapshot(make, tmp_path):
    shard, wire = busy_shard(make)
    path = checkpoint.save_shard(tmp_path, shard.snapshot())
    fresh, fresh_wire = make(index=2)
    checkpoint.restore_shard(fresh, path)
    assert _same(fresh.snapshot(), shard.snapshot())
    # a retry of a push already applied is answered, not applied again
    again = push(fresh, fresh_wire, 1, 7, vec(2), mode="scaled", scale=0.5)
    assert again.header["applied"] is False
    np.testing.assert_array_equal(fresh.centre.current, shard.centre.current)
    # and it goes on where the original would
    for s, w in ((shard, wire), (fresh, fresh_wire)):
        push(s, w, 0, 5, vec(5))
        round_push(s, w, 0, 1, vec(6), "average")
    assert _same(fresh.snapshot(), shard.snapshot())


def _same(a, b) -> bool:
    return a.centre.tobytes() == b.centre.tobytes() and replace(a, centre=None) == replace(b, centre=None)


def test_restore_refuses_another_shards_state(make):
    shard, _ = busy_shard(make)
    other, _ = make(index=0)
    with pytest.raises(ValueError, match="shard 2"):
        other.restore(shard.snapshot())
    assert other.centre is None


def test_a_checkpoint_of_another_shard_is_refused_by_name(make, tmp_path):
    shard, _ = busy_shard(make)
    path = checkpoint.save_shard(tmp_path, shard.snapshot())
    other, _ = make(index=0)
    with pytest.raises(checkpoint.CheckpointError, match="shard 2's, not shard 0's"):
        checkpoint.restore_shard(other, path)


def test_checkpointer_writes_only_when_something_changed(make, tmp_path):
    shard, wire = busy_shard(make)
    saver = checkpoint.Checkpointer(shard, tmp_path, every_s=0.0)
    assert saver.save() is not None
    assert saver.save() is None  # nothing new
    push(shard, wire, 0, 5, vec(5))
    path = saver.save()
    state, _ = checkpoint.load_shard(path)
    assert _same(state, shard.snapshot()) and state.seqs == {0: 5, 1: 7}


def test_a_checkpoint_header_is_the_states_fields(make, tmp_path):
    """The header is derived from ShardState: every field but the centre, and the file's own three."""
    shard, _ = busy_shard(make)
    path = checkpoint.save_shard(tmp_path, shard.snapshot())
    with np.load(path) as z:
        header = json.loads(bytes(z["meta"]).decode())
    assert list(header) == ["index", "start", "end", "total", "world", "version", "round", "fingerprint", "seqs",
                            "updates", "lost", "left", "crc32", "written_at", "format"]
    assert header["seqs"] == {"0": 4, "1": 7} and header["lost"] == [2] and header["format"] == checkpoint.FORMAT


@pytest.mark.parametrize("change, why", [
    (lambda h: h.pop("seqs"), "missing \\['seqs'\\]"),
    (lambda h: h.update(extra=1), "unknown \\['extra'\\]"),
    (lambda h: h.update(format="notpu-shard/0"), "format 'notpu-shard/0'"),
    (lambda h: h.update(seqs={"zero": 1}), "unexpected header"),
])
def test_a_checkpoint_with_another_header_is_refused_by_name(make, tmp_path, change, why):
    shard, _ = busy_shard(make)
    path = checkpoint.save_shard(tmp_path, shard.snapshot())
    with np.load(path) as z:
        header, centre = json.loads(bytes(z["meta"]).decode()), np.array(z["centre"])
    change(header)
    np.savez(path, centre=centre, meta=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    with pytest.raises(checkpoint.CheckpointError, match=f"{path.name}.*{why}"):
        checkpoint.load_shard(path)


# ---- shard-side applies: the modes are plug-ins ----------------------------------------------------

@pytest.fixture
def registry(monkeypatch):
    """The apply registries as they are, restored after the test (which may register its own)."""
    monkeypatch.setattr(applies, "PUSH_APPLIES", dict(applies.PUSH_APPLIES))
    monkeypatch.setattr(applies, "ROUND_APPLIES", dict(applies.ROUND_APPLIES))
    return applies


def test_an_unknown_mode_is_refused_naming_the_known_ones_and_changes_nothing(make):
    shard, wire = make()
    c = vec(0)
    init(shard, wire, c, world=1)
    reply = push(shard, wire, 0, 1, vec(1), mode="negate-add")
    assert refused(reply, "malformed")
    assert "'negate-add' unknown" in reply.header["reason"] and "add, elastic, scaled, staleness" in reply.header["reason"]
    assert "ShardConfig.plugins" in reply.header["reason"]
    reply = round_push(shard, wire, 0, 0, vec(1), "median")
    assert refused(reply, "malformed") and "ROUND mode 'median' unknown" in reply.header["reason"]
    assert "average, elastic" in reply.header["reason"]
    np.testing.assert_array_equal(shard.centre.current, c)
    assert shard.version == 0 and shard.stats.updates == {} and not shard.round.contributors
    assert 0 not in shard._pushes  # the seq was not taken: a later push with it applies
    assert push(shard, wire, 0, 1, vec(1)).header["applied"] is True


def _register_toys(registry) -> None:
    @registry.register("negate-add")
    class NegateAdd(registry.PushApply):
        """C ← C − scale·Δ; the reply carries −scale·Δ (re-sent to a retry)."""

        def apply(self, kernels, centre, delta, scale, staleness, out):
            finite, norm = kernels.add_scaled(centre, delta, np.float32(-scale), out)
            return finite, norm, [out - centre]

    @registry.register("max")
    class MaxRound(registry.RoundApply):
        """Row W_i; C_{r+1} = max_i W_i, element-wise."""

        def row(self, centre, value, alpha, out):
            out[:] = value

        def close(self, kernels, centre, rows, count, out):
            np.max(rows[:count], axis=0, out=out)


def test_a_registered_apply_is_served_with_no_change_to_the_shard(make, registry):
    _register_toys(registry)
    shard, wire = make(max_delta_norm=100.0)
    c, d = vec(0), vec(1)
    init(shard, wire, c, world=2)
    reply = push(shard, wire, 0, 1, d, mode="negate-add", scale=0.5, pull=True)
    expected = c + np.float32(-0.5) * d
    assert reply.header["applied"] is True and reply.header["version"] == 1
    assert reply.header["norm"] == pytest.approx(norm64(np.float32(0.5) * d), rel=1e-6)
    np.testing.assert_array_equal(shard.centre.current, expected)
    np.testing.assert_array_equal(reply.arrays[0], expected - c)  # the apply's array, then the centre
    np.testing.assert_array_equal(reply.arrays[1], expected)
    again = push(shard, wire, 0, 1, d, mode="negate-add", scale=0.5)  # a retry: answered with its array, not applied
    assert again.header["applied"] is False
    np.testing.assert_array_equal(again.arrays[0], expected - c)
    np.testing.assert_array_equal(shard.centre.current, expected)
    # the shard's own checks still hold around a plug-in: the norm limit, then non-finite values
    assert refused(push(shard, wire, 0, 2, np.full(N, 1e3, np.float32), mode="negate-add"), "too_large")
    bad = vec(2)
    bad[0] = np.nan
    assert refused(push(shard, wire, 0, 2, bad, mode="negate-add"), "not_finite")
    np.testing.assert_array_equal(shard.centre.current, expected)
    # and a round mode
    x0, x1 = vec(3), vec(4)
    assert round_push(shard, wire, 0, 0, x0, "max") is None
    last = round_push(shard, wire, 1, 0, x1, "max")  # closes the round: both are answered, with the centre only
    [(who, first)] = wire.take()
    assert who == b"w0" and last.header["round"] == first.header["round"] == 1
    assert len(first.arrays) == len(last.arrays) == 1
    np.testing.assert_array_equal(shard.centre.current, np.maximum(x0, x1))


TOY_MODULE = """
import numpy as np

from pserver.applies import PushApply, register


@register("negate-add")
class NegateAdd(PushApply):
    def apply(self, kernels, centre, delta, scale, staleness, out):
        return (*kernels.add_scaled(centre, delta, np.float32(-scale), out), [])
"""


def test_a_plugin_module_is_loaded_by_name_from_the_config(make, registry, tmp_path, monkeypatch):
    (tmp_path / "toy_negate_add.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_negate_add", raising=False)
    assert "negate-add" not in registry.PUSH_APPLIES
    shard, wire = make(plugins=["toy_negate_add"])  # a list, as a JSON config gives it
    assert shard.config.plugins == ("toy_negate_add",)
    c, d = vec(0), vec(1)
    init(shard, wire, c)
    assert push(shard, wire, 0, 1, d, mode="negate-add").header["applied"] is True
    np.testing.assert_array_equal(shard.centre.current, c + np.float32(-1.0) * d)
    monkeypatch.delitem(sys.modules, "toy_negate_add")


def test_a_plugin_that_does_not_import_is_a_config_error_naming_it(make):
    with pytest.raises(ConfigError, match="'no_such_plugin' cannot be imported"):
        make(plugins=("no_such_plugin",))


def test_a_mode_name_is_one_class(registry):
    _register_toys(registry)
    _register_toys(registry)  # the same classes again (a module imported twice): fine

    class Other(registry.PushApply):
        def apply(self, kernels, centre, delta, scale, staleness, out):
            raise AssertionError

    with pytest.raises(ValueError, match="'add' is pserver.applies.Add's already"):
        registry.register("add")(Other)
    with pytest.raises(TypeError, match="PushApply or RoundApply"):
        registry.register("x")(int)


# ---- the rest --------------------------------------------------------------------------------------

def test_stats_and_ping(make):
    shard, wire = make(index=1, max_staleness=3)
    init(shard, wire, vec(0), world=2)
    push(shard, wire, 0, 1, vec(1))
    push(shard, wire, 0, 1, vec(1))
    assert ask(shard, wire, {"op": "PING"}).header["version"] == 1
    s = ask(shard, wire, {"op": "STATS"}).header["stats"]
    assert (s["shard"], s["version"], s["world"], s["initialised"]) == (1, 1, 2, True)
    assert s["updates"] == {"0": 1} and s["duplicates"] == {"0": 1} and s["ssp"]["max_staleness"] == 3
    assert s["bytes_in"] == shard.stats.bytes_in > 0


# ---- retries after a lost reply, and the message limit ---------------------------------------------------

def test_a_retried_first_init_is_answered_as_the_first(make):
    shard, wire = make()
    x = vec(0)
    header = {"op": "INIT", "start": 0, "end": N, "total": N, "world": 1, "rid": [77, 3]}
    assert ask(shard, wire, header, [x], identity=b"old").header["first"] is True
    assert ask(shard, wire, header, [x], identity=b"new").header["first"] is True  # the retry of it
    assert ask(shard, wire, dict(header, rid=[78, 1]), [vec(1)]).header["first"] is False  # another client's
    assert ask(shard, wire, {k: v for k, v in header.items() if k != "rid"}, [x]).header["first"] is False
    np.testing.assert_array_equal(shard.centre.current, x)
    for rid in ([77], [77, -3], [True, 3], "77:3"):
        reply = ask(shard, wire, dict(header, rid=rid), [x])
        assert refused(reply, "malformed") and "rid" in reply.header["reason"]


def test_a_retried_round_after_it_closed_gets_that_rounds_reply(make):
    shard, wire = make()
    c, w0, w1 = vec(0), vec(1), vec(2)
    init(shard, wire, c, world=2)
    round_push(shard, wire, 0, 0, w0, "elastic", alpha=0.2)
    first = round_push(shard, wire, 1, 0, w1, "elastic", alpha=0.2)
    wire.take()  # worker 0's reply: say it was lost
    again = round_push(shard, wire, 0, 0, w0, "elastic", alpha=0.2, identity=b"w0-fresh")
    assert again is not None and again.header == dict(first.header)
    np.testing.assert_array_equal(again.arrays[0], (w0 - c) * np.float32(0.2))  # its own E, not worker 1's
    np.testing.assert_array_equal(again.arrays[1], first.arrays[1])
    assert shard.version == 1 and shard.round.number == 1 and not shard.round.contributors  # nothing re-applied
    assert refused(round_push(shard, wire, 0, 2, w0, "elastic"), "round")  # a round not yet open still is


def test_after_init_a_frame_larger_than_the_slice_is_refused_before_decoding(make):
    shard, wire = make()
    header = msgpack.packb({"v": 1, "op": "PING"})
    assert shard.frame_limit is None  # before INIT only ZeroMQ's limit holds: the INIT carries the slice
    init(shard, wire, vec(0))
    assert shard.frame_limit == N * 8
    shard.handle([zmq.Frame(b"big"), zmq.Frame(header), zmq.Frame(b"\0" * (N * 8 + 1))])
    [(who, reply)] = wire.take()
    assert who == b"big" and refused(reply, "size") and f"at most {N * 8}" in reply.header["reason"]
    assert shard.stats.refused["size"] == 1
    # at the limit it is decoded (and refused for what it is: a frame a PING does not announce)
    shard.handle([zmq.Frame(b"big"), zmq.Frame(header), zmq.Frame(b"\0" * (N * 8))])
    [(_, reply)] = wire.take()
    assert refused(reply, "frames")


def test_stats_name_the_shards_pid(make):
    import os

    shard, wire = make()
    assert ask(shard, wire, {"op": "STATS"}).header["stats"]["pid"] == os.getpid()


def test_two_finite_pushes_that_overflow_the_centre_are_refused_and_counted(make):
    shard, wire = make()
    c = vec(0)
    init(shard, wire, c)
    big = np.zeros(N, np.float32)
    big[3] = 3e38
    assert push(shard, wire, 0, 1, big).header["applied"] is True  # finite, and so is c + big
    after_first = shard.centre.current.copy()
    for mode, seq in (("add", 2), ("scaled", 3), ("staleness", 4)):
        assert refused(push(shard, wire, 0, seq, big, mode=mode), "not_finite"), mode
        np.testing.assert_array_equal(shard.centre.current, after_first)
    assert shard.version == 1
    assert np.isfinite(shard.centre.current).all()
    assert shard.stats.overflows[0] == 3 and shard.stats.refused["not_finite"] == 3
    stats = ask(shard, wire, {"op": "STATS"}).header["stats"]
    assert stats["overflows"] == {"0": 3}
    assert push(shard, wire, 0, 5, -big).header["applied"] is True  # a later sane push is applied


def test_a_round_whose_sum_overflows_keeps_the_centre_and_moves_on(make):
    shard, wire = make()
    c = vec(0)
    c[2] = 2e38
    init(shard, wire, c, world=2)
    w = c.copy()
    w[2] = 3.3e38  # E = α(W − C) = 2.6e38 per worker, finite; C + ΣE = 7.2e38 is not a float32
    for worker in (0, 1):
        shard.handle(frames(b"w%d" % worker, {"op": "ROUND", "worker": worker, "round": 0, "mode": "elastic",
                                             "alpha": 2.0}, [w]))
    replies = wire.take()
    # answered as a missed round: the workers pull the centre and go on (optimizers.rule.RoundRule)
    assert len(replies) == 2 and all(refused(m, "round") and "not finite" in m.header["reason"]
                                     for _, m in replies), replies
    assert shard.stats.refused["not_finite"] == 1
    np.testing.assert_array_equal(shard.centre.current, c)
    assert shard.version == 0 and shard.round.number == 1
    assert shard.stats.overflows[0] == 1 and shard.stats.overflows[1] == 1


# ---- checkpoints that go bad, or cannot be written --------------------------------------------------

def _rewrite(path, change):
    """Rewrite a checkpoint's header with ``change`` applied, the CRCs still valid (np.savez computes the zip's)."""
    with np.load(path) as z:
        header, centre = json.loads(bytes(z["meta"]).decode()), np.array(z["centre"])
    change(header)
    np.savez(path, centre=centre, meta=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))


@pytest.mark.parametrize("field, value", [
    ("version", "abc"), ("version", -1), ("version", True), ("start", 1.5), ("world", None), ("round", [1]),
    ("seqs", {"0": "7"}), ("updates", [1, 2]), ("lost", ["2"]), ("left", 3), ("fingerprint", 7),
    ("written_at", "now"), ("crc32", -1),
])
def test_a_checkpoint_header_field_of_the_wrong_type_is_refused_naming_it(make, tmp_path, field, value):
    shard, _ = busy_shard(make)
    path = checkpoint.save_shard(tmp_path, shard.snapshot())
    _rewrite(path, lambda h: h.update({field: value}))
    with pytest.raises(checkpoint.CheckpointError, match=f"{path.name}.*unexpected header field: {field} is"):
        checkpoint.load_shard(path)
    fresh, _ = make(index=2)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.restore_shard(fresh, path)
    assert fresh.centre is None


def test_a_checkpoint_range_that_does_not_fit_is_refused(make, tmp_path):
    shard, _ = busy_shard(make)
    path = checkpoint.save_shard(tmp_path, shard.snapshot())
    _rewrite(path, lambda h: h.update(start=30, end=40, total=35))
    with pytest.raises(checkpoint.CheckpointError, match="start <= end <= total"):
        checkpoint.load_shard(path)


def test_a_non_finite_centre_is_never_checkpointed_and_the_good_one_stays(make, tmp_path):
    shard, wire = busy_shard(make)
    saver = checkpoint.Checkpointer(shard, tmp_path, every_s=0.0)
    path = saver.save()
    good = checkpoint.load_shard(path)[0]
    push(shard, wire, 0, 5, vec(5))
    shard.centre.current[3] = np.inf  # as a centre overflowed by an unchecked apply would be
    with pytest.raises(checkpoint.CheckpointError, match="NaN or Inf"):
        checkpoint.save_shard(tmp_path, shard.snapshot())
    assert saver.save() is None  # the checkpointer's save: a warning and a count, not an exception
    assert shard.stats.checkpoint_failures == 1 and "NaN or Inf" in shard.stats.checkpoint_error
    state, _ = checkpoint.load_shard(path)
    assert _same(state, good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-2.npz"]


def test_a_new_checkpoint_keeps_the_last_good_one_and_restore_takes_the_newest_good(make, tmp_path):
    shard, wire = busy_shard(make)
    first = checkpoint.save_shard(tmp_path, shard.snapshot())
    v1 = shard.version
    push(shard, wire, 0, 5, vec(5))
    assert checkpoint.save_shard(tmp_path, shard.snapshot()) == first
    prev = tmp_path / "shard-2.prev.npz"
    assert checkpoint.load_shard(first)[0].version == v1 + 1 and checkpoint.load_shard(prev)[0].version == v1
    path, state, _ = checkpoint.newest_shard_checkpoint(tmp_path, 2)
    assert path == first and state.version == v1 + 1
    first.write_bytes(first.read_bytes()[:100])  # torn (a disk that lies, a copy cut short)
    path, state, _ = checkpoint.newest_shard_checkpoint(tmp_path, 2)
    assert path == prev and state.version == v1
    fresh, _ = make(index=2)
    assert checkpoint.restore_newest(fresh, tmp_path).version == v1
    prev.write_bytes(b"not a zip")
    with pytest.raises(checkpoint.CheckpointError, match="shard-2.npz is torn"):
        checkpoint.newest_shard_checkpoint(tmp_path, 2)
    assert checkpoint.newest_shard_checkpoint(tmp_path / "empty", 2) is None


def test_a_checkpoint_that_cannot_be_written_is_counted_and_written_once_it_can(make, tmp_path):
    shard, wire = busy_shard(make)
    blocker = tmp_path / "ckpt"
    blocker.write_text("a file where the checkpoint directory should be")  # mkdir fails, even for root
    saver = checkpoint.Checkpointer(shard, blocker, every_s=0.0)
    assert saver.save() is None and saver.save() is None  # each save is tried: the state is still unsaved
    assert shard.stats.checkpoint_failures == 2 and "Error" in shard.stats.checkpoint_error
    stats = ask(shard, wire, {"op": "STATS"}).header["stats"]["checkpoint"]
    assert stats["failures"] == 2 and stats["ok_at"] == 0
    blocker.unlink()
    path = saver.save()
    assert path is not None and checkpoint.load_shard(path)[0].version == shard.version
    assert shard.stats.checkpoint_ok_at > 0


def test_a_failing_checkpointer_retries_at_the_interval_not_every_tick(make, tmp_path):
    shard, _ = busy_shard(make)
    blocker = tmp_path / "ckpt"
    blocker.write_text("")
    saver = checkpoint.Checkpointer(shard, blocker, every_s=3600.0)
    saver.tick()  # the first checkpoint is due at once
    for _ in range(5):
        saver.tick()  # then not before the interval
    assert shard.stats.checkpoint_failures == 1


# ---- tickets: the coordinator's word on ranks, incarnations and slices -----------------------------------------

SECRET = b"s" * 32


@pytest.fixture
def signed(kernels):
    def signed(world: int = 2, **config) -> tuple[Shard, Wire]:
        """A shard holding the server's secret, as `pserver start` starts it, initialised with the coordinator's
        ticket."""
        return _signed(kernels, world, **config)
    return signed


def _signed(kernels, world: int, **config) -> tuple[Shard, Wire]:
    from pserver import security

    wire = Wire()
    shard = Shard(ShardConfig(world=world, **config), kernels=kernels, socket=wire, secret=SECRET)
    x = vec(0)
    ticket = security.init_ticket(SECRET, 0, 0, N, N, world, "f" * 64)
    reply = ask(shard, wire, {"op": "INIT", "start": 0, "end": N, "total": N, "world": world, "fingerprint": "f" * 64,
                              "ticket": ticket}, [x])
    assert reply.header["ok"] and reply.header["first"]
    return shard, wire


def ticketed(worker: int, inc: int = 1) -> dict:
    from pserver import security

    return {"worker": worker, "inc": inc, "ticket": security.worker_ticket(SECRET, worker, inc)}


def signed_push(shard, wire, who: dict, seq: int, delta) -> protocol.Message | None:
    return ask(shard, wire, {"op": "PUSH", **who, "seq": seq, "pulled": 0, "mode": "add"}, [delta],
               b"w%d" % who["worker"])


def test_a_forged_future_seq_cannot_void_a_real_worker(signed):
    shard, wire = signed()
    zero, one = np.zeros(N, np.float32), np.ones(N, np.float32)
    # a stranger's push for worker 1 before it starts: no ticket, a forged one, or the largest seq msgpack carries
    assert refused(push(shard, wire, 1, 2**64 - 1, zero), "ticket")
    assert refused(signed_push(shard, wire, ticketed(1), 2**64 - 1, zero), "malformed")
    assert refused(signed_push(shard, wire, {"worker": 1, "inc": 1, "ticket": "0" * 64}, 2**40 - 1, zero), "ticket")
    assert refused(signed_push(shard, wire, {**ticketed(0), "worker": 1}, 2**40 - 1, zero), "ticket")
    # a seq beyond the ticket's incarnation is refused even with the ticket: it would void the next incarnation
    assert refused(signed_push(shard, wire, ticketed(1), 2**40, zero), "malformed")
    assert shard.version == 0 and 1 not in shard._pushes
    for seq in (1, 2, 3):  # the real worker 1, first incarnation
        assert signed_push(shard, wire, ticketed(1), seq, one).header["applied"] is True
    # its restarted process, incarnation 2, numbers past the first's
    assert signed_push(shard, wire, ticketed(1, 2), (1 << 40) + 1, one).header["applied"] is True
    expected = vec(0)
    for _ in range(4):
        expected = expected + np.float32(1)
    np.testing.assert_array_equal(shard.centre.current, expected)


def test_worker_requests_need_a_ticket_of_the_world(signed):
    shard, wire = signed(world=2)
    assert refused(ask(shard, wire, {"op": "PULL", "worker": 0}), "ticket")
    assert refused(ask(shard, wire, {"op": "PULL", **ticketed(5)}), "malformed")  # a rank no JOIN gives
    assert refused(ask(shard, wire, {"op": "BYE", "worker": 1}), "ticket")
    assert refused(ask(shard, wire, {"op": "ROUND", "worker": 1, "round": 0, "mode": "average"}, [vec(1)]), "ticket")
    assert ask(shard, wire, {"op": "PULL", **ticketed(0)}).header["ok"]
    assert ask(shard, wire, {"op": "PULL", "worker": protocol.OBSERVER}).header["ok"]  # the evaluator: no rank
    assert not shard.left and set(shard.stats.pulls) == {0, protocol.OBSERVER}


def test_init_must_carry_the_coordinators_slice_and_world(make, kernels):
    from pserver import security

    shard = Shard(ShardConfig(world=2), kernels=kernels, socket=(wire := Wire()), secret=SECRET)
    x = vec(0)
    base = {"op": "INIT", "start": 0, "end": N, "total": N, "world": 2, "fingerprint": "f" * 64}
    assert refused(ask(shard, wire, base, [x]), "ticket")  # no ticket
    assert refused(ask(shard, wire, {**base, "world": 10**7}, [x]), "malformed")  # beyond MAX_WORLD
    assert refused(ask(shard, wire, {**base, "world": 3}, [x]), "mismatch")  # not the server's world
    other = security.init_ticket(SECRET, 0, 0, N, N + 5, 2, "f" * 64)  # the ticket of another total
    assert refused(ask(shard, wire, {**base, "ticket": other}, [x]), "ticket")
    assert shard.centre is None
    good = security.init_ticket(SECRET, 0, 0, N, N, 2, "f" * 64)
    assert ask(shard, wire, {**base, "ticket": good}, [x]).header["first"] is True


def test_an_unsigned_shard_bounds_seqs_worlds_and_ids_too(make):
    shard, wire = make()
    assert refused(init(shard, wire, vec(0), world=10**7), "malformed") and shard.centre is None
    init(shard, wire, vec(0), world=2)
    assert refused(push(shard, wire, 1, 2**64 - 1, np.zeros(N, np.float32)), "malformed")
    assert refused(ask(shard, wire, {"op": "PULL", "worker": 200_000}), "malformed")
    assert push(shard, wire, 1, 1, np.ones(N, np.float32)).header["applied"] is True
    assert set(shard.stats.updates) == {1} and not shard.stats.pulls
    shard, wire = make(world=2)
    assert refused(init(shard, wire, vec(0), world=3), "mismatch") and shard.centre is None


def test_lost_needs_the_servers_proof(signed):
    from pserver import security

    shard, wire = signed()
    assert refused(ask(shard, wire, {"op": "LOST", "lost": [0, 1]}), "ticket") and not shard.lost
    assert refused(ask(shard, wire, {"op": "LOST", "lost": [5]}), "malformed")  # outside the world
    proof = security.lost_proof(SECRET, [1], [])
    assert ask(shard, wire, {"op": "LOST", "lost": [1], "done": [], "proof": proof}).header["ok"]
    assert shard.lost == {1}

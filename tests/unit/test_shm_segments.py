"""Shared-memory segments (`pserver.shm`) and a shard's SHM handling, in process: no sockets."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from pserver import protocol, shm
from pserver.shard import Shard, numba_kernels
from pserver.shard_state import ShardConfig
from wire import Wire

pytestmark = pytest.mark.skipif(not shm.available(), reason="no /dev/shm")
N = 1000


@pytest.fixture(autouse=True)
def no_segments_left():
    yield
    left = shm.ours([os.getpid()])
    for name in left:
        shm._unlink(name)
    assert not left, f"segments left behind: {left}"


def test_a_read_is_never_torn_while_the_shard_keeps_writing():
    """Every publish writes a constant vector (its version); a read returns one such vector or None."""
    seg = shm.CentreSegment.create(shm.centre_name(0), 200_000)
    reader = shm.CentreSegment.open(seg.name, seg.n, seg.token)
    seg.unlink()
    stop = threading.Event()

    def write() -> None:
        version = 0
        while not stop.is_set():
            version += 1
            np.copyto(seg.writable(), np.float32(version))  # releases the GIL: reads run meanwhile
            seg.publish(version)

    writer = threading.Thread(target=write)
    writer.start()
    out = np.empty(seg.n, np.float32)
    reads = torn = 0
    try:
        for _ in range(300):
            version = reader.read(out)
            if version is None:
                continue
            reads += 1
            torn += int(not (out == np.float32(version)).all())
    finally:
        stop.set()
        writer.join(10)
    assert reads > 0 and torn == 0
    reader.close()
    seg.close()


def test_an_abandoned_write_is_never_read():
    seg = shm.CentreSegment.create(shm.centre_name(1), N)
    try:
        np.copyto(seg.writable(), 1.0)
        seg.publish(1)
        np.copyto(seg.writable(), np.nan)  # a refused update
        seg.abandon()
        out = np.empty(N, np.float32)
        assert seg.read(out) == 1 and (out == 1.0).all()
    finally:
        seg.unlink()
        seg.close()


def test_open_checks_name_size_and_token():
    seg = shm.Segment.create(shm.push_name(0, 3), N)
    try:
        with pytest.raises(ValueError, match="not the one announced"):
            shm.Segment.open(seg.name, N, seg.token ^ 1)
        with pytest.raises(ValueError, match="bytes"):
            shm.Segment.open(seg.name, N + 100, seg.token)
        with pytest.raises(ValueError, match="not a notpu segment"):
            shm.Segment.open("../etc/passwd", N, seg.token)
        shm.Segment.open(seg.name, N, seg.token).close()
    finally:
        seg.unlink()
        seg.close()


def test_remove_stale_takes_the_segments_of_dead_processes_only():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = f"notpu-{pid}-s0-centre"
    with open(os.path.join(shm.SHM_DIR, stale), "wb"):
        pass
    mine = shm.CentreSegment.create(shm.centre_name(2), N)
    try:
        assert stale in shm.remove_stale()
        assert shm.ours([pid]) == [] and shm.ours([os.getpid()]) == [mine.name]
    finally:
        mine.unlink()
        mine.close()


# ---- a shard's side, driven with frames ------------------------------------------------------------------

def frames(header, arrays=()):
    return [zmq.Frame(b"peer"), *(zmq.Frame(bytes(f)) for f in protocol.encode(header, arrays))]


@pytest.fixture
def shard():
    s = Shard(ShardConfig(), kernels=numba_kernels(), socket=Wire())
    s.handle(frames({"op": "INIT", "start": 0, "end": N, "total": N, "world": 2}, [np.arange(N, dtype=np.float32)]))
    s.socket.take()
    yield s
    s.close_segments()


def ask(shard, header, arrays=()):
    shard.handle(frames(header, arrays))
    [(_, reply)] = shard.socket.take()
    return reply


def test_a_push_through_shared_memory_is_applied_and_read_back(shard):
    r = ask(shard, {"op": "SHM", "worker": 1}).header
    assert r["ok"] and r["n"] == N
    centre = shm.CentreSegment.open(r["centre"], N, r["centre_token"])
    push = shm.Segment.open(r["push"], N, r["push_token"])
    push.unlink()
    try:
        push.buffers[0][:] = 2.0
        reply = ask(shard, {"op": "PUSH", "worker": 1, "seq": 1, "pulled": 0, "mode": "add", "pull": True,
                            "shm": r["push_token"]})
        assert reply.header["shm"] is True and reply.arrays == [] and reply.header["version"] == 1
        out = np.empty(N, np.float32)
        assert centre.read(out) == 1 and np.array_equal(out, np.arange(N, dtype=np.float32) + 2)
        # the apply's pass also wrote the new centre into the worker's reply area, and the header says so
        assert reply.header["shm_centre"] == 1 and np.array_equal(push.buffers[1], out)
        push.buffers[0][:] = out + 10  # elastic: W; E = ½(W − C) lands in the reply area
        reply = ask(shard, {"op": "PUSH", "worker": 1, "seq": 2, "pulled": 1, "mode": "elastic", "scale": 0.5,
                            "shm": r["push_token"]})
        assert reply.header["shm_arrays"] == 1 and (push.buffers[1] == 5.0).all()
        # a TCP worker of the same shard still gets the centre as a frame (a copy)
        pulled = ask(shard, {"op": "PULL", "worker": 0})
        assert np.array_equal(pulled.arrays[0], np.arange(N, dtype=np.float32) + 7)
    finally:
        centre.close()
        push.close()


def test_the_centre_in_the_reply_area_is_claimed_only_when_the_apply_wrote_it(shard):
    r = ask(shard, {"op": "SHM", "worker": 1}).header
    centre = shm.CentreSegment.open(r["centre"], N, r["centre_token"])
    push = shm.Segment.open(r["push"], N, r["push_token"])
    push.unlink()
    start = np.arange(N, dtype=np.float32)
    head = {"op": "PUSH", "worker": 1, "pulled": 0, "pull": True, "shm": r["push_token"]}
    try:
        push.buffers[0][:] = 4.0
        reply = ask(shard, {**head, "seq": 1, "mode": "scaled", "scale": 0.5}).header
        assert reply["shm_centre"] == 1 and np.array_equal(push.buffers[1], start + 2)
        reply = ask(shard, {**head, "seq": 2, "mode": "staleness", "scale": 1.0}).header  # pulled 0: staleness 1
        assert reply["shm_centre"] == 1 and np.array_equal(push.buffers[1], start + 4)
        push.buffers[1][:] = -1.0
        retry = ask(shard, {**head, "seq": 2, "mode": "staleness", "scale": 1.0}).header
        assert retry["applied"] is False and "shm_centre" not in retry  # not rewritten: read the centre's segment
        out = np.empty(N, np.float32)
        assert centre.read(out) == 2 and np.array_equal(out, start + 4)
        push.buffers[0][:] = 1.0
        assert "shm_centre" not in ask(shard, {**head, "seq": 3, "mode": "add", "pull": False}).header
        push.buffers[0][3] = np.nan
        refused = ask(shard, {**head, "seq": 4, "mode": "add"}).header
        assert refused["code"] == "not_finite" and "shm_centre" not in refused
        assert shard.version == 3 and np.array_equal(shard.centre.current, start + 5)
    finally:
        centre.close()
        push.close()


@pytest.mark.parametrize("header, arrays, code", [
    ({"op": "PUSH", "worker": 1, "seq": 1, "pulled": 0, "mode": "add", "shm": 12345}, [], "shm"),  # not its token
    ({"op": "PULL", "worker": 1, "shm": 12345}, [], "shm"),
    ({"op": "SHM", "worker": 5}, [], "malformed"),  # outside the world
    ({"op": "SHM", "worker": 1}, [np.ones(N, np.float32)], "frames"),
])
def test_bad_shared_memory_requests_are_refused_and_change_nothing(shard, header, arrays, code):
    before = shard.centre.current.copy()
    reply = ask(shard, header, arrays)
    assert reply.header["ok"] is False and reply.header["code"] == code, reply.header
    assert np.array_equal(shard.centre.current, before) and shard.version == 0


def test_a_push_with_frames_and_a_token_is_refused(shard):
    r = ask(shard, {"op": "SHM", "worker": 1}).header
    shm._unlink(r["push"])
    reply = ask(shard, {"op": "PUSH", "worker": 1, "seq": 1, "pulled": 0, "mode": "add", "shm": r["push_token"]},
                [np.ones(N, np.float32)])
    assert reply.header["code"] == "frames" and shard.version == 0


def test_a_shard_removes_its_segments_when_it_closes(shard):
    r = ask(shard, {"op": "SHM", "worker": 1}).header  # a worker that died before it mapped its segment
    assert set(shm.ours([os.getpid()])) == {r["centre"], r["push"]}
    shard.close_segments()
    assert shm.ours([os.getpid()]) == []


def test_a_segment_that_does_not_fit_is_refused_not_a_sigbus_later(monkeypatch):
    def full(fd, offset, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="No space"):
        shm.CentreSegment.create(shm.centre_name(3), N)
    assert shm.ours([os.getpid()]) == []


def test_a_killed_process_not_yet_reaped_counts_as_gone():
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and b") Z" not in open(f"/proc/{zombie.pid}/stat", "rb").read():
        time.sleep(0.01)  # exited, not waited for: a zombie
    name = f"notpu-{zombie.pid}-s0-centre"
    with open(os.path.join(shm.SHM_DIR, name), "wb"):
        pass
    try:
        assert name in shm.remove_stale()
    finally:
        shm._unlink(name)
        zombie.wait(10)

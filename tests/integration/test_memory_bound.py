"""Hostile peers: oversized frames and a flood from many sockets leave `pserver start` alive, answering, and
within a stated memory bound.

The bound, per process: SOCKETS connections × (RCVHWM + 1) messages × the
frame limit, plus SLACK for the allocator (see `pserver.shard`'s docstring
for why that is what ZeroMQ bounds). The peak RSS is read from the kernel
(VmHWM, reset before the flood), so a spike that is freed again still counts.
"""
from __future__ import annotations

import time
from pathlib import Path

import msgpack
import numpy as np
import psutil
import pytest
import zmq

from pserver import coordinator
from pserver.client import Client, ClientConfig
from pserver.layout import Layout
from pserver.router import RCVHWM

pytestmark = pytest.mark.integration
LAYOUT = Layout.from_shapes([(50, 30), (30,), (1001,)])  # 2531 floats: a slice of 10 KiB
MIB = 1 << 20
SHARD_LIMIT = 1 * MIB  # --max-message-mb 1
SOCKETS = 50
SLACK = 48 * MIB
REPLY_WAIT_S = 20.0


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS


def flood(context: zmq.Context, endpoint: str, frame: bytes, op: str) -> list[zmq.Socket]:
    """SOCKETS DEALERs, each sending one message whose array frame is ``frame``; returns the sockets."""
    header = msgpack.packb({"v": 1, "op": op, "worker": 9, "seq": 1, "pulled": 0, "mode": "add",
                            "arrays": [["<f4", len(frame) // 4]]})
    sockets = []
    for _ in range(SOCKETS):
        s = context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, 5000)
        s.connect(f"tcp://{endpoint}")
        s.send_multipart([header, frame], copy=False)
        sockets.append(s)
    return sockets


def replies(sockets: list[zmq.Socket], wait_s: float) -> list[dict | None]:
    """Each socket's reply header, or None if none came within ``wait_s`` (one deadline for all)."""
    deadline = time.monotonic() + wait_s
    out = []
    for s in sockets:
        left = max(int((deadline - time.monotonic()) * 1000), 0)
        out.append(msgpack.unpackb(s.recv_multipart()[0]) if s.poll(left) else None)
    return out


def ping(context: zmq.Context, endpoint: str) -> dict | None:
    s = context.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{endpoint}")
    try:
        s.send_multipart([msgpack.packb({"v": 1, "op": "PING"})])
        return msgpack.unpackb(s.recv_multipart()[0]) if s.poll(10_000) else None
    finally:
        s.close(linger=0)


def test_a_flood_of_frames_at_the_limits_leaves_both_processes_bounded_and_answering(pserver):
    server = pserver("--max-message-mb", str(SHARD_LIMIT / MIB))
    c = Client(server.address, ClientConfig(timeout_s=10.0, retries=1))
    start = np.random.default_rng(0).standard_normal(LAYOUT.total).astype(np.float32)
    assert c.init(start, LAYOUT)
    stats = c.stats()
    pids = {"coordinator": stats["coordinator"]["pid"], "shard": stats["shards"][0]["pid"]}
    assert pids["coordinator"] == server.proc.pid
    assert psutil.Process(pids["shard"]).parent().pid == server.proc.pid
    endpoints = {"coordinator": server.address, "shard": c.shards[0].endpoint}
    limits = {"coordinator": coordinator.MAX_MESSAGE_BYTES, "shard": SHARD_LIMIT}
    ctx = zmq.Context.instance()
    figures = {}
    for name in ("shard", "coordinator"):
        pid, endpoint, limit = pids[name], endpoints[name], limits[name]
        before = psutil.Process(pid).memory_info().rss
        reset_peak(pid)
        under = flood(ctx, endpoint, b"\0" * (limit - 64), "PUSH")  # ZeroMQ takes them; the server refuses them
        over = flood(ctx, endpoint, b"\0" * (limit + 64), "PUSH")  # ZeroMQ drops each sender
        answered = replies(under, REPLY_WAIT_S)
        dropped = replies(over, 1.0)
        peak = peak_rss(pid)
        for s in under + over:
            s.close(linger=0)
        bound = before + SOCKETS * (RCVHWM + 1) * limit + SLACK
        figures[name] = (before, peak, bound)
        print(f"\n{name} (pid {pid}): RSS {before / MIB:.0f} MiB before, peak {peak / MIB:.0f} MiB during "
              f"{SOCKETS} frames of {(limit - 64) / MIB:.2f} MiB and {SOCKETS} of {(limit + 64) / MIB:.2f} MiB; "
              f"bound {bound / MIB:.0f} MiB")
        assert all(r is not None and r["ok"] is False for r in answered), \
            f"{name}: {sum(r is None for r in answered)} of {SOCKETS} frames under the limit got no error reply"
        expected = "size" if name == "shard" else "unknown_op"  # a frame over the slice; PUSH is a shard's op
        assert {r["code"] for r in answered} == {expected}, answered[:3]
        assert dropped == [None] * SOCKETS, f"{name} answered a frame over ZeroMQ's limit"
        assert peak <= bound, f"{name}: peak RSS {peak / MIB:.0f} MiB over the bound {bound / MIB:.0f} MiB"
        assert psutil.Process(pid).is_running()
        assert ping(ctx, endpoint)["ok"] is True, f"{name} does not answer a PING after the flood"
    # Same processes, same centre, still serving.
    after = c.stats()
    assert (after["coordinator"]["pid"], after["shards"][0]["pid"]) == (pids["coordinator"], pids["shard"])
    assert after["shards"][0]["refused"] == {"size": SOCKETS} and after["shards"][0]["version"] == 0
    np.testing.assert_array_equal(c.pull(), start)
    c.close()

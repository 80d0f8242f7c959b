"""The co-located fast path with real processes: a worker on the shard's host exchanges through shared memory.

Each test proves an invariant (the centre is initial + everything pushed, to the last bit; E is α(W − C))
and that no segment of its servers is left in /dev/shm, after a clean stop and after a SIGKILL.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pserver import shm
from pserver.client import Client, ClientConfig
from pserver.layout import Layout

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not shm.available(), reason="no /dev/shm")]
LAYOUT = Layout.from_shapes([(50, 30), (30,), (1001,)])  # 2531 floats, odd on purpose
FAST = ClientConfig(timeout_s=2.0, retries=8, backoff_s=0.05, max_backoff_s=0.5)


def initial() -> np.ndarray:
    return np.random.default_rng(7).integers(-100, 100, LAYOUT.total).astype(np.float32)


def shard_pids(client: Client) -> list[int]:
    return [int(s["pid"]) for s in client.stats()["shards"]]


def test_shared_memory_and_frames_move_the_same_centre(pserver):
    server = pserver("--shards", "2", "--workers", "2")
    local, remote = Client(server.address, FAST), Client(server.address, ClientConfig(shared_memory=False))
    try:
        local.join("local")
        assert local.init(initial(), LAYOUT)
        remote.join("remote")  # after INIT: its JOIN reply carries the shards' ranges
        np.testing.assert_array_equal(local.pull(), initial())
        assert local.shared_memory == [True, True] and remote.shared_memory == [False, False]
        pids = shard_pids(local)
        names = shm.ours(pids)
        assert len(names) == 2 and all(n.endswith("-centre") for n in names)  # push segments: unlinked once mapped

        rng = np.random.default_rng(3)
        expected = initial().copy()
        area = local.delta_buffer()
        assert area is None  # two shards: push copies each slice into its shard's segment
        for i in range(30):
            d = rng.integers(-8, 9, LAYOUT.total).astype(np.float32)  # integers: every sum exact in any order
            expected += d
            client = local if i % 2 else remote
            _, centre = client.push(d, pull=(i % 3 == 0))
            if centre is not None:
                np.testing.assert_array_equal(centre, expected)
        np.testing.assert_array_equal(local.pull(), expected)
        np.testing.assert_array_equal(remote.pull(), expected)

        w = expected + 6  # elastic: E = α(W − C) comes back through the reply area
        _, e = local.push(w, mode="elastic", scale=0.5)
        np.testing.assert_array_equal(e, np.full(LAYOUT.total, 3, np.float32))
        np.testing.assert_array_equal(remote.pull(), expected + 3)
        assert local.versions == remote.versions == [31, 31]  # 30 pushes and the elastic one
    finally:
        local.close()
        remote.close()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)
    assert shm.wait_gone(pids) == []


def test_one_shard_hands_back_the_centre_in_the_reply_area(pserver):
    """One shard: the new centre is read where the shard's apply wrote it (a read-only view), and it is the
    centre, also while another worker's pushes move it in between."""
    server = pserver("--shards", "1", "--workers", "2")
    local, remote = Client(server.address, FAST), Client(server.address, ClientConfig(shared_memory=False))
    try:
        local.join("local")
        assert local.init(initial(), LAYOUT)
        remote.join("remote")
        local.pull()
        assert local.shared_memory == [True]
        pids = shard_pids(local)
        rng = np.random.default_rng(5)
        expected = initial().copy()
        area = local.delta_buffer()
        for i in range(12):
            d = rng.integers(-8, 9, LAYOUT.total).astype(np.float32)
            remote.push(d)
            expected += d
            area[:] = rng.integers(-8, 9, LAYOUT.total).astype(np.float32)  # computed in the push area
            expected += area
            _, centre = local.push(area, pull=True)
            assert not centre.flags.writeable
            np.testing.assert_array_equal(centre, expected)
            assert local.versions == [2 * (i + 1)]
        np.testing.assert_array_equal(remote.pull(), expected)
    finally:
        local.close()
        remote.close()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)
    assert shm.wait_gone(pids) == []


CRASHER = """
import os, signal, sys
import numpy as np
from pserver.client import Client
c = Client(sys.argv[1])
c.join("crasher")
c.pull()
assert c.shared_memory == [True], c.shared_memory
c.delta_buffer()[:] = np.nan  # half-written garbage, never announced by a PUSH header
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_worker_killed_mid_exchange_leaves_no_state_and_no_segment(pserver):
    server = pserver("--workers", "2")
    driver = Client(server.address, FAST)
    try:
        driver.join("driver")
        assert driver.init(initial(), LAYOUT)
        pids = shard_pids(driver)
        crasher = subprocess.run([sys.executable, "-c", CRASHER, server.address], timeout=60)
        assert crasher.returncode == -signal.SIGKILL
        assert [n for n in shm.ours(pids) if not n.endswith("-centre")] == []  # its push segment went with it
        np.testing.assert_array_equal(driver.pull(), initial())  # nothing applied
        d = np.ones(LAYOUT.total, np.float32)
        _, centre = driver.push(d, pull=True)
        np.testing.assert_array_equal(centre, initial() + 1)
    finally:
        driver.close()


def test_a_killed_shard_is_restarted_its_segment_removed_and_workers_map_again(pserver, tmp_path):
    server = pserver("--workers", "1", "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every-s", "0.2")
    client = Client(server.address, FAST)
    try:
        client.join("w")
        assert client.init(initial(), LAYOUT)
        d = np.ones(LAYOUT.total, np.float32)
        client.push(d)
        assert client.shared_memory == [True]
        [old] = shard_pids(client)
        [segment] = shm.ours([old])
        time.sleep(1.0)  # a checkpoint holds the push
        os.kill(old, signal.SIGKILL)
        _, centre = client.push(d, pull=True)  # retried until the restored shard answers, then mapped anew
        np.testing.assert_array_equal(centre, initial() + 2)
        [new] = shard_pids(client)
        assert new != old and client.shared_memory == [True]
        assert not os.path.exists(os.path.join(shm.SHM_DIR, segment))  # the restarted shard removed it
        assert len(shm.ours([new])) == 1
    finally:
        client.close()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)
    assert shm.wait_gone([old, new]) == []


def test_a_server_killed_outright_leaves_segments_the_next_start_removes(pserver):
    first = pserver("--workers", "1")
    client = Client(first.address, FAST)
    try:
        client.join("w")
        client.init(initial(), LAYOUT)
        client.pull()
        pids = shard_pids(client)
        assert len(shm.ours(pids)) == 1
    finally:
        client.close()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    first.proc.kill()
    first.proc.wait(30)
    assert len(shm.ours(pids)) == 1  # nobody was left to remove it
    pserver("--workers", "1")  # its shard removes segments of processes that are gone
    assert shm.ours(pids) == []

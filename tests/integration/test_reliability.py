"""Reliability, server side: CurveZMQ allow-list, shard checkpoints and restarts, lost workers,
the running-median norm guard, and bounded staleness (SSP) — all against `pserver start`."""
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pserver import checkpoint
from pserver.client import Client, ClientConfig, request
from pserver.errors import ProcessExited, RemoteError, ServerUnreachable, WaitTimeout
from pserver.layout import Layout
from pserver.procs import stop_trees, wait_for_file
from pserver.security import client_curve, create_keys

from conftest import wait_for

sys.path.insert(0, str(Path(__file__).parent))
from datasets import write_fading  # noqa: E402

pytestmark = pytest.mark.integration
LAYOUT = Layout.from_shapes([(50, 30), (30,), (1001,)])  # 2531 floats
FAST = ClientConfig(timeout_s=0.5, retries=0, backoff_s=0.05)


def initial() -> np.ndarray:
    return np.random.default_rng(7).integers(-100, 100, LAYOUT.total).astype(np.float32)


def shard_procs(server) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.proc.pid).children() if "pserver.shard_process" in " ".join(p.cmdline())]


# ---- CurveZMQ ------------------------------------------------------------------

def test_curve_admits_only_listed_keys(pserver, tmp_path):
    keys = create_keys(tmp_path / "keys", workers=1)
    other = create_keys(tmp_path / "other", workers=1)  # a valid key pair the server never listed
    server = pserver("--keys", str(keys), "--shards", "2")
    good = Client(server.address, curve=client_curve(keys, "worker0"))
    good.join("good")
    assert good.init(initial(), LAYOUT)
    good.pull()
    good.push(np.ones(LAYOUT.total, np.float32))
    np.testing.assert_array_equal(good.pull(), initial() + 1)
    assert [s["version"] for s in good.stats()["shards"]] == [1, 1]  # the coordinator reaches its shards too

    unlisted = dict(client_curve(other, "worker0"), server=client_curve(keys)["server"])
    for name, curve in [("no key", None), ("unlisted key", unlisted)]:
        t0 = time.monotonic()
        c = Client(server.address, FAST, curve=curve)
        for call in (c.stats, lambda: c.join("intruder")):
            with pytest.raises(ServerUnreachable):
                call()
        # and straight at a shard, which it learns nothing about but may guess
        c.use_shards([{"index": s.index, "endpoint": s.endpoint, "start": s.start, "end": s.end} for s in good.shards])
        with pytest.raises(ServerUnreachable):
            c.pull()
        c.worker = 99
        with pytest.raises(ServerUnreachable):
            c.push(np.full(LAYOUT.total, 1000, np.float32))
        assert time.monotonic() - t0 < 10, name
        c.close()
    np.testing.assert_array_equal(good.pull(), initial() + 1)
    assert [s["version"] for s in good.stats()["shards"]] == [1, 1]
    good.close()


def test_non_loopback_needs_keys_or_insecure(tmp_path):
    cmd = [sys.executable, "-m", "pserver.cli", "start", "--host", "0.0.0.0", "--port", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--insecure" in out.stderr and "--keys" in out.stderr


def test_insecure_bind_warns(pserver):
    server = pserver("--host", "0.0.0.0", "--insecure")
    assert "--insecure" in server.log() and "without encryption" in server.log()


# ---- checkpoints ---------------------------------------------------------------

def test_killed_shard_restarts_from_its_checkpoint(pserver, tmp_path):
    ckpt = tmp_path / "ckpt"
    every_s = 0.5
    server = pserver("--shards", "2", "--checkpoint-dir", str(ckpt), "--checkpoint-every-s", str(every_s))
    c = Client(server.address, ClientConfig(timeout_s=1.0, retries=30, backoff_s=0.05, max_backoff_s=0.5), worker=0)
    c.join("w0")
    c.init(initial(), LAYOUT)
    one = np.ones(LAYOUT.total, np.float32)
    for _ in range(30):
        c.push(one)

    def checkpointed() -> int:  # written atomically (pserver.fileio): present means complete
        path = ckpt / "shard-0.npz"
        return checkpoint.load_shard(path)[0].version if path.exists() else -1

    wait_for(lambda: checkpointed() >= 30, 20 * every_s + 10, "a checkpoint of shard 0 holding all 30 pushes")
    for _ in range(20):
        c.push(one)  # some of these may be after the last checkpoint
    victim = shard_procs(server)[0]
    on_disk = checkpointed()  # it can only grow before the kill
    assert on_disk >= 30
    t0 = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    victim.wait(5)
    c.push(one)  # the same client, not recreated: waits, retries, goes on
    recovery_s = time.monotonic() - t0
    centre = c.pull()
    pushes_seen = centre - initial()  # every element of shard 0's range counts shard 0's applied pushes
    s0 = c.shards[0]
    applied0 = int(pushes_seen[s0.start])
    assert (pushes_seen[s0.start:s0.end] == applied0).all() and (pushes_seen[s0.end:] == 51).all()
    lost = 51 - applied0
    assert 0 <= lost <= 51 - on_disk, (lost, on_disk)  # at most the updates since the last checkpoint
    stats = c.stats()
    assert stats["shards"][0]["version"] == applied0 and stats["shards"][1]["version"] == 51
    print(f"\nshard restart: recovered in {recovery_s:.2f} s, {lost} update(s) lost (checkpoint every {every_s} s)")
    assert recovery_s < 20
    assert "restarting it from its checkpoint" in server.log()
    assert shard_procs(server)[0].pid != victim.pid
    c.close()


def test_restore_resumes_the_model_and_refuses_a_torn_checkpoint(pserver, tmp_path):
    ckpt = tmp_path / "ckpt"
    server = pserver("--shards", "2", "--workers", "2", "--checkpoint-dir", str(ckpt))
    c = Client(server.address)
    c.join("first")
    c.init(initial(), LAYOUT, architecture='{"fake": "keras json"}')
    for _ in range(3):
        c.push(np.ones(LAYOUT.total, np.float32))
    c.close()
    server.proc.send_signal(signal.SIGTERM)  # shards checkpoint on SIGTERM
    assert server.proc.wait(30) == 0

    server = pserver("--shards", "2", "--workers", "2", "--restore", str(ckpt))
    c = Client(server.address)
    reply = c.join("back")
    assert Layout.from_wire(reply["layout"]) == LAYOUT and reply["architecture"] == '{"fake": "keras json"}'
    assert c.init(initial(), LAYOUT) is False  # the model is there already
    np.testing.assert_array_equal(c.pull(), initial() + 3)
    assert c.versions == [3, 3]
    with pytest.raises(RemoteError, match="mismatch"):
        c.init(np.zeros(10, np.float32), Layout.from_shapes([(10,)]))
    c.close()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0

    path = ckpt / "shard-1.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # torn
    prev = ckpt / "shard-1.prev.npz"  # the one before, kept beside it: torn too, else the restore would take it
    if prev.exists():
        prev.write_bytes(prev.read_bytes()[:100])
    cmd = [sys.executable, "-m", "pserver.cli", "start", "--port", "0", "--workers", "2", "--shards", "2", "--restore",
           str(ckpt)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"checkpoint {path} is torn" in out.stderr, out.stderr
    out = subprocess.run([*cmd[:-3], "3", "--restore", str(ckpt)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--shards 2" in out.stderr, out.stderr


# ---- liveness, norm guard, SSP ----------------------------------------------------

def test_lost_worker_is_told_to_shards_and_closes_rounds(pserver):
    # 3 s of silence is lost: a beats every 0.25 s, which stays well inside that even on a loaded machine
    server = pserver("--workers", "2", "--worker-timeout-s", "3", "--round-timeout-s", "60")
    a, b = Client(server.address), Client(server.address)
    a.join("a"), b.join("b")
    a.init(initial(), LAYOUT)
    b.heartbeat()
    t0 = time.monotonic()

    def b_lost_everywhere() -> bool:  # a keeps beating (every poll); b falls silent
        a.heartbeat()
        stats = a.stats()
        return stats["coordinator"]["workers"]["1"]["lost"] and all(s["lost"] == [1] for s in stats["shards"])

    wait_for(b_lost_everywhere, 30, "the coordinator to declare b lost and tell the shards", interval_s=0.25)
    nxt, centre, _ = a.round(initial() + 2, 0, "average", timeout_s=10)  # closes without b, long before 60 s
    assert time.monotonic() - t0 < 30 and nxt == 1
    np.testing.assert_array_equal(centre, initial() + 2)
    stats = a.stats()
    assert stats["coordinator"]["workers"]["1"]["lost"] is True and stats["shards"][0]["lost"] == [1]
    assert stats["coordinator"]["workers"]["0"]["lost"] is False  # a's beats kept it in
    text = subprocess.run([sys.executable, "-m", "pserver.cli", "stats", server.address],
                          capture_output=True, text=True, timeout=60).stdout
    assert "worker 1 b lost" in text and "lost [1]" in text
    b.join("b again", rank=1)  # a restarted worker takes its rank back
    assert b.rank == 1
    a.close(), b.close()


def test_a_restarted_worker_is_a_new_incarnation_whose_pushes_are_applied(pserver):
    """A process that takes a lost rank back starts its pushes' numbering afresh; the shards must not take
    them for retries of the dead process's pushes (which they answer without applying), on any shard."""
    server = pserver("--workers", "2", "--shards", "2", "--worker-timeout-s", "2")
    ones = np.ones(LAYOUT.total, np.float32)
    a, other = Client(server.address), Client(server.address)
    a.join("a"), other.join("other")
    a.init(initial(), LAYOUT)
    for _ in range(5):
        a.push(ones)
    a.close()  # a's process dies: it falls silent

    def a_lost() -> bool:
        other.heartbeat()
        return other.stats()["coordinator"]["workers"]["0"]["lost"]

    wait_for(a_lost, 30, "the coordinator to declare a lost", interval_s=0.25)
    again = Client(server.address)
    again.join("a, restarted", rank=0)
    assert again.rank == 0
    again.init(initial(), LAYOUT)
    before = again.pull()
    _, centre = again.push(ones, pull=True)
    np.testing.assert_array_equal(centre, before + 1)  # applied, not answered as a retry
    again.push(ones, pull=False)
    shards = again.stats()["shards"]
    assert [s["updates"]["0"] for s in shards] == [7, 7] and all(not s["duplicates"] for s in shards), shards
    again.close(), other.close()


def test_norm_factor_refuses_an_explosion_after_warmup(pserver):
    server = pserver("--max-delta-norm-factor", "10")
    c = Client(server.address)
    c.join("a")
    c.init(initial(), LAYOUT)
    small = np.full(LAYOUT.total, 0.5, np.float32)
    c.push(small * 100)  # during the warm-up nothing is refused
    for _ in range(20):
        c.push(small)
    before = c.pull()
    with pytest.raises(RemoteError, match=r"too_large.*10 × the running median"):
        c.push(small * 50)
    c.push(small * 5)  # under 10 × median: fine
    np.testing.assert_array_equal(c.pull(), before + small * 5)
    assert c.stats()["shards"][0]["refused"] == {"too_large": 1}


def test_ssp_bounds_the_clock_gap(pserver):
    k = 2
    server = pserver("--workers", "2", "--max-staleness", str(k), "--round-timeout-s", "60")
    fast, slow = Client(server.address, ClientConfig(timeout_s=2.0, retries=2)), Client(server.address)
    fast.join("fast")
    fast.init(initial(), LAYOUT)
    slow.join("slow")  # after INIT: its JOIN reply carries the shard ranges
    one = np.ones(LAYOUT.total, np.float32)
    for _ in range(k + 1):
        fast.push(one)  # gaps 0, 1, 2: allowed
    slow_pushed: list[int] = []  # slow's pushes answered so far
    errors: list[BaseException] = []

    def slow_pushes():
        try:
            # slow does not move until fast's 4th push (gap 3 > 2) is parked at every shard
            wait_for(lambda: all(s["ssp"]["parked"] == [fast.worker] for s in slow.stats()["shards"]), 20,
                     "fast's push to be parked")
            for _ in range(6):
                slow.pull()
                slow.push(one)
                slow_pushed.append(1)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=slow_pushes)
    t.start()
    fast.push(one)  # gap 3 > 2: answered only once slow's first push is in
    assert all(s["updates"].get(str(slow.worker), 0) >= 1 for s in fast.stats()["shards"]), \
        "fast's push past the bound was answered before the slow worker pushed"
    for _ in range(5):
        fast.push(one)
    t.join(30)
    assert not t.is_alive() and not errors and len(slow_pushed) == 6, errors
    s = fast.stats()["shards"][0]
    gaps = {int(g): n for g, n in s["ssp"]["gaps"].items()}
    assert max(gaps) <= k and sum(gaps.values()) == 9 + 6 and s["ssp"]["waits"] >= 1
    assert s["updates"] == {"0": 9, "1": 6}
    np.testing.assert_array_equal(fast.pull(), initial() + 15)
    fast.close(), slow.close()


def test_ssp_wait_survives_a_shard_killed_and_restarted_from_its_checkpoint(pserver, tmp_path):
    """SSP and a shard restart together, with real shard processes: fast's push is parked at both shards (one
    update ahead of the bound) when shard 0's process is SIGKILLed. `pserver start` restarts it from its
    checkpoint; fast's client times out and re-sends the same push, which the restored shard parks again from
    the clocks in the checkpoint. The slow worker then catches up, fast is released, and both finish: every
    push applied exactly once at both shards, no gap past the bound."""
    k, every_s = 2, 0.5
    ckpt = tmp_path / "ckpt"
    server = pserver("--workers", "2", "--shards", "2", "--max-staleness", str(k), "--round-timeout-s", "60",
                     "--checkpoint-dir", str(ckpt), "--checkpoint-every-s", str(every_s))
    # fast re-sends a parked push every second: across the restart, and while parked after it
    fast = Client(server.address, ClientConfig(timeout_s=1.0, retries=60, backoff_s=0.05, max_backoff_s=0.2))
    slow = Client(server.address, ClientConfig(timeout_s=2.0, retries=10, backoff_s=0.05, max_backoff_s=0.5))
    fast.join("fast")
    fast.init(initial(), LAYOUT)
    slow.join("slow")
    one = np.ones(LAYOUT.total, np.float32)
    for _ in range(k + 1):
        fast.push(one)  # gaps 0, 1, 2: allowed

    def checkpointed() -> list[int]:  # written atomically (pserver.fileio): present means complete
        paths = [checkpoint.shard_file(ckpt, i) for i in range(2)]
        return [checkpoint.load_shard(p)[0].version if p.exists() else -1 for p in paths]

    wait_for(lambda: checkpointed() == [k + 1] * 2, 20 * every_s + 10, "checkpoints holding fast's 3 pushes")
    errors: list[BaseException] = []

    def fast_pushes():
        try:
            for _ in range(6):
                fast.push(one)  # the first: gap 3 > 2, parked until slow pushes
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=fast_pushes)
    t.start()
    try:
        wait_for(lambda: all(s["ssp"]["parked"] == [fast.worker] for s in slow.stats()["shards"]), 20,
                 "fast's push to be parked at both shards")
        victim = shard_procs(server)[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(5)

        def parked_again() -> bool:  # by the restarted process, from its restored clocks
            procs = shard_procs(server)
            if len(procs) != 2 or victim.pid in [p.pid for p in procs]:
                return False
            shards = slow.stats()["shards"]
            return not shards[0].get("error") and shards[0]["ssp"]["parked"] == [fast.worker]

        wait_for(parked_again, 30, "the restarted shard 0 to park fast's re-sent push")
        assert "restarting it from its checkpoint" in server.log()
        assert t.is_alive() and not errors, errors  # fast is still waiting, not failed
        for _ in range(6):
            slow.pull()
            slow.push(one)
    finally:
        t.join(60)
    assert not t.is_alive() and not errors, errors
    stats = fast.stats()["shards"]
    for s in stats:
        gaps = {int(g): n for g, n in s["ssp"]["gaps"].items()}
        assert s["updates"] == {"0": 9, "1": 6} and s["version"] == 15 and s["ssp"]["parked"] == [], s
        assert max(gaps) <= k, gaps
    assert stats[1]["ssp"]["waits"] >= 1
    np.testing.assert_array_equal(fast.pull(), initial() + 15)  # nothing lost, nothing applied twice
    print(f"\nSSP across a shard restart: shard 0 waits {stats[0]['ssp']['waits']}, "
          f"duplicates {stats[0]['duplicates']}; shard 1 waits {stats[1]['ssp']['waits']}")
    fast.close(), slow.close()


# ---- the whole server lost --------------------------------------------------------

@pytest.fixture
def fading_data(tmp_path):
    return write_fading(tmp_path / "fading")


@pytest.mark.slow
def test_whole_server_killed_mid_run_and_restored_finishes_the_run(fading_data, tmp_path):
    """SIGKILL to `pserver start`'s process group (coordinator and shards: the PS host lost) mid-run, then
    `pserver start --restore` on the same port: the workers and the evaluator wait, go on with their ranks,
    and the run finishes. Prints the recovery time (kill to the first update after the restore) and the
    updates lost (shard versions read just before the kill against those of the last checkpoint)."""
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    options = ["--workers", "2", "--shards", "2", "--rule", "downpour", "--epochs", "40", "--hidden", "8",
               "--batch-size", "32", "--exit-when-done", "--checkpoint-dir", str(ckpt), "--checkpoint-every-s", "1"]
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def log_of(name: str) -> str:
        return (logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def start(name: str, cmd: list[str], **kw) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, stderr=log, env=env, **kw)
        procs.append(proc)
        return proc

    def start_server(*extra: str, n: int) -> tuple[subprocess.Popen, str]:
        ready = tmp_path / f"ready{n}.json"
        proc = start(f"pserver{n}", [sys.executable, "-m", "runner.pserver_cli", "start", "--ready-file", str(ready),
                                     *options, *extra], stdout=subprocess.DEVNULL,
                     start_new_session=True)  # its own process group: killed whole below
        try:
            wait_for_file(ready, 60, alive=lambda: proc.poll() is None)
        except (ProcessExited, WaitTimeout) as exc:
            raise AssertionError(f"{exc}:\n{log_of(f'pserver{n}')}") from None
        return proc, json.loads(ready.read_text())["address"]

    def coordinator_state() -> dict:
        return checkpoint.load_coordinator(ckpt) if (ckpt / checkpoint.COORDINATOR_FILE).exists() else {}

    def checkpointed() -> list[int]:  # written atomically: present means complete
        paths = [checkpoint.shard_file(ckpt, k) for k in range(2)]
        return [checkpoint.load_shard(p)[0].version if p.exists() else -1 for p in paths]

    try:
        server, address = start_server("--port", "0", n=0)
        port = address.rsplit(":", 1)[1]
        cli = [sys.executable, "-m", "runner.worker_cli"]
        workers = [start(name, [*cli, "start", "--ps", address, "--data", str(fading_data), "--threads", "1",
                                "--name", name], stdout=subprocess.PIPE, text=True) for name in ("hostA", "hostB")]
        evaluator = start("evaluator", [*cli, "evaluate", "--ps", address, "--data", str(fading_data), "--out",
                                        str(run), "--eval-interval-s", "1"], stdout=subprocess.DEVNULL)

        # mid-run: both workers joined, and a checkpoint after some updates on every shard
        wait_for(lambda: len(coordinator_state().get("workers", [])) == 2 and min(checkpointed()) >= 6, 180,
                 "both workers to join and every shard to checkpoint 6 updates")
        c = Client(address, ClientConfig(timeout_s=2.0, retries=1))
        before = c.stats()
        c.close()
        names = {int(r): w["name"] for r, w in before["coordinator"]["workers"].items()}
        assert sorted(names.values()) == ["hostA", "hostB"] and not any(w["done"] for w in before["coordinator"]
                                                                        ["workers"].values()), "killed too late"
        at_kill = [s["version"] for s in before["shards"]]
        t_kill = time.monotonic()
        os.killpg(server.pid, signal.SIGKILL)  # the coordinator and every shard at once
        assert server.wait(10) == -signal.SIGKILL
        on_disk = checkpointed()
        lost = [max(k - d, 0) for k, d in zip(at_kill, on_disk)]

        server, again = start_server("--port", port, "--restore", str(ckpt), n=1)
        assert again == address
        c = Client(address, ClientConfig(timeout_s=2.0, retries=5))
        wait_for(lambda: any(s.get("version", -1) > d for s, d in zip(c.stats()["shards"], on_disk)), 120,
                 "an update after the restore")
        recovery_s = time.monotonic() - t_kill
        c.close()

        reports = []
        for w, name in zip(workers, ("hostA", "hostB")):
            stdout, _ = w.communicate(timeout=300)
            assert w.returncode == 0, log_of(name)
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
        assert evaluator.wait(300) == 0, log_of("evaluator")
        assert server.wait(120) == 0, log_of("pserver1")  # --exit-when-done: both DONE, the evaluator left
    finally:
        stop_trees(procs, grace_s=5.0)

    summary = json.loads((run / "summary.json").read_text())
    assert {int(r): n for r, n in summary["worker_names"].items()} == names  # the same ranks, no third JOIN
    assert sorted(r["rank"] for r in reports) == [0, 1] and summary["lost_workers"] == []
    state = checkpoint.load_coordinator(ckpt)
    assert [(w["rank"], w["name"], w["done"]) for w in state["workers"]] == [(r, names[r], True) for r in (0, 1)]
    final = [checkpoint.load_shard(checkpoint.shard_file(ckpt, k))[0] for k in range(2)]  # refuses NaN or Inf
    assert all(np.isfinite(s.centre).all() and s.version > d for s, d in zip(final, on_disk))
    pushes = sum(r["exchanges"] for r in reports)  # each a push to every shard, answered once
    never_applied = [pushes - s.version for s in final]  # the updates lost; a push applied twice would lower it
    assert all(0 <= n <= pushes // 4 for n in never_applied), (pushes, never_applied)
    assert np.isfinite(summary["val_auc"]) and np.isfinite(summary["test_auc"])
    assert "restored the coordinator" in log_of("pserver1")
    print(f"\nwhole server killed and restored: first update {recovery_s:.1f} s after the kill; "
          f"updates lost per shard {lost} (versions {at_kill} at the kill, {on_disk} in the last checkpoint, "
          f"every 1 s); final versions {[s.version for s in final]} of {pushes} pushes: {never_applied} lost")
    assert recovery_s < 120


# ---- the coordinator never waits on a shard ------------------------------------------------------------

class StatsFlood:
    """``n`` clients asking the coordinator STATS back to back (each one request in flight) until stopped."""

    def __init__(self, address: str, n: int) -> None:
        self.replies = [0] * n
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        # a gather waits up to 5 s for a dead shard: a client must wait longer than that for its reply
        self._threads = [threading.Thread(target=self._ask, args=(address, i), daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def _ask(self, address: str, i: int) -> None:
        c = Client(address, ClientConfig(timeout_s=15.0, retries=1, backoff_s=0.05))
        try:
            while not self._stop.is_set():
                c.stats()
                self.replies[i] += 1
        except BaseException as exc:  # the test reads it
            self.errors.append(exc)
        finally:
            c.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        assert not any(t.is_alive() for t in self._threads), "a STATS client did not stop"


def gone(p: psutil.Process) -> bool:
    """Dead: reaped, or a zombie its parent has yet to reap."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_shard_restart_is_as_quick_under_a_stats_flood_and_heartbeats_are_answered(pserver, tmp_path):
    """SIGKILL of shard 0, restarted by `pserver start` from its checkpoint, timed quiet and then with 16 STATS
    clients hammering the coordinator; a worker heartbeats all along. The coordinator asks the shards for a
    STATS without waiting on them, so the flood neither slows the restart much nor starves the heartbeats."""
    ckpt = tmp_path / "ckpt"
    server = pserver("--shards", "2", "--workers", "2", "--checkpoint-dir", str(ckpt), "--checkpoint-every-s", "0.5")
    c = Client(server.address, ClientConfig(timeout_s=1.0, retries=90, backoff_s=0.05, max_backoff_s=0.5), worker=0)
    c.join("w0")
    c.init(initial(), LAYOUT)
    one = np.ones(LAYOUT.total, np.float32)
    c.push(one)
    wait_for(lambda: (ckpt / "shard-0.npz").exists(), 20, "a checkpoint of shard 0")

    def restart_s() -> float:
        victim = shard_procs(server)[0]
        t0 = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        wait_for(lambda: gone(victim), 5, "shard 0 to die")
        c.push(one)  # retried until the restarted shard answers
        wait_for(lambda: shard_procs(server) and shard_procs(server)[0].pid != victim.pid, 10, "the new shard 0")
        return time.monotonic() - t0

    quiet_s = restart_s()
    beats: list[float] = []  # each heartbeat's round trip during the flood
    beat_errors: list[BaseException] = []
    beating = threading.Event()

    def heartbeat() -> None:
        hb = Client(server.address, ClientConfig(timeout_s=3.0, retries=0))
        try:
            hb.join("w1")
            while not beating.is_set():
                t = time.monotonic()
                hb.heartbeat()
                beats.append(time.monotonic() - t)
                beating.wait(0.2)  # a worker's heartbeat interval, not a synchronisation
        except BaseException as exc:
            beat_errors.append(exc)
        finally:
            hb.close()

    hb_thread = threading.Thread(target=heartbeat, daemon=True)
    hb_thread.start()
    flood = StatsFlood(server.address, 16)
    try:
        wait_for(lambda: sum(flood.replies) >= 32 or flood.errors, 60, "the STATS flood to be answered")
        before = sum(flood.replies)
        flood_s = restart_s()
        wait_for(lambda: sum(flood.replies) - before >= 16 or flood.errors, 30, "the flood to go on being answered")
        during = sum(flood.replies) - before
    finally:
        flood.stop()
        beating.set()
        hb_thread.join(30)
    print(f"\nshard restart: {quiet_s:.1f} s quiet, {flood_s:.1f} s under 16 STATS clients ({during} STATS answered "
          f"from the kill on); {len(beats)} heartbeats, slowest {max(beats, default=0):.2f} s")
    assert not flood.errors, flood.errors[0]
    assert not beat_errors, f"a heartbeat went unanswered during the flood: {beat_errors[0]}"
    assert len(beats) >= 5, "the worker did not heartbeat during the flood"
    assert flood_s < 2 * quiet_s + 10, (quiet_s, flood_s)
    stats = c.stats()  # the content of a STATS is as before: every shard's own entry
    assert [s["version"] for s in stats["shards"]] == [s["version"] for s in stats["shards"] if "error" not in s]
    assert stats["coordinator"]["world"] == 2 and len(stats["shards"]) == 2
    c.close()


def test_stats_with_a_stopped_shard_answers_in_its_timeout_and_holds_nothing_up(pserver):
    """Shard 1 SIGSTOPped: a STATS is answered once the shard timeout has passed, with shard 1 as an error
    entry and shard 0 as it is; meanwhile PING and HEARTBEAT are answered at once."""
    server = pserver("--shards", "2", "--workers", "2")
    c = Client(server.address, ClientConfig(timeout_s=20.0, retries=0), worker=0)
    c.join("w0")
    c.init(initial(), LAYOUT)
    c.push(np.ones(LAYOUT.total, np.float32))
    victim = shard_procs(server)[1]
    victim.send_signal(signal.SIGSTOP)
    try:
        flood = StatsFlood(server.address, 4)
        try:
            fast = Client(server.address, ClientConfig(timeout_s=2.0, retries=0))
            fast.join("w1")
            for _ in range(10):  # each within 2 s while every STATS waits out the stopped shard (5 s)
                fast.heartbeat()
                fast.ask({"op": "PING"})
            fast.close()
        finally:
            flood.stop()
        assert not flood.errors, flood.errors[0]
        stats = c.stats()
    finally:
        victim.send_signal(signal.SIGCONT)
    s0, s1 = stats["shards"]
    assert s0["shard"] == 0 and s0["version"] == 1 and "error" not in s0
    assert s1["shard"] == 1 and "no reply to STATS" in s1["error"]
    assert c.stats()["shards"][1]["version"] == 1  # back: the next gather asks it on a fresh socket
    c.close()


# ---- idle connections --------------------------------------------------------------------------------

def zmtp_connect(endpoint: str) -> socket.socket:
    """A raw TCP connection that completes the ZMTP 3.0 NULL handshake as a DEALER, then sends nothing."""
    host, port = endpoint.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST: no TIME_WAIT
    greeting = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    s.sendall(greeting + bytes([0x04, len(body)]) + body)
    got = b""
    while len(got) < 64 + 2 or len(got) < 66 + got[65]:  # the shard's greeting, then its READY command
        chunk = s.recv(4096)
        assert chunk, f"{endpoint} closed the connection during the handshake"
        got += chunk
    assert got[66:72] == b"\x05READY", got[:80]
    return s


def test_idle_connections_cost_memory_only_while_open(pserver):
    """Rounds of 3,000 connections that complete the ZeroMQ handshake and idle: each round costs the shard tens
    of MiB while open (ZeroMQ's per-connection buffers); once they close, its RSS is back near its start,
    round after round, instead of growing with every round."""
    n, rounds = 3000, 4
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 500:
        if hard != resource.RLIM_INFINITY and hard < n + 500:
            pytest.skip(f"needs {n + 500} file descriptors, the hard limit (ulimit -Hn) is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 500, hard))
    server = pserver("--shards", "1")
    c = Client(server.address)
    endpoint = c.ask({"op": "PING"})["shards"][0]["endpoint"]
    c.close()
    request(endpoint, {"op": "PING"})  # answered once the shard serves: its kernels are loaded, its RSS settled
    shard = shard_procs(server)[0]
    mib = lambda: shard.memory_info().rss / 2**20  # noqa: E731
    start = mib()
    seen = []
    try:
        for r in range(rounds):
            conns = [zmtp_connect(endpoint) for _ in range(n)]
            opened = mib()
            for s in conns:
                s.close()
            closed = wait_for(lambda: (m := mib()) < start + 25 and m, 30,
                              f"round {r}: the shard's RSS back within 25 MiB of its start {start:.0f} MiB "
                              f"(now {mib():.0f} MiB)")
            seen.append((opened, closed))
    finally:
        print(f"\n{n} idle connections a round: shard RSS {start:.0f} MiB at start, then (open, closed) "
              + ", ".join(f"({o:.0f}, {c:.0f})" for o, c in seen) + " MiB")
    assert seen[0][0] - start > 25, "the connections cost the shard nothing while open: the probe is not telling"
    assert server.proc.poll() is None


# ---- overflow, bad checkpoints, a full checkpoint disk ------------------------------------------------

def test_finite_pushes_that_would_overflow_the_centre_are_refused_and_checkpoints_stay_good(pserver, tmp_path):
    """Two finite pushes with one element at 3e38: the second would make that element Inf. It is refused and
    counted, the centre and every checkpoint stay finite, and a SIGKILLed shard comes back from its checkpoint."""
    ckpt = tmp_path / "ckpt"
    server = pserver("--shards", "2", "--checkpoint-dir", str(ckpt), "--checkpoint-every-s", "0.2")
    c = Client(server.address, ClientConfig(timeout_s=1.0, retries=30, backoff_s=0.05, max_backoff_s=0.5), worker=0)
    c.join("w0")
    c.init(initial(), LAYOUT)
    big = np.zeros(LAYOUT.total, np.float32)
    big[[5, LAYOUT.total - 5]] = 3e38  # one element in each shard
    c.push(big)
    with pytest.raises(RemoteError, match="not_finite.*overflow"):
        c.push(big)
    centre = c.pull()
    assert np.isfinite(centre).all()
    np.testing.assert_array_equal(centre, initial() + big)
    shards = c.stats()["shards"]
    assert sum(sum(s["overflows"].values()) for s in shards) >= 1
    assert [s["version"] for s in shards] == [1, 1]

    def checkpointed() -> list[int]:
        return [checkpoint.load_shard(checkpoint.shard_file(ckpt, k))[0].version  # refuses NaN or Inf
                if checkpoint.shard_file(ckpt, k).exists() else -1 for k in range(2)]

    wait_for(lambda: checkpointed() == [1, 1], 20, "both shards to checkpoint version 1")
    victim = shard_procs(server)[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait(5)
    c.push(-big)  # waits for the restart, then applied: the shard came back from a finite checkpoint
    np.testing.assert_array_equal(c.pull(), (initial() + big) - big)  # 3e38 absorbed those elements' values
    assert server.proc.poll() is None and "holds NaN or Inf" not in server.log()
    c.close()


def test_restore_refuses_a_checkpoint_header_field_of_the_wrong_type_naming_it(pserver, tmp_path):
    ckpt = tmp_path / "ckpt"
    server = pserver("--shards", "2", "--checkpoint-dir", str(ckpt))
    c = Client(server.address, worker=0)
    c.join("w0")
    c.init(initial(), LAYOUT)
    c.push(np.ones(LAYOUT.total, np.float32))
    c.close()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    for path in (ckpt / "shard-1.npz", ckpt / "shard-1.prev.npz"):
        if path.exists():  # valid CRCs (np.savez writes the zip's; the slice is unchanged), one field a string
            with np.load(path) as z:
                header, centre = json.loads(bytes(z["meta"]).decode()), np.array(z["centre"])
            header["version"] = "abc"
            np.savez(path, centre=centre, meta=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    out = subprocess.run([sys.executable, "-m", "pserver.cli", "start", "--port", "0", "--shards", "2", "--restore",
                          str(ckpt)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "shard-1.npz has an unexpected header field: version is 'abc' (str)" in out.stderr, out.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs to checkpoint to, unmounted after the test; skipped where mounting is not permitted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until its file system is full (ENOSPC); returns it."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
    return filler


def test_a_full_checkpoint_disk_is_a_warning_and_checkpoints_resume_when_space_returns(pserver, small_disk):
    every_s = 0.3
    server = pserver("--shards", "2", "--workers", "2", "--checkpoint-dir", str(small_disk), "--checkpoint-every-s",
                     str(every_s))
    c = Client(server.address, ClientConfig(timeout_s=2.0, retries=5), worker=0)
    c.join("w0")
    c.init(initial(), LAYOUT)
    one = np.ones(LAYOUT.total, np.float32)
    for _ in range(3):
        c.push(one)

    def on_disk() -> list[int]:
        return [checkpoint.load_shard(p)[0].version if p.exists() else -1
                for p in (checkpoint.shard_file(small_disk, k) for k in range(2))]

    wait_for(lambda: on_disk() == [3, 3], 20, "both shards to checkpoint version 3")
    filler = fill(small_disk)
    full_at = time.time()
    for _ in range(10):
        c.push(one)  # the run goes on
    other = Client(server.address, ClientConfig(timeout_s=2.0, retries=5))
    other.join("w1")  # a decision: the coordinator writes its state at once, and cannot

    def failures() -> list[int]:
        st = c.stats()
        return [st["coordinator"]["checkpoint"]["failures"], *(s["checkpoint"]["failures"] for s in st["shards"])]

    wait_for(lambda: min(failures()) >= 1, 20, "the coordinator and both shards to report a failed checkpoint")
    assert server.proc.poll() is None
    assert on_disk() == [3, 3]  # the last good checkpoints, intact
    stats = c.stats()
    assert "No space left" in stats["shards"][0]["checkpoint"]["error"], stats["shards"][0]["checkpoint"]
    assert "No space left" in stats["coordinator"]["checkpoint"]["error"]
    assert "checkpoint at version 13 not written" in server.log() and "coordinator: checkpoint not written" \
        in server.log()
    filler.unlink()
    wait_for(lambda: on_disk() == [13, 13], 20, "both shards to checkpoint again once there is space")
    wait_for(lambda: c.stats()["coordinator"]["checkpoint"]["ok_at"] > full_at, 20,
             "the coordinator to checkpoint again once there is space")
    assert [w["name"] for w in checkpoint.load_coordinator(small_disk)["workers"]] == ["w0", "w1"]
    assert "checkpoints written again" in server.log()
    np.testing.assert_array_equal(c.pull(), initial() + 13)
    c.close(), other.close()


@pytest.mark.slow
def test_notpu_train_finishes_when_its_checkpoint_disk_fills_and_names_it_in_the_summary(fading_data, tmp_path,
                                                                                          small_disk):
    """RUN/checkpoints on a 256 KiB tmpfs, filled mid-run and freed again: the run finishes, model.keras and
    summary.json are written, summary.json names the failed checkpoints, and the last checkpoint is newer
    than the moment space returned."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    ckpt.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(small_disk), str(ckpt)], check=True)
    try:
        env = {**os.environ, "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
        cmd = [sys.executable, "-m", "runner.cli", "train", str(fading_data), "--out", str(run), "--workers", "2",
               "--shards", "2", "--epochs", "20", "--hidden", "8", "--checkpoint-every-s", "0.5", "--no-progress",
               "--overwrite"]  # RUN holds the mount point, no previous run: a directory of other files
        with open(tmp_path / "train.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(lambda: proc.poll() is None and checkpoint.shard_file(ckpt, 1).exists(), 120,
                     "the run's first shard checkpoints")
            filler = fill(ckpt)
            server_log = run / "logs" / "pserver.log"
            wait_for(lambda: proc.poll() is None and "not written" in server_log.read_text(errors="replace"), 60,
                     "a checkpoint failure in the server's log, mid-run")
            filler.unlink()
            freed_at = time.time()
            assert proc.wait(600) == 0, (tmp_path / "train.log").read_text()[-3000:]
        finally:
            stop_trees([proc], grace_s=5.0)
        summary = json.loads((run / "summary.json").read_text())
        assert (run / "model.keras").is_file() and np.isfinite(summary["test_auc"])
        failed = summary["checkpoint_failures"]
        assert failed and all(f["failures"] >= 1 and "No space left" in f["error"] for f in failed.values()), failed
        assert any("checkpoint(s) not written" in w for w in summary["warnings"]), summary["warnings"]
        written = [checkpoint.load_shard(checkpoint.shard_file(ckpt, k))[1] for k in range(2)]
        assert min(written) > freed_at, (written, freed_at)
    finally:
        subprocess.run(["umount", "-l", str(ckpt)], check=False)


def test_a_read_only_checkpoint_disk_is_a_warning_and_checkpoints_resume_when_writable(pserver, small_disk):
    server = pserver("--shards", "2", "--workers", "2", "--checkpoint-dir", str(small_disk), "--checkpoint-every-s",
                     "0.3")
    c = Client(server.address, ClientConfig(timeout_s=2.0, retries=5), worker=0)
    c.join("w0")
    c.init(initial(), LAYOUT)
    one = np.ones(LAYOUT.total, np.float32)
    c.push(one)

    def on_disk() -> list[int]:
        return [checkpoint.load_shard(p)[0].version if p.exists() else -1
                for p in (checkpoint.shard_file(small_disk, k) for k in range(2))]

    wait_for(lambda: on_disk() == [1, 1], 20, "both shards to checkpoint version 1")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)  # EROFS, which root cannot bypass
    try:
        for _ in range(4):
            c.push(one)
        wait_for(lambda: min(s["checkpoint"]["failures"] for s in c.stats()["shards"]) >= 1, 20,
                 "both shards to report a failed checkpoint")
        assert all("Read-only file system" in s["checkpoint"]["error"] for s in c.stats()["shards"])
        assert server.proc.poll() is None and on_disk() == [1, 1]
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    wait_for(lambda: on_disk() == [5, 5], 20, "both shards to checkpoint again once the disk is writable")
    c.close()

"""Multi-host behaviour on one machine: the PS and two clients (or two workers) in their own network namespaces.

    ns ps  (10.200.N.1) ──veth── ┐
    ns c1  (10.200.N.2) ──veth── ┼─ br0 in ns br
    ns c2  (10.200.N.3) ──veth── ┘   (netem: 20 ms delay, 1 % loss, both directions of c2's link;
                                      a kernel without sch_netem gets a 2 Mbit/s token bucket with
                                      a 6 kB queue instead: queueing delay and tail drops)

The server binds 10.200.N.1 with CurveZMQ keys; the clients push seeded integer
deltas many times over the lossy link, and the centre must equal initial +
Σ pushes exactly; then a real training run: `worker start` in each client
namespace, the evaluator beside the PS. Needs root (CAP_NET_ADMIN); skipped with the reason otherwise.
Only namespaces, links and addresses the test creates are touched, and all of
them are deleted in teardown.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import wait_for
from pserver.procs import stop_tree
from pserver.security import create_keys

sys.path.insert(0, str(Path(__file__).parent))
from datasets import write_fading  # noqa: E402
from netns_client import initial  # noqa: E402
from pusher import deltas  # noqa: E402

pytestmark = pytest.mark.integration
HERE = Path(__file__).parent
PUSHES = 60


def sh(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")


@pytest.fixture
def namespaces():
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("iproute2 (ip, tc) not installed")
    tag = f"np{os.getpid() % 100000}"
    subnet = 100 + os.getpid() % 100  # 10.200.<subnet>.0/24, private and only inside our namespaces
    names = {k: f"{tag}{k}" for k in ("br", "ps", "c1", "c2")}
    created = []
    try:
        probe = subprocess.run(["ip", "netns", "add", names["br"]], capture_output=True, text=True, timeout=30)
        if probe.returncode:
            pytest.skip(f"cannot create network namespaces here ({probe.stderr.strip()}); needs root / CAP_NET_ADMIN")
        created.append(names["br"])
        sh("ip", "-n", names["br"], "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", names["br"], "link", "set", "br0", "up")
        addresses = {}
        for host, k in (("ps", 1), ("c1", 2), ("c2", 3)):
            ns = names[host]
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", names["br"], "link", "add", f"b{host}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", names["br"], "link", "set", f"b{host}", "master", "br0", "up")
            addresses[host] = f"10.200.{subnet}.{k}"
            sh("ip", "-n", ns, "addr", "add", f"{addresses[host]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        impairment = "netem delay 20ms loss 1%"
        for ns, dev in ((names["c2"], "eth0"), (names["br"], "bc2")):  # both directions of c2's link
            try:
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *impairment.split())
            except RuntimeError as exc:
                if "unknown" not in str(exc):
                    raise
                # A kernel without sch_netem: a small token bucket delays (queueing) and drops (tail drop) instead.
                impairment = "tbf rate 2mbit burst 3kb limit 6kb"
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *impairment.split())
        yield names, addresses, impairment
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def in_ns(ns: str, *cmd: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *cmd], **kw)


def test_clients_in_other_namespaces_over_a_lossy_link(namespaces, tmp_path):
    names, addr, impairment = namespaces
    keys = str(create_keys(tmp_path / "keys", workers=3))
    ready = tmp_path / "ready.json"
    log = open(tmp_path / "pserver.log", "wb")
    server = in_ns(names["ps"], "-m", "pserver.cli", "start", "--host", addr["ps"], "--port", "0", "--keys", keys,
                   "--shards", "2", "--workers", "2", "--ready-file", str(ready), stdout=log, stderr=subprocess.STDOUT)
    procs = [server]
    try:
        wait_for(lambda: ready.is_file() or server.poll() is not None, 60, "pserver in its namespace")
        assert server.poll() is None, (tmp_path / "pserver.log").read_text()
        address = json.loads(ready.read_text())["address"]
        assert address.startswith(addr["ps"])
        client = str(HERE / "netns_client.py")
        assert in_ns(names["c1"], client, "init", address, keys, "7").wait(60) == 0
        t0 = time.monotonic()
        pushers = [in_ns(names["c1"], client, "push", address, keys, "worker0", str(PUSHES), "11"),
                   in_ns(names["c2"], client, "push", address, keys, "worker1", str(PUSHES), "12")]
        procs += pushers
        assert [p.wait(120) for p in pushers] == [0, 0]
        elapsed = time.monotonic() - t0
        out = tmp_path / "centre.npy"
        assert in_ns(names["c2"], client, "pull", address, keys, str(out)).wait(60) == 0
        expected = initial(7)
        for seed in (11, 12):
            for d in deltas(expected.size, PUSHES, seed):
                expected += d
        np.testing.assert_array_equal(np.load(out, allow_pickle=False), expected)
        shards = json.loads(Path(str(out) + ".json").read_text())
        assert [s["version"] for s in shards] == [2 * PUSHES] * 2
        dups = sum(sum(s["duplicates"].values()) for s in shards)
        dropped = 0
        for ns, dev in ((names["c2"], "eth0"), (names["br"], "bc2")):
            qdisc = subprocess.run(["ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev],
                                   capture_output=True, text=True, timeout=30).stdout
            dropped += sum(int(n) for n in re.findall(r"dropped (\d+)", qdisc))
        print(f"\nnetns: 2 clients × {PUSHES} pushes, c2's link `{impairment}`, in {elapsed:.1f} s, "
              f"{dups} retried push(es) answered without re-applying, "
              f"{dropped} packet(s) dropped on c2's link")
    finally:
        for p in procs:
            stop_tree(p)
        log.close()


def test_workers_in_other_namespaces_train_over_a_lossy_link(namespaces, tmp_path):
    names, addr, impairment = namespaces
    data = write_fading(tmp_path / "data")  # 800 customers, as test_train.py's runs that learn
    keys = str(create_keys(tmp_path / "keys", workers=2))
    ready, run = tmp_path / "ready.json", tmp_path / "run"
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("pserver", "w1", "w2", "evaluator")}
    quiet = lambda name: {"stdout": logs[name], "stderr": subprocess.STDOUT}  # noqa: E731
    procs = [in_ns(names["ps"], "-m", "pserver.cli", "start", "--host", addr["ps"], "--port", "0", "--keys", keys,
                   "--shards", "2", "--workers", "2", "--rule", "downpour", "--epochs", "6", "--hidden", "16",
                   "--batch-size", "32", "--learning-rate", "0.01", "--worker-timeout-s", "60",
                   "--ready-file", str(ready), "--exit-when-done",
                   **quiet("pserver"))]
    try:
        wait_for(lambda: ready.is_file() or procs[0].poll() is not None, 60, "pserver in its namespace")
        address = json.loads(ready.read_text())["address"]
        for ns, key, name in ((names["c1"], "worker0", "w1"), (names["c2"], "worker1", "w2")):
            procs.append(in_ns(ns, "-m", "runner.worker_cli", "start", "--ps", address, "--data", str(data),
                               "--threads", "1", "--keys", keys, "--key", key, "--name", name, **quiet(name)))
        procs.append(in_ns(names["ps"], "-m", "runner.worker_cli", "evaluate", "--ps", address, "--data", str(data),
                           "--out", str(run), "--interval-s", "2", "--keys", keys, **quiet("evaluator")))
        assert [p.wait(240) for p in procs[1:]] == [0, 0, 0], (tmp_path / "w2.log").read_text()[-2000:]
        assert procs[0].wait(60) == 0  # --exit-when-done: both workers said DONE
    finally:
        for p in procs:
            stop_tree(p)
        for f in logs.values():
            f.close()
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["worker_names"].values()) == ["w1", "w2"] and summary["lost_workers"] == []
    assert summary["samples"] == 2 * 6 * 8 * 32  # 512 train rows, 256 per worker: 8 steps of 32 per epoch
    assert summary["test_auc"] > 0.8  # as in test_train.py: the centre really moved towards a solution
    print(f"\nnetns training: 2 workers over `{impairment}`, test AUC {summary['test_auc']:.3f}, "
          f"{summary['wall_s']:.0f} s")

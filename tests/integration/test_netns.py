"""Multi-host behaviour on one machine: the PS and two clients (or two workers) in their own network namespaces.

    ns ps  (10.200.N.1) ──veth── ┐
    ns c1  (10.200.N.2) ──veth── ┼─ br0 in ns br
    ns c2  (10.200.N.3) ──veth── ┘   (netem: 20 ms delay, 2 % loss, both directions of c2's link;
                                      a kernel without sch_netem gets a 2 Mbit/s token bucket with
                                      a 6 kB queue instead: queueing delay and tail drops)

The server binds 10.200.N.1 with CurveZMQ keys; the clients push seeded integer
deltas many times, c2 over the lossy link, and the centre must equal initial +
Σ pushes exactly. TCP recovers random drops long before the client's timeout,
so to make c2's client retry for certain, c2's link is also cut (every packet
dropped, both ways) once c2 has pushed a few times, until c2's client logs a
retry. The test asserts that the link's qdiscs dropped packets, both the
impairment's and the cut's, and that c2's client counted its retries
(`Client.retries`). Then a real training run: `worker start` in each client
namespace, the evaluator beside the PS. Needs root (CAP_NET_ADMIN); skipped
with the reason otherwise. Only namespaces, links and addresses the test
creates are touched, and all of them are deleted in teardown.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
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
CUT_AFTER = 10  # c2's pushes answered before its link is cut
NETEM = "netem delay 20ms loss 2%"
TBF = "tbf rate 2mbit burst 3kb limit 6kb"  # a kernel without sch_netem: tail drops from a small queue
CUT = "pfifo limit 0"  # a queue that holds nothing: every packet is dropped, and counted


def sh(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")


class Link:
    """c2's link: the same root qdisc on both of its ends (c2's eth0, bc2 in the bridge namespace),
    a cut that can be put on and taken off, and the packets the qdiscs dropped."""

    def __init__(self, ends: list[tuple[str, str]]) -> None:
        self.ends = ends
        self.impairment = ""
        self.dropped_by_impairment = 0  # by the impairment's qdiscs already replaced
        self.dropped_by_cuts = 0
        self.sent = 0  # packets the replaced qdiscs passed on

    def _set(self, spec: str) -> None:
        for ns, dev in self.ends:
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", *spec.split())

    def _counters(self) -> tuple[int, int]:
        """(sent, dropped) packets of the root qdiscs now on both ends, since they were put there."""
        sent = dropped = 0
        for ns, dev in self.ends:
            out = subprocess.run(["ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev],
                                 capture_output=True, text=True, timeout=30).stdout
            m = re.search(r"qdisc \S+ \S+ root[^\n]*\n\s*Sent \d+ bytes (\d+) pkt \(dropped (\d+)", out)
            assert m, f"no root qdisc statistics for {dev} in {ns}:\n{out}"
            sent, dropped = sent + int(m[1]), dropped + int(m[2])
        return sent, dropped

    def impair(self) -> None:
        try:
            self._set(NETEM)
            self.impairment = NETEM
        except RuntimeError as exc:
            if "unknown" not in str(exc):
                raise
            self._set(TBF)
            self.impairment = TBF

    def cut(self) -> None:
        sent, dropped = self._counters()
        self.sent, self.dropped_by_impairment = self.sent + sent, self.dropped_by_impairment + dropped
        self._set(CUT)

    def restore(self) -> None:
        _, dropped = self._counters()
        self.dropped_by_cuts += dropped
        self._set(self.impairment)

    def totals(self) -> tuple[int, int]:
        """(sent, dropped by the impairment) so far, the qdisc on now included (call it while impaired)."""
        sent, dropped = self._counters()
        return self.sent + sent, self.dropped_by_impairment + dropped


class Lines:
    """A child's stdout, read line by line as it comes (a thread), so waits on it stay bounded."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line.rstrip("\n"))

    def pushed(self) -> int:
        return max([int(m[1]) for m in map(re.compile(r"pushed (\d+) ").match, list(self.lines)) if m], default=0)

    def retries_logged(self) -> int:  # the client's warning: "no reply to OP from ...; retry K of N ..."
        return sum(line.startswith("log ") and "; retry " in line for line in list(self.lines))

    def result(self) -> dict:
        found = [line[len("result "):] for line in self.lines if line.startswith("result ")]
        assert found, "\n".join(self.lines[-20:])
        return json.loads(found[-1])


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
        link = Link([(names["c2"], "eth0"), (names["br"], "bc2")])  # both directions of c2's link
        link.impair()
        yield names, addresses, link
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def in_ns(ns: str, *cmd: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *cmd], **kw)


def test_clients_in_other_namespaces_over_a_lossy_link(namespaces, tmp_path):
    names, addr, link = namespaces
    keys = str(create_keys(tmp_path / "keys", workers=3))
    ready = tmp_path / "ready.json"
    log = open(tmp_path / "pserver.log", "wb")
    server = in_ns(names["ps"], "-m", "runner.pserver_cli", "start", "--host", addr["ps"], "--port", "0", "--keys", keys,
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
        pushers = [in_ns(names["c1"], client, "push", address, keys, "worker0", str(PUSHES), "11",
                         stdout=subprocess.PIPE, text=True),
                   in_ns(names["c2"], client, "push", address, keys, "worker1", str(PUSHES), "12",
                         stdout=subprocess.PIPE, text=True)]
        procs += pushers
        out = [Lines(p) for p in pushers]
        c2, c2_out = pushers[1], out[1]
        wait_for(lambda: c2_out.pushed() >= CUT_AFTER or c2.poll() is not None, 120, f"c2's first {CUT_AFTER} pushes")
        assert c2.poll() is None and c2_out.pushed() < PUSHES, "c2 finished before its link could be cut"
        link.cut()
        cut_at, logged = time.monotonic(), c2_out.retries_logged()
        try:  # until c2's client gives up waiting on the cut link (a retry after the cut, not a random one before)
            wait_for(lambda: c2_out.retries_logged() > logged or c2.poll() is not None, 60,
                     "c2's client to time out and retry")
        finally:
            link.restore()
        cut_s = time.monotonic() - cut_at
        assert [p.wait(120) for p in pushers] == [0, 0], "\n".join(c2_out.lines[-20:])
        elapsed = time.monotonic() - t0
        for o in out:
            o.thread.join(10)
        results = [o.result() for o in out]
        sent, dropped = link.totals()
        out_path = tmp_path / "centre.npy"
        assert in_ns(names["c2"], client, "pull", address, keys, str(out_path)).wait(60) == 0
        expected = initial(7)
        for seed in (11, 12):
            for d in deltas(expected.size, PUSHES, seed):
                expected += d
        np.testing.assert_array_equal(np.load(out_path, allow_pickle=False), expected)
        shards = json.loads(Path(str(out_path) + ".json").read_text())
        assert [s["version"] for s in shards] == [2 * PUSHES] * 2
        dups = sum(sum(s["duplicates"].values()) for s in shards)
        print(f"\nnetns: 2 clients × {PUSHES} pushes in {elapsed:.1f} s; c2's link `{link.impairment}` dropped "
              f"{dropped} of {sent + dropped} packet(s), and {link.dropped_by_cuts} more while cut for {cut_s:.1f} s; "
              f"client retries: c1 {results[0]['retries']}, c2 {results[1]['retries']}; "
              f"{dups} retried push(es) answered without re-applying")
        # The link really was lossy, and c2's client really had to retry: not a clean-link pass.
        assert dropped > 0, f"`{link.impairment}` dropped nothing of {sent} packets"
        assert link.dropped_by_cuts > 0, "the cut link dropped nothing"
        assert results[1]["retries"] >= 1, c2_out.lines[-20:]
    finally:
        for p in procs:
            stop_tree(p)
        log.close()


def test_workers_in_other_namespaces_train_over_a_lossy_link(namespaces, tmp_path):
    names, addr, link = namespaces
    data = write_fading(tmp_path / "data")  # 800 customers, as test_train.py's runs that learn
    keys = str(create_keys(tmp_path / "keys", workers=2))
    ready, run = tmp_path / "ready.json", tmp_path / "run"
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("pserver", "w1", "w2", "evaluator")}
    quiet = lambda name: {"stdout": logs[name], "stderr": subprocess.STDOUT}  # noqa: E731
    procs = [in_ns(names["ps"], "-m", "runner.pserver_cli", "start", "--host", addr["ps"], "--port", "0", "--keys", keys,
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
                           "--out", str(run), "--eval-interval-s", "2", "--keys", keys, **quiet("evaluator")))
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
    sent, dropped = link.totals()
    assert dropped > 0, f"`{link.impairment}` dropped nothing of {sent} packets"
    print(f"\nnetns training: 2 workers, one over `{link.impairment}` ({dropped} of {sent + dropped} packets "
          f"dropped), test AUC {summary['test_auc']:.3f}, {summary['wall_s']:.0f} s")

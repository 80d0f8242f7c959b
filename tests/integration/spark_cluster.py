"""A Spark standalone cluster made by a test: a master and N one-core workers, each its own JVM (and its
executors' JVMs and Python workers), started with the `spark-class` pyspark ships and stopped, process
group by process group, SIGTERM then SIGKILL, with bounded waits.

Optionally each worker runs in a network namespace of its own (`Namespaces`): ns K is joined by a veth pair
to a bridge in the root namespace, which holds the master's and the driver's address (`Namespaces.host`);
worker K has `Namespaces.worker_host(K)`. All on one Linux host: every path is visible to every process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

#: JVM options for every JVM of the tests (daemons, drivers, executors): these JVMs live a minute or less,
#: and C1 alone compiles enough for them at a fraction of the CPU time; one GC thread on 2 shared cores.
QUICK_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
#: How long the master and the workers get to come up and register, on 2 busy cores.
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 15.0
KILL_WAIT_S = 10.0


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def spark_class() -> Path:
    return spark_home() / "bin" / "spark-class"


def driver_submit_args() -> str:
    """PYSPARK_SUBMIT_ARGS for a driver of these tests (`notpu ... --engine spark`): QUICK_JVM for it and its
    executors."""
    return (f'--conf "spark.driver.extraJavaOptions={QUICK_JVM}" '
            f'--conf "spark.executor.extraJavaOptions={QUICK_JVM}" pyspark-shell')


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


class Namespaces:
    """`count` network namespaces, each joined by a veth pair to one bridge in the root namespace.

        root ns: bridge nspkPIDbr, host 10.211.S.1/24    <- the master, the driver and the server bind it
          ├─ veth nspkPID-1 ── eth0 in ns notpu-spkPID-1, 10.211.S.2/24   <- Spark worker 1, its executors
          └─ veth nspkPID-2 ── eth0 in ns notpu-spkPID-2, 10.211.S.3/24   <- Spark worker 2, its executors

    Names carry this process's pid (S is derived from it), so that runs on a shared host do not meet; only
    what is named here is made, `delete` removes all of it, and `create` first removes what runs that are
    gone (killed before their teardown) left.
    """

    PREFIX_NS, PREFIX_DEV = "notpu-spk", "nspk"

    def __init__(self, count: int) -> None:
        pid = os.getpid()
        self.names = [f"{self.PREFIX_NS}{pid}-{k + 1}" for k in range(count)]
        self.devs = [f"{self.PREFIX_DEV}{pid}-{k + 1}" for k in range(count)]
        self.bridge = f"{self.PREFIX_DEV}{pid}br"  # at most 13 characters: a device name holds 15
        self.net = f"10.211.{pid % 250 + 1}"
        self.host = f"{self.net}.1"

    @staticmethod
    def unusable() -> str:
        """Why the namespaces cannot be made here ("" if they can)."""
        if sys.platform != "linux":
            return "network namespaces are Linux only"
        if os.geteuid() != 0:
            return "needs root (CAP_NET_ADMIN) for network namespaces"
        if not shutil.which("ip"):
            return "needs the ip command (iproute2)"
        probe = f"notpu-spk{os.getpid()}-probe"
        made = _sh("ip", "netns", "add", probe, check=False)
        if made.returncode:
            return f"ip netns add is not permitted here: {made.stderr.strip()}"
        _sh("ip", "netns", "del", probe, check=False)
        link = _sh("ip", "link", "add", f"nspk{os.getpid()}pr", "type", "bridge", check=False)
        if link.returncode:
            return f"ip link add (a bridge) is not permitted here: {link.stderr.strip()}"
        _sh("ip", "link", "del", f"nspk{os.getpid()}pr", check=False)
        return ""

    def worker_host(self, k: int) -> str:
        return f"{self.net}.{k + 2}"

    def exec_prefix(self, k: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[k]]

    def create(self) -> None:
        self.delete_stale()
        try:
            _sh("ip", "link", "add", self.bridge, "type", "bridge")
            _sh("ip", "addr", "add", f"{self.host}/24", "dev", self.bridge)
            _sh("ip", "link", "set", self.bridge, "up")
            for k, (ns, dev) in enumerate(zip(self.names, self.devs)):
                _sh("ip", "netns", "add", ns)
                _sh("ip", "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _sh("ip", "link", "set", dev, "master", self.bridge)
                _sh("ip", "link", "set", dev, "up")
                _sh("ip", "-n", ns, "addr", "add", f"{self.worker_host(k)}/24", "dev", "eth0")
                _sh("ip", "-n", ns, "link", "set", "eth0", "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise

    def delete(self) -> None:
        for ns in self.names:
            _sh("ip", "netns", "del", ns, check=False)  # takes its end of the veth pair, and so the pair, with it
        for dev in [*self.devs, self.bridge]:
            if dev in self._links():
                _sh("ip", "link", "del", dev, check=False)

    @classmethod
    def delete_stale(cls) -> None:
        """Remove the namespaces and devices of runs whose process is gone."""
        def dead(name: str, prefix: str) -> bool:
            m = re.match(re.escape(prefix) + r"(\d+)(?:-\d+|br|pr|-probe)$", name)
            return bool(m) and not psutil.pid_exists(int(m[1]))

        for ns in _sh("ip", "netns", "list", check=False).stdout.split():
            if dead(ns, cls.PREFIX_NS):
                _sh("ip", "netns", "del", ns, check=False)
        for dev in cls._links():
            if dead(dev, cls.PREFIX_DEV):
                _sh("ip", "link", "del", dev, check=False)

    @staticmethod
    def _links() -> list[str]:
        out = _sh("ip", "-o", "link", "show", check=False).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]

    def left(self) -> list[str]:
        """What of ours is still there (nothing after `delete`)."""
        listed = _sh("ip", "netns", "list", check=False).stdout.split()
        links = self._links()
        return [ns for ns in self.names if ns in listed] + [d for d in [*self.devs, self.bridge] if d in links]


@dataclass
class Cluster:
    """A running standalone cluster: `master_url` for --master; `stop()` ends every process it started."""

    root: Path
    host: str = "127.0.0.1"  # the master's address (and the one the driver should bind)
    workers: int = 2
    namespaces: Namespaces | None = None
    master_url: str = ""
    webui: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)

    def env(self, bind: str) -> dict[str, str]:
        env = {**os.environ, "SPARK_HOME": str(spark_home()), "SPARK_CONF_DIR": str(self.root / "conf"),
               "SPARK_LOG_DIR": str(self.root / "logs"), "SPARK_LOCAL_DIRS": str(self.root / "local"),
               "SPARK_WORKER_DIR": str(self.root / "work"), "SPARK_LOCAL_IP": bind,
               "SPARK_DAEMON_MEMORY": "256m", "PYSPARK_PYTHON": sys.executable,
               "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false",  # else it takes port 6066
               "SPARK_DAEMON_JAVA_OPTS": QUICK_JVM,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("PYSPARK_GATEWAY_PORT", None)
        return env

    def worker_names(self) -> list[str]:
        return [f"worker{k + 1}" for k in range(self.workers)]

    def work_dir(self, worker: str) -> Path:
        """A worker's own SPARK_WORKER_DIR: APP/EXECUTOR_ID/ holds each executor it ran (its stdout, stderr)."""
        return self.root / "work" / worker

    def _start(self, name: str, cmd: list[str], bind: str) -> subprocess.Popen:
        path = self.root / "logs" / f"{name}.log"
        env = self.env(bind)
        if name != "master":
            self.work_dir(name).mkdir(parents=True, exist_ok=True)
            env["SPARK_WORKER_DIR"] = str(self.work_dir(name))
        with open(path, "wb") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)  # its own process group
        self.procs.append(proc)
        self.logs[name] = path
        return proc

    def start(self) -> "Cluster":
        for d in ("conf", "logs", "local", "work"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        try:  # ports chosen by the master itself (no race with other processes for a port picked here)
            master = self._start("master", [str(spark_class()), "org.apache.spark.deploy.master.Master",
                                            "--host", self.host, "--port", "0", "--webui-port", "0"], self.host)
            port, ui = self._master_ports(master, time.monotonic() + START_TIMEOUT_S)
            self.master_url, self.webui = f"spark://{self.host}:{port}", f"http://{self.host}:{ui}/json/"
            for k, name in enumerate(self.worker_names()):
                host = self.namespaces.worker_host(k) if self.namespaces else self.host
                prefix = self.namespaces.exec_prefix(k) if self.namespaces else []
                self._start(name, [*prefix, str(spark_class()), "org.apache.spark.deploy.worker.Worker",
                                   self.master_url, "--host", host, "--cores", "1", "--memory", "1g",
                                   "--webui-port", "0", "--work-dir", str(self.work_dir(name))], host)
            self.wait_for_workers(START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def _master_ports(self, master: subprocess.Popen, deadline: float) -> tuple[int, int]:
        """The master's RPC and web UI ports, from its log once it has bound both."""
        rpc = re.compile(r"Starting Spark master at spark://\S+:(\d+)")
        ui = re.compile(r"MasterWebUI: Bound MasterWebUI to \S+, and started at http://\S+:(\d+)")
        while time.monotonic() < deadline:
            if master.poll() is not None:
                raise RuntimeError(f"the master exited with code {master.returncode}:\n{self.tail('master')}")
            text = self.logs["master"].read_text(errors="replace")
            a, b = rpc.search(text), ui.search(text)
            if a and b:
                return int(a[1]), int(b[1])
            time.sleep(0.2)
        raise RuntimeError(f"the master did not start within {START_TIMEOUT_S:g} s:\n{self.tail('master')}")

    def state(self) -> dict:
        with urllib.request.urlopen(self.webui, timeout=5) as r:
            return json.loads(r.read())

    def alive_workers(self) -> list[dict]:
        return [w for w in self.state().get("workers", []) if w.get("state") == "ALIVE"]

    def wait_for_workers(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            for proc, name in zip(self.procs, self.logs):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{self.tail(name)}")
            try:
                alive = self.alive_workers()
                if len(alive) >= self.workers:
                    return
                last = f"{len(alive)} of {self.workers} workers alive"
            except OSError as exc:  # the web UI is not up yet
                last = f"master's web UI: {exc}"
            time.sleep(0.5)
        raise RuntimeError(f"the cluster was not up within {timeout_s:g} s ({last}):\n"
                           + "\n".join(f"--- {n}\n{self.tail(n)}" for n in self.logs))

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logs[name]
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def members(self) -> list[psutil.Process]:
        """Every live process of the cluster: its daemons' process groups and their descendants (executors,
        the PySpark daemons, which make groups of their own, Python workers and what tasks start), and
        anything else whose command line names the cluster's directory (not this process or its ancestors)."""
        groups = {p.pid for p in self.procs}
        mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid not in mine and (os.getpgid(p.pid) in groups
                                          or any(str(self.root) in a for a in p.info["cmdline"] or ())):
                    found[p.pid] = p
            except (psutil.Error, ProcessLookupError):
                pass
        for p in list(found.values()):
            try:
                found.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.Error:
                pass
        out = []
        for p in found.values():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def executors(self) -> list[psutil.Process]:
        """The executor JVMs now running on the workers."""
        out = []
        for p in self.members():
            try:
                if "org.apache.spark.executor.CoarseGrainedExecutorBackend" in p.cmdline():
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def stop(self) -> None:
        """SIGTERM to each daemon's process group (workers first: they stop their executors), then SIGKILL to
        what is left of the groups; reaps the daemons. Bounded: about STOP_GRACE_S + KILL_WAIT_S."""
        order = self.procs[1:] + self.procs[:1]
        for proc in order:
            _killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in order:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        left = self.members()
        _, alive = psutil.wait_procs(left, timeout=max(deadline - time.monotonic(), 0.1))
        for proc in self.procs:
            _killpg(proc.pid, signal.SIGKILL)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        for proc in self.procs:
            try:
                proc.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
        psutil.wait_procs(alive, timeout=KILL_WAIT_S)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

"""The Spark path on a real multi-executor cluster that the test makes: a standalone master and two one-core
workers (tests/integration/spark_cluster.py), each worker's executor its own JVM with its own Python workers.

    notpu prepare --engine spark --master spark://...   parts written by the executors; same as local
    notpu train   --engine spark --master spark://...   adag (plain tasks) and easgd (a barrier stage of 2)
    notpu predict --engine spark --master spark://...   the same scores as local `notpu predict`

Each command is a real `notpu` process whose driver (a JVM of its own) joins the cluster; the parameter
server binds the driver's address (`spark.driver.host`), the workers run as Spark tasks in the executors.
The last part runs the two Spark workers in network namespaces of their own, joined to the root namespace
by veth pairs on a bridge: the master, the driver and the parameter server bind the bridge's address, and
the tasks reach them across the namespaces (skipped where namespaces are not permitted).

Tiny data (300 players, 30 days) and a tiny GRU; one training per rule, shared by the tests that read it.
If the standalone cluster cannot start, NOTPU_TEST_SPARK_MASTER (or the failure) selects local-cluster[2,1,1024].
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import psutil
import pytest

pytest.importorskip("pyspark")

sys.path.insert(0, str(Path(__file__).parent))
from conftest import fail_on_leftovers, wait_for  # noqa: E402
from spark_local import processes_mentioning  # noqa: E402
from spark_cluster import Cluster, Namespaces, driver_submit_args  # noqa: E402

from models.dataset import load_dataset, num_parts  # noqa: E402
from models.generate import GeneratorConfig, generate_events, write_events  # noqa: E402
from pserver.procs import stop_tree  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# model.keras is the last centre (not the best evaluation, which may be the first weights), for predict to score
TINY = ["--hidden", "4", "--epochs", "1", "--batch-size", "32", "--eval-interval-s", "1", "--no-restore-best",
        "--no-progress"]
CLI_TIMEOUT_S = 240
TOLERANCE = 1e-5
OBSERVATION_DAYS = "30"
#: Every cluster this module started: their processes are theirs to stop (and check), not leftovers of a test.
CLUSTERS: list = []


class Fallback:
    """local-cluster[2,1,1024]: Spark's own two-executor test cluster, started and stopped by each driver."""

    master_url = "local-cluster[2,1,1024]"
    host = "127.0.0.1"
    procs: list = []

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def members(self) -> list:
        return []

    def executors(self) -> list:
        return []

    def stop(self) -> None:
        pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster | Fallback]:
    forced = os.environ.get("NOTPU_TEST_SPARK_MASTER", "")
    if forced.startswith("local-cluster"):
        yield Fallback(f"NOTPU_TEST_SPARK_MASTER={forced}")
        return
    try:
        c = Cluster(tmp_path_factory.mktemp("standalone"), workers=2)
        CLUSTERS.append(c)
        c.start()
    except (OSError, RuntimeError) as exc:  # start() has stopped what it started
        reason = str(exc).splitlines()[0]
        warnings.warn(f"the standalone cluster did not start ({reason}); falling back to local-cluster[2,1,1024]")
        yield Fallback(reason)
        return
    try:
        yield c
    finally:
        c.stop()
        left = c.members()
        assert not left, f"the cluster left processes behind: {[(p.pid, p.name()) for p in left]}"


@pytest.fixture(autouse=True)
def no_leftover_processes(cluster) -> Iterator[None]:
    """The suite's check for child processes left behind, but for the cluster's own (checked when it stops)."""
    yield
    fail_on_leftovers({p.pid for c in CLUSTERS for p in c.members()})


def cli_env(host: str) -> dict[str, str]:
    """The driver binds `host` (spark.driver.host, and so the parameter server); executors run this Python."""
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": host,
           "PYSPARK_SUBMIT_ARGS": driver_submit_args(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    return env


def notpu(*args: str, host: str = "127.0.0.1") -> str:
    """`notpu ARGS` as its own process (its driver JVM its child); returns its stdout, fails on exit != 0."""
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(host))
    t0 = time.monotonic()
    try:
        stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        stop_tree(proc)
    assert proc.returncode == 0, f"notpu {' '.join(args)} exited with {proc.returncode}:\n{stderr[-4000:]}"
    print(f"\nnotpu {args[0]}{' --engine spark' if 'spark' in args else ''}: {time.monotonic() - t0:.0f} s")
    return stdout


def assert_app_gone(cluster, run: Path | None = None) -> None:
    """The driver's application is over: its executors (and their tasks' workers) and, for a RUN, every
    process of the run (server, shards, evaluator) are gone; only the cluster's daemons are left."""
    wait_for(lambda: not cluster.executors() and (run is None or not processes_mentioning(str(run))), 30,
             "the application's executors and the run's processes to be gone")
    if isinstance(cluster, Cluster):
        daemons = {p.pid for p in cluster.procs}
        wait_for(lambda: {p.pid for p in cluster.members()} <= daemons, 30, "only the cluster's daemons to be left")


def executor_workers(cluster: Cluster, app: str) -> dict[str, str]:
    """Executor id -> the Spark worker (worker1, worker2) that ran it, from each worker's own work dir."""
    return {d.name: w for w in cluster.worker_names() for d in (cluster.work_dir(w) / app).glob("*") if d.is_dir()}


def last_app(cluster: Cluster, name: str) -> str:
    apps = [a for a in cluster.state().get("completedapps", []) if a.get("name") == name]
    assert apps, f"no completed application {name!r} on the master"
    return max(apps, key=lambda a: a["starttime"])["id"]


# --- the cluster itself ------------------------------------------------------------------------------------


def test_cluster_has_two_one_core_workers_in_their_own_jvms(cluster) -> None:
    if isinstance(cluster, Fallback):
        pytest.skip(f"no standalone cluster: {cluster.reason}")
    alive = cluster.alive_workers()
    assert len(alive) == 2 and [w["cores"] for w in alive] == [1, 1]
    assert len({w["id"] for w in alive}) == 2
    jvms = [psutil.Process(p.pid) for p in cluster.procs]
    assert all("java" in p.name() for p in jvms) and len({p.pid for p in jvms}) == 3


# --- prepare -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cluster-log") / "events.parquet"
    return write_events(generate_events(GeneratorConfig(players=300, days=30, seed=7)), path)


@pytest.fixture(scope="module")
def prepared(cluster, events, tmp_path_factory) -> Path:
    """`notpu prepare --engine spark` on the cluster, in 2 parts (one per training worker)."""
    out = tmp_path_factory.mktemp("cluster-data") / "data"
    notpu("prepare", str(events), "--out", str(out), "--engine", "spark", "--master", cluster.master_url,
          "--parts", "2", "--observation-days", OBSERVATION_DAYS, host=cluster.host)
    return out


def test_prepare_on_the_cluster_equals_local_prepare(cluster, events, prepared, tmp_path) -> None:
    local = tmp_path / "local"
    notpu("prepare", str(events), "--out", str(local), "--observation-days", OBSERVATION_DAYS)
    assert num_parts(prepared) == 2
    spec, spec_local = (json.loads((d / "spec.json").read_text()) for d in (prepared, local))
    assert {**spec, "source": None} == {**spec_local, "source": None}
    a, b = load_dataset(local), load_dataset(prepared)
    np.testing.assert_array_equal(b.ids, a.ids)
    np.testing.assert_array_equal(b.y, a.y)
    np.testing.assert_allclose(b.X, a.X, rtol=1e-6, atol=1e-6)
    assert_app_gone(cluster)
    if isinstance(cluster, Cluster):  # the parts were written by executors on both workers
        assert sorted(set(executor_workers(cluster, last_app(cluster, "notpu-prepare")).values())) == \
            ["worker1", "worker2"]


# --- train -------------------------------------------------------------------------------------------------


def train(cluster, prepared: Path, run: Path, rule: str) -> dict:
    t0 = time.monotonic()
    notpu("train", str(prepared), "--out", str(run), "--engine", "spark", "--master", cluster.master_url,
          "--workers", "2", "--rule", rule, *TINY, host=cluster.host)
    summary = json.loads((run / "summary.json").read_text())
    summary["_test_wall_s"] = time.monotonic() - t0
    assert_app_gone(cluster, run)
    print(f"\n{rule}: notpu train {summary['_test_wall_s']:.0f} s (run {summary['wall_s']:.0f} s), "
          f"its executors gone {time.monotonic() - t0 - summary['_test_wall_s']:.1f} s later")
    return summary


@pytest.fixture(scope="module")
def adag_run(cluster, prepared, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("cluster-adag") / "run"
    return run, train(cluster, prepared, run, "adag")


@pytest.fixture(scope="module")
def easgd_run(cluster, prepared, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("cluster-easgd") / "run"
    return run, train(cluster, prepared, run, "easgd")


def check_trained_on_two_executors(cluster, run: Path, summary: dict, rule: str) -> None:
    print(f"\n{rule} × 2 on {cluster.master_url}: test AUC {summary['test_auc']:.4f}, "
          f"{summary['_test_wall_s']:.0f} s, executors {summary.get('task_executors')}")
    assert summary["status"] == "ok" and summary["rule"] == rule
    assert summary["engine"] == "spark" and summary["spark_master"] == cluster.master_url
    assert summary["lost_workers"] == [] and summary["task_attempts"] == {"0": 1, "1": 1}
    assert sorted(summary["worker_names"].values()) == ["spark-0", "spark-1"]
    # both ranks trained: each pushed updates (its report), and the server counted them (staleness per rank)
    reports, received = summary["worker_reports"], summary["staleness"]["histograms"]
    assert all(reports[k]["steps"] > 0 and reports[k]["exchanges"] > 0 and sum(received[k]) > 0
               for k in ("0", "1")), (reports, received)
    executors = summary["task_executors"]
    assert sorted(executors) == ["0", "1"] and None not in executors.values() and "driver" not in executors.values()
    assert len(set(executors.values())) == 2, f"both tasks ran in one executor: {executors}"
    for k in (0, 1):
        log = (run / "logs" / f"worker{k}.log").read_text()
        assert f"Spark task attempt 0 of partition {k} on " in log and f"executor {executors[str(k)]}" in log
        assert f"rank {k} reads only part {k} of 2" in log
    if isinstance(cluster, Cluster):  # and those executors ran on the two different Spark workers
        where = executor_workers(cluster, last_app(cluster, "notpu train"))
        assert sorted(where[e] for e in executors.values()) == ["worker1", "worker2"], (where, executors)


def test_async_rule_trains_on_two_executors(cluster, adag_run) -> None:
    run, summary = adag_run
    check_trained_on_two_executors(cluster, run, summary, "adag")


def test_sync_rule_runs_as_a_barrier_stage_over_both_workers(cluster, easgd_run) -> None:
    """easgd: one barrier stage of 2 tasks, exactly the cluster's 2 slots (one core per worker)."""
    run, summary = easgd_run
    check_trained_on_two_executors(cluster, run, summary, "easgd")


# --- predict -----------------------------------------------------------------------------------------------


def test_predict_on_the_cluster_equals_local_predict(cluster, adag_run, events, tmp_path) -> None:
    run, _ = adag_run
    model = str(run / "model.keras")
    local, spark = tmp_path / "local.csv", tmp_path / "spark.csv"
    notpu("predict", model, str(events), "--out", str(local))
    stdout = notpu("predict", model, str(events), "--out", str(spark), "--engine", "spark",
                   "--master", cluster.master_url, host=cluster.host)
    a, b = (pd.read_csv(p, dtype={"id": str}) for p in (local, spark))
    assert len(a) > 100 and stdout.strip() == f"{len(a)} customers scored -> {spark}"
    assert b["id"].tolist() == a["id"].tolist()
    diff = float(np.max(np.abs(b["churn_probability"].to_numpy(np.float64)
                               - a["churn_probability"].to_numpy(np.float64))))
    print(f"\n{len(a)} customers, max |spark - local| = {diff:.2e}")
    assert diff <= TOLERANCE
    assert_app_gone(cluster)


# --- network namespaces ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ns_cluster(cluster, tmp_path_factory) -> Iterator[Cluster]:
    """The two Spark workers each in a network namespace of its own; the master on the bridge's address."""
    why = Namespaces.unusable()
    if why:
        pytest.skip(f"network namespaces: {why}")
    if isinstance(cluster, Fallback):
        pytest.skip(f"no standalone cluster here: {cluster.reason}")
    ns = Namespaces(2)
    ns.create()
    c = None
    try:
        c = Cluster(tmp_path_factory.mktemp("standalone-ns"), host=ns.host, workers=2, namespaces=ns)
        CLUSTERS.append(c)
        c.start()
        yield c
    finally:
        try:
            if c is not None:
                c.stop()
                left = c.members()
                assert not left, f"the cluster left processes behind: {[(p.pid, p.name()) for p in left]}"
        finally:
            ns.delete()
            assert not ns.left(), f"namespaces or links left behind: {ns.left()}"


def net_ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def test_async_rule_across_network_namespaces(ns_cluster, prepared, tmp_path) -> None:
    """Executors in two other network namespaces: the driver (spark.driver.host), the master and the parameter
    server bind the bridge's address (10.211.S.1), which the tasks reach over their veth pairs from addresses
    of their own; 127.0.0.1 in a task is its own namespace's loopback, where no driver or server listens."""
    c = ns_cluster
    workers = {p.pid: p for p in c.procs[1:]}
    spaces = {net_ns(pid) for pid in workers}
    assert len(spaces) == 2 and net_ns(os.getpid()) not in spaces  # two namespaces, neither the driver's
    assert sorted(w["host"] for w in c.alive_workers()) == [c.namespaces.worker_host(k) for k in range(2)]
    run = tmp_path / "run"
    summary = train(c, prepared, run, "adag")
    check_trained_on_two_executors(c, run, summary, "adag")
    pserver_log = (run / "logs" / "pserver.log").read_text()
    assert f"pserver ready at {c.host}:" in pserver_log and "CurveZMQ on" in pserver_log, pserver_log[-2000:]
    for k in (0, 1):  # the server is not on the workers' (network) host: pushes and pulls crossed the veth pairs
        assert "shared memory with shard" not in (run / "logs" / f"worker{k}.log").read_text()


# --- last: the cluster stops and leaves nothing -------------------------------------------------------------


def test_stopping_the_cluster_leaves_no_process(cluster) -> None:
    """Runs last in this file (pytest keeps file order): stops the module's cluster and checks every process
    it started (master, workers, executors, Python workers) is gone; the fixture's stop is then a no-op."""
    if isinstance(cluster, Fallback):
        pytest.skip(f"no standalone cluster: {cluster.reason}")
    assert len(cluster.members()) >= 3
    t0 = time.monotonic()
    cluster.stop()
    assert not cluster.members() and all(p.poll() is not None for p in cluster.procs)
    print(f"\ncluster stopped in {time.monotonic() - t0:.1f} s")

"""`notpu train --engine spark`: real Spark in local mode, real worker processes as tasks, tiny GRUs.

Each run is its own `notpu train` process with its own SparkSession (a JVM),
stopped when the run ends; the tests check that no worker is left behind.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import wait_for  # noqa: E402
from spark_local import processes_mentioning  # noqa: E402
from datasets import write_fading  # noqa: E402

from models.dataset import part_dir, split_indices, write_part, write_parts_index  # noqa: E402
from pserver.procs import stop_tree  # noqa: E402

pyspark = pytest.importorskip("pyspark")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A tiny GRU on 600 customers: a Spark session, two workers and an evaluator share 2 cores.
TINY = ["--hidden", "8", "--batch-size", "32", "--learning-rate", "0.01", "--eval-interval-s", "1", "--no-progress"]
# Untrained, these models score 0.3–0.6 on this data (tests/integration/datasets.py); 0.75 means the centre
# moved well towards a solution in a few epochs.
AUC_THRESHOLD = 0.75
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def fading(tmp_path_factory):
    return write_fading(tmp_path_factory.mktemp("spark-fading"), customers=600)


@pytest.fixture(scope="module")
def fading_parts(fading, tmp_path_factory):
    """The same customers in the parts layout of `notpu prepare --engine spark`: two parts of uneven size."""
    X, y, ids = (np.load(fading / f"{name}.npy") for name in ("X", "y", "ids"))
    d = tmp_path_factory.mktemp("spark-fading-parts")
    (d / "spec.json").write_text((fading / "spec.json").read_text())
    bounds = [0, 280, len(y)]
    for k in range(2):
        a, b = bounds[k], bounds[k + 1]
        write_part(part_dir(d, k), [X[a:b]], X[a:b].shape, y[a:b], ids[a:b], np.ones((b - a, X.shape[1]), bool))
    write_parts_index(d, [b - a for a, b in zip(bounds, bounds[1:])])
    return d


def notpu_train(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runner.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        stop_tree(proc)
    assert proc.returncode == 0, stderr[-4000:]
    return stdout, stderr


def assert_nothing_left(run: Path) -> None:
    """No worker, shard or evaluator of this run is still there (a task's worker dies with the task)."""
    wait_for(lambda: not processes_mentioning(str(run)) and not processes_mentioning("notpu-keys-"), 20,
             f"the processes of {run} to be gone")


def spark_workers(parent: int) -> dict[str, psutil.Process]:
    """The `worker start` processes under `parent` (in its Spark tasks), by name (spark-RANK)."""
    out = {}
    for p in psutil.Process(parent).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "runner.worker_cli" in cmd and "start" in cmd:
            out[json.loads(cmd[-1])["name"]] = p
    return out


def test_sync_rule_runs_as_a_barrier_stage_on_its_parts_and_learns(fading_parts, tmp_path):
    """Each worker reads only its own part of a DIR written in as many parts as there are workers."""
    run = tmp_path / "run"
    t0 = time.monotonic()
    stdout, _ = finish(notpu_train(str(fading_parts), "--out", str(run), "--engine", "spark", "--master", "local[2]",
                                   "--workers", "2", "--rule", "easgd", "--epochs", "3", *TINY,
                                   "--batch-size", "16"))
    summary = json.loads((run / "summary.json").read_text())
    print(f"\neasgd × 2 on local[2]: test AUC {summary['test_auc']:.4f}, {time.monotonic() - t0:.0f} s")
    assert summary["engine"] == "spark" and summary["spark_master"] == "local[2]"
    assert summary["lost_workers"] == [] and summary["task_attempts"] == {"0": 1, "1": 1}
    assert sorted(summary["worker_names"].values()) == ["spark-0", "spark-1"]
    # part 0 holds fewer training rows (171 of 384): both ranks take its number of steps, so the rounds line up
    share = min(int(((split_indices(600).train >= 280) == k).sum()) for k in (0, 1))
    reports = summary["worker_reports"]
    assert reports["0"]["steps"] == reports["1"]["steps"] == 3 * -(-share // 16)
    # and summary.json reports the steps (and so λ) the workers used: 11, where half the DIR's rows would give 12
    assert summary["effective"]["steps_per_epoch"] == -(-share // 16) == 11
    assert summary["test_auc"] > AUC_THRESHOLD
    for name in ("model.keras", "history.jsonl", "test_scores.csv", "spec.json", "logs/pserver.log",
                 "logs/evaluator.log", "logs/worker0.log", "logs/worker1.log"):
        assert (run / name).is_file(), name
    for k in (0, 1):
        assert f"rank {k} reads only part {k} of 2" in (run / "logs" / f"worker{k}.log").read_text()
    assert "CurveZMQ on" in (run / "logs" / "pserver.log").read_text()
    assert_nothing_left(run)


def test_async_worker_sigkilled_mid_run_is_retried_with_its_rank(fading, tmp_path):
    """local[2,3]: a task may fail twice. The test SIGKILLs worker 1 once it has joined; Spark retries its task,
    whose new worker waits until the server declares the old one lost and rejoins as rank 1."""
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = notpu_train(str(fading), "--out", str(run), "--engine", "spark", "--master", "local[2,3]",
                       "--workers", "2", "--rule", "adag", "--epochs", "4", "--worker-timeout-s", "6", *TINY)
    try:
        log1 = run / "logs" / "worker1.log"

        def joined():  # worker 1 holds rank 1 and the centre: it trains from here on
            if proc.poll() is not None:
                raise AssertionError(proc.communicate()[1][-3000:])
            return log1.exists() and " the centre (" in log1.read_text() and spark_workers(proc.pid).get("spark-1")

        victim = wait_for(joined, 150, "worker 1 to join", interval_s=0.2)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic() - t0
        stdout, stderr = finish(proc)
    finally:
        stop_tree(proc)
    summary = json.loads((run / "summary.json").read_text())
    log1 = (run / "logs" / "worker1.log").read_text()
    print(f"\nadag × 2 on local[2,3], worker 1 SIGKILLed at {killed_at:.0f} s: test AUC {summary['test_auc']:.4f}, "
          f"{time.monotonic() - t0:.0f} s")
    assert summary["task_attempts"] == {"0": 1, "1": 2}
    assert "Spark task attempt 1 of partition 1" in log1 and "rank 1 was declared lost; taking it back" in log1
    assert summary["lost_workers"] == []  # the rank came back, and finished its epochs
    assert summary["worker_reports"]["1"]["samples"] == 4 * 6 * 32
    assert summary["test_auc"] > AUC_THRESHOLD
    assert_nothing_left(run)


def test_too_few_slots_for_a_barrier_stage_is_refused_clearly(fading, tmp_path):
    out = subprocess.run([sys.executable, "-m", "runner.cli", "train", str(fading), "--out", str(tmp_path / "run"),
                          "--engine", "spark", "--master", "local[2]", "--workers", "3", "--rule", "easgd",
                          *TINY], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "needs 3 task slots at once, and local[2] has 2" in out.stderr and "--workers 2" in out.stderr
    assert not (tmp_path / "run" / "logs" / "pserver.log").exists()  # refused before anything started


def test_master_without_spark_engine_is_refused(notpu_cli, fading, tmp_path):
    code, err = notpu_cli("train", str(fading), "--out", str(tmp_path / "run"), "--master", "local[2]")
    assert code == 2 and "add --engine spark" in err

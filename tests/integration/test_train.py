"""`notpu train`, `pserver start` + `worker start`: real processes, real Keras models, tiny GRUs."""
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
from conftest import kill_tree, wait_for  # noqa: E402
from datasets import write_fading  # noqa: E402

from models.dataset import split_indices  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A tiny GRU on 800 customers: seconds per run on 2 cores. The learning rate is
# 10× Adam's default because ADAG moves the centre by Δ/λ per window.
TINY = ["--hidden", "16", "--batch-size", "32", "--epochs", "6", "--learning-rate", "0.01", "--eval-interval-s", "1",
        "--no-progress"]
# Untrained, these models score 0.3–0.6 on this data; a logistic regression on the
# slope would score ~0.97. 0.8 means the rule really moved the centre towards a solution.
AUC_THRESHOLD = 0.8


@pytest.fixture(scope="module")
def fading(tmp_path_factory):
    return write_fading(tmp_path_factory.mktemp("fading"))


def notpu(*args, timeout_s=300):
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.parametrize("rule", ["downpour", "adag", "dynsgd", "aeasgd", "eamsgd", "easgd", "averaging"])
def test_each_rule_learns_through_notpu_train(fading, tmp_path, rule):
    run = tmp_path / "run"
    extra = ["--window", "4"] if rule in ("aeasgd", "eamsgd", "easgd") else []  # λ=32 is a whole epoch here
    out = notpu("train", str(fading), "--out", str(run), "--workers", "2", "--rule", rule, *TINY, *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rule"] == rule and summary["workers"] == 2 and summary["lost_workers"] == []
    assert summary["test_auc"] > AUC_THRESHOLD, summary
    # 800 customers → 512 train rows, 256 per worker → 8 steps of 32 per epoch, for 6 epochs, × 2 workers
    assert summary["samples"] == 2 * 6 * 8 * 32
    assert (run / "model.keras").stat().st_size > 0
    scores = (run / "test_scores.csv").read_text().splitlines()
    assert scores[0] == "id,label,score" and len(scores) - 1 == len(split_indices(800).test)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history and set(history[0]) == {"wall_s", "samples", "updates", "val_loss", "val_auc", "mean_staleness"}
    assert [h["wall_s"] for h in history] == sorted(h["wall_s"] for h in history)
    if rule in ("easgd", "averaging"):
        assert summary["staleness"]["mean"] == 0.0


def load_model_in_subprocess(path: Path) -> int:
    code = ("import keras, sys; m = keras.saving.load_model(sys.argv[1]); "
            "print(sum(int(w.size) for w in m.get_weights()))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


def test_pserver_and_two_worker_processes_finish_a_run(pserver, fading, tmp_path):
    server = pserver("--workers", "2", "--shards", "2", "--rule", "downpour", "--epochs", "2", "--hidden", "8",
                     "--batch-size", "32", "--exit-when-done")
    run = tmp_path / "run"
    worker = lambda name: subprocess.Popen(
        [sys.executable, "-m", "runner.worker_cli", "start", "--ps", server.address, "--data", str(fading),
         "--threads", "1", "--name", name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    workers = [worker("hostA"), worker("hostB")]
    evaluator = subprocess.Popen([sys.executable, "-m", "runner.worker_cli", "evaluate", "--ps", server.address,
                                  "--data", str(fading), "--out", str(run), "--interval-s", "1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        reports = []
        for w in workers:
            stdout, _ = w.communicate(timeout=240)
            assert w.returncode == 0
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
        assert sorted(r["rank"] for r in reports) == [0, 1]
        assert evaluator.wait(240) == 0
        assert server.proc.wait(60) == 0  # --exit-when-done: every worker said DONE
    finally:
        for p in (*workers, evaluator):
            kill_tree(p)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rule"] == "downpour" and summary["shards"] == 2
    assert sorted(summary["worker_names"].values()) == ["hostA", "hostB"]
    assert load_model_in_subprocess(run / "model.keras") > 0


def worker_pids(parent: int) -> list[int]:
    procs = psutil.Process(parent).children(recursive=True)
    return [p.pid for p in procs if "start" in p.cmdline() and any("runner.worker_cli" in a for a in p.cmdline())]


@pytest.mark.parametrize("rule", ["easgd", "adag"])
def test_run_finishes_when_a_worker_is_sigkilled(fading, tmp_path, rule):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "runner.cli", "train", str(fading), "--out", str(run), "--workers", "2",
           "--rule", rule, "--window", "4", "--round-timeout-s", "5", *TINY[:-5], "--epochs", "30",
           "--eval-interval-s", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        history = run / "history.jsonl"

        def training():
            if proc.poll() is not None:
                raise AssertionError(proc.communicate()[1][-3000:])
            if not history.exists():
                return False
            lines = history.read_text().splitlines()
            return lines and json.loads(lines[-1])["updates"] >= 2

        wait_for(training, 180, "training to start")
        victims = worker_pids(proc.pid)
        assert len(victims) == 2
        os.kill(victims[1], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["lost_workers"]) == 1, summary["lost_workers"]
    assert "lost worker" in stdout
    assert summary["test_auc"] > AUC_THRESHOLD

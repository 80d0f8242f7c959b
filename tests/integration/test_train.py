"""`notpu train`, `pserver start` + `worker start`: real processes, real Keras models, tiny GRUs."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import wait_for  # noqa: E402
from datasets import write_fading  # noqa: E402

from models.dataset import split_indices  # noqa: E402
from pserver.client import Client  # noqa: E402
from pserver.procs import stop_tree  # noqa: E402
from pserver.security import create_keys  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A tiny GRU on 800 customers: seconds per run on 2 cores. The base learning rate
# is 10× Adam's default: 512 training rows in 6 epochs are few steps to learn from.
# (Each rule with only its defaults, against plain Keras: test_rules_learn.py.)
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


def load_model_in_subprocess(path: Path) -> int:
    code = ("import keras, sys; m = keras.saving.load_model(sys.argv[1]); "
            "print(sum(int(w.size) for w in m.get_weights()))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


def test_pserver_and_two_worker_processes_finish_a_run(pserver, fading, tmp_path):
    """As on separate hosts, and over CurveZMQ: the listed keys train (unlisted ones are refused:
    test_reliability.py::test_curve_admits_only_listed_keys)."""
    keys = create_keys(tmp_path / "keys", workers=2)
    server = pserver("--workers", "2", "--shards", "2", "--rule", "downpour", "--epochs", "2", "--hidden", "8",
                     "--batch-size", "32", "--exit-when-done", "--keys", str(keys))
    run = tmp_path / "run"
    worker = lambda name, key: subprocess.Popen(
        [sys.executable, "-m", "runner.worker_cli", "start", "--ps", server.address, "--data", str(fading),
         "--threads", "1", "--name", name, "--keys", str(keys), "--key", key],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    workers = [worker("hostA", "worker0"), worker("hostB", "worker1")]
    evaluator = subprocess.Popen([sys.executable, "-m", "runner.worker_cli", "evaluate", "--ps", server.address,
                                  "--data", str(fading), "--out", str(run), "--eval-interval-s", "1", "--keys", str(keys)],
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
            stop_tree(p)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rule"] == "downpour" and summary["shards"] == 2
    assert sorted(summary["worker_names"].values()) == ["hostA", "hostB"]
    assert load_model_in_subprocess(run / "model.keras") > 0


def worker_pids(parent: int) -> dict[int, int]:
    """Rank → pid of the `worker start` processes under `parent`."""
    pids = {}
    for p in psutil.Process(parent).children(recursive=True):
        cmd = p.cmdline()
        if "start" in cmd and any("runner.worker_cli" in a for a in cmd):
            pids[json.loads(cmd[cmd.index("--config-json") + 1])["rank"]] = p.pid
    return pids


def shard_pids(parent: int) -> list[int]:
    procs = psutil.Process(parent).children(recursive=True)
    return [p.pid for p in procs if any("pserver.shard_process" in a for a in p.cmdline())]


# Long enough that the kill lands mid-run (a worker trains for seconds, its heartbeat reports its
# samples every second); the same settings for the undisturbed run.
KILL_EPOCHS = 48
KILL_RUN = ["--workers", "2", "--window", "4", "--round-timeout-s", "5", *TINY[:-5], "--epochs", str(KILL_EPOCHS),
            "--eval-interval-s", "1", "--no-progress"]
SHARE = KILL_EPOCHS * 8 * 32  # one worker's samples: 8 batches of 32 per epoch


def train_and_kill(run: Path, args: list[str], victim) -> tuple[dict, str]:
    """`notpu train`; once every worker has trained but none is past half its share (by the coordinator's
    count, from the workers' heartbeats), SIGKILL the pid `victim(train_pid)` picks; the run must finish."""
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "train", *args, "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = None
    try:
        def mid_run():
            nonlocal client
            if proc.poll() is not None:
                raise AssertionError(proc.communicate()[1][-3000:])
            if client is None:
                ready = run / ".pserver.json"
                if not ready.exists():
                    return False
                client = Client(json.loads(ready.read_text())["address"])
            workers = client.stats()["coordinator"]["workers"].values()
            if len(workers) == 2 and any(w["done"] or w["samples"] > SHARE // 2 for w in workers):
                raise AssertionError(f"the kill came too late: {list(workers)}")
            return len(workers) == 2 and all(w["samples"] > 0 for w in workers)

        wait_for(mid_run, 180, "both workers training", interval_s=0.1)
        os.kill(victim(proc.pid), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if client is not None:
            client.close()
        stop_tree(proc)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads((run / "summary.json").read_text()), stdout


@pytest.mark.parametrize("rule", ["easgd", "adag"])
def test_run_finishes_when_a_worker_is_sigkilled(fading, tmp_path, rule):
    args = [str(fading), "--rule", rule, *KILL_RUN]
    clean = notpu("train", *args, "--out", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    undisturbed = json.loads((tmp_path / "clean" / "summary.json").read_text())

    summary, stdout = train_and_kill(tmp_path / "run", args, lambda pid: worker_pids(pid)[1])
    assert summary["lost_workers"] == [1], summary["lost_workers"]
    assert summary["status"] == "ok" and summary["warnings"][0].startswith("the run finished without worker(s) [1]")
    assert "lost worker" in stdout
    print(f"\n{rule}: test AUC {summary['test_auc']:.4f} with a worker killed, {undisturbed['test_auc']:.4f} undisturbed")
    assert abs(summary["test_auc"] - undisturbed["test_auc"]) <= 0.02


def test_run_finishes_when_a_shard_is_sigkilled(fading, tmp_path):
    run = tmp_path / "run"
    args = [str(fading), "--rule", "downpour", "--shards", "2", "--checkpoint-every-s", "0.5", *KILL_RUN]
    summary, _ = train_and_kill(run, args, lambda pid: shard_pids(pid)[0])
    assert summary["lost_workers"] == [] and summary["samples"] == 2 * SHARE
    assert "restarting it from its checkpoint" in (run / "logs" / "pserver.log").read_text()
    assert summary["test_auc"] > AUC_THRESHOLD


def test_a_run_whose_workers_all_fail_exits_2_with_one_line(fading, tmp_path):
    """`notpu train --model` whose workers all fail at their first step: exit 2, the error as the last line of
    stderr (the first worker's exception and the log that holds it), summary.json's status "failed"."""
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "runner.cli", "train", str(fading), "--out", str(run), "--model",
                          "failing_models:build", "--epochs", "1", "--eval-interval-s", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"notpu train: error: every worker failed, the model did not train; worker 0: ValueError: "
                        r".*this layer refuses to train \(see .*worker0\.log\)", last), last
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"] in last
    assert not out.stdout.strip()  # no result line as if it had trained


@pytest.mark.parametrize("overlap", [False, True])
def test_nan_local_loss_pulls_the_centre_and_shows_in_history(tmp_path, overlap):
    """Two training rows whose values overflow BatchNorm: every batch holding one has a NaN loss.
    With --overlap, the exchange in flight at a NaN lands before the worker pulls the centre; that run also
    asks for a bfloat16 wire, which reaches the workers (beside the shards they exchange through shared memory),
    and keeps the last centre (--no-restore-best), where the default keeps the best evaluation's."""
    data = write_fading(tmp_path / "poisoned")
    X = np.load(data / "X.npy")
    X[split_indices(len(X)).train[[3, 300]]] = 3e38  # one in each worker's partition
    np.save(data / "X.npy", X)
    run = tmp_path / "run"
    out = notpu("train", str(data), "--out", str(run), "--workers", "2", "--rule", "downpour", *TINY,
                *(["--overlap", "--wire", "bfloat16", "--no-restore-best"] if overlap else []))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    aucs = [json.loads(line)["val_auc"] for line in (run / "history.jsonl").read_text().splitlines()]
    if overlap:  # --no-restore-best: model.keras and the test scores are the last centre's
        assert summary.get("best", {"model": "final"})["model"] == "final"
    else:  # by default, the centre of the evaluation with the best val AUC
        assert summary["best"]["model"] == "best" and summary["val_auc"] == pytest.approx(max(aucs), abs=1e-4)
    assert summary["run_config"]["overlap"] is overlap and summary["wire"] == ("bfloat16" if overlap else "float32")
    if overlap:
        assert all("wire bfloat16, overlapped" in (run / "logs" / f"worker{r}.log").read_text() for r in (0, 1))
    last = json.loads((run / "history.jsonl").read_text().splitlines()[-1])
    assert last["nan_recoveries"] > 0 and sum(summary["nan_recoveries"].values()) >= last["nan_recoveries"]
    assert last["refused"] == 0  # nothing non-finite reached the shards
    assert summary["test_auc"] > AUC_THRESHOLD

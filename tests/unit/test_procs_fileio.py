"""pserver.procs (stopping process trees, waiting for a file) and pserver.fileio (atomic writes).

The process tests start `sh` and `sleep`: well under a second each."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from pserver.errors import ProcessExited, WaitTimeout
from pserver.fileio import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text
from pserver.procs import stop_tree, stop_trees, wait_for_file, wait_until


def tree(script: str) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """`sh -c script`, once it has started its two sleeps."""
    proc = subprocess.Popen(["sh", "-c", script])
    deadline = time.monotonic() + 5
    while len(kids := psutil.Process(proc.pid).children(recursive=True)) < 2:
        assert time.monotonic() < deadline, "the test's process tree did not start"
        time.sleep(0.01)
    return proc, kids


def gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_stop_tree_terminates_the_process_and_kills_what_it_left():
    proc, kids = tree("sleep 30 & sleep 30 & wait")  # sh dies of SIGTERM; its sleeps are orphaned
    t0 = time.monotonic()
    stop_tree(proc, grace_s=0.5)
    assert proc.returncode == -signal.SIGTERM  # the exit status is kept for the caller
    assert all(gone(k) for k in kids)
    assert time.monotonic() - t0 < 3


def test_stop_tree_kills_a_process_that_ignores_sigterm(caplog):
    proc, kids = tree('trap "" TERM; sleep 30 & sleep 30 & wait')  # the sleeps inherit the ignored TERM
    t0 = time.monotonic()
    stop_tree(proc, grace_s=0.3)
    assert proc.returncode == -signal.SIGKILL
    assert all(gone(k) for k in kids)
    assert 0.3 <= time.monotonic() - t0 < 3
    assert f"process {proc.pid} ignored SIGTERM" in caplog.text


def test_stop_tree_by_pid():
    proc, kids = tree("sleep 30 & sleep 30 & wait")
    root = psutil.Process(proc.pid)
    stop_tree(proc.pid, grace_s=0.5)
    assert gone(root) and all(gone(k) for k in kids)
    proc.poll()


def test_stop_trees_shares_one_grace_period():
    trees = [tree('trap "" TERM; sleep 30 & sleep 30 & wait') for _ in range(3)]
    t0 = time.monotonic()
    stop_trees([p for p, _ in trees], grace_s=0.3)
    assert time.monotonic() - t0 < 2  # not 3 × the grace period one after the other
    assert all(p.returncode == -signal.SIGKILL and all(gone(k) for k in kids) for p, kids in trees)


def test_stop_tree_of_a_finished_process_returns_at_once():
    proc = subprocess.Popen(["true"])
    proc.wait()
    t0 = time.monotonic()
    stop_tree(proc, grace_s=5)
    assert proc.returncode == 0 and time.monotonic() - t0 < 0.5


# ---- wait_for_file -------------------------------------------------------------------------------

def test_wait_for_file_returns_once_it_exists(tmp_path):
    path = tmp_path / "ready.json"
    threading.Timer(0.1, lambda: atomic_write_json(path, {"address": "x"})).start()
    assert wait_for_file(path, timeout_s=5, alive=lambda: True) == path
    assert json.loads(path.read_text()) == {"address": "x"}


def test_wait_for_file_gives_up_when_the_writer_exits(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ProcessExited, match="exited before"):
        wait_for_file(tmp_path / "never", timeout_s=5, alive=lambda: False)
    assert time.monotonic() - t0 < 0.5


def test_wait_for_file_accepts_a_file_written_just_before_its_writer_exited(tmp_path):
    path = tmp_path / "ready"
    path.write_text("x")
    assert wait_for_file(path, timeout_s=1, alive=lambda: False) == path


def test_wait_until_returns_the_first_true_value_and_times_out_by_name():
    calls = iter([0, None, "ready"])
    assert wait_until(lambda: next(calls), timeout_s=5, what="x", interval_s=0.01) == "ready"
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"timed out after 0\.2 s waiting for the answer"):
        wait_until(lambda: False, timeout_s=0.2, what="the answer", interval_s=0.05)
    assert 0.2 <= time.monotonic() - t0 < 1


def test_wait_for_file_times_out_by_name(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"never did not appear within 0\.2 s"):
        wait_for_file(tmp_path / "never", timeout_s=0.2)
    assert 0.2 <= time.monotonic() - t0 < 1


# ---- fileio --------------------------------------------------------------------------------------

def test_atomic_writes_replace_the_file_and_leave_nothing_else(tmp_path):
    path = tmp_path / "f"
    atomic_write_bytes(path, b"old")
    assert atomic_write_text(path, "néw") == path
    assert path.read_bytes() == "néw".encode()
    atomic_write_json(path, {"a": [1, 2]}, indent=1)
    assert path.read_text() == json.dumps({"a": [1, 2]}, indent=1)
    assert os.listdir(tmp_path) == ["f"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f"
    atomic_write_bytes(path, b"old")

    def half(f):
        f.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]


def test_atomic_write_gets_the_permissions_open_would(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    atomic_write_bytes(tmp_path / "f", b"x")
    with open(tmp_path / "g", "wb"):
        pass
    assert (tmp_path / "f").stat().st_mode & 0o777 == (tmp_path / "g").stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_needs_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "missing" / "f", b"x")
    assert not Path(tmp_path / "missing").exists()

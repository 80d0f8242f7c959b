"""Fixtures that start real servers as real processes, with bounded waits and no leftovers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

from pserver.procs import stop_tree, wait_until as wait_for  # noqa: F401  (wait_for: the test modules import it from here)

# Workers and tests share 2 cores: keep TensorFlow and BLAS from oversubscribing them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "1")


class Server:
    def __init__(self, proc: subprocess.Popen, address: str, log_path: Path) -> None:
        self.proc = proc
        self.address = address
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def pserver(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Factory: start `pserver start ...` as a real process; returns once it is ready."""
    started: list[Server] = []

    def start(*args: str, timeout_s: float = 30.0) -> Server:
        ready = tmp_path / f"ready{len(started)}.json"
        log_path = tmp_path / f"pserver{len(started)}.log"
        cmd = [sys.executable, "-m", "runner.pserver_cli", "start", "--port", "0", "--ready-file", str(ready), *args]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        server = Server(proc, "", log_path)
        started.append(server)

        def is_ready():
            if proc.poll() is not None:
                raise AssertionError(f"pserver exited with {proc.returncode}:\n{server.log()}")
            return ready.is_file()

        wait_for(is_ready, timeout_s, "pserver to be ready")
        server.address = json.loads(ready.read_text())["address"]
        return server

    yield start
    for s in started:
        stop_tree(s.proc)


def fail_on_leftovers(exempt: set[int] = frozenset()) -> None:
    """Fail (after killing them) if child processes of the test runner are left, but those in ``exempt``."""
    left = [p for p in psutil.Process().children(recursive=True)
            if p.pid not in exempt and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    if left:
        for p in left:
            p.kill()
        psutil.wait_procs(left, timeout=5)
        pytest.fail(f"processes left behind: {[(p.pid, p.name()) for p in left]}")


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves child processes of the test runner behind."""
    yield
    fail_on_leftovers()


@pytest.fixture
def notpu_cli(capsys: pytest.CaptureFixture):
    """Run `notpu ARGS` in this process; returns (exit code, stderr)."""
    from runner.cli import main

    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        return code, capsys.readouterr().err

    return run

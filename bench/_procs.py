"""Real server processes for the benchmarks: started with a ready file, stopped with bounded waits.

Every process a benchmark starts is stopped by the same context manager that
started it (SIGTERM, then SIGKILL after a grace period, children included), so
a failing benchmark leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from pserver.layout import Layout
from pserver.procs import stop_tree

#: The talk's network (GRU 512 on 50 features), 2,447,562 float32, BatchNorm statistics included.
TALK_LAYOUT = Layout.from_shapes([
    (50,), (50,), (50,), (50,),              # BatchNorm: gamma, beta, moving mean, moving variance
    (50, 1536), (512, 1536), (2, 1536),      # GRU(512): kernel, recurrent kernel, biases (reset_after)
    (512,), (512,), (512,), (512,),
    (512, 1536), (512, 1536), (2, 1536),
    (512,), (512,), (512,), (512,),
    (512, 2), (2,),                          # Dense(2, softmax)
])
assert TALK_LAYOUT.total == 2_447_562, TALK_LAYOUT.total

QUICK = os.environ.get("NOTPU_BENCH_QUICK") == "1"


def _wait_file(path: Path, proc: subprocess.Popen, log_path: Path, timeout_s: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.02)
    raise RuntimeError(f"{what} was not ready within {timeout_s:g} s; see {log_path}")


@contextlib.contextmanager
def _process(cmd: list[str], ready: Path, log_path: Path, what: str, timeout_s: float,
             env: dict[str, str] | None = None) -> Iterator[dict]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        yield _wait_file(ready, proc, log_path, timeout_s, what)
    finally:
        stop_tree(proc)


@contextlib.contextmanager
def pserver(*args: str, workers: int = 1, timeout_s: float = 60.0, env: dict[str, str] | None = None,
            prefix: Sequence[str] = ()) -> Iterator[str]:
    """`pserver start --port 0 --ready-file F ...` as a real process; yields its address.

    ``prefix``: what runs it (`bench._netns.run_in`: in another network namespace)."""
    with tempfile.TemporaryDirectory(prefix="notpu-bench-") as tmp:
        ready = Path(tmp) / "ready.json"
        cmd = [*prefix, sys.executable, "-m", "runner.pserver_cli", "start", "--port", "0", "--ready-file", str(ready),
               "--workers", str(workers), *args]
        with _process(cmd, ready, Path(tmp) / "pserver.log", "pserver", timeout_s, env) as info:
            yield info["address"]


@contextlib.contextmanager
def echo_servers(count: int = 1, timeout_s: float = 30.0) -> Iterator[list[str]]:
    """`count` bare ROUTER echo processes (bench.echo_server); yields their endpoints."""
    with tempfile.TemporaryDirectory(prefix="notpu-echo-") as tmp, contextlib.ExitStack() as stack:
        endpoints = []
        for k in range(count):
            ready = Path(tmp) / f"echo{k}.json"
            cmd = [sys.executable, "-m", "bench.echo_server", "--ready-file", str(ready), "--parent", str(os.getpid())]
            info = stack.enter_context(_process(cmd, ready, Path(tmp) / f"echo{k}.log", "echo server", timeout_s))
            endpoints.append(info["endpoint"])
        yield endpoints


def read_history(path: Path) -> list[dict]:
    """A RUN's history.jsonl as a list of evaluations ([] if the run wrote none)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def keras_reference(data: Path, out: Path, *, threads: int, epochs: int, hidden: int, interval_s: float,
                    timeout_s: float) -> tuple[dict, list[dict]]:
    """`python -m bench.keras_run` (one plain Keras process, the reference) as a real process, bounded.

    Returns its summary.json and its history.jsonl, which ends with the final evaluation; the log is
    OUT.log beside OUT.
    """
    cmd = [sys.executable, "-m", "bench.keras_run", "--data", str(data), "--out", str(out), "--threads", str(threads),
           "--epochs", str(epochs), "--hidden", str(hidden), "--eval-interval-s", str(interval_s),
           "--started-at", str(time.time())]
    log_path = out.with_suffix(".log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout_s)
        finally:
            stop_tree(proc, grace_s=5)
    if proc.returncode != 0:
        raise RuntimeError(f"plain Keras run failed ({proc.returncode}): {log_path.read_text()[-2000:]}")
    return json.loads((out / "summary.json").read_text()), read_history(out / "history.jsonl")


def run_all(cmds: Sequence[list[str]], timeout_s: float, env: dict[str, str] | None = None) -> list[str]:
    """Run the commands concurrently to completion; returns their stdouts. Bounded: killed after timeout_s."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
             for c in cmds]
    outs: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        for p, c in zip(procs, cmds):
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            if p.returncode != 0:
                raise RuntimeError(f"{' '.join(c)} exited with {p.returncode}:\n{err.decode(errors='replace')[-3000:]}")
            outs.append(out.decode())
    finally:
        for p in procs:
            stop_tree(p, grace_s=2.0)
    return outs

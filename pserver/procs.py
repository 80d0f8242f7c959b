"""Stopping a process and everything it started, and waiting for a process to write a file.

`stop_tree` is what `pserver start` uses for its shard processes; tests,
benchmarks and `notpu train` can use it for theirs. Every wait is bounded.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Union

import psutil

from pserver.errors import ProcessExited, WaitTimeout

log = logging.getLogger(__name__)

__all__ = ["stop_tree", "stop_trees", "wait_for_file"]

#: A process to stop: a Popen we started (its exit status is kept), a psutil.Process, or a pid.
ProcOrPid = Union[subprocess.Popen, psutil.Process, int]


class _Root:
    """One process to stop, whichever way it was given."""

    def __init__(self, proc: ProcOrPid) -> None:
        self.popen = proc if isinstance(proc, subprocess.Popen) else None
        self.pid = proc if isinstance(proc, int) else proc.pid
        self.ps: psutil.Process | None = proc if isinstance(proc, psutil.Process) else None
        if self.popen is not None and self.popen.poll() is not None:
            return  # already reaped: its pid may belong to another process by now
        if self.ps is None:
            try:
                self.ps = psutil.Process(self.pid)
            except psutil.Error:
                pass

    def running(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            return self.ps is not None and self.ps.is_running() and self.ps.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def descendants(self) -> list[psutil.Process]:
        if self.ps is None or not self.running():
            return []
        try:
            return self.ps.children(recursive=True)
        except psutil.Error:
            return []

    def signal(self, sig: int) -> None:
        try:
            if self.popen is not None:
                self.popen.send_signal(sig)
            elif self.ps is not None:
                self.ps.send_signal(sig)
        except (psutil.Error, ProcessLookupError):
            pass

    def wait(self, timeout_s: float) -> bool:
        """True once it has exited (and, if it is our child, been reaped)."""
        if self.popen is not None:
            try:
                self.popen.wait(max(timeout_s, 0.0))
                return True
            except subprocess.TimeoutExpired:
                return False
        if self.ps is None:
            return True
        if _wait_gone([self.ps], time.monotonic() + timeout_s):
            return False
        try:
            self.ps.wait(0)  # reap it, if it is a child of ours
        except psutil.Error:
            pass
        return True


def stop_tree(proc: ProcOrPid, grace_s: float = 10.0, sig: int = signal.SIGTERM, kill_wait_s: float = 5.0) -> None:
    """Stop a process: `sig` (SIGTERM) to it, then SIGKILL to it and to every process it had started
    that is still there after ``grace_s``. Returns within about ``grace_s + kill_wait_s``."""
    stop_trees([proc], grace_s, sig, kill_wait_s)


def stop_trees(procs: Iterable[ProcOrPid], grace_s: float = 10.0, sig: int = signal.SIGTERM,
               kill_wait_s: float = 5.0) -> None:
    """`stop_tree` for several processes at once: one grace period for all of them."""
    roots = [_Root(p) for p in procs]
    family = {p.pid: p for r in roots for p in r.descendants()}  # found now: they are reparented if the root exits
    for r in roots:
        if r.running():
            r.signal(sig)
    deadline = time.monotonic() + grace_s
    left = []
    for r in roots:
        if not r.wait(deadline - time.monotonic()):
            log.warning("process %d ignored %s for %.0f s; killing it", r.pid, _name(sig), grace_s)
            family.update((p.pid, p) for p in r.descendants())
            left.append(r)
    alive = _wait_gone(list(family.values()), deadline)
    for r in left:
        r.signal(signal.SIGKILL)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    kill_deadline = time.monotonic() + kill_wait_s
    for r in left:
        if not r.wait(kill_deadline - time.monotonic()):
            log.error("process %d survived SIGKILL for %.0f s", r.pid, kill_wait_s)
    for p in _wait_gone(alive, kill_deadline):
        log.error("process %d survived SIGKILL for %.0f s", p.pid, kill_wait_s)


def _name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _gone(p: psutil.Process) -> bool:
    """Exited: a zombie counts, as another process (its parent, or init for an orphan) reaps it."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _wait_gone(procs: list[psutil.Process], deadline: float, interval_s: float = 0.02) -> list[psutil.Process]:
    """Wait until every process has exited or ``deadline`` (monotonic) passes; returns those still there."""
    alive = [p for p in procs if not _gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(min(interval_s, max(deadline - time.monotonic(), 0.0)))
        alive = [p for p in alive if not _gone(p)]
    return alive


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll ``predicate()`` until it returns a true value, which is returned; WaitTimeout naming ``what``
    after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(min(interval_s, left))


def wait_for_file(path: str | Path, timeout_s: float, alive: Callable[[], bool] | None = None,
                  interval_s: float = 0.05) -> Path:
    """Wait until ``path`` exists (write it with `pserver.fileio`, so that it is complete once it does).

    ``alive()``, if given, says whether the process that should write it is
    still running: ProcessExited as soon as it is not (and the file is still
    missing). WaitTimeout after ``timeout_s``.
    """
    path = Path(path)
    deadline = time.monotonic() + timeout_s
    while True:
        gone = alive is not None and not alive()  # asked first: a process that wrote the file and exited is fine
        if path.exists():
            return path
        if gone:
            raise ProcessExited(f"the process that should write {path} exited before it did")
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"{path} did not appear within {timeout_s:g} s")
        time.sleep(min(interval_s, left))

"""Stopping a process together with everything it started: `pserver.procs.stop_tree`, the one
process-tree stop, under the name and argument order that `bench/` still calls."""
from __future__ import annotations

import signal
import subprocess

from pserver.procs import stop_tree

__all__ = ["kill_tree"]


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
    """`stop_tree(proc, grace_s, sig)`: `sig` to the process, SIGKILL to it and its descendants
    still there after ``grace_s``."""
    stop_tree(proc, grace_s=grace_s, sig=sig)

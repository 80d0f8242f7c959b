"""Stopping a process together with everything it started."""
from __future__ import annotations

import signal
import subprocess

import psutil


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
    """Send `sig` to a process; SIGKILL it and its descendants if any is left after the grace period."""
    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    if proc.poll() is None:
        proc.send_signal(sig)
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=5)
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)

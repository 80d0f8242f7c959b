"""Giving freed heap memory back to the OS: what a server process calls between requests.

ZeroMQ allocates each connection's pipes and encoder/decoder buffers from glibc's heap, mostly in its
I/O thread's arena. When the connections close, ZeroMQ frees all of it, but glibc keeps freed chunks in
the middle of an arena for reuse, and a new round of connections is not laid out where the old one was:
a server's heap grows with every burst of connections and keeps what it grew, until ``malloc_trim(0)``
hands it back. `HeapTrimmer` calls it every ``every_s``: what a burst of connections cost is back with
the OS within that time after they close.

``malloc_trim`` walks the arenas' free chunks and gives their whole pages back; the next allocation that
lands there takes a page fault. A trim costs milliseconds: once every few seconds, noise next to a
server's requests (the figures: bench/RESULTS.md, "Why the defaults are what they are").
Elsewhere than glibc (musl, macOS) there is no ``malloc_trim`` and this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from typing import Callable

log = logging.getLogger(__name__)

#: How often a server process hands freed heap pages back: the bound on how long memory freed by closed
#: connections stays with the process; short enough that a burst of them costs memory only while open.
TRIM_EVERY_S = 5.0

#: A trim that gives back at least this much is logged (at INFO): a burst of connections has closed.
TRIM_LOG_BYTES = 32 << 20


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def rss_bytes() -> int:
    """This process's resident set (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` at most every ``every_s`` (`tick` from a server's loop)."""

    def __init__(self, every_s: float = TRIM_EVERY_S, name: str = "") -> None:
        self.every_s = every_s
        self.name = name
        self.trims = 0
        self.returned_bytes = 0  # RSS the trims gave back, summed
        self._trim = _malloc_trim()
        self.due = time.monotonic() + every_s  # monotonic time of the next trim

    @property
    def available(self) -> bool:
        """False where there is no ``malloc_trim`` (not glibc): `tick` does nothing there."""
        return self._trim is not None

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._trim is None or now < self.due:
            return
        self.due = now + self.every_s
        before = rss_bytes()
        self._trim(0)
        returned = max(before - rss_bytes(), 0)
        self.trims += 1
        self.returned_bytes += returned
        if returned >= TRIM_LOG_BYTES:
            log.info("%s gave %.0f MiB of freed heap back to the OS (closed connections' buffers)",
                     self.name or "this process", returned / 2**20)

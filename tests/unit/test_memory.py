"""HeapTrimmer: freed heap pages go back to the OS, at most once every ``every_s``."""
import ctypes
import ctypes.util

import pytest

from pserver.memory import HeapTrimmer, rss_bytes

pytestmark = pytest.mark.skipif(not HeapTrimmer().available or not rss_bytes(), reason="needs glibc's malloc_trim and /proc")


def test_a_tick_gives_freed_chunks_back_and_waits_its_interval():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    trimmer = HeapTrimmer(every_s=10.0)
    chunks = []
    for _ in range(4000):  # 80 MiB of 20 KiB chunks, as a burst of connections' buffers: below the mmap threshold
        p = libc.malloc(20 << 10)
        ctypes.memset(p, 1, 20 << 10)  # touched: resident
        chunks.append(p)
    pinned = chunks.pop()  # the top chunk stays: glibc cannot shrink the heap from its end
    for p in chunks:
        libc.free(p)
    held = rss_bytes()
    trimmer.tick(now=trimmer.due - 1)  # before its interval: nothing
    assert trimmer.trims == 0
    trimmer.tick(now=trimmer.due)
    assert trimmer.trims == 1 and trimmer.returned_bytes > 40 << 20, (held, rss_bytes())
    libc.free(pinned)

"""Shared-memory segments for a worker on the same host as a shard.

A co-located worker and shard exchange arrays through memory both map, and
ZeroMQ carries only the headers (`pserver.protocol`, SHM). Two kinds of
segment, both files in /dev/shm that the *shard* creates, so that every name
carries the pid of the process that must remove it:

    notpu-<shard pid>-s<index>-centre          the centre, double-buffered
    notpu-<shard pid>-s<index>-w<worker>-<hex>  one worker's push (in) and reply (out) areas

Each starts with a 64-byte header of eight little-endian uint64 words::

    0 magic   MAGIC
    1 token   random, returned in the SHM reply: a worker that mapped another
              file of the same name (another host's /dev/shm) sees it differ
    2 n       floats per buffer
    3 active  the buffer (0 or 1) that holds the centre            (centre only)
    4, 5      seq of buffer 0, 1: odd while the shard writes it    (centre only)
    6, 7      the version buffer 0, 1 holds                        (centre only)

then two buffers of n float32, each at a 64-byte aligned offset.

Consistent reads (a seqlock per buffer). The shard writes the next centre
only into the buffer that is not active: seq odd, write, version, seq even,
then ``active`` flips. A reader takes ``active``, its seq (even), copies,
and reads the seq again; equal means no write touched the buffer meanwhile,
else it tries again. x86-64 keeps stores in order and loads in order, which is
all this needs; the ZeroMQ round trip around each exchange is a full barrier.

Clean-up. A worker's push segment is unlinked by the worker once it has mapped
it (it lives on in both mappings, and vanishes with the last of them); the
centre's is unlinked when the shard closes. A process killed before that
leaves a name with a dead pid, which `remove_stale` (called when a shard
starts) removes. A crashed worker leaves no state: the shard reads a push area
only when the worker's PUSH header has arrived, checks what it applies as it
does for a frame, and its centre is written by the shard alone.
"""
from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import socket
from functools import lru_cache
from typing import Any, Iterable

import numpy as np

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "notpu-"
MAGIC = 0x4E4F545055534831  # "NOTPUSH1"
HEADER_BYTES = 64
#: Times a reader copies a buffer the shard rewrote meanwhile before it asks over ZeroMQ instead.
READ_ATTEMPTS = 8

_NAME = re.compile(r"^notpu-(\d+)-s\d+-(centre|w\d+-[0-9a-f]+)$")


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def _offsets(n: int) -> tuple[int, int, int]:
    """(buffer 0, buffer 1, file size) in bytes for buffers of n float32."""
    step = (n * 4 + 63) // 64 * 64
    return HEADER_BYTES, HEADER_BYTES + step, HEADER_BYTES + 2 * step


class Segment:
    """One mapped segment: its header words (8,) uint64 and its two buffers (n,) float32."""

    def __init__(self, name: str, mm: mmap.mmap, n: int) -> None:
        self.name = name
        self.n = n
        self._mm = mm
        a, b, _ = _offsets(n)
        self.header = np.frombuffer(mm, np.uint64, 8, 0)  # (8,)
        self.buffers = (np.frombuffer(mm, np.float32, n, a), np.frombuffer(mm, np.float32, n, b))  # 2 × (n,)

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @property
    def token(self) -> int:
        return int(self.header[1])

    @classmethod
    def create(cls, name: str, n: int) -> "Segment":
        """A new segment file (mode 0600, refused if the name exists), mapped, its header written.

        Its pages are reserved now (posix_fallocate): a full /dev/shm (a container's default is 64 MiB) is an
        OSError here, and the worker goes on over ZeroMQ, instead of a SIGBUS at the first write past the end.
        """
        size = _offsets(n)[2]
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            _unlink(name)
            raise
        os.close(fd)
        seg = cls(name, mm, n)
        seg.header[:] = 0
        seg.header[0], seg.header[1], seg.header[2] = MAGIC, secrets.randbits(63), n
        return seg

    @classmethod
    def open(cls, name: str, n: int, token: int) -> "Segment":
        """Map an existing segment; ValueError unless it is the one the shard announced (name, size, token)."""
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not a notpu segment name")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size != _offsets(n)[2]:
                raise ValueError(f"segment {name} holds {size} bytes, {n} floats need {_offsets(n)[2]}")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        seg = cls(name, mm, n)
        if int(seg.header[0]) != MAGIC or int(seg.header[2]) != n or seg.token != token:
            seg.close()
            raise ValueError(f"segment {name} is not the one announced (another host's, or a stale one)")
        return seg

    def unlink(self) -> None:
        _unlink(self.name)

    def close(self) -> None:
        """Unmap (views on the buffers must be gone; the arrays handed out are copies)."""
        self.header = None  # type: ignore[assignment]
        self.buffers = ()  # type: ignore[assignment]
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass


class CentreSegment(Segment):
    """The shard's centre, double-buffered; the shard writes, workers read (`read`)."""

    def writable(self) -> np.ndarray:
        """The buffer that is not active, marked as being written (seq odd)."""
        b = 1 - int(self.header[3])
        self.header[4 + b] += 1
        return self.buffers[b]

    def publish(self, version: int) -> None:
        """The buffer `writable` returned becomes the centre at ``version``."""
        b = 1 - int(self.header[3])
        self.header[6 + b] = version
        self.header[4 + b] += 1
        self.header[3] = b

    def abandon(self) -> None:
        """The buffer `writable` returned is not published (a refused update); readers never read it."""
        self.header[4 + 1 - int(self.header[3])] += 1

    @property
    def current(self) -> np.ndarray:
        return self.buffers[int(self.header[3])]

    def read(self, out: np.ndarray) -> int | None:
        """Copy the centre into ``out`` (n,); its version, or None if the shard kept rewriting it."""
        h = self.header
        for _ in range(READ_ATTEMPTS):
            b = int(h[3])
            seq = int(h[4 + b])
            if seq & 1:
                continue
            version = int(h[6 + b])
            np.copyto(out, self.buffers[b])
            if int(h[4 + b]) == seq:
                return version
        return None


class ShardSegments:
    """A shard's side of shared memory: the centre's segment (made at the first SHM) and one push segment per
    co-located worker; every name it created is removed at `close` if still there."""

    def __init__(self, index: int) -> None:
        self.index = index
        self._push: dict[int, Segment] = {}  # worker -> its push segment
        self._names: list[str] = []  # names this shard created

    def grant(self, worker: int, centre: "Any", version: int) -> Segment:
        """A new push segment for ``worker`` (the centre shared first if it is not yet); a segment it had is
        never mapped again. OSError if a segment cannot be made."""
        if centre.segment is None:
            shared = CentreSegment.create(centre_name(self.index), centre.size)
            self._names.append(shared.name)
            centre.share(shared, version)
        segment = Segment.create(push_name(self.index, worker), centre.size)
        self._names.append(segment.name)
        old = self._push.pop(worker, None)
        if old is not None:  # asked again (its reply was lost, or it restarted)
            old.unlink()
            self._names.remove(old.name)
            old.close()
        self._push[worker] = segment
        return segment

    def find(self, worker: int, token: int) -> Segment | None:
        """The worker's push segment if its token is ``token``; None if it has none or another."""
        segment = self._push.get(worker)
        return segment if segment is not None and segment.token == token else None

    def drop(self, worker: int) -> None:
        """The worker left: unmap its push segment."""
        segment = self._push.pop(worker, None)
        if segment is not None:
            segment.close()

    def close(self) -> None:
        for segment in self._push.values():
            segment.close()
        self._push.clear()
        for name in self._names:
            _unlink(name)
        self._names.clear()


def centre_name(index: int) -> str:
    return f"{PREFIX}{os.getpid()}-s{index}-centre"


def push_name(index: int, worker: int) -> str:
    return f"{PREFIX}{os.getpid()}-s{index}-w{worker}-{secrets.token_hex(4)}"


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs: a zombie (killed, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def ours(pids: Iterable[int] | None = None) -> list[str]:
    """Names of notpu segments in /dev/shm (of these pids' only, if given)."""
    if not available():
        return []
    wanted = None if pids is None else {int(p) for p in pids}
    found = []
    for name in os.listdir(SHM_DIR):
        m = _NAME.match(name)
        if m and (wanted is None or int(m.group(1)) in wanted):
            found.append(name)
    return sorted(found)


def wait_gone(pids: Iterable[int] | None = None, timeout_s: float = 10.0) -> list[str]:
    """Wait (bounded) until no notpu segment (of these pids) is left; those still there at the end."""
    import time

    deadline = time.monotonic() + timeout_s
    while (left := ours(pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def remove_stale() -> list[str]:
    """Remove the segments whose creating process is gone (a shard killed before it could); their names."""
    removed = [name for name in ours() if not _alive(int(_NAME.match(name).group(1)))]  # type: ignore[union-attr]
    for name in removed:
        _unlink(name)
    if removed:
        log.info("removed %d shared-memory segment(s) left by processes that are gone: %s", len(removed),
                 ", ".join(removed))
    return removed


@lru_cache(maxsize=64)
def is_local(host: str) -> bool:
    """Whether ``host`` names this machine: a loopback name or address, or one of this host's own."""
    if host in ("localhost", "::1") or host.startswith("127."):
        return True
    try:
        mine = {socket.gethostname(), socket.getfqdn()}
        if host in mine:
            return True
        addresses = {a[4][0] for name in mine for a in socket.getaddrinfo(name, None)}
        theirs = {a[4][0] for a in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses & theirs)

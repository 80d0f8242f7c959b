"""A shard's slice of the centre, double-buffered for zero-copy replies.

Pull replies are sent with ``copy=False``: ZeroMQ's I/O thread reads the
buffer after ``send`` returns. Mutating that buffer in place would let a reply
carry half-old, half-new weights. So the centre is never written in place:
kernels write the next centre into a scratch buffer, which becomes current
when the update passes its check, and a buffer returns to the pool only when
every send that referenced it has completed (its MessageTrackers are done).

Shared (`share`): once a worker on the same host attached, the centre lives in
a `pserver.shm.CentreSegment` instead, whose two buffers take turns as the
centre and the scratch; readers check a per-buffer sequence number, so no
pool is needed, and a buffer that is rewritten two updates later must never be
sent zero-copy (`shared` tells the shard to send a copy).
"""
from __future__ import annotations

import numpy as np
import zmq

from pserver.shm import CentreSegment

#: Buffers kept for reuse; more are allocated only while sends are in flight.
POOL_SIZE = 3


class Centre:
    def __init__(self, initial: np.ndarray) -> None:
        self.current = np.array(initial, dtype=np.float32, copy=True)  # (n,)
        self._sends: list[zmq.MessageTracker] = []  # zero-copy sends of `current`
        self._pool: list[tuple[np.ndarray, list[zmq.MessageTracker]]] = []
        self.segment: CentreSegment | None = None

    @property
    def shared(self) -> bool:
        return self.segment is not None

    def share(self, segment: CentreSegment, version: int) -> None:
        """Keep the centre in ``segment`` from now on, starting with the current one at ``version``."""
        np.copyto(segment.writable(), self.current)
        segment.publish(version)
        self.segment = segment
        self.current = segment.current
        self._pool, self._sends = [], []  # ZeroMQ holds its own references to buffers still being sent

    @property
    def size(self) -> int:
        return int(self.current.shape[0])

    def scratch(self) -> np.ndarray:
        """A buffer no pending send refers to (no reader is reading), to write the candidate centre into."""
        if self.segment is not None:
            return self.segment.writable()
        for i, (buf, sends) in enumerate(self._pool):
            if all(t.done for t in sends):
                del self._pool[i]
                return buf
        return np.empty_like(self.current)

    def commit(self, buf: np.ndarray, version: int) -> None:
        """Make ``buf`` (from `scratch`) the centre at ``version``; the old one waits in the pool for its sends."""
        if self.segment is not None:
            self.segment.publish(version)
            self.current = self.segment.current
            return
        old, old_sends = self.current, self._sends
        self.current, self._sends = buf, []
        self._give_back(old, old_sends)

    def discard(self, buf: np.ndarray) -> None:
        """Return an unused scratch buffer (a refused update)."""
        if self.segment is not None:
            self.segment.abandon()
            return
        self._give_back(buf, [])

    def replace(self, values: np.ndarray, version: int) -> None:
        """Set the centre to a copy of ``values`` at ``version``."""
        buf = self.scratch()
        np.copyto(buf, values)
        self.commit(buf, version)

    def track(self, tracker: zmq.MessageTracker | None) -> None:
        """Record a zero-copy send of the current buffer."""
        if tracker is None or self.segment is not None:
            return
        if len(self._sends) > 8:
            self._sends = [t for t in self._sends if not t.done]
        self._sends.append(tracker)

    def _give_back(self, buf: np.ndarray, sends: list[zmq.MessageTracker]) -> None:
        if len(self._pool) < POOL_SIZE:
            self._pool.append((buf, sends))
        # else: drop it; ZeroMQ holds its own reference until the send completes

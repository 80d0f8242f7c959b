"""What `pserver start` does around the coordinator's loop besides answering
requests: restart dead shards from their checkpoints, and tell shards which
workers the coordinator has declared lost or done. (The coordinator's own
checkpoints are `pserver.checkpoint.CoordinatorCheckpointer`'s.)

All of it runs in the server process, between two polls of the coordinator's
socket, and never blocks: messages to shards are fire-and-forget on DEALERs
whose replies are drained and dropped.
"""
from __future__ import annotations

import logging
import subprocess
import time
from typing import Callable

import zmq

from pserver import protocol
from pserver.coordinator import Coordinator

log = logging.getLogger(__name__)


# ---- shard processes ---------------------------------------------------------

class ShardWatch:
    """Notices shard processes that died; restarts them from their checkpoint on the same port."""

    def __init__(self, coord: Coordinator, procs: list[subprocess.Popen],
                 respawn: Callable[[int, int], subprocess.Popen] | None, max_restarts: int = 20) -> None:
        self.coord = coord
        self.procs = procs
        self.respawn = respawn  # (index, port) -> process; None: checkpoints are off, no restart
        self.max_restarts = max_restarts
        self.restarts: dict[int, int] = {}
        self.reported: set[int] = set()
        self.restarted_at: dict[int, float] = {}

    def check(self) -> None:
        for k, p in enumerate(self.procs):
            if p.poll() is None or k in self.reported:
                continue
            endpoint = self.coord.endpoints.get(k, "")
            if self.respawn is None or not endpoint or self.restarts.get(k, 0) >= self.max_restarts:
                self.reported.add(k)
                log.error("shard %d (pid %d) exited with code %s; workers will wait for it to come back at %s",
                          k, p.pid, p.returncode, endpoint or "(never registered)")
                continue
            port = int(endpoint.rsplit(":", 1)[1])
            self.restarts[k] = self.restarts.get(k, 0) + 1
            log.warning("shard %d (pid %d) exited with code %s; restarting it from its checkpoint on port %d "
                        "(restart %d)", k, p.pid, p.returncode, port, self.restarts[k])
            self.procs[k] = self.respawn(k, port)
            self.restarted_at[k] = time.monotonic()


# ---- liveness, told to the shards ------------------------------------------

class LivenessNotifier:
    """Sends LOST {lost, done} to every shard when the coordinator's view changes, and
    again every ``repeat_s`` while anyone is lost or done (a restarted shard learns it too)."""

    def __init__(self, coord: Coordinator, curve: dict[str, bytes] | None, repeat_s: float = 2.0) -> None:
        self.coord = coord
        self.curve = curve
        self.repeat_s = repeat_s
        self._sockets: dict[str, zmq.Socket] = {}
        self._sent: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        self._sent_at = 0.0

    def _socket(self, endpoint: str) -> zmq.Socket:
        s = self._sockets.get(endpoint)
        if s is None:
            s = self.coord.socket.context.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 16)  # a dead shard must not queue LOSTs without bound
            if self.curve:
                s.curve_secretkey = self.curve["secret"]
                s.curve_publickey = self.curve["public"]
                s.curve_serverkey = self.curve["server"]
            s.connect(f"tcp://{endpoint}")
            self._sockets[endpoint] = s
        return s

    def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        workers = self.coord.workers.values()
        state = (tuple(sorted(w.rank for w in workers if w.lost)), tuple(sorted(w.rank for w in workers if w.done)))
        for s in self._sockets.values():  # replies carry nothing we need
            while s.poll(0):
                s.recv_multipart()
        if state == self._sent and (not any(state) or now - self._sent_at < self.repeat_s):
            return
        frames = protocol.encode(self.coord.signed_lost(list(state[0]), list(state[1])))
        for endpoint in self.coord.endpoints.values():
            try:
                self._socket(endpoint).send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                log.debug("LOST not sent to %s: its queue is full", endpoint)
        if state != self._sent:
            log.info("told %d shard(s): lost %s, done %s", len(self.coord.endpoints), list(state[0]), list(state[1]))
        self._sent, self._sent_at = state, now

    def close(self) -> None:
        for s in self._sockets.values():
            s.close(linger=0)
        self._sockets.clear()

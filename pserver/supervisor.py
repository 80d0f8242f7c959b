"""What `pserver start` does around the coordinator's loop: persist and restore the
coordinator's state, restart dead shards from their checkpoints, and tell shards
which workers the coordinator has declared lost or done.

All of it runs in the server process, between two polls of the coordinator's
socket, and never blocks: messages to shards are fire-and-forget on DEALERs
whose replies are drained and dropped.
"""
from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from pserver import checkpoint, protocol
from pserver.coordinator import Coordinator
from pserver.errors import CheckpointError

log = logging.getLogger(__name__)


# ---- the coordinator's state, on disk -----------------------------------------

class CoordinatorCheckpointer:
    """Writes the coordinator's state (`Coordinator.snapshot`) to ``directory/coordinator.json``: at once when
    a reply reports a decision (`Coordinator.on_change`, which this installs), and from `tick` every
    ``every_s`` seconds if anything else changed (heartbeat counts, lost workers, observers). Each write is
    a few milliseconds (one fsynced JSON file); decisions come a few per worker per run."""

    def __init__(self, coord: Coordinator, directory: str | Path, every_s: float) -> None:
        self.coord = coord
        self.directory = Path(directory)
        self.every_s = every_s
        self._saved: dict[str, Any] | None = None
        self._last = time.monotonic()
        self._failing = False
        coord.on_change = self.save

    def restored(self) -> None:
        """The coordinator was just restored from this directory: its state is on disk already, and what
        changes from now on (the shards registering again, heartbeats) is written every ``every_s``."""
        self._saved = self.coord.snapshot()

    def save(self) -> Path | None:
        """Write the state if it changed since the last write; the path written, or None (unchanged, or not
        written: a warning, counted in the coordinator's summary, `checkpoint`, and tried again at the next
        interval; the run goes on, the file on disk is the last one written)."""
        self._last = time.monotonic()
        state = self.coord.snapshot()
        if state == self._saved:
            return None
        status = self.coord.checkpoint_status
        try:
            path = checkpoint.save_coordinator(self.directory, state)
        except OSError as exc:
            status["failures"] += 1
            status["error"] = f"{type(exc).__name__}: {exc}"
            self._failing = True
            log.warning("coordinator: checkpoint not written (%s); the run goes on, trying again in %g s",
                        status["error"], self.every_s)
            return None
        self._saved = state
        status["ok_at"] = time.time()
        if self._failing:
            self._failing = False
            log.warning("coordinator: checkpoints written again after %d failure(s)", status["failures"])
        return path

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if (self._saved is not None or self._failing) and self.every_s > 0 and now - self._last >= self.every_s:
            self.save()  # after the first decision only: before it there is nothing a restart would miss


def restore_coordinator(coord: Coordinator, state: dict[str, Any], directory: str | Path) -> None:
    """`Coordinator.restore`, its refusal a CheckpointError naming the file and what to do."""
    path = Path(directory) / checkpoint.COORDINATOR_FILE
    try:
        coord.restore(state)
    except ValueError as exc:
        raise CheckpointError(f"{path} cannot be restored by this server: {exc}; start with the options the run "
                              f"was started with (its run config is the file's state.run), or restore from a "
                              f"complete copy of {directory}") from None
    log.info("restored the coordinator from %s", path)


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

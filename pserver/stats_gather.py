"""How the coordinator gathers every shard's stats for a STATS without blocking its loop."""
from __future__ import annotations

import secrets
from typing import Any

import zmq

from pserver import protocol
from pserver.client import dealer
from pserver.errors import ProtocolError, RemoteError

#: STATS requesters that may wait at once for the next gather; more are answered at once from the last one.
#: Each is an identity of some bytes: the bound only stops a flood of fresh clients from growing the list.
MAX_WAITING_STATS = 1024


class ShardStatsGather:
    """The shards' stats for the coordinator's STATS, gathered without ever blocking its loop.

    The coordinator has one thread: a shard that is dead, stopped or slow must not hold up a restarted
    shard's REGISTER or the workers' heartbeats behind it. So a STATS is not answered when it arrives:
    its requester's identity waits (`ask`); a gather sends one STATS to every shard, each on a DEALER
    of its own, without blocking; the coordinator polls those DEALERs with its own socket and calls
    `step`, which hands back the requesters and the shards' entries once every shard has answered or
    ``timeout_s`` has passed (a shard that has not is an entry with an ``error``, as before). Requesters
    that arrive during a gather wait for the next one, so no reply holds stats older than its request;
    and however many ask at once, each shard has one STATS in flight.

    A DEALER whose shard did not answer in time is closed (the Lazy Pirate pattern): its late reply
    must not pass for the next gather's.
    """

    def __init__(self, context: zmq.Context, timeout_s: float, curve: dict[str, bytes] | None = None,
                 limit: int = MAX_WAITING_STATS) -> None:
        self.context = context
        self.timeout_s = timeout_s
        self.curve = curve
        self.limit = limit
        self.waiting: list[bytes] = []  # identities for the next gather
        self.last: list[dict[str, Any]] = []  # the last gather's entries, for requesters over the limit
        self.gathers = 0
        self._round: list[bytes] = []  # identities the gather in flight answers
        self._sockets: dict[int, tuple[str, zmq.Socket]] = {}  # shard -> (endpoint, DEALER)
        self._asked: dict[int, str] = {}  # shard -> endpoint, asked and not yet answered
        self._entries: dict[int, dict[str, Any]] = {}
        self._deadline = 0.0
        self._rid = [secrets.randbits(63), 0]

    def ask(self, identity: bytes) -> bool:
        """Queue a requester for the next gather; False if `limit` already wait (answer it from `last`)."""
        if len(self.waiting) >= self.limit:
            return False
        self.waiting.append(identity)
        return True

    def sockets(self) -> list[zmq.Socket]:
        """The DEALERs a reply may arrive on: poll them for POLLIN with the coordinator's socket."""
        return [self._sockets[k][1] for k in self._asked]

    def wait_s(self, now: float) -> float | None:
        """How long the loop may sleep before `step` has something to do (None: until a request comes)."""
        if self._round:
            return max(self._deadline - now, 0.0)
        return 0.0 if self.waiting else None

    def step(self, endpoints: dict[int, str], now: float) -> tuple[list[bytes], list[dict[str, Any]]] | None:
        """Take the shards' replies that came; (requesters, entries in shard order) when a gather is complete.
        Starts the next gather for whoever waits. Never blocks."""
        if not self._round:
            if not self.waiting:
                return None
            self._start(endpoints, now)
        for k, endpoint in list(self._asked.items()):
            try:
                frames = self._sockets[k][1].recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            del self._asked[k]
            self._entries[k] = self._entry(k, endpoint, frames)
        if self._asked and now < self._deadline:
            return None
        for k, endpoint in self._asked.items():
            self._drop(k)
            self._entries[k] = {"shard": k, "endpoint": endpoint,
                                "error": f"no reply to STATS from {endpoint} within {self.timeout_s:g} s; the shard "
                                         f"may be down, stopped or restarting"}
        done = self._round, [self._entries[k] for k in sorted(self._entries)]
        self._round, self._asked, self._entries = [], {}, {}
        self.last = done[1]
        self.gathers += 1
        return done

    def close(self) -> None:
        for k in list(self._sockets):
            self._drop(k)

    def _start(self, endpoints: dict[int, str], now: float) -> None:
        self._round, self.waiting = self.waiting, []
        self._deadline = now + self.timeout_s
        for k, endpoint in sorted(endpoints.items()):
            self._rid[1] += 1
            try:
                self._socket(k, endpoint).send_multipart(protocol.encode({"op": "STATS", "rid": list(self._rid)}),
                                                         zmq.NOBLOCK)
            except zmq.Again:  # no connection to queue it on (a CURVE handshake refused): as unanswered
                pass
            self._asked[k] = endpoint

    def _entry(self, k: int, endpoint: str, frames: list[Any]) -> dict[str, Any]:
        try:
            header = protocol.decode(frames).header
        except ProtocolError as exc:
            return {"shard": k, "endpoint": endpoint, "error": f"STATS reply from {endpoint} unreadable: {exc}"}
        if header.get("ok") is not True or not isinstance(header.get("stats"), dict):
            return {"shard": k, "endpoint": endpoint,
                    "error": str(RemoteError(endpoint, "STATS", str(header.get("code")), str(header.get("reason"))))}
        return header["stats"]

    def _socket(self, k: int, endpoint: str) -> zmq.Socket:
        known = self._sockets.get(k)
        if known is not None and known[0] == endpoint:
            return known[1]
        self._drop(k)  # a shard that moved (registered anew elsewhere) is asked at its new endpoint
        s = dealer(self.context, endpoint, self.curve)
        self._sockets[k] = (endpoint, s)
        return s

    def _drop(self, k: int) -> None:
        known = self._sockets.pop(k, None)
        if known is not None:
            known[1].close(linger=0)

"""The client: how workers, tests and benchmarks talk to a parameter server.

One DEALER per shard, so a pull or a push goes to every shard at once and the
replies are gathered with one poll. Every receive has a timeout. A request
that times out is retried on a fresh socket (the old one may hold a reply that
will never come, or a request that will never leave), with exponential
back-off, up to `retries` times, and for at least `ClientConfig.server_wait_s`
seconds in all: a server restarted with `pserver start --restore` on the
same address (and its shards on their old ports) answers the retry.

A retry must have the effect, and get the answer, of the request it
repeats; how each op ensures it:

- A `Client` picks a random 63-bit id and numbers its requests; every request
  to the coordinator, and every INIT to a shard, carries ``rid`` [id, n],
  kept across the retries of that request. The coordinator answers a retried
  JOIN with the same rank and a retried INIT with the same ``first`` (from a
  bounded memory, `pserver.coordinator.ReplyMemory`); a shard answers a
  retried first INIT as the first. `request` gives its one request a rid too.
- Pushes and rounds carry a per-worker sequence number; a shard applies each
  seq at most once and answers its retries. A retried ROUND is re-addressed
  while its round is open and answered with the closed round's reply after.
- The other ops are idempotent as they are (see `pserver.coordinator` and
  `pserver.shard`).

A request that carries no rid (an older client, a hand-made one) is served
as before: without memory, its retried JOIN would take another rank.
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import zmq

from pserver import precision, protocol, shm, shm_reply
from pserver.errors import ProtocolError, RemoteError, ServerUnreachable
from pserver.layout import Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientConfig:
    timeout_s: float = 10.0  # one attempt's wait for a reply
    retries: int = 5  # further attempts after the first
    backoff_s: float = 0.25  # first back-off; doubles each retry
    max_backoff_s: float = 5.0
    not_ready_wait_s: float = 120.0  # how long to wait for the first worker's INIT to reach the shards
    # Keep re-sending a request that gets no reply for at least this long in all, even past `retries`: a whole
    # server lost and restarted with `pserver start --restore` answers again on the same address. 0: `retries`
    # alone bounds the wait. Programs that must outlive a restart set it (`runner.worker.WorkerConfig`).
    server_wait_s: float = 0.0
    # A worker (a client with a rank) reaches a shard on its own host through shared memory (`pserver.shm`):
    # ZeroMQ carries the headers only. Same host: the shard's endpoint names a loopback or local address; a
    # wrong guess costs one SHM request, as the segments' tokens must match. False: arrays always travel as frames.
    shared_memory: bool = True
    # The form of pushes and pulled centres between this worker and shards it reaches over ZeroMQ: "float32",
    # or "float16"/"bfloat16" (half the bytes; the worker keeps the rounding residual and adds it to its next
    # push, `pserver.precision`). The centre stays float32 at the shards; shared memory is always float32.
    wire: str = "float32"

    def __post_init__(self) -> None:
        precision.check(self.wire)


def _tcp(endpoint: str) -> str:
    return endpoint if "://" in endpoint else f"tcp://{endpoint}"


def dealer(context: zmq.Context, endpoint: str, curve: dict[str, bytes] | None) -> zmq.Socket:
    """A DEALER connected to `endpoint` (host:port or a URL), with CurveZMQ keys when `curve` has them."""
    s = context.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if curve:
        s.curve_secretkey = curve["secret"]
        s.curve_publickey = curve["public"]
        s.curve_serverkey = curve["server"]
    s.connect(_tcp(endpoint))
    return s


class _Peer:
    """One DEALER to one endpoint, re-created after a timeout (the Lazy Pirate pattern)."""

    def __init__(self, context: zmq.Context, endpoint: str, curve: dict[str, bytes] | None = None) -> None:
        self.context = context
        self.endpoint = endpoint
        self.curve = curve
        self.socket: zmq.Socket | None = None
        self.retries = 0  # requests re-sent to this endpoint (on a fresh socket) after a timeout
        self.connect()

    def connect(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
        self.socket = dealer(self.context, self.endpoint, self.curve)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None


def fan_out(peers: Sequence[_Peer], requests: Sequence[list[Any]], config: ClientConfig,
            what: str, timeout_s: float | None = None) -> list[protocol.Message]:
    """Send requests[i] to peers[i] concurrently; return the decoded replies in order.

    Error replies raise RemoteError, except ``not_ready`` which is waited out
    (bounded by ``config.not_ready_wait_s``). Peers that do not answer within
    the timeout are reconnected and asked again with back-off.
    """
    timeout_s = config.timeout_s if timeout_s is None else timeout_s
    try:
        return _fan_out(peers, requests, config, what, timeout_s)
    except BaseException:
        # A peer may still owe us a reply; a fresh socket makes sure it never
        # answers the next request with this one's reply.
        for p in peers:
            p.connect()
        raise


def _fan_out(peers: Sequence[_Peer], requests: Sequence[list[Any]], config: ClientConfig,
             what: str, timeout_s: float) -> list[protocol.Message]:
    replies: list[protocol.Message | None] = [None] * len(peers)
    pending = set(range(len(peers)))
    attempt = 0
    backoff = config.backoff_s
    started = time.monotonic()
    not_ready_deadline = started + config.not_ready_wait_s
    while pending:
        for i in pending:
            try:
                # Never block: a DEALER with no usable connection (a CURVE handshake refused, a peer
                # gone) would wait forever; not sent counts as not answered, and is retried.
                peers[i].socket.send_multipart(requests[i], copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                log.debug("%s not sent to %s: no connection to queue it on", what, peers[i].endpoint)
        deadline = time.monotonic() + timeout_s
        waiting = set(pending)
        poller = zmq.Poller()
        for i in waiting:
            poller.register(peers[i].socket, zmq.POLLIN)
        retry_not_ready = set()
        while waiting:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            events = dict(poller.poll(left_ms))
            for i in list(waiting):
                sock = peers[i].socket
                if events.get(sock, 0) & zmq.POLLIN:
                    msg = protocol.decode(sock.recv_multipart(copy=False))
                    waiting.discard(i)
                    poller.unregister(sock)
                    h = msg.header
                    if h.get("ok") is True:
                        replies[i] = msg
                    elif h.get("code") == "not_ready" and time.monotonic() < not_ready_deadline:
                        retry_not_ready.add(i)
                    else:
                        raise RemoteError(peers[i].endpoint, what, str(h.get("code")), str(h.get("reason")))
        pending = waiting | retry_not_ready
        if not pending:
            break
        if waiting:
            attempt += 1
            waited = time.monotonic() - started
            if attempt > config.retries and waited >= config.server_wait_s:
                names = ", ".join(peers[i].endpoint for i in sorted(waiting))
                raise ServerUnreachable(
                    f"no reply to {what} from {names} after {attempt} attempt(s) of {timeout_s:g} s "
                    f"(about {waited:.0f} s); is `pserver start` running there and reachable from this host? "
                    f"Check the address, firewalls and --keys")
            left = f"{attempt} of {config.retries}" if attempt <= config.retries else \
                f"{attempt}, for up to {config.server_wait_s - waited:.0f} s more"
            log.warning("no reply to %s from %s within %.1f s; retry %s in %.2f s", what,
                        ", ".join(peers[i].endpoint for i in sorted(waiting)), timeout_s, left, backoff)
            for i in waiting:
                peers[i].retries += 1
                peers[i].connect()
        time.sleep(backoff if waiting else min(config.backoff_s, 0.1))
        if waiting:
            backoff = min(backoff * 2, config.max_backoff_s)
    return replies  # type: ignore[return-value]


def request(endpoint: str, header: dict[str, Any], arrays: Sequence[np.ndarray] = (),
            context: zmq.Context | None = None, config: ClientConfig | None = None,
            curve: dict[str, bytes] | None = None) -> protocol.Message:
    """One request to one endpoint, with the same timeouts and retries (and a request id of its own)."""
    header = {"rid": [secrets.randbits(63), 1], **header}
    peer = _Peer(context or zmq.Context.instance(), endpoint, curve)
    try:
        return fan_out([peer], [protocol.encode(header, arrays)], config or ClientConfig(), header.get("op", "?"))[0]
    finally:
        peer.close()


def query_shard_stats(endpoint: str, context: zmq.Context | None = None, timeout_s: float = 5.0,
                      curve: dict[str, bytes] | None = None) -> dict[str, Any]:
    msg = request(endpoint, {"op": "STATS"}, context=context,
                  config=ClientConfig(timeout_s=timeout_s, retries=0), curve=curve)
    return msg.header["stats"]


@dataclass(frozen=True)
class ShardInfo:
    index: int
    endpoint: str
    start: int
    end: int


class _Frames:
    """The path to a shard over ZeroMQ: arrays travel as frames, pushes and pulled centres in the wire form
    (`ClientConfig.wire`)."""

    shared = False

    def __init__(self, shard: ShardInfo, wire: str) -> None:
        self.shard = shard
        self.wire = wire

    def request(self, header: dict[str, Any], piece: np.ndarray | None) -> list[Any]:
        """``header`` and this shard's ``piece`` of the array (if any) as frames; the header asks for the
        centre in the wire form."""
        if self.wire != "float32":
            header = {**header, "wire": self.wire}
        return protocol.encode(header, [] if piece is None else [piece])

    def slice_of(self, msg: protocol.Message, index: int) -> np.ndarray:
        """The reply's array ``index`` (as float32), checked to be this shard's slice."""
        s = self.shard
        arr = precision.widen(msg.arrays[index]) if msg.arrays else None
        if arr is None or arr.shape[0] != s.end - s.start or arr.dtype != np.float32:
            raise ProtocolError("size", f"shard {s.index} at {s.endpoint} replied with {None if arr is None else arr.shape} "
                                        f"for its range [{s.start}, {s.end})")
        return arr

    def close(self) -> None:
        pass


class _SharedMemory(_Frames):
    """The path to a shard on this host: arrays through the segments both map (`pserver.shm`), ZeroMQ
    carrying the headers; replies that carry frames anyway (a round's) are read as `_Frames` reads them."""

    shared = True

    def __init__(self, shard: ShardInfo, centre: shm.CentreSegment, push: shm.Segment) -> None:
        super().__init__(shard, "float32")  # shared memory is always float32
        self.centre, self.push = centre, push

    def request(self, header: dict[str, Any], piece: np.ndarray | None) -> list[Any]:
        """``piece`` written to the push area (unless it is the area itself), and the header naming it."""
        area = self.push.buffers[0]
        if piece is not None and piece.ctypes.data != area.ctypes.data:
            np.copyto(area, piece)
        return protocol.encode({**header, "shm": self.push.token})

    def close(self) -> None:
        self.centre.close()
        self.push.close()


class Client:
    """A worker's connection to the coordinator and to every shard.

    ``worker`` identifies this client's pushes (sequence numbers, staleness
    histograms); it is the worker's rank after `join`. ``client_id`` (random)
    and a counter make the request ids of its requests (the module docstring
    says what they are for).
    """

    def __init__(self, address: str, config: ClientConfig | None = None, worker: int = 0,
                 context: zmq.Context | None = None, curve: dict[str, bytes] | None = None) -> None:
        self.address = address
        self.config = config or ClientConfig()
        self.context = context or zmq.Context.instance()
        self.curve = curve
        self.worker = worker
        self.coordinator = _Peer(self.context, address, curve)
        self.shards: list[ShardInfo] = []
        self._peers: list[_Peer] = []
        self.versions: list[int] = []
        self.seq = 0
        self.world = 0
        self.rank = -1
        # The coordinator's ticket for this rank's incarnation (JOIN): shards of a `pserver start` serve a worker's
        # PUSH, ROUND, SHM, BYE and PULL only with it. Before a JOIN there is none, and PULL goes as an observer.
        self.incarnation = 0
        self.ticket: str | None = None
        self._resent = 0  # requests `_send` sent again after mapping shared memory anew (not timeouts: `retries`)
        self.round_timeout_s = protocol.ROUND_TIMEOUT_S  # the server's; `join` learns it from the run config
        self.client_id = secrets.randbits(63)
        self._requests = 0  # requests numbered so far (the n of the last request id)
        self._retired_retries = 0  # `retries` of shard connections that use_shards replaced
        # Per shard, how this client reaches it: chosen once per set of shards, at the first exchange
        # (`_choose_paths`); [] until then.
        self._paths: list[_Frames] = []
        self._feedback: precision.ErrorFeedback | None = None  # the push residual, for a half-precision wire

    # ---- coordinator --------------------------------------------------------

    def next_rid(self) -> list[int]:
        """A new request id [client_id, n]: one per request, however often it is re-sent."""
        self._requests += 1
        return [self.client_id, self._requests]

    def ask(self, header: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        """One request to the coordinator, with a new request id unless ``header`` carries one."""
        header = {"rid": self.next_rid(), **header}
        msg = fan_out([self.coordinator], [protocol.encode(header)], self.config, header["op"], timeout_s)[0]
        return msg.header

    def join(self, name: str = "", rank: int = -1) -> dict[str, Any]:
        """Ask for a rank; returns the coordinator's reply (rank, world, config, shards, layout, architecture)."""
        reply = self.ask({"op": "JOIN", "name": name, "rank": rank})
        self.rank = self.worker = int(reply["rank"])
        self.incarnation = int(reply.get("incarnation", 1))
        self.ticket = reply.get("ticket")
        # Shards answer a push whose seq is not past the rank's last one as a retry, without applying it: a
        # restarted worker (the rank's next incarnation) numbers its pushes past every earlier process's.
        self.seq = max(self.seq, (self.incarnation - 1) << protocol.INCARNATION_SHIFT)
        self.world = int(reply["world"])
        self.round_timeout_s = float((reply.get("config") or {}).get("round_timeout_s", self.round_timeout_s))
        self.use_shards(reply["shards"])
        return reply

    def init(self, flat: np.ndarray, layout: Layout, architecture: str = "") -> bool:
        """Offer the initial weights. True if these became the centre; False if the
        server already held weights of the same layout (LayoutMismatch-like
        RemoteError if not the same)."""
        if flat.dtype != np.float32 or flat.shape != (layout.total,):
            raise ValueError(f"initial weights must be float32 ({layout.total},), got {flat.dtype} {flat.shape}")
        reply = self.ask({"op": "INIT", "layout": layout.to_wire(), "architecture": architecture})
        self.world = int(reply["world"])
        self.use_shards(reply["shards"])
        if not reply["first"]:
            return False
        tickets = reply.get("tickets") or [None] * len(self.shards)  # the coordinator's word on each slice
        reqs = [protocol.encode({"op": "INIT", "start": s.start, "end": s.end, "total": layout.total,
                                 "world": self.world, "fingerprint": layout.fingerprint(), "rid": self.next_rid(),
                                 **({"ticket": t} if t else {})},
                                [flat[s.start:s.end]])
                for s, t in zip(self.shards, tickets)]
        fan_out(self._peers, reqs, self.config, "INIT")
        self.versions = [0] * len(self.shards)
        return True

    def done(self, report: dict[str, Any] | None = None) -> None:
        self.ask({"op": "DONE", "rank": self.rank, "report": report or {}})

    def heartbeat(self) -> dict[str, Any]:
        return self.ask({"op": "HEARTBEAT", "rank": self.rank})

    def stats(self) -> dict[str, Any]:
        return self.ask({"op": "STATS"})

    def who(self) -> dict[str, Any]:
        """The header fields that say who sends a shard request: the rank, and its ticket once joined."""
        if self.ticket is None:
            return {"worker": self.worker}
        return {"worker": self.worker, "inc": self.incarnation, "ticket": self.ticket}

    def _puller(self) -> dict[str, Any]:
        """A PULL's sender: this rank once joined, an observer (which takes no rank) before."""
        return self.who() if self.ticket is not None else {"worker": protocol.OBSERVER}

    def use_shards(self, shards: list[dict[str, Any]]) -> None:
        """Talk to these shards from now on: the ``shards`` list of a JOIN, INIT or MODEL reply
        (``{index, endpoint, start, end}`` each). An observer that takes no rank (the evaluator) calls
        this with MODEL's list; `join` and `init` call it themselves. Sockets are re-created only if an
        endpoint changed."""
        infos = [ShardInfo(int(s["index"]), str(s["endpoint"]), int(s.get("start", 0)), int(s.get("end", 0)))
                 for s in shards]
        if [(i.index, i.endpoint) for i in infos] != [(i.index, i.endpoint) for i in self.shards]:
            for p in self._peers:
                p.close()
            self._retired_retries += sum(p.retries for p in self._peers)
            self._peers = [_Peer(self.context, i.endpoint, self.curve) for i in infos]
            self.versions = [0] * len(infos)
            self._drop_paths()
        self.shards = infos

    @property
    def retries(self) -> int:
        """Requests this client re-sent after a timeout (each on a fresh socket), to the coordinator or to
        any shard, since it was made. Read-only; the log says the same one warning at a time."""
        return self.coordinator.retries + self._retired_retries + sum(p.retries for p in self._peers)

    @property
    def total(self) -> int:
        return self.shards[-1].end if self.shards else 0

    # ---- shards -------------------------------------------------------------

    @property
    def shared_memory(self) -> list[bool]:
        """For each shard, whether this client exchanges with it through shared memory."""
        return [p.shared for p in self._paths] if self._paths else [False] * len(self.shards)

    def _choose_paths(self) -> list[_Frames]:
        """How to reach each shard, chosen once per set of shards: shared memory with every shard on this host
        that grants it, to a worker only (an observer, without a rank, has no push segment); ZeroMQ frames
        for the others."""
        if self._paths:
            return self._paths
        self._paths = [self._shared_path(i, s) or _Frames(s, self.config.wire) for i, s in enumerate(self.shards)]
        if any(p.shared for p in self._paths):
            log.info("worker %d: shared memory with shard(s) %s", self.worker,
                     [p.shard.index for p in self._paths if p.shared])
        return self._paths

    def _shared_path(self, i: int, s: ShardInfo) -> _SharedMemory | None:
        """Shared memory with shard ``s`` if it is on this host and grants it (SHM); None: ZeroMQ it is."""
        if not (self.config.shared_memory and 0 <= self.rank < self.world and shm.available()):
            return None
        if not shm.is_local(s.endpoint.split("://")[-1].rsplit(":", 1)[0].strip("[]")):
            return None
        try:
            reply = fan_out([self._peers[i]], [protocol.encode({"op": "SHM", **self.who()})],
                            self.config, "SHM")[0].header
            n = s.end - s.start
            if reply.get("n") != n:
                raise ValueError(f"segments of {reply.get('n')!r} floats for a slice of {n}")
            centre = shm.CentreSegment.open(str(reply["centre"]), n, int(reply["centre_token"]))
            try:
                push = shm.Segment.open(str(reply["push"]), n, int(reply["push_token"]))
            except BaseException:
                centre.close()
                raise
            push.unlink()  # mapped at both ends: nothing is left behind if either process dies
            return _SharedMemory(s, centre, push)
        except (RemoteError, ValueError, TypeError, KeyError, OSError) as exc:
            log.info("shard %d at %s: exchanging over ZeroMQ, not shared memory (%s)", s.index, s.endpoint, exc)
            return None

    def _drop_paths(self) -> None:
        """Unmap the shards' segments; `_choose_paths` chooses again at the next exchange."""
        for path in self._paths:
            path.close()
        self._paths = []

    @property
    def residual(self) -> np.ndarray | None:
        """What a half-precision wire's rounding has kept back from the pushes so far (total,), None on float32."""
        return None if self._feedback is None else self._feedback.residual

    def delta_buffer(self) -> np.ndarray | None:
        """Where to compute the next push's (total,) float32 array so that `push` copies nothing: with one
        shard, through shared memory, the worker's push area itself; else None. Write it only between
        exchanges (the shard reads it while it serves a push)."""
        paths = self._choose_paths()
        if len(paths) == 1 and isinstance(paths[0], _SharedMemory):
            return paths[0].push.buffers[0]
        return None

    def _collect(self, replies: list[protocol.Message], out: np.ndarray | None, centre: bool) -> np.ndarray:
        """The shards' arrays as one (total,) vector: the centre (``centre``, each reply's last array) or the
        apply's array (its first). Copied into ``out`` if given; else, from one shard, the reply's frame itself
        (a read-only view, no copy), else a new array. A reply through shared memory is read from the
        segments (the centre under its seqlock; the version read becomes this shard's), or, if the shard wrote
        the centre into this worker's reply area, from there: from one shard, a read-only view on the area,
        valid until this client's next push."""
        index = -1 if centre else 0
        flags = [shm_reply.decode(m.header) for m in replies]
        paths = self._paths or [_Frames(s, self.config.wire) for s in self.shards]
        if out is None and len(paths) == 1:
            path, via = paths[0], flags[0]
            view = None
            if not via.shared:
                view = path.slice_of(replies[0], index)
            elif centre and via.centre_in_area and isinstance(path, _SharedMemory):
                view = path.push.buffers[1].view()
            if view is not None:
                view.flags.writeable = False
                return view
        if out is None:
            out = np.empty(self.total, np.float32)
        for i, (path, msg, via) in enumerate(zip(paths, replies, flags)):
            s = path.shard
            target = out[s.start:s.end]
            if not via.shared or not isinstance(path, _SharedMemory):
                target[:] = path.slice_of(msg, index)
            elif not centre or via.centre_in_area:
                if not centre and not via.array_in_area:
                    raise ProtocolError("frames", f"shard {s.index} at {s.endpoint} wrote no array to the reply area")
                np.copyto(target, path.push.buffers[1])
            else:
                version = path.centre.read(target)
                if version is None:  # rewritten under us again and again: ask for a copy instead
                    reply = fan_out([self._peers[i]], [protocol.encode({"op": "PULL", **self._puller()})],
                                    self.config, "PULL")[0]
                    target[:] = path.slice_of(reply, -1)
                    version = int(reply.header["version"])
                self.versions[i] = version
        return out

    def _pieces(self, array: np.ndarray | None) -> list[np.ndarray | None]:
        """Each shard's piece of ``array``: its range, or for a shard reached over a half-precision wire the
        range narrowed with error feedback. Made once per push, so a push re-sent keeps its pieces and the
        residual counts its rounding once."""
        if array is None:
            return [None] * len(self._paths)
        if self.config.wire != "float32" and (self._feedback is None or self._feedback.residual.shape != (self.total,)):
            self._feedback = precision.ErrorFeedback(self.total, self.config.wire)
        return [array[p.shard.start:p.shard.end] if p.shared or self._feedback is None
                else self._feedback.encode(array[p.shard.start:p.shard.end], p.shard.start, p.shard.end)
                for p in self._paths]

    def _send(self, header: dict[str, Any], array: np.ndarray | None = None,
              pulled: bool = False) -> list[protocol.Message]:
        """Ask every shard, each by its path (``pulled``: with the centre version this client last saw of it);
        a shard that no longer knows this worker's segments (it restarted) is asked for new ones, once, and the
        request re-sent (a push keeps its seq, so none is applied twice)."""
        self._choose_paths()
        pieces = self._pieces(array)

        def requests() -> list[list[Any]]:  # a shard whose path changed kind since the pieces were cut: its range
            return [p.request({**header, "pulled": self.versions[i]} if pulled else header,
                              piece if p.shared == was or array is None else array[p.shard.start:p.shard.end])
                    for i, (p, piece, was) in enumerate(zip(self._paths, pieces, chosen))]

        chosen = [p.shared for p in self._paths]
        try:
            return fan_out(self._peers, requests(), self.config, header["op"])
        except RemoteError as exc:
            if exc.code != "shm" or not any(chosen):
                raise
            log.info("worker %d: %s; mapping shared memory again", self.worker, exc.reason)
            self._drop_paths()
            self._choose_paths()
            self._resent += 1  # to every shard: those that took the first one answer this copy "not applied"
            return fan_out(self._peers, requests(), self.config, header["op"])

    def pull(self, out: np.ndarray | None = None) -> np.ndarray:
        """The whole centre as one float32 vector (total,): copied into ``out`` if given; else, from one shard
        over ZeroMQ, a read-only view on the reply's frame (no copy: set the model's weights from it),
        otherwise a new array."""
        replies = self._send({"op": "PULL", **self._puller()})
        self.versions = [int(m.header["version"]) for m in replies]
        return self._collect(replies, out, centre=True)

    def push(self, delta: np.ndarray, mode: str = "add", scale: float = 1.0, pull: bool = False,
             out: np.ndarray | None = None) -> tuple[list[int], np.ndarray | None]:
        """Push a flat float32 (total,) delta to every shard.

        mode: the shard-side apply (`pserver.applies`); the built-ins are "add" (C += Δ), "scaled"
        (C += scale·Δ), "staleness" (C += scale·Δ/(staleness+1)) and "elastic" (Δ is the worker's
        weights W; the shard applies E = scale·(W − C), C += E, and replies with E). Returns
        (staleness per shard, the new centre if pull, else the array the replies carry, if any: E); an array
        returned without ``out`` may be a read-only view on a reply's frame, as `pull` says, or, through shared
        memory, on this worker's reply area, which its next push rewrites (also when that push is refused).
        """
        if delta.dtype != np.float32 or delta.shape != (self.total,):
            raise ValueError(f"delta must be float32 ({self.total},), got {delta.dtype} {delta.shape}")
        self.seq += 1
        sent = self.retries + self._resent
        replies = self._send({"op": "PUSH", **self.who(), "seq": self.seq, "mode": mode, "scale": float(scale),
                              "pull": pull}, delta, pulled=True)
        voided = [k for k, m in enumerate(replies) if m.header.get("applied") is False]
        if voided and self.retries + self._resent == sent:
            # Sent once and not applied: the shard holds a later seq of this rank than ours, pushed by another
            # process. Training on would look like training while none of it reached the centre.
            raise RemoteError(self.shards[voided[0]].endpoint, "PUSH", "stale",
                              f"push {self.seq} of worker {self.worker} was not applied: the shard already holds a "
                              f"later push of this rank, from another process; join again for a rank of your own")
        staleness = [int(m.header.get("staleness", 0)) for m in replies]
        result = None
        carries = any(m.arrays or shm_reply.decode(m.header).array_in_area for m in replies)
        versions = [int(m.header["version"]) for m in replies]
        if pull or carries:  # the centre, or an array computed against it as of this reply: the worker has seen it
            self.versions = versions
        if pull:
            result = self._collect(replies, out, centre=True)
        elif carries:
            result = self._collect(replies, out, centre=False)
        return staleness, result

    def round(self, value: np.ndarray, number: int, mode: str, alpha: float = 1.0,
              timeout_s: float | None = None) -> tuple[int, np.ndarray, np.ndarray | None]:
        """One synchronous round of ``mode`` (a ROUND mode of `pserver.applies`).

        Returns (next round, new centre, the array the replies carry before it, if any: E if elastic).

        ``timeout_s`` is one attempt's wait for the reply. By default it is the server's round timeout
        (learned at `join`) plus one request's timeout: a round the server closes without a missing worker
        still has to reach us, and a shorter wait would re-send the ROUND of a live round.
        """
        if timeout_s is None:
            timeout_s = self.round_timeout_s + self.config.timeout_s
        self.seq += 1
        reqs = [protocol.encode({"op": "ROUND", **self.who(), "seq": self.seq, "round": number,
                                 "mode": mode, "alpha": float(alpha)}, [value[s.start:s.end]])
                for s in self.shards]
        replies = fan_out(self._peers, reqs, self.config, "ROUND", timeout_s=timeout_s)
        centre = self._collect(replies, None, centre=True)
        diff = self._collect(replies, None, centre=False) if any(len(m.arrays) > 1 for m in replies) else None
        self.versions = [int(m.header["version"]) for m in replies]
        return int(replies[0].header["round"]), centre, diff

    def bye(self) -> None:
        reqs = [protocol.encode({"op": "BYE", **self.who()}) for _ in self.shards]
        fan_out(self._peers, reqs, self.config, "BYE")

    def close(self) -> None:
        for p in [self.coordinator, *self._peers]:
            p.close()
        self._drop_paths()

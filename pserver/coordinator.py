"""The coordinator: the `host:port` workers are given.

It answers who is who (rank, world size), where the shards are and which
range each owns, the run configuration and the model. It holds no weights:
the first INIT fixes the layout, from which the shard ranges follow; the
initialising client then sends each shard its slice itself.

Shards REGISTER their endpoint when they start, so a shard may live on any
host: the shard map holds endpoints, never an assumption about hosts.

Retries. A client re-sends a request whose reply did not come, on a fresh
socket, with the same request id (``rid``, see `pserver.protocol`). Of the
coordinator's ops only JOIN (a second JOIN takes another rank) and INIT (a
second INIT is answered ``first`` false, and its client would never send the
shards their slices) would answer a retry differently; `ReplyMemory` keeps
what each was decided (the rank, ``first``) per requester, and a retry is
answered from it. The others are idempotent as they are: REGISTER sets the
same endpoint again, HEARTBEAT keeps the largest counts, DONE sets the same
report again, STOP keeps the first reason, LEAVE forgets an observer already
forgotten, and MODEL, STATS and PING change nothing but a last-seen time.

Authenticity. With the server's secret (`pserver start` makes one;
`pserver.security`) a JOIN's reply carries the rank's ticket and an INIT's
one ticket per shard slice, which the shards check, and a REGISTER must
carry its proof or come with the server's key. With ``--keys`` every op has
the roles that may send it (`OP_ROLES`), and a worker's key holds one rank:
its JOIN, heartbeats and DONE are that rank's only.

Restarts. `snapshot()` is everything the coordinator knows that a client
relies on (a `pserver.coordinator_state.CoordinatorState`): the ranks and
names, done and lost workers and their reports, the run config, the model
(layout, architecture, shard ranges), the shard endpoints, the stop reason,
the observers and the reply memory; `restore()` takes it back into a fresh
coordinator. `pserver start` writes it beside the shards' checkpoints
(`pserver.checkpoint.CoordinatorCheckpointer`): at once, before the reply
leaves, whenever a reply reports a decision (a rank taken, the model fixed,
a DONE, a STOP: ``on_change``), so that a client never holds an answer the
restored server has forgotten; and every checkpoint interval for the rest
(heartbeat counts, lost workers, observers). Round numbers are the shards'
(`pserver.shard_state.ShardState`). Times are not kept: a restored worker or
observer counts as seen at the restore.

Never waiting. The coordinator is one loop on one thread, and nothing in it
waits on a shard: a STATS is answered when every shard has answered the
coordinator's own STATS, sent and received without blocking
(`pserver.stats_gather.ShardStatsGather`), or its timeout has passed; until
then the loop serves everyone else (a restarted shard's REGISTER, heartbeats).

Memory. The socket's frame limit is `MAX_MESSAGE_BYTES` (set by
`pserver.server`): every message here is a header, the largest an INIT
carrying the model's architecture JSON.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from pserver import protocol, router, security
from pserver.coordinator_state import CoordinatorState, MemoryEntry, WorkerState
from pserver.errors import ProtocolError
from pserver.layout import Layout, shard_ranges
from pserver.memory import HeapTrimmer
from pserver.protocol import error, field as hfield, ok
from pserver.stats_gather import ShardStatsGather

log = logging.getLogger(__name__)

#: An observer (evaluator) that has not asked anything for this long no longer holds the server open.
OBSERVER_TIMEOUT_S = 60.0

#: ZeroMQ drops a peer that sends the coordinator a larger frame. Every message is a msgpack header; the
#: largest legitimate one, an INIT, carries the layout (tens of bytes a tensor) and the architecture JSON
#: (a Keras model's is some kilobytes to a few hundred); 4 MiB leaves room for a model of thousands of layers.
MAX_MESSAGE_BYTES = 4 << 20

#: Requesters (client ids of request ids) whose last JOIN or INIT `ReplyMemory` keeps.
REMEMBERED_REQUESTERS = 4096


class ReplyMemory:
    """What the coordinator decided for each requester's last JOIN or INIT, to answer its retries alike.

    Keyed by the client half of the request id; one entry per requester, its
    last JOIN or INIT only: a client has one request in flight and re-sends
    only that one (the Lazy Pirate pattern), so nothing older can come back
    as a retry. What is kept is the decision (a rank, a ``first``), not the
    reply: the reply is rebuilt from it, with the shard map as it is now.

    Bounded: at most ``limit`` requesters, the least recently seen forgotten
    first, each a few hundred bytes, so about 1 MiB at the default 4096. A
    world is far smaller, but every `Client` (a worker, the evaluator, a
    `pserver stats`) picks a new id, and so can anyone who can reach the
    socket: a flood of fresh ids evicts older entries, and a retry that
    arrives after its entry was evicted is served as a new request (as one
    without a rid is), never a crash.
    """

    def __init__(self, limit: int = REMEMBERED_REQUESTERS) -> None:
        self.limit = limit
        self._last: OrderedDict[int, tuple[int, str, Any]] = OrderedDict()  # client -> (n, op, decision)
        self.repeats = 0  # retries answered from memory

    def __len__(self) -> int:
        return len(self._last)

    def recall(self, client: int, n: int, op: str) -> Any:
        """The decision for this very request if it was seen before, else None; ProtocolError if it is
        older than the last one remembered of this client, or reuses its id for another op."""
        entry = self._last.get(client)
        if entry is None or n > entry[0]:
            return None
        self._last.move_to_end(client)
        last_n, last_op, decision = entry
        if n < last_n:
            raise ProtocolError("stale", f"{op} request {n} of client {client:#x} is older than its request "
                                         f"{last_n} ({last_op}), already answered; a late copy is not served again")
        if op != last_op:
            raise ProtocolError("malformed", f"request id [{client:#x}, {n}] was a {last_op}, now a {op}; "
                                             f"a client must number each new request anew")
        self.repeats += 1
        return decision

    def remember(self, client: int, n: int, op: str, decision: Any) -> None:
        self._last[client] = (n, op, decision)
        self._last.move_to_end(client)
        while len(self._last) > self.limit:
            self._last.popitem(last=False)

    def entries(self) -> tuple[MemoryEntry, ...]:
        """Every entry as (client, n, op, decision), least recently seen first."""
        return tuple((client, n, op, decision) for client, (n, op, decision) in self._last.items())

    def load(self, entries: tuple[MemoryEntry, ...]) -> None:
        """Take `entries()` back, replacing any; the least recently seen beyond ``limit`` are forgotten."""
        self._last = OrderedDict((client, (n, op, decision)) for client, n, op, decision in entries)
        while len(self._last) > self.limit:
            self._last.popitem(last=False)


@dataclass
class WorkerInfo:
    rank: int
    name: str
    joined_at: float
    last_seen: float
    done: bool = False
    lost: bool = False
    samples: int = 0
    nan_recoveries: int = 0  # local NaN losses the worker recovered from (by pulling the centre)
    report: dict[str, Any] = field(default_factory=dict)
    # How many processes have held this rank: a restarted worker is the next incarnation, and numbers its
    # pushes past every earlier one's (`pserver.client.Client.join`), so shards never take them for retries.
    incarnation: int = 1
    key: str = ""  # with --keys: the public key (z85) the rank joined with; only that key acts for the rank


class Coordinator:
    """The coordinator's state machine, and its event loop.

    Its state is who is who and where: the shards' ``endpoints``, the
    ``workers`` by rank, the model (``layout``, ``architecture``, the shards'
    ``ranges``), the ``observers``, the stop reason and the reply ``memory``;
    no weights. ``handlers`` maps each op to the method that answers it.
    `handle()` takes one request's frames (the requester's identity first)
    and sends its reply on ``socket``, the ROUTER `pserver start` bound;
    `serve()` is the loop that feeds it, gathers the shards' STATS and
    declares silent workers lost. `snapshot()` returns the state a restarted
    server needs (a `CoordinatorState`) and `restore()` takes one back, before
    serving. Tests pass a stand-in socket and drive `handle()` with frames
    built by `pserver.protocol`.
    """

    def __init__(self, socket: zmq.Socket, shards: int, world: int, run_config: dict[str, Any],
                 shard_timeout_s: float = 5.0, worker_timeout_s: float = 0.0, max_slice_bytes: int = 0,
                 secret: bytes | None = None, roles: dict[str, str] | None = None) -> None:
        self.socket = socket
        self.n_shards = shards
        self.world = world
        self.run_config = run_config
        self.shard_timeout_s = shard_timeout_s
        self.worker_timeout_s = worker_timeout_s  # 0: workers are never declared lost by silence
        self.max_slice_bytes = max_slice_bytes  # the shards' frame limit (0: none): INIT refuses larger slices
        self.endpoints: dict[int, str] = {}
        self.layout: Layout | None = None
        self.architecture: str | None = None
        self.ranges: list[tuple[int, int]] = []
        self.workers: dict[int, WorkerInfo] = {}
        self.refused: dict[str, int] = {}
        # Writes of this state to disk that failed (pserver.checkpoint.CoordinatorCheckpointer): how many, the last
        # error, and when (time.time()) the last one succeeded.
        self.checkpoint_status: dict[str, Any] = {"failures": 0, "error": "", "ok_at": 0.0}
        self.handlers: dict[str, Callable[[protocol.Message], list[Any] | None]] = {
            "REGISTER": self._register, "JOIN": self._join, "INIT": self._init, "DONE": self._done,
            "HEARTBEAT": self._heartbeat, "STATS": self._stats, "PING": self._ping,
            "MODEL": self._model, "STOP": self._stop_run, "LEAVE": self._leave,
        }
        # The ops whose retry must get the first reply: (decide and mutate, answer from the decision).
        self.remembered: dict[str, tuple[Callable[[protocol.Message], Any], Callable[[Any], list[Any]]]] = {
            "JOIN": (self._take_rank, self._join_reply), "INIT": (self._fix_model, self._init_reply),
        }
        self.memory = ReplyMemory()
        self.observers: dict[str, float] = {}  # observer name -> last seen (monotonic)
        self.stop_requested = ""  # why the run should stop early (e.g. target AUC reached); told to workers
        self.curve: dict[str, bytes] | None = None  # client keys for asking CurveZMQ shards (pserver.security)
        # Called after a decision a reply reports (a rank, the model, a DONE, a STOP), before that reply is sent:
        # `pserver start` writes the coordinator's checkpoint there (see the module docstring, Restarts).
        self.on_change: Callable[[], Any] | None = None
        self.address = ""  # host:port, as `pserver start` bound it; kept in checkpoints
        self.restored_endpoints: dict[int, str] = {}  # where the shards were before a restore (`restore`)
        self._decided = False  # this request made a decision on_change must see before its reply leaves
        self._gather: ShardStatsGather | None = None  # made at the first STATS that has shards to ask
        self._requester = b""  # the identity of the request being handled
        self.trimmer = HeapTrimmer(name="the coordinator")  # what closed connections' buffers held goes back
        # The server's secret (pserver.security): JOIN and INIT replies carry tickets signed with it, which the
        # shards check, and a REGISTER must prove it (or come with the server's key). None: no tickets, and a
        # REGISTER is taken from anyone (a coordinator in a test).
        self.secret = secret
        # With --keys: {public key: role} of the allow-list (pserver.security.key_roles); None without keys.
        self.roles = roles
        self._sender = ""  # the public key ZAP admitted the request being handled with ("" without keys)
        self._stopping = False

    @property
    def ready(self) -> bool:
        return len(self.endpoints) == self.n_shards

    @property
    def finished(self) -> bool:
        """Every rank has joined and is done or lost, and no observer (evaluator) is still reading."""
        now = time.monotonic()
        watching = [name for name, seen in self.observers.items() if now - seen < OBSERVER_TIMEOUT_S]
        return (len(self.workers) == self.world and all(w.done or w.lost for w in self.workers.values())
                and not watching)

    def stop(self) -> None:
        self._stopping = True

    def serve(self, until: Callable[[], bool] | None = None, poll_s: float = 0.1) -> None:
        """Answer requests until stopped or ``until()``; never waits on a shard (STATS: `ShardStatsGather`)."""
        router.serve(self.socket, self.handle, self.tick, lambda: self._stopping or bool(until and until()), poll_s,
                     also=lambda: self._gather.sockets() if self._gather else (),
                     wake_in_s=lambda now: self._gather.wait_s(now) if self._gather else None)

    def tick(self, now: float) -> None:
        """Timers, after each wake-up: STATS answered once gathered, silent workers declared lost, heap trimmed."""
        self.answer_stats(now)
        self.check_liveness(now)
        self.trimmer.tick()

    def handle(self, frames: list[Any]) -> None:
        """One request: decode, dispatch, reply. Never raises."""
        if len(frames) < 2:
            self._count("malformed")
            return
        identity = frames[0].bytes
        self._requester = identity  # a STATS waits for its gather under this identity
        self._sender = security.peer_key(frames[1])
        try:
            msg = protocol.decode(frames[1:])
            handler = self.handlers.get(msg.op)
            if handler is None:
                raise ProtocolError("unknown_op", f"op {msg.op!r} is not served by the coordinator; expected one of {sorted(self.handlers)}")
            security.check_role(self.roles, self._sender, msg.op, self.OP_ROLES)
            rid = protocol.request_id(msg.header)
            if rid is not None and msg.op in self.remembered:
                decide, answer = self.remembered[msg.op]
                decision = self.memory.recall(*rid, msg.op)
                if decision is None:
                    decision = decide(msg)  # raises, changing nothing, if refused: a refusal is not remembered
                    self.memory.remember(*rid, msg.op, decision)
                reply = answer(decision)
            else:
                reply = handler(msg)
                if reply is None:
                    return  # answered later (STATS, `answer_stats`); nothing decided
        except ProtocolError as exc:
            self._count(exc.code)
            log.debug("coordinator refused a message: %s", exc)
            reply = protocol.encode(error(exc.code, exc.reason))
        except Exception as exc:
            self._count("internal")
            log.exception("coordinator: internal error")
            reply = protocol.encode(error("internal", f"{type(exc).__name__}: {exc}"))
        if self._decided:
            self._decided = False
            if self.on_change is not None:
                try:
                    self.on_change()
                except Exception:  # the run goes on; only a restart of the whole server would miss this decision
                    log.exception("coordinator: checkpoint not written; were the whole server lost now, the "
                                  "restarted one would not know this request's decision")
        try:
            self.socket.send_multipart([identity, *reply])
        except zmq.ZMQError as exc:
            log.debug("coordinator: reply not sent: %s", exc)

    #: With --keys, the roles (pserver.security.ROLES) that may send each op: a worker's key joins and acts for
    #: the rank it joined as; the server's REGISTERs shards; the evaluator's (and the server's) STOP the run.
    OP_ROLES = {"REGISTER": ("server",), "JOIN": ("worker",), "INIT": ("worker",), "DONE": ("worker",),
                "HEARTBEAT": ("worker",), "STOP": ("server", "evaluator"),
                "STATS": ("server", "evaluator", "operator", "worker"),
                "PING": ("server", "evaluator", "operator", "worker"),
                "MODEL": ("server", "evaluator", "operator", "worker"),
                "LEAVE": ("server", "evaluator", "operator", "worker")}


    def signed_lost(self, lost: list[int], done: list[int]) -> dict[str, Any]:
        """A LOST notice's header, with the proof a shard of this server asks for."""
        header: dict[str, Any] = {"op": "LOST", "lost": list(lost), "done": list(done)}
        if self.secret is not None:
            header["proof"] = security.lost_proof(self.secret, lost, done)
        return header

    def _count(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    def shard_map(self) -> list[dict[str, Any]]:
        out = []
        for k in range(self.n_shards):
            entry: dict[str, Any] = {"index": k, "endpoint": self.endpoints.get(k, "")}
            if self.ranges:
                entry["start"], entry["end"] = self.ranges[k]
            out.append(entry)
        return out

    # ---- handlers ---------------------------------------------------------

    def _ping(self, msg: protocol.Message) -> list[Any]:
        return protocol.encode(ok(ready=self.ready, shards=self.shard_map()))

    def _register(self, msg: protocol.Message) -> list[Any]:
        k = hfield(msg.header, "shard", int)
        endpoint = hfield(msg.header, "endpoint", str)
        if not 0 <= k < self.n_shards:
            raise ProtocolError("malformed", f"shard index {k} outside [0, {self.n_shards})")
        if ":" not in endpoint or len(endpoint) > 300:
            raise ProtocolError("malformed", f"shard endpoint {endpoint!r} is not host:port")
        if self.secret is not None and security.role_of(self.roles, self._sender) != "server" and not security.verify(
                self.secret, msg.header.get("proof"), "register", k, endpoint):
            raise ProtocolError("ticket", f"REGISTER of shard {k} at {endpoint} without the server's proof: only "
                                          f"the shard processes `pserver start` started (or the server's key) "
                                          f"register shards")
        if self.endpoints.get(k) not in (None, endpoint):
            log.warning("shard %d moved from %s to %s", k, self.endpoints[k], endpoint)
        self.endpoints[k] = endpoint
        log.info("shard %d registered at %s", k, endpoint)
        return protocol.encode(ok())

    def _join(self, msg: protocol.Message) -> list[Any]:
        return self._join_reply(self._take_rank(msg))

    def _take_rank(self, msg: protocol.Message) -> int:
        if not self.ready:
            raise ProtocolError("not_ready", f"{len(self.endpoints)} of {self.n_shards} shards have registered; retry shortly")
        name = hfield(msg.header, "name", str, "")[:200]
        want = hfield(msg.header, "rank", int, -1)
        now = time.monotonic()
        key = self._sender
        held = [w for w in self.workers.values() if key and w.key == key]
        if held:  # with --keys a key holds one rank: it may take only that one back, once lost
            mine = held[0]
            if not mine.lost or want not in (-1, mine.rank):
                raise ProtocolError("role", f"this key joined as rank {mine.rank}"
                                            f"{'' if mine.lost else ', which is not lost'}; a key holds one rank "
                                            f"and takes back only that one, once it was declared lost")
            want = mine.rank
        if 0 <= want < self.world and (want not in self.workers or self.workers[want].lost):
            if key and want in self.workers and self.workers[want].key not in ("", key):
                raise ProtocolError("role", f"rank {want} was joined with another key; only that key takes it back")
            rank = want  # a restarted worker takes its old rank back
        else:
            free = [r for r in range(self.world) if r not in self.workers]
            if not free:
                raise ProtocolError("malformed", f"all {self.world} ranks are taken; start the server with a larger "
                                                 f"--workers or rejoin a lost rank with --rank")
            rank = free[0]
        before = self.workers.get(rank)
        self.workers[rank] = WorkerInfo(rank=rank, name=name, joined_at=now, last_seen=now,
                                        incarnation=before.incarnation + 1 if before else 1, key=key)
        self._decided = True
        log.info("worker %d of %d joined (%s)", rank, self.world, name or "unnamed")
        return rank

    def _join_reply(self, rank: int) -> list[Any]:
        info = self.workers[rank]
        extra = {} if self.secret is None else \
            {"ticket": security.worker_ticket(self.secret, rank, info.incarnation, info.key)}
        return protocol.encode(ok(rank=rank, world=self.world, config=self.run_config, shards=self.shard_map(),
                                  layout=self.layout.to_wire() if self.layout else None,
                                  architecture=self.architecture, incarnation=info.incarnation, **extra))

    def _init(self, msg: protocol.Message) -> list[Any]:
        return self._init_reply(self._fix_model(msg))

    def _init_reply(self, first: bool) -> list[Any]:
        extra = {}
        if self.secret is not None and self.layout is not None:  # each shard's slice, signed: the shards check it
            fingerprint = self.layout.fingerprint()
            extra["tickets"] = [security.init_ticket(self.secret, k, start, end, self.layout.total, self.world,
                                                     fingerprint) for k, (start, end) in enumerate(self.ranges)]
        return protocol.encode(ok(first=first, shards=self.shard_map(), world=self.world, **extra))

    def _fix_model(self, msg: protocol.Message) -> bool:
        """Fix the model if none is yet; True if this INIT did (its client sends the shards their slices)."""
        try:
            layout = Layout.from_wire(msg.header.get("layout"))
        except ValueError as exc:
            raise ProtocolError("malformed", f"INIT layout: {exc}") from None
        architecture = hfield(msg.header, "architecture", str, "")
        if self.layout is not None:
            diff = self.layout.difference(layout)
            if diff is not None:
                raise ProtocolError("mismatch", f"this model does not match the one the server holds: {diff}")
            return False
        if layout.total < self.n_shards:
            raise ProtocolError("size", f"a model of {layout.total} floats cannot be split over {self.n_shards} shards")
        ranges = shard_ranges(layout.total, self.n_shards)
        largest = max(end - start for start, end in ranges) * 4
        if self.max_slice_bytes and largest > self.max_slice_bytes:
            raise ProtocolError("size", f"a model of {layout.total} floats over {self.n_shards} shard(s) has slices of "
                                        f"up to {largest / 2**20:.1f} MiB, and the shards take frames of up to "
                                        f"{self.max_slice_bytes / 2**20:.1f} MiB; start the server with more "
                                        f"--shards or a larger --max-message-mb")
        self.layout = layout
        self.architecture = architecture or None
        self.ranges = ranges
        self._decided = True
        log.info("model of %d tensors, %d floats, over %d shard(s)", len(layout.tensors), layout.total, self.n_shards)
        return True

    def _touch(self, msg: protocol.Message) -> WorkerInfo:
        rank = hfield(msg.header, "rank", int)
        info = self.workers.get(rank)
        if info is None:
            raise ProtocolError("malformed", f"rank {rank} has not joined")
        if self.roles is not None and info.key != self._sender:
            raise ProtocolError("role", f"rank {rank} joined with another key; a worker's key acts for its own rank only")
        info.last_seen = time.monotonic()
        if info.lost:
            log.info("worker %d is back", rank)
            info.lost = False
        return info

    def _heartbeat(self, msg: protocol.Message) -> list[Any]:
        info = self._touch(msg)
        info.samples = max(info.samples, hfield(msg.header, "samples", int, 0))
        info.nan_recoveries = max(info.nan_recoveries, hfield(msg.header, "nan_recoveries", int, 0))
        return protocol.encode(ok(lost=[w.rank for w in self.workers.values() if w.lost], stop=self.stop_requested))

    def _model(self, msg: protocol.Message) -> list[Any]:
        """The layout and architecture, for observers (the evaluator) that take no rank."""
        self._observe(msg)
        if self.layout is None:
            raise ProtocolError("not_ready", "no worker has initialised the model yet")
        return protocol.encode(ok(layout=self.layout.to_wire(), architecture=self.architecture, world=self.world,
                                  config=self.run_config, shards=self.shard_map()))

    def _stop_run(self, msg: protocol.Message) -> list[Any]:
        reason = hfield(msg.header, "reason", str, "stop requested")[:500]
        if not self.stop_requested:
            log.info("stopping the run: %s", reason)
            self.stop_requested = reason
            self._decided = True
        return protocol.encode(ok())

    def _done(self, msg: protocol.Message) -> list[Any]:
        info = self._touch(msg)
        report = hfield(msg.header, "report", dict, {})
        info.done = True
        for key in ("samples", "nan_recoveries"):
            value = report.get(key, 0)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(info, key, max(getattr(info, key), value))
        info.report = {str(k): v for k, v in report.items() if isinstance(v, (int, float, str, bool))}
        self._decided = True
        log.info("worker %d is done: %s", info.rank, info.report)
        return protocol.encode(ok())

    def check_liveness(self, now: float) -> None:
        if not self.worker_timeout_s:
            return
        for w in self.workers.values():
            if not (w.done or w.lost) and now - w.last_seen > self.worker_timeout_s:
                w.lost = True
                log.warning("worker %d (%s) silent for %.1f s: declared lost", w.rank, w.name, now - w.last_seen)

    def summary(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "world": self.world,
            "shards": self.shard_map(),
            "initialised": self.layout is not None,
            "total": self.layout.total if self.layout else 0,
            "refused": dict(self.refused),
            "checkpoint": dict(self.checkpoint_status),
            "repeats": self.memory.repeats,  # retried JOINs and INITs answered from memory
            "stop": self.stop_requested,
            "workers": {str(w.rank): {"name": w.name, "done": w.done, "lost": w.lost, "samples": w.samples,
                                    "nan_recoveries": w.nan_recoveries,
                                    "report": w.report}
                        for w in self.workers.values()},
        }

    # ---- restarts ---------------------------------------------------------------

    def snapshot(self) -> CoordinatorState:
        """Everything a restarted coordinator must know (module docstring, Restarts)."""
        return CoordinatorState(
            address=self.address, shards=self.n_shards, world=self.world,
            run=json.loads(json.dumps(self.run_config)),  # as the checkpoint reads it back
            endpoints=dict(sorted(self.endpoints.items())), layout=self.layout, architecture=self.architecture,
            ranges=tuple(self.ranges),
            workers=tuple(WorkerState(rank=w.rank, name=w.name, done=w.done, lost=w.lost, samples=w.samples,
                                      nan_recoveries=w.nan_recoveries, report=dict(w.report),
                                      incarnation=w.incarnation, key=w.key)
                          for w in sorted(self.workers.values(), key=lambda w: w.rank)),
            stop=self.stop_requested, observers=tuple(sorted(self.observers)), memory=self.memory.entries(),
            refused=dict(self.refused), repeats=self.memory.repeats)

    def restore(self, state: CoordinatorState) -> None:
        """Take a snapshot (checked by `CoordinatorState.from_wire` if it was read from disk) back into this
        coordinator, before it serves. Shard endpoints are not taken: the shards register again
        (`restored_endpoints` says where they were). Workers and observers count as seen now."""
        if (state.shards, state.world) != (self.n_shards, self.world):
            raise ValueError(f"a snapshot of {state.shards} shard(s) and {state.world} worker(s) cannot restore "
                             f"a coordinator of {self.n_shards} and {self.world}")
        now = time.monotonic()
        memory = ReplyMemory(self.memory.limit)
        memory.load(state.memory)
        memory.repeats = state.repeats
        self.layout, self.architecture, self.ranges = state.layout, state.architecture, list(state.ranges)
        self.restored_endpoints = dict(state.endpoints)
        self.workers = {w.rank: WorkerInfo(rank=w.rank, name=w.name, joined_at=now, last_seen=now, done=w.done,
                                           lost=w.lost, samples=w.samples, nan_recoveries=w.nan_recoveries,
                                           report=dict(w.report), incarnation=w.incarnation, key=w.key)
                        for w in state.workers}
        self.memory = memory
        self.stop_requested = state.stop
        self.observers = {name: now for name in state.observers}
        self.refused = dict(state.refused)
        layout = state.layout
        log.info("restored %d worker(s) (%s done, %s lost)%s", len(self.workers),
                 sorted(w.rank for w in state.workers if w.done) or "none",
                 sorted(w.rank for w in state.workers if w.lost) or "none",
                 f" and the model ({len(layout.tensors)} tensors, {layout.total} floats)" if layout else ", no model yet")

    def _observe(self, msg: protocol.Message) -> None:
        """An observer names itself in MODEL and STATS; `--exit-when-done` waits for it to LEAVE."""
        name = hfield(msg.header, "observer", str, "")[:200]
        if name:
            self.observers[name] = time.monotonic()

    def _leave(self, msg: protocol.Message) -> list[Any]:
        self.observers.pop(hfield(msg.header, "observer", str, ""), None)
        return protocol.encode(ok())

    @property
    def gather(self) -> ShardStatsGather:
        if self._gather is None:
            self._gather = ShardStatsGather(self.socket.context, self.shard_timeout_s, self.curve)
        return self._gather

    def _stats(self, msg: protocol.Message) -> list[Any] | None:
        """Answered by `answer_stats` once every shard has answered its gather (or timed out); at once if no
        shard has registered, or if too many requesters wait already (then from the last gather's entries)."""
        self._observe(msg)
        if not self.endpoints:
            return self._stats_reply([])
        if self.gather.ask(self._requester):
            return None
        return self._stats_reply(self.gather.last)

    def _stats_reply(self, shards: list[dict[str, Any]]) -> list[Any]:
        return protocol.encode(ok(coordinator=self.summary(), shards=shards))

    def answer_stats(self, now: float) -> None:
        """Reply to the requesters of a STATS gather that is complete, and start the next; never blocks."""
        if self._gather is None:
            return
        done = self._gather.step(self.endpoints, now)
        if done is None:
            return
        requesters, shards = done
        reply = self._stats_reply(shards)
        for identity in requesters:
            try:
                self.socket.send_multipart([identity, *reply], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.debug("coordinator: STATS reply not sent: %s", exc)

    def close(self) -> None:
        """Close the sockets the coordinator made (not the one it was given)."""
        if self._gather is not None:
            self._gather.close()

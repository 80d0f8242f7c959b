"""A shard: one ROUTER socket that owns the slice [start, end) of the centre.

The shard is a single-threaded event loop. Every request is decoded and
checked by `pserver.protocol` before any state is read; a handler either
returns reply frames or parks the request: a synchronous round's until the
round closes, a push past the SSP bound until the gate (`pserver.ssp`) lets
it go, when it is applied and answered. A bad request gets an error reply, is
counted, and leaves the centre and the version unchanged: handlers validate
everything first and mutate last.

Retries. A client re-sends a request whose reply did not come, on a fresh
socket, so every op must be safe to receive twice:

- PUSH carries a per-worker sequence number: a push whose seq is not newer
  than the last one applied for that worker is answered again (with the
  apply's arrays, if it is the last one) but not applied again; one parked by
  the SSP gate is replaced by its retry, not parked twice.
- INIT: a second INIT of the same range changes nothing; the retry of the
  INIT that set the slice (same request id, ``rid``) is answered as it was,
  ``first`` true.
- ROUND: a retry while the round is open re-addresses the reply; a retry of
  the round that just closed is answered with that round's reply (the centre
  as it is now), not refused as out of order.
- BYE and LOST add workers to sets; PULL, STATS and PING change nothing.

Memory. The frame limit ZeroMQ enforces (`pserver.router`) is fixed at bind, before the layout is known:
``max_message_bytes`` must hold the largest slice an INIT may carry (the coordinator refuses an INIT
whose slices exceed it). Once the shard holds its slice, a message with an array frame larger than the
slice at the widest dtype is refused (``size``) before it is decoded: that bounds work; what bounds
memory is ZeroMQ's per-connection queue (`pserver.router.RCVHWM`), and against strangers only ``--keys``.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Callable

import numpy as np
import zmq

from pserver import applies, precision, protocol, router, security, shm, shm_reply
from pserver.applies import PushApply, ShardKernels
from pserver.centre import Centre
from pserver.errors import ConfigError, ProtocolError
from pserver.norms import NormGuard
from pserver.protocol import error, field as hfield, ok
from pserver.rounds import ClosedRound, Round
from pserver.ssp import StalenessGate
from pserver.shard_state import PushRecord, ShardConfig, ShardState, PendingPush
from pserver.stats import ShardStats

log = logging.getLogger(__name__)



def numba_kernels() -> ShardKernels:
    """`pserver.kernels`, compiled or loaded from numba's on-disk cache.

    Importing numba is most of a shard process's start-up (about 0.8 s warm),
    so `serve()` calls this only after the shard has registered: the server is
    ready sooner, and requests that arrive meanwhile queue in the socket.
    """
    from pserver import kernels

    kernels.warm_up()
    return kernels


class Shard:
    """The state machine of one shard, and its event loop.

    A PUSH or ROUND is applied by the `pserver.applies` plug-in its mode
    names; ``config.plugins`` are imported first, so their applies are served
    too. ``kernels`` are what the applies compute with; by default `serve()`
    loads the Numba ones (`numba_kernels`). ``socket`` is the ROUTER to reply
    on; by default one is created and bound as ``config`` says. Tests pass
    both and drive `handle()` with frames built by `pserver.protocol`.
    """

    def __init__(self, config: ShardConfig, context: zmq.Context | None = None, *,
                 kernels: ShardKernels | None = None, socket: Any = None, secret: bytes | None = None) -> None:
        applies.load_plugins(config.plugins)  # before binding: a missing module is a ConfigError, no port held
        if not 0 <= config.world <= protocol.MAX_WORLD:
            raise ConfigError(f"shard world {config.world} outside [0, {protocol.MAX_WORLD}]")
        self.config = config
        # The server's secret (pserver.security): with it, worker requests need the coordinator's ticket, an
        # INIT its signature, a LOST its proof. None (a shard started by hand, a test): none is asked for.
        self.secret = secret
        # With --keys: {public key: role} of the allow-list, and the sender of the request being handled.
        self.roles = security.key_roles(config.keys_dir) if config.keys_dir else None
        self._sender = ""
        if socket is None:
            socket, self.port = _bind(config, context or zmq.Context.instance())
        else:
            self.port = config.port
        self.socket = socket
        self.endpoint = f"{config.advertise_host or config.host}:{self.port}"
        self.kernels = kernels
        self.centre: Centre | None = None
        self.start = self.end = self.total = 0
        self.world = 0
        self.version = 0
        self.stats = ShardStats()
        self.lost: set[int] = set()
        self.left: set[int] = set()
        self.round = Round()
        self._pushes: dict[int, PushRecord] = {}
        self.segments = shm.ShardSegments(config.index)  # co-located workers' shared memory (SHM)
        self._init_rid: tuple[int, int] | None = None  # the request id of the INIT that set the slice
        self._closed: ClosedRound | None = None  # the round that closed last, for retries of it
        self._stopping = False
        self.on_tick: Callable[[], Any] | None = None  # called from the loop's timer (parent watch, checkpoints)
        self.fingerprint = ""  # the model's layout fingerprint, from INIT; kept in checkpoints
        self.norm_guard = NormGuard(config.max_delta_norm_factor) if config.max_delta_norm_factor else None
        self.gate: StalenessGate[PendingPush] | None = \
            StalenessGate(config.max_staleness) if config.max_staleness >= 0 else None
        self.handlers: dict[str, Callable[[bytes, protocol.Message], list[Any] | None]] = {
            "INIT": self._init, "PULL": self._pull, "PUSH": self._push, "ROUND": self._round_push,
            "BYE": self._bye, "STATS": self._stats, "PING": self._ping, "LOST": self._lost, "SHM": self._shm,
        }

    # ---- event loop -------------------------------------------------------

    def serve(self, ready: Callable[[], None] | None = None) -> None:
        if self.kernels is None:
            self.kernels = numba_kernels()
        if ready is not None:
            ready()
        router.serve(self.socket, self.handle, self.tick, lambda: self._stopping, self.config.poll_interval_s)
        log.info("shard %d stopping at version %d (largest update norm applied %.4g)", self.config.index,
                 self.version, self.stats.max_norm)

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
        self.socket.close(linger=0)
        self.close_segments()

    def close_segments(self) -> None:
        """Unmap the shared-memory segments and remove every name this shard created that is still there."""
        self.segments.close()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def handle(self, frames: list[Any]) -> None:
        """One request ``[identity, header, arrays...]`` (zmq.Frame): decode, dispatch, reply. Never raises."""
        if len(frames) < 2:
            self.stats.refused["malformed"] += 1
            return  # not even an identity and a header: nothing to answer to
        if self.kernels is None:
            self.kernels = numba_kernels()
        t0 = time.perf_counter()
        identity = frames[0].bytes
        body = frames[1:]
        self._sender = security.peer_key(body[0])
        size = sum(len(f) for f in body)
        self.stats.bytes_in += size
        self._respond(identity, self._dispatch, identity, body, size)
        self.stats.handle_s += time.perf_counter() - t0

    @property
    def frame_limit(self) -> int | None:
        """The largest array frame (bytes) decoded once the slice is set: a slice of the widest dtype that may
        travel (8 bytes), so that a slice of int64 is refused for its dtype. None before."""
        return None if self.centre is None else self.centre.size * max(d.itemsize for d in protocol.ALLOWED_DTYPES.values())

    def _dispatch(self, identity: bytes, body: list[Any], size: int = 0) -> list[Any] | None:
        limit = self.frame_limit
        largest = max((len(f) for f in body[1:]), default=0)
        if limit is not None and largest > limit:
            raise ProtocolError("size", f"a frame of {largest} bytes to shard {self.config.index}, which takes at most "
                                        f"{limit} (its slice [{self.start}, {self.end}) of {self.end - self.start} "
                                        f"floats, of 8 bytes at most); send one slice of float32 per frame")
        msg = protocol.decode(body)
        handler = self.handlers.get(msg.op)
        if handler is None:
            raise ProtocolError("unknown_op", f"op {msg.op!r} is not served by a shard; expected one of {sorted(self.handlers)}")
        security.check_role(self.roles, self._sender, msg.op, self.OP_ROLES, " to a shard")
        return handler(identity, msg)

    #: With --keys, the roles (pserver.security.ROLES) that may send each op to a shard. A PULL names a rank (with
    #: its ticket, bound to the key that joined) or `protocol.OBSERVER` (an evaluator's, even with a worker's key).
    OP_ROLES = {"INIT": ("worker",), "PUSH": ("worker",), "ROUND": ("worker",), "SHM": ("worker",),
                "BYE": ("worker",), "PULL": ("worker", "evaluator", "operator", "server"), "LOST": ("server",),
                "STATS": ("server", "evaluator", "operator", "worker"),
                "PING": ("server", "evaluator", "operator", "worker")}


    def _respond(self, identity: bytes, handler: Callable[..., list[Any] | None], *args: Any) -> None:
        """Run a handler; send its reply, or an error reply if it raised. State is mutated last, so a
        refused request leaves it unchanged."""
        try:
            reply = handler(*args)
        except ProtocolError as exc:
            self.stats.refused[exc.code] += 1
            log.debug("shard %d refused a message: %s", self.config.index, exc)
            reply = protocol.encode(error(exc.code, exc.reason))
        except Exception as exc:  # a bug must not take the shard down
            self.stats.refused["internal"] += 1
            log.exception("shard %d: internal error", self.config.index)
            reply = protocol.encode(error("internal", f"{type(exc).__name__}: {exc}"))
        if reply is not None:
            self._send(identity, reply)

    def _send(self, identity: bytes, frames: list[Any], track_centre: bool = False) -> None:
        self.stats.bytes_out += sum(len(f) for f in frames)
        try:
            tracker = self.socket.send_multipart([identity, *frames], copy=False, track=track_centre)
        except zmq.ZMQError as exc:  # peer gone: nothing else to do
            log.debug("shard %d: reply not sent: %s", self.config.index, exc)
            return
        if track_centre and self.centre is not None:
            self.centre.track(tracker)

    def _reply_with_centre(self, identity: bytes, header: dict[str, Any], extra: list[np.ndarray] = (),
                           wire: str = "float32") -> None:
        """Reply whose last frame is the current centre, sent zero-copy and tracked (or in ``wire`` form)."""
        assert self.centre is not None
        if wire != "float32" and precision.fits(self.centre.current, wire):
            self._send(identity, protocol.encode(header, [*extra, precision.narrow(self.centre.current, wire)]))
            return
        if self.centre.shared:  # its buffer is rewritten two updates on, maybe before ZeroMQ has sent it
            self._send(identity, protocol.encode(header, [*extra, self.centre.current.copy()]))
            return
        frames = protocol.encode(header, [*extra, self.centre.current])
        self._send(identity, frames, track_centre=True)

    # ---- checkpoints --------------------------------------------------------

    def snapshot(self) -> ShardState:
        """The state a checkpoint keeps; ValueError if the shard holds no weights yet."""
        if self.centre is None:
            raise ValueError(f"shard {self.config.index} holds no weights yet: nothing to snapshot")
        centre = self.centre.current.copy()
        centre.flags.writeable = False
        return ShardState(
            index=self.config.index, start=self.start, end=self.end, total=self.total, world=self.world,
            version=self.version, round=self.round.number, fingerprint=self.fingerprint,
            seqs={w: r.seq for w, r in self._pushes.items()},
            updates={w: int(n) for w, n in self.stats.updates.items()},
            lost=tuple(sorted(self.lost)), left=tuple(sorted(self.left)), centre=centre)

    def restore(self, state: ShardState) -> None:
        """Resume from a snapshot (before serving). A retried push whose seq the snapshot holds is
        answered, not applied again; its reply is approximated (version of the snapshot, staleness 0)."""
        if state.index != self.config.index:
            raise ValueError(f"a snapshot of shard {state.index} cannot restore shard {self.config.index}")
        if state.centre.dtype != np.float32 or state.centre.shape != (state.end - state.start,):
            raise ValueError(f"snapshot of shard {state.index}: centre {state.centre.dtype} {state.centre.shape} "
                             f"for range [{state.start}, {state.end})")
        self.centre = Centre(state.centre)
        self.start, self.end, self.total, self.world = state.start, state.end, state.total, state.world
        self.version = state.version
        self.round = Round(number=state.round)
        self.fingerprint = state.fingerprint
        self._pushes = {w: PushRecord(seq=s, reply=ok(version=state.version, staleness=0, applied=True))
                        for w, s in state.seqs.items()}
        for w, n in state.updates.items():
            self.stats.updates[w] = n
        self.lost, self.left = set(state.lost), set(state.left)

    # ---- helpers ----------------------------------------------------------

    def _require_ready(self) -> Centre:
        if self.centre is None:
            raise ProtocolError("not_ready", f"shard {self.config.index} holds no weights yet; the first worker must INIT")
        return self.centre

    def _one_slice(self, msg: protocol.Message, dtypes: tuple[str, ...] = ("<f4",)) -> np.ndarray:
        """The message's one array, of one of ``dtypes`` and as long as the slice (once there is one), as
        float32 (widened from a half-precision wire form: a new array)."""
        if len(msg.arrays) != 1:
            raise ProtocolError("frames", f"{msg.op} carries exactly one array frame, got {len(msg.arrays)}")
        arr = msg.arrays[0]
        if not any(arr.dtype == protocol.ALLOWED_DTYPES[d] for d in dtypes):
            raise ProtocolError("dtype", f"{msg.op} needs one of {list(dtypes)}, got {msg.header['arrays'][0][0]!r}")
        if self.centre is not None and arr.shape[0] != self.centre.size:
            raise ProtocolError("size", f"{msg.op} array has {arr.shape[0]} floats, shard {self.config.index} owns "
                                        f"[{self.start}, {self.end}) = {self.centre.size}")
        return precision.widen(arr)

    @staticmethod
    def _wire(header: dict[str, Any]) -> str:
        wire = hfield(header, "wire", str, "float32")
        if wire not in precision.WIRE:
            raise ProtocolError("malformed", f"header field 'wire' must be one of {list(precision.WIRE)}, got {wire!r:.40}")
        return wire

    def _worker(self, header: dict[str, Any], observer: bool = False) -> int:
        """The request's worker: a rank of the world (or, if ``observer``, `protocol.OBSERVER`), carrying the
        coordinator's ticket for it when the shard has the server's secret (and, with --keys, sent with the key
        the rank joined with); ProtocolError naming what is wrong."""
        w = hfield(header, "worker", int)
        world = self.world or self.config.world
        if observer and w == protocol.OBSERVER:  # reads only, and its per-worker state is this one entry
            return w
        if not 0 <= w < (world or protocol.MAX_WORLD):
            raise ProtocolError("malformed", f"worker {w} is outside the world of {world or protocol.MAX_WORLD}; "
                                             f"a worker sends the rank the coordinator gave it at JOIN")
        if self.secret is not None:
            inc = hfield(header, "inc", int, 0)
            if not (1 <= inc <= protocol.MAX_INCARNATION
                    and security.verify(self.secret, header.get("ticket"), "worker", w, inc, self._sender)):
                raise ProtocolError("ticket", f"no valid ticket for worker {w} incarnation {inc}: send the "
                                              f"ticket and incarnation the coordinator's JOIN gave this rank"
                                              + (" (with the key it joined with)" if self.roles is not None else ""))
        return w

    def _seq(self, header: dict[str, Any]) -> int:
        """A push's seq: below 2^63, and with the server's secret within its (ticketed) incarnation's range."""
        seq = hfield(header, "seq", int)
        if not 0 <= seq < protocol.SEQ_LIMIT:
            raise ProtocolError("malformed", f"seq {seq} outside [0, 2^63)")
        if self.secret is not None:
            inc = header["inc"]  # checked by _worker
            low, high = (inc - 1) << protocol.INCARNATION_SHIFT, inc << protocol.INCARNATION_SHIFT
            if not low <= seq < high:
                raise ProtocolError("malformed", f"seq {seq} is not one of incarnation {inc}'s, [{low}, {high}); "
                                                 f"number pushes past the incarnation's first, as JOIN said")
        return seq

    # ---- handlers ---------------------------------------------------------

    def _ping(self, identity: bytes, msg: protocol.Message) -> list[Any]:
        return protocol.encode(ok(shard=self.config.index, version=self.version))

    def _init(self, identity: bytes, msg: protocol.Message) -> list[Any]:
        h = msg.header
        start, end, total = hfield(h, "start", int), hfield(h, "end", int), hfield(h, "total", int)
        world = hfield(h, "world", int)
        if not (0 <= start < end <= total < protocol.MAX_TOTAL) or not 1 <= world <= protocol.MAX_WORLD:
            raise ProtocolError("malformed", f"INIT range [{start}, {end}) of {total} with world {world} is not valid: "
                                             f"0 <= start < end <= total < 2^40, 1 <= world <= {protocol.MAX_WORLD}")
        if self.config.world and world != self.config.world:
            raise ProtocolError("mismatch", f"INIT says world {world}, the server's is {self.config.world}")
        fingerprint = hfield(h, "fingerprint", str, "")
        if self.secret is not None and not security.verify(self.secret, h.get("ticket"), "init", self.config.index,
                                                            start, end, total, world, fingerprint):
            raise ProtocolError("ticket", f"INIT of [{start}, {end}) of {total}, world {world}, is not the slice the "
                                          f"coordinator assigned shard {self.config.index}: send the ticket its INIT "
                                          f"reply gave for this shard")
        rid = protocol.check_rid(hfield(h, "rid", list, None))
        arr = self._one_slice(msg)
        if arr.shape[0] != end - start:
            raise ProtocolError("size", f"INIT slice has {arr.shape[0]} floats for range [{start}, {end})")
        if self.centre is not None:
            if (start, end, total) != (self.start, self.end, self.total):
                raise ProtocolError("mismatch", f"shard {self.config.index} already holds [{self.start}, {self.end}) "
                                                f"of {self.total}; INIT asked for [{start}, {end}) of {total}")
            return protocol.encode(ok(first=rid is not None and rid == self._init_rid, version=self.version))
        finite, _ = self.kernels.check(arr)
        if not finite:
            raise ProtocolError("not_finite", "INIT weights contain NaN or Inf")
        self.centre = Centre(arr)
        self.start, self.end, self.total, self.world = start, end, total, world
        self.fingerprint = fingerprint[:128]
        self._init_rid = rid
        log.info("shard %d initialised: [%d, %d) of %d floats, world %d", self.config.index, start, end, total, world)
        return protocol.encode(ok(first=True, version=self.version))

    def _pull(self, identity: bytes, msg: protocol.Message) -> list[Any] | None:
        self._require_ready()
        worker = self._worker(msg.header, observer=True)
        segment = self._push_segment(worker, hfield(msg.header, "shm", int, 0))
        wire = self._wire(msg.header)
        if msg.arrays:
            raise ProtocolError("frames", f"PULL carries no array frame, got {len(msg.arrays)}")
        self.stats.pulls[worker] += 1
        if segment is not None:  # the worker reads the centre from the shard's segment
            return protocol.encode(*shm_reply.encode(ok(version=self.version)))
        self._reply_with_centre(identity, ok(version=self.version), wire=wire)
        return None

    def _shm(self, identity: bytes, msg: protocol.Message) -> list[Any]:
        """A worker on this host asks for shared memory: the centre's segment and a push segment of its own."""
        centre = self._require_ready()
        worker = self._worker(msg.header)
        if msg.arrays:
            raise ProtocolError("frames", f"SHM carries no array frame, got {len(msg.arrays)}")
        if worker >= self.world:
            raise ProtocolError("malformed", f"worker {worker} is outside the world of {self.world}: only a worker "
                                             f"of the world gets a push segment")
        if not shm.available():
            raise ProtocolError("shm", f"shard {self.config.index} has no {shm.SHM_DIR}; exchange over ZeroMQ")
        try:
            segment = self.segments.grant(worker, centre, self.version)
        except OSError as exc:
            raise ProtocolError("shm", f"shard {self.config.index} cannot create a shared-memory segment "
                                       f"({exc}); exchange over ZeroMQ") from None
        assert centre.segment is not None
        return protocol.encode(ok(n=centre.size, centre=centre.segment.name, centre_token=centre.segment.token,
                                  push=segment.name, push_token=segment.token))

    def _push_segment(self, worker: int, token: int) -> shm.Segment | None:
        """The worker's push segment for a request that names it by token (0: none, over ZeroMQ)."""
        if not token:
            return None
        segment = self.segments.find(worker, token)
        if segment is None:
            raise ProtocolError("shm", f"worker {worker} has no push segment {token:#x} at shard {self.config.index} "
                                       f"(restarted?); ask for one with SHM, or send the arrays as frames")
        return segment

    def _push(self, identity: bytes, msg: protocol.Message) -> list[Any] | None:
        self._require_ready()
        h = msg.header
        worker = self._worker(h)
        seq = self._seq(h)
        pulled = hfield(h, "pulled", int)
        mode = hfield(h, "mode", str)
        scale = float(hfield(h, "scale", (int, float), 1.0))
        want_pull = hfield(h, "pull", bool, False)
        segment = self._push_segment(worker, hfield(h, "shm", int, 0))
        wire = self._wire(h)
        apply = applies.push_apply(mode)
        if not np.isfinite(scale):
            raise ProtocolError("not_finite", f"PUSH scale {scale!r} is not finite")
        if segment is not None:
            if msg.arrays:
                raise ProtocolError("frames", f"a PUSH through shared memory carries no array frame, got {len(msg.arrays)}")
            delta = segment.buffers[0]  # (n,) the worker wrote its array there before sending this header
        else:
            delta = self._one_slice(msg, protocol.PUSH_DTYPES)

        last = self._pushes.get(worker)
        if last is not None and seq <= last.seq:
            # A retry of a push we applied (its reply was lost), or an older one: answer, don't apply.
            self.stats.duplicates[worker] += 1
            header = dict(last.reply, applied=False, version=self.version)
            extra = last.extra if seq == last.seq else []
            return self._push_reply(identity, header, extra, want_pull, segment, wire)

        push = PendingPush(identity, worker, seq, pulled, apply, scale, want_pull, delta, segment, wire)
        if self.gate is not None and not self.gate.admit(worker, push, self.live_workers(), self.stats.updates):
            return None  # SSP: parked; applied and answered when the slowest live worker has caught up
        return self._apply_push(push)

    def _apply_push(self, push: PendingPush) -> list[Any] | None:
        centre = self._require_ready()
        worker = push.worker
        staleness = max(self.version - push.pulled, 0)
        out = centre.scratch()
        # A co-located worker that asks for the centre back gets it in its reply area, written in the apply's pass.
        copy = push.segment.buffers[1] if push.segment is not None and push.pull and push.apply.copies else None
        also = {} if copy is None else {"copy": copy}  # an apply that `copies` takes it; others are not asked
        t0 = time.perf_counter()
        finite, norm, extra = push.apply.apply(self.kernels, centre.current, push.delta, push.scale, staleness, out,
                                               **also)
        self.stats.apply_s += time.perf_counter() - t0
        if not finite:
            centre.discard(out)
            if self.kernels.check(push.delta)[0]:  # a finite array whose result is not: the centre would overflow
                self.stats.overflows[worker] += 1
                raise ProtocolError("not_finite", f"update from worker {worker} is finite but the centre plus it is "
                                                  f"not (float32 overflow); the centre is unchanged")
            raise ProtocolError("not_finite", f"update from worker {worker} contains NaN or Inf; the centre is unchanged")
        limit = self.config.max_delta_norm
        if limit and norm > limit:
            centre.discard(out)
            raise ProtocolError("too_large", f"update norm {norm:.4g} from worker {worker} exceeds --max-delta-norm {limit:g}")
        if self.norm_guard is not None and (why := self.norm_guard.refuse(norm)):
            centre.discard(out)
            raise ProtocolError("too_large", f"worker {worker}: {why}")

        centre.commit(out, self.version + 1)
        self.version += 1
        self.stats.updates[worker] += 1
        self.stats.record_staleness(worker, staleness)
        self.stats.last_norm[worker] = norm
        self.stats.max_norm = max(self.stats.max_norm, norm)
        reply = ok(version=self.version, staleness=staleness, applied=True, norm=norm)
        self._pushes[worker] = PushRecord(seq=push.seq, reply=reply, extra=extra)
        if self.norm_guard is not None:
            self.norm_guard.accept(norm)
        if self.gate is not None:
            self.gate.record(worker, self.live_workers(), self.stats.updates)
            self._release_parked()
        return self._push_reply(push.identity, reply, extra, push.pull, push.segment, push.wire,
                                centre_copied=copy is not None)

    def _push_reply(self, identity: bytes, header: dict[str, Any], extra: list[np.ndarray], pull: bool,
                    segment: shm.Segment | None, wire: str = "float32", centre_copied: bool = False) -> list[Any] | None:
        """A PUSH's reply: its arrays as frames, or through the worker's segment (its reply area; the centre
        in the shard's segment, or in the reply area if the apply wrote it there: ``centre_copied``), the
        header saying so."""
        if segment is not None:
            return protocol.encode(*shm_reply.encode(header, extra, segment.buffers[1], centre_copied))
        if pull:
            self._reply_with_centre(identity, header, extra, wire)
            return None
        return protocol.encode(header, extra)

    def _release_parked(self) -> None:
        """Apply and answer the parked pushes the SSP gate lets go now (after an update, a BYE or a LOST)."""
        if self.gate is None:
            return
        for push in self.gate.release(self.live_workers(), self.stats.updates):
            self._respond(push.identity, self._apply_push, push)

    # ---- synchronous rounds -------------------------------------------------

    def live_workers(self) -> set[int]:
        """The ranks a synchronous round and the SSP gate wait for: in the world, neither lost nor gone."""
        return set(range(self.world)) - self.lost - self.left

    def _round_push(self, identity: bytes, msg: protocol.Message) -> list[Any] | None:
        centre = self._require_ready()
        h = msg.header
        worker = self._worker(h)
        number = hfield(h, "round", int)
        mode = hfield(h, "mode", str)
        alpha = float(hfield(h, "alpha", (int, float), 1.0))
        apply = applies.round_apply(mode)
        if worker >= self.world:
            raise ProtocolError("malformed", f"worker {worker} is outside the world of {self.world}")
        value = self._one_slice(msg)
        rnd, closed = self.round, self._closed
        if closed is not None and closed.answers(number, worker):
            # A retry of the round that closed (its reply was lost): answer as then, with the centre as it is now.
            self._reply_with_centre(identity, dict(closed.header, version=self.version), closed.extras[worker])
            return None
        rnd.check(worker, number, mode, self.config.index)
        if worker in rnd.contributors:  # a retry from a new socket: answer there
            rnd.contributors[worker] = (identity, rnd.contributors[worker][1])
            return None
        finite, _ = self.kernels.check(value)
        if not finite:
            raise ProtocolError("not_finite", f"round {number} value from worker {worker} contains NaN or Inf")
        rnd.add(worker, identity, apply, mode, centre.current, value, alpha, self.world, time.monotonic())
        self.lost.discard(worker)  # a worker declared lost that comes back rejoins here
        self._close_round_if_complete()
        return None

    def _close_round_if_complete(self) -> None:
        if self.round.can_close(self.live_workers()):
            self._close_round()

    def _close_round(self) -> None:
        rnd = self.round
        centre = self.centre
        assert centre is not None and rnd.rows is not None and rnd.apply is not None
        count = len(rnd.contributors)
        out = centre.scratch()
        finite = rnd.apply.close(self.kernels, centre.current, rnd.rows, count, out)
        rows, contributors = rnd.rows, rnd.contributors
        if finite is False:  # finite rows whose sum overflows float32: the round moves on, the centre does not
            centre.discard(out)
            for worker in contributors:
                self.stats.overflows[worker] += 1
            self.stats.refused["not_finite"] += 1
            log.warning("shard %d: round %d's result is not finite (float32 overflow); the centre is unchanged",
                        self.config.index, rnd.number)
            self.round = rnd.next()
            # Answered as a round the worker missed: it pulls the unchanged centre and goes on from the next one.
            frames = protocol.encode(error("round", f"round {rnd.number}'s result is not finite (float32 overflow) "
                                                    f"and was not applied; pull the centre and continue from round "
                                                    f"{rnd.number + 1}"))
            self._closed = None
            for identity, _ in contributors.values():
                self._send(identity, frames)
            return
        centre.commit(out, self.version + 1)
        self.version += 1
        for worker in rnd.contributors:
            self.stats.updates[worker] += 1
            self.stats.record_staleness(worker, 0)
        log.debug("shard %d closed round %d with %d worker(s)", self.config.index, rnd.number, count)
        self.round = rnd.next()
        header = ok(version=self.version, round=self.round.number, workers=count)
        extras = {worker: rnd.apply.reply_arrays(rows[row]) for worker, (_, row) in contributors.items()}
        self._closed = ClosedRound(rnd.number, header, extras)
        for worker, (identity, _) in contributors.items():
            self._reply_with_centre(identity, header, extras[worker])

    def tick(self, now: float) -> None:
        """Timers: ``on_tick``, a round open too long, pushes parked too long. The loop calls it every poll."""
        if self.on_tick is not None:
            self.on_tick()
        rnd = self.round
        if rnd.overdue(now, self.config.round_timeout_s):
            missing = sorted(self.live_workers() - set(rnd.contributors))
            log.warning("shard %d: round %d closes without worker(s) %s after %.1f s; they are marked lost",
                        self.config.index, rnd.number, missing, self.config.round_timeout_s)
            self.lost.update(missing)
            self._close_round()
        if self.gate is not None:
            overdue = self.gate.overdue(now, self.config.round_timeout_s, self.live_workers(), self.stats.updates)
            if overdue is not None:
                log.warning("shard %d: worker(s) %s waited %.1f s for worker(s) %s to catch up; those are marked lost",
                            self.config.index, overdue.waiting, self.config.round_timeout_s, overdue.laggards)
                self.lost.update(overdue.laggards)
                self._release_parked()

    def _bye(self, identity: bytes, msg: protocol.Message) -> list[Any]:
        worker = self._worker(msg.header)
        self.left.add(worker)
        self.segments.drop(worker)
        self._close_round_if_complete()
        self._release_parked()
        return protocol.encode(ok())

    def _lost(self, identity: bytes, msg: protocol.Message) -> list[Any]:
        """The coordinator's word on workers: declared lost (silent) or done; neither is waited for."""
        lost, done = hfield(msg.header, "lost", list), hfield(msg.header, "done", list, [])
        world = self.world or self.config.world or protocol.MAX_WORLD
        if msg.arrays or not all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w < world
                                 for w in [*lost, *done]) or len(lost) + len(done) > 2 * world:
            raise ProtocolError("malformed", f"LOST carries lists of worker ids in [0, {world}) and no array frame")
        if self.secret is not None and security.role_of(self.roles, self._sender) != "server" \
                and not security.verify(self.secret, msg.header.get("proof"), "lost", lost, done):
            raise ProtocolError("ticket", "LOST without the server's proof: only the coordinator tells a shard who "
                                          "is lost or done")
        new = set(lost) - self.lost
        if new:
            log.info("shard %d: coordinator declared worker(s) %s lost", self.config.index, sorted(new))
        self.lost.update(lost)
        self.left.update(done)
        self._close_round_if_complete()
        self._release_parked()
        return protocol.encode(ok())

    def _stats(self, identity: bytes, msg: protocol.Message) -> list[Any]:
        s = self.stats.to_wire()
        s.update(shard=self.config.index, pid=os.getpid(), endpoint=self.endpoint, start=self.start, end=self.end, total=self.total,
                 version=self.version, initialised=self.centre is not None, world=self.world,
                 round=self.round.number, lost=sorted(self.lost), left=sorted(self.left))
        if self.gate is not None:
            s["ssp"] = self.gate.to_wire()
        return protocol.encode(ok(stats=s))


def _bind(config: ShardConfig, context: zmq.Context) -> tuple[zmq.Socket, int]:
    """The shard's ROUTER, bound as ``config`` says (its frame limit read now: see the module docstring)."""
    return router.bind_router(context, config.host, config.port, config.max_message_bytes, config.keys_dir)

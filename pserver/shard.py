"""A shard: one ROUTER socket that owns the slice [start, end) of the centre.

The shard is a single-threaded event loop. Every request is decoded and
checked by `pserver.protocol` before any state is read; a handler either
returns reply frames or parks the request: a synchronous round's until the
round closes, a push past the SSP bound until the gate (`pserver.ssp`) lets
it go, when it is applied and answered. A bad request gets an error reply, is
counted, and leaves the centre and the version unchanged: handlers validate
everything first and mutate last.

Because of retry logic, pushes are made idempotent by a per-worker sequence
number: a push whose seq is not newer than the last one applied for that
worker is answered again but not applied again.
"""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zmq

from pserver import applies, protocol, security
from pserver.applies import PushApply, RoundApply, ShardKernels
from pserver.centre import Centre
from pserver.errors import ProtocolError
from pserver.norms import NormGuard
from pserver.protocol import error, field as hfield, ok
from pserver.ssp import StalenessGate
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


@dataclass(frozen=True)
class ShardConfig:
    index: int = 0
    host: str = "127.0.0.1"
    port: int = 0  # 0: a port chosen by the OS
    advertise_host: str | None = None  # the host workers should dial, if not `host`
    max_message_bytes: int = 1 << 31  # ZeroMQ drops a peer that sends a larger frame
    max_delta_norm: float = 0.0  # 0: no limit; else larger updates are refused
    # A synchronous round closes without the missing workers after this; they are marked lost and the world
    # shrinks for the rest of the run. 60 s, not local mode's former 30 s: dropping a slow but live worker
    # (a GC pause, a busy or slower host, a long averaging window) costs it for good, waiting for a dead one
    # costs the seconds once. The one default: ServerConfig, `pserver start` and `notpu train` take it from here.
    round_timeout_s: float = 60.0
    poll_interval_s: float = 0.1  # how often timers (round timeout, checkpoints) are looked at
    max_delta_norm_factor: float = 0.0  # 0: off; else refuse norms over F × running median (pserver.norms)
    max_staleness: int = -1  # -1: off; else SSP bound on clock gaps (pserver.ssp)
    keys_dir: str | None = None  # CurveZMQ server keys and allow-list (pserver.security)
    # Modules the shard imports at start, by name, that register shard-side applies (pserver.applies) beyond
    # the built-ins: how a rule with its own apply reaches the shards. `pserver` names none itself.
    plugins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "plugins", tuple(self.plugins))  # a JSON list, as handed to a shard process


@dataclass(frozen=True)
class ShardState:
    """What a shard needs to resume serving: its range, clocks, per-worker seq table and weights.

    `Shard.snapshot()` returns one; `Shard.restore()` takes one. ``centre`` is
    a read-only copy, so a snapshot stays valid while the shard goes on. A
    checkpoint file (`pserver.checkpoint`) holds these fields: the centre as
    its array, every other one in its JSON header.
    """

    index: int
    start: int
    end: int
    total: int
    world: int
    version: int
    round: int  # the number of the synchronous round now open
    fingerprint: str  # the model's layout fingerprint, from INIT
    seqs: dict[int, int]  # worker -> seq of the last push applied
    updates: dict[int, int]  # worker -> updates applied (the SSP clocks)
    lost: tuple[int, ...]
    left: tuple[int, ...]
    centre: np.ndarray  # (end − start,) float32


@dataclass
class _PushRecord:
    seq: int
    reply: dict[str, Any]
    extra: list[np.ndarray] = field(default_factory=list)  # the apply's reply arrays (elastic: E), re-sent on a retry


@dataclass(frozen=True)
class _Push:
    """A PUSH that passed every check, ready to apply (now, or when the SSP gate releases it)."""

    identity: bytes
    worker: int
    seq: int
    pulled: int
    apply: PushApply  # the mode's
    scale: float
    pull: bool
    delta: np.ndarray  # a view on the received frame


@dataclass
class _Round:
    number: int = 0
    mode: str = ""
    apply: RoundApply | None = None  # the mode's, from the round's first contribution
    opened_at: float = 0.0
    rows: np.ndarray | None = None  # (world, n) float32, one row per contributor
    contributors: dict[int, tuple[bytes, int]] = field(default_factory=dict)  # worker -> (identity, row)


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
                 kernels: ShardKernels | None = None, socket: Any = None) -> None:
        applies.load_plugins(config.plugins)  # before binding: a missing module is a ConfigError, no port held
        self.config = config
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
        self.round = _Round()
        self._pushes: dict[int, _PushRecord] = {}
        self._stopping = False
        self.on_tick: Callable[[], Any] | None = None  # called from the loop's timer (parent watch, checkpoints)
        self.fingerprint = ""  # the model's layout fingerprint, from INIT; kept in checkpoints
        self.norm_guard = NormGuard(config.max_delta_norm_factor) if config.max_delta_norm_factor else None
        self.gate: StalenessGate[_Push] | None = \
            StalenessGate(config.max_staleness) if config.max_staleness >= 0 else None
        self.handlers: dict[str, Callable[[bytes, protocol.Message], list[Any] | None]] = {
            "INIT": self._init, "PULL": self._pull, "PUSH": self._push, "ROUND": self._round_push,
            "BYE": self._bye, "STATS": self._stats, "PING": self._ping, "LOST": self._lost,
        }

    # ---- event loop -------------------------------------------------------

    def serve(self, ready: Callable[[], None] | None = None) -> None:
        if self.kernels is None:
            self.kernels = numba_kernels()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        if ready is not None:
            ready()
        timeout_ms = int(self.config.poll_interval_s * 1000)
        while not self._stopping:
            if poller.poll(timeout_ms):
                # Drain what is queued before looking at timers again.
                for _ in range(64):
                    try:
                        frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.handle(frames)
            self.tick(time.monotonic())
        log.info("shard %d stopping at version %d", self.config.index, self.version)

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
        self.socket.close(linger=0)

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
        identity = frames[0].bytes
        body = frames[1:]
        self.stats.bytes_in += sum(len(f) for f in body)
        self._respond(identity, self._dispatch, identity, body)

    def _dispatch(self, identity: bytes, body: list[Any]) -> list[Any] | None:
        msg = protocol.decode(body)
        handler = self.handlers.get(msg.op)
        if handler is None:
            raise ProtocolError("unknown_op", f"op {msg.op!r} is not served by a shard; expected one of {sorted(self.handlers)}")
        return handler(identity, msg)

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

    def _reply_with_centre(self, identity: bytes, header: dict[str, Any], extra: list[np.ndarray] = ()) -> None:
        """Reply whose last frame is the current centre, sent zero-copy and tracked."""
        assert self.centre is not None
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
        self.round = _Round(number=state.round)
        self.fingerprint = state.fingerprint
        self._pushes = {w: _PushRecord(seq=s, reply=ok(version=state.version, staleness=0, applied=True))
                        for w, s in state.seqs.items()}
        for w, n in state.updates.items():
            self.stats.updates[w] = n
        self.lost, self.left = set(state.lost), set(state.left)

    # ---- helpers ----------------------------------------------------------

    def _require_ready(self) -> Centre:
        if self.centre is None:
            raise ProtocolError("not_ready", f"shard {self.config.index} holds no weights yet; the first worker must INIT")
        return self.centre

    def _one_slice(self, msg: protocol.Message) -> np.ndarray:
        if len(msg.arrays) != 1:
            raise ProtocolError("frames", f"{msg.op} carries exactly one array frame, got {len(msg.arrays)}")
        arr = msg.arrays[0]
        if arr.dtype != np.float32:
            raise ProtocolError("dtype", f"{msg.op} needs float32 ('<f4'), got {arr.dtype.str!r}")
        if self.centre is not None and arr.shape[0] != self.centre.size:
            raise ProtocolError("size", f"{msg.op} array has {arr.shape[0]} floats, shard {self.config.index} owns "
                                        f"[{self.start}, {self.end}) = {self.centre.size}")
        return arr

    @staticmethod
    def _worker(header: dict[str, Any]) -> int:
        w = hfield(header, "worker", int)
        if not 0 <= w < 1 << 31:
            raise ProtocolError("malformed", f"worker id {w} out of range [0, 2^31)")
        return w

    # ---- handlers ---------------------------------------------------------

    def _ping(self, identity: bytes, msg: protocol.Message) -> list[Any]:
        return protocol.encode(ok(shard=self.config.index, version=self.version))

    def _init(self, identity: bytes, msg: protocol.Message) -> list[Any]:
        h = msg.header
        start, end, total = hfield(h, "start", int), hfield(h, "end", int), hfield(h, "total", int)
        world = hfield(h, "world", int)
        if not (0 <= start < end <= total) or world < 1:
            raise ProtocolError("malformed", f"INIT range [{start}, {end}) of {total} with world {world} is not valid")
        arr = self._one_slice(msg)
        if arr.shape[0] != end - start:
            raise ProtocolError("size", f"INIT slice has {arr.shape[0]} floats for range [{start}, {end})")
        if self.centre is not None:
            if (start, end, total) != (self.start, self.end, self.total):
                raise ProtocolError("mismatch", f"shard {self.config.index} already holds [{self.start}, {self.end}) "
                                                f"of {self.total}; INIT asked for [{start}, {end}) of {total}")
            return protocol.encode(ok(first=False, version=self.version))
        finite, _ = self.kernels.check(arr)
        if not finite:
            raise ProtocolError("not_finite", "INIT weights contain NaN or Inf")
        self.centre = Centre(arr)
        self.start, self.end, self.total, self.world = start, end, total, world
        self.fingerprint = hfield(h, "fingerprint", str, "")[:128]
        log.info("shard %d initialised: [%d, %d) of %d floats, world %d", self.config.index, start, end, total, world)
        return protocol.encode(ok(first=True, version=self.version))

    def _pull(self, identity: bytes, msg: protocol.Message) -> None:
        self._require_ready()
        worker = self._worker(msg.header)
        if msg.arrays:
            raise ProtocolError("frames", f"PULL carries no array frame, got {len(msg.arrays)}")
        self.stats.pulls[worker] += 1
        self._reply_with_centre(identity, ok(version=self.version))
        return None

    def _push(self, identity: bytes, msg: protocol.Message) -> list[Any] | None:
        self._require_ready()
        h = msg.header
        worker = self._worker(h)
        seq = hfield(h, "seq", int)
        pulled = hfield(h, "pulled", int)
        mode = hfield(h, "mode", str)
        scale = float(hfield(h, "scale", (int, float), 1.0))
        want_pull = hfield(h, "pull", bool, False)
        apply = applies.push_apply(mode)
        if not np.isfinite(scale):
            raise ProtocolError("not_finite", f"PUSH scale {scale!r} is not finite")
        delta = self._one_slice(msg)

        last = self._pushes.get(worker)
        if last is not None and seq <= last.seq:
            # A retry of a push we applied (its reply was lost), or an older one: answer, don't apply.
            self.stats.duplicates[worker] += 1
            header = dict(last.reply, applied=False, version=self.version)
            extra = last.extra if seq == last.seq else []
            if want_pull:
                self._reply_with_centre(identity, header, extra)
                return None
            return protocol.encode(header, extra)

        push = _Push(identity, worker, seq, pulled, apply, scale, want_pull, delta)
        if self.gate is not None and not self.gate.admit(worker, push, self.live_workers(), self.stats.updates):
            return None  # SSP: parked; applied and answered when the slowest live worker has caught up
        return self._apply_push(push)

    def _apply_push(self, push: _Push) -> list[Any] | None:
        centre = self._require_ready()
        worker = push.worker
        staleness = max(self.version - push.pulled, 0)
        out = centre.scratch()
        finite, norm, extra = push.apply.apply(self.kernels, centre.current, push.delta, push.scale, staleness, out)
        if not finite:
            centre.discard(out)
            raise ProtocolError("not_finite", f"update from worker {worker} contains NaN or Inf; the centre is unchanged")
        limit = self.config.max_delta_norm
        if limit and norm > limit:
            centre.discard(out)
            raise ProtocolError("too_large", f"update norm {norm:.4g} from worker {worker} exceeds --max-delta-norm {limit:g}")
        if self.norm_guard is not None and (why := self.norm_guard.refuse(norm)):
            centre.discard(out)
            raise ProtocolError("too_large", f"worker {worker}: {why}")

        centre.commit(out)
        self.version += 1
        self.stats.updates[worker] += 1
        self.stats.record_staleness(worker, staleness)
        self.stats.last_norm[worker] = norm
        reply = ok(version=self.version, staleness=staleness, applied=True, norm=norm)
        self._pushes[worker] = _PushRecord(seq=push.seq, reply=reply, extra=extra)
        if self.norm_guard is not None:
            self.norm_guard.accept(norm)
        if self.gate is not None:
            self.gate.record(worker, self.live_workers(), self.stats.updates)
            self._release_parked()
        if push.pull:
            self._reply_with_centre(push.identity, reply, extra)
            return None
        return protocol.encode(reply, extra)

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
        rnd = self.round
        if number != rnd.number:
            raise ProtocolError("round", f"worker {worker} sent round {number}, shard {self.config.index} is at round "
                                         f"{rnd.number}; pull the centre and continue from round {rnd.number}")
        if rnd.contributors and mode != rnd.mode:
            raise ProtocolError("round", f"round {number} is a {rnd.mode!r} round, worker {worker} sent {mode!r}")
        if worker in rnd.contributors:  # a retry from a new socket: answer there
            rnd.contributors[worker] = (identity, rnd.contributors[worker][1])
            return None
        finite, _ = self.kernels.check(value)
        if not finite:
            raise ProtocolError("not_finite", f"round {number} value from worker {worker} contains NaN or Inf")
        if rnd.rows is None or not rnd.contributors:
            rnd.rows = np.empty((self.world, centre.size), np.float32)  # (workers, n)
            rnd.mode, rnd.apply = mode, apply
            rnd.opened_at = time.monotonic()
        row = len(rnd.contributors)
        apply.row(centre.current, value, alpha, rnd.rows[row])  # against this round's centre
        rnd.contributors[worker] = (identity, row)
        self.lost.discard(worker)  # a worker declared lost that comes back rejoins here
        if self.live_workers() <= set(rnd.contributors):
            self._close_round()
        return None

    def _close_round(self) -> None:
        rnd = self.round
        centre = self.centre
        assert centre is not None and rnd.rows is not None and rnd.apply is not None
        count = len(rnd.contributors)
        out = centre.scratch()
        rnd.apply.close(self.kernels, centre.current, rnd.rows, count, out)
        centre.commit(out)
        self.version += 1
        for worker in rnd.contributors:
            self.stats.updates[worker] += 1
            self.stats.record_staleness(worker, 0)
        log.debug("shard %d closed round %d with %d worker(s)", self.config.index, rnd.number, count)
        rows, contributors = rnd.rows, rnd.contributors
        self.round = _Round(number=rnd.number + 1)
        header = ok(version=self.version, round=self.round.number, workers=count)
        for worker, (identity, row) in contributors.items():
            self._reply_with_centre(identity, header, rnd.apply.reply_arrays(rows[row]))

    def tick(self, now: float) -> None:
        """Timers: ``on_tick``, a round open too long, pushes parked too long. The loop calls it every poll."""
        if self.on_tick is not None:
            self.on_tick()
        rnd = self.round
        if rnd.contributors and now - rnd.opened_at > self.config.round_timeout_s:
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
        rnd = self.round
        if rnd.contributors and self.live_workers() <= set(rnd.contributors):
            self._close_round()
        self._release_parked()
        return protocol.encode(ok())

    def _lost(self, identity: bytes, msg: protocol.Message) -> list[Any]:
        """The coordinator's word on workers: declared lost (silent) or done; neither is waited for."""
        lost, done = hfield(msg.header, "lost", list), hfield(msg.header, "done", list, [])
        if msg.arrays or not all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w < 1 << 31
                                 for w in [*lost, *done]) or len(lost) + len(done) > 1 << 16:
            raise ProtocolError("malformed", "LOST carries lists of worker ids in [0, 2^31) and no array frame")
        new = set(lost) - self.lost
        if new:
            log.info("shard %d: coordinator declared worker(s) %s lost", self.config.index, sorted(new))
        self.lost.update(lost)
        self.left.update(done)
        rnd = self.round
        if rnd.contributors and self.live_workers() <= set(rnd.contributors):
            self._close_round()
        self._release_parked()
        return protocol.encode(ok())

    def _stats(self, identity: bytes, msg: protocol.Message) -> list[Any]:
        s = self.stats.to_wire()
        s.update(shard=self.config.index, endpoint=self.endpoint, start=self.start, end=self.end, total=self.total,
                 version=self.version, initialised=self.centre is not None, world=self.world,
                 round=self.round.number, lost=sorted(self.lost), left=sorted(self.left))
        if self.gate is not None:
            s["ssp"] = self.gate.to_wire()
        return protocol.encode(ok(stats=s))


def _bind(config: ShardConfig, context: zmq.Context) -> tuple[zmq.Socket, int]:
    """The shard's ROUTER, bound as ``config`` says; returns it and its port."""
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, int(config.max_message_bytes))
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    try:
        if config.keys_dir:
            security.secure_server_socket(sock, config.keys_dir)
        if config.port:
            sock.bind(f"tcp://{config.host}:{config.port}")
            return sock, config.port
        return sock, sock.bind_to_random_port(f"tcp://{config.host}")
    except BaseException:
        sock.close(linger=0)
        raise

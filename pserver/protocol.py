"""The wire: every message between workers, coordinator and shards.

Frame spec
==========

Every message is a ZeroMQ multipart message (after the ROUTER identity
envelope, which ZeroMQ adds and strips itself)::

    frame 0      msgpack map, the header
    frame 1..k   raw array payloads, little-endian, C order, no padding

The header always carries::

    "v"    int   protocol version, must equal PROTOCOL_VERSION
    "op"   str   the operation (see Operations below); "REPLY" in replies

and, when array frames follow, ``"arrays"``: a list with one entry per frame,
``[dtype, length]`` where dtype is one of ALLOWED_DTYPES (``"<f4"``,
``"<i8"``, and for the half-precision wire ``"<f2"`` and ``"bf16"``: bfloat16,
the upper 16 bits of a float32, carried as little-endian uint16; see
`pserver.precision`) and length is the element count. A receiver checks the count of
frames, each frame's byte size (length × itemsize) and the dtype before it
looks at a single element. Replies are built the same way and always carry
``"ok"``: true, or false with ``"code"`` (a short machine word from ERROR_CODES)
and ``"reason"`` (a sentence for a person).

A request may also carry ``"rid"``: ``[client, n]``, two ints in [0, 2^63),
a request id. ``client`` is chosen at random once per client, ``n`` counts
its requests; a request re-sent after a timeout (on a fresh socket, so from
another ZeroMQ identity) keeps its rid, so a receiver can tell a retry from a
new request. The coordinator answers a repeated JOIN or INIT with the reply
it gave the first time, and refuses (``stale``) a JOIN or INIT older than the
last one it remembers of that client; a shard answers a repeated INIT that
set its slice as the first one (``first`` true). A request without a rid is
served as before, without that memory: adding rid did not change
PROTOCOL_VERSION, as a receiver ignores fields it does not read. A rid that
is not two such ints is refused (``malformed``) by whoever reads it.

Arrays are sent with ``copy=False`` and received as zero-copy views on the
frame buffer. msgpack is used with ``raw=False`` and without any extension
types; nothing on the wire is ever unpickled or evaluated: a peer's bytes are
data, not code.

Operations
==========

One line per op (the reply may go on the next line, after ``→``): the
request's header fields (``?``: optional), the array frames that follow it,
then the reply's header fields and frames (``if``: only in that case). Every
reply also carries ``ok``; an error reply carries only ``ok`` (false),
``code`` and ``reason``. A receiver ignores header fields it does not read (a
client's ROUND carries its ``seq`` too). ``tests/unit/test_protocol_table.py``
checks this table against the handlers that `pserver.shard.Shard` and
`pserver.coordinator.Coordinator` register, and against their replies.

Shard (one per contiguous slice ``[start, end)`` of the flat weight vector;
every array is float32, ``<f4``):

    INIT      {start, end, total, world, fingerprint?, rid?, ticket?} + [slice] → {ok, first, version}
                the first INIT sets the slice; a later one of the same range is answered (first false), a
                retry of the first one (same rid) as the first (first true)
    PULL      {worker, inc?, ticket?, shm?, wire?} → {ok, version} + [slice]
    PUSH      {worker, inc?, ticket?, seq, pulled, mode, scale?, pull?, shm?, wire?} + [delta]
              → {ok, version, staleness, applied, norm} + [E if elastic] + [slice if pull]
                mode: a PUSH apply of pserver.applies; built in: add, scaled, staleness or elastic (delta is
                then the worker's weights W, and E = scale·(W − centre)); a seq not newer than the worker's
                last is answered, not applied
                wire: "float32" (default), "float16" or "bfloat16", the form of the centre in the reply (a
                float16 reply of a centre beyond float16's range is sent as float32); a PUSH's delta may be
                of any of PUSH_DTYPES, and is widened to float32 before it is applied
    SHM       {worker, inc?, ticket?} → {ok, n, centre, centre_token, push, push_token}
                a worker of the world on the shard's host asks for shared memory (see Shared memory below)
    ROUND     {worker, inc?, ticket?, round, mode, alpha?} + [value] → {ok, version, round, workers} + [E if elastic] + [slice]
                synchronous rules (mode: a ROUND apply of pserver.applies; built in: elastic or average);
                the reply waits for the round to close
    BYE       {worker, inc?, ticket?} → {ok}
    LOST      {lost, done?, proof?} → {ok}
                from the coordinator: workers declared lost (silent) or done; rounds and SSP stop waiting for them
    STATS     {} → {ok, stats}
    PING      {} → {ok, shard, version}

Shared memory: a worker on the shard's host sends SHM and maps the two
segments the reply names (`pserver.shm`: the centre's, double-buffered and
read under a per-buffer sequence number, and its own push segment), checking
each one's token. From then on its PUSH and PULL carry ``shm``: the push
segment's token, and no array frame: the PUSH's array is the segment's push
area (n float32, written before the header is sent), and the reply carries
``shm`` true and no frame either: the worker reads the centre from the centre
segment, and an apply's one array (elastic: E) from its segment's reply area,
``shm_arrays`` saying there is one. A PUSH that asks for the centre back may
find it in the reply area instead, written there by the apply's own pass
(``shm_centre``: the centre at the reply's version; the area is rewritten only
by this worker's next PUSH, refused or not). A token the shard did not hand to that
worker (it restarted, or the worker asked again) is refused (``shm``); the
worker asks again or goes back to frames.

Tickets. `pserver start` makes a secret (`pserver.security`) that only the
coordinator and its shard processes hold. A JOIN's reply then also carries
``ticket``: the coordinator's MAC over the rank, its incarnation and (with
``--keys``) the public key it joined with; the worker sends ``inc`` (its
incarnation) and ``ticket`` with every PUSH, ROUND, SHM, BYE and PULL, and a
shard refuses (``ticket``) a request for a worker without them, a worker
outside the world (``malformed``), and a PUSH whose seq lies outside its
incarnation's range ``[(inc − 1) << 40, inc << 40)``. An INIT's reply carries
``tickets``: one MAC per shard over its slice, the model's total and
fingerprint and the world, which each shard INIT must carry. A shard's
REGISTER and the coordinator's LOST carry ``proof``, a MAC over their fields
(with ``--keys`` the server's own key is proof enough). A PULL before any
JOIN (an observer: the evaluator) names worker `OBSERVER` and needs no ticket.

Coordinator (the ``host:port`` that workers are given):

    REGISTER  {shard, endpoint, proof?} → {ok}
                from a shard process when it starts (proof: see Tickets below)
    JOIN      {name?, rank?} → {ok, rank, world, config, shards, layout, architecture, incarnation}
                rank: a lost worker's own rank, to take it back; incarnation: how many processes
                have held the rank (a restarted worker numbers its pushes past its predecessors')
    INIT      {layout, architecture?} → {ok, first, shards, world}
    MODEL     {observer?} → {ok, layout, architecture, world, config, shards}
                for observers (the evaluator), which take no rank
    HEARTBEAT {rank, samples?, nan_recoveries?} → {ok, lost, stop}
    DONE      {rank, report?} → {ok}
    STOP      {reason?} → {ok}
                the run should end early (e.g. a target AUC was reached); heartbeats tell the workers
    LEAVE     {observer?} → {ok}
    STATS     {observer?} → {ok, coordinator, shards}
    PING      {} → {ok, ready, shards}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import msgpack
import numpy as np

from pserver.errors import ProtocolError

PROTOCOL_VERSION = 1

#: The only dtypes that may travel; anything else is refused at the boundary.
ALLOWED_DTYPES = {"<f4": np.dtype("<f4"), "<i8": np.dtype("<i8"), "<f2": np.dtype("<f2"), "bf16": np.dtype("<u2")}
_NAMES = {"<u2": "bf16"}  # a uint16 array travels as bfloat16, the only use of 16-bit integers here
#: The dtypes a PUSH's array may have (each op checks its own): float32, or a half-precision wire form.
PUSH_DTYPES = ("<f4", "<f2", "bf16")

#: Largest header accepted: headers are small maps; a huge frame 0 is an attack.
MAX_HEADER_BYTES = 1 << 20

#: Refused-message reasons, counted separately in stats.
ERROR_CODES = (
    "malformed",     # frame 0 is not a msgpack map, or a field has the wrong type
    "version",       # protocol version differs
    "unknown_op",    # op not served by this endpoint
    "frames",        # the number of array frames differs from the header
    "dtype",         # a dtype outside ALLOWED_DTYPES, or not the one the op needs
    "size",          # a frame's bytes or an array's length do not match
    "not_finite",    # NaN or Inf in a delta
    "too_large",     # delta norm over the configured limit
    "not_ready",     # the shard has no weights yet (retry after INIT)
    "mismatch",      # INIT of another layout
    "round",         # synchronous round out of order
    "shm",           # no shared memory here, or a segment token the shard did not give that worker
    "stale",         # a JOIN or INIT older than the last one its client sent (a late copy of a retried request)
    "ticket",        # no valid ticket: a worker id, seq, INIT, REGISTER or LOST the coordinator did not sign
    "role",          # with --keys: the sender's key may not do this op (pserver.security, roles)
    "internal",      # a bug on the server side; the state was not changed
)

#: The worker id an observer (the evaluator, a `Client` that has not joined) PULLs with: it takes no rank.
OBSERVER = (1 << 31) - 1

#: The largest world a server or a shard takes: a synchronous round holds a row of its slice per worker, so the
#: world bounds a shard's memory; a shard told more in an INIT refuses it. 65536 workers is far beyond any run here.
MAX_WORLD = 1 << 16

#: A synchronous round closes without its missing workers after this many seconds; they are marked lost and the
#: world shrinks for the rest of the run. 60 s, not local mode's former 30 s: dropping a slow but live worker
#: (a GC pause, a busy or slower host, a long averaging window) costs it for good, waiting for a dead one costs
#: the seconds once. A JOIN's run config hands the server's value to workers (the wait for a ROUND's reply).
#: The one default: `pserver.shard_state.ShardConfig`, ServerConfig, `pserver start` and `notpu train` take it from here.
ROUND_TIMEOUT_S = 60.0

#: A push's seq is below 2^63 (an int64, as msgpack and the checkpoints' JSON carry it).
SEQ_LIMIT = 1 << 63
#: A rank's incarnation k (its k-th process, counted by the coordinator) numbers its pushes from
#: (k − 1) << INCARNATION_SHIFT: 2^40 pushes each, past every earlier one's, so that a shard never takes a new
#: process's push for a retry of its predecessor's; with the server's secret a shard refuses a seq outside the
#: range of the incarnation the worker's ticket names.
INCARNATION_SHIFT = 40
MAX_INCARNATION = (SEQ_LIMIT >> INCARNATION_SHIFT)  # 2^23 restarts of one rank
#: An INIT's total (floats in the model) is below this: 2^40 floats, 4 TiB, beyond any model a shard takes.
MAX_TOTAL = 1 << 40

#: Each half of a request id ``[client, n]`` is an int in [0, RID_LIMIT): a non-negative int64.
RID_LIMIT = 1 << 63


@dataclass(frozen=True)
class Message:
    """A decoded message: the header map and zero-copy array views."""

    header: dict[str, Any]
    arrays: list[np.ndarray]

    @property
    def op(self) -> str:
        return self.header["op"]


def encode(header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> list[Any]:
    """Header + arrays → frames, ready for ``send_multipart(frames, copy=False)``."""
    specs = []
    payload = []
    for a in arrays:
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        key = _NAMES.get(dt.str, dt.str)
        if key not in ALLOWED_DTYPES:
            raise ProtocolError(f"dtype {a.dtype} cannot travel; use float32, int64, float16 or bfloat16 (uint16)")
        a = np.ascontiguousarray(a, dtype=ALLOWED_DTYPES[key])
        specs.append([key, int(a.size)])
        payload.append(memoryview(a.reshape(-1)).cast("B"))
    h = dict(header)
    h["v"] = PROTOCOL_VERSION
    if specs:
        h["arrays"] = specs
    return [msgpack.packb(h, use_bin_type=True), *payload]


def _buffer(frame: Any) -> memoryview:
    """Bytes or zmq.Frame → a flat byte memoryview, without copying."""
    buf = frame.buffer if hasattr(frame, "buffer") else frame
    mv = memoryview(buf)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def decode(frames: Sequence[Any]) -> Message:
    """Frames → Message; raises ProtocolError naming the first bad item.

    Checks happen in this order so that nothing large is touched before the
    small header has been validated: frame count, header size, msgpack,
    version, op, array specs, then each frame's byte size.
    """
    if not frames:
        raise ProtocolError("malformed", "empty message: expected a msgpack header in frame 0")
    head = _buffer(frames[0])
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError("malformed", f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError("malformed", f"frame 0 is not msgpack: {exc!r}") from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed", f"frame 0 must be a msgpack map, got {type(header).__name__}")
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # 1.0 and True equal 1 in Python
        raise ProtocolError("version", f"protocol version {version!r}, this server speaks {PROTOCOL_VERSION}")
    op = header.get("op")
    if not isinstance(op, str):
        raise ProtocolError("malformed", f"header field 'op' must be a string, got {op!r}")
    specs = header.get("arrays", [])
    if not isinstance(specs, list):
        raise ProtocolError("malformed", "header field 'arrays' must be a list of [dtype, length]")
    if len(specs) != len(frames) - 1:
        raise ProtocolError("frames", f"header announces {len(specs)} array frame(s), message has {len(frames) - 1}")
    arrays = []
    for i, spec in enumerate(specs, start=1):
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str)
                and isinstance(spec[1], int) and not isinstance(spec[1], bool)):
            raise ProtocolError("malformed", f"array spec {i} must be [dtype, length], got {spec!r}")
        dtype = ALLOWED_DTYPES.get(spec[0])
        if dtype is None:
            raise ProtocolError("dtype", f"frame {i}: dtype {spec[0]!r} not allowed, expected one of {sorted(ALLOWED_DTYPES)}")
        length = spec[1]
        if length < 0:
            raise ProtocolError("size", f"frame {i}: negative length {length}")
        buf = _buffer(frames[i])
        if len(buf) != length * dtype.itemsize:
            raise ProtocolError("size", f"frame {i}: {len(buf)} bytes, header says {length} × {dtype.itemsize}")
        arrays.append(np.frombuffer(buf, dtype=dtype))
    return Message(header=header, arrays=arrays)


def ok(**fields: Any) -> dict[str, Any]:
    return {"op": "REPLY", "ok": True, **fields}


def error(code: str, reason: str) -> dict[str, Any]:
    assert code in ERROR_CODES, code
    return {"op": "REPLY", "ok": False, "code": code, "reason": reason}


def field(header: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """A typed header field, or ProtocolError('malformed') naming it."""
    if name not in header:
        if default is ...:
            raise ProtocolError("malformed", f"header field {name!r} is missing")
        return default
    value = header[name]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ProtocolError("malformed", f"header field {name!r} must be {kind}, got bool")
    if not isinstance(value, kind):
        raise ProtocolError("malformed", f"header field {name!r} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def request_id(header: dict[str, Any]) -> tuple[int, int] | None:
    """The header's ``rid`` as (client, n), None if it has none; ProtocolError('malformed') naming what is wrong."""
    return check_rid(header.get("rid"))


def check_rid(rid: Any) -> tuple[int, int] | None:
    """A ``rid`` field's value (None: absent) as (client, n); ProtocolError('malformed') if it is not one."""
    if rid is None:
        return None
    if not (isinstance(rid, list) and len(rid) == 2
            and all(type(x) is int and 0 <= x < RID_LIMIT for x in rid)):  # type(): True is not an int here
        raise ProtocolError("malformed", f"header field 'rid' must be [client, n], two ints in [0, 2^63), got "
                                         f"{rid!r:.80}; send a request id the client chose, or none")
    return rid[0], rid[1]

"""What a shard is configured with and what it keeps: `ShardConfig`, the checkpointed `ShardState`, and the
records of pushes (the last one applied per worker, and one that passed every check, ready to apply).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pserver import protocol, shm
from pserver.applies import PushApply


@dataclass(frozen=True)
class ShardConfig:
    index: int = 0
    host: str = "127.0.0.1"
    port: int = 0  # 0: a port chosen by the OS
    advertise_host: str | None = None  # the host workers should dial, if not `host`
    # ZeroMQ drops a peer that sends a larger frame. It must hold the largest slice (4 bytes a float) a shard will
    # own, as the INIT carries it in one frame, and is fixed before that is known: 256 MiB, 64 million floats a
    # shard. The coordinator refuses the INIT of a model whose slices are larger, naming this setting.
    max_message_bytes: int = 256 << 20
    max_delta_norm: float = 0.0  # 0: no limit; else larger updates are refused
    round_timeout_s: float = protocol.ROUND_TIMEOUT_S  # a round closes without its missing workers after this
    poll_interval_s: float = 0.1  # how often timers (round timeout, checkpoints) are looked at
    max_delta_norm_factor: float = 0.0  # 0: off; else refuse norms over F × running median (pserver.norms)
    max_staleness: int = -1  # -1: off; else SSP bound on clock gaps (pserver.ssp)
    keys_dir: str | None = None  # CurveZMQ server keys and allow-list (pserver.security)
    # The server's world, which an INIT must repeat; 0: whatever the first INIT says, up to protocol.MAX_WORLD
    # (a shard started by hand, or in a test).
    world: int = 0
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
class PushRecord:
    """The last push applied for a worker: its seq and its reply, sent again to a retry of it."""

    seq: int
    reply: dict[str, Any]
    extra: list[np.ndarray] = field(default_factory=list)  # the apply's reply arrays (elastic: E), re-sent on a retry


@dataclass(frozen=True)
class PendingPush:
    """A PUSH that passed every check, ready to apply (now, or when the SSP gate releases it)."""

    identity: bytes
    worker: int
    seq: int
    pulled: int
    apply: PushApply  # the mode's
    scale: float
    pull: bool
    delta: np.ndarray  # a view on the received frame, or on the worker's push segment
    segment: shm.Segment | None = None  # the worker's push segment if it came through shared memory
    wire: str = "float32"  # the form of the centre in the reply (pserver.precision)

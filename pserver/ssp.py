"""Bounded staleness (SSP) at a shard: a worker too far ahead waits for the slowest.

A worker's clock is the number of its updates this shard has applied. With
``--max-staleness K``, a PUSH from worker w is applied only while
``clock(w) − min(clock(v) for live v) ≤ K``; otherwise its reply is deferred
(the request is parked, as a synchronous ROUND is) and the push is applied
when the slowest live worker catches up, or when a laggard is declared lost
or leaves. So the clock gap seen by an applied push never exceeds K.

Live workers are ranks ``0..world-1`` that are neither lost nor gone (BYE,
or DONE as told by the coordinator). Ids outside the world (a driver, the
evaluator) are not held back. A push parked for longer than the shard's
round timeout releases itself: the workers holding it back are marked lost,
exactly as a synchronous round closes without its missing workers.

A client that times out while parked retries the same seq on a fresh socket;
the parked request is then re-addressed, not duplicated.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class _Parked:
    seq: int
    frames: list[Any]  # the request as received: [identity, header, delta]
    since: float


class StalenessGate:
    def __init__(self, shard: Any, max_staleness: int) -> None:
        self.shard = shard
        self.max_staleness = max_staleness
        self.parked: dict[int, _Parked] = {}
        self.gaps: Counter = Counter()  # clock gap at application -> pushes, for stats
        self.waits = 0  # pushes that had to wait
        self._releasing = False

    def _live(self) -> set[int]:
        s = self.shard
        return set(range(s.world)) - s.lost - s.left

    def gap(self, worker: int) -> int | None:
        """clock(worker) − min clock of the live workers; None if the worker is not gated."""
        live = self._live()
        if worker not in live:
            return None
        updates = self.shard.stats.updates
        return updates[worker] - min(updates[v] for v in live)

    def hold(self, worker: int, seq: int, frames: list[Any]) -> bool:
        """True if this push must wait (it is parked); False to apply it now."""
        parked = self.parked.get(worker)
        if parked is not None and not self._releasing:
            # A retry on a fresh socket, or a newer push: answer there once it may go.
            self.parked[worker] = _Parked(seq, frames, parked.since)
            return True
        gap = self.gap(worker)
        if gap is None or gap <= self.max_staleness:
            return False
        if parked is None:
            self.waits += 1
        self.parked[worker] = _Parked(seq, frames, parked.since if parked else time.monotonic())
        return True

    def applied(self, worker: int) -> None:
        """Called after the shard counted worker's update: record the gap it was applied at, release others."""
        live = self._live()
        if worker in live:
            updates = self.shard.stats.updates
            before = updates[worker] - 1
            others = [updates[v] for v in live if v != worker]
            self.gaps[before - min([before, *others])] += 1
        self.release()

    def release(self) -> None:
        """Re-handle parked pushes that may go now (after an update, a BYE or a LOST)."""
        if self._releasing or not self.parked:
            return
        self._releasing = True
        try:
            progress = True
            while progress:
                progress = False
                for worker in sorted(self.parked):
                    gap = self.gap(worker)
                    if gap is None or gap <= self.max_staleness:
                        parked = self.parked.pop(worker)
                        self.shard.handle(parked.frames)
                        progress = True
        finally:
            self._releasing = False

    def tick(self, now: float, timeout_s: float) -> None:
        expired = [w for w, p in self.parked.items() if now - p.since > timeout_s]
        if not expired:
            return
        live = self._live()
        updates = self.shard.stats.updates
        slowest = min(updates[v] for v in live) if live else 0
        laggards = sorted(v for v in live if updates[v] == slowest and v not in self.parked)
        log.warning("shard %d: worker(s) %s waited %.1f s for worker(s) %s to catch up; those are marked lost",
                    self.shard.config.index, expired, timeout_s, laggards)
        self.shard.lost.update(laggards)
        self.release()

    def to_wire(self) -> dict[str, Any]:
        return {"max_staleness": self.max_staleness, "waits": self.waits, "parked": sorted(self.parked),
                "gaps": {str(k): v for k, v in sorted(self.gaps.items())}}

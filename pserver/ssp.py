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

The gate holds no reference to the shard: the shard asks it whether a push
may be applied now (`admit`, which parks it otherwise), tells it when one was
applied (`record`), and applies what `release` hands back. The shard passes
its live workers and its clocks (updates applied per worker) with each call.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Generic, Iterator, TypeVar

R = TypeVar("R")  # what the shard parks: its parsed push, answered when released


@dataclass
class _Parked(Generic[R]):
    request: R
    since: float  # when this worker's push was first parked (a retry does not reset it)


@dataclass(frozen=True)
class Overdue:
    """Pushes parked longer than the timeout, and the live laggards holding them back."""

    waiting: list[int]
    laggards: list[int]


class StalenessGate(Generic[R]):
    def __init__(self, max_staleness: int) -> None:
        self.max_staleness = max_staleness
        self.parked: dict[int, _Parked[R]] = {}  # worker -> its one parked push
        self.gaps: Counter = Counter()  # clock gap at application -> pushes, for stats
        self.waits = 0  # pushes that had to wait
        self._releasing = False

    @staticmethod
    def gap(worker: int, live: set[int], clocks: Counter) -> int | None:
        """clock(worker) − min clock of the live workers; None if the worker is not gated."""
        if worker not in live:
            return None
        return clocks[worker] - min(clocks[v] for v in live)

    def _may_go(self, worker: int, live: set[int], clocks: Counter) -> bool:
        gap = self.gap(worker, live, clocks)
        return gap is None or gap <= self.max_staleness

    def admit(self, worker: int, request: R, live: set[int], clocks: Counter, now: float | None = None) -> bool:
        """True: apply this push now. False: it is parked, and `release` will hand it back."""
        parked = self.parked.get(worker)
        if parked is not None:
            # A retry on a fresh socket, or a newer push: it replaces the parked one, answered once it may go.
            self.parked[worker] = _Parked(request, parked.since)
            return False
        if self._may_go(worker, live, clocks):
            return True
        self.waits += 1
        self.parked[worker] = _Parked(request, time.monotonic() if now is None else now)
        return False

    def record(self, worker: int, live: set[int], clocks: Counter) -> None:
        """The shard has just counted an update of ``worker`` in ``clocks``: record the gap it was applied at."""
        if worker in live:
            before = clocks[worker] - 1
            others = [clocks[v] for v in live if v != worker]
            self.gaps[before - min([before, *others])] += 1

    def release(self, live: set[int], clocks: Counter) -> Iterator[R]:
        """Hand back, one at a time, the parked pushes that may go now, in worker order, pass after pass.

        The caller applies each one (advancing ``clocks``) before taking the
        next, so the next one is judged on the new clocks. A call made while
        an earlier one is still handing back yields nothing.
        """
        if self._releasing or not self.parked:
            return
        self._releasing = True
        try:
            progress = True
            while progress:
                progress = False
                for worker in sorted(self.parked):
                    if worker in self.parked and self._may_go(worker, live, clocks):
                        yield self.parked.pop(worker).request
                        progress = True
        finally:
            self._releasing = False

    def overdue(self, now: float, timeout_s: float, live: set[int], clocks: Counter) -> Overdue | None:
        """If a push has been parked longer than ``timeout_s``: who waits, and the live workers at the
        slowest clock that are not waiting themselves (the shard marks those lost, then releases)."""
        expired = [w for w, p in self.parked.items() if now - p.since > timeout_s]
        if not expired:
            return None
        slowest = min(clocks[v] for v in live) if live else 0
        laggards = sorted(v for v in live if clocks[v] == slowest and v not in self.parked)
        return Overdue(expired, laggards)

    def to_wire(self) -> dict[str, object]:
        return {"max_staleness": self.max_staleness, "waits": self.waits, "parked": sorted(self.parked),
                "gaps": {str(k): v for k, v in sorted(self.gaps.items())}}

"""Counters a shard keeps: updates, bytes, refusals, staleness histograms."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Staleness bins 0..STALENESS_BINS-2 are exact; the last bin counts everything larger.
STALENESS_BINS = 65


@dataclass
class ShardStats:
    updates: Counter = field(default_factory=Counter)  # worker -> updates applied
    pulls: Counter = field(default_factory=Counter)
    duplicates: Counter = field(default_factory=Counter)  # retried pushes answered, not applied
    refused: Counter = field(default_factory=Counter)  # error code -> count
    # worker -> its finite pushes (or rounds) refused because the centre plus them overflows float32; also
    # counted in refused["not_finite"]
    overflows: Counter = field(default_factory=Counter)
    # Checkpoints not written (disk full, no permission, read-only): how many, the last error, and the time
    # (time.time()) of the last one written. The shard goes on and tries again at the next interval.
    checkpoint_failures: int = 0
    checkpoint_error: str = ""
    checkpoint_ok_at: float = 0.0
    max_norm: float = 0.0  # the largest norm of an update applied (how large a --max-delta-norm would refuse)
    bytes_in: int = 0
    bytes_out: int = 0
    # Where the shard's own thread spends its time (seconds): every request from receipt to the reply handed to
    # ZeroMQ (whose I/O thread sends it), and of that, the update kernels. Where capacity goes is read from these.
    handle_s: float = 0.0
    apply_s: float = 0.0
    staleness: dict[int, np.ndarray] = field(default_factory=lambda: defaultdict(lambda: np.zeros(STALENESS_BINS, np.int64)))
    last_norm: dict[int, float] = field(default_factory=dict)

    def record_staleness(self, worker: int, staleness: int) -> None:
        self.staleness[worker][min(max(staleness, 0), STALENESS_BINS - 1)] += 1

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-safe dict; worker ids become strings (map keys)."""
        return {
            "updates": {str(k): v for k, v in self.updates.items()},
            "pulls": {str(k): v for k, v in self.pulls.items()},
            "duplicates": {str(k): v for k, v in self.duplicates.items()},
            "refused": dict(self.refused),
            "overflows": {str(k): v for k, v in self.overflows.items()},
            "checkpoint": {"failures": self.checkpoint_failures, "error": self.checkpoint_error,
                           "ok_at": self.checkpoint_ok_at},
            "max_norm": self.max_norm,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "handle_s": round(self.handle_s, 6),
            "apply_s": round(self.apply_s, 6),
            "staleness": {str(k): v.tolist() for k, v in self.staleness.items()},
        }


def mean_staleness(histograms: dict[str, list[int]]) -> float:
    """Mean over all workers of a {worker: bins} map (the open last bin counts as its lower edge)."""
    total = np.zeros(STALENESS_BINS, np.int64)
    for bins in histograms.values():
        total[: len(bins)] += np.asarray(bins, np.int64)[:STALENESS_BINS]
    n = int(total.sum())
    return float((total * np.arange(STALENESS_BINS)).sum() / n) if n else 0.0


def histogram_summary(bins: list[int]) -> str:
    """'0:120 1:30 2:4' — the non-empty bins, for people."""
    parts = []
    for s, c in enumerate(bins):
        if c:
            label = f"{s}+" if s == STALENESS_BINS - 1 else str(s)
            parts.append(f"{label}:{c}")
    return " ".join(parts) or "-"

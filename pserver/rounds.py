"""Synchronous rounds at a shard: the open round's contributions, the one rule for when it can close, and
the round that closed last, kept to answer its retries.

A synchronous rule (EASGD, model averaging) sends ROUND: each live worker's value, folded into a row of
the open round by the round's apply (`pserver.applies.RoundApply.row`) against the centre the round
opened on. The round can close once every live worker has contributed (`Round.can_close`): when the
last contribution arrives, or when a BYE or a LOST makes the missing workers no longer live; and it is
closed without them once it has been open longer than the round timeout (`Round.overdue`). The shard
applies the rows, answers every contributor and opens the next round (`Round.next`). A worker whose reply
was lost asks again: while the round is open the reply is re-addressed; once it closed, `ClosedRound`
answers as the round did then.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pserver.applies import RoundApply
from pserver.errors import ProtocolError


@dataclass
class Round:
    """The open round: its number, mode and apply (from its first contribution), and each contributor's row."""

    number: int = 0
    mode: str = ""
    apply: RoundApply | None = None  # the mode's, from the round's first contribution
    opened_at: float = 0.0
    rows: np.ndarray | None = None  # (world, n) float32, one row per contributor
    contributors: dict[int, tuple[bytes, int]] = field(default_factory=dict)  # worker -> (identity, row)

    def can_close(self, live: set[int]) -> bool:
        """Every live worker's contribution is in, and there is one at least."""
        return bool(self.contributors) and live <= set(self.contributors)

    def overdue(self, now: float, timeout_s: float) -> bool:
        """Open, with a contribution, for longer than ``timeout_s``: it closes without the missing workers."""
        return bool(self.contributors) and now - self.opened_at > timeout_s

    def check(self, worker: int, number: int, mode: str, shard: int) -> None:
        """ProtocolError unless ``number`` is this round's and ``mode`` its mode (once it has one)."""
        if number != self.number:
            raise ProtocolError("round", f"worker {worker} sent round {number}, shard {shard} is at round "
                                         f"{self.number}; pull the centre and continue from round {self.number}")
        if self.contributors and mode != self.mode:
            raise ProtocolError("round", f"round {number} is a {self.mode!r} round, worker {worker} sent {mode!r}")

    def add(self, worker: int, identity: bytes, apply: RoundApply, mode: str, centre: np.ndarray,
            value: np.ndarray, alpha: float, world: int, now: float) -> None:
        """Fold a (checked, finite) contribution into its row; the first one opens the round's rows."""
        if self.rows is None or not self.contributors:
            self.rows = np.empty((world, centre.size), np.float32)  # (workers, n)
            self.mode, self.apply = mode, apply
            self.opened_at = now
        row = len(self.contributors)
        apply.row(centre, value, alpha, self.rows[row])  # against this round's centre
        self.contributors[worker] = (identity, row)

    def next(self) -> "Round":
        return Round(number=self.number + 1)


@dataclass(frozen=True)
class ClosedRound:
    """The round that closed last: its reply header and each contributor's reply arrays, for retries of it.

    It keeps that round's rows (views of them) until the next round closes."""

    number: int
    header: dict[str, Any]
    extras: dict[int, list[np.ndarray]]  # worker -> the apply's reply arrays for it

    def answers(self, number: int, worker: int) -> bool:
        """Whether a ROUND of ``number`` from ``worker`` is a retry of this round."""
        return number == self.number and worker in self.extras

"""Synchronous rules: EASGD and model averaging, in rounds.

A round closes at each shard when every live worker's contribution is in, or
after the server's round timeout without the missing workers (they are
marked lost and the world shrinks). A worker that was left behind gets a
`round` error, pulls the centre and continues from the current round.
"""
from __future__ import annotations

import logging

import numpy as np

from optimizers.base import Exchange
from pserver.errors import RemoteError

log = logging.getLogger(__name__)


class _RoundRule(Exchange):
    round_mode = ""

    def start(self, w: np.ndarray) -> np.ndarray:
        self.round = 0
        return super().start(w)

    def _round(self, value: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        try:
            self.round, centre, diff = self.client.round(value, self.round, self.round_mode, self.alpha,
                                                         timeout_s=self.round_timeout_s)
        except RemoteError as exc:
            if exc.code != "round":
                raise
            log.warning("worker %d fell behind (%s); continuing from the centre", self.client.worker, exc.reason)
            centre = self.client.pull()
            self._resync()
            return centre, None
        self.record([0])
        return centre, diff

    def _resync(self) -> None:
        """After a missed round, ask each shard for its round number again (via a harmless retry)."""
        stats = self.client.stats()
        rounds = [s.get("round", 0) for s in stats["shards"] if "round" in s]
        self.round = max(rounds) if rounds else self.round


class EASGD(_RoundRule):
    """Round r: E_i = α(W_i − C_r), W_i ← W_i − E_i; C_{r+1} = C_r + Σ_i E_i."""

    round_mode = "elastic"

    def exchange(self, w: np.ndarray) -> np.ndarray:
        centre, diff = self._round(w)
        return centre.copy() if diff is None else w - diff


class Averaging(_RoundRule):
    """Round r (one epoch by default): push W_i; C_{r+1} = mean_i W_i; W_i ← C_{r+1}."""

    round_mode = "average"

    def exchange(self, w: np.ndarray) -> np.ndarray:
        centre, _ = self._round(w)
        return centre.copy()

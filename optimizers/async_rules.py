"""Asynchronous rules: DOWNPOUR, ADAG, DynSGD, AEASGD and EAMSGD.

Each exchange is one request per shard: the push carries the update and the
reply carries what the worker continues from, so no other worker's push can
slip in between a worker's push and its pull.
"""
from __future__ import annotations

import numpy as np

from optimizers.base import Exchange


class Downpour(Exchange):
    """Every λ steps: push Δ = W − W_pulled, pull C, set W ← C.  Shard: C ← C + Δ."""

    mode = "add"

    def scale(self) -> float:
        return 1.0

    def exchange(self, w: np.ndarray) -> np.ndarray:
        np.subtract(w, self.pulled, out=self._delta)  # Δ = W − W_pulled, (total,)
        staleness, centre = self.client.push(self._delta, mode=self.mode, scale=self.scale(), pull=True,
                                             out=self.pulled)
        self.record(staleness)
        return centre.copy()


class Adag(Downpour):
    """ADAG (dist-keras' accumulated gradient normalisation): push Δ/λ.  Shard: C ← C + Δ/λ."""

    mode = "scaled"

    def scale(self) -> float:
        return 1.0 / max(self.window, 1)


class DynSGD(Downpour):
    """DynSGD: push Δ with the version pulled.  Shard: C ← C + Δ/(staleness + 1)."""

    mode = "staleness"


class AEASGD(Exchange):
    """Asynchronous elastic averaging: E = α(W − C); W ← W − E; C ← C + E.

    The shard computes E against its current C and applies it in the same
    request, then returns E, so the pull and the push see the same centre.
    """

    def exchange(self, w: np.ndarray) -> np.ndarray:
        staleness, e = self.client.push(w, mode="elastic", scale=self.alpha, out=self._delta)
        self.record(staleness)
        return w - e


class EAMSGD(AEASGD):
    """As AEASGD; the worker's local optimizer is SGD with Nesterov momentum 0.9 (chosen in the rule table)."""

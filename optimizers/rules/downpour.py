"""DOWNPOUR: push Δ, pull C. Shard-side apply: the built-in PUSH mode "add"."""
from __future__ import annotations

import numpy as np

from optimizers.rule import WorkerRule, Rule, register_rule


@register_rule
class Downpour(WorkerRule):
    """Every λ steps: push Δ = W − W_pulled, pull C, set W ← C.  Shard: C ← C + Δ.

    Each exchange is one request per shard: the push carries the update and
    the reply carries what the worker continues from, so no other worker's
    push can slip in between a worker's push and its pull.
    """

    spec = Rule("downpour", sync=False, window=5, mode="add", doc="push Δ = W − W_pulled, pull C; C ← C + Δ")

    def scale(self) -> float:
        return 1.0

    def communicate(self, w: np.ndarray) -> np.ndarray:
        delta = self.client.delta_buffer()  # a co-located shard's push area: no copy at push
        if delta is None:
            delta = self._delta
        np.subtract(w, self.pulled, out=delta)  # Δ = W − W_pulled, (total,)
        # the new centre, read-only (a view on the reply, from one shard): kept as W_pulled and what W is set from
        staleness, centre = self.client.push(delta, mode=self.spec.mode, scale=self.scale(), pull=True)
        self.pulled = centre
        self.record(staleness)
        return centre

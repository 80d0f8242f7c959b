"""AEASGD, asynchronous elastic averaging. Shard-side apply: the built-in PUSH mode "elastic"."""
from __future__ import annotations

import numpy as np

from optimizers.rule import WorkerRule, Rule, register_rule


@register_rule
class AEASGD(WorkerRule):
    """E = α(W − C); W ← W − E; C ← C + E.

    The shard computes E against its current C and applies it in the same
    request, then returns E, so the pull and the push see the same centre.
    """

    spec = Rule("aeasgd", sync=False, window=8, mode="elastic", elastic=True, lr_scale="workers",
                doc="E = α(W − C); W ← W − E; C ← C + E")

    def communicate(self, w: np.ndarray) -> np.ndarray:
        staleness, e = self.client.push(w, mode=self.spec.mode, scale=self.alpha, out=self._delta)
        self.record(staleness)
        return w - e

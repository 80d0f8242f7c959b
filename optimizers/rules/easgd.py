"""EASGD, synchronous elastic averaging in rounds. Shard-side apply: the built-in ROUND mode "elastic"."""
from __future__ import annotations

import numpy as np

from optimizers.rule import RoundRule, Rule, register_rule


@register_rule
class EASGD(RoundRule):
    """Round r: E_i = α(W_i − C_r), W_i ← W_i − E_i; C_{r+1} = C_r + Σ_i E_i."""

    spec = Rule("easgd", sync=True, window=8, mode="elastic", elastic=True, lr_scale="workers",
                doc="round r: E_i = α(W_i − C_r); C_{r+1} = C_r + Σ E_i")

    def communicate(self, w: np.ndarray) -> np.ndarray:
        centre, diff = self._round(w)
        return centre.copy() if diff is None else w - diff

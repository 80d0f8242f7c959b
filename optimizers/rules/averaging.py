"""Model averaging in rounds. Shard-side apply: the built-in ROUND mode "average"."""
from __future__ import annotations

import numpy as np

from optimizers.rule import RoundRule, Rule, register_rule


@register_rule
class Averaging(RoundRule):
    """Round r (a quarter epoch by default): push W_i; C_{r+1} = mean_i W_i; W_i ← C_{r+1}."""

    spec = Rule("averaging", sync=True, window=0, mode="average", lr_scale="workers",
                doc="round r: C_{r+1} = mean_i W_i")

    def communicate(self, w: np.ndarray) -> np.ndarray:
        centre, _ = self._round(w)
        return centre.copy()

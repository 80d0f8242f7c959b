"""ADAG (dist-keras' accumulated gradient normalisation). Shard-side apply: the built-in PUSH mode "scaled"."""
from __future__ import annotations

from optimizers.rule import Rule, register_rule
from optimizers.rules.downpour import Downpour


@register_rule
class Adag(Downpour):
    """As DOWNPOUR, pushing Δ/λ.  Shard: C ← C + Δ/λ. Its local rate is λ × the base (`optimizers.base`)."""

    # λ = 2: Adam at larger local rates is too coarse for the GRU (bench/RESULTS.md, "Why the defaults are what
    # they are")
    spec = Rule("adag", sync=False, window=2, mode="scaled", lr_scale="window",
                doc="push Δ/λ, pull C; C ← C + Δ/λ (accumulated gradient normalisation)")

    def scale(self) -> float:
        return 1.0 / max(self.window, 1)

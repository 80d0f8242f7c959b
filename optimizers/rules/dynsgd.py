"""DynSGD: Δ damped by its staleness. Shard-side apply: the built-in PUSH mode "staleness"."""
from __future__ import annotations

from optimizers.rule import Rule, register_rule
from optimizers.rules.downpour import Downpour


@register_rule
class DynSGD(Downpour):
    """As DOWNPOUR, pushing Δ with the version pulled.  Shard: C ← C + Δ/(staleness + 1)."""

    spec = Rule("dynsgd", sync=False, window=5, mode="staleness", lr_scale="workers",
                doc="push Δ with the pulled version; C ← C + Δ/(staleness + 1)")

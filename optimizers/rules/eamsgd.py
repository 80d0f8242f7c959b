"""EAMSGD, elastic averaging with momentum in the local steps. Shard-side apply: the built-in PUSH mode "elastic"."""
from __future__ import annotations

from optimizers.rule import Rule, register_rule
from optimizers.rules.aeasgd import AEASGD


@register_rule
class EAMSGD(AEASGD):
    """As AEASGD; the worker's local optimizer is Nadam, Adam with Nesterov momentum (`optimizers.base` says why)."""

    spec = Rule("eamsgd", sync=False, window=8, mode="elastic", elastic=True, local_optimizer="nadam",
                lr_scale="workers", doc="as AEASGD, local steps with Nesterov momentum (Nadam)")

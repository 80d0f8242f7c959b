"""The rule table (DESIGN.md §4) and the interface every rule implements.

A rule sees the worker's local weights as one flat float32 vector W (total,)
and a `pserver.client.Client`. Every `window` local steps the worker loop calls
`exchange(W)`; the rule talks to the shards and returns the vector the worker
continues from. Local steps use the worker's own Keras optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pserver.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    name: str
    sync: bool  # rounds: every live worker's contribution before the centre moves
    window: int  # λ: local steps between exchanges (0: one epoch)
    alpha: float = 0.0  # elastic coefficient (EASGD family); 0 where unused
    local_optimizer: str = "adam"  # the worker's own optimizer for local steps
    doc: str = ""


RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("downpour", sync=False, window=5, doc="push Δ = W − W_pulled, pull C; C ← C + Δ"),
    Rule("adag", sync=False, window=12, doc="push Δ/λ, pull C; C ← C + Δ/λ (accumulated gradient normalisation)"),
    Rule("dynsgd", sync=False, window=5, doc="push Δ with the pulled version; C ← C + Δ/(staleness + 1)"),
    # α = ηρ with η = 0.01, ρ = 5 (Zhang, Choromanska, LeCun 2015; dist-keras defaults)
    Rule("aeasgd", sync=False, window=32, alpha=0.05, doc="E = α(W − C); W ← W − E; C ← C + E"),
    Rule("eamsgd", sync=False, window=32, alpha=0.05, local_optimizer="nesterov",
         doc="as AEASGD, local steps with SGD + Nesterov momentum 0.9"),
    # α = 0.9/p is filled in by rule_config once the world size p is known
    Rule("easgd", sync=True, window=32, alpha=0.0, doc="round r: E_i = α(W_i − C_r); C_{r+1} = C_r + Σ E_i"),
    Rule("averaging", sync=True, window=0, doc="round = one epoch: C_{r+1} = mean_i W_i"),
)}


def rule_config(name: str, window: int | None = None, alpha: float | None = None, workers: int = 1) -> dict[str, Any]:
    """The rule's settings as they travel to workers: defaults with overrides applied."""
    rule = RULES.get(name.lower())
    if rule is None:
        raise ConfigError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}")
    w = rule.window if window is None else int(window)
    if w < 0:
        raise ConfigError(f"--window must be ≥ 0 (0 = one epoch), got {w}")
    a = rule.alpha if alpha is None else float(alpha)
    if rule.name == "easgd" and alpha is None:
        a = 0.9 / max(workers, 1)
    if rule.alpha or rule.name == "easgd":
        if not 0 < a <= 1:
            raise ConfigError(f"--alpha must be in (0, 1], got {a}")
    return {"rule": rule.name, "sync": rule.sync, "window": w, "alpha": a, "local_optimizer": rule.local_optimizer}


def as_flat(x: np.ndarray) -> np.ndarray:
    if x.dtype != np.float32 or x.ndim != 1:
        raise ValueError(f"expected a flat float32 vector, got {x.dtype} {x.shape}")
    return x


class Exchange:
    """What a worker does every λ local steps; subclasses implement `exchange`.

    ``client`` is a joined `pserver.client.Client`. Vectors are flat float32
    (total,). Staleness seen by this worker's pushes is kept in
    ``self.staleness`` (one entry per exchange: the largest over shards).
    """

    def __init__(self, client: Any, window: int, alpha: float = 0.0, round_timeout_s: float = 300.0) -> None:
        self.client = client
        self.window = window
        self.alpha = alpha
        self.round_timeout_s = round_timeout_s
        self.staleness: list[int] = []
        self.exchanges = 0

    def start(self, w: np.ndarray) -> np.ndarray:
        """Pull the centre; the worker starts from it."""
        centre = self.client.pull()
        self.pulled = centre.copy()  # W at the last pull, (total,)
        self._delta = np.empty_like(centre)
        return centre

    def exchange(self, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(self, w: np.ndarray) -> np.ndarray:
        self.exchanges += 1
        return self.exchange(as_flat(w))

    def record(self, staleness: list[int]) -> None:
        self.staleness.append(max(staleness) if staleness else 0)


def make_rule(name: str, client: Any, window: int, alpha: float = 0.0, round_timeout_s: float = 300.0) -> Exchange:
    from optimizers.async_rules import AEASGD, EAMSGD, Adag, Downpour, DynSGD
    from optimizers.sync_rules import EASGD, Averaging

    classes = {"downpour": Downpour, "adag": Adag, "dynsgd": DynSGD, "aeasgd": AEASGD, "eamsgd": EAMSGD,
               "easgd": EASGD, "averaging": Averaging}
    if name not in classes:
        raise ConfigError(f"unknown rule {name!r}; choose one of {', '.join(classes)}")
    return classes[name](client, window=window, alpha=alpha, round_timeout_s=round_timeout_s)

"""The rule table, and how a rule's defaults are resolved for one run.

The table (`RULES`) is the rules' own entries: each module of
`optimizers.rules` holds one rule, its defaults (``spec``, an
`optimizers.rule.Rule`) and its worker side, and registers itself on
import; there is no other list. `make_rule` builds a rule's worker side,
`effective_settings` resolves its λ, α and learning rate for a run.

Defaults, and why (the figures, and what they were measured on:
bench/RESULTS.md, "Why the defaults are what they are"):

- λ is an upper bound: a worker exchanges at least 4 times an epoch and 12
  times a run, so small data still gets many exchanges. An explicit
  `--window` is taken as given.
- The learning rate is the one a single process would use; each rule scales
  it (``Rule.lr_scale``: 1, λ or n) so that the centre advances per sample
  as fast as plain Keras does. The elastic rules take n, not n + 1: the
  extra rate is motion the pull towards the centre takes back.
- ADAG's λ is 2: its local rate is λ × the base, and Adam at larger local
  rates is too coarse for the GRU. The elastic rules' λ is 8, near the
  EASGD paper's τ ≈ 10.
- α = 0.9/n for every elastic rule (the EASGD paper's β = pα = 0.9), so the
  centre does not trail the workers by many windows.
- EAMSGD's local optimizer is Nadam (Adam with Nesterov momentum): the
  rule's point is momentum in the local steps, and SGD with Nesterov
  momentum, the paper's choice, trains this GRU far worse in the same epochs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optimizers.rules  # noqa: F401 — imports every rule module, each of which registers its rule
from optimizers.rule import RULE_CLASSES, WorkerRule, Rule, as_flat
from pserver.errors import ConfigError

__all__ = ["BASE_LEARNING_RATE", "ELASTIC_BETA", "MIN_EXCHANGES_PER_EPOCH", "MIN_EXCHANGES_PER_RUN",
           "RECOMMENDED_RULE", "RULES", "SHARD_PLUGINS", "Effective", "WorkerRule", "Rule", "as_flat",
           "effective_settings", "get_rule", "make_rule", "rule_config"]

#: The base learning rate of each local optimizer: what one plain Keras process would use.
BASE_LEARNING_RATE = {"adam": 1e-3, "nadam": 1e-3, "sgd": 1e-2, "nesterov": 1e-2}
#: λ is capped so a worker exchanges at least this often (small data still gets many exchanges).
MIN_EXCHANGES_PER_EPOCH = 4
MIN_EXCHANGES_PER_RUN = 12
#: β of the EASGD paper: α = β/n.
ELASTIC_BETA = 0.9


#: Every rule's entry, asynchronous rules first, each group by name.
RULES: dict[str, Rule] = {r.name: r for r in sorted((c.spec for c in RULE_CLASSES.values()),
                                                     key=lambda r: (r.sync, r.name))}

#: The modules a shard imports (`ShardConfig.plugins`) to serve every rule: the rules' package, whose
#: modules register any shard-side apply of their own as they are imported.
SHARD_PLUGINS: tuple[str, ...] = (optimizers.rules.__name__,)

#: What `--rule` defaults to and the demo uses (docs/guides/rules.md, "Which rule when", says why).
RECOMMENDED_RULE = "adag"


def get_rule(name: str) -> Rule:
    rule = RULES.get(str(name).lower())
    if rule is None:
        raise ConfigError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}")
    return rule


def rule_config(name: str, window: int | None = None, alpha: float | None = None,
                learning_rate: float | None = None, workers: int = 1, overlap: bool = False) -> dict[str, Any]:
    """The rule's settings as they travel to workers: the user's overrides, None where the default applies.

    Defaults that depend on the data (λ) or the world size (α, the learning
    rate's scale) are resolved by `effective_settings` once both are known.
    """
    rule = get_rule(name)
    if window is not None and int(window) < 0:
        raise ConfigError(f"--window must be ≥ 0 (0 = one epoch), got {window}")
    if alpha is not None:
        if not rule.elastic:
            elastic = ", ".join(r.name for r in RULES.values() if r.elastic)
            raise ConfigError(f"--alpha is the elastic coefficient of {elastic}; {rule.name} has none")
        if not 0 < float(alpha) <= 1:
            raise ConfigError(f"--alpha must be in (0, 1], got {alpha}")
    if learning_rate is not None and not float(learning_rate) > 0:
        raise ConfigError(f"--learning-rate must be positive, got {learning_rate}")
    if overlap and rule.sync:
        asynchronous = ", ".join(r.name for r in RULES.values() if not r.sync)
        raise ConfigError(f"--overlap is for the asynchronous rules ({asynchronous}); {rule.name} exchanges in rounds")
    return {"rule": rule.name, "sync": rule.sync, "window": None if window is None else int(window),
            "alpha": None if alpha is None else float(alpha),
            "learning_rate": None if learning_rate is None else float(learning_rate),
            "local_optimizer": rule.local_optimizer, "overlap": bool(overlap)}


@dataclass(frozen=True)
class Effective:
    """What one run actually uses: λ, α and the local optimizer's rate, resolved from the run config."""

    rule: str
    window: int  # λ in local steps
    alpha: float  # 0 for rules without one
    local_optimizer: str
    base_learning_rate: float  # what one plain Keras process would use
    learning_rate: float  # the local optimizer's rate: the base × the rule's scale
    steps_per_epoch: int

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "window": self.window, "alpha": self.alpha, "local_optimizer": self.local_optimizer,
                "base_learning_rate": self.base_learning_rate, "learning_rate": self.learning_rate,
                "steps_per_epoch": self.steps_per_epoch}


def effective_settings(run: dict[str, Any], workers: int, steps_per_epoch: int) -> Effective:
    """Resolve a run config's defaults for `workers` workers taking `steps_per_epoch` local steps an epoch.

    Every worker and the evaluator call this with the same inputs, so they agree without another message.
    """
    rule = get_rule(run["rule"])
    n = max(int(workers), 1)
    spe = max(int(steps_per_epoch), 1)
    epochs = max(int(run.get("epochs") or 1), 1)
    if run.get("window") is not None and int(run["window"]) > 0:
        window = int(run["window"])
    elif run.get("window") == 0:
        window = spe  # asked for: one exchange per epoch
    else:
        cap = max(min(spe // MIN_EXCHANGES_PER_EPOCH, spe * epochs // MIN_EXCHANGES_PER_RUN), 1)
        window = min(rule.window, cap) if rule.window else cap
    alpha = 0.0
    if rule.elastic:
        alpha = float(run["alpha"]) if run.get("alpha") is not None else ELASTIC_BETA / n
    optimizer = run.get("local_optimizer") or rule.local_optimizer
    base = float(run["learning_rate"]) if run.get("learning_rate") is not None else BASE_LEARNING_RATE[optimizer]
    scale = {"none": 1, "window": window, "workers": n}[rule.lr_scale]
    return Effective(rule=rule.name, window=window, alpha=alpha, local_optimizer=optimizer, base_learning_rate=base,
                     learning_rate=base * scale, steps_per_epoch=spe)


def make_rule(name: str, client: Any, window: int, alpha: float = 0.0,
              round_timeout_s: float | None = None, overlap: bool = False) -> WorkerRule:
    """Rule ``name``'s worker side, talking to the server through the joined ``client``.

    ``overlap``: exchange in the background while the next window trains (`optimizers.rule`)."""
    return RULE_CLASSES[get_rule(name).name](client, window=window, alpha=alpha, round_timeout_s=round_timeout_s,
                                             overlap=overlap)

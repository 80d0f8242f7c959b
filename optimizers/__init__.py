"""The update rules: what a worker computes and sends every λ local steps, and which shard-side apply takes it.

One module per rule in `optimizers.rules`; `optimizers.rule` is what a
rule is, `optimizers.base` the table built from them and the run's settings.
This package imports only `pserver`, and not TensorFlow: `pserver start`
(runner.pserver_cli) reads the rule table to validate `--rule` and to hand
defaults to workers, and every shard imports `SHARD_PLUGINS`.

The words a rule is written in (docs/glossary.md has them all):

- *centre*: the model the parameter server holds, one flat float32 vector
  split over the shards.
- *window* (λ): the local steps a worker trains between two exchanges.
- *exchange*: what a worker does every window, by its rule's `communicate`:
  send a delta, its weights or an elastic difference, continue from the reply.
- *round*: one step of a synchronous rule (EASGD, averaging): every live
  worker's value, applied at once.
- *staleness*: the updates other workers made to the centre between the
  version a worker last saw and the one its push lands on; DynSGD divides a
  push by staleness + 1.
"""
from optimizers.base import (RECOMMENDED_RULE, RULES, SHARD_PLUGINS, Effective, WorkerRule, Rule, effective_settings,
                             get_rule, make_rule, rule_config)

__all__ = ["RECOMMENDED_RULE", "RULES", "SHARD_PLUGINS", "Effective", "WorkerRule", "Rule", "effective_settings",
           "get_rule", "make_rule", "rule_config"]

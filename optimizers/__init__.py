"""The update rules: what a worker computes and sends every λ local steps, and which shard-side apply takes it.

One module per rule in `optimizers.rules`; `optimizers.rule` is what a
rule is, `optimizers.base` the table built from them and the run's settings.
This package imports only `pserver`, and not TensorFlow: `pserver start`
(runner.pserver_cli) reads the rule table to validate `--rule` and to hand
defaults to workers, and every shard imports `SHARD_PLUGINS`.
"""
from optimizers.base import (RECOMMENDED_RULE, RULES, SHARD_PLUGINS, Effective, WorkerRule, Rule, effective_settings,
                             get_rule, make_rule, rule_config)

__all__ = ["RECOMMENDED_RULE", "RULES", "SHARD_PLUGINS", "Effective", "WorkerRule", "Rule", "effective_settings",
           "get_rule", "make_rule", "rule_config"]

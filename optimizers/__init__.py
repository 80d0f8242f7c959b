"""The update rules: what a worker computes and sends every λ local steps, and how a shard applies it.

This package imports only `pserver`, and not TensorFlow: `pserver start`
(runner.pserver_cli) reads the rule table to validate `--rule` and to hand
defaults to workers.
"""
from optimizers.base import RECOMMENDED_RULE, RULES, Effective, Exchange, Rule, effective_settings, get_rule, make_rule, rule_config

__all__ = ["RECOMMENDED_RULE", "RULES", "Effective", "Exchange", "Rule", "effective_settings", "get_rule", "make_rule", "rule_config"]

"""The update rules, one module each; importing this package imports every one, and each registers itself.

A rule's module holds all of the rule: its table entry (``spec``, an
`optimizers.rule.Rule`, with its defaults and the shard-side apply it
uses, ``spec.mode``) and its worker side (an `optimizers.rule.WorkerRule`
subclass decorated with `register_rule`). A rule whose shards need an apply
the built-ins of `pserver.applies` lack defines it in the same module and
registers it with `@pserver.applies.register`; the shards import this package
by name (`optimizers.SHARD_PLUGINS`, handed to them as `ShardConfig.plugins`),
so they serve it too. Adding a rule is adding a module here (and its test).
"""
from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

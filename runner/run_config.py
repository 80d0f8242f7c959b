"""The run config: what every worker of one run is told (rule, hyper-parameters, epochs, model).

`RunConfig` defines each default once; `pserver start` and `notpu train`
take their run options' defaults from its fields. Workers receive it as a
dict (`to_wire`) in the coordinator's JOIN reply, together with the server's
round timeout. It lives in runner because it needs the rule table
(`optimizers`), which `pserver` may not import.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

from optimizers import RECOMMENDED_RULE, RULES, SHARD_PLUGINS, rule_config
from optimizers.base import BASE_LEARNING_RATE
from pserver.errors import ConfigError


@dataclass(frozen=True)
class RunConfig:
    # docs/guides/rules.md ("Which rule when") says why ADAG.
    rule: str = RECOMMENDED_RULE
    # λ, α and the learning rate: None means the rule's default, resolved per run by
    # `optimizers.effective_settings` (it depends on the data and the world size).
    window: int | None = None
    alpha: float | None = None
    learning_rate: float | None = None  # what one plain Keras process would use; the rule scales it
    # 10 epochs: at 3 the GRU is still on the steep part of its curve on a few thousand customers
    # (bench/RESULTS.md, "Why the defaults are what they are"). A worker handed a run config without epochs
    # (a hand-written --run-json) takes this default too.
    epochs: int = 10
    batch_size: int = 64  # Keras' usual mini-batch; the rules' defaults were measured with it
    hidden: int = 64  # GRU width: small enough for CPUs (the talk's model: 512)
    # Your own Keras model (runner.keras_model): its architecture as Keras JSON and its compile config
    # (`model.get_compile_config()`, of which the loss is used); None: the GRU of width `hidden`.
    architecture: str | None = None
    compile_config: dict[str, Any] | None = None
    custom_modules: tuple[str, ...] = ()  # imported by workers and the evaluator before deserialising
    initial_weights: str | None = None  # an .npz of `model.get_weights()` the centre starts from (same host)
    # Asynchronous rules: each exchange runs beside the next window's local steps (optimizers.rule, Overlap).
    # Off by default: the reply lands one window late, so the centre's updates are one window staler.
    overlap: bool = False

    def to_wire(self, workers: int) -> dict[str, Any]:
        """The dict workers are handed; checks the rule and every value (a ConfigError names the option)."""
        if self.epochs < 1 or self.batch_size < 1 or self.hidden < 1:
            raise ConfigError("--epochs, --batch-size and --hidden must be positive")
        cfg = rule_config(self.rule, self.window, self.alpha, self.learning_rate, workers, overlap=self.overlap)
        cfg.update(epochs=int(self.epochs), batch_size=int(self.batch_size), hidden=int(self.hidden))
        if self.architecture:  # the default GRU's run config stays as it was
            cfg.update(architecture=self.architecture, compile_config=self.compile_config or {},
                       custom_modules=list(self.custom_modules), initial_weights=self.initial_weights)
        return cfg

    @classmethod
    def with_defaults(cls, run: dict[str, Any]) -> dict[str, Any]:
        """A run config as received, with these defaults where a key is missing."""
        return {**{f.name: f.default for f in fields(cls)}, **run}


def add_run_options(p: argparse._ActionsContainer, *, data: argparse._ActionsContainer | None = None,
                    model: argparse._ActionsContainer | None = None) -> None:
    """Options that describe the run; `pserver start` and `notpu train` share them. Defaults: `RunConfig`'s.

    The rule's options go to `p`; epochs and batch size to `data`, the GRU's width to `model` (argument groups
    of `notpu train`'s help), each `p` if not given."""
    d, rate = RunConfig, BASE_LEARNING_RATE
    data, model = data or p, model or p
    p.add_argument("--rule", default=d.rule, help=f"the update rule: {', '.join(RULES)}")
    p.add_argument("--window", type=int, default=d.window,
                   help="λ, local steps between exchanges (default: the rule's)")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="elastic coefficient of the EASGD family (default: the rule's)")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate,
                   help=f"the rate one plain Keras process would use (default: Adam {rate['adam']:g}, SGD "
                        f"{rate['sgd']:g}); the rule scales it: ADAG × λ, the elastic rules and averaging × workers")
    p.add_argument("--overlap", action="store_true", default=d.overlap,
                   help="asynchronous rules: exchange in the background while the next window trains; the reply "
                        "is applied one window late")
    data.add_argument("--epochs", type=int, default=d.epochs, help="passes over each worker's part of the data")
    data.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per local step")
    model.add_argument("--hidden", type=int, default=d.hidden, help="GRU width; the talk's model: 512")


def run_config_from(args: argparse.Namespace) -> RunConfig:
    return RunConfig(rule=args.rule, window=args.window, alpha=args.alpha, learning_rate=args.learning_rate,
                     epochs=args.epochs, batch_size=args.batch_size, hidden=args.hidden, overlap=args.overlap)


class RuleRunOptions:
    """`pserver.cli.RunOptions` from the rule table: --rule, --window, ... checked, as a run config dict."""

    plugins = SHARD_PLUGINS  # every shard loads the rules' package: the applies a rule defines itself

    def add(self, parser: argparse.ArgumentParser) -> None:
        add_run_options(parser)

    def config(self, args: argparse.Namespace, workers: int) -> dict[str, Any]:
        return run_config_from(args).to_wire(workers)

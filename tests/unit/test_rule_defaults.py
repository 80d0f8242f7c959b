"""The rules' defaults resolved for a run: λ capped by the data, α = 0.9/n, the learning rate scaled per rule."""
import pytest

from optimizers import RECOMMENDED_RULE, RULES, effective_settings, rule_config
from optimizers.base import BASE_LEARNING_RATE
from pserver.errors import ConfigError


def resolve(rule, workers=2, steps=100, epochs=3, **overrides):
    run = rule_config(rule, workers=workers, **overrides)
    run["epochs"] = epochs
    return effective_settings(run, workers, steps)


def test_every_rule_has_a_default_and_the_recommended_one_exists():
    assert RECOMMENDED_RULE in RULES
    for name in RULES:
        eff = resolve(name)
        assert eff.rule == name and eff.window >= 1 and eff.learning_rate > 0


@pytest.mark.parametrize("name", list(RULES))
def test_small_data_still_gets_many_exchanges(name):
    # 1,500 players, 2 workers, batch 64: 8 steps an epoch; λ = 32 would mean one exchange in 3 epochs
    eff = resolve(name, steps=8, epochs=3)
    assert 3 * 8 // eff.window >= 12
    assert eff.window <= 8 // 4


def test_large_data_keeps_the_rules_window():
    assert resolve("downpour", steps=1000).window == 5
    assert resolve("adag", steps=1000).window == 2
    assert resolve("aeasgd", steps=1000).window == 8
    assert resolve("averaging", steps=1000).window == 250  # a quarter epoch


def test_an_explicit_window_is_taken_as_given():
    assert resolve("aeasgd", steps=8, window=32).window == 32
    assert resolve("averaging", steps=80, window=0).window == 80  # 0: one round per epoch


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_learning_rate_scales_so_the_centre_keeps_plain_keras_pace(workers):
    base = BASE_LEARNING_RATE["adam"]
    assert resolve("downpour", workers).learning_rate == pytest.approx(base)
    adag = resolve("adag", workers)
    assert adag.learning_rate == pytest.approx(base * adag.window)  # Δ/λ: one mean local step per push
    assert resolve("dynsgd", workers).learning_rate == pytest.approx(base * workers)
    for name in ("averaging", "aeasgd", "easgd"):  # the centre is (near) the mean of the workers
        assert resolve(name, workers).learning_rate == pytest.approx(base * workers)
    eam = resolve("eamsgd", workers)
    assert eam.local_optimizer == "nadam"
    assert eam.learning_rate == pytest.approx(BASE_LEARNING_RATE["nadam"] * workers)


def test_a_given_learning_rate_is_the_base_the_rule_scales():
    eff = resolve("easgd", workers=4, learning_rate=0.002)
    assert eff.base_learning_rate == 0.002 and eff.learning_rate == pytest.approx(0.008)


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_elastic_alpha_is_beta_over_workers(workers):
    for name in ("aeasgd", "eamsgd", "easgd"):
        assert resolve(name, workers).alpha == pytest.approx(0.9 / workers)
    assert resolve("aeasgd", workers, alpha=0.3).alpha == 0.3
    assert resolve("downpour", workers).alpha == 0.0


def test_bad_settings_are_refused_with_the_option_named():
    with pytest.raises(ConfigError, match="unknown rule"):
        rule_config("sgd")
    with pytest.raises(ConfigError, match="--alpha"):
        rule_config("downpour", alpha=0.5)
    with pytest.raises(ConfigError, match="--alpha"):
        rule_config("easgd", alpha=1.5)
    with pytest.raises(ConfigError, match="--window"):
        rule_config("adag", window=-1)
    with pytest.raises(ConfigError, match="--learning-rate"):
        rule_config("adag", learning_rate=0)
    for sync in ("easgd", "averaging"):
        with pytest.raises(ConfigError, match="--overlap is for the asynchronous rules"):
            rule_config(sync, overlap=True)
    assert rule_config("adag", overlap=True)["overlap"] is True


def test_runs_that_may_not_have_learned_are_warned_about():
    from runner.evaluator import run_warnings

    history = [{"val_auc": 0.60}, {"val_auc": 0.70}]
    assert run_warnings({"sync": False}, 2, {"0": 40}, history, 0.75) == []
    few = run_warnings({"sync": False}, 2, {"0": 2}, history, 0.75)  # AEASGD's old 2 updates in a run
    assert len(few) == 1 and "1.0 updates per worker" in few[0]
    assert run_warnings({"sync": True}, 2, {"0": 12}, history, 0.75) == []  # a round holds every worker's update
    flat = run_warnings({"sync": False}, 2, {"0": 40}, history, 0.60)
    assert len(flat) == 1 and "not above the first" in flat[0]


# ---- the table is the rules' own entries --------------------------------------------------------------------

def test_every_rule_is_one_module_whose_shard_side_apply_the_shards_serve():
    import pkgutil

    import optimizers.rules
    from optimizers import SHARD_PLUGINS, make_rule
    from optimizers.rule import RULE_CLASSES
    from pserver import applies

    modules = {m.name for m in pkgutil.iter_modules(optimizers.rules.__path__)}
    assert set(RULES) == set(RULE_CLASSES) == modules  # one module a rule, no other list
    applies.load_plugins(SHARD_PLUGINS)  # what every shard of `pserver start` and `notpu train` imports
    for name, rule in RULES.items():
        cls = RULE_CLASSES[name]
        assert cls.spec is rule and cls.__module__ == f"optimizers.rules.{name}"
        served = applies.ROUND_APPLIES if rule.sync else applies.PUSH_APPLIES
        assert rule.mode in served, name
        assert type(make_rule(name, client=None, window=3)) is cls
    with pytest.raises(ConfigError, match="unknown rule 'sgd'"):
        make_rule("sgd", client=None, window=3)


def test_a_rule_whose_shard_side_apply_is_not_registered_is_refused_at_import():
    from optimizers.rule import WorkerRule, Rule, RoundRule, register_rule

    class Median(RoundRule):
        spec = Rule("median", sync=True, window=4, mode="median")

    with pytest.raises(TypeError, match="ROUND mode 'median', which no module has registered"):
        register_rule(Median)

    class Borrowed(WorkerRule):  # no spec of its own
        pass

    with pytest.raises(TypeError, match="own `spec = Rule"):
        register_rule(Borrowed)

    class Downpour2(WorkerRule):
        spec = Rule("downpour", sync=False, window=1, mode="add")

    with pytest.raises(ValueError, match="'downpour' is optimizers.rules.downpour.Downpour's already"):
        register_rule(Downpour2)

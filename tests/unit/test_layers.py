"""Dependencies point one way, and every default is defined once.

    pserver     imports nothing of ours (wire, shards, coordinator, client)
    optimizers  imports only pserver
    models      imports nothing of the training side (data, features, the network), but the foundation
    runner      may import all

The foundation, `pserver.errors` (the one error root, `NotpuError`) and
`pserver.fileio` (the one atomic write), imports only the standard library, so
every layer may use it.

Imports are read with `ast` from the source files, so a lazy import inside a
function counts as much as one at the top, and so does a module named by a
string literal to `importlib.import_module` or `__import__`: the shards load
the rules' package (for their shard-side applies) only because `runner` names
it in their config, never because `pserver` does.
"""
from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pserver", "optimizers", "models", "runner")
FORBIDDEN = {
    "pserver": {"optimizers", "models", "runner"},
    "optimizers": {"models", "runner"},
    "models": {"pserver", "optimizers", "runner"},
    "runner": set(),
}


#: Modules of a forbidden package that every layer may import: they import only the standard library.
FOUNDATION = ("pserver.errors", "pserver.fileio")

DYNAMIC_IMPORTS = {"import_module", "__import__"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the file, relative ones resolved, dynamic ones of a literal name
    included; ``from a.b import c`` is ``a.b.c``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = path.relative_to(ROOT).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])]) \
                if node.level else (node.module or "")
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) \
                and getattr(node.func, "attr", getattr(node.func, "id", None)) in DYNAMIC_IMPORTS:
            found.append((node.lineno, node.args[0].value))
    return found


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in the file but those of the foundation."""
    return [(line, name.split(".")[0]) for line, name in imported_modules(path)
            if not any(name == f or name.startswith(f + ".") for f in FOUNDATION)]


def violations() -> list[str]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, name in imported_packages(path):
                if name in FORBIDDEN[package]:
                    out.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return out


def test_the_foundation_imports_only_the_standard_library():
    for module in FOUNDATION:
        path = ROOT / (module.replace(".", "/") + ".py")
        tops = {name.split(".")[0] for _, name in imported_modules(path)}
        assert tops <= set(sys.stdlib_module_names) | {"__future__"}, (module, tops - set(sys.stdlib_module_names))


def test_one_error_root():
    from models.errors import DataError
    from pserver.errors import NotpuError

    assert issubclass(DataError, NotpuError)


def test_dependencies_point_one_way():
    assert violations() == []


def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The walk itself works: a lazy, relative or aliased import of a forbidden package is found."""
    fake = tmp_path / "models"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    import pserver.shard as e\n    from optimizers import base\n"
                                 "    importlib.import_module('runner.worker')\n")
    (fake / "ok.py").write_text("from . import errors\nimport numpy\nimportlib.import_module(name)\n"
                                "from pserver.errors import NotpuError\nfrom pserver import fileio\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    monkeypatch.setattr(f"{__name__}.PACKAGES", ("models",))
    assert violations() == ["models/bad.py:2 imports pserver", "models/bad.py:3 imports optimizers",
                            "models/bad.py:4 imports runner"]


def _module_graph() -> dict[str, set[str]]:
    """Our modules and, per module, those of ours it imports (lazily or not), packages' __init__ included."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def ours(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    return {m: {o for _, name in imported_modules(path) if (o := ours(name)) and o != m} for m, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    """No two modules import each other, directly or round about, even lazily (a lazy import inside a function
    is still a dependency: one engine dispatching to another belongs in the command line)."""
    assert cycles(_module_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# ---- one default per setting ---------------------------------------------------------------------------------

def _defaults(parser: argparse.ArgumentParser) -> dict[str, object]:
    return {a.dest: a.default for a in parser._actions
            if a.dest != "help" and a.default is not argparse.SUPPRESS}


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _field_defaults(cls) -> dict[str, object]:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def test_pserver_start_defaults_are_server_config_defaults():
    from pserver.cli import DEFAULT_PORT, MIB, build_parser
    from pserver.server import ServerConfig
    from pserver.shard_state import ShardConfig
    from runner.pserver_cli import build_parser as full_parser
    from runner.run_config import RunConfig

    server = _field_defaults(ServerConfig)
    option_field = {"keys": "keys_dir", "max_message_mb": "max_message_bytes"}
    for parser in (build_parser(), full_parser()):
        got = _defaults(_subparser(parser, "start"))
        assert got.pop("port") == DEFAULT_PORT  # a person's default; programs pass 0 (ServerConfig.port)
        assert got.pop("max_message_mb") * MIB == server["max_message_bytes"]
        assert got.pop("config_json") is None
        got.pop("run_json", None)
        for name in [n for n in got if n in {f.name for f in fields(RunConfig)}]:
            assert got.pop(name) == getattr(RunConfig, name), name
        for option, value in got.items():
            assert value == server[option_field.get(option, option)], option
    # the settings the shards share are defined once, in ShardConfig
    for name in ("host", "max_message_bytes", "max_delta_norm", "round_timeout_s", "max_delta_norm_factor",
                 "max_staleness", "plugins"):
        assert server[name] == getattr(ShardConfig, name), name
    assert ShardConfig.plugins == (), "pserver names no plug-in of ours; runner hands them over"


def test_notpu_train_defaults_are_train_config_defaults():
    from runner.cli import build_parser
    from runner.train_config import TrainConfig
    from runner.run_config import RunConfig

    train = _field_defaults(TrainConfig)
    got = _defaults(_subparser(build_parser(), "train"))
    for option in ("dir", "out"):
        got.pop(option)
    assert got, "no options read"
    for option, value in got.items():
        assert value == train[option], option
    for name in (f.name for f in fields(RunConfig)):
        assert train[name] == getattr(RunConfig, name), name


def test_round_timeout_is_defined_once():
    from pserver.server import ServerConfig
    from pserver.shard_state import ShardConfig
    from runner.train_config import TrainConfig

    assert ServerConfig.round_timeout_s == ShardConfig.round_timeout_s == TrainConfig.round_timeout_s
    assert ServerConfig(round_timeout_s=7.0).run_for_workers()["round_timeout_s"] == 7.0


def test_configs_travel_as_one_json_document():
    from pserver.errors import ConfigError
    from pserver.server import ServerConfig
    from pserver.shard_process import ShardProcessConfig

    config = ServerConfig(shards=3, workers=2, run={"rule": "adag", "epochs": 2}, round_timeout_s=5.0,
                          checkpoint_dir="/tmp/x", keys_dir="/tmp/k", plugins=["optimizers.rules"])
    assert config.plugins == ("optimizers.rules",)
    assert ServerConfig.from_json(config.to_json()) == config
    proc = ShardProcessConfig(shard=config.shard(2, port=1234), coordinator="127.0.0.1:1", checkpoint_every_s=3.0,
                              checkpoint_dir="/tmp/x", restore=True, parent=42)
    back = ShardProcessConfig.from_json(proc.to_json())
    assert back == proc and back.shard.round_timeout_s == 5.0 and back.shard.keys_dir == "/tmp/k"
    assert back.shard.plugins == ("optimizers.rules",)
    with pytest.raises(ConfigError, match="unknown field"):
        ServerConfig.from_json('{"round_timeout": 5}')


def test_config_json_refuses_other_options():
    from optimizers import SHARD_PLUGINS
    from pserver.cli import build_parser as rules_unknown
    from pserver.cli import start_config
    from pserver.errors import ConfigError
    from pserver.server import ServerConfig
    from runner.pserver_cli import build_parser

    doc = ServerConfig(workers=2, run={"rule": "downpour"}).to_json()
    assert start_config(build_parser().parse_args(["start", "--config-json", doc])) == ServerConfig.from_json(doc)
    with pytest.raises(ConfigError, match="--rule"):
        start_config(build_parser().parse_args(["start", "--config-json", doc, "--rule", "easgd"]))
    args = build_parser().parse_args(["start", "--rule", "easgd", "--workers", "3", "--round-timeout-s", "9"])
    config = start_config(args)
    assert config.run["rule"] == "easgd" and config.workers == 3 and config.round_timeout_s == 9.0
    assert config.plugins == SHARD_PLUGINS  # the shards load the rules' package
    more = start_config(build_parser().parse_args(["start", "--plugins", "a.b", *SHARD_PLUGINS]))
    assert more.plugins == (*SHARD_PLUGINS, "a.b")
    assert start_config(rules_unknown().parse_args(["start"])).plugins == ()  # `pserver` alone: built-ins only


def test_data_errors_exit_with_code_2(capsys, tmp_path):
    from runner.cli import main

    assert main(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("notpu train: error: ") and len(err.strip().splitlines()) == 1


def test_worker_defaults_are_the_config_defaults():
    from runner.evaluator import EvaluatorConfig
    from runner.worker import WorkerConfig
    from runner.worker_cli import EVALUATOR_THREADS, build_parser

    parser = build_parser()
    names = {"data": "data_dir", "out": "out_dir", "keys": "keys_dir", "key": "key_name", "eval_interval_s": "interval_s"}
    for command, cls in (("start", WorkerConfig), ("evaluate", EvaluatorConfig)):
        got = _defaults(_subparser(parser, command))
        assert got.pop("config_json") is None
        threads = got.pop("threads")
        assert threads == (0 if command == "start" else EVALUATOR_THREADS)  # start: 0 is all cores
        for option in ("ps", "data", "out"):
            assert got.pop(option, None) is None  # required unless --config-json
        for option, value in got.items():
            assert value == getattr(cls, names.get(option, option)), (command, option)


def test_worker_config_json(tmp_path):
    from pserver.errors import ConfigError
    from runner.worker import WorkerConfig
    from runner.worker_cli import _from_options, build_parser
    from runner.launcher import child_json as _json

    cfg = WorkerConfig(ps="127.0.0.1:1", data_dir=str(tmp_path), threads=3, name="local-0", seed=4)
    args = build_parser().parse_args(["start", "--config-json", _json(cfg)])
    assert _from_options(args, WorkerConfig) == cfg
    with pytest.raises(ConfigError, match="--seed"):
        _from_options(build_parser().parse_args(["start", "--config-json", _json(cfg), "--seed", "1"]), WorkerConfig)
    with pytest.raises(ConfigError, match="--ps, --data required"):
        _from_options(build_parser().parse_args(["start"]), WorkerConfig)


def test_worker_waits_for_a_round_as_long_as_the_server_keeps_it_open():
    from pserver.client import Client, ClientConfig
    from pserver.server import ServerConfig
    from pserver.shard_state import ShardConfig

    client = Client("127.0.0.1:1", ClientConfig(timeout_s=2.0))
    try:
        assert client.round_timeout_s == ShardConfig.round_timeout_s
        run = ServerConfig(round_timeout_s=7.0, run={"rule": "easgd"}).run_for_workers()
        client.ask = lambda header, timeout_s=None: {"rank": 0, "world": 1, "config": run, "shards": []}
        client.join("w")
        assert client.round_timeout_s == 7.0
        seen = {}
        import pserver.client as module

        def fake_fan_out(peers, reqs, config, what, timeout_s=None):
            seen["timeout_s"] = timeout_s
            raise RuntimeError("stop here")

        original, module.fan_out = module.fan_out, fake_fan_out
        try:
            with pytest.raises(RuntimeError):
                client.round(np.zeros(0, np.float32), 0, "average")
        finally:
            module.fan_out = original
        assert seen["timeout_s"] == 7.0 + 2.0
    finally:
        client.close()


def test_notpu_demo_defaults_are_demo_config_defaults():
    from runner.cli import build_parser
    from runner.demo import DemoConfig

    got = _defaults(_subparser(build_parser(), "demo"))
    assert got and all(value == getattr(DemoConfig, option) for option, value in got.items()), got

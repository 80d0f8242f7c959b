"""The three programs' command lines (notpu, pserver, worker) read as one: one spelling per concept, every default
in --help, -v before or after the subcommand, --version, and `notpu train`'s options in groups."""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import MISSING, fields
from importlib.metadata import version
from pathlib import Path

import pytest


def _programs() -> dict[str, argparse.ArgumentParser]:
    from runner.cli import build_parser as notpu
    from runner.pserver_cli import build_parser as pserver
    from runner.worker_cli import build_parser as worker

    return {"notpu": notpu(), "pserver": pserver(), "worker": worker()}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise KeyError("no subcommands")


def _walk() -> list[tuple[str, str, argparse.ArgumentParser, argparse.Action]]:
    """(program, subcommand, its parser, action) for every argument of every subcommand of the three programs."""
    out = []
    for program, parser in _programs().items():
        for command, sub in _subparsers(parser).items():
            out.extend((program, command, sub, a) for a in sub._actions if not isinstance(a, argparse._HelpAction))
    return out


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help as --help prints it (before line wrapping)."""
    return parser._get_formatter()._expand_help(action)


def _has_default(action: argparse.Action) -> bool:
    d = action.default
    return not (d is None or d is argparse.SUPPRESS or action.required or (isinstance(d, (list, tuple)) and not d))


#: One spelling per concept. Each flag, with the subcommands that take it: the same thing is asked for by the
#: same flag wherever it is asked for.
CANONICAL_FLAGS = {
    "model and test scores from the best evaluation, or the last centre": (
        "--restore-best", [("notpu", "train"), ("worker", "evaluate")]),
    "the opposite of --restore-best": ("--no-restore-best", [("notpu", "train"), ("worker", "evaluate")]),
    "seconds between evaluations": ("--eval-interval-s", [("notpu", "train"), ("worker", "evaluate")]),
    "threads of one process": ("--threads", [("notpu", "train"), ("notpu", "baseline"), ("worker", "start"),
                                             ("worker", "evaluate")]),
    "days before the cut-off": ("--observation-days", [("notpu", "generate"), ("notpu", "prepare")]),
    "CurveZMQ keys directory": ("--keys", [("pserver", "start"), ("worker", "start"), ("worker", "evaluate")]),
    "a lost worker's silence": ("--worker-timeout-s", [("notpu", "train"), ("pserver", "start")]),
    "a synchronous round's wait": ("--round-timeout-s", [("notpu", "train"), ("pserver", "start")]),
    "seconds between checkpoints": ("--checkpoint-every-s", [("notpu", "train"), ("pserver", "start")]),
    "how long to wait for a lost server": ("--server-wait-s", [("worker", "start"), ("worker", "evaluate")]),
    "the precision of pushes and pulls": ("--wire", [("notpu", "train"), ("worker", "start")]),
    "the progress bar": ("--progress", [("notpu", "train")]),
    "the Spark master": ("--master", [("notpu", "train"), ("notpu", "prepare"), ("notpu", "predict")]),
    "where the work runs": ("--engine", [("notpu", "train"), ("notpu", "prepare"), ("notpu", "predict")]),
}

#: Spellings retired for the canonical ones above; none may come back.
RETIRED_FLAGS = {"--keep-last": "--no-restore-best", "--interval-s": "--eval-interval-s", "--jobs": "--threads",
                 "--days": "--observation-days"}

#: One metavar per kind of value, and where each appears (program, subcommand, dest); a metavar of this table
#: appears nowhere else, so "DIR" is always a prepared directory and a RUN always a run directory.
CANONICAL_METAVARS = {
    "DIR": [("notpu", "prepare", "out"), ("notpu", "baseline", "dir"), ("notpu", "train", "dir"),
            ("worker", "start", "data"), ("worker", "evaluate", "data")],
    "RUN": [("notpu", "train", "out"), ("worker", "evaluate", "out")],
    "EVENTS": [("notpu", "generate", "out"), ("notpu", "prepare", "events"), ("notpu", "predict", "events")],
    "HOST:PORT": [("worker", "start", "ps"), ("worker", "evaluate", "ps"), ("pserver", "stats", "address")],
    "KEYS": [("pserver", "start", "keys"), ("pserver", "keys", "dir"), ("worker", "start", "keys"),
             ("worker", "evaluate", "keys")],
    "CHECKPOINTS": [("pserver", "start", "checkpoint_dir"), ("pserver", "start", "restore")],
    "LOGDIR": [("notpu", "train", "tensorboard"), ("worker", "evaluate", "tensorboard")],
    "DATE": [("notpu", "prepare", "cutoff"), ("notpu", "predict", "cutoff")],
    "URL": [("notpu", "train", "master"), ("notpu", "prepare", "master"), ("notpu", "predict", "master")],
}


def test_every_default_is_shown_in_help():
    missing = []
    for program, command, parser, action in _walk():
        if action.help == argparse.SUPPRESS or not action.option_strings or not _has_default(action):
            continue
        text = _help(parser, action)
        if "default" not in text.lower():
            missing.append(f"{program} {command} {action.option_strings[0]}")
    assert not missing, f"no default in --help: {missing}"


def test_the_defaults_help_shows_are_the_config_fields():
    """The values printed are the options' defaults, which are the config dataclasses' fields (test_layers checks
    train, pserver start and worker; prepare and baseline here), on/off for switches."""
    from models.baseline import BaselineConfig
    from models.prepare import PrepareConfig

    def shown(program: str, command: str, flag: str) -> str:
        parser = _subparsers(_programs()[program])[command]
        action = next(a for a in parser._actions if flag in a.option_strings)
        return _help(parser, action)

    prepare = {f.name: f.default for f in fields(PrepareConfig)}
    for flag in ("--observation-days", "--label-days", "--min-sessions", "--min-active-days", "--max-types",
                 "--session-type", "--engine"):
        assert shown("notpu", "prepare", flag).endswith(f"(default: {prepare[flag[2:].replace('-', '_')]})"), flag
    assert shown("notpu", "baseline", "--threads").endswith(f"(default: {BaselineConfig.n_jobs})")
    from pserver.cli import MIB
    from pserver.server import ServerConfig
    from runner.train_config import TrainConfig

    assert shown("pserver", "start", "--workers").endswith(f"(default: {ServerConfig.workers})")
    assert shown("pserver", "start", "--max-message-mb").endswith(f"(default: {ServerConfig.max_message_bytes / MIB:g})")
    assert shown("pserver", "start", "--worker-timeout-s").endswith(f"(default: {ServerConfig.worker_timeout_s:g})")
    assert shown("notpu", "train", "--seed").endswith(f"(default: {TrainConfig.seed})")
    assert TrainConfig.progress and shown("notpu", "train", "--progress").endswith("(default: on)")
    assert TrainConfig.restore_best and shown("notpu", "train", "--restore-best").endswith("(default: on)")
    assert shown("pserver", "start", "--insecure").endswith("(default: off)")


def test_prepare_defaults_are_prepare_config_defaults():
    from models.prepare import PrepareConfig

    parser = _subparsers(_programs()["notpu"])["prepare"]
    config = {f.name: f.default for f in fields(PrepareConfig) if f.default is not MISSING}
    for action in parser._actions:
        if action.dest in config and action.dest not in ("bucket_days", "columns"):
            assert action.default == config[action.dest], action.dest


def test_one_flag_per_concept_across_the_programs():
    flags: dict[tuple[str, str], set[str]] = {}
    for program, command, _, action in _walk():
        flags.setdefault((program, command), set()).update(action.option_strings)
    everywhere = set().union(*flags.values())
    for concept, (flag, where) in CANONICAL_FLAGS.items():
        for place in where:
            assert flag in flags[place], f"{concept}: {' '.join(place)} lacks {flag}"
    back = sorted(set(RETIRED_FLAGS) & everywhere)
    assert not back, f"retired spellings: {[(f, RETIRED_FLAGS[f]) for f in back]}"


def test_one_metavar_per_kind_of_value():
    """Each listed place shows its kind's metavar, and a metavar of the table appears elsewhere only on a flag
    that carries that kind in a listed place (another command's --keys is KEYS too); an --out elsewhere is not
    enough: each command's --out names what it writes."""
    seen: dict[str, set[tuple[str, str, str]]] = {}
    flag_at: dict[tuple[str, str, str], str] = {}
    for program, command, _, action in _walk():
        place = (program, command, action.dest)
        flag_at[place] = action.option_strings[0] if action.option_strings else ""
        if isinstance(action.metavar, str):
            seen.setdefault(action.metavar, set()).add(place)
    for metavar, places in CANONICAL_METAVARS.items():
        got = seen.get(metavar, set())
        assert set(places) <= got, f"{metavar}: missing at {sorted(set(places) - got)}"
        flags = {flag_at[p] for p in places} - {"", "--out"}
        stray = sorted(p for p in got - set(places) if flag_at[p] not in flags)
        assert not stray, f"{metavar} used for something else at {stray}"


def test_a_flag_takes_the_same_values_wherever_it_appears():
    """The same flag in two subcommands (of one program or two) has one metavar, type and choices; --out is each
    command's own output, so its metavar names what is written."""
    by_flag: dict[str, dict[tuple, list[str]]] = {}
    for program, command, _, action in _walk():
        for flag in action.option_strings:
            if flag == "--out":
                continue
            shown = action.metavar or action.dest.upper()  # as --help prints it
            shape = (shown, action.type, tuple(action.choices or ()), action.nargs)
            by_flag.setdefault(flag, {}).setdefault(shape, []).append(f"{program} {command}")
    differ = {flag: shapes for flag, shapes in by_flag.items() if len(shapes) > 1}
    assert not differ, differ


def test_durations_are_seconds_named_so():
    for program, command, _, action in _walk():
        for flag in action.option_strings:
            if any(word in flag for word in ("timeout", "interval", "wait", "every")):
                assert flag.endswith("-s") and action.type is float, f"{program} {command} {flag}"
        assert "host:port" not in (action.help or ""), f"{program} {command}: spell it HOST:PORT (the metavar)"


# The smallest command line of each subcommand (required arguments only).
MINIMAL = {
    "notpu": [["generate", "--players", "1", "--out", "e.csv"], ["prepare", "e.csv", "--out", "d"], ["baseline", "d"],
              ["predict", "m.keras", "e.csv", "--out", "s.csv"], ["train", "d", "--out", "r"], ["demo"]],
    "pserver": [["start"], ["keys", "k"], ["stats", "127.0.0.1:1"]],
    "worker": [["start"], ["evaluate"]],
}


def test_minimal_table_covers_every_subcommand():
    for program, parser in _programs().items():
        assert {argv[0] for argv in MINIMAL[program]} == set(_subparsers(parser)), program


@pytest.mark.parametrize("program", list(MINIMAL))
def test_verbose_before_or_after_the_subcommand(program):
    parser = _programs()[program]
    for argv in MINIMAL[program]:
        quiet = parser.parse_args(argv)
        assert quiet.verbose is False, argv
        before = parser.parse_args(["-v", *argv])
        after = parser.parse_args([*argv, "-v"])
        assert before.verbose is True and after.verbose is True, argv
        assert vars(before) == vars(after), argv  # the same effect, nothing else changed
        assert parser.parse_args(["--verbose", *argv, "--verbose"]).verbose is True
        # after the subcommand's own arguments too, between options
        assert parser.parse_args([argv[0], "-v", *argv[1:]]).verbose is True


def _run(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_verbose_after_the_subcommand_logs_debug(tmp_path):
    """Real processes: `notpu generate` logs at DEBUG only with -v, wherever -v is."""
    runs = {}
    for where, argv in (("none", []), ("before", ["-v"]), ("after", [])):
        out = tmp_path / f"{where}.csv"
        tail = ["-v"] if where == "after" else []
        r = _run("runner.cli", *argv, "generate", "--players", "5", "--out", str(out), *tail)
        assert r.returncode == 0, r.stderr
        runs[where] = r.stderr
    assert "DEBUG" not in runs["none"]
    assert "DEBUG" in runs["before"] and "DEBUG" in runs["after"]


@pytest.mark.parametrize("program,module", [("notpu", "runner.cli"), ("pserver", "runner.pserver_cli"),
                                            ("worker", "runner.worker_cli")])
def test_version(program, module):
    r = _run(module, "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{program} {version('notpu')}"


@pytest.mark.parametrize("module,args,line", [
    ("runner.cli", ("prepare", "e.csv", "--out", "d", "--engine", "dask"),
     "notpu prepare: error: argument --engine: invalid choice: 'dask' (choose from 'local', 'spark') "
     "(see notpu prepare --help)"),
    ("runner.cli", ("train",), "notpu train: error: the following arguments are required: DIR, --out "
                               "(see notpu train --help)"),
    ("runner.pserver_cli", ("stats",), "pserver stats: error: the following arguments are required: HOST:PORT "
                                        "(see pserver stats --help)")])
def test_a_usage_mistake_is_one_line_naming_the_help(module, args, line):
    r = _run(module, *args)
    assert (r.returncode, r.stderr.strip().splitlines()) == (2, [line])


TRAIN_GROUPS = ("data", "model", "rule", "engine", "fault tolerance", "output")


def test_train_options_are_in_six_groups():
    train = _subparsers(_programs()["notpu"])["train"]
    groups = {g.title: g for g in train._action_groups}
    assert set(TRAIN_GROUPS) <= set(groups)
    text = train.format_help()
    positions = [text.index(f"\n{title}:\n") for title in TRAIN_GROUPS]
    assert positions == sorted(positions), "groups out of order"
    grouped = {a.dest for title in TRAIN_GROUPS for a in groups[title]._group_actions}
    loose = [a.dest for a in train._actions if a.dest not in grouped and a.dest not in ("help", "verbose")]
    assert not loose, f"train options outside the groups: {loose}"
    assert {a.dest for a in groups["rule"]._group_actions} >= {"rule", "window", "alpha", "learning_rate"}
    assert {a.dest for a in groups["fault tolerance"]._group_actions} >= {"worker_timeout_s", "checkpoint_every_s"}
    assert {a.dest for a in groups["output"]._group_actions} >= {"out", "restore_best", "tensorboard", "progress"}


def test_verbose_after_the_subcommand_is_no_option_beside_config_json(tmp_path):
    """`-v` after the subcommand is the program's, not a setting --config-json would have to carry."""
    from pserver.cli import start_config
    from pserver.server import ServerConfig
    from runner.launcher import child_json
    from runner.worker import WorkerConfig
    from runner.worker_cli import _from_options

    programs = _programs()
    cfg = WorkerConfig(ps="127.0.0.1:1", data_dir=str(tmp_path), threads=2, seed=3)
    args = programs["worker"].parse_args(["start", "--config-json", child_json(cfg), "-v"])
    assert args.verbose and _from_options(args, WorkerConfig) == cfg
    doc = ServerConfig(workers=2, run={"rule": "downpour"}).to_json()
    args = programs["pserver"].parse_args(["start", "--config-json", doc, "-v"])
    assert args.verbose and start_config(args) == ServerConfig.from_json(doc)

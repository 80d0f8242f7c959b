"""MkDocs hooks: the reference pages written from the code, so that they cannot drift from it.

A page asks for generated text with a marker on a line of its own, ``<!-- notpu:NAME -->``:

- ``cli``: every command of `notpu`, `pserver` and `worker`, and every option with its help and default,
  read from the argparse parsers the programs use;
- ``configs``: every field and default of the frozen settings dataclasses (`CONFIGS`), with the comment
  the field carries in its source;
- ``protocol``: the wire's frame spec, pserver/protocol.py's docstring (the one the protocol tests read);
- ``modules``: every module of the four packages with the first line of its docstring;
- ``results``: bench/RESULTS.md, the committed benchmark report; its plots are copied beside the page.

An unknown marker fails the build, as does a module without a docstring.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import io
import re
import sys
import tokenize
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `mkdocs serve` from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

PACKAGES = ("pserver", "optimizers", "models", "runner")
PROGRAMS = (("notpu", "runner.cli"), ("pserver", "runner.pserver_cli"), ("worker", "runner.worker_cli"))
#: The settings a user meets, by where they are used: (module, class).
CONFIGS = (
    ("runner.train_config", "TrainConfig"),
    ("runner.run_config", "RunConfig"),
    ("models.prepare_plan", "PrepareConfig"),
    ("models.predict", "PredictConfig"),
    ("models.baseline", "BaselineConfig"),
    ("models.generate", "GeneratorConfig"),
    ("models.generate_retail", "RetailConfig"),
    ("runner.demo", "DemoConfig"),
    ("models.gru", "ModelConfig"),
    ("pserver.server", "ServerConfig"),
    ("pserver.shard_state", "ShardConfig"),
    ("pserver.client", "ClientConfig"),
    ("runner.worker", "WorkerConfig"),
    ("runner.evaluator", "EvaluatorConfig"),
)
PLOTS = ("auc_vs_time.png", "demo_report.png")
MARKER = re.compile(r"^<!-- notpu:(\w+) -->$", re.M)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _summaries(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def option_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An option's help as `--help` prints it, default included, before line wrapping."""
    return parser._get_formatter()._expand_help(action)


def option_name(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar or action.dest
    metavar = "" if action.nargs == 0 else " " + (action.metavar or (
        "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()))
    return ", ".join(f"{o}{metavar}" for o in action.option_strings)


def programs() -> dict[str, argparse.ArgumentParser]:
    return {name: importlib.import_module(module).build_parser() for name, module in PROGRAMS}


def cli_reference() -> str:
    out: list[str] = []
    for name, parser in programs().items():
        out += [f"## `{name}`", "", parser.description or "", ""]
        summaries = _summaries(parser)
        for command, sub in _subcommands(parser).items():
            out += [f"### `{name} {command}`", "", summaries.get(command, ""), "",
                    "```text", sub.format_usage().strip(), "```", ""]
            for group in sub._action_groups:
                actions = [a for a in group._group_actions
                           if not isinstance(a, argparse._HelpAction) and a.help is not argparse.SUPPRESS]
                if not actions:
                    continue
                title = group.title if group.title not in ("options", "optional arguments") else "options"
                out += [f"**{title}**" + (f": {group.description}" if group.description else ""), "",
                        "| argument | meaning |", "| --- | --- |"]
                out += [f"| `{_cell(option_name(a))}` | {_cell(option_help(sub, a))} |" for a in actions]
                out.append("")
    return "\n".join(out)


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class's source: the lines just above it and the one at its end."""
    path = Path(sys.modules[cls.__module__].__file__ or "")
    source = path.read_text()
    tree = ast.parse(source)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: list[str] = []
        line = stmt.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments.get(line, ""))
            line -= 1
        trailing = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
        out[stmt.target.id] = " ".join(above + trailing)
    return out


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def configs() -> list[type]:
    return [getattr(importlib.import_module(module), name) for module, name in CONFIGS]


def config_reference() -> str:
    out: list[str] = []
    for cls in configs():
        doc = (cls.__doc__ or "").strip()
        if doc.startswith(f"{cls.__name__}("):  # the dataclass's generated signature, not a docstring
            doc = ""
        out += [f"## `{cls.__module__}.{cls.__name__}`", "", doc.split("\n\n")[0], "",
                "| field | type | default | notes |", "| --- | --- | --- | --- |"]
        notes = _field_comments(cls)
        for f in dataclasses.fields(cls):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            # a code span would show the escaped pipe of `int | None` as written: the type is plain text
            out.append(f"| `{f.name}` | {_cell(kind)} | `{_cell(default_text(f))}` | {_cell(notes.get(f.name, ''))} |")
        out.append("")
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    """The reStructuredText of a docstring (headings underlined with '=', literal blocks, ``code``) as Markdown."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and line.strip() and set(lines[i + 1].strip()) == {"="}:
            out += [f"## {line.strip()}", ""]
            i += 2
            continue
        if line.startswith("    ") and (not out or not out[-1].strip()):
            block = []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                block.append(lines[i][4:])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["```text", *block, "```", ""]
            continue
        out.append(re.sub(r"::$", ":", line))
        i += 1
    return re.sub(r"``([^`]+)``", r"`\1`", "\n".join(out))


def protocol_reference() -> str:
    from pserver import protocol

    doc = protocol.__doc__ or ""
    return rst_to_markdown(doc.split("\n", 1)[1].strip())


def module_summaries() -> dict[str, list[tuple[str, str]]]:
    """Per package, (module path, first line of its docstring) for every module."""
    out: dict[str, list[tuple[str, str]]] = {}
    for package in PACKAGES:
        rows = []
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            doc = ast.get_docstring(ast.parse(path.read_text()))
            if doc is None and path.name == "__init__.py" and not path.read_text().strip():
                continue
            if doc is None:
                raise ValueError(f"{rel}: no module docstring; say in one line what the module does")
            first = " ".join(doc.split("\n\n")[0].split())
            rows.append((rel, first))
        out[package] = rows
    return out


def modules_reference() -> str:
    out: list[str] = []
    for package, rows in module_summaries().items():
        out += [f"### `{package}/`", "", "| module | what it holds |", "| --- | --- |"]
        out += [f"| `{rel}` | {_cell(first)} |" for rel, first in rows]
        out.append("")
    return "\n".join(out)


def results_page() -> str:
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    return text.split("\n", 1)[1].lstrip() if text.startswith("# ") else text


GENERATORS: dict[str, Callable[[], str]] = {
    "cli": cli_reference,
    "configs": config_reference,
    "protocol": protocol_reference,
    "modules": modules_reference,
    "results": results_page,
}


def render(markdown: str, where: str = "") -> str:
    """The page with each marker replaced by what it names."""
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"{where}: unknown marker notpu:{name}; known: {', '.join(GENERATORS)}")
        return GENERATORS[name]()

    return MARKER.sub(one, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return render(markdown, page.file.src_uri)


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for name in PLOTS:
        path = ROOT / "bench" / name
        if path.is_file():
            files.append(File.generated(config, name, abs_src_path=str(path)))
    return files

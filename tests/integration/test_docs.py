"""The documentation site: it builds in strict mode (a broken link, anchor or missing page fails), its
reference pages say what the parsers and the settings dataclasses say, every glossary word is linked
where a reader first meets it, and the examples marked to run do run."""
from __future__ import annotations

import argparse
import ast
import html
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
GLOSSARY_FIRST_MET = ("centre", "window", "exchange", "round", "staleness", "incarnation")
RUN_MARK = "<!-- test: run -->"
#: Settings dataclasses that are not a user's: what a parent process hands one child, built from the others.
INTERNAL_CONFIGS = {"ShardProcessConfig"}


def _hooks():
    spec = importlib.util.spec_from_file_location("notpu_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def hooks():
    return _hooks()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out


def _page(site: Path, uri: str) -> str:
    return html.unescape((site / uri / "index.html").read_text())


def _nav_pages() -> list[str]:
    text = (REPO / "mkdocs.yml").read_text()
    return re.findall(r":\s+([\w/.-]+\.md)\s*$", text, re.M)


def test_every_page_of_the_nav_is_built_and_every_page_is_in_the_nav(site: Path) -> None:
    nav = _nav_pages()
    on_disk = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(nav) == on_disk
    for uri in nav:
        page = Path(uri)
        built = site / (page.parent if page.name == "index.md" else page.with_suffix("")) / "index.html"
        assert built.is_file(), uri
    assert (site / "demo_report.png").stat().st_size > 0 and (site / "auc_vs_time.png").stat().st_size > 0


def test_the_cli_reference_has_every_option_of_every_command_with_its_help(site: Path, hooks) -> None:
    page = _page(site, "reference/cli")
    markdown = hooks.cli_reference()
    seen = 0
    for program, parser in hooks.programs().items():
        for command, sub in hooks._subcommands(parser).items():
            assert f"{program} {command}" in page, (program, command)
            for action in sub._actions:
                if action.help in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
                    continue
                row = f"| `{hooks._cell(hooks.option_name(action))}` | {hooks._cell(hooks.option_help(sub, action))} |"
                assert row in markdown, row
                for flag in action.option_strings or [hooks.option_name(action)]:
                    assert flag in page, (program, command, flag)
                seen += 1
    assert seen > 100  # three programs, every subcommand: well over a hundred arguments


def _config_classes() -> set[str]:
    """Every dataclass named *Config defined in the four packages."""
    names = set()
    for package in ("pserver", "optimizers", "models", "runner"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and any(
                        "dataclass" in ast.unparse(d) for d in node.decorator_list):
                    names.add(node.name)
    return names


def test_the_settings_reference_has_every_field_and_default_of_every_config(site: Path, hooks) -> None:
    listed = {name for _, name in hooks.CONFIGS}
    assert _config_classes() - INTERNAL_CONFIGS == listed  # a new settings dataclass must be listed
    page = _page(site, "reference/configs")
    for cls in hooks.configs():
        assert is_dataclass(cls)
        assert f"{cls.__module__}.{cls.__name__}" in page
        for f in fields(cls):
            assert f"| `{f.name}` | " in hooks.config_reference()
            assert hooks.default_text(f) in page, (cls.__name__, f.name, hooks.default_text(f))
    from runner.run_config import RunConfig

    assert "10" in page and "the GRU of width" in page and RunConfig.epochs == 10  # a default, with its note


def test_the_protocol_reference_is_protocol_py_and_names_every_operation(site: Path) -> None:
    from pserver import protocol

    page = _page(site, "reference/protocol")
    for op in re.findall(r"^    ([A-Z]{3,})\s+\{", protocol.__doc__ or "", re.M):
        assert op in page, op
    assert "Frame spec" in page and "PROTOCOL_VERSION" in page


def test_the_architecture_page_lists_every_module(site: Path) -> None:
    page = _page(site, "architecture")
    for package in ("pserver", "optimizers", "models", "runner"):
        for path in (REPO / package).rglob("*.py"):
            if path.read_text().strip():
                assert path.relative_to(REPO).as_posix() in page, path


def test_the_benchmarks_page_is_results_md() -> None:
    hooks = _hooks()
    results = (REPO / "bench" / "RESULTS.md").read_text()
    assert hooks.results_page() in results and "## The demo" in hooks.results_page()


def _prose(markdown: str) -> str:
    """The text a reader reads: fenced blocks, inline code, headings and comments left out, links kept."""
    markdown = re.sub(r"^```.*?^```|<!--.*?-->", "", markdown, flags=re.M | re.S)
    markdown = re.sub(r"^#[^\n]*$", "", markdown, flags=re.M)
    return re.sub(r"`[^`\n]*`", "", markdown)


def _first_use_is_linked(text: str, word: str) -> bool | None:
    """None if the word is not in the text; else whether its first use is the text of a link to the glossary."""
    prose = _prose(text)
    m = re.search(rf"\b{word}s?\b", prose, re.I)
    if m is None:
        return None
    link = re.compile(r"\[([^\]]*)\]\(([^)]*)\)")
    for l in link.finditer(prose):
        if l.start(1) <= m.start() < l.end(1):
            return "glossary.md#" + word in l.group(2)
    return False


def test_glossary_words_are_linked_where_a_reader_first_meets_them() -> None:
    glossary = (DOCS / "glossary.md").read_text()
    for word in GLOSSARY_FIRST_MET:
        assert f"\n## {word}\n" in glossary, word
    # every page a reader may land on from a search; the generated reference pages and the benchmark report
    # are read after the guides
    pages = ["README.md"] + [f"docs/{p}" for p in _nav_pages()
                             if p != "glossary.md" and not p.startswith("reference/") and p != "benchmarks.md"]
    unlinked = [(uri, word) for uri in pages for word in GLOSSARY_FIRST_MET
                if _first_use_is_linked((REPO / uri).read_text(), word) is False]
    assert not unlinked


def _marked_blocks() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(DOCS.rglob("*.md")):
        text = path.read_text()
        for m in re.finditer(re.escape(RUN_MARK) + r"\n```(\w+)\n(.*?)^```", text, re.S | re.M):
            out.append((path.relative_to(REPO).as_posix(), m.group(1), m.group(2)))
    return out


def test_there_are_examples_marked_to_run() -> None:
    assert [lang for _, lang, _ in _marked_blocks()] == ["bash"]


@pytest.mark.slow
@pytest.mark.parametrize("where,lang,code", _marked_blocks(), ids=lambda x: x if "/" in str(x) else "")
def test_a_marked_example_runs_as_written(tmp_path: Path, where: str, lang: str, code: str) -> None:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = ["bash", "-e", "-o", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"{where}: {r.stderr[-3000:]}"
    if "scores.csv" in code:
        lines = (tmp_path / "scores.csv").read_text().splitlines()
        assert lines[0] == "id,churn_probability" and len(lines) > 100
        assert all(0.0 <= float(line.split(",")[1]) <= 1.0 for line in lines[1:])

"""No code path may turn a peer's (or a file's) bytes into code: no pickle, marshal or eval.

Scans the source of the packages that touch the wire, checkpoints and data
files, token by token (comments and docstrings may talk about pickle; code
may not use it). A hit names the file and line; a legitimate need has to be
argued in review, not slipped in.
"""
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pserver", "optimizers", "runner", "models")
#: Names whose use in code is refused outright: the pickle family, marshal, pyzmq's pickling helpers.
FORBIDDEN_NAMES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "jsonpickle", "shelve", "marshal",
                   "recv_pyobj", "send_pyobj"}


def offences(source: str) -> list[tuple[int, str]]:
    """(line, what) for every forbidden use in ``source``."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)]
    found = []
    for i, tok in enumerate(tokens):
        if tok.type != tokenize.NAME:
            continue
        prev = tokens[i - 1].string if i else ""
        nxt = [t.string for t in tokens[i + 1:i + 3]]
        if tok.string in FORBIDDEN_NAMES:
            found.append((tok.start[0], tok.string))
        elif tok.string in ("eval", "exec") and nxt[:1] == ["("] and prev != ".":
            found.append((tok.start[0], f"{tok.string}("))
        elif tok.string == "allow_pickle" and nxt[:1] == ["="] and nxt[1:] != ["False"]:
            found.append((tok.start[0], "allow_pickle=" + "".join(nxt[1:])))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_package_exists(package):
    assert (ROOT / package / "__init__.py").is_file(), f"{package}/ moved? update PACKAGES in {__file__}"


def test_no_pickle_marshal_or_eval_in_source():
    hits = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = path.read_text(errors="replace").splitlines()
            for number, what in offences("\n".join(lines) + "\n"):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {what}: {lines[number - 1].strip()}")
    assert not hits, "pickle/marshal/eval in code (a peer's bytes must stay data):\n" + "\n".join(hits)


@pytest.mark.parametrize("bad", ["import pickle", "from pickle import loads", "x = sock.recv_pyobj()",
                                 "s.send_pyobj(x)", "import marshal", "marshal.loads(b)", "x = eval(s)",
                                 "exec(code)", "np.load(f, allow_pickle=True)", "import dill", "np.load(f, allow_pickle=flag)"])
def test_the_scan_catches(bad):
    assert offences(bad + "\n"), bad


@pytest.mark.parametrize("fine", ["model.evaluate(x)", "self.evaluator(x)", "m.eval()", "np.load(f, allow_pickle=False)",
                                  "# no pickle here", '"""nothing is unpickled"""', "s = 'eval(x)'"])
def test_the_scan_lets_through(fine):
    assert not offences(fine + "\n"), fine

"""The op table in `pserver.protocol`'s docstring is the truth: every op the shard and the coordinator
register is in it and nothing else; its request fields are the header fields each handler reads
(optional exactly when the handler has a default); its replies are the ones the handlers give."""
from __future__ import annotations

import ast
import inspect
import re
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import zmq

from pserver import protocol
from pserver.coordinator import Coordinator
from pserver.layout import Layout
from pserver.shard import Shard, numba_kernels
from pserver.shard_state import ShardConfig
from wire import Wire  # noqa: E402

N = 8
LAYOUT = Layout.from_shapes([(2, 3), (2,)])


@dataclass(frozen=True)
class Op:
    request: dict[str, bool]  # field -> optional
    request_frames: int
    reply: frozenset[str]  # fields besides ok
    reply_frames: int  # frames every successful reply carries (those marked "if" are not counted)


LINE = re.compile(r"^ {4}([A-Z]+) +\{([^}]*)\}((?: *\+ *\[[^\]]*\])*) *(?:→ *(.*))?$")
REPLY = re.compile(r"^\{([^}]*)\}((?: *\+ *\[[^\]]*\])*)$")


def _names(group: str) -> list[str]:
    return [n.strip() for n in group.split(",") if n.strip()]


def parse_table(doc: str) -> dict[str, dict[str, Op]]:
    """{"shard": {op: Op}, "coordinator": {op: Op}} from the docstring's Operations section."""
    tables: dict[str, dict[str, Op]] = {}
    section = None
    pending = None  # an op line whose reply is on the next line
    for line in doc.split("Operations\n==========", 1)[1].splitlines():
        if line.startswith("Shard ("):
            section = tables.setdefault("shard", {})
            continue
        if line.startswith("Coordinator ("):
            section = tables.setdefault("coordinator", {})
            continue
        if pending is not None and line.strip().startswith("→"):
            line, pending = pending + " " + line.strip(), None
        m = LINE.match(line)
        if not m:
            continue
        op, request, request_frames, reply = m.groups()
        if reply is None:
            pending = line
            continue
        r = REPLY.match(reply.strip())
        assert section is not None and r, f"cannot read the table line {line!r}"
        assert op not in section, f"{op} is in the table twice"
        reply_fields, reply_frames = r.groups()
        assert "ok" in _names(reply_fields), f"{op}: every reply carries ok"
        section[op] = Op(
            request={n.rstrip("?"): n.endswith("?") for n in _names(request)},
            request_frames=request_frames.count("["),
            reply=frozenset(_names(reply_fields)) - {"ok"},
            reply_frames=sum(1 for f in re.findall(r"\[([^\]]*)\]", reply_frames) if " if " not in f))
    return tables


TABLE = parse_table(protocol.__doc__)


def test_the_table_is_read():
    assert len(TABLE["shard"]) >= 8 and len(TABLE["coordinator"]) >= 10
    assert TABLE["shard"]["PUSH"] == Op({"worker": False, "inc": True, "ticket": True, "seq": False, "pulled": False, "mode": False, "scale": True,
                                         "pull": True, "shm": True, "wire": True}, 1, frozenset({"version", "staleness", "applied", "norm"}), 0)


@pytest.fixture(scope="module")
def kernels():
    return numba_kernels()


def servers(kernels) -> dict[str, object]:
    return {"shard": Shard(ShardConfig(), kernels=kernels, socket=Wire()),
            "coordinator": Coordinator(Wire(), shards=1, world=1, run_config={})}


def test_the_ops_are_the_registered_handlers(kernels):
    for side, server in servers(kernels).items():
        assert set(TABLE[side]) == set(server.handlers), side


# ---- request fields: what each handler reads, found in its source -----------------------------------

def _reads(cls: type) -> dict[str, dict[str, bool | None]]:
    """For each method of ``cls``, the header fields it reads, and the methods of ``cls`` it refers to.

    A field read by ``hfield(h, name, kind, default)`` is optional exactly when a default is given; one
    read by ``header.get(name)`` may be either (None)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    methods = {f.name: f for f in tree.body[0].body if isinstance(f, ast.FunctionDef)}
    direct: dict[str, dict[str, bool | None]] = {}
    refers: dict[str, set[str]] = {}
    for name, fn in methods.items():
        fields: dict[str, bool | None] = {}
        refs = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                    and node.attr in methods:
                refs.add(node.attr)
            if not isinstance(node, ast.Call) or not node.args:
                continue
            if isinstance(node.func, ast.Name) and node.func.id == "hfield":
                key = node.args[1]
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    fields[key.value] = len(node.args) >= 4
            elif isinstance(node.func, ast.Attribute) and node.func.attr == "get" and (
                    (isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "header")
                    or (isinstance(node.func.value, ast.Name) and node.func.value.id in ("h", "header"))):
                key = node.args[0]
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    fields.setdefault(key.value, None)
        direct[name], refers[name] = fields, refs

    def closure(name: str, seen: set[str]) -> dict[str, bool | None]:
        seen.add(name)
        out = dict(direct[name])
        for r in refers[name] - seen:
            for k, v in closure(r, seen).items():
                out.setdefault(k, v)
        return out

    return {name: closure(name, set()) for name in methods}


@pytest.mark.parametrize("side", ["shard", "coordinator"])
def test_request_fields_are_what_the_handlers_read(kernels, side):
    server = servers(kernels)[side]
    reads = _reads(type(server))
    for op, handler in server.handlers.items():
        read = reads[handler.__name__]
        documented = TABLE[side][op].request
        assert set(documented) == set(read), f"{side} {op}: the table says {sorted(documented)}, " \
                                             f"{handler.__name__} reads {sorted(read)}"
        for name, optional in read.items():
            if optional is not None:
                assert documented[name] == optional, f"{side} {op}: {name} is {'' if optional else 'not '}optional"


# ---- replies: what the handlers answer to a request built from the table ----------------------------

VALUES = {
    "start": 0, "end": N, "total": N, "world": 1, "fingerprint": "", "worker": 0, "seq": 1, "pulled": 0,
    "scale": 1.0, "pull": False, "round": 0, "alpha": 1.0, "lost": [], "done": [],
    "shard": 0, "endpoint": "127.0.0.1:1", "name": "w", "rank": 0, "layout": LAYOUT.to_wire(), "architecture": "",
    "observer": "eval", "samples": 1, "nan_recoveries": 0, "report": {}, "reason": "test", "rid": [1, 1],
    "shm": 0,  # no segment: the arrays travel as frames
    "wire": "float32",
    "inc": 1, "ticket": "", "proof": "",  # read, but not checked: these servers hold no secret
}
MODE = {"PUSH": "add", "ROUND": "average"}
# An order in which every op succeeds on a fresh server of world 1 (the coordinator's STATS comes before any
# shard registers, so that it asks no shard over the network).
ORDER = {"shard": ["INIT", "PING", "PULL", "PUSH", "ROUND", "STATS", "SHM", "LOST", "BYE"],
         "coordinator": ["PING", "STATS", "REGISTER", "INIT", "JOIN", "HEARTBEAT", "MODEL", "STOP", "LEAVE", "DONE"]}


@pytest.mark.parametrize("side", ["shard", "coordinator"])
def test_replies_are_as_the_table_says(kernels, side):
    server = servers(kernels)[side]
    assert sorted(ORDER[side]) == sorted(TABLE[side]), "give every op of the table a place in ORDER"
    for op in ORDER[side]:
        entry = TABLE[side][op]
        header = {"op": op, **{f: MODE[op] if f == "mode" else VALUES[f] for f in entry.request}}
        arrays = [np.ones(N, np.float32)] * entry.request_frames
        server.handle([zmq.Frame(b"peer"), *(zmq.Frame(bytes(f)) for f in protocol.encode(header, arrays))])
        [(who, reply)] = server.socket.sent
        server.socket.sent.clear()
        assert reply.header["ok"] is True, (side, op, reply.header)
        assert set(reply.header) - {"op", "v", "ok", "arrays"} == entry.reply, f"{side} {op}"
        assert len(reply.arrays) == entry.reply_frames, f"{side} {op}"
    if side == "shard":
        server.close_segments()  # SHM made two

"""The coordinator's state, as a restarted coordinator takes it back: `CoordinatorState`.

`pserver.coordinator.Coordinator.snapshot()` returns one and `restore()`
takes one; `pserver.checkpoint` writes its wire form (`to_wire`) as
``coordinator.json`` and reads it back, and `from_wire` checks what was read
against the server restoring it (its shard count, world and run config)
before anything of it is applied.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pserver.layout import Layout, shard_ranges

#: The keys of the wire form (`CoordinatorState.to_wire`), in the order it is written.
WIRE_KEYS = ("address", "shards", "world", "run", "endpoints", "layout", "architecture", "ranges", "total",
             "fingerprint", "workers", "stop", "observers", "memory", "refused", "repeats")

#: A `pserver.coordinator.ReplyMemory` entry: (client, n, op, decision), the decision a JOIN's rank (int) or an
#: INIT's ``first`` (bool).
MemoryEntry = tuple[int, int, str, int | bool]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class WorkerState:
    """What a restarted coordinator knows of one rank; times are not kept (a restored rank counts as seen
    at the restore)."""

    rank: int
    name: str
    done: bool
    lost: bool
    samples: int
    nan_recoveries: int
    report: dict[str, Any]  # the DONE's report: str -> int, float, str or bool
    incarnation: int  # how many processes have held the rank (`pserver.coordinator.WorkerInfo`)
    key: str  # with --keys: the public key (z85) the rank joined with

    def to_wire(self) -> dict[str, Any]:
        return {"rank": self.rank, "name": self.name, "done": self.done, "lost": self.lost, "samples": self.samples,
                "nan_recoveries": self.nan_recoveries, "report": dict(self.report), "incarnation": self.incarnation,
                "key": self.key}


@dataclass(frozen=True)
class CoordinatorState:
    """Everything a restarted coordinator must know (`pserver.coordinator`, Restarts): the ranks and names,
    done and lost workers and their reports, the run config, the model (layout, architecture, shard ranges),
    the shard endpoints, the stop reason, the observers and the reply memory.

    The wire form (`to_wire`) is a JSON object of these fields and two that follow from the layout,
    ``total`` and ``fingerprint``, which `from_wire` checks against it.
    """

    address: str  # host:port, as `pserver start` bound it ("" for a coordinator in a test)
    shards: int
    world: int
    run: dict[str, Any]  # the run config, as JSON carries it
    endpoints: dict[int, str]  # shard index -> host:port, where the shards were
    layout: Layout | None  # None before the first INIT
    architecture: str | None
    ranges: tuple[tuple[int, int], ...]  # each shard's [start, end) of the model; () without a layout
    workers: tuple[WorkerState, ...]  # by rank
    stop: str  # why the run should stop early; "" while it should not
    observers: tuple[str, ...]
    memory: tuple[MemoryEntry, ...]  # least recently seen first
    refused: dict[str, int]  # error code -> requests refused with it
    repeats: int  # retried JOINs and INITs answered from the reply memory

    def to_wire(self) -> dict[str, Any]:
        """The JSON object ``coordinator.json`` holds (`pserver.checkpoint`), keys in `WIRE_KEYS` order."""
        layout = self.layout
        return {
            "address": self.address, "shards": self.shards, "world": self.world, "run": dict(self.run),
            "endpoints": {str(k): e for k, e in sorted(self.endpoints.items())},
            "layout": layout.to_wire() if layout else None, "architecture": self.architecture,
            "ranges": [list(r) for r in self.ranges], "total": layout.total if layout else 0,
            "fingerprint": layout.fingerprint() if layout else "",
            "workers": [w.to_wire() for w in self.workers],
            "stop": self.stop, "observers": list(self.observers), "memory": [list(e) for e in self.memory],
            "refused": dict(self.refused), "repeats": self.repeats,
        }

    @classmethod
    def from_wire(cls, obj: Any, shards: int, world: int, run_config: dict[str, Any]) -> CoordinatorState:
        """`to_wire()`'s object back, checked against the server restoring it: ValueError naming the first
        field (in `WIRE_KEYS` order) that is missing or malformed, or that does not match ``shards``,
        ``world`` or ``run_config``."""
        if not isinstance(obj, dict):
            raise ValueError(f"the state must be a JSON object, got {type(obj).__name__}")
        missing = [k for k in WIRE_KEYS if k not in obj]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        if not isinstance(obj["address"], str):
            raise ValueError(f"address must be a string (host:port), got {type(obj['address']).__name__}")
        if obj["shards"] != shards:
            raise ValueError(f"written by a server with {obj['shards']} shard(s), this one has {shards}")
        if obj["world"] != world:
            raise ValueError(f"written by a server of {obj['world']} worker(s), this one has {world}")
        run, mine = obj["run"], json.loads(json.dumps(run_config))  # compared as JSON reads them back
        if not isinstance(run, dict):
            raise ValueError(f"run must be a JSON object, got {type(run).__name__}")
        if run != mine:
            keys = sorted(k for k in {*run, *mine} if run.get(k) != mine.get(k))
            raise ValueError(f"written for another run config (differing: {', '.join(keys)})")
        endpoints = obj["endpoints"]
        if not (isinstance(endpoints, dict) and all(isinstance(k, str) and k.isascii() and k.isdigit()
                                                    and int(k) < shards and isinstance(e, str) and ":" in e
                                                    for k, e in endpoints.items())):
            raise ValueError(f"endpoints must map shard indices to host:port, got {endpoints!r}")
        layout = None
        if obj["layout"] is not None:
            layout = Layout.from_wire(obj["layout"])
            if layout.fingerprint() != obj["fingerprint"] or layout.total != obj["total"]:
                raise ValueError("layout does not match its fingerprint or total")
        if not (obj["architecture"] is None or isinstance(obj["architecture"], str)):
            raise ValueError("architecture must be a string or null")
        ranges = _ranges(obj["ranges"])
        if layout is None and obj["ranges"] != []:
            raise ValueError("shard ranges without a layout")
        if layout is not None and ranges != tuple(shard_ranges(layout.total, shards)):
            raise ValueError(f"shard ranges {obj['ranges']} are not those of {layout.total} floats over "
                             f"{shards} shard(s)")
        workers = _workers(obj["workers"], world)
        if not isinstance(obj["stop"], str):
            raise ValueError(f"stop must be a string, got {type(obj['stop']).__name__}")
        observers = obj["observers"]
        if not (isinstance(observers, list) and all(isinstance(o, str) for o in observers)):
            raise ValueError(f"observers must be a list of names, got {observers!r:.200}")
        memory = _memory(obj["memory"])
        refused = obj["refused"]
        if not (isinstance(refused, dict) and all(_is_int(n) for n in refused.values())):
            raise ValueError(f"refused must map error codes to counts, got {refused!r:.200}")
        if not _is_int(obj["repeats"]):
            raise ValueError(f"repeats must be an integer, got {obj['repeats']!r:.40}")
        return cls(address=obj["address"], shards=shards, world=world, run=dict(run),
                   endpoints={int(k): e for k, e in endpoints.items()}, layout=layout,
                   architecture=obj["architecture"] or None, ranges=ranges or (), workers=workers, stop=obj["stop"],
                   observers=tuple(observers), memory=memory, refused=dict(refused), repeats=obj["repeats"])


def _ranges(value: Any) -> tuple[tuple[int, int], ...] | None:
    """[[start, end], ...] as a tuple of pairs; None if it is not one."""
    if isinstance(value, list) and all(isinstance(r, list) and len(r) == 2 and all(_is_int(x) for x in r)
                                       for r in value):
        return tuple((a, b) for a, b in value)
    return None


def _workers(value: Any, world: int) -> tuple[WorkerState, ...]:
    if not isinstance(value, list):
        raise ValueError(f"workers must be a list, got {type(value).__name__}")
    workers: dict[int, WorkerState] = {}
    for i, w in enumerate(value):
        try:
            rank, name, done, lost, samples, nan_recoveries, report = (
                w[k] for k in ("rank", "name", "done", "lost", "samples", "nan_recoveries", "report"))
            incarnation, key = w.get("incarnation", 1), w.get("key", "")
        except (TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"worker entry {i}: {exc!r}") from None
        if not (_is_int(rank) and 0 <= rank < world and rank not in workers and isinstance(name, str)
                and isinstance(done, bool) and isinstance(lost, bool) and _is_int(samples)
                and _is_int(nan_recoveries) and isinstance(report, dict) and _is_int(incarnation) and incarnation >= 1
                and isinstance(key, str)):
            raise ValueError(f"worker entry {i} is not a rank of [0, {world}) taken once with its name, done, lost, "
                             f"samples, nan_recoveries, report and incarnation: {w!r}")
        workers[rank] = WorkerState(rank=rank, name=name, done=done, lost=lost, samples=samples,
                                    nan_recoveries=nan_recoveries, report=dict(report), incarnation=incarnation,
                                    key=key)
    return tuple(workers.values())


def _memory(value: Any) -> tuple[MemoryEntry, ...]:
    if not isinstance(value, list):
        raise ValueError(f"memory must be a list of [client, n, op, decision], got {type(value).__name__}")
    for i, e in enumerate(value):
        if not (isinstance(e, list) and len(e) == 4 and all(_is_int(x) and x >= 0 for x in e[:2])
                and (e[2], type(e[3])) in (("JOIN", int), ("INIT", bool))):
            raise ValueError(f"memory entry {i} must be [client, n, 'JOIN', rank] or [client, n, 'INIT', first], "
                             f"got {e!r}")
    return tuple((e[0], e[1], e[2], e[3]) for e in value)

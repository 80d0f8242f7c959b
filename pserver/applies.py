"""Shard-side applies: how a shard turns one PUSH, or one synchronous round, into a new centre.

The shard knows no rule. A PUSH or ROUND names its ``mode``; the shard looks
the name up here and hands the apply its kernels, its centre slice and the
request's numbers. Everything around the apply stays the shard's: the checks
of the header and the frame, the per-worker seq dedupe, the SSP gate, the
finiteness and norm checks on what the apply returns, the commit, the version
and the statistics. An apply reads the centre and writes only the scratch
buffer it is given, so a refused update leaves the centre as it was.

    PUSH  `PushApply`:  (centre, the request's array, scale, staleness) → candidate centre,
                        (every element finite, L2 norm of the update), arrays the reply carries
    ROUND `RoundApply`: each contribution → one row; when every live worker's row is in,
                        (centre, rows) → the next centre; arrays each contributor's reply carries

The built-ins below are the ones the rules in `optimizers` use. A rule that
needs another one defines a subclass in its own module and registers it with
`@register("name")`; shards import such modules at start by name
(`ShardConfig.plugins`, `load_plugins`), so a new rule needs no change here
or in `pserver.shard`. `pserver` imports no plug-in itself.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Callable, Protocol, Sequence, TypeVar

import numpy as np

from pserver.errors import ConfigError, ProtocolError


class ShardKernels(Protocol):
    """What a shard's applies compute with; `pserver.kernels` (Numba) is the one `Shard.serve()` loads.

    Each apply kernel writes the candidate centre into ``out`` and returns
    (every element of the update and of ``out`` finite, L2 norm of the update) from the same pass.
    """

    def check(self, delta: np.ndarray) -> tuple[bool, float]: ...
    def add(self, centre: np.ndarray, delta: np.ndarray, out: np.ndarray,
            copy: np.ndarray | None = None) -> tuple[bool, float]: ...
    def add_scaled(self, centre: np.ndarray, delta: np.ndarray, scale: np.float32, out: np.ndarray,
                   copy: np.ndarray | None = None) -> tuple[bool, float]: ...
    def elastic(self, centre: np.ndarray, local: np.ndarray, alpha: np.float32, out: np.ndarray,
                diff: np.ndarray) -> tuple[bool, float]: ...
    def sum_round(self, centre: np.ndarray, rows: np.ndarray, count: int, scale: float, replace: bool,
                  out: np.ndarray) -> tuple[bool, float]: ...


class PushApply(ABC):
    """How one PUSH moves the centre. Registered instances are shared by every request: keep no state."""

    name = ""  # set by `register`
    #: Whether `apply` takes ``copy``: a second (n,) buffer to write the candidate centre into in the same pass.
    #: A co-located worker's push that asks for the centre back passes its reply area (`pserver.shm`), so the
    #: worker reads its new centre where the shard wrote it, with no copy of its own.
    copies = False

    @abstractmethod
    def apply(self, kernels: ShardKernels, centre: np.ndarray, delta: np.ndarray, scale: float, staleness: int,
              out: np.ndarray) -> tuple[bool, float, list[np.ndarray]]:
        """Write the candidate centre into ``out`` (the centre is read, never written), and into
        ``copy=`` too if the class says it `copies`.

        ``centre``, ``delta`` and ``out`` are (n,) float32; ``delta`` is the
        request's array (a view on the received frame), ``scale`` the header's,
        ``staleness`` the versions applied since the worker pulled. Returns
        (every element of the update and of ``out`` finite, its L2 norm, arrays the reply
        carries before the centre). The shard keeps those arrays with the
        worker's seq and sends them again to a retry of the same push, so
        they must be the apply's own: not views of ``out`` or ``centre``,
        buffers the shard reuses.
        """


class RoundApply(ABC):
    """How a synchronous round moves the centre: each contribution becomes a row, and the rows close the round."""

    name = ""  # set by `register`

    @abstractmethod
    def row(self, centre: np.ndarray, value: np.ndarray, alpha: float, out: np.ndarray) -> None:
        """Write one worker's contribution ``value`` (n,) into its row ``out`` (n,), against this round's centre."""

    @abstractmethod
    def close(self, kernels: ShardKernels, centre: np.ndarray, rows: np.ndarray, count: int,
              out: np.ndarray) -> bool | None:
        """Write the next round's centre into ``out`` from the first ``count`` rows of ``rows`` (world, n).

        Returns whether every element of ``out`` is finite (False: the shard keeps its centre); None, for a
        close that does not say, lets the shard commit ``out`` as it is."""

    def reply_arrays(self, row: np.ndarray) -> list[np.ndarray]:
        """The arrays a contributor's reply carries before the new centre, given its row; none by default."""
        return []


PUSH_APPLIES: dict[str, PushApply] = {}
ROUND_APPLIES: dict[str, RoundApply] = {}

A = TypeVar("A", bound=type)


def register(name: str) -> Callable[[A], A]:
    """Class decorator: serve PUSH (a `PushApply`) or ROUND (a `RoundApply`) requests of mode ``name``.

    Registering the same class again (a module imported twice) replaces it;
    another class under a name already taken is a ValueError.
    """
    def decorate(cls: A) -> A:
        if issubclass(cls, PushApply):
            table, op = PUSH_APPLIES, "PUSH"
        elif issubclass(cls, RoundApply):
            table, op = ROUND_APPLIES, "ROUND"
        else:
            raise TypeError(f"@register({name!r}) takes a PushApply or RoundApply subclass, not {cls.__qualname__}")
        old = table.get(name)
        if old is not None and _origin(type(old)) != _origin(cls):
            raise ValueError(f"{op} mode {name!r} is {_origin(type(old))}'s already; "
                             f"give {_origin(cls)} another name")
        instance = cls()
        instance.name = name
        table[name] = instance
        return cls
    return decorate


def _origin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def push_apply(mode: str) -> PushApply:
    """The apply of a PUSH of ``mode``; ProtocolError("malformed") naming the modes this shard serves."""
    return _lookup(PUSH_APPLIES, "PUSH", mode)


def round_apply(mode: str) -> RoundApply:
    """The apply of a ROUND of ``mode``; ProtocolError("malformed") naming the modes this shard serves."""
    return _lookup(ROUND_APPLIES, "ROUND", mode)


def _lookup(table: dict, op: str, mode: str):
    found = table.get(mode)
    if found is None:
        raise ProtocolError("malformed", f"{op} mode {mode!r} unknown; this shard serves {', '.join(sorted(table))} "
                                         f"(a rule's own mode is loaded into the shards with ShardConfig.plugins)")
    return found


def load_plugins(modules: Sequence[str]) -> None:
    """Import each module, which registers its applies; ConfigError naming a module that does not import."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigError(f"shard plug-in {module!r} cannot be imported ({type(exc).__name__}: {exc}); "
                              f"plugins name modules importable by the shard processes") from None


# ---- the built-ins: the Numba kernels' users ---------------------------------------------------------------

@register("add")
class Add(PushApply):
    """C ← C + Δ."""

    copies = True

    def apply(self, kernels, centre, delta, scale, staleness, out, copy=None):
        return (*kernels.add(centre, delta, out, copy), [])


@register("scaled")
class Scaled(PushApply):
    """C ← C + scale·Δ."""

    copies = True

    def apply(self, kernels, centre, delta, scale, staleness, out, copy=None):
        return (*kernels.add_scaled(centre, delta, np.float32(scale), out, copy), [])


@register("staleness")
class Staleness(PushApply):
    """C ← C + scale·Δ/(staleness + 1)."""

    copies = True

    def apply(self, kernels, centre, delta, scale, staleness, out, copy=None):
        return (*kernels.add_scaled(centre, delta, np.float32(scale / (staleness + 1)), out, copy), [])


@register("elastic")
class Elastic(PushApply):
    """The array is the worker's weights W: E = scale·(W − C), C ← C + E; the reply carries E."""

    def apply(self, kernels, centre, delta, scale, staleness, out):
        diff = np.empty_like(out)
        finite, norm = kernels.elastic(centre, delta, np.float32(scale), out, diff)
        return finite, norm, [diff]


@register("elastic")
class ElasticRound(RoundApply):
    """Row E_i = α(W_i − C_r); C_{r+1} = C_r + Σ_i E_i; each reply carries the worker's E_i."""

    def row(self, centre, value, alpha, out):
        np.subtract(value, centre, out=out)
        out *= np.float32(alpha)

    def close(self, kernels, centre, rows, count, out):
        return kernels.sum_round(centre, rows, count, 1.0, False, out)[0]

    def reply_arrays(self, row):
        return [row]


@register("average")
class AverageRound(RoundApply):
    """Row W_i; C_{r+1} = mean_i W_i."""

    def row(self, centre, value, alpha, out):
        out[:] = value

    def close(self, kernels, centre, rows, count, out):
        return kernels.sum_round(centre, rows, count, 1.0 / count, True, out)[0]

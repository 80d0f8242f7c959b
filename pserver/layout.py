"""Parameter layout and sharding: pure functions, no sockets.

A model's weights (``model.get_weights()``, non-trainable statistics included)
become one contiguous float32 vector. A layout records (name, shape, offset)
for each tensor; shard k owns ``[start_k, end_k)`` of that vector.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pserver.errors import LayoutMismatch


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class Layout:
    tensors: tuple[Tensor, ...]

    @property
    def total(self) -> int:
        return sum(t.size for t in self.tensors)

    @classmethod
    def from_shapes(cls, shapes: Sequence[Sequence[int]], names: Sequence[str] | None = None) -> "Layout":
        names = list(names) if names is not None else [f"w{i}" for i in range(len(shapes))]
        if len(names) != len(shapes):
            raise ValueError(f"{len(names)} names for {len(shapes)} shapes")
        tensors, offset = [], 0
        for name, shape in zip(names, shapes):
            t = Tensor(str(name), tuple(int(d) for d in shape), offset)
            if any(d < 0 for d in t.shape):
                raise ValueError(f"tensor {name!r} has a negative dimension {t.shape}")
            tensors.append(t)
            offset += t.size
        return cls(tuple(tensors))

    @classmethod
    def of(cls, weights: Sequence[np.ndarray], names: Sequence[str] | None = None) -> "Layout":
        return cls.from_shapes([w.shape for w in weights], names)

    def to_wire(self) -> list[list[Any]]:
        return [[t.name, list(t.shape)] for t in self.tensors]

    @classmethod
    def from_wire(cls, value: Any) -> "Layout":
        """Checks a layout received from a peer; raises ValueError naming the bad entry."""
        if not isinstance(value, list) or not value:
            raise ValueError("layout must be a non-empty list of [name, shape]")
        names, shapes = [], []
        for i, entry in enumerate(value):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], list)
                    and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in entry[1])):
                raise ValueError(f"layout entry {i} must be [name, [dims...]] with dims in [0, 2^31), got {entry!r}")
            names.append(entry[0])
            shapes.append(entry[1])
        return cls.from_shapes(shapes, names)

    def fingerprint(self) -> str:
        """sha256 of the shapes (names excluded: Keras renames layers between sessions)."""
        text = json.dumps([list(t.shape) for t in self.tensors], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def difference(self, other: "Layout") -> str | None:
        """None if equal, else a sentence naming the first difference."""
        if len(self.tensors) != len(other.tensors):
            return f"{len(other.tensors)} tensors where the server holds {len(self.tensors)} (total {other.total} vs {self.total} floats)"
        for i, (a, b) in enumerate(zip(self.tensors, other.tensors)):
            if a.shape != b.shape:
                return f"tensor {i} ({b.name!r}) has shape {b.shape}, the server's ({a.name!r}) has {a.shape}"
        return None

    def check_same(self, other: "Layout") -> None:
        diff = self.difference(other)
        if diff is not None:
            raise LayoutMismatch(f"model does not match the server's: {diff}")


def flatten(weights: Sequence[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """Weights → one float32 vector (total,)."""
    total = sum(int(np.size(w)) for w in weights)
    if out is None:
        out = np.empty(total, dtype=np.float32)
    elif out.shape != (total,):
        raise ValueError(f"out has shape {out.shape}, weights need ({total},)")
    offset = 0
    for w in weights:
        n = int(np.size(w))
        out[offset:offset + n] = np.asarray(w, dtype=np.float32).reshape(-1)
        offset += n
    return out


def unflatten(flat: np.ndarray, layout: Layout) -> list[np.ndarray]:
    """One float32 vector → a list of arrays shaped as the layout (copies)."""
    if flat.shape != (layout.total,):
        raise ValueError(f"vector of shape {flat.shape} for a layout of {layout.total} floats")
    return [flat[t.offset:t.offset + t.size].reshape(t.shape).copy() for t in layout.tensors]


def shard_ranges(total: int, shards: int) -> list[tuple[int, int]]:
    """S contiguous ranges balanced by element count that tile [0, total) exactly.

    The first ``total % shards`` ranges hold one element more. Every shard owns
    at least one element, so ``shards`` may not exceed ``total``.
    """
    if shards < 1:
        raise ValueError(f"need at least one shard, got {shards}")
    if total < shards:
        raise ValueError(f"{total} floats cannot be split over {shards} shards; use at most {max(total, 1)}")
    base, extra = divmod(total, shards)
    ranges, start = [], 0
    for k in range(shards):
        end = start + base + (1 if k < extra else 0)
        ranges.append((start, end))
        start = end
    assert start == total and all(a < b for a, b in ranges)
    return ranges

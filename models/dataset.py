"""A prepared data directory and the deterministic split every command shares.

A DIR holds what `notpu prepare` writes, in one of two layouts. One file set
(the local engine):

    X.npy      float32 [customers, steps, features]   a step is spec.window.bucket_days days
    y.npy      int8    [customers]            1 = churned
    ids.npy    str     [customers]            the customer ids, in row order
    active.npy bool    [customers, days]      a day with any event (day resolution whatever the step)
    spec.json the feature spec (types, aggregations, scaling, window, label rule)

or the same four .npy files once per part (`--engine spark`), so that each
worker of a cluster reads only its own:

    parts/part-00000/{X,y,ids,active}.npy ... parts/part-{P-1}/
    parts/index.json  {"format", "parts": P, "rows": [rows of each part]}
    spec.json

Rows are sorted by customer id in both layouts; in the parts layout the ids
are range-partitioned, so part k holds a contiguous block of that order and
the parts laid end to end are the one-file layout row for row. That is what
keeps the split a function of the ids: `split_indices(n)` permutes positions
in id order, so `notpu train`, `notpu baseline` and a worker that read one
part (`load_part(DIR, k).split()`) agree on the test customers, whichever
layout DIR has, and their AUCs can be compared.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from models.errors import DataError
from pserver.fileio import atomic_path, atomic_write_text

TEST_FRACTION = 0.2  # of all customers
VAL_FRACTION = 0.2   # of what is left after the test set
SPLIT_SEED = 20_17   # fixed so train, baseline and bench agree on the split
PARTS_DIR = "parts"
PARTS_INDEX = "index.json"  # written last: a DIR/parts without it is not a dataset
PARTS_FORMAT = "notpu-parts/1"


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # int64 row indices into X, sorted
    val: np.ndarray
    test: np.ndarray


def split_indices(n: int, seed: int = SPLIT_SEED) -> Split:
    """20% test, then 20% of the rest for validation; seeded, sorted indices."""
    if n < 5:
        raise DataError(f"{n} customers cannot be split into train/val/test; prepare more data")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * TEST_FRACTION)))
    n_val = max(1, int(round((n - n_test) * VAL_FRACTION)))
    test = np.sort(order[:n_test])
    val = np.sort(order[n_test:n_test + n_val])
    train = np.sort(order[n_test + n_val:])
    return Split(train=train, val=val, test=test)


@dataclass(frozen=True)
class Dataset:
    X: np.ndarray  # (customers, steps, features) float32, memory-mapped
    y: np.ndarray  # (customers,) int8
    ids: np.ndarray  # (customers,)
    spec: dict
    active: np.ndarray | None = None  # (customers, days) bool; None in directories prepared before it existed


def _check_arrays(where: Path, X: np.ndarray, y: np.ndarray, active: np.ndarray | None) -> None:
    if X.ndim != 3 or X.dtype != np.float32:
        raise DataError(f"{where / 'X.npy'}: expected float32 [customers, steps, features], got {X.dtype} {X.shape}")
    if y.shape != (X.shape[0],):
        raise DataError(f"{where / 'y.npy'}: {y.shape[0] if y.ndim else 0} labels for {X.shape[0]} customers")
    if active is not None and (active.ndim != 2 or active.shape[0] != X.shape[0] or active.dtype != np.bool_):
        raise DataError(f"{where / 'active.npy'}: expected bool [{X.shape[0]} customers, days], got "
                        f"{active.dtype} {active.shape}; re-run `notpu prepare`")


def _load_files(d: Path, mmap: bool, top: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(X, y, ids, active) of one file set: the DIR `top` of the one-file layout, or one of its parts."""
    if top.is_file():
        prepared = top.parent / "prepared"
        raise DataError(f"{top}: is a file, not a prepared DIR; run `notpu prepare {top} --out {prepared}` "
                        f"first and pass {prepared}")
    missing = [f for f in ("X.npy", "y.npy") if not (d / f).is_file()]
    if missing:
        raise DataError(f"{d}: missing {', '.join(missing)}; run `notpu prepare EVENTS --out {top}` first")
    X = np.load(d / "X.npy", mmap_mode="r" if mmap else None)
    y = np.load(d / "y.npy")
    ids_path = d / "ids.npy"
    ids = np.load(ids_path, allow_pickle=False) if ids_path.is_file() else np.arange(X.shape[0]).astype(str)
    active = np.load(d / "active.npy", mmap_mode="r" if mmap else None) if (d / "active.npy").is_file() else None
    _check_arrays(d, X, y, active)
    return X, y.astype(np.int8), ids, active


def _spec(d: Path) -> dict:
    spec_path = d / "spec.json"
    return json.loads(spec_path.read_text()) if spec_path.is_file() else {}


def load_dataset(directory: str | Path, mmap: bool = True) -> Dataset:
    """Open a prepared DIR of either layout; checks that the files agree with each other.

    The parts layout is read into memory, its parts laid end to end (the one-file
    layout's rows); a worker that needs only its rows reads `load_part`.
    """
    d = Path(directory)
    if (d / PARTS_DIR).is_dir():
        parts = [load_part(d, k) for k in range(num_parts(d))]
        X = np.concatenate([p.X for p in parts])  # (customers, steps, features)
        y = np.concatenate([p.y for p in parts])
        ids = np.concatenate([p.ids for p in parts])
        active = None if any(p.active is None for p in parts) else np.concatenate([p.active for p in parts])
        if ids.size > 1 and not (ids[1:] > ids[:-1]).all():
            raise DataError(f"{d / PARTS_DIR}: the parts' ids are not in ascending order end to end; "
                            "re-run `notpu prepare --engine spark`")
        return Dataset(X=X, y=y, ids=ids, spec=_spec(d), active=active)
    X, y, ids, active = _load_files(d, mmap, top=d)
    return Dataset(X=X, y=y, ids=ids, spec=_spec(d), active=active)


@dataclass(frozen=True)
class Part:
    """One worker's rows of a prepared DIR: rows `start` .. `start + len(y)` of the whole, in id order."""

    X: np.ndarray  # (rows, steps, features) float32, memory-mapped
    y: np.ndarray  # (rows,) int8
    ids: np.ndarray  # (rows,)
    spec: dict
    active: np.ndarray | None
    index: int  # k, 0-based
    parts: int  # P
    start: int  # the first row's index in the whole DIR
    customers: int  # rows in the whole DIR

    def split(self, seed: int = SPLIT_SEED) -> Split:
        """This part's rows (0-based, into X) of the whole DIR's `split_indices`: the same customers as there."""
        whole = split_indices(self.customers, seed)
        stop = self.start + len(self.y)

        def mine(rows: np.ndarray) -> np.ndarray:
            return rows[(rows >= self.start) & (rows < stop)] - self.start

        return Split(train=mine(whole.train), val=mine(whole.val), test=mine(whole.test))


def _parts_index(d: Path) -> dict:
    path = d / PARTS_DIR / PARTS_INDEX
    if not path.is_file():
        raise DataError(f"{path}: missing (an interrupted prepare?); run `notpu prepare EVENTS --out {d} --engine spark` again")
    index = json.loads(path.read_text())
    if index.get("format") != PARTS_FORMAT or len(index.get("rows", ())) != index.get("parts"):
        raise DataError(f"{path}: not a {PARTS_FORMAT} index; run `notpu prepare --engine spark` again")
    return index


def num_parts(directory: str | Path) -> int:
    """P, the parts of a prepared DIR: parts/index.json's count, or 1 for the one-file layout."""
    d = Path(directory)
    return _parts_index(d)["parts"] if (d / PARTS_DIR).is_dir() else 1


def part_dir(directory: str | Path, k: int) -> Path:
    """DIR/parts/part-KKKKK, where part k's files live."""
    return Path(directory) / PARTS_DIR / f"part-{k:05d}"


def load_part(directory: str | Path, k: int, mmap: bool = True) -> Part:
    """Part k of a prepared DIR, reading none of the other parts' arrays.

    For a worker of `notpu train --engine spark`: rank k of P = `num_parts(DIR)`
    opens its part and trains on `part.X[part.split().train]`; every worker's
    train rows together are the whole DIR's `split_indices(n).train`. A
    one-file DIR is one part (P = 1, k = 0), so the same code runs on both
    layouts. DIR must be where the worker can read it (a local path, or a
    shared mount such as NFS on a cluster).
    """
    d = Path(directory)
    if not (d / PARTS_DIR).is_dir():
        if k != 0:
            raise DataError(f"{d}: one-file layout (1 part); part {k} does not exist")
        X, y, ids, active = _load_files(d, mmap, top=d)
        return Part(X=X, y=y, ids=ids, spec=_spec(d), active=active, index=0, parts=1, start=0, customers=len(y))
    index = _parts_index(d)
    P, rows = index["parts"], index["rows"]
    if not 0 <= k < P:
        raise DataError(f"{d}: part {k} of {P}; parts are numbered 0 .. {P - 1}")
    X, y, ids, active = _load_files(part_dir(d, k), mmap, top=d)
    if len(y) != rows[k]:
        raise DataError(f"{part_dir(d, k)}: {len(y)} rows, {PARTS_INDEX} says {rows[k]}; re-run `notpu prepare --engine spark`")
    return Part(X=X, y=y, ids=ids, spec=_spec(d), active=active, index=k, parts=P, start=int(sum(rows[:k])),
                customers=int(sum(rows)))


def write_part(directory: str | Path, X_blocks: Iterable[np.ndarray], X_shape: tuple[int, int, int],
               y: np.ndarray, ids: np.ndarray, active: np.ndarray) -> None:
    """Write one part's files into `directory`, each under a temporary name then renamed.

    X arrives in blocks of rows (X_shape = (rows, steps, features)) and goes
    straight to a memory-mapped file, so no whole copy of it is held. Idempotent:
    a retried task that writes the same part again leaves the same files.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with atomic_path(d / "X.npy") as tmp:
        X = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=X_shape)
        i = 0
        for block in X_blocks:
            X[i:i + len(block)] = block
            i += len(block)
        if i != X_shape[0]:
            raise ValueError(f"write_part: {i} rows of X for {X_shape[0]}")
        X.flush()
        del X
    for name, array in (("y", y), ("ids", ids.astype(str)), ("active", active)):
        with atomic_path(d / f"{name}.npy") as tmp:
            np.save(tmp, array, allow_pickle=False)


def write_parts_index(directory: str | Path, rows: list[int]) -> None:
    """parts/index.json, the last file of a parts layout."""
    path = Path(directory) / PARTS_DIR / PARTS_INDEX
    atomic_write_text(path, json.dumps({"format": PARTS_FORMAT, "parts": len(rows), "rows": [int(r) for r in rows]}) + "\n")

"""A prepared data directory and the deterministic split every command shares.

A DIR holds what `notpu prepare` writes:

    X.npy      float32 [customers, steps, features]   a step is spec.window.bucket_days days
    y.npy      int8    [customers]            1 = churned
    ids.npy    str     [customers]            the customer ids, in row order
    active.npy bool    [customers, days]      a day with any event (day resolution whatever the step)
    spec.json the feature spec (types, aggregations, scaling, window, label rule)

`notpu train` and `notpu baseline` both call `split_indices`, so their test
sets are the same customers and their AUCs can be compared.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import DataError

TEST_FRACTION = 0.2  # of all customers
VAL_FRACTION = 0.2   # of what is left after the test set
SPLIT_SEED = 20_17   # fixed so train, baseline and bench agree on the split


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


def load_dataset(directory: str | Path, mmap: bool = True) -> Dataset:
    """Open a prepared DIR; checks that the files agree with each other."""
    d = Path(directory)
    missing = [f for f in ("X.npy", "y.npy") if not (d / f).is_file()]
    if missing:
        raise DataError(f"{d}: missing {', '.join(missing)}; run `notpu prepare EVENTS --out {d}` first")
    X = np.load(d / "X.npy", mmap_mode="r" if mmap else None)
    y = np.load(d / "y.npy")
    if X.ndim != 3 or X.dtype != np.float32:
        raise DataError(f"{d / 'X.npy'}: expected float32 [customers, steps, features], got {X.dtype} {X.shape}")
    if y.shape != (X.shape[0],):
        raise DataError(f"{d / 'y.npy'}: {y.shape[0] if y.ndim else 0} labels for {X.shape[0]} customers")
    ids_path = d / "ids.npy"
    ids = np.load(ids_path, allow_pickle=False) if ids_path.is_file() else np.arange(X.shape[0]).astype(str)
    spec_path = d / "spec.json"
    spec = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
    active = None
    if (d / "active.npy").is_file():
        active = np.load(d / "active.npy", mmap_mode="r" if mmap else None)
        if active.ndim != 2 or active.shape[0] != X.shape[0] or active.dtype != np.bool_:
            raise DataError(f"{d / 'active.npy'}: expected bool [{X.shape[0]} customers, days], got "
                            f"{active.dtype} {active.shape}; re-run `notpu prepare`")
    return Dataset(X=X, y=y.astype(np.int8), ids=ids, spec=spec, active=active)

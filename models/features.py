"""Daily aggregation of events into the [customers, days, types × aggregations] tensor.

Shared by `prepare` (training data) and `predict` (new logs): both feed batches of
events already mapped to a feature type and get back log-scaled float32 rows, so
a model sees the same features at training and at prediction time.

Accumulators are dense [customers, days, types] arrays filled with `np.add.at` /
`np.minimum.at` / `np.maximum.at` (unbuffered and fast in numpy >= 1.25), so the
memory is set by the output's size, never by the number of events.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from models.events import DAY_S, CodeBook

log = logging.getLogger(__name__)

AGGREGATIONS = ("count", "sum", "min", "max", "mean")
SCALING = "signed_log1p"  # x -> sign(x) * log1p(|x|): tames heavy tails, keeps 0 at 0 and the sign
BLOCK_ROWS = 1024  # customers per block when building the tensor: ~80 MB of float64 temporaries at 21 types


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """sign(x) * log1p(|x|), in place when x is float32."""
    return np.copysign(np.log1p(np.abs(x)), x)


def signed_expm1(x: np.ndarray) -> np.ndarray:
    """Inverse of `signed_log1p`."""
    return np.copysign(np.expm1(np.abs(x)), x)


@dataclass(frozen=True)
class Window:
    """The observation window [start_s, start_s + days * DAY_S); day 0 is the oldest."""

    start_s: int
    days: int

    @property
    def end_s(self) -> int:
        return self.start_s + self.days * DAY_S


class DailyAggregator:
    """count / sum / min / max / mean of event_value per (customer, day, type).

    Missing values (NaN) are counted but left out of sum, min, max and mean; a cell
    with no value has sum = min = max = mean = 0. Customers get rows in order of
    first appearance; `ids()` gives them.
    """

    def __init__(self, window: Window, n_types: int) -> None:
        self.window = window
        self.n_types = n_types
        self.book = CodeBook()
        self._cap = 0
        shape = (0, window.days, n_types)
        self.count = np.zeros(shape, np.int32)  # events, NaN values included
        self.nval = np.zeros(shape, np.int32)  # events with a finite value
        self.sum = np.zeros(shape, np.float64)  # float64: sums of money over a day need the precision
        self.min = np.zeros(shape, np.float32)  # +inf until a value arrives
        self.max = np.zeros(shape, np.float32)
        self.tally = np.zeros(0, np.int64)  # (customers,) a per-customer counter, e.g. label sessions

    @property
    def n_customers(self) -> int:
        return len(self.book)

    def encode(self, id_codes: np.ndarray, id_uniques: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Global customer codes (int64 [n], -1 outside `rows`) for one batch.

        Only ids of rows in `rows` (bool [n]) get a code, so customers who never
        appear in the windows take no memory.
        """
        used = np.bincount(id_codes[rows], minlength=len(id_uniques)) > 0  # (u,)
        per_unique = np.full(len(id_uniques), -1, np.int64)
        per_unique[used] = self.book.encode(id_uniques[used])
        self._grow(self.n_customers)
        out = per_unique[id_codes]
        out[~rows] = -1
        return out

    def _grow(self, need: int) -> None:
        if need <= self._cap:
            return
        cap = max(need, int(self._cap * 1.5), 1024)  # amortised growth: copies stay O(output)
        d, t = self.window.days, self.n_types

        def grown(a: np.ndarray, fill: float) -> np.ndarray:
            b = np.full((cap, d, t), fill, a.dtype) if a.ndim == 3 else np.full(cap, fill, a.dtype)
            b[: a.shape[0]] = a
            return b

        self.count, self.nval, self.sum = grown(self.count, 0), grown(self.nval, 0), grown(self.sum, 0)
        self.min, self.max = grown(self.min, np.inf), grown(self.max, -np.inf)
        self.tally = grown(self.tally, 0)
        self._cap = cap

    def add(self, cust: np.ndarray, ts_s: np.ndarray, type_idx: np.ndarray, value: np.ndarray) -> None:
        """Accumulate events; all arrays (n,), events outside the window are ignored."""
        inside = (ts_s >= self.window.start_s) & (ts_s < self.window.end_s) & (cust >= 0)
        c, t, v = cust[inside], type_idx[inside], value[inside]
        d = (ts_s[inside] - self.window.start_s) // DAY_S
        cell = (c, d, t)
        np.add.at(self.count, cell, 1)
        ok = np.isfinite(v)  # NaN/inf: counted above, no value to aggregate
        cell_v = (c[ok], d[ok], t[ok])
        vv = v[ok]
        np.add.at(self.nval, cell_v, 1)
        np.add.at(self.sum, cell_v, vv)
        np.minimum.at(self.min, cell_v, vv.astype(np.float32))
        np.maximum.at(self.max, cell_v, vv.astype(np.float32))

    def add_tally(self, cust: np.ndarray) -> None:
        """Count one per entry of `cust` (global codes >= 0) in the per-customer tally."""
        c = cust[cust >= 0]
        self.tally[: self.n_customers] += np.bincount(c, minlength=self.n_customers)

    def ids(self) -> np.ndarray:
        """(customers,) ids as text, in row order."""
        return self.book.keys().astype(str)

    def active_days(self) -> np.ndarray:
        """(customers,) days with at least one event in the window."""
        n = self.n_customers
        return (self.count[:n].sum(axis=2) > 0).sum(axis=1)

    def block(self, rows: np.ndarray) -> np.ndarray:
        """Log-scaled features for customer rows: float32 (len(rows), days, types * 5), type-major."""
        cnt = self.count[rows].astype(np.float32)  # (b, D, T)
        nv = self.nval[rows]
        has = nv > 0
        s = self.sum[rows]
        mean = np.where(has, s / np.maximum(nv, 1), 0.0)
        mn = np.where(has, self.min[rows], 0.0)
        mx = np.where(has, self.max[rows], 0.0)
        feats = np.stack([cnt, s, mn, mx, mean], axis=-1).astype(np.float32)  # (b, D, T, 5)
        feats = feats.reshape(len(rows), self.window.days, self.n_types * len(AGGREGATIONS))
        return signed_log1p(feats)


def feature_names(types: list[str]) -> list[str]:
    """Names of X's last axis, e.g. 'purchase:sum'; type-major like `DailyAggregator.block`."""
    return [f"{t}:{a}" for t in types for a in AGGREGATIONS]

"""Aggregation of events into the [customers, steps, types × aggregations] tensor.

A step is one day, or a bucket of N days (`--bucket-days`): a 273-day window
of mostly empty days is mostly cost for a recurrent network, and weekly steps
carry the same purchases in 39 steps. Aggregations are computed from the raw
events of each step (counts and sums add, min/max over the step, mean = sum /
count), never from daily values.

Shared by `prepare` (training data) and `predict` (new logs): both feed batches of
events already mapped to a feature type and get back log-scaled float32 rows, so
a model sees the same features at training and at prediction time.

Accumulators are dense [customers, steps, types] arrays filled with `np.add.at` /
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


#: Windows longer than this get weekly steps by default; up to it, daily steps (the talk's 90 days).
LONG_WINDOW_DAYS = 120
LONG_WINDOW_BUCKET_DAYS = 7


def auto_bucket_days(observation_days: int) -> int:
    """The default step: a day up to LONG_WINDOW_DAYS, a week beyond.

    Weekly steps train a long, sparse window (a shop's 6-18 months) several
    times faster and score higher; up to about four months, daily steps
    resolve how churners fade (bench/RESULTS.md, "Why the defaults are what
    they are").
    """
    return 1 if observation_days <= LONG_WINDOW_DAYS else LONG_WINDOW_BUCKET_DAYS


@dataclass(frozen=True)
class Window:
    """The observation window [start_s, start_s + days * DAY_S), cut into steps of `bucket_days` days.

    Step 0 is the oldest. Steps are aligned to the cut-off: the newest step
    always holds `bucket_days` whole days, and when `days` is not a multiple
    of `bucket_days` the oldest step is the short one (recent behaviour is what
    predicts churn, so it gets the regular steps).
    """

    start_s: int
    days: int
    bucket_days: int = 1

    def __post_init__(self) -> None:
        if self.days < 1 or self.bucket_days < 1:
            raise ValueError(f"a window needs days >= 1 and bucket_days >= 1, got {self.days} and {self.bucket_days}")

    @property
    def end_s(self) -> int:
        return self.start_s + self.days * DAY_S

    @property
    def steps(self) -> int:
        return -(-self.days // self.bucket_days)  # ceil

    @property
    def pad_days(self) -> int:
        """Days the oldest step is short of `bucket_days`."""
        return self.steps * self.bucket_days - self.days

    def step_of_day(self, day: np.ndarray) -> np.ndarray:
        """Step index of window days (0 = the oldest day)."""
        return (day + self.pad_days) // self.bucket_days


class DailyAggregator:
    """count / sum / min / max / mean of event_value per (customer, step, type); a step is `window.bucket_days` days.

    Missing values (NaN) are counted but left out of sum, min, max and mean; a cell
    with no value has sum = min = max = mean = 0. Customers get rows in order of
    first appearance; `ids()` gives them. Active days are kept per day whatever
    the step, so the newcomer filter means the same with and without buckets.
    """

    def __init__(self, window: Window, n_types: int) -> None:
        self.window = window
        self.n_types = n_types
        self.book = CodeBook()
        self._cap = 0
        shape = (0, window.steps, n_types)
        self.count = np.zeros(shape, np.int32)  # events, NaN values included
        self.nval = np.zeros(shape, np.int32)  # events with a finite value
        self.sum = np.zeros(shape, np.float64)  # float64: sums of money over a day need the precision
        self.min = np.zeros(shape, np.float32)  # +inf until a value arrives
        self.max = np.zeros(shape, np.float32)
        self.tally = np.zeros(0, np.int64)  # (customers,) a per-customer counter, e.g. label sessions
        self.active = np.zeros((0, window.days), bool)  # (customers, days) a day with any event

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
        def grown(a: np.ndarray, fill: float) -> np.ndarray:
            b = np.full((cap, *a.shape[1:]), fill, a.dtype)
            b[: a.shape[0]] = a
            return b

        self.count, self.nval, self.sum = grown(self.count, 0), grown(self.nval, 0), grown(self.sum, 0)
        self.min, self.max = grown(self.min, np.inf), grown(self.max, -np.inf)
        self.tally, self.active = grown(self.tally, 0), grown(self.active, False)
        self._cap = cap

    def add(self, cust: np.ndarray, ts_s: np.ndarray, type_idx: np.ndarray, value: np.ndarray) -> None:
        """Accumulate events; all arrays (n,), events outside the window are ignored."""
        inside = (ts_s >= self.window.start_s) & (ts_s < self.window.end_s) & (cust >= 0)
        c, t, v = cust[inside], type_idx[inside], value[inside]
        day = (ts_s[inside] - self.window.start_s) // DAY_S
        self.active[c, day] = True
        d = self.window.step_of_day(day)
        cell = (c, d, t)
        np.add.at(self.count, cell, 1)
        ok = np.isfinite(v)  # NaN/inf: counted above, no value to aggregate
        cell_v = (c[ok], d[ok], t[ok])
        vv = v[ok]
        np.add.at(self.nval, cell_v, 1)
        np.add.at(self.sum, cell_v, vv)
        np.minimum.at(self.min, cell_v, vv.astype(np.float32))
        np.maximum.at(self.max, cell_v, vv.astype(np.float32))

    def add_cells(self, cust: np.ndarray, day: np.ndarray, type_idx: np.ndarray, count: np.ndarray,
                  nval: np.ndarray, total: np.ndarray, low: np.ndarray, high: np.ndarray) -> None:
        """Accumulate cells already aggregated per (customer, window day, type), as `spark_prepare` makes them.

        All arrays (n,): `count` events, `nval` of them with a finite value, whose
        sum, min and max are `total`, `low`, `high` (0, +inf, -inf when nval is 0).
        Days fold into steps here, as events do in `add`, so both give the same cells.
        """
        self.active[cust, day] = True
        cell = (cust, self.window.step_of_day(day), type_idx)
        np.add.at(self.count, cell, count)
        np.add.at(self.nval, cell, nval)
        np.add.at(self.sum, cell, total)
        np.minimum.at(self.min, cell, low.astype(np.float32))
        np.maximum.at(self.max, cell, high.astype(np.float32))

    def add_tally(self, cust: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add one (or `weights`, (n,)) per entry of `cust` (global codes >= 0) to the per-customer tally."""
        ok = cust >= 0
        w = None if weights is None else weights[ok]
        self.tally[: self.n_customers] += np.bincount(cust[ok], weights=w, minlength=self.n_customers).astype(np.int64)

    def ids(self) -> np.ndarray:
        """(customers,) ids as text, in row order."""
        return self.book.keys().astype(str)

    def active_days(self) -> np.ndarray:
        """(customers,) days with at least one event in the window."""
        return self.active[: self.n_customers].sum(axis=1)

    def block(self, rows: np.ndarray) -> np.ndarray:
        """Log-scaled features for customer rows: float32 (len(rows), steps, types * 5), type-major."""
        cnt = self.count[rows].astype(np.float32)  # (b, S, T)
        nv = self.nval[rows]
        has = nv > 0
        s = self.sum[rows]
        mean = np.where(has, s / np.maximum(nv, 1), 0.0)
        mn = np.where(has, self.min[rows], 0.0)
        mx = np.where(has, self.max[rows], 0.0)
        feats = np.stack([cnt, s, mn, mx, mean], axis=-1).astype(np.float32)  # (b, S, T, 5)
        feats = feats.reshape(len(rows), self.window.steps, self.n_types * len(AGGREGATIONS))
        return signed_log1p(feats)


def feature_names(types: list[str]) -> list[str]:
    """Names of X's last axis, e.g. 'purchase:sum'; type-major like `DailyAggregator.block`."""
    return [f"{t}:{a}" for t in types for a in AGGREGATIONS]

"""`notpu prepare`: event log -> X.npy, y.npy, ids.npy, spec.json.

Two streaming passes over the log, each one batch (~1M events) at a time:

1. timestamps and types only: the last event (for the default cut-off) and how
   often each type occurs per day (to choose the kept types inside the window);
2. everything: aggregates per customer and step (a day, or a bucket of days)
   in the observation window, and the session count in the label window.

Output is written into a temporary directory beside DIR and renamed at the end,
so a failure leaves DIR as it was. The options, the plan and the spec are
`models.prepare_plan`'s, shared with the Spark engine (`models.spark_prepare`).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from models.events import DAY_S, CodeBook, EventColumns, EventSource, check_columns, detect_format, iter_events
from models.features import AGGREGATIONS, BLOCK_ROWS, DailyAggregator
from models.outdir import check_replaceable, staged_dir
# The shared planning, re-exported: `from models.prepare import PrepareConfig, prepare` is the public API.
from models.prepare_plan import (ENGINES, MAX_OBSERVATION_DAYS, OTHER, SPEC_FORMAT, LogSurvey, Plan,  # noqa: F401
                                 PrepareConfig, check_options, iso, kept_rows, make_spec, parse_cutoff, plan,
                                 type_index)

log = logging.getLogger(__name__)


def survey(path: EventSource, columns: EventColumns) -> LogSurvey:
    """Pass 1: timestamps and types only."""
    types = CodeBook()
    parts: list[pd.Series] = []
    last, events = None, 0
    for b in iter_events(path, columns, roles=("time", "type")):
        events += b.n
        last = int(b.ts_s.max()) if last is None else max(last, int(b.ts_s.max()))
        g = types.encode(b.type_uniques)[b.type_codes]  # (n,) global type codes
        key = g * (1 << 32) + (b.ts_s // DAY_S + (1 << 31))  # (type, day) packed in one int64
        uk, cnt = np.unique(key, return_counts=True)
        parts.append(pd.Series(cnt, index=uk))
    both = pd.concat(parts).groupby(level=0).sum()
    keys = both.index.to_numpy()
    idx = pd.MultiIndex.from_arrays([keys >> 32, (keys & ((1 << 32) - 1)) - (1 << 31)], names=["type", "day"])
    return LogSurvey(events, last, types.keys().astype(str), pd.Series(both.to_numpy(), index=idx))


def prepare(cfg: PrepareConfig) -> dict:
    """Run both passes and write DIR; returns the spec (also DIR/spec.json).

    `cfg.engine` "spark" runs the same passes as Spark SQL (`models.spark_prepare`).
    """
    check_options(cfg)
    if cfg.engine == "spark":
        from models.spark_prepare import prepare_spark

        return prepare_spark(cfg)
    out = Path(cfg.out)
    check_replaceable(out, marker="spec.json")
    check_columns(cfg.events, cfg.columns)
    t0 = time.perf_counter()
    s = survey(cfg.events, cfg.columns)
    p = plan(cfg, s)
    window, cutoff, types = p.window, p.cutoff_s, p.types
    t1 = time.perf_counter()
    log.info("pass 1: %d events in %.1fs; cut-off %s, %d types kept", s.events, t1 - t0, iso(cutoff), len(types) - 1)

    agg = DailyAggregator(window, len(types))
    for b in iter_events(cfg.events, cfg.columns):
        ftype = type_index(b.type_uniques, types)[b.type_codes]  # (n,)
        is_session = (b.type_uniques == cfg.session_type)[b.type_codes]
        in_obs = (b.ts_s >= window.start_s) & (b.ts_s < cutoff)
        in_label = is_session & (b.ts_s >= cutoff) & (b.ts_s < p.label_end_s)
        cust = agg.encode(b.id_codes, b.id_uniques, in_obs | in_label)
        agg.add(cust, b.ts_s, ftype, b.value)
        agg.add_tally(cust[in_label])
    t2 = time.perf_counter()
    log.info("pass 2: %d customers in the windows in %.1fs", agg.n_customers, t2 - t1)

    kept, y = kept_rows(cfg, agg)
    ids = agg.ids()
    spec = make_spec(cfg, p, detect_format(cfg.events), events=s.events, seen=agg.n_customers,
                     kept=kept.size, churned=int(y.sum()))
    _write(out, agg, kept, y, ids[kept], spec)
    log.info("prepared %d customers x %d steps of %d day(s) x %d features in %.1fs (%.0f events/s) -> %s",
             kept.size, window.steps, window.bucket_days, len(spec["features"]), time.perf_counter() - t0,
             s.events / (time.perf_counter() - t0), out)
    return spec


def _write(out: Path, agg: DailyAggregator, kept: np.ndarray, y: np.ndarray, ids: np.ndarray, spec: dict) -> None:
    with staged_dir(out) as tmp:
        shape = (kept.size, agg.window.steps, agg.n_types * len(AGGREGATIONS))  # (customers, steps, features)
        X = np.lib.format.open_memmap(tmp / "X.npy", mode="w+", dtype=np.float32, shape=shape)
        for i in range(0, kept.size, BLOCK_ROWS):
            X[i:i + BLOCK_ROWS] = agg.block(kept[i:i + BLOCK_ROWS])
        X.flush()
        del X
        np.save(tmp / "y.npy", y)
        np.save(tmp / "ids.npy", ids.astype(str), allow_pickle=False)  # (customers,) unicode, no pickle
        np.save(tmp / "active.npy", agg.active[kept])  # (customers, days) bool: the baseline's recency, per day
        (tmp / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")

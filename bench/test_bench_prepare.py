"""prepare throughput on generated events, against pandas written the obvious way.

    python -m pytest -q bench/test_bench_prepare.py               # 10M events
    NOTPU_BENCH_QUICK=1 python -m pytest -q bench/test_bench_prepare.py   # ~200k events

Both run side by side in one process on the same Parquet file; the figure that
matters is the ratio (time is noisy on 2 shared cores). The pandas version also
serves as an independent re-statement: its X must equal ours.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import psutil
import pytest

from models.features import AGGREGATIONS, signed_log1p
from models.generate import GeneratorConfig, generate_events, write_events
from models.prepare import OTHER, PrepareConfig, prepare

QUICK = os.environ.get("NOTPU_BENCH_QUICK") == "1"
EVENTS_PER_PLAYER = 1_360  # what the generator makes over 90 + 21 days, on average
TARGET_EVENTS = 200_000 if QUICK else 10_000_000
DAY_S = 86_400


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "events.parquet"
    write_events(generate_events(GeneratorConfig(players=TARGET_EVENTS // EVENTS_PER_PLAYER, seed=1)), path)
    return path


def peak_rss_mb(fn: Callable[[], object]) -> tuple[object, float]:
    """Run fn, sampling this process's RSS every 10 ms; returns (result, peak MiB)."""
    proc, peak, done = psutil.Process(), [proc_rss := psutil.Process().memory_info().rss], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], proc.memory_info().rss)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        result = fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], proc_rss, proc.memory_info().rss)
    return result, peak[0] / 2**20


def pandas_prepare(path: Path, observation_days: int = 90, label_days: int = 21, max_types: int = 50,
                   min_sessions: int = 2, min_active_days: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The obvious pandas version: read everything, groupby (id, day, type), pivot, reindex."""
    df = pd.read_parquet(path)
    df["id"] = df["id"].astype(str)
    df["event_type"] = df["event_type"].astype(str)
    cutoff = (df["timestamp"].max() // DAY_S + 1 - label_days) * DAY_S
    start = cutoff - observation_days * DAY_S
    label = df[(df["timestamp"] >= cutoff) & (df["timestamp"] < cutoff + label_days * DAY_S) & (df["event_type"] == "connect")]
    obs = df[(df["timestamp"] >= start) & (df["timestamp"] < cutoff)].copy()
    counts = obs["event_type"].value_counts()
    counts = counts[counts.index != OTHER]
    top = sorted(counts.index, key=lambda t: (-counts[t], t))[: max_types - 1]
    types = top + [OTHER]
    obs["type"] = obs["event_type"].where(obs["event_type"].isin(top), OTHER)
    obs["day"] = (obs["timestamp"] - start) // DAY_S
    agg = obs.groupby(["id", "day", "type"])["event_value"].agg(["size", "sum", "min", "max", "mean"]).fillna(0.0)
    wide = agg.unstack("type")  # columns (aggregation, type)
    active = obs.groupby("id")["day"].nunique()
    ids = np.sort(active[active >= min_active_days].index.to_numpy().astype(str))
    full = pd.MultiIndex.from_product([ids, range(observation_days)], names=["id", "day"])
    cols = pd.MultiIndex.from_product([["size", "sum", "min", "max", "mean"], types])
    wide = wide.reindex(index=full, columns=cols, fill_value=0.0).fillna(0.0)
    X = wide.to_numpy(np.float32).reshape(len(ids), observation_days, len(AGGREGATIONS), len(types))
    X = signed_log1p(X.transpose(0, 1, 3, 2).reshape(len(ids), observation_days, -1))  # type-major like prepare
    y = (label.groupby("id").size().reindex(ids, fill_value=0) < min_sessions).to_numpy().astype(np.int8)
    return X, y, ids


def test_prepare_throughput(benchmark, events: Path, tmp_path: Path) -> None:
    n_events = pd.read_parquet(events, columns=["timestamp"]).shape[0]
    out = tmp_path / "data"

    def ours() -> dict:
        return prepare(PrepareConfig(events=str(events), out=str(out)))

    spec, peak = peak_rss_mb(lambda: benchmark.pedantic(ours, rounds=1, iterations=1, warmup_rounds=0))
    ours_s = benchmark.stats.stats.mean

    t0 = time.perf_counter()
    (X_pd, y_pd, ids_pd), peak_pd = peak_rss_mb(lambda: pandas_prepare(events))
    pandas_s = time.perf_counter() - t0

    # The two implementations agree, cell for cell.
    np.testing.assert_array_equal(np.load(out / "ids.npy"), ids_pd)
    np.testing.assert_array_equal(np.load(out / "y.npy"), y_pd)
    np.testing.assert_allclose(np.load(out / "X.npy", mmap_mode="r"), X_pd, rtol=2e-5, atol=2e-6)

    benchmark.extra_info.update({
        "events": n_events,
        "events_per_s": round(n_events / ours_s),
        "peak_rss_mb": round(peak),
        "ratio_vs_pandas": round(pandas_s / ours_s, 2),
        "pandas_s": round(pandas_s, 2),
        "pandas_peak_rss_mb": round(peak_pd),
        "customers": spec["counts"]["customers_kept"],
    })
    print(f"\nprepare: {n_events} events in {ours_s:.2f} s = {n_events / ours_s:,.0f} events/s, peak RSS {peak:.0f} MiB; "
          f"pandas {pandas_s:.2f} s (peak {peak_pd:.0f} MiB): {pandas_s / ours_s:.1f}x")
    assert spec["counts"]["customers_kept"] == len(ids_pd)

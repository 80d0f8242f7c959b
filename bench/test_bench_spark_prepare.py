"""prepare on Spark (`--engine spark --master local[2]`) against the local path, on one machine.

    python -m pytest -q -s bench/test_bench_spark_prepare.py            # 10M events
    python -m pytest -q -s bench/test_bench_spark_prepare.py --quick    # ~200k events

Both engines run in one process on the same Parquet file, in turn (local,
then Spark), each timed from the call to the written DIR; Spark's time
includes starting its JVM, as a user's `notpu prepare --engine spark` does.
The figure that matters is the ratio of events/s: on one machine the local
path's single numpy process has nothing to shuffle or serialise, so Spark is
expected to be slower; it pays off when the log no longer fits one machine's
disk or memory, or already lives on a cluster. Both outputs are checked equal.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench._timing import numbers
from models.dataset import load_dataset
from models.generate import GeneratorConfig, generate_events, write_events
from models.prepare import PrepareConfig, prepare

pytest.importorskip("pyspark")

QUICK = os.environ.get("NOTPU_BENCH_QUICK") == "1"
EVENTS_PER_PLAYER = 1_360  # what the generator makes over 90 + 21 days, on average
TARGET_EVENTS = 200_000 if QUICK else 10_000_000
MASTER = "local[2]"


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "events.parquet"
    write_events(generate_events(GeneratorConfig(players=TARGET_EVENTS // EVENTS_PER_PLAYER, seed=1)), path)
    return path


@pytest.mark.timeout(3600 if not QUICK else 600)
def test_spark_prepare_throughput(benchmark, events: Path, tmp_path: Path) -> None:
    n_events = pq.ParquetFile(events).metadata.num_rows
    local_out, spark_out = tmp_path / "local", tmp_path / "spark"

    t0 = time.perf_counter()
    spec = prepare(PrepareConfig(events=str(events), out=str(local_out)))
    local_s = time.perf_counter() - t0

    def spark() -> dict:
        return prepare(PrepareConfig(events=str(events), out=str(spark_out), engine="spark", master=MASTER))

    spec_spark = benchmark.pedantic(spark, rounds=1, iterations=1, warmup_rounds=0)
    spark_s = benchmark.stats.stats.mean

    assert spec_spark == spec
    a, b = load_dataset(local_out), load_dataset(spark_out)
    np.testing.assert_array_equal(b.ids, a.ids)
    np.testing.assert_array_equal(b.y, a.y)
    np.testing.assert_allclose(b.X, a.X, rtol=1e-6, atol=1e-6)

    info = {
        "events": n_events,
        "master": MASTER,
        "customers": spec["counts"]["customers_kept"],
        "local_s": round(local_s, 2),
        "spark_s": round(spark_s, 2),
        "local_events_per_s": round(n_events / local_s),
        "spark_events_per_s": round(n_events / spark_s),
        "spark_vs_local": round(local_s / spark_s, 3),  # > 1: Spark is faster
    }
    assert all(x is not None and np.isfinite(x) for x in numbers({k: v for k, v in info.items() if k != "master"}))
    benchmark.extra_info.update(info)
    print(f"\nprepare {n_events} events: local {local_s:.1f} s = {n_events / local_s:,.0f} events/s; "
          f"spark {MASTER} {spark_s:.1f} s = {n_events / spark_s:,.0f} events/s (JVM start included); "
          f"spark/local speed {local_s / spark_s:.2f}x")

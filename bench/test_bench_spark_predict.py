"""Scoring customers: local `notpu predict` against `notpu predict --engine spark --master local[2]`, one machine.

    python -m pytest -q -s bench/test_bench_spark_predict.py            # 100,000 generated players
    python -m pytest -q -s bench/test_bench_spark_predict.py --quick    # 300 players (CI)

What is measured: one generated MMO log (90 + 21 days, about 1,360 events a
player; generated in chunks of players, each chunk's ids prefixed, appended to
one Parquet file), scored by the default GRU (width 64, its weights as built:
a forward pass costs the same trained or not) with the spec of that log's
`notpu prepare`. Each engine runs as a user runs it, `python -m runner.cli
predict MODEL EVENTS --out scores.csv [--engine spark --master local[2]]`, in a
child process timed from its start to its exit (the interpreter's start,
TensorFlow's import and, for Spark, the JVM's included: the end-to-end time),
local first, then Spark. Figures: customers scored per second, and per second
per core (local: one process, the cores TensorFlow uses; Spark: the master's 2
task slots), against the talk's "1 minute for each 10k customers" (167
customers/s).

Asserted: both exit 0 and score the same customers, equal to 1e-5 per id.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from bench._procs import QUICK
from bench._timing import numbers

pytest.importorskip("pyspark")

ROOT = Path(__file__).resolve().parents[1]
PLAYERS = 300 if QUICK else 100_000
CHUNK = 10_000  # players generated at a time: a chunk's events fit memory easily
MASTER = "local[2]"
SPARK_CORES = 2
TALK_CUSTOMERS_PER_S = 10_000 / 60
TIMEOUT_S = 900 if QUICK else 7200


def _write_log(path: Path) -> int:
    from models.generate import GeneratorConfig, generate_events

    writer = None
    rows = 0
    try:
        for k, first in enumerate(range(0, PLAYERS, CHUNK)):
            table = generate_events(GeneratorConfig(players=min(CHUNK, PLAYERS - first), seed=100 + k))
            ids = pc.binary_join_element_wise(pa.scalar(f"c{k}_"), table["id"].cast(pa.string()), "")
            table = table.set_column(0, "id", ids)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


@pytest.fixture(scope="module")
def scoring(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """(RUN/model.keras with its spec.json beside it, the event log, its events)."""
    from models.generate import GeneratorConfig, generate_events, write_events
    from models.gru import ModelConfig, build_model
    from models.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("spark_predict")
    train_log = write_events(generate_events(GeneratorConfig(players=300, seed=1)), root / "train.parquet")
    spec = prepare(PrepareConfig(events=str(train_log), out=str(root / "run")))
    window = spec["window"]
    build_model(ModelConfig(days=window["steps"], features=len(spec["features"]))).save(root / "run" / "model.keras")
    events = root / "events.parquet"
    return root / "run" / "model.keras", events, _write_log(events)


def _predict(model: Path, events: Path, out: Path, *spark: str) -> float:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "runner.cli", "predict", str(model), str(events), "--out", str(out),
                        *spark], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    seconds = time.perf_counter() - t
    assert r.returncode == 0, r.stderr[-3000:]
    return seconds


@pytest.mark.timeout(TIMEOUT_S * 2)
def test_spark_predict_throughput(benchmark, scoring: tuple[Path, Path, int], tmp_path: Path) -> None:
    model, events, n_events = scoring
    local_out, spark_out = tmp_path / "local.csv", tmp_path / "spark.csv"
    local_s = _predict(model, events, local_out)
    spark_s = benchmark.pedantic(lambda: _predict(model, events, spark_out, "--engine", "spark", "--master", MASTER),
                                 rounds=1, iterations=1, warmup_rounds=0)
    local, spark = pd.read_csv(local_out), pd.read_csv(spark_out)
    assert list(spark["id"]) == list(local["id"])
    diff = float(np.abs(spark["churn_probability"] - local["churn_probability"]).max())
    assert diff <= 1e-5, diff
    customers = len(local)
    local_cores = int(os.environ.get("TF_NUM_INTRAOP_THREADS", os.cpu_count() or 1))
    info = {
        "players": PLAYERS,
        "events": n_events,
        "customers": customers,
        "master": MASTER,
        "local_s": round(local_s, 1),
        "spark_s": round(spark_s, 1),
        "local_customers_per_s": round(customers / local_s, 1),
        "spark_customers_per_s": round(customers / spark_s, 1),
        "local_customers_per_s_per_core": round(customers / local_s / local_cores, 1),
        "spark_customers_per_s_per_core": round(customers / spark_s / SPARK_CORES, 1),
        "local_cores": local_cores,
        "spark_vs_local": round(local_s / spark_s, 3),  # > 1: Spark is faster
        "talk_customers_per_s": round(TALK_CUSTOMERS_PER_S, 1),
        "max_abs_diff": diff,
        "load_1min": round(os.getloadavg()[0], 2),
    }
    assert all(x is not None and np.isfinite(x) for x in numbers({k: v for k, v in info.items() if k != "master"}))
    benchmark.extra_info.update(info)
    print("\n" + json.dumps(info))

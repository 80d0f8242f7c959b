"""One worker through the parameter server (DOWNPOUR, λ = 5) against a plain Keras loop.

    python -m pytest -q -s bench/test_bench_overhead.py           # GRU 64 and the talk's GRU 512
    python -m pytest -q -s bench/test_bench_overhead.py --quick   # a tiny GRU on tiny data

`bench.overhead_run` trains two copies of one model in one process, block by
block in turn, with the same data, batches and threads: one with
`train_on_batch` alone, one that also exchanges with a real `pserver start`
process every λ steps as `runner.worker` does. The figure is the ratio of
their samples/s.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

from bench._data import prepared
from bench._procs import QUICK, pserver, run_all

THREADS = os.cpu_count() or 1
# (hidden, blocks): GRU 64 is what the other benchmarks train; 512 is the talk's model (2.4M floats), slow on 2 cores.
CASES = [(8, 2)] if QUICK else [(64, 30), (512, 8)]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("hidden,blocks", CASES)
def test_overhead_one_worker(benchmark, hidden: int, blocks: int) -> None:
    data = prepared(300, 30) if QUICK else prepared(20_000, 90)
    with pserver("--rule", "downpour", "--window", "5", "--hidden", str(hidden), workers=1) as address:
        cmd = [sys.executable, "-m", "bench.overhead_run", "--ps", address, "--data", str(data), "--threads",
               str(THREADS), "--hidden", str(hidden), "--blocks", str(blocks), "--warmup", "1" if QUICK else "2"]
        out = benchmark.pedantic(lambda: run_all([cmd], timeout_s=900)[0], rounds=1, iterations=1)
    r = json.loads(out.strip().splitlines()[-1])
    benchmark.extra_info.update({
        "hidden": hidden, "floats": r["floats"], "threads": THREADS, "rule": "downpour", "window": 5,
        "keras_samples_per_s": round(r["keras_samples_per_s"], 1), "ps_samples_per_s": round(r["ps_samples_per_s"], 1),
        "ratio_vs_keras": round(r["ratio_vs_keras"], 3), "exchange_ms": round(r["exchange_ms"], 2),
        "target": "ratio_vs_keras >= 0.97",
    })
    print(f"\noverhead, GRU {hidden} ({r['floats']} floats), {THREADS} threads, DOWNPOUR λ=5: through the PS "
          f"{r['ps_samples_per_s']:.0f} samples/s, plain Keras {r['keras_samples_per_s']:.0f}: "
          f"{r['ratio_vs_keras']:.3f}x ({r['exchange_ms']:.1f} ms per exchange; median of {blocks} blocks of "
          f"{r['block_steps']} steps)")
    assert r["exchanges"] > 0

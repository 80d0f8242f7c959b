"""One worker through the parameter server (DOWNPOUR, λ = 5) against a plain Keras loop, with and without overlap.

    python -m pytest -q -s bench/test_bench_overhead.py           # GRU 64 and the talk's GRU 512
    python -m pytest -q -s bench/test_bench_overhead.py --quick   # a tiny GRU on tiny data

`bench.overhead_run` trains two copies of one model in one process, block by
block in turn, with the same data, batches and threads: one with
`train_on_batch` alone, one that also exchanges with a real `pserver start`
process every λ steps as `runner.worker` does, and a third that does so
with overlap (`--overlap`: the exchange runs beside the next window's steps)
against a second server. The figures are the ratios of their samples/s:
`ratio_vs_keras` (at GRU 512, the talk's model, also `ratio_vs_keras_talk`)
and `overlap_gain` (overlapped ÷ plain exchange).
"""
from __future__ import annotations

import contextlib
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
    with contextlib.ExitStack() as servers:
        address, overlapped = (servers.enter_context(pserver("--rule", "downpour", "--window", "5", "--hidden",
                                                             str(hidden), workers=1)) for _ in range(2))
        cmd = [sys.executable, "-m", "bench.overhead_run", "--ps", address, "--ps-overlap", overlapped, "--data",
               str(data), "--threads", str(THREADS), "--hidden", str(hidden), "--blocks", str(blocks), "--warmup",
               "1" if QUICK else "2"]
        out = benchmark.pedantic(lambda: run_all([cmd], timeout_s=1500)[0], rounds=1, iterations=1)
    r = json.loads(out.strip().splitlines()[-1])
    benchmark.extra_info.update({
        "hidden": hidden, "floats": r["floats"], "threads": THREADS, "rule": "downpour", "window": 5,
        "keras_samples_per_s": round(r["keras_samples_per_s"], 1), "ps_samples_per_s": round(r["ps_samples_per_s"], 1),
        "ratio_vs_keras": round(r["ratio_vs_keras"], 3), "exchange_ms": round(r["exchange_ms"], 2),
        "overlap_samples_per_s": round(r["overlap_samples_per_s"], 1),
        "overlap_ratio_vs_keras": round(r["overlap_ratio_vs_keras"], 3), "overlap_gain": round(r["overlap_gain"], 3),
        "blocks": blocks, "target": "ratio_vs_keras >= 0.97",
    })
    if hidden == 512:
        benchmark.extra_info["ratio_vs_keras_talk"] = round(r["ratio_vs_keras"], 3)
    print(f"\noverhead, GRU {hidden} ({r['floats']} floats), {THREADS} threads, DOWNPOUR λ=5: through the PS "
          f"{r['ps_samples_per_s']:.0f} samples/s, plain Keras {r['keras_samples_per_s']:.0f}: "
          f"{r['ratio_vs_keras']:.3f}x ({r['exchange_ms']:.1f} ms per exchange); with overlap "
          f"{r['overlap_samples_per_s']:.0f} samples/s, {r['overlap_ratio_vs_keras']:.3f}x, gain "
          f"{r['overlap_gain']:.3f}x (medians of {blocks} blocks of {r['block_steps']} steps)")
    assert r["exchanges"] > 0

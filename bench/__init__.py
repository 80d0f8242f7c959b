"""Speed and convergence benchmarks (pytest-benchmark) and the results report.

    python -m pytest -q -s bench/            # the full suite, one line per figure
    python -m pytest -q bench/ --quick       # the small versions CI runs (a few minutes)
    python -m bench.report                   # full suite → bench/RESULTS.md, bench/auc_vs_time.png

| module | figure | compared with |
| --- | --- | --- |
| test_bench_transport | push+pull of 2,447,562 float32 through one shard | bare pyzmq echo, same bytes |
| test_bench_capacity | updates/s from 8 simulated workers, 1 and 2 shards | the same workers against bare echo |
| test_bench_kernels | each Numba kernel, GB/s | its numpy expression |
| test_bench_overhead | one worker through the PS, samples/s | plain Keras train_on_batch, same threads |
| test_bench_convergence | time to 98% of plain Keras' val AUC per rule; staleness | 1 process × all cores, plain Keras |
| test_bench_prepare | events/s in prepare | pandas groupby/pivot |
| test_bench_samples | samples to 98% of plain Keras' val AUC, 1–8 workers per rule | plain Keras' samples to the same AUC |
| test_bench_buckets | time to 98% of the best val AUC, daily against weekly steps (retail) | the same runs on daily steps |
| test_bench_spark_prepare | events/s in prepare with Spark `local[2]` | the local path, same log, same run |
| test_bench_fuzz | 100,000 hostile messages to a shard and the coordinator, with and without CURVE: messages/s, RSS growth | nothing: every message is answered or refused, the centre unchanged |
| test_bench_soak | 8 workers, worker SIGKILLs and a shard kill over `NOTPU_SOAK_S` (30 min): RSS slope, recoveries, test AUC | an undisturbed run |

Every figure that matters is a ratio of medians measured side by side in one
run (`bench._timing`), stored in `benchmark.extra_info`; timings are never
asserted. Servers and workers are real processes (`bench._procs`), stopped
with bounded waits.
"""

"""Each Numba kernel of the shard against its numpy expression, on the talk's 2,447,562 floats.

    python -m pytest -q -s bench/test_bench_kernels.py           # 40 rounds each
    python -m pytest -q -s bench/test_bench_kernels.py --quick   # 5 rounds each

Both sides compute the same results: the new centre (and the elastic
difference) and the float64 norm and finiteness of the update. numpy is
written the obvious way with `out=` buffers; it needs several passes over
memory where the kernel makes one. The numpy operation alone, without the
norm and finiteness check, is timed too: the check should come nearly free.
GB/s counts the bytes a single pass must
read and write (float32 in and out).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest

from bench._procs import QUICK, TALK_LAYOUT
from bench._timing import interleave
from pserver import kernels

N = TALK_LAYOUT.total
ROUNDS, WARMUP = (5, 2) if QUICK else (40, 5)
ALPHA = np.float32(0.05)
SCALE = np.float32(1 / 12)
WORKERS = 2  # rows summed by sum_round


def _norm(x: np.ndarray) -> tuple[bool, float]:
    x64 = x.astype(np.float64)  # float64: the square of a finite float32 cannot overflow
    sq = float(np.dot(x64, x64))
    return math.isfinite(sq), math.sqrt(sq)


def cases() -> dict[str, tuple[Callable, Callable, Callable, int]]:
    """name → (kernel call, numpy call, numpy without the norm check, bytes one pass moves)."""
    rng = np.random.default_rng(0)
    c, d = rng.standard_normal(N).astype(np.float32), rng.standard_normal(N).astype(np.float32)  # (N,) each
    rows = rng.standard_normal((WORKERS, N)).astype(np.float32)  # (workers, N)
    out, diff, tmp = np.empty_like(c), np.empty_like(c), np.empty_like(c)

    def np_add():
        np.add(c, d, out=out)
        return _norm(d)

    def np_add_scaled():
        np.multiply(d, SCALE, out=tmp)
        np.add(c, tmp, out=out)
        return _norm(tmp)

    def np_elastic():
        np.subtract(d, c, out=diff)
        np.multiply(diff, ALPHA, out=diff)
        np.add(c, diff, out=out)
        return _norm(diff)

    def np_sum_round():
        s = rows.sum(axis=0, dtype=np.float64)  # (N,) float64
        new = c.astype(np.float64) + s
        out[:] = new
        return _norm(new - c)

    return {
        "check": (lambda: kernels.check(d), lambda: _norm(d), lambda: np.isfinite(d).all(), 4 * N),
        "add": (lambda: kernels.add(c, d, out), np_add, lambda: np.add(c, d, out=out), 12 * N),
        "add_scaled": (lambda: kernels.add_scaled(c, d, SCALE, out), np_add_scaled,
                       lambda: np.add(c, np.multiply(d, SCALE, out=tmp), out=out), 12 * N),
        "elastic": (lambda: kernels.elastic(c, d, ALPHA, out, diff), np_elastic,
                    lambda: np.add(c, np.multiply(np.subtract(d, c, out=diff), ALPHA, out=diff), out=out), 16 * N),
        "sum_round": (lambda: kernels.sum_round(c, rows, WORKERS, 1.0, False, out), np_sum_round,
                      lambda: np.add(c, rows.sum(axis=0), out=out), (WORKERS + 2) * 4 * N),
    }


@pytest.mark.parametrize("name", ["check", "add", "add_scaled", "elastic", "sum_round"])
def test_kernel_vs_numpy(benchmark, name: str) -> None:
    kernels.warm_up()
    kernel, numpy_version, numpy_op, nbytes = cases()[name]
    finite_k, norm_k = kernel()
    finite_n, norm_n = numpy_version()
    assert finite_k == finite_n and norm_k == pytest.approx(norm_n, rel=1e-9)  # the same answer, then the timing

    kernel_s, others = interleave(benchmark, kernel, {"numpy": numpy_version, "numpy_op": numpy_op}, ROUNDS, WARMUP)
    numpy_s, op_s = others["numpy"], others["numpy_op"]
    benchmark.extra_info.update({
        "kernel": name, "floats": N,
        "kernel_ms": round(kernel_s * 1e3, 3), "numpy_ms": round(numpy_s * 1e3, 3),
        "kernel_gb_per_s": round(nbytes / kernel_s / 1e9, 2), "numpy_gb_per_s": round(nbytes / numpy_s / 1e9, 2),
        "ratio_vs_numpy": round(numpy_s / kernel_s, 2),
        "numpy_op_only_ms": round(op_s * 1e3, 3), "ratio_vs_numpy_op_only": round(op_s / kernel_s, 2),
    })
    print(f"\nkernel {name}: {kernel_s * 1e3:.3f} ms = {nbytes / kernel_s / 1e9:.1f} GB/s, numpy {numpy_s * 1e3:.3f} ms "
          f"= {nbytes / numpy_s / 1e9:.1f} GB/s: {numpy_s / kernel_s:.2f}x faster; numpy without the check {op_s * 1e3:.3f} ms "
          f"({op_s / kernel_s:.2f}x) (median of {ROUNDS}, {N} floats)")

"""Numba kernels that apply updates to a shard's slice of the centre.

A refused update must leave the centre unchanged, yet the check (all finite?
how large?) should cost no extra pass over memory. So every apply kernel is
*out of place*: it reads the centre and the delta once, writes the candidate
new centre into ``out``, and returns (finite, norm of the update) from the same
pass. The shard commits ``out`` as its centre only when the check passes;
otherwise ``out`` is scratch and the old centre was never touched.

"Finite" is said of the update *and of its result*: two finite pushes of
3e38 each make a finite delta but an Inf centre. Each kernel also sums
``y − y`` over the values ``y`` it writes to ``out``, in float32 (exact zeros
need no wider sum, and float32 lanes are twice as many): 0 for a finite value,
NaN for Inf or NaN, so one more add per element in the same pass (the pass is
memory-bound: bench/test_bench_kernels.py times it at the cost of the plain
one) says whether the candidate centre is finite. Only ``reassoc`` is allowed
to LLVM, which may not fold ``y − y`` to 0 (that needs ``nnan``).

Norms are accumulated in float64, where the square of any finite float32
cannot overflow (3.4e38² ≈ 1.2e77); so the sum of squares is finite exactly
when every element is, and one branch-free reduction answers both questions. Every kernel is tested equal to its numpy
re-statement in ``tests/unit/test_kernels.py``.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# The one-pass apply kernels run on one thread and let LLVM reassociate (only
# that: no nnan/ninf, so NaN and Inf are still seen, and no contraction, so
# every element of ``out`` is bit-for-bit the numpy expression). Reassociation
# is what lets the float64 sum of squares vectorise, to the speed of a bare
# numpy add. Threads do not pay here: the pass is memory-bound, and on a 2-core
# machine a second thread takes the core ZeroMQ's I/O thread needs to move the
# same bytes (bench/RESULTS.md, "Why the defaults are what they are").
_JIT = dict(parallel=False, fastmath={"reassoc"}, cache=True, nogil=True)

# sum_round adds each element's workers in order, in float64, so it keeps
# strict IEEE order and uses threads across elements. Numba's default OpenMP
# layer lets idle threads spin after a parallel region, stealing the I/O
# thread's core; the workqueue layer's threads sleep. It must not be entered
# from two threads at once, which holds: a shard calls kernels from its one
# event loop. NUMBA_THREADING_LAYER, if set, still decides.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
_JIT_ROUND = dict(parallel=True, fastmath=False, cache=True, nogil=True)

@njit(**_JIT)
def check(delta):
    """(all finite, L2 norm) of a float32 vector."""
    sq = 0.0
    for i in range(delta.shape[0]):
        v = np.float64(delta[i])
        sq += v * v
    return math.isfinite(sq), math.sqrt(sq)


# ``copy`` (add, add_scaled): a second buffer the candidate centre is written to in the same pass, a co-located
# worker's reply area (`pserver.shm`), so that the worker reads its new centre without copying it. Numba compiles
# the call without it separately, the branch pruned: the plain pass costs what it did.

@njit(**_JIT)
def add(centre, delta, out, copy=None):
    """out = centre + delta (and copy = out, if given); returns (delta and out finite, ‖delta‖)."""
    sq = 0.0
    bad = np.float32(0.0)  # Σ (y − y): NaN once any written value is not finite
    for i in range(centre.shape[0]):
        d = delta[i]
        y = centre[i] + d
        out[i] = y
        if copy is not None:
            copy[i] = y
        v = np.float64(d)
        sq += v * v
        bad += y - y
    return math.isfinite(sq) and bad == 0.0, math.sqrt(sq)


@njit(**_JIT)
def add_scaled(centre, delta, scale, out, copy=None):
    """out = centre + scale·delta (ADAG's Δ/λ, DynSGD's Δ/(staleness+1)), and copy = out if given;
    returns (scale·delta and out finite, ‖scale·delta‖)."""
    sq = 0.0
    bad = np.float32(0.0)
    for i in range(centre.shape[0]):
        d = scale * delta[i]
        y = centre[i] + d
        out[i] = y
        if copy is not None:
            copy[i] = y
        v = np.float64(d)
        sq += v * v
        bad += y - y
    return math.isfinite(sq) and bad == 0.0, math.sqrt(sq)


@njit(**_JIT)
def elastic(centre, local, alpha, out, diff):
    """diff = alpha·(local − centre); out = centre + diff  (AEASGD, one exchange).

    Returns (diff and out finite, ‖diff‖).
    """
    sq = 0.0
    bad = np.float32(0.0)
    for i in range(centre.shape[0]):
        e = alpha * (local[i] - centre[i])
        diff[i] = e
        y = centre[i] + e
        out[i] = y
        v = np.float64(e)
        sq += v * v
        bad += y - y
    return math.isfinite(sq) and bad == 0.0, math.sqrt(sq)


@njit(**_JIT_ROUND)
def sum_round(centre, rows, count, scale, replace, out):
    """Close a synchronous round over the first ``count`` rows of ``rows`` (workers × n).

    replace=False (EASGD):   out = centre + scale·Σ_i rows[i]
    replace=True (averaging): out = scale·Σ_i rows[i]           (scale = 1/count)
    Sums in float64, rounds once. Returns (out finite, ‖out − centre‖), the norm of what was written: a sum
    finite in float64 may round to Inf in float32, and then so is the norm, with no second reduction.
    """
    sq = 0.0
    for j in prange(centre.shape[0]):
        s = 0.0
        for i in range(count):
            s += np.float64(rows[i, j])
        c = np.float64(centre[j])
        new = scale * s if replace else c + scale * s
        y = np.float32(new)
        out[j] = y
        v = np.float64(y) - c
        sq += v * v
    return math.isfinite(sq), math.sqrt(sq)


def warm_up() -> None:
    """Compile (or load from the on-disk cache) every kernel for float32."""
    c = np.zeros(4, np.float32)
    d = np.ones(4, np.float32)
    o = np.empty(4, np.float32)
    check(d)
    add(c, d, o)
    add(c, d, o, np.empty(4, np.float32))
    add_scaled(c, d, np.float32(0.5), o)
    add_scaled(c, d, np.float32(0.5), o, np.empty(4, np.float32))
    elastic(c, d, np.float32(0.5), o, np.empty(4, np.float32))
    sum_round(c, np.ones((2, 4), np.float32), 2, 1.0, False, o)


# ---- the half-precision wire (pserver.precision): bit-exact with numpy's casts, one pass each ----------------

# float32 ↔ float16 by LLVM's fptrunc / fpext: one instruction per 8 values where the CPU has one (x86 F16C, ARM),
# rounding to nearest even as numpy's cast does, bit for bit except a NaN's payload (a NaN stays a NaN). The
# bit-twiddling kernels below branch on the exponent and do not vectorise: several times slower, and slowest on a
# worker's small deltas (bench/RESULTS.md, "Why the defaults are what they are"). Without such an instruction LLVM
# calls a library function the JIT does not link; `half_instructions` tries the pair once and says which to use.

@intrinsic
def _f32_to_f16_bits(typingctx, x):
    if not (isinstance(x, types.Float) and x.bitwidth == 32):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(x), codegen


@intrinsic
def _f16_bits_to_f32(typingctx, q):
    if not (isinstance(q, types.Integer) and q.bitwidth == 16):
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(q), codegen


@njit(**_JIT)
def to_float16_cvt(x, out):
    """out (uint16) = the IEEE half of x (float32) by the CPU's conversion (see `half_instructions`)."""
    for i in range(x.shape[0]):
        out[i] = _f32_to_f16_bits(x[i])


@njit(**_JIT)
def from_float16_cvt(q, out):
    """out (float32) = the halves q (uint16) by the CPU's conversion (see `half_instructions`)."""
    for i in range(q.shape[0]):
        out[i] = _f16_bits_to_f32(q[i])


@lru_cache(maxsize=1)
def half_instructions() -> bool:
    """Whether `to_float16_cvt` and `from_float16_cvt` compile here and agree with numpy on a probe."""
    x = np.array([1.0, -2.5, 65504.0, 65520.0, 1e-7, 3e-8, 6.1e-5, np.inf, 0.1], np.float32)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    q, back = np.empty(x.size, np.uint16), np.empty(x.size, np.float32)
    try:
        to_float16_cvt(x, q)
        from_float16_cvt(q, back)
    except Exception:  # no conversion instruction: a library call the JIT cannot resolve
        return False
    return bool(np.array_equal(q, expected.view(np.uint16)) and np.array_equal(back, expected.astype(np.float32)))


@njit(**_JIT)
def to_bfloat16(x, out):
    """out (uint16) = bfloat16 of x (float32), rounded to nearest even; NaN stays NaN."""
    u = x.view(np.uint32)
    for i in range(u.shape[0]):
        b = np.int64(u[i])  # int64 arithmetic throughout: no mixed-sign promotion to float
        if (b & 0x7F800000) == 0x7F800000 and (b & 0x007FFFFF) != 0:
            out[i] = ((b >> 16) & 0x8000) | 0x7FC0
        else:
            out[i] = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


@njit(**_JIT)
def from_bfloat16(q, out):
    """out (float32) = the bfloat16 values q (uint16)."""
    o = out.view(np.uint32)
    for i in range(q.shape[0]):
        o[i] = np.int64(q[i]) << 16


@njit(**_JIT)
def to_float16_bits(x, out):
    """out (uint16) = the IEEE half of x (float32), as numpy's cast: nearest even, overflow to Inf, NaN kept."""
    u = x.view(np.uint32)
    for i in range(u.shape[0]):
        f = np.int64(u[i])  # int64 arithmetic throughout: no mixed-sign promotion to float
        sign = (f & 0x80000000) >> 16
        exp = f & 0x7F800000
        if exp >= 0x47800000:  # Inf, NaN, or too large: Inf
            sig = f & 0x007FFFFF
            if exp == 0x7F800000 and sig != 0:
                h = 0x7C00 + (sig >> 13)
                if h == 0x7C00:
                    h += 1  # a NaN whose payload is all in the low bits stays a NaN
                out[i] = sign + h
            else:
                out[i] = sign + 0x7C00
        elif exp <= 0x38000000:  # a half subnormal, or zero
            if exp < 0x33000000:
                out[i] = sign
            else:
                sig = (0x00800000 + (f & 0x007FFFFF)) >> (113 - (exp >> 23))
                if (sig & 0x3FFF) != 0x1000 or (f & 0x7FF) != 0:  # ties to even, shifted-out bits count
                    sig += 0x1000
                out[i] = sign + (sig >> 13)
        else:
            sig = f & 0x007FFFFF
            if (sig & 0x3FFF) != 0x1000:  # ties to even
                sig += 0x1000
            out[i] = (sign + ((exp - 0x38000000) >> 13) + (sig >> 13)) & 0xFFFF  # a carry rounds up to Inf


@njit(**_JIT)
def gather(table, q, out):
    """out[i] = table[q[i]]: a half's float32 value from the 65,536-entry table numpy's cast fills."""
    for i in range(q.shape[0]):
        out[i] = table[q[i]]

"""Half-precision wire: float32 vectors sent as float16 or bfloat16, and the worker's error feedback.

Between hosts, a push and the centre in a reply may travel in 16 bits a value
(``ClientConfig.wire``), halving the bytes; the centre itself stays float32.
Rounding a push would lose a little of every update, so the worker keeps what
rounding took off (the residual) and adds it to its next push:

    v = Δ + r;  q = round16(v);  r ← v − q;  send q      (Σ q + r = Σ Δ: nothing is lost, only delayed)

bfloat16 is the upper half of a float32 (same range, 8 bits of mantissa),
rounded to nearest even; it travels as little-endian uint16 (wire dtype
``"bf16"``). float16 (``"<f2"``) has 11 bits of mantissa but a range of
±65504: a value beyond it would become infinite, so a centre or a push that
does not fit is sent as float32 instead (and leaves no residual).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

#: --wire names → the dtype string a frame of them carries (`pserver.protocol.ALLOWED_DTYPES`).
WIRE = {"float32": "<f4", "float16": "<f2", "bfloat16": "bf16"}
F16_MAX = float(np.finfo(np.float16).max)


def check(wire: str) -> str:
    if wire not in WIRE:
        raise ValueError(f"wire {wire!r}: expected one of {', '.join(WIRE)}")
    return wire


def narrow(x: np.ndarray, wire: str) -> np.ndarray:
    """float32 (n,) → its wire form: float16 (as numpy's cast: beyond ±65504 is Inf, which `fits` lets a caller
    avoid; a NaN stays a NaN), bfloat16 as uint16 (round to nearest even), or x itself. One Numba pass
    (`pserver.kernels`: the CPU's conversion instruction where it has one, many times faster than numpy's
    float16 cast; bench/RESULTS.md, "Why the defaults are what they are")."""
    if wire == "float32":
        return x
    from pserver import kernels  # Numba: loaded by the workers that use a half-precision wire only

    out = np.empty(x.shape[0], np.uint16)  # (n,)
    x = np.ascontiguousarray(x, np.float32)
    if wire == "float16":
        (kernels.to_float16_cvt if kernels.half_instructions() else kernels.to_float16_bits)(x, out)
        return out.view(np.float16)
    kernels.to_bfloat16(x, out)
    return out


def widen(a: np.ndarray) -> np.ndarray:
    """A received array in any wire form → float32 (a new array unless it was float32)."""
    if a.dtype not in (np.uint16, np.float16):
        return a
    from pserver import kernels

    out = np.empty(a.shape[0], np.float32)  # (n,)
    if a.dtype == np.uint16:  # bfloat16: the upper half of a float32
        kernels.from_bfloat16(a, out)
    elif kernels.half_instructions():
        kernels.from_float16_cvt(a.view(np.uint16), out)
    else:
        kernels.gather(_half_table(), a.view(np.uint16), out)
    return out


@lru_cache(maxsize=1)
def _half_table() -> np.ndarray:
    """Every float16 bit pattern's float32 value (65536,), by numpy's cast."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def fits(x: np.ndarray, wire: str) -> bool:
    """Whether x survives the wire form without becoming infinite (float16's range); not if it holds a NaN.

    Two reductions, no temporary: a 9.8 MB temporary costs more in page faults than the pass itself."""
    if wire != "float16" or not x.size:
        return True
    return max(float(np.max(x)), -float(np.min(x))) <= F16_MAX  # a NaN propagates, and compares False


class ErrorFeedback:
    """A worker's residual r (n,) float32 for one wire form; `encode` is the module docstring's step."""

    def __init__(self, n: int, wire: str) -> None:
        self.wire = check(wire)
        self.residual = np.zeros(n, np.float32)  # (n,)

    def encode(self, delta: np.ndarray, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Range [lo, hi) of the next push: v = Δ + r, q = round(v), r ← v − q; returns q in wire form."""
        r = self.residual[lo:hi]
        v = delta + r  # (hi − lo,)
        if not fits(v, self.wire):
            r[:] = 0
            return v
        q = narrow(v, self.wire)
        np.subtract(v, widen(q), out=r)
        return q

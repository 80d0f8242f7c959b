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

import numpy as np

#: --wire names → the dtype string a frame of them carries (`pserver.protocol.ALLOWED_DTYPES`).
WIRE = {"float32": "<f4", "float16": "<f2", "bfloat16": "bf16"}
F16_MAX = float(np.finfo(np.float16).max)


def check(wire: str) -> str:
    if wire not in WIRE:
        raise ValueError(f"wire {wire!r}: expected one of {', '.join(WIRE)}")
    return wire


def narrow(x: np.ndarray, wire: str) -> np.ndarray:
    """float32 (n,) → its wire form: float16, bfloat16 as uint16 (round to nearest even), or x itself."""
    if wire == "float16":
        with np.errstate(over="ignore"):  # beyond ±65504: Inf, which `fits` lets a caller avoid
            return x.astype(np.float16)
    if wire == "bfloat16":
        u = x.view(np.uint32)
        rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
        nan = np.isnan(x)
        if nan.any():  # rounding must not turn a NaN's payload into Inf
            rounded[nan] = 0x7FC0
        return rounded.astype(np.uint16)
    return x


def widen(a: np.ndarray) -> np.ndarray:
    """A received array in any wire form → float32 (a new array unless it was float32)."""
    if a.dtype == np.uint16:  # bfloat16: the upper half of a float32
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if a.dtype == np.float16:
        return a.astype(np.float32)
    return a


def fits(x: np.ndarray, wire: str) -> bool:
    """Whether x survives the wire form without becoming infinite (float16's range)."""
    return wire != "float16" or not x.size or float(np.max(np.abs(x))) <= F16_MAX


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

"""Loss-explosion guard: refuse an update much larger than the recent ones.

`--max-delta-norm` is an absolute limit. `--max-delta-norm-factor F` is a
relative one: after a warm-up of accepted updates, a push whose norm exceeds
F × the running median of the last `window` accepted norms is refused with
``too_large``. The median (not the mean) so that one big accepted update does
not raise the bar for the next; only accepted norms enter the window, so a
run of refused explosions cannot drag the median up either.
"""
from __future__ import annotations

from collections import deque

import numpy as np


class NormGuard:
    def __init__(self, factor: float, warmup: int = 20, window: int = 101) -> None:
        if factor <= 0:
            raise ValueError(f"--max-delta-norm-factor must be positive, got {factor}")
        self.factor = factor
        self.warmup = warmup
        self._norms: deque[float] = deque(maxlen=window)

    def median(self) -> float:
        return float(np.median(self._norms)) if self._norms else 0.0

    def refuse(self, norm: float) -> str | None:
        """A reason if ``norm`` is too large, else None."""
        if len(self._norms) < self.warmup:
            return None
        median = self.median()
        if norm > self.factor * median:
            return (f"update norm {norm:.4g} exceeds --max-delta-norm-factor {self.factor:g} × the running "
                    f"median {median:.4g} of the last {len(self._norms)} accepted updates")
        return None

    def accept(self, norm: float) -> None:
        self._norms.append(float(norm))

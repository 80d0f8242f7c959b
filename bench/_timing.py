"""Side-by-side timing: the two sides of a ratio run in turn, in one process, in one run.

Time on 2 shared cores is noisy (other processes come and go), so a figure is
never one side's absolute time: each round runs every side once, in turn,
after a few warm-up rounds, and a ratio is taken between medians.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Iterable


def interleave(benchmark: Any, main: Callable[[], object], others: dict[str, Callable[[], object]],
               rounds: int, warmup: int) -> tuple[float, dict[str, float]]:
    """Time `main` under pytest-benchmark and each of `others` by hand, one of each per round.

    The others run in pytest-benchmark's untimed `setup` before each round of
    `main`, so the sides alternate. Returns (median of main, {name: median}) in
    seconds, warm-up rounds left out.
    """
    times: dict[str, list[float]] = {k: [] for k in others}
    main_times: list[float] = []

    def setup() -> None:
        for name, fn in others.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

    def timed_main() -> None:
        t = time.perf_counter()
        main()
        main_times.append(time.perf_counter() - t)

    benchmark.pedantic(timed_main, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    return statistics.median(main_times[-rounds:]), {k: statistics.median(v[-rounds:]) for k, v in times.items()}


def median_time(fn: Callable[[], object], rounds: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `rounds` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def numbers(x: Any) -> Iterable[Any]:
    """Every number (and null) among a benchmark's figures (dicts and lists, nested), to check they are finite."""
    if isinstance(x, dict):
        for v in x.values():
            yield from numbers(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from numbers(v)
    elif x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)):
        yield x

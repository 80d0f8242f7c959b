"""Generated churn data for the training benchmarks, made once per size and reused.

`notpu generate` then `notpu prepare` through their Python API, into a cache
directory keyed by the parameters (NOTPU_BENCH_DATA, default
/tmp/notpu-bench-data), so a second run of the suite does not redo them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from models.generate import GeneratorConfig, generate_events, write_events
from models.prepare import PrepareConfig, prepare


def prepared(players: int, days: int = 90, seed: int = 1) -> Path:
    """A prepared data directory (X.npy, y.npy, ids.npy, spec.json) of `players` generated players."""
    root = Path(os.environ.get("NOTPU_BENCH_DATA", Path(tempfile.gettempdir()) / "notpu-bench-data"))
    out = root / f"players{players}-days{days}-seed{seed}"
    if (out / "spec.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gen-", dir=root))
    try:
        events = write_events(generate_events(GeneratorConfig(players=players, days=days, seed=seed)), work / "events.parquet")
        prepare(PrepareConfig(events=str(events), out=str(work / "data"), observation_days=days))
        try:
            os.replace(work / "data", out)
        except OSError:  # another run made it first
            if not (out / "spec.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out

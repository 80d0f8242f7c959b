"""Generated data for the training benchmarks, made once per set of parameters and reused.

`notpu generate` then `notpu prepare` through their Python API, into a cache
directory keyed by the parameters (NOTPU_BENCH_DATA, default
/tmp/notpu-bench-data), so a second run of the suite does not redo them.
`prepared` makes the MMO churn log, `prepared_retail` the retail purchase log
(`notpu generate --kind retail`) with the time steps `bucket_days` long.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from models.generate import GeneratorConfig, generate_events, write_events
from models.generate_retail import RetailConfig, generate_retail_events
from models.prepare import PrepareConfig, prepare


def _root() -> Path:
    return Path(os.environ.get("NOTPU_BENCH_DATA", Path(tempfile.gettempdir()) / "notpu-bench-data"))


def _cached(name: str, make: Callable[[Path], None]) -> Path:
    """root/name, made by make(work_dir) into a scratch directory then moved into place in one step."""
    root = _root()
    out = root / name
    if (out / "spec.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gen-", dir=root))
    try:
        make(work)
        try:
            os.replace(work / "data", out)
        except OSError:  # another run made it first
            if not (out / "spec.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def prepared(players: int, days: int = 90, seed: int = 1, max_types: int | None = None) -> Path:
    """A prepared data directory (X.npy, y.npy, ids.npy, spec.json) of `players` generated players.

    max_types: prepare's --max-types (None: its default); 10 gives the talk's 50 features (10 types × 5)."""
    def make(work: Path) -> None:
        events = write_events(generate_events(GeneratorConfig(players=players, days=days, seed=seed)),
                              work / "events.parquet")
        prepare(PrepareConfig(events=str(events), out=str(work / "data"), observation_days=days,
                              **({"max_types": max_types} if max_types else {})))

    return _cached(f"players{players}-days{days}-seed{seed}" + (f"-types{max_types}" if max_types else ""), make)


def prepared_retail(customers: int, seed: int = 0, bucket_days: int | None = None) -> Path:
    """A prepared directory of `customers` generated retail customers, 273 + 273 days, steps of `bucket_days` days.

    Prepared as the generator recommends (churn = no purchase in the 273 label
    days; every customer with an event in the window kept). bucket_days None:
    prepare's automatic choice (weekly for this window). The same customers,
    labels and split whatever bucket_days is: only the time steps differ.
    """
    def make(work: Path) -> None:
        cfg = RetailConfig(customers=customers, seed=seed)
        events = write_events(generate_retail_events(cfg), work / "events.parquet")
        prepare(PrepareConfig(events=str(events), out=str(work / "data"), session_type="purchase", min_sessions=1,
                              observation_days=cfg.days, label_days=cfg.label_days, min_active_days=0,
                              bucket_days=bucket_days))

    return _cached(f"retail-customers{customers}-seed{seed}-bucket{'auto' if bucket_days is None else bucket_days}",
                   make)

"""`notpu demo`: the whole job on a small generated log, in a few minutes on 2 cores.

generate -> prepare -> baseline -> train (local mode, 2 workers, the recommended rule with its defaults) -> report:
the run's own report.png (models.report), copied beside the demo's files, and report.txt.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from models.baseline import BaselineConfig, baseline
from models.generate import GeneratorConfig, generate_events, write_events
from models.outdir import check_replaceable
from models.prepare import PrepareConfig, prepare
from models.report import write_report
from optimizers import RECOMMENDED_RULE
from pserver.fileio import atomic_write_text
from runner.run_config import RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    out: str = "notpu-demo"
    players: int = 3000  # ~4M events: big enough for the GRU to learn, prepared in seconds
    seed: int = 0
    epochs: int = 10  # plain Keras GRU(64) on this data levels off near 10 epochs (~25 s on 2 cores)
    hidden: int = RunConfig.hidden
    batch_size: int = RunConfig.batch_size


def demo(cfg: DemoConfig) -> int:
    out = Path(cfg.out)
    check_replaceable(out, marker="events.parquet")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    events = write_events(generate_events(GeneratorConfig(players=cfg.players, seed=cfg.seed)), out / "events.parquet")
    data_dir = out / "data"
    spec = prepare(PrepareConfig(events=str(events), out=str(data_dir)))
    base = baseline(BaselineConfig(data_dir=str(data_dir)))
    print(f"baseline test AUC {base['test_auc']:.4f} ({time.perf_counter() - t0:.0f} s so far)")
    from runner.local import train
    from runner.train_config import TrainConfig

    run_dir = out / "run"
    summary = train(TrainConfig(data_dir=str(data_dir), out_dir=str(run_dir), workers=2, rule=RECOMMENDED_RULE,
                                epochs=cfg.epochs, hidden=cfg.hidden, batch_size=cfg.batch_size))
    text = write_report(out, spec, base, run_dir, data_dir, dict(summary))
    atomic_write_text(out / "summary.json",
                      json.dumps({"baseline": base, "gru": summary}, indent=2, default=str) + "\n")
    print(text, end="")
    print(f"report: {out / 'report.png'}, {out / 'report.txt'} ({time.perf_counter() - t0:.0f} s)")
    return 0

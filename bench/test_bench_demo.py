"""`notpu demo` as a newcomer runs it: the whole command's wall time, the baseline's and the GRU's test AUC.

    python -m pytest -q -s bench/test_bench_demo.py           # the demo's defaults (3,000 players, 10 epochs)
    python -m pytest -q -s bench/test_bench_demo.py --quick   # 400 players, 1 epoch, GRU 8 (CI)

What is measured: `python -m runner.cli demo --out D` in a child process, from
its start (the interpreter's, TensorFlow's import and the log's generation
included) to its exit, and the figures the demo itself reports in
D/summary.json: the baseline's and the GRU's test AUC, the training run's wall
time and samples/s. These are the figures README.md quotes for the demo; the
run's report.png is kept as bench/demo_report.png (full size only), the
picture on the README's first screen.

Asserted: the demo exits 0, writes report.png, report.txt and summary.json,
and both test AUCs are finite; at full size both are above 0.85 (the
generated log has a strong churn signal; a figure below that is a broken
pipeline, not noise).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench._procs import QUICK

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OPTIONS = ["--players", "400", "--epochs", "1", "--hidden", "8"] if QUICK else []
PICTURE = HERE / "demo_report.png"
TIMEOUT_S = 600 if QUICK else 1800


def test_demo_end_to_end(benchmark, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "runner.cli", "demo", "--out", str(out), *OPTIONS]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result: dict[str, object] = {}

    def run() -> None:
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        result.update(wall_s=time.perf_counter() - t, rc=r.returncode, stderr=r.stderr)

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert result["rc"] == 0, str(result["stderr"])[-3000:]
    assert (out / "report.png").stat().st_size > 0 and (out / "report.txt").is_file()
    summary = json.loads((out / "summary.json").read_text())
    base, gru = summary["baseline"], summary["gru"]
    assert math.isfinite(base["test_auc"]) and math.isfinite(gru["test_auc"]), (base, gru)
    if not QUICK:
        assert base["test_auc"] > 0.85 and gru["test_auc"] > 0.85, (base["test_auc"], gru["test_auc"])
        shutil.copyfile(out / "report.png", PICTURE)
    customers = base["customers"]
    benchmark.extra_info.update({
        "command": "notpu demo" + "".join(f" {o}" for o in OPTIONS),
        "players": 400 if QUICK else 3000,
        "customers": sum(customers.values()),
        "wall_s": round(float(result["wall_s"]), 1),
        "baseline_test_auc": round(base["test_auc"], 4),
        "gru_test_auc": round(gru["test_auc"], 4),
        "gru": f"{gru['rule']}, {gru['workers']} workers, {gru['epochs']} epochs, GRU {gru['hidden']}",
        "train_wall_s": gru["wall_s"],
        "samples_per_s": gru["samples_per_s"],
        "load_1min": round(os.getloadavg()[0], 2),
    })

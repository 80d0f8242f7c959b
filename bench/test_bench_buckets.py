"""Daily against weekly time steps on a retail log: time to a target val AUC and final test AUC, plain Keras and PS.

    python -m pytest -q -s bench/test_bench_buckets.py           # 6,000 customers, 273 days, 4 epochs, GRU 32
    python -m pytest -q -s bench/test_bench_buckets.py --quick   # 400 customers, 1 epoch, GRU 8 (CI, ~1.5 min)

What is measured: the same generated retail purchase log (`notpu generate
--kind retail`, default seed, a 273-day observation window then 273 label
days) prepared twice, once with one time step a day (`notpu prepare
--bucket-days 1`: 273 steps) and once with one a week (`--bucket-days 7`: 39
steps, what prepare picks by itself for a window this long). The customers,
labels and split are the same; only the length of the sequences the GRU reads
differs. Each is trained as plain Keras (`bench.keras_run`, 1 process × all
cores) and through the parameter server (`runner.local.train`, 2 workers, the
recommended rule with its default settings), same GRU size and epochs: 4 runs,
in the order daily Keras, weekly Keras, weekly PS, daily PS, so that a drift
in the machine's load weighs on daily and weekly alike.

Target: 98% of the best final val AUC among the 4 runs. Time to target: wall
seconds from the start of a run (start-up included, as a user sees it) to its
first evaluation at or above the target, from its history.jsonl. A PS run's
final evaluation is not in its history; it counts as a point at the run's wall
time, so a PS run that gets there only at the end is given its whole wall time.
A run that never reaches the target gets null. Speed-up = the daily run's time
to target / the weekly run's, per way of training: above 1, weekly steps reach
the same quality sooner. The final test AUC of each run says what, if anything,
the coarser steps cost in quality.

Asserted: every run finished with a finite test AUC; the weekly data has 39
steps and the daily 273, with the same customers and labels; the weekly plain
Keras run reaches the target (full size only: in --quick the models are too
small and the validation split too short for any AUC to mean anything, so
--quick checks that every figure is there and finite or null). The figures'
arithmetic and the report's section are checked on made-up runs, without
training, in every mode.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pytest

from bench._data import prepared_retail
from bench._procs import QUICK, keras_reference, read_history
from bench._timing import numbers
from optimizers import RECOMMENDED_RULE
from runner.local import train
from runner.train_config import TrainConfig

CUSTOMERS = 400 if QUICK else 6_000
SEED = 0  # the generator's default
WINDOW_DAYS = 273  # RetailConfig's observation window
EPOCHS = 1 if QUICK else 4
HIDDEN = 8 if QUICK else 32
EVAL_INTERVAL_S = 1.0 if QUICK else 2.0
TARGET_FRACTION = 0.98
CORES = os.cpu_count() or 1
WORKERS = 2
RULE = RECOMMENDED_RULE
BUCKETS = {"daily": 1, "weekly": 7}
ORDER = (("keras", "daily"), ("keras", "weekly"), ("ps", "weekly"), ("ps", "daily"))
KERAS_TIMEOUT_S = 600 if QUICK else 1800


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("buckets")


def _steps(data: Path) -> int:
    spec = json.loads((data / "spec.json").read_text())
    shape = np.load(data / "X.npy", mmap_mode="r").shape
    assert shape[1] == spec["window"]["steps"], (data, shape, spec["window"])
    return int(spec["window"]["steps"])


def _keras_run(data: Path, out: Path) -> dict[str, Any]:
    summary, history = keras_reference(data, out, threads=CORES, epochs=EPOCHS, hidden=HIDDEN,
                                       interval_s=EVAL_INTERVAL_S, timeout_s=KERAS_TIMEOUT_S)
    return {"summary": summary, "curve": _curve(history), "loadavg": os.getloadavg()[0],
            "threads": CORES, "workers": 1}


def _ps_run(data: Path, out: Path) -> dict[str, Any]:
    summary = train(TrainConfig(data_dir=str(data), out_dir=str(out), workers=WORKERS, rule=RULE, epochs=EPOCHS,
                                hidden=HIDDEN, eval_interval_s=EVAL_INTERVAL_S, progress=False,
                                restore_best=False))  # the last centre, like plain Keras' last weights
    final = {"wall_s": summary["wall_s"], "val_auc": summary["val_auc"]}  # not in history: at the run's end
    return {"summary": summary, "curve": _curve(read_history(out / "history.jsonl")) + [final],
            "loadavg": os.getloadavg()[0], "threads": summary.get("threads_per_worker"), "workers": WORKERS}


def _curve(history: Iterable[dict[str, Any]]) -> list[dict[str, float]]:
    return [{"wall_s": h["wall_s"], "val_auc": h["val_auc"]} for h in history]


def time_to(curve: list[dict[str, float]], target: float) -> float | None:
    """Wall seconds of the first point at or above target, or None if never reached."""
    return next((p["wall_s"] for p in curve if p["val_auc"] >= target), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """extra_info["buckets"] from the runs {"keras-daily": {summary, curve, ...}, ...}, the steps and the errors."""
    finals = [run["summary"]["val_auc"] for run in r["runs"].values()]
    target = round(TARGET_FRACTION * max(finals), 6) if finals else None
    runs: dict[str, dict[str, Any]] = {}
    for name, run in r["runs"].items():
        kind, size = name.split("-")
        s, curve = run["summary"], run["curve"]
        runs[name] = {
            "training": "plain Keras" if kind == "keras" else f"PS {RULE}", "workers": run["workers"],
            "threads": run["threads"], "bucket_days": BUCKETS[size], "steps": r["steps"][size],
            "wall_s": s["wall_s"], "time_to_target_s": time_to(curve, target) if target is not None else None,
            "val_auc": s["val_auc"], "test_auc": s["test_auc"],
            "best_val_auc": round(max(p["val_auc"] for p in curve), 6),
            "first_eval_s": curve[0]["wall_s"] if curve else None, "evaluations": len(curve),
            "samples_per_s": s.get("samples_per_s"), "loadavg": round(run["loadavg"], 2),
            "curve": [[p["wall_s"], p["val_auc"]] for p in curve],
        }
    speedup, wall_ratio = {}, {}
    for kind in ("keras", "ps"):
        daily, weekly = runs.get(f"{kind}-daily"), runs.get(f"{kind}-weekly")
        if daily and weekly:
            speedup[kind] = _ratio(daily["time_to_target_s"], weekly["time_to_target_s"])
            wall_ratio[kind] = _ratio(daily["wall_s"], weekly["wall_s"])
        else:
            speedup[kind] = wall_ratio[kind] = None
    return {
        "customers": CUSTOMERS, "kept": r.get("kept"), "seed": SEED, "window_days": WINDOW_DAYS, "epochs": EPOCHS,
        "hidden": HIDDEN, "cores": CORES, "workers": WORKERS, "rule": RULE, "eval_interval_s": EVAL_INTERVAL_S,
        "target_fraction": TARGET_FRACTION, "target": target, "order": [f"{k}-{s}" for k, s in ORDER],
        "runs": runs, "speedup_weekly_over_daily": speedup, "wall_ratio_daily_over_weekly": wall_ratio,
        "errors": r["errors"],
    }


@pytest.mark.timeout(3600 if not QUICK else 600)
def test_buckets_daily_vs_weekly(benchmark, root: Path) -> None:
    def everything() -> dict[str, Any]:
        data = {size: prepared_retail(CUSTOMERS, SEED, days) for size, days in BUCKETS.items()}
        out: dict[str, Any] = {"steps": {size: _steps(d) for size, d in data.items()}, "runs": {}, "errors": {}}
        ids = {size: np.load(d / "ids.npy", allow_pickle=True) for size, d in data.items()}
        ys = {size: np.load(d / "y.npy") for size, d in data.items()}
        out["same_customers"] = bool(np.array_equal(ids["daily"], ids["weekly"])
                                     and np.array_equal(ys["daily"], ys["weekly"]))
        out["kept"] = int(len(ys["daily"]))
        for kind, size in ORDER:
            name = f"{kind}-{size}"
            try:
                run = _keras_run if kind == "keras" else _ps_run
                out["runs"][name] = run(data[size], root / name)
            except Exception as exc:  # one broken run must not cost the others' figures
                out["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
        return out

    r = benchmark.pedantic(everything, rounds=1, iterations=1)
    figures = summarize(r)
    benchmark.extra_info["buckets"] = figures
    print(f"\nbuckets ({CUSTOMERS:,} retail customers, {figures['kept']:,} kept, {WINDOW_DAYS} days, {EPOCHS} "
          f"epoch{'s' if EPOCHS != 1 else ''}, GRU {HIDDEN}, target val AUC {_fmt(figures['target'], '{:.4f}')} = "
          f"{TARGET_FRACTION:.0%} of the best final):\n  " + "\n  ".join(_lines(figures)))

    assert not r["errors"], r["errors"]
    assert r["steps"] == {"daily": WINDOW_DAYS, "weekly": WINDOW_DAYS // 7}, r["steps"]
    assert r["same_customers"], "the daily and weekly data hold different customers or labels"
    assert set(figures["runs"]) == {f"{k}-{s}" for k, s in ORDER}
    for name, run in figures["runs"].items():
        assert isinstance(run["test_auc"], float) and 0.0 <= run["test_auc"] <= 1.0, (name, run["test_auc"])
        assert run["steps"] == r["steps"][name.split("-")[1]]
    for v in numbers({k: v for k, v in figures.items() if k != "errors"}):
        assert v is None or math.isfinite(v), figures
    if not QUICK:
        assert figures["runs"]["keras-weekly"]["time_to_target_s"] is not None, figures["runs"]["keras-weekly"]


def _lines(figures: dict[str, Any]) -> list[str]:
    lines = []
    for name, run in figures["runs"].items():
        threads = f"{run['threads']} thread{'s' if run['threads'] != 1 else ''}"
        lines.append(f"{run['training']:11s} {run['workers']} × {threads}, {run['steps']:3d} steps of "
                     f"{run['bucket_days']} day{'s' if run['bucket_days'] != 1 else ''}: time to target "
                     f"{_fmt(run['time_to_target_s'], '{:.1f} s', 'never')}, val AUC {run['val_auc']:.4f}, "
                     f"test AUC {run['test_auc']:.4f}, wall {run['wall_s']:.1f} s")
    for kind, label in (("keras", "plain Keras"), ("ps", "PS")):
        lines.append(f"speed-up weekly over daily, {label}: "
                     f"{_fmt(figures['speedup_weekly_over_daily'].get(kind), '{:.2f}x')} time to target, "
                     f"{_fmt(figures['wall_ratio_daily_over_weekly'].get(kind), '{:.2f}x')} wall")
    lines += [f"failed: {name}: {e[:300]}" for name, e in figures["errors"].items()]
    return lines


def _fmt(x: float | None, fmt: str, none: str = "-") -> str:
    return none if x is None else fmt.format(x)


def _made_up_runs() -> dict[str, Any]:
    """Four runs as the benchmark would record them, with round numbers: no training."""
    def run(curve: list[tuple[float, float]], test_auc: float, workers: int, threads: int) -> dict[str, Any]:
        return {"summary": {"wall_s": curve[-1][0], "val_auc": curve[-1][1], "test_auc": test_auc,
                            "samples_per_s": 1000.0},
                "curve": [{"wall_s": t, "val_auc": a} for t, a in curve], "loadavg": 2.0, "workers": workers,
                "threads": threads}

    return {
        "steps": {"daily": 273, "weekly": 39}, "kept": 4000, "errors": {},
        "runs": {
            "keras-daily": run([(5.0, 0.5), (40.0, 0.7), (80.0, 0.8)], 0.79, 1, 2),
            "keras-weekly": run([(4.0, 0.5), (10.0, 0.785), (20.0, 0.79)], 0.78, 1, 2),
            "ps-weekly": run([(8.0, 0.5), (16.0, 0.7), (30.0, 0.76)], 0.75, 2, 1),
            "ps-daily": run([(9.0, 0.5), (50.0, 0.6), (120.0, 0.7)], 0.69, 2, 1),
        },
    }


def test_buckets_figures_and_report(tmp_path: Path) -> None:
    """The figures' arithmetic and the report's section, on made-up runs."""
    from bench.report import write_markdown

    figures = summarize(_made_up_runs())
    assert figures["target"] == pytest.approx(0.784)  # 98% of the best final val AUC, keras-daily's 0.8
    runs = figures["runs"]
    assert runs["keras-daily"]["time_to_target_s"] == 80.0
    assert runs["keras-weekly"]["time_to_target_s"] == 10.0  # 0.785 >= 0.784 at its second evaluation
    assert runs["ps-weekly"]["time_to_target_s"] is None and runs["ps-daily"]["time_to_target_s"] is None
    assert runs["keras-weekly"]["steps"] == 39 and runs["keras-weekly"]["bucket_days"] == 7
    assert figures["speedup_weekly_over_daily"] == {"keras": 8.0, "ps": None}
    assert figures["wall_ratio_daily_over_weekly"] == {"keras": 4.0, "ps": 4.0}

    data = {"datetime": "2026-01-01T00:00:00", "commit_info": {"id": "0123456789abcdef"},
            "benchmarks": [{"name": "test_buckets_daily_vs_weekly", "extra_info": {"buckets": figures}}]}
    write_markdown(data, "python -m bench.report", tmp_path / "RESULTS.md", None)
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## Daily against weekly time steps" in md
    assert "| plain Keras | 1 × 2 threads | 273 × 1 day | 80.0 | 80.0 | 0.8000 | 0.7900 |" in md
    assert "| plain Keras | 1 × 2 threads | 39 × 7 days | 10.0 | 20.0 | 0.7900 | 0.7800 |" in md
    assert f"| PS {RULE} | 2 × 1 thread | 273 × 1 day | not reached | 120.0 | 0.7000 | 0.6900 |" in md
    assert "**8.00×**" in md

"""Time to a target val AUC and final test AUC, each rule with 2 workers, against plain Keras; staleness.

    python -m pytest -q -s bench/test_bench_convergence.py           # 7 rules, 20,000 players, 5 epochs
    python -m pytest -q -s bench/test_bench_convergence.py --quick   # ADAG only, 300 players, 1 epoch, GRU 8

The talk's comparison on this machine: `notpu train` (runner.local.train) with
2 workers × 1 thread for each rule, against one process × 2 threads of plain
Keras (`bench.keras_run`), on the same generated data and split. The plain
run goes first and last, the rules in between, so that a change in the
machine's load shows as a difference between the two plain runs. The target
is 98% of the plain runs' mean final val AUC; time counts from the start of
each run, start-up included, as a user would see it. Staleness histograms
per rule come from the shards' counts (summary.json), with 2 and 4 workers.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import pytest

from bench._data import prepared
from bench._procs import QUICK, keras_reference, read_history
from runner.local import train
from runner.train_config import TrainConfig

ALL_RULES = ("downpour", "adag", "dynsgd", "aeasgd", "eamsgd", "easgd", "averaging")
RULES = ("adag",) if QUICK else ALL_RULES
PLAYERS, DAYS = (300, 30) if QUICK else (20_000, 90)
EPOCHS = 1 if QUICK else 5
HIDDEN = 8 if QUICK else 64
EVAL_INTERVAL_S = 2.0
TARGET_FRACTION = 0.98
CORES = os.cpu_count() or 1
STALENESS_WORKERS = (2,) if QUICK else (2, 4)
STALENESS_EPOCHS = 1  # the 4-worker runs only count staleness

_runs: dict[str, Any] = {}  # every run of this module, made once and shared by its tests


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("convergence")


def _keras_run(data: Path, out: Path) -> dict[str, Any]:
    summary, history = keras_reference(data, out, threads=CORES, epochs=EPOCHS, hidden=HIDDEN,
                                       interval_s=EVAL_INTERVAL_S, timeout_s=1800)
    return {"summary": summary, "history": history, "loadavg": os.getloadavg()[0]}


def _notpu_run(data: Path, out: Path, rule: str, workers: int, epochs: int) -> dict[str, Any]:
    summary = train(TrainConfig(data_dir=str(data), out_dir=str(out), workers=workers, rule=rule, epochs=epochs,
                                hidden=HIDDEN, threads=max(CORES // workers, 1), eval_interval_s=EVAL_INTERVAL_S,
                                progress=False,
                                restore_best=False))  # the last centre, like plain Keras' last weights
    return {"summary": summary, "history": read_history(out / "history.jsonl"), "loadavg": os.getloadavg()[0]}


def runs(root: Path) -> dict[str, Any]:
    """Every training run of this module, made once: plain, the rules with 2 workers, plain again."""
    if _runs:
        return _runs
    data = prepared(PLAYERS, DAYS)
    _runs["data"] = str(data)
    _runs["errors"] = {}
    _runs["keras"] = [_keras_run(data, root / "keras-first")]
    for rule in RULES:
        try:
            _runs[rule] = _notpu_run(data, root / f"{rule}-2", rule, 2, EPOCHS)
        except Exception as exc:  # one broken rule must not cost the others' figures
            _runs["errors"][rule] = f"{type(exc).__name__}: {exc}"[:2000]
    if not QUICK:
        _runs["keras"].append(_keras_run(data, root / "keras-last"))
    return _runs


def time_to(history: list[dict[str, Any]], target: float, without_eval: bool = False) -> float | None:
    """Wall seconds of the first evaluation at or above target, or None if never reached.

    without_eval: minus the time the plain run spent evaluating until then (`eval_s`).
    """
    for h in history:
        if h["val_auc"] >= target:
            return h["wall_s"] - (h.get("eval_s", 0.0) if without_eval else 0.0)
    return None


@pytest.mark.timeout(3600)
def test_convergence_rules(benchmark, root: Path) -> None:
    r = benchmark.pedantic(runs, args=(root,), rounds=1, iterations=1)
    keras = r["keras"]
    keras_val = statistics.mean(k["summary"]["val_auc"] for k in keras)
    keras_test = statistics.mean(k["summary"]["test_auc"] for k in keras)
    target = round(TARGET_FRACTION * keras_val, 6)
    keras_ttt = [time_to(k["history"], target) for k in keras]
    keras_ttt_s = statistics.median(t for t in keras_ttt if t is not None)  # the plain runs end at their final AUC
    keras_free = [time_to(k["history"], target, without_eval=True) for k in keras]
    keras_free_s = statistics.median(t for t in keras_free if t is not None)
    rows: dict[str, Any] = {}
    curves = {"keras": [[h["wall_s"], h["val_auc"]] for h in keras[0]["history"]]}
    lines = [f"plain Keras 1 × {CORES} threads: val AUC {keras_val:.4f}, test AUC {keras_test:.4f}, "
             f"time to {target:.4f}: {' / '.join(f'{t:.1f}' if t is not None else '-' for t in keras_ttt)} s, "
             f"wall {' / '.join(str(k['summary']['wall_s']) for k in keras)} s"]
    for rule in RULES:
        if rule not in r:
            continue
        s, hist = r[rule]["summary"], r[rule]["history"]
        ttt = time_to(hist, target)
        rows[rule] = {
            "workers": s["workers"], "wall_s": s["wall_s"], "samples_per_s": s["samples_per_s"],
            "val_auc": s["val_auc"], "test_auc": s["test_auc"], "auc_delta": round(s["test_auc"] - keras_test, 4),
            "time_to_target_s": ttt,
            "speedup_time_to_auc": round(keras_ttt_s / ttt, 3) if ttt else None,
            "speedup_vs_keras_without_eval": round(keras_free_s / ttt, 3) if ttt else None,
            "mean_staleness": round(s["staleness"]["mean"], 3), "loadavg": round(r[rule]["loadavg"], 2),
            "first_eval_s": hist[0]["wall_s"] if hist else None,  # start-up: servers, workers, TensorFlow
        }
        curves[rule] = [[h["wall_s"], h["val_auc"]] for h in hist]
        sp = rows[rule]["speedup_time_to_auc"]
        lines.append(f"{rule:9s} 2 × 1 thread: test AUC {s['test_auc']:.4f} ({rows[rule]['auc_delta']:+.4f}), "
                     f"time to target {ttt if ttt is not None else 'never'} s, speed-up "
                     f"{f'{sp:.2f}x' if sp else '-'}, wall {s['wall_s']:.1f} s, {s['samples_per_s']:.0f} samples/s")
    benchmark.extra_info.update({
        "cores": CORES, "players": PLAYERS, "days": DAYS, "epochs": EPOCHS, "hidden": HIDDEN,
        "target_fraction": TARGET_FRACTION, "target_val_auc": target,
        "keras": {"threads": CORES, "val_auc": round(keras_val, 6), "test_auc": round(keras_test, 6),
                  "time_to_target_s": keras_ttt, "time_to_target_without_eval_s": keras_free,
                  "first_eval_s": [k["history"][0]["wall_s"] for k in keras],
                  "eval_s": [k["summary"].get("eval_s") for k in keras],
                  "wall_s": [k["summary"]["wall_s"] for k in keras],
                  "samples_per_s": [k["summary"]["samples_per_s"] for k in keras],
                  "loadavg": [round(k["loadavg"], 2) for k in keras]},
        "rules": rows, "curves": curves, "errors": r["errors"],
        "target": "speedup_time_to_auc >= 1.3",
    })
    print("\nconvergence (" + f"{PLAYERS} players, {EPOCHS} epochs, GRU {HIDDEN}, target val AUC {target:.4f}):\n  "
          + "\n  ".join(lines))
    assert not r["errors"], r["errors"]
    assert set(rows) == set(RULES)


@pytest.mark.timeout(3600)
def test_staleness_histograms(benchmark, root: Path) -> None:
    """Per rule: staleness histogram (bin k = pushes that were k updates behind), 2 and 4 workers."""
    r = runs(root)
    data = Path(r["data"])

    def four_workers() -> dict[str, Any]:
        out = {}
        for rule in RULES:
            if 4 in STALENESS_WORKERS:
                out[rule] = _notpu_run(data, root / f"{rule}-4", rule, 4, STALENESS_EPOCHS)
        return out

    more = benchmark.pedantic(four_workers, rounds=1, iterations=1)
    table: dict[str, Any] = {}
    lines = []
    for rule in RULES:
        for workers, run in ((2, r.get(rule)), (4, more.get(rule))):
            if run is None:
                continue
            st = run["summary"]["staleness"]
            total = [sum(col) for col in _columns(st["histograms"])]
            table[f"{rule}-{workers}"] = {"rule": rule, "workers": workers, "mean": round(st["mean"], 3),
                                          "histogram": total, "per_worker": st["histograms"]}
            lines.append(f"{rule:9s} {workers} workers: mean {st['mean']:.2f}, histogram {total}")
    benchmark.extra_info.update({"staleness": table, "epochs_4_workers": STALENESS_EPOCHS})
    print("\nstaleness:\n  " + "\n  ".join(lines))
    assert table


def _columns(histograms: dict[str, list[int]]) -> list[list[int]]:
    """Per-worker histograms → per-bin lists (padded with 0), to sum over workers."""
    width = max((len(h) for h in histograms.values()), default=0)
    return [[h[k] if k < len(h) else 0 for h in histograms.values()] for k in range(width)]

"""A worker's local step rate under every installed Keras backend, against today's TensorFlow path.

    python -m pytest -q -s bench/test_bench_backends.py           # GRU 64, the talk's GRU 512, the user Conv1D
    python -m pytest -q -s bench/test_bench_backends.py --quick   # GRU 8 on 10 steps, 1 thread, 1 round (CI)

What is measured: for each model, every cell (backend × threads) is its own
`bench.backend_steps --serve` process, since KERAS_BACKEND and the thread
pools are fixed before Keras is imported. Backends: TensorFlow as a worker
runs it today, TensorFlow with the model's ``jit_compile=True`` (XLA), JAX
and PyTorch, each at 1 and 2 threads; a backend whose module does not import
is skipped and reported as not installed. Models: the default GRU (hidden 64)
on the default prepared shape, 90 steps × 105 features; the talk's GRU 512 on
90 × 50; the Conv1D user model of tests/integration/test_fit.py on 90 × 105.
Batches of 64, made up (random) and the same in every cell, from the same
starting weights. All cells start together and warm up; then a round asks
each cell in turn (the order rotating every round) for one timing of each
mode, so only one cell computes at a time and a drift in the machine's load
falls on all of them alike. Rounds go on up to a number per model or until
the model's time budget is spent (`BUDGET_S`, checked between rounds, so
every cell has as many):

- ``train_on_batch``: today's path, λ = 5 calls of `model.train_on_batch`
  each followed by ``float(loss)``;
- ``window2``, ``window5``: the λ = 2 or 5 steps of one window in one
  compiled call (a `tf.function` loop for TensorFlow, `jax.lax.scan` over
  Keras 3's stateless API for JAX, the plain loop for PyTorch);
- ``exchange``: `flatten(model.get_weights())` and
  `model.set_weights(unflatten(...))`, the worker's boundary every λ steps.

Figures: samples/s of each mode (median over rounds), its ratio to
TensorFlow's ``train_on_batch`` at the same threads on the same model, the
exchange's milliseconds, the cores each mode kept busy (CPU ÷ wall seconds:
how the thread limits are checked), the set-up times, and each cell's loss
on the first batch before training (the same weights everywhere: the
backends' arithmetic compared). See bench/backend_steps.py for how each
backend's threads are limited.

Asserted: every installed backend has every cell, each with finite, positive
figures and finite losses; TensorFlow is among them. Timings are never
asserted. The figures' arithmetic and the report's section are checked on
made-up cells, without training, in every mode.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from bench._procs import QUICK
from bench._timing import numbers
from bench.backend_steps import BACKENDS, BATCH, MODELS, WINDOW

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "tensorflow"  # today's path
MODULES = {"tensorflow": "tensorflow", "tensorflow-xla": "tensorflow", "jax": "jax", "torch": "torch"}
MODEL_NAMES = ("gru8",) if QUICK else ("gru64", "gru512", "conv1d")
THREADS = (1,) if QUICK else (1, 2)
WINDOWS = (2,) if QUICK else (2, 5)
ROUNDS = {"gru8": 1, "gru64": 5, "gru512": 3, "conv1d": 8}
# No round starts once a model's rounds have taken this long (the first always runs): on 2 cores shared with other
# jobs a round of GRU 512 (8 cells × 12 steps of ~2-5 s) takes 4-8 minutes, and PyTorch at 2 threads can take 10×
# longer than at 1 when the cores are oversubscribed.
BUDGET_S = {"gru8": 0, "gru64": 240, "gru512": 300, "conv1d": 90}
READY_TIMEOUT_S = 1500  # every cell of a model starts at once: imports and compiles share the cores
ROUND_TIMEOUT_S = 1200
LABELS = {"tensorflow": "TensorFlow", "tensorflow-xla": "TensorFlow + XLA", "jax": "JAX", "torch": "PyTorch"}


def unavailable(backend: str) -> str | None:
    """Why the backend's module cannot be found, or None (a cell whose import fails says so itself)."""
    module = MODULES[backend]
    return None if importlib.util.find_spec(module) is not None else f"no module {module}"


class Child:
    """One `bench.backend_steps --serve` process; its JSON lines read by a thread, every wait bounded."""

    def __init__(self, backend: str, threads: int, model: str, log_dir: Path) -> None:
        self.key = f"{backend}/{threads}"
        self.log_path = log_dir / f"{backend}-{threads}.log"
        cmd = [sys.executable, "-m", "bench.backend_steps", "--serve", "--backend", backend, "--threads",
               str(threads), "--model", model, "--windows", ",".join(map(str, WINDOWS))]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         cwd=ROOT)
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"read-{self.key}", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                if line.startswith("{"):
                    self.lines.put(json.loads(line))
        self.lines.put(None)

    def reply(self, timeout_s: float) -> dict[str, Any]:
        try:
            msg = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"{self.key}: no answer within {timeout_s:g} s; see {self.log_path}") from None
        if msg is None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.key} exited with code {self.proc.wait(30)}:\n{tail}")
        return msg

    def round(self) -> dict[str, Any]:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return self.reply(ROUND_TIMEOUT_S)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)


@contextlib.contextmanager
def children(model: str, backends: list[str]) -> Iterator[dict[str, Child]]:
    with tempfile.TemporaryDirectory(prefix="notpu-backends-") as tmp, contextlib.ExitStack() as stack:
        out = {}
        for backend in backends:
            for threads in THREADS:
                child = Child(backend, threads, model, Path(tmp))
                stack.callback(child.close)
                out[child.key] = child
        yield out


def measure(model: str) -> dict[str, Any]:
    """Every cell of `model` started, then up to `ROUNDS[model]` round-robin rounds within `BUDGET_S[model]`
    (at least one): the raw replies."""
    status = {b: unavailable(b) for b in BACKENDS}
    raw: dict[str, Any] = {"model": model, "unavailable": {b: s for b, s in status.items() if s}, "ready": {},
                           "rounds": {}, "errors": {}, "loadavg": [round(os.getloadavg()[0], 2)]}
    with children(model, [b for b, s in status.items() if s is None]) as cells:
        for key, child in cells.items():
            try:
                reply = child.reply(READY_TIMEOUT_S)
            except RuntimeError as exc:
                raw["errors"][key] = str(exc)[-2000:]
                continue
            if "unavailable" in reply:
                raw["unavailable"][key.split("/")[0]] = reply["unavailable"]
            else:
                raw["ready"][key], raw["rounds"][key] = reply, []
        start = time.monotonic()
        for r in range(ROUNDS[model]):
            live = [k for k in raw["rounds"] if k not in raw["errors"]]
            if not live or (r and time.monotonic() - start > BUDGET_S[model]):
                break
            for key in live[r % len(live):] + live[:r % len(live)]:
                try:
                    raw["rounds"][key].append(cells[key].round())
                except RuntimeError as exc:
                    raw["errors"][key] = str(exc)[-2000:]
    raw["loadavg"].append(round(os.getloadavg()[0], 2))
    return raw


def _steps(mode: str) -> int:
    return WINDOW if mode == "train_on_batch" else int(mode.removeprefix("window"))


def _cell(setup: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    modes = [m for m in rounds[0]["modes"] if m != "exchange"]
    median = {m: statistics.median(r["modes"][m]["s"] for r in rounds) for m in [*modes, "exchange"]}
    cores = {m: round(statistics.median(r["modes"][m]["cpu_s"] / r["modes"][m]["s"] for r in rounds), 2)
             for m in [*modes, "exchange"]}
    return {
        "backend": setup["backend"], "threads": setup["threads"], "thread_method": setup["thread_method"],
        "version": setup["version"], "samples_per_s": {m: round(_steps(m) * BATCH / median[m], 1) for m in modes},
        "exchange_ms": round(median["exchange"] * 1e3, 3), "cores": cores,
        "busy_threads": {m: max(r["modes"][m]["busy_threads"] for r in rounds) for m in modes},
        "check_loss": setup["check_loss"], "import_s": round(setup["import_s"], 1),
        "first_steps_s": round(setup["first_steps_s"], 1), "compile_s": round(setup["compile_s"], 1),
        "losses_finite": all(r["losses_finite"] for r in rounds)
        and all(map(math.isfinite, setup["warmup_losses"] + setup["window_losses"])),
        "rounds": len(rounds),
    }


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """extra_info["backends"] for one model from `measure`'s replies: samples/s per cell and mode, ratios."""
    name = raw["model"]
    kind, steps, features, hidden = MODELS[name]
    cells = {key: _cell(setup, raw["rounds"][key]) for key, setup in raw["ready"].items()
             if raw["rounds"].get(key) and key not in raw["errors"]}
    for cell in cells.values():
        base = cells.get(f"{REFERENCE}/{cell['threads']}")
        cell["ratio_vs_tf"] = {m: round(v / base["samples_per_s"]["train_on_batch"], 3) if base else None
                               for m, v in cell["samples_per_s"].items()}
    losses = [c["check_loss"] for c in cells.values()]
    floats = next((s["floats"] for s in raw["ready"].values()), None)
    backends = {b: ("not installed" if b in raw["unavailable"] else
                    "ok" if all(f"{b}/{t}" in cells for t in THREADS) else "failed") for b in BACKENDS}
    return {
        "model": name, "kind": kind, "steps": steps, "features": features, "hidden": hidden, "floats": floats,
        "batch": BATCH, "window": WINDOW, "windows": list(WINDOWS), "threads": list(THREADS),
        "rounds": min((c["rounds"] for c in cells.values()), default=0), "reference": REFERENCE, "backends": backends,
        "unavailable": raw["unavailable"], "cells": cells, "loadavg": raw["loadavg"],
        "check_loss_spread": max(losses) - min(losses) if losses else None, "errors": raw["errors"],
    }


def describe(f: dict[str, Any]) -> str:
    """The model of one set of figures, in words."""
    what = f"GRU {f['hidden']}" if f["kind"] == "gru" else "the user Conv1D"
    return f"{what} on {f['steps']} × {f['features']} ({_count(f['floats'])} floats)"


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _lines(f: dict[str, Any]) -> list[str]:
    lines = []
    for key, c in f["cells"].items():
        sps, ratio = c["samples_per_s"], c["ratio_vs_tf"]
        lines.append(f"{LABELS[c['backend']]:16s} × {c['threads']}: " + ", ".join(
            f"{m} {sps[m]:8.1f}/s ({_ratio(ratio[m])})" for m in sps)
            + f", exchange {c['exchange_ms']:.2f} ms, cores {c['cores'].get('train_on_batch', 0):.2f}, "
              f"check loss {c['check_loss']:.7f}")
    lines += [f"{LABELS[b]}: not installed ({why})" for b, why in f["unavailable"].items()]
    lines += [f"failed: {k}: {e[:500]}" for k, e in f["errors"].items()]
    return lines


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


@pytest.mark.timeout(600 if QUICK else 3000)
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_backend_steps(benchmark, model: str) -> None:
    raw = benchmark.pedantic(lambda: measure(model), rounds=1, iterations=1)
    figures = summarize(raw)
    benchmark.extra_info["backends"] = figures
    print(f"\nbackends, {describe(figures)}, batch {BATCH}, {figures['rounds']} round(s), load "
          f"{figures['loadavg'][0]} → {figures['loadavg'][-1]}:\n  " + "\n  ".join(_lines(figures)))

    assert not figures["errors"], figures["errors"]
    assert figures["backends"][REFERENCE] == "ok", figures["backends"]
    assert all(s in ("ok", "not installed") for s in figures["backends"].values()), figures["backends"]
    for backend in (b for b, s in figures["backends"].items() if s == "ok"):
        for threads in THREADS:
            cell = figures["cells"][f"{backend}/{threads}"]
            assert set(cell["samples_per_s"]) == {"train_on_batch", *(f"window{n}" for n in WINDOWS)}, cell
            assert all(v > 0 for v in cell["samples_per_s"].values()) and cell["exchange_ms"] > 0, cell
            assert cell["losses_finite"] and cell["rounds"] == figures["rounds"] >= 1, cell
    for v in numbers({k: v for k, v in figures.items() if k != "errors"}):
        assert v is None or math.isfinite(v), figures


def _made_up_raw() -> dict[str, Any]:
    """Two backends' cells as `measure` would return them for GRU 64, with round numbers: no training."""
    def setup(backend: str, threads: int) -> dict[str, Any]:
        return {"backend": backend, "threads": threads, "thread_method": "made up", "version": "0", "floats": 58_854,
                "check_loss": 0.75, "import_s": 5.0, "first_steps_s": 2.0, "compile_s": 3.0,
                "warmup_losses": [0.7], "window_losses": [0.7]}

    def rounds(step_s: float) -> list[dict[str, Any]]:
        modes = {"train_on_batch": {"s": WINDOW * step_s, "cpu_s": WINDOW * step_s, "busy_threads": 1},
                 **{f"window{n}": {"s": n * step_s / 2, "cpu_s": n * step_s / 2, "busy_threads": 1} for n in WINDOWS},
                 "exchange": {"s": 0.002, "cpu_s": 0.002, "busy_threads": 1}}
        return [{"modes": modes, "losses_finite": True}] * ROUNDS["gru64"]

    return {"model": "gru64", "unavailable": {"torch": "no module torch", "tensorflow-xla": "made up"},
            "ready": {f"{b}/{t}": setup(b, t) for b in ("tensorflow", "jax") for t in THREADS},
            "rounds": {f"{b}/{t}": rounds(0.064 if b == "tensorflow" else 0.032) for b in ("tensorflow", "jax")
                       for t in THREADS},
            "errors": {}, "loadavg": [2.0, 2.5]}


def test_backends_figures_and_report(tmp_path: Path) -> None:
    """The figures' arithmetic and the report's section, on made-up cells."""
    from bench.report import write_markdown

    f = summarize(_made_up_raw())
    tf, jax = f["cells"][f"tensorflow/{THREADS[0]}"], f["cells"][f"jax/{THREADS[0]}"]
    assert tf["samples_per_s"]["train_on_batch"] == 1000.0  # 64 samples a step, 64 ms a step
    assert tf["ratio_vs_tf"]["train_on_batch"] == 1.0 and jax["ratio_vs_tf"]["train_on_batch"] == 2.0
    assert jax["ratio_vs_tf"]["window2"] == 4.0 and jax["exchange_ms"] == 2.0
    assert f["backends"] == {"tensorflow": "ok", "tensorflow-xla": "not installed", "jax": "ok",
                             "torch": "not installed"}
    assert f["check_loss_spread"] == 0.0

    data = {"datetime": "2026-01-01T00:00:00", "commit_info": {"id": "0123456789abcdef"},
            "benchmarks": [{"name": "test_backend_steps[gru64]", "extra_info": {"backends": f}}]}
    write_markdown(data, "python -m bench.report", tmp_path / "RESULTS.md", None)
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## Keras backends: a worker's local steps" in md
    assert f"| JAX | {THREADS[0]} | 2,000 (**2.00×**) | 4,000 (**4.00×**) |" in md
    assert f"| TensorFlow | {THREADS[0]} | 1,000 (1.00×) |" in md
    assert "not installed: TensorFlow + XLA (made up), PyTorch (no module torch)" in md

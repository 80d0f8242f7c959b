"""A worker's local steps under one Keras backend, one thread count and one model, in this fresh process.

    python -m bench.backend_steps --backend jax --threads 1 --model gru64 --rounds 3
    python -m bench.backend_steps --backend torch --threads 2 --model conv1d --serve   # one round per "round" line

KERAS_BACKEND and the thread pools are fixed before Keras (and TensorFlow,
JAX or PyTorch) is imported, so every (backend, threads, model) cell is its
own process. Backends: ``tensorflow`` (today's worker: `runner.worker`'s
thread settings, tf.config.threading intra = threads, inter = 1),
``tensorflow-xla`` (the same with the model's ``jit_compile=True``), ``jax``
(XLA_FLAGS ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``
and, below all cores, ``os.sched_setaffinity`` to that many cores: JAX sizes
its CPU thread pool from the affinity mask, and the flags alone leave two
threads busy), ``torch`` (torch.set_num_threads, one inter-op thread).

The model starts from the same weights under every backend (its shapes'
Glorot-uniform draws from a fixed numpy seed); ``check_loss`` is its
inference loss on the first batch, before any step, to compare backends'
arithmetic. Then, per round, each in turn (the order rotates every round):

- ``train_on_batch``: λ = 5 calls `model.train_on_batch(x, y)` on numpy
  batches of 64, each followed by ``float(loss)``, as `runner.worker` does;
- ``window2``, ``window5``: the λ batches of one window, stacked, in one
  compiled call: TensorFlow a `tf.function` looping over them (gradient
  tape, then the model's optimizer), JAX `jax.lax.scan` of Keras 3's
  stateless API (`model.stateless_call`, `optimizer.stateless_apply`) under
  one `jax.jit`, its state kept as JAX arrays between calls; PyTorch the
  plain loop (forward, backward, `optimizer.apply`); one ``float(loss)`` at
  the end;
- ``exchange``: `flatten(model.get_weights())` then
  `model.set_weights(unflatten(...))`, the worker's boundary every λ steps
  (3 calls, their mean).

Warm-up (untimed): 5 `train_on_batch` steps and one call of each window
(its compilation). Each mode reports its seconds, the process's CPU seconds
and how many of its threads did 10% or more of that CPU work (from
/proc/self/task), which is how the thread limits are checked. Prints one JSON
line when ready (the set-up figures) and one per round; a backend that does
not import says so in one JSON line (``unavailable``) and exits.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Callable

BACKENDS = ("tensorflow", "tensorflow-xla", "jax", "torch")
#: name → (kind, steps, features, hidden); hidden is the GRU's width
MODELS = {
    "gru64": ("gru", 90, 105, 64),
    "gru512": ("gru", 90, 50, 512),
    "conv1d": ("conv1d", 90, 105, 0),
    "gru8": ("gru", 10, 105, 8),
}
BATCH = 64
WINDOW = 5
WINDOWS = (2, 5)
WARMUP_STEPS = 5
EXCHANGE_CALLS = 3
JAX_ONE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def limit_threads(backend: str, threads: int) -> str:
    """Before any import of Keras: the environment (and affinity) for `threads`; returns how, in words."""
    from runner.worker import configure_threads

    configure_threads(threads)
    os.environ["KERAS_BACKEND"] = "tensorflow" if backend.startswith("tensorflow") else backend
    if backend.startswith("tensorflow"):
        return f"tf.config.threading intra={threads} inter=1, OMP_NUM_THREADS={threads}"
    if backend == "torch":
        return f"torch.set_num_threads({threads}), set_num_interop_threads(1), OMP_NUM_THREADS={threads}"
    cores = sorted(os.sched_getaffinity(0))
    if threads >= len(cores):
        return f"none (all {len(cores)} cores)"
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + JAX_ONE_THREAD_FLAGS).strip()
    os.sched_setaffinity(0, set(cores[-threads:]))
    return f"os.sched_setaffinity to {threads} of {len(cores)} cores" + (
        f", XLA_FLAGS={JAX_ONE_THREAD_FLAGS}" if threads == 1 else "")


def import_backend(backend: str) -> None:
    """Import the backend's module, before Keras: an ImportError here means the backend is not installed."""
    import importlib

    importlib.import_module("tensorflow" if backend.startswith("tensorflow") else backend)


def apply_threads(backend: str, threads: int) -> None:
    """After the import: the backend's own thread settings."""
    if backend.startswith("tensorflow"):
        from runner.worker import _apply_tf_threads

        _apply_tf_threads(threads)
    elif backend == "torch":
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already started
            pass


def conv1d_model(steps: int, features: int):
    """tests/integration/test_fit.py's `conv1d_model`: Conv1D(8, 3, relu), global average pooling, one sigmoid."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((steps, features)), keras.layers.Conv1D(8, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    return model


def build(name: str):
    kind, steps, features, hidden = MODELS[name]
    if kind == "conv1d":
        return conv1d_model(steps, features), "binary"
    from models.gru import ModelConfig, build_model

    return build_model(ModelConfig(days=steps, features=features, hidden=hidden)), "categorical"


def same_weights(model, seed: int = 0) -> None:
    """The same starting weights under every backend: Glorot-uniform draws from numpy for every tensor of
    two or more dimensions, the 1-D ones (biases, BatchNorm's ones and zeros) as built."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for w in model.get_weights():
        if w.ndim >= 2:
            fan_in, fan_out = int(np.prod(w.shape[:-1])), int(w.shape[-1])
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            w = rng.uniform(-limit, limit, w.shape).astype(w.dtype)
        out.append(w)
    model.set_weights(out)


def batches(name: str, kind: str, count: int, seed: int = 0) -> list[tuple[Any, Any]]:
    import numpy as np

    from models.outputs import targets

    _, steps, features, _ = MODELS[name]
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((BATCH, steps, features), dtype=np.float32),
             targets(rng.integers(0, 2, BATCH), kind)) for _ in range(count)]


def loss_function(model):
    import keras

    return keras.losses.get(model.loss)


def tf_window(model, jit: bool) -> Callable[[Any, Any], float]:
    import tensorflow as tf

    loss_fn, variables, optimizer = loss_function(model), model.trainable_variables, model.optimizer

    @tf.function(jit_compile=jit)
    def window(xs, ys):
        loss = tf.constant(0.0)
        for i in tf.range(tf.shape(xs)[0]):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_fn(ys[i], model(xs[i], training=True)))
            optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    return lambda xs, ys: float(window(xs, ys))


def jax_window(model) -> Callable[[Any, Any], float]:
    import jax
    import jax.numpy as jnp

    loss_fn, optimizer = loss_function(model), model.optimizer

    def loss_and_state(trainable, non_trainable, x, y):
        pred, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        return jnp.mean(loss_fn(y, pred)), non_trainable

    grad = jax.value_and_grad(loss_and_state, has_aux=True)

    def step(state, batch):
        trainable, non_trainable, slots = state
        (loss, non_trainable), grads = grad(trainable, non_trainable, *batch)
        trainable, slots = optimizer.stateless_apply(slots, grads, trainable)
        return [list(trainable), list(non_trainable), list(slots)], loss

    run = jax.jit(lambda state, xs, ys: jax.lax.scan(step, state, (xs, ys)), donate_argnums=0)
    state = [[jnp.array(v.value) for v in vs] for vs in
             (model.trainable_variables, model.non_trainable_variables, optimizer.variables)]

    def window(xs, ys):
        state[:], losses = run(state, xs, ys)
        return float(losses[-1])

    return window


def torch_window(model) -> Callable[[Any, Any], float]:
    import keras
    import torch

    loss_fn, variables, optimizer = loss_function(model), model.trainable_variables, model.optimizer

    def window(xs, ys):
        for x, y in zip(torch.from_numpy(xs), torch.from_numpy(ys)):
            model.zero_grad()
            loss = keras.ops.mean(loss_fn(y, model(x, training=True)))
            loss.backward()
            with torch.no_grad():
                optimizer.apply([v.value.grad for v in variables], variables)
        return float(loss)

    return window


def window_fn(backend: str, model) -> Callable[[Any, Any], float]:
    if backend.startswith("tensorflow"):
        return tf_window(model, jit=backend == "tensorflow-xla")
    return jax_window(model) if backend == "jax" else torch_window(model)


def thread_ticks() -> dict[str, int]:
    """Clock ticks of CPU (user + system) per thread of this process."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        ticks[tid] = int(fields[11]) + int(fields[12])
    return ticks


def timed(fn: Callable[[], object]) -> dict[str, float]:
    """Seconds, CPU seconds and busy threads (10% or more of the CPU ticks) of one fn()."""
    before, cpu, t = thread_ticks(), time.process_time(), time.perf_counter()
    fn()
    wall, cpu, after = time.perf_counter() - t, time.process_time() - cpu, thread_ticks()
    deltas = [after[k] - before.get(k, 0) for k in after]
    total = sum(deltas)
    return {"s": wall, "cpu_s": cpu, "busy_threads": sum(d >= 0.1 * total for d in deltas) if total else 0}


class Cell:
    """One backend, thread count and model, warmed up; `round()` times each mode once."""

    def __init__(self, backend: str, threads: int, model: str, windows: tuple[int, ...] = WINDOWS) -> None:
        self.backend, self.threads, self.name, self.windows = backend, threads, model, windows
        t0 = time.perf_counter()
        self.thread_method = limit_threads(backend, threads)
        import_backend(backend)
        import keras

        apply_threads(backend, threads)
        from pserver.layout import Layout, flatten, unflatten

        self.flatten, self.unflatten = flatten, unflatten
        self.import_s = time.perf_counter() - t0
        self.model, kind = build(model)
        if backend == "tensorflow-xla":
            self.model.jit_compile = True
        same_weights(self.model)
        self.batches = batches(model, kind, max(windows + (WINDOW,)))
        x0, y0 = self.batches[0]
        self.check_loss = float(self.model.test_on_batch(x0, y0))
        self.layout = Layout.of(self.model.get_weights(), [w.path for w in self.model.weights])
        t = time.perf_counter()
        self.warmup_losses = [self.step(k) for k in range(WARMUP_STEPS)]
        self.first_steps_s = time.perf_counter() - t
        self.window = window_fn(backend, self.model)
        import numpy as np

        self.stacked = {n: tuple(np.stack(a) for a in zip(*self.batches[:n])) for n in windows}
        t = time.perf_counter()
        self.window_losses = [self.window(*self.stacked[n]) for n in windows]
        self.compile_s = time.perf_counter() - t
        self.exchange()
        self.keras_version, self.backend_version = keras.__version__, _backend_version(backend)
        self.rounds = 0

    def step(self, k: int) -> float:
        x, y = self.batches[k % len(self.batches)]
        return float(self.model.train_on_batch(x, y))

    def exchange(self) -> None:
        for _ in range(EXCHANGE_CALLS):
            self.model.set_weights(self.unflatten(self.flatten(self.model.get_weights()), self.layout))

    def ready(self) -> dict[str, Any]:
        kind, steps, features, hidden = MODELS[self.name]
        return {"ready": True, "backend": self.backend, "threads": self.threads, "model": self.name, "kind": kind,
                "steps": steps, "features": features, "hidden": hidden,
                "thread_method": self.thread_method, "floats": self.layout.total, "batch": BATCH, "window": WINDOW,
                "windows": list(self.windows),
                "check_loss": self.check_loss, "warmup_losses": self.warmup_losses,
                "window_losses": self.window_losses, "import_s": self.import_s, "first_steps_s": self.first_steps_s,
                "compile_s": self.compile_s, "keras": self.keras_version, "version": self.backend_version,
                "affinity": sorted(os.sched_getaffinity(0)), "pid": os.getpid()}

    def round(self) -> dict[str, Any]:
        losses: list[float] = []
        modes: dict[str, Callable[[], object]] = {
            "train_on_batch": lambda: losses.extend(self.step(k) for k in range(WINDOW)),
            **{f"window{n}": (lambda n=n: losses.append(self.window(*self.stacked[n]))) for n in self.windows},
            "exchange": self.exchange,
        }
        names = list(modes)
        shift = self.rounds % len(names)
        out = {name: timed(modes[name]) for name in names[shift:] + names[:shift]}
        out["exchange"] = {k: v / EXCHANGE_CALLS if k != "busy_threads" else v for k, v in out["exchange"].items()}
        self.rounds += 1
        return {"round": self.rounds, "modes": out, "losses_finite": all(map(math.isfinite, losses)),
                "last_loss": losses[-1]}


def _backend_version(backend: str) -> str:
    module = "tensorflow" if backend.startswith("tensorflow") else backend
    return str(getattr(sys.modules.get(module), "__version__", "?"))


def _say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backend_steps")
    p.add_argument("--backend", choices=BACKENDS, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", choices=sorted(MODELS), default="gru64")
    p.add_argument("--windows", default=",".join(map(str, WINDOWS)), help="λ of the one-call windows, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="rounds to run and exit (without --serve)")
    p.add_argument("--serve", action="store_true", help='one round per "round" line on stdin, until "quit" or EOF')
    args = p.parse_args(argv)
    try:
        cell = Cell(args.backend, args.threads, args.model, tuple(int(n) for n in args.windows.split(",")))
    except ImportError as exc:
        _say({"unavailable": f"{type(exc).__name__}: {exc}"[:300]})
        return 0
    _say(cell.ready())
    if not args.serve:
        for _ in range(args.rounds):
            _say(cell.round())
        return 0
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        if line.strip() == "round":
            _say(cell.round())
    return 0


if __name__ == "__main__":
    sys.exit(main())

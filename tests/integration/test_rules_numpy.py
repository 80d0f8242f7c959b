"""Each rule, run through real shard processes, equals its numpy re-statement.

The equations are the rule table's (optimizers/base.py, and docs/guides/rules.md).

The problem is a linear least-squares model on a fixed data order, so every
worker's gradient sequence is a deterministic function of its weights (one
quadratic per batch). Local steps use the rule's own local optimizer
(`optimizers.RULES[rule].local_optimizer`, built by `models.gru.make_optimizer`):
real Keras steps on a flat `tf.Variable`, whose state (moments, momentum, step
count) carries across exchanges as in a worker. Asynchronous rules run two
workers alternating in one process (a fixed interleaving, which the numpy
re-statement follows); synchronous rules run the two workers in threads, since
a round waits for both.

Two references per rule:

- the rule's exchange equations in numpy with the *same Keras* local steps,
  replayed: the shards must match it exactly (the exchange is float32 on both
  sides, and Keras' elementwise CPU kernels give the same bits for the same
  inputs);
- the rule's exchange equations *and* the local optimizer's equations in numpy
  (Adam, Nadam as Keras 3 writes it, SGD with Nesterov momentum 0.9, plain
  SGD): the shards must match it within `ATOL` (float32 rounding of
  differently ordered operations, carried over 24 steps).

EAMSGD differs from AEASGD only in its local optimizer (momentum), so its
expected centre must differ from AEASGD's by far more than `ATOL`, and it does.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable

import numpy as np
import pytest

from optimizers import RULES, make_rule
from pserver.client import Client
from pserver.layout import Layout

pytestmark = pytest.mark.integration

FEATURES, BATCH, STEPS, LR = 13, 8, 24, 0.05
LAYOUT = Layout.from_shapes([(FEATURES,), (1,)])  # weights and bias: 14 floats, over 2 shards
ASYNC_WINDOW, SYNC_WINDOW = 4, 6
ALPHA = 0.45  # β/n with β = 0.9, n = 2, for the elastic rules; given explicitly, not the table's default
ELASTIC = {"aeasgd", "eamsgd", "easgd"}
# The centre is O(1); two float32 computations of the same 24 optimizer steps differ by a few ulp per step.
ATOL = 2e-5
F32 = np.float32


def data(worker: int):
    rng = np.random.default_rng(100 + worker)
    X = rng.standard_normal((STEPS * BATCH, FEATURES)).astype(np.float32)
    y = (X @ np.arange(FEATURES, dtype=np.float32) / FEATURES + 0.5).astype(np.float32)
    return X, y


def gradient(w: np.ndarray, X: np.ndarray, y: np.ndarray, t: int) -> np.ndarray:
    """The gradient of batch t's mean squared error at w; float32 (total,)."""
    xb, yb = X[t * BATCH:(t + 1) * BATCH], y[t * BATCH:(t + 1) * BATCH]
    err = xb @ w[:FEATURES] + w[FEATURES] - yb  # (batch,)
    return np.concatenate([xb.T @ err, [err.sum()]]).astype(np.float32) * np.float32(2 / BATCH)


def initial() -> np.ndarray:
    return np.random.default_rng(1).standard_normal(LAYOUT.total).astype(np.float32)


def alpha_of(rule: str) -> float:
    return ALPHA if rule in ELASTIC else 0.0


# ---- local optimizers: real Keras, and the same equations in numpy ------------------------

class KerasLocal:
    """The rule's local optimizer as a worker runs it: Keras steps on one flat tf.Variable."""

    def __init__(self, name: str) -> None:
        import tensorflow as tf

        from models.gru import make_optimizer

        self.tf = tf
        self.optimizer = make_optimizer(name, LR)
        self.var = tf.Variable(np.zeros(LAYOUT.total, np.float32))

    def __call__(self, w: np.ndarray, g: np.ndarray) -> np.ndarray:
        self.var.assign(w)  # after an exchange the worker continues from the rule's vector (set_weights)
        self.optimizer.apply([self.tf.constant(g)], [self.var])
        return self.var.numpy()


class NumpyLocal:
    """The same optimizer's update equations, float32, in the order Keras 3 writes them
    (keras/src/optimizers/{adam,nadam,sgd}.py; defaults β1 0.9, β2 0.999, ε 1e-7, momentum 0.9)."""

    def __init__(self, name: str) -> None:
        if name not in ("adam", "nadam", "nesterov", "sgd"):
            raise AssertionError(f"no numpy re-statement of local optimizer {name!r}")
        self.name = name
        self.t = 0  # Keras' `iterations`: steps taken before this one
        self.m = np.zeros(LAYOUT.total, np.float32)
        self.v = np.zeros(LAYOUT.total, np.float32)
        self.u_product = F32(1.0)  # Nadam's running product of μ_t

    def __call__(self, w: np.ndarray, g: np.ndarray) -> np.ndarray:
        lr, b1, b2, eps = F32(LR), F32(0.9), F32(0.999), F32(1e-7)
        one_minus_b1, one_minus_b2 = F32(1 - 0.9), F32(1 - 0.999)
        step, nxt = F32(self.t + 1), F32(self.t + 2)
        if self.name == "sgd":
            w = w - g * lr
        elif self.name == "nesterov":  # m ← μm − ηg;  w ← w + μm − ηg
            mu = F32(0.9)
            self.m = self.m * mu - g * lr
            w = w + (self.m * mu - g * lr)
        elif self.name == "adam":  # m̂/√v̂ with the bias corrections folded into the rate
            rate = lr * np.sqrt(F32(1) - b2 ** step) / (F32(1) - b1 ** step)
            self.m = self.m + (g - self.m) * one_minus_b1
            self.v = self.v + (g * g - self.v) * one_minus_b2
            w = w - (self.m * rate) / (np.sqrt(self.v) + eps)
        else:  # nadam: μ_t = β1(1 − ½·0.96^t); the momentum term looks one step ahead with μ_{t+1}
            u_t = b1 * (F32(1) - F32(0.5) * F32(0.96) ** step)
            u_next = b1 * (F32(1) - F32(0.5) * F32(0.96) ** nxt)
            self.u_product = F32(self.u_product * b1 * (F32(1) - F32(0.5) * F32(0.96) ** step))  # in this order
            u_product_next = self.u_product * u_next
            self.m = self.m + (g - self.m) * (F32(1) - b1)  # Nadam subtracts in float32, Adam in Python floats
            self.v = self.v + (g * g - self.v) * (F32(1) - b2)
            m_hat = (u_next * self.m) / (F32(1) - u_product_next) + ((F32(1) - u_t) * g) / (F32(1) - self.u_product)
            v_hat = self.v / (F32(1) - b2 ** step)
            w = w - (m_hat * lr) / (np.sqrt(v_hat) + eps)
        self.t += 1
        return np.asarray(w, np.float32)


Local = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ---- numpy re-statements of the rule table (optimizers/base.py) ----------------------------

def reference_async(rule: str, window: int, alpha: float, local: Callable[[], Local],
                    overlap: bool = False) -> np.ndarray:
    """The asynchronous rules; with ``overlap``, each reply R is applied at the worker's next exchange, as
    R + (W − W_sent), before that exchange is sent (optimizers.rule, Overlap)."""
    C = initial()
    version = 0
    W = [C.copy(), C.copy()]
    opt = [local(), local()]
    pulled = [C.copy(), C.copy()]
    pulled_version = [0, 0]
    in_flight: list[tuple[np.ndarray, np.ndarray] | None] = [None, None]  # (W_sent, its reply R)
    data_ = [data(0), data(1)]
    for block in range(STEPS // window):
        for i in (0, 1):  # the same interleaving as the test drives
            for t in range(block * window, (block + 1) * window):
                W[i] = opt[i](W[i], gradient(W[i], *data_[i], t))
            if in_flight[i] is not None:
                sent, reply = in_flight[i]
                W[i] = (W[i] - sent) + reply
            if rule in ("downpour", "adag", "dynsgd"):
                delta = W[i] - pulled[i]
                if rule == "downpour":
                    C = C + delta
                elif rule == "adag":
                    C = C + np.float32(1.0 / window) * delta
                else:
                    staleness = version - pulled_version[i]
                    C = C + np.float32(1.0 / (staleness + 1)) * delta
                version += 1
                reply = C.copy()
                pulled[i], pulled_version[i] = C.copy(), version
            else:  # aeasgd, eamsgd
                E = np.float32(alpha) * (W[i] - C)
                reply = W[i] - E
                C = C + E
                version += 1
            if overlap:
                in_flight[i] = (W[i], reply)
            else:
                W[i] = reply
    return C


def reference_sync(rule: str, window: int, alpha: float, local: Callable[[], Local]) -> np.ndarray:
    C = initial()
    W = [C.copy(), C.copy()]
    opt = [local(), local()]
    data_ = [data(0), data(1)]
    for block in range(STEPS // window):
        for i in (0, 1):
            for t in range(block * window, (block + 1) * window):
                W[i] = opt[i](W[i], gradient(W[i], *data_[i], t))
        if rule == "easgd":
            E = [np.float32(alpha) * (W[i] - C) for i in (0, 1)]
            C = (C.astype(np.float64) + E[0].astype(np.float64) + E[1].astype(np.float64)).astype(np.float32)
            W = [W[i] - E[i] for i in (0, 1)]
        else:  # averaging
            C = ((W[0].astype(np.float64) + W[1].astype(np.float64)) * 0.5).astype(np.float32)
            W = [C.copy(), C.copy()]
    return C


def check(rule: str, got: np.ndarray, reference: Callable[..., np.ndarray], window: int, **options) -> None:
    name = RULES[rule].local_optimizer
    replayed = reference(rule, window, alpha_of(rule), functools.partial(KerasLocal, name), **options)
    np.testing.assert_array_equal(got, replayed, err_msg=f"{rule}: the exchange equations")
    restated = reference(rule, window, alpha_of(rule), functools.partial(NumpyLocal, name), **options)
    np.testing.assert_allclose(got, restated, rtol=0, atol=ATOL, err_msg=f"{rule}: {name}'s equations")
    assert np.abs(restated - initial()).max() > 100 * ATOL  # the local steps moved the centre measurably


# ---- the same through real shards --------------------------------------------------------

def run_worker(client: Client, rule_name: str, window: int, worker: int):
    rule = make_rule(rule_name, client, window=window, alpha=alpha_of(rule_name), round_timeout_s=30)
    local = KerasLocal(RULES[rule_name].local_optimizer)
    w = rule.start(None)
    X, y = data(worker)
    for block in range(STEPS // window):
        for t in range(block * window, (block + 1) * window):
            w = local(w, gradient(w, X, y, t))
        w = rule.step(w)
    return rule


def run_two_async(server, rule_name: str, overlap: bool = False):
    """Two workers through real shards, taking turns block by block (with overlap, each waits for its reply
    before the other trains, so the shards see the reference's order); returns (clients, rules)."""
    window = ASYNC_WINDOW
    clients = [Client(server.address) for _ in range(2)]
    for c in clients:
        c.join()
    assert clients[0].init(initial(), LAYOUT)
    assert not clients[1].init(initial(), LAYOUT)
    rules = [make_rule(rule_name, c, window=window, alpha=alpha_of(rule_name), overlap=overlap) for c in clients]
    local = [KerasLocal(RULES[rule_name].local_optimizer) for _ in clients]
    W = [r.start(None) for r in rules]
    datasets = [data(0), data(1)]
    for block in range(STEPS // window):
        for i in (0, 1):
            for t in range(block * window, (block + 1) * window):
                W[i] = local[i](W[i], gradient(W[i], *datasets[i], t))
            W[i] = rules[i].step(W[i])
            rules[i].wait()
    for i in (0, 1):
        rules[i].finish(W[i], unsent=False)
    return clients, rules


@pytest.mark.parametrize("rule_name", ["downpour", "adag", "dynsgd", "aeasgd", "eamsgd"])
def test_async_rule_equals_numpy(pserver, rule_name):
    server = pserver("--shards", "2", "--workers", "2", "--rule", rule_name)
    clients, rules = run_two_async(server, rule_name)
    check(rule_name, clients[0].pull(), reference_async, ASYNC_WINDOW)
    for r in rules:  # turns alternate: each exchange sees exactly the other worker's one push since its own
        assert r.staleness[1:] == [1] * (len(r.staleness) - 1), r.staleness
    for c in clients:
        c.close()


@pytest.mark.parametrize("rule_name", ["downpour", "adag", "dynsgd", "aeasgd", "eamsgd"])
def test_async_rule_with_overlap_equals_numpy(pserver, rule_name):
    """Overlap: each exchange is sent from the rule's background thread and its reply applied at the next one."""
    server = pserver("--shards", "2", "--workers", "2", "--rule", rule_name)
    clients, _ = run_two_async(server, rule_name, overlap=True)
    check(rule_name, clients[0].pull(), reference_async, ASYNC_WINDOW, overlap=True)
    without = reference_async(rule_name, ASYNC_WINDOW, alpha_of(rule_name),
                              functools.partial(NumpyLocal, RULES[rule_name].local_optimizer))
    assert np.abs(clients[0].pull() - without).max() > 100 * ATOL  # the late replies changed the trajectory
    for c in clients:
        c.close()


def test_overlap_changes_nothing_for_one_downpour_worker(pserver):
    """The degenerate case: alone, a DOWNPOUR worker's reply is the weights it sent (C + Δ = W_sent), so
    continuing from R + (W − W_sent) is continuing from W: the run is the one without overlap."""
    centres = []
    for overlap in (False, True):
        server = pserver("--shards", "2", "--workers", "1", "--rule", "downpour")
        client = Client(server.address)
        client.join()
        client.init(initial(), LAYOUT)
        rule = make_rule("downpour", client, window=ASYNC_WINDOW, overlap=overlap)
        local = KerasLocal(RULES["downpour"].local_optimizer)
        w = rule.start(None)
        X, y = data(0)
        for t in range(STEPS + 2):  # a last partial window: `finish` sends it
            w = local(w, gradient(w, X, y, t % STEPS))
            if (t + 1) % ASYNC_WINDOW == 0:
                w = rule.step(w)
        rule.finish(w, unsent=True)
        centres.append(client.pull())
        assert rule.exchanges == STEPS // ASYNC_WINDOW + 1
        client.close()
    # equal up to float32 rounding: C + (W_sent − C) is W_sent to within an ulp of C
    np.testing.assert_allclose(centres[1], centres[0], rtol=0, atol=ATOL)
    assert np.abs(centres[0] - initial()).max() > 100 * ATOL


def test_overlap_thread_ends_with_close_when_a_worker_stops_without_finish(pserver):
    """A worker that ends by an error never calls `finish`; its `finally` calls `close`, which ends the
    rule's background sender even with an exchange in flight."""
    server = pserver("--shards", "1", "--workers", "1", "--rule", "downpour")
    client = Client(server.address)
    client.join()
    client.init(initial(), LAYOUT)
    rule = make_rule("downpour", client, window=ASYNC_WINDOW, overlap=True)
    w = rule.start(None)
    rule.step(w + 1e-3)  # in flight
    sender = [t for t in threading.enumerate() if t.name.startswith("exchange")]
    assert sender, "the overlap thread did not start"
    rule.close()
    for t in sender:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in sender)
    client.close()


def test_eamsgd_local_steps_use_momentum_so_its_trajectory_is_not_aeasgds():
    eamsgd, aeasgd = RULES["eamsgd"].local_optimizer, RULES["aeasgd"].local_optimizer
    assert eamsgd in ("nadam", "nesterov"), f"EAMSGD's local steps should use Nesterov momentum, not {eamsgd!r}"
    assert eamsgd != aeasgd
    ours = reference_async("eamsgd", ASYNC_WINDOW, ALPHA, functools.partial(NumpyLocal, eamsgd))
    theirs = reference_async("aeasgd", ASYNC_WINDOW, ALPHA, functools.partial(NumpyLocal, aeasgd))
    assert np.abs(ours - theirs).max() > 100 * ATOL, np.abs(ours - theirs).max()


@pytest.mark.parametrize("rule_name", ["easgd", "averaging"])
def test_sync_rule_equals_numpy(pserver, rule_name):
    window = SYNC_WINDOW
    server = pserver("--shards", "2", "--workers", "2", "--rule", rule_name)
    clients = [Client(server.address) for _ in range(2)]
    for c in clients:
        c.join()
    clients[0].init(initial(), LAYOUT)
    clients[1].init(initial(), LAYOUT)
    errors = []

    def work(i):
        try:
            run_worker(clients[i], rule_name, window, i)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads), errors
    check(rule_name, clients[0].pull(), reference_sync, window)
    stats = clients[0].stats()
    assert [s["round"] for s in stats["shards"]] == [STEPS // window] * 2
    for c in clients:
        c.close()

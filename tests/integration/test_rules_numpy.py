"""Each rule, run through real shard processes, equals its numpy re-statement (DESIGN.md §4).

The problem is a linear least-squares model trained with plain SGD on a fixed
data order, so every local step is deterministic. Asynchronous rules run two
workers alternating in one process (a fixed interleaving, which the numpy
re-statement follows); synchronous rules run the two workers in threads,
since a round waits for both.
"""
import threading

import numpy as np
import pytest

from optimizers import make_rule, rule_config
from pserver.client import Client
from pserver.layout import Layout

pytestmark = pytest.mark.integration

FEATURES, BATCH, STEPS, LR = 13, 8, 24, np.float32(0.05)
LAYOUT = Layout.from_shapes([(FEATURES,), (1,)])  # weights and bias: 14 floats, over 2 shards


def data(worker: int):
    rng = np.random.default_rng(100 + worker)
    X = rng.standard_normal((STEPS * BATCH, FEATURES)).astype(np.float32)
    y = (X @ np.arange(FEATURES, dtype=np.float32) / FEATURES + 0.5).astype(np.float32)
    return X, y


def sgd_step(w: np.ndarray, X: np.ndarray, y: np.ndarray, t: int) -> np.ndarray:
    """One plain SGD step on batch t of least squares; float32 throughout."""
    xb, yb = X[t * BATCH:(t + 1) * BATCH], y[t * BATCH:(t + 1) * BATCH]
    err = xb @ w[:FEATURES] + w[FEATURES] - yb  # (batch,)
    grad = np.concatenate([xb.T @ err, [err.sum()]]).astype(np.float32) * np.float32(2 / BATCH)
    return (w - LR * grad).astype(np.float32)


def initial() -> np.ndarray:
    return np.random.default_rng(1).standard_normal(LAYOUT.total).astype(np.float32)


# ---- numpy re-statements of the table in DESIGN.md §4 --------------------------------------

def reference_async(rule: str, window: int, alpha: float) -> np.ndarray:
    C = initial()
    version = 0
    W = [C.copy(), C.copy()]
    pulled = [C.copy(), C.copy()]
    pulled_version = [0, 0]
    data_ = [data(0), data(1)]
    for block in range(STEPS // window):
        for i in (0, 1):  # the same interleaving as the test drives
            for t in range(block * window, (block + 1) * window):
                W[i] = sgd_step(W[i], *data_[i], t)
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
                W[i], pulled[i], pulled_version[i] = C.copy(), C.copy(), version
            else:  # aeasgd, eamsgd
                E = np.float32(alpha) * (W[i] - C)
                W[i] = W[i] - E
                C = C + E
                version += 1
    return C


def reference_sync(rule: str, window: int, alpha: float) -> np.ndarray:
    C = initial()
    W = [C.copy(), C.copy()]
    data_ = [data(0), data(1)]
    for block in range(STEPS // window):
        for i in (0, 1):
            for t in range(block * window, (block + 1) * window):
                W[i] = sgd_step(W[i], *data_[i], t)
        if rule == "easgd":
            E = [np.float32(alpha) * (W[i] - C) for i in (0, 1)]
            C = (C.astype(np.float64) + E[0].astype(np.float64) + E[1].astype(np.float64)).astype(np.float32)
            W = [W[i] - E[i] for i in (0, 1)]
        else:  # averaging
            C = ((W[0].astype(np.float64) + W[1].astype(np.float64)) * 0.5).astype(np.float32)
            W = [C.copy(), C.copy()]
    return C


# ---- the same through real shards --------------------------------------------------------

def run_worker(client: Client, rule_name: str, window: int, alpha: float, worker: int, barrier=None):
    rule = make_rule(rule_name, client, window=window, alpha=alpha, round_timeout_s=30)
    w = rule.start(None)
    X, y = data(worker)
    for block in range(STEPS // window):
        for t in range(block * window, (block + 1) * window):
            w = sgd_step(w, X, y, t)
        if barrier is not None:  # alternate: worker 0's exchange, then worker 1's
            barrier(worker, block)
        w = rule.step(w)
    return rule


@pytest.mark.parametrize("rule_name", ["downpour", "adag", "dynsgd", "aeasgd", "eamsgd"])
def test_async_rule_equals_numpy(pserver, rule_name):
    cfg = rule_config(rule_name, window=4, workers=2)
    server = pserver("--shards", "2", "--workers", "2", "--rule", rule_name)
    clients = [Client(server.address) for _ in range(2)]
    for c in clients:
        c.join()
    assert clients[0].init(initial(), LAYOUT)
    assert not clients[1].init(initial(), LAYOUT)
    rules = [make_rule(rule_name, c, window=cfg["window"], alpha=cfg["alpha"]) for c in clients]
    W = [r.start(None) for r in rules]
    datasets = [data(0), data(1)]
    for block in range(STEPS // cfg["window"]):
        for i in (0, 1):
            for t in range(block * cfg["window"], (block + 1) * cfg["window"]):
                W[i] = sgd_step(W[i], *datasets[i], t)
            W[i] = rules[i].step(W[i])
    expected = reference_async(rule_name, cfg["window"], cfg["alpha"])
    np.testing.assert_array_equal(clients[0].pull(), expected)
    for r in rules:  # turns alternate: each exchange sees exactly the other worker's one push since its own
        assert r.staleness[1:] == [1] * (len(r.staleness) - 1), r.staleness
    for c in clients:
        c.close()


@pytest.mark.parametrize("rule_name", ["easgd", "averaging"])
def test_sync_rule_equals_numpy(pserver, rule_name):
    window = 6
    cfg = rule_config(rule_name, window=window, workers=2)
    server = pserver("--shards", "2", "--workers", "2", "--rule", rule_name)
    clients = [Client(server.address) for _ in range(2)]
    for c in clients:
        c.join()
    clients[0].init(initial(), LAYOUT)
    clients[1].init(initial(), LAYOUT)
    errors = []

    def work(i):
        try:
            run_worker(clients[i], rule_name, window, cfg["alpha"], i)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    expected = reference_sync(rule_name, window, cfg["alpha"])
    np.testing.assert_array_equal(clients[0].pull(), expected)
    stats = clients[0].stats()
    assert [s["round"] for s in stats["shards"]] == [STEPS // window] * 2
    for c in clients:
        c.close()

"""One worker through the parameter server against a plain Keras loop, in one process, in turn.

    python -m bench.overhead_run --ps HOST:PORT --data DIR --threads 2 --hidden 64 --blocks 12

Two copies of the same model (same seed, data, batches and threads) train
block by block in turn: the plain one with `train_on_batch` alone, the other
doing exactly what `runner.worker` does around it — every λ steps flatten the
weights, let the rule (DOWNPOUR by default) push Δ and pull the centre, and
set the weights back. Prints one JSON line with each side's median samples/s
over the timed blocks (the first `--warmup` blocks of each are left out:
TensorFlow traces its functions there).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead_run")
    p.add_argument("--ps", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rule", default="downpour")
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--windows-per-block", type=int, default=2)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)

    from runner.worker import _apply_tf_threads, configure_threads

    configure_threads(args.threads)  # before TensorFlow is imported, as a worker does
    import numpy as np

    from models.dataset import load_dataset, split_indices
    from optimizers import make_rule
    from pserver.client import Client
    from pserver.layout import Layout, flatten, unflatten

    _apply_tf_threads(args.threads)
    from models.gru import ModelConfig, build_model, one_hot

    data = load_dataset(args.data)
    train = split_indices(len(data.y)).train
    cfg = ModelConfig(days=data.X.shape[1], features=data.X.shape[2], hidden=args.hidden, seed=0)
    plain, model = build_model(cfg), build_model(cfg)

    client = Client(args.ps)
    client.join("bench-overhead")
    weights = model.get_weights()
    layout = Layout.of(weights, [w.path for w in model.weights])
    client.init(flatten(weights), layout, model.to_json())
    rule = make_rule(args.rule, client, window=args.window)
    model.set_weights(unflatten(rule.start(flatten(weights)), layout))

    steps = args.window * args.windows_per_block
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(steps):  # the same batches, read the same way, for both sides
        rows = np.sort(rng.choice(train, args.batch_size, replace=False))
        batches.append(rows)

    def batch(rows):
        return np.asarray(data.X[rows], dtype=np.float32), one_hot(data.y[rows])  # (batch, days, features), (batch, 2)

    def plain_block() -> None:
        for rows in batches:
            plain.train_on_batch(*batch(rows))

    def ps_block() -> None:
        for s, rows in enumerate(batches, start=1):
            model.train_on_batch(*batch(rows))
            if s % args.window == 0:  # runner.worker's exchange, verbatim
                w = rule.step(flatten(model.get_weights()))
                model.set_weights(unflatten(w, layout))

    times: dict[str, list[float]] = {"keras": [], "ps": []}
    for b in range(args.warmup + args.blocks):
        sides = [("keras", plain_block), ("ps", ps_block)] if b % 2 == 0 else [("ps", ps_block), ("keras", plain_block)]
        for name, fn in sides:
            t = time.perf_counter()
            fn()
            if b >= args.warmup:
                times[name].append(time.perf_counter() - t)
    client.close()
    samples = steps * args.batch_size
    keras_s, ps_s = statistics.median(times["keras"]), statistics.median(times["ps"])
    print(json.dumps({"keras_samples_per_s": samples / keras_s, "ps_samples_per_s": samples / ps_s,
                      "ratio_vs_keras": keras_s / ps_s, "floats": layout.total, "exchanges": rule.exchanges,
                      "block_steps": steps, "blocks": args.blocks, "exchange_ms": (ps_s - keras_s) * 1e3 / args.windows_per_block}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One worker through the parameter server against a plain Keras loop, in one process, in turn.

    python -m bench.overhead_run --ps HOST:PORT --data DIR --threads 2 --hidden 64 --blocks 12 [--ps-overlap HOST:PORT]

Two copies of the same model (same seed, data, batches and threads) train
block by block in turn: the plain one with `train_on_batch` alone, the other
doing exactly what `runner.worker` does around it — every λ steps flatten the
weights, let the rule (DOWNPOUR by default) push Δ and pull the centre, and
set the weights back. With ``--ps-overlap``, a third copy does the same with
the rule's overlap (the exchange runs in the background beside the next
window) against a second server. Prints one JSON line with each side's median
samples/s over the timed blocks (the first `--warmup` blocks of each are left
out: TensorFlow traces its functions there); the sides take turns, in an
order that rotates every block.
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
    p.add_argument("--ps-overlap", default=None, help="a second server (one worker) for the overlapped copy")
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

    weights = model.get_weights()
    layout = Layout.of(weights, [w.path for w in model.weights])

    def joined(address: str, overlap: bool):
        client = Client(address)
        client.join("bench-overhead")
        client.init(flatten(weights), layout, model.to_json())
        return client, make_rule(args.rule, client, window=args.window, overlap=overlap)

    client, rule = joined(args.ps, overlap=False)
    model.set_weights(unflatten(rule.start(flatten(weights)), layout))
    sides = ["keras", "ps"]
    if args.ps_overlap:
        overlapped = build_model(cfg)
        client_ov, rule_ov = joined(args.ps_overlap, overlap=True)
        overlapped.set_weights(unflatten(rule_ov.start(flatten(weights)), layout))
        sides.append("overlap")

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

    def exchanging_block(m, r) -> None:
        for s, rows in enumerate(batches, start=1):
            m.train_on_batch(*batch(rows))
            if s % args.window == 0:  # runner.worker's exchange, verbatim
                w = r.step(flatten(m.get_weights()))
                m.set_weights(unflatten(w, layout))
        r.wait()  # an overlapped exchange still in flight belongs to this block's time

    blocks = {"keras": plain_block, "ps": lambda: exchanging_block(model, rule)}
    if args.ps_overlap:
        blocks["overlap"] = lambda: exchanging_block(overlapped, rule_ov)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for b in range(args.warmup + args.blocks):
        for name in sides[b % len(sides):] + sides[:b % len(sides)]:
            t = time.perf_counter()
            blocks[name]()
            if b >= args.warmup:
                times[name].append(time.perf_counter() - t)
    samples = steps * args.batch_size
    median = {name: statistics.median(ts) for name, ts in times.items()}
    result = {"keras_samples_per_s": samples / median["keras"], "ps_samples_per_s": samples / median["ps"],
              "ratio_vs_keras": median["keras"] / median["ps"], "floats": layout.total, "exchanges": rule.exchanges,
              "block_steps": steps, "blocks": args.blocks,
              "exchange_ms": (median["ps"] - median["keras"]) * 1e3 / args.windows_per_block}
    rule.finish(flatten(model.get_weights()), unsent=False)
    client.close()
    if args.ps_overlap:
        result.update(overlap_samples_per_s=samples / median["overlap"],
                      overlap_ratio_vs_keras=median["keras"] / median["overlap"],
                      overlap_gain=median["ps"] / median["overlap"])
        rule_ov.finish(flatten(overlapped.get_weights()), unsent=False)
        client_ov.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

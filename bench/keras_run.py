"""The plain-Keras baseline: one process, `train_on_batch` in a loop, no parameter server.

    python -m bench.keras_run --data DIR --out RUN --threads 2 --epochs 3 --hidden 64

What a data scientist would write without notpu, on the same data, split,
model, batches and local optimizer as a notpu worker (`runner.worker`). Like
notpu's evaluator it scores the validation split every `--eval-interval-s` and
appends {wall_s, samples, val_loss, val_auc} to RUN/history.jsonl (wall time
from `--started-at`, the moment the driver started this process, so start-up
counts on both sides); at the end it writes RUN/summary.json with the final
val and test AUC. Evaluation pauses training here, where notpu's evaluator
runs beside the workers on the same cores: both pay for it. Each history
line also carries `eval_s`, the evaluation time so far, so that a reader can
take it out and compare against a plain run that never evaluates.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.keras_run")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--eval-interval-s", type=float, default=3.0)
    p.add_argument("--started-at", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    started_at = args.started_at or time.time()

    from runner.worker import _apply_tf_threads, configure_threads

    configure_threads(args.threads)  # before TensorFlow is imported, as a worker does
    import numpy as np

    from models.dataset import load_dataset, split_indices
    from runner.evaluator import binary_metrics

    _apply_tf_threads(args.threads)
    from models.gru import ModelConfig, build_model, one_hot

    data = load_dataset(args.data)
    split = split_indices(len(data.y))
    model = build_model(ModelConfig(days=data.X.shape[1], features=data.X.shape[2], hidden=args.hidden,
                                    learning_rate=args.learning_rate, seed=args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    history = out / "history.jsonl"
    history.unlink(missing_ok=True)

    def score(rows):
        x = np.asarray(data.X[rows], dtype=np.float32)  # (rows, days, features)
        return model.predict(x, batch_size=1024, verbose=0)[:, 1]

    eval_s = [0.0]  # seconds spent evaluating so far: the wall time a free evaluator would save

    def evaluate(samples: int) -> dict:
        t = time.monotonic()
        loss, auc = binary_metrics(data.y[split.val], score(split.val))
        eval_s[0] += time.monotonic() - t
        line = {"wall_s": round(time.time() - started_at, 3), "samples": samples, "val_loss": round(loss, 6),
                "val_auc": round(auc, 6), "eval_s": round(eval_s[0], 3)}
        with open(history, "a") as f:
            f.write(json.dumps(line) + "\n")
        return line

    train = split.train
    steps_per_epoch = max(math.ceil(len(train) / args.batch_size), 1)
    rng = np.random.default_rng(args.seed * 1_000)
    samples = 0
    train_s = 0.0
    last_eval = time.monotonic()
    evaluate(0)
    for _ in range(args.epochs):
        order = rng.permutation(len(train))
        for s in range(steps_per_epoch):
            t = time.monotonic()
            take = order[np.arange(s * args.batch_size, (s + 1) * args.batch_size) % len(order)]
            rows = np.sort(train[take])  # sorted: the memory map reads forward
            xb = np.asarray(data.X[rows], dtype=np.float32)  # (batch, days, features)
            model.train_on_batch(xb, one_hot(data.y[rows]))
            samples += len(rows)
            now = time.monotonic()
            train_s += now - t
            if now - last_eval >= args.eval_interval_s:
                evaluate(samples)
                last_eval = time.monotonic()
    wall_s = time.time() - started_at
    val_loss, val_auc = binary_metrics(data.y[split.val], score(split.val))
    _, test_auc = binary_metrics(data.y[split.test], score(split.test))
    with open(history, "a") as f:
        f.write(json.dumps({"wall_s": round(wall_s, 3), "samples": samples, "val_loss": round(val_loss, 6),
                            "val_auc": round(val_auc, 6), "eval_s": round(eval_s[0], 3)}) + "\n")
    summary = {"rule": "keras", "workers": 1, "threads": args.threads, "epochs": args.epochs, "hidden": args.hidden,
               "batch_size": args.batch_size, "wall_s": round(wall_s, 3), "train_s": round(train_s, 3),
               "samples": samples, "samples_per_s": round(samples / train_s, 2) if train_s else 0.0,
               "eval_s": round(eval_s[0], 3),
               "val_auc": round(val_auc, 6), "test_auc": round(test_auc, 6)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`notpu baseline`: the talk's classical approach, hand-made aggregates + gradient boosting.

From the tensor X we rebuild what a data scientist would compute in SQL: for
the last 7, 14, 30 and all days, per type, count / sum / min / max / mean, plus
active steps per period and days since the last activity. When X has steps of
N days (`prepare --bucket-days N`), a period is the whole steps that fit in it
(30 days of weekly steps: the last 4 weeks), and the days since the last
activity are given twice: in whole steps, from X, and day by day, from
DIR/active.npy: with both, the baseline scores as well on weekly steps as on daily
ones (bench/RESULTS.md, "Why the defaults are what they are"). LightGBM learns
on the same train/val/test split as the GRU (`models.dataset.split_indices`),
stops early on validation AUC, and its test AUC is the line the GRU must beat.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.dataset import load_dataset, split_indices
from models.features import AGGREGATIONS, BLOCK_ROWS, signed_expm1
from pserver.fileio import atomic_write_text
from models.errors import DataError

log = logging.getLogger(__name__)

PERIODS_DAYS = (7, 14, 30, None)  # None = the whole observation window


@dataclass(frozen=True)
class BaselineConfig:
    data_dir: str
    n_jobs: int = 0  # 0 = all cores
    learning_rate: float = 0.05
    max_rounds: int = 2000
    early_stopping_rounds: int = 50  # rounds without a better val AUC before stopping
    seed: int = 0


def period_features(x_block: np.ndarray, n_types: int, bucket_days: int = 1,
                    active_days: np.ndarray | None = None) -> np.ndarray:
    """(b, steps, types*5) log-scaled features, a step being `bucket_days` days -> (b, n_period_features) float32.

    ``active_days`` (b, days) bool: activity per day. With steps of several
    days it adds the days since the last active day to the steps since the
    last active step.
    """
    b, steps, _ = x_block.shape
    raw = signed_expm1(x_block.astype(np.float64)).reshape(b, steps, n_types, len(AGGREGATIONS))  # (b, S, T, 5)
    cnt = np.rint(raw[..., 0])
    has = cnt > 0
    step_active = has.any(axis=2)  # (b, S)
    out = []
    for period in sorted({min(max((p or steps * bucket_days) // bucket_days, 1), steps) for p in PERIODS_DAYS}):
        sl = slice(steps - period, steps)
        c = cnt[:, sl].sum(axis=1)  # (b, T)
        s = raw[:, sl, :, 1].sum(axis=1)
        mn = np.where(has[:, sl], raw[:, sl, :, 2], np.inf).min(axis=1)
        mx = np.where(has[:, sl], raw[:, sl, :, 3], -np.inf).max(axis=1)
        mn[~np.isfinite(mn)] = 0.0
        mx[~np.isfinite(mx)] = 0.0
        # The daily tensor does not keep how many events had a value, so the mean is per event.
        mean = np.where(c > 0, s / np.maximum(c, 1), 0.0)
        out += [c, s, mn, mx, mean, step_active[:, sl].sum(axis=1, keepdims=True)]
    out.append(_since_last(step_active) * bucket_days)  # days since the last active step
    if active_days is not None and bucket_days > 1:
        out.append(_since_last(np.asarray(active_days, bool)))  # days since the last active day
    return np.concatenate(out, axis=1).astype(np.float32)


def _since_last(active: np.ndarray) -> np.ndarray:
    """(b, n) bool -> (b, 1) float64: entries since the last True (0: the last one), n if none."""
    last = np.where(active.any(axis=1), np.argmax(active[:, ::-1], axis=1), active.shape[1])
    return last[:, None].astype(np.float64)


def baseline(cfg: BaselineConfig) -> dict:
    """Train LightGBM on period aggregates; write and return DIR/baseline.json."""
    import lightgbm as lgb
    from sklearn.metrics import roc_auc_score

    ds = load_dataset(cfg.data_dir)
    n_types = len(ds.spec.get("types", [])) or ds.X.shape[2] // len(AGGREGATIONS)
    if n_types * len(AGGREGATIONS) != ds.X.shape[2]:
        raise DataError(f"{cfg.data_dir}/spec.json: {n_types} types do not match X's {ds.X.shape[2]} features; re-run prepare")
    t0 = time.perf_counter()
    bucket = int(ds.spec.get("window", {}).get("bucket_days", 1))
    feats = np.concatenate([period_features(ds.X[i:i + BLOCK_ROWS], n_types, bucket,
                                            None if ds.active is None else ds.active[i:i + BLOCK_ROWS])
                            for i in range(0, len(ds.y), BLOCK_ROWS)])
    split = split_indices(len(ds.y))
    y = ds.y.astype(np.int32)
    for name, idx in (("train", split.train), ("val", split.val), ("test", split.test)):
        if np.unique(y[idx]).size < 2:
            raise DataError(f"{cfg.data_dir}: the {name} split has one class only; prepare more customers")
    n_jobs = cfg.n_jobs or os.cpu_count() or 1
    params = {
        "objective": "binary", "metric": "auc", "learning_rate": cfg.learning_rate, "num_leaves": 31,
        "min_data_in_leaf": 20, "bagging_fraction": 0.8, "bagging_freq": 1, "feature_fraction": 0.5,
        "num_threads": n_jobs, "seed": cfg.seed, "verbosity": -1,
    }
    train_set = lgb.Dataset(feats[split.train], y[split.train])
    val_set = lgb.Dataset(feats[split.val], y[split.val], reference=train_set)
    model = lgb.train(params, train_set, num_boost_round=cfg.max_rounds, valid_sets=[val_set],
                      callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)])
    val_auc = roc_auc_score(y[split.val], model.predict(feats[split.val], num_iteration=model.best_iteration))
    test_auc = roc_auc_score(y[split.test], model.predict(feats[split.test], num_iteration=model.best_iteration))
    result = {
        "model": "lightgbm", "test_auc": round(float(test_auc), 6), "val_auc": round(float(val_auc), 6),
        "best_iteration": int(model.best_iteration or cfg.max_rounds), "n_features": int(feats.shape[1]),
        "periods_days": [p or ds.X.shape[1] * bucket for p in PERIODS_DAYS], "bucket_days": bucket, "n_jobs": n_jobs,
        "customers": {"train": int(split.train.size), "val": int(split.val.size), "test": int(split.test.size)},
        "fit_s": round(time.perf_counter() - t0, 2),
    }
    atomic_write_text(Path(cfg.data_dir) / "baseline.json", json.dumps(result, indent=2) + "\n")
    log.info("baseline: %d features, %d rounds, val AUC %.4f, test AUC %.4f",
             feats.shape[1], result["best_iteration"], val_auc, test_auc)
    return result

"""Small learnable data sets in the shape `notpu prepare` writes, for training tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_fading(directory: Path, customers: int = 800, days: int = 10, features: int = 4, seed: int = 0) -> Path:
    """Churners are those whose activity (feature 0) fades over the window.

    Totals carry little of it: the label depends on the slope of feature 0,
    which a GRU sees day by day. An untrained model scores near chance.
    """
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((customers, days, features)).astype(np.float32)  # (customers, days, features)
    slope = rng.standard_normal(customers).astype(np.float32)
    X[:, :, 0] += slope[:, None] * np.linspace(-1.5, 1.5, days, dtype=np.float32)[None, :]
    y = (slope < 0).astype(np.int8)  # fading activity → churn
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "X.npy", X)
    np.save(directory / "y.npy", y)
    np.save(directory / "ids.npy", np.array([f"c{i:05d}" for i in range(customers)]))
    (directory / "spec.json").write_text(json.dumps({"synthetic": "fading", "customers": customers}))
    return directory

"""The parts layout and the cell aggregation `--engine spark` relies on, without Spark."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.dataset import (load_dataset, load_part, num_parts, part_dir, split_indices, write_part,
                            write_parts_index)
from models.errors import DataError
from models.events import DAY_S
from models.features import DailyAggregator, Window


@pytest.mark.parametrize("bucket_days", [1, 7])
def test_cells_per_day_fold_into_the_same_steps_as_events(bucket_days: int) -> None:
    rng = np.random.default_rng(0)
    n, days, types = 5_000, 60, 4
    window = Window(start_s=1_700_000_000, days=days, bucket_days=bucket_days)
    ts = window.start_s + rng.integers(0, days * DAY_S, n)
    cust_ids = rng.integers(0, 30, n).astype(str)
    t = rng.integers(0, types, n)
    v = np.where(rng.random(n) < 0.1, np.nan, rng.normal(0, 100, n))

    by_event = DailyAggregator(window, types)
    codes, uniques = pd.factorize(cust_ids)
    by_event.add(by_event.encode(codes, uniques, np.ones(n, bool)), ts, t, v)

    # What the Spark SQL pass hands a part: one row per (customer, day, type).
    df = pd.DataFrame({"id": cust_ids, "day": (ts - window.start_s) // DAY_S, "t": t, "v": v})
    g = df.groupby(["id", "day", "t"])["v"]
    cells = pd.DataFrame({"n": g.size(), "nval": g.count(), "total": g.sum(), "low": g.min().fillna(np.inf),
                          "high": g.max().fillna(-np.inf)}).reset_index()
    by_cell = DailyAggregator(window, types)
    codes, uniques = pd.factorize(cells["id"].to_numpy())
    cust = by_cell.encode(codes, np.asarray(uniques, dtype=object), np.ones(len(cells), bool))
    by_cell.add_cells(cust, cells["day"].to_numpy(), cells["t"].to_numpy(), cells["n"].to_numpy(),
                      cells["nval"].to_numpy(), cells["total"].to_numpy(), cells["low"].to_numpy(),
                      cells["high"].to_numpy())

    order_e, order_c = np.argsort(by_event.ids()), np.argsort(by_cell.ids())
    np.testing.assert_array_equal(by_event.ids()[order_e], by_cell.ids()[order_c])
    np.testing.assert_allclose(by_cell.block(order_c), by_event.block(order_e), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(by_cell.active[order_c], by_event.active[order_e])


def write_in_parts(d: Path, X: np.ndarray, y: np.ndarray, ids: np.ndarray, bounds: list[int]) -> None:
    rows = []
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        write_part(part_dir(d, k), iter([X[a:b]]) if b > a else iter(()), (b - a, *X.shape[1:]), y[a:b], ids[a:b],
                   np.ones((b - a, 3), bool))
        rows.append(b - a)
    write_parts_index(d, rows)


def test_parts_end_to_end_are_the_whole_and_tile_its_split(tmp_path: Path) -> None:
    n = 103
    X = np.random.default_rng(1).random((n, 3, 5)).astype(np.float32)  # (customers, steps, features)
    y = (np.arange(n) % 3 == 0).astype(np.int8)
    ids = np.array([f"c{i:04d}" for i in range(n)])
    write_in_parts(tmp_path, X, y, ids, [0, 40, 40, 77, n])  # part 1 is empty

    assert num_parts(tmp_path) == 4
    whole = load_dataset(tmp_path)
    np.testing.assert_array_equal(whole.X, X)
    np.testing.assert_array_equal(whole.ids, ids)
    split = split_indices(n)
    parts = [load_part(tmp_path, k) for k in range(4)]
    assert [p.start for p in parts] == [0, 40, 40, 77] and all(p.customers == n for p in parts)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(np.concatenate([getattr(p.split(), name) + p.start for p in parts]),
                                      getattr(split, name))
    np.testing.assert_array_equal(parts[2].X, X[40:77])


def test_one_file_dir_is_one_part_and_bad_parts_are_named(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    np.save(one / "X.npy", np.zeros((6, 2, 5), np.float32))
    np.save(one / "y.npy", np.array([0, 1, 0, 1, 0, 1], np.int8))
    assert num_parts(one) == 1 and load_part(one, 0).start == 0
    with pytest.raises(DataError, match="one-file layout"):
        load_part(one, 1)

    parted = tmp_path / "parted"
    (parted / "parts").mkdir(parents=True)
    with pytest.raises(DataError, match=r"parts/index.json: missing \(an interrupted prepare\?\)"):
        load_dataset(parted)
    ids = np.array(["b", "a"])  # descending: not the one-file layout's order
    write_in_parts(parted, np.zeros((2, 2, 5), np.float32), np.zeros(2, np.int8), ids, [0, 1, 2])
    with pytest.raises(DataError, match="not in ascending order"):
        load_dataset(parted)

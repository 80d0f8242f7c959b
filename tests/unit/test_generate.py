"""The Vikings generator: seeded, well-formed, and its churners fade in time, not in totals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from models.features import signed_expm1
from models.generate import EVENT_TYPES, GeneratorConfig, generate_events, write_events
from models.prepare import PrepareConfig, prepare


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate_events(GeneratorConfig(players=300, seed=7))


def test_same_seed_same_log_other_seed_other_log(table: pa.Table) -> None:
    assert generate_events(GeneratorConfig(players=300, seed=7)).equals(table)
    assert not generate_events(GeneratorConfig(players=300, seed=8)).equals(table)


def test_columns_types_and_values(table: pa.Table) -> None:
    assert table.column_names == ["id", "timestamp", "event_type", "event_value"]
    assert table.schema.field("timestamp").type == pa.int64()
    assert table.schema.field("event_value").type == pa.float64()
    ts = table["timestamp"].to_numpy()
    assert (np.diff(ts) >= 0).all()  # sorted by time
    days = (ts.max() - ts.min()) / 86_400
    assert 110 < days <= 111  # 90 observation + 21 label days
    types = table["event_type"].cast(pa.string())
    assert set(pc.unique(types).to_pylist()) <= set(EVENT_TYPES)
    connect = table.filter(pc.equal(types, "connect"))
    assert connect["event_value"].null_count == connect.num_rows  # meaningless -> missing
    buys = table.filter(pc.equal(types, "purchase"))["event_value"].to_numpy()
    assert (buys > 0).all() and buys.max() / np.median(buys) > 20  # heavy-tailed spending
    assert pc.count_distinct(table["id"].cast(pa.string())).as_py() <= 300


def _connects(out: Path, days: slice) -> tuple[np.ndarray, np.ndarray]:
    X, y = np.load(out / "X.npy"), np.load(out / "y.npy")
    col = json.loads((out / "spec.json").read_text())["types"].index("connect") * 5  # connect:count
    per_customer = np.rint(signed_expm1(X[:, days, col])).sum(axis=1)
    return per_customer[y == 1].mean(), per_customer[y == 0].mean()


@pytest.mark.parametrize("signal", [1.0, 0.0])
def test_churners_fade_in_the_last_weeks_not_in_totals(tmp_path: Path, signal: float) -> None:
    events = write_events(generate_events(GeneratorConfig(players=800, seed=3, signal=signal)), tmp_path / "ev.parquet")
    spec = prepare(PrepareConfig(events=str(events), out=str(tmp_path / "d")))
    assert 0.22 <= spec["counts"]["churn_rate"] <= 0.38
    churn_total, stay_total = _connects(tmp_path / "d", slice(None))
    churn_last, stay_last = _connects(tmp_path / "d", slice(-14, None))
    assert 0.8 < churn_total / stay_total < 1.25  # 90-day totals barely differ
    if signal:
        assert churn_last / stay_last < 0.6  # ... but the last two weeks do
    else:
        assert churn_last / stay_last > 0.85  # no signal: churners look like everyone else


def test_csv_and_parquet_hold_the_same_events(tmp_path: Path, table: pa.Table) -> None:
    a = prepare(PrepareConfig(events=str(write_events(table, tmp_path / "e.csv")), out=str(tmp_path / "a")))
    b = prepare(PrepareConfig(events=str(write_events(table, tmp_path / "e.parquet")), out=str(tmp_path / "b")))
    assert a["counts"] == b["counts"]
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "X.npy"), np.load(tmp_path / "b" / "X.npy"))

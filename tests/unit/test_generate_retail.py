"""The retail generator: seeded, well-formed, sparse like a real purchase log, and prepare takes it as it comes."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from models.events import DAY_S
from models.generate import START_UNIX_S, write_events
from models.generate_retail import EVENT_TYPES, RetailConfig, generate_retail_events
from models.prepare import PrepareConfig, prepare
from models.errors import DataError
from runner.cli import main

OBS, LABEL = 273, 273


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate_retail_events(RetailConfig(customers=1000, seed=7))


@pytest.fixture(scope="module")
def frame(table: pa.Table) -> pd.DataFrame:
    df = table.to_pandas()
    df["day"] = (df["timestamp"] - START_UNIX_S) // DAY_S
    return df


def test_same_seed_same_log_other_seed_other_log(table: pa.Table) -> None:
    assert generate_retail_events(RetailConfig(customers=1000, seed=7)).equals(table)
    assert not generate_retail_events(RetailConfig(customers=1000, seed=8)).equals(table)


def test_columns_types_and_values(table: pa.Table, frame: pd.DataFrame) -> None:
    assert table.column_names == ["id", "timestamp", "event_type", "event_value"]
    assert table.schema.field("id").type == pa.dictionary(pa.int32(), pa.string())
    assert table.schema.field("timestamp").type == pa.int64()
    assert table.schema.field("event_type").type == pa.dictionary(pa.int32(), pa.string())
    assert table.schema.field("event_value").type == pa.float64()
    ts = table["timestamp"].to_numpy()
    assert (np.diff(ts) >= 0).all()  # sorted by time
    assert ts.min() >= START_UNIX_S and ts.max() < START_UNIX_S + (OBS + LABEL) * DAY_S
    assert set(pc.unique(table["event_type"].cast(pa.string())).to_pylist()) == set(EVENT_TYPES)
    assert frame["id"].nunique() == 1000  # `customers` counts customers in the log
    value = frame.groupby("event_type", observed=True)["event_value"]
    assert value.min()["purchase"] > 0 and value.min()["return"] > 0 and value.min()["visit"] >= 1
    assert frame.loc[frame["event_type"] == "email_open", "event_value"].isna().all()  # no number -> missing
    buys = frame.loc[frame["event_type"] == "purchase", "event_value"]
    assert 20 < buys.mean() < 60 and buys.max() / buys.median() > 5  # CDNOW-like baskets, heavy-tailed
    # Every purchase happens inside a visit: at least as many visits as purchases, per customer.
    per = frame.groupby(["id", "event_type"], observed=True).size().unstack(fill_value=0)
    assert (per["visit"] >= per["purchase"]).all()


def test_customer_days_are_sparse_and_most_customers_buy_a_few_times(frame: pd.DataFrame) -> None:
    obs = frame[frame["day"] < OBS]
    cells = obs.groupby("id", observed=True)["day"].nunique()  # active days of customers seen in the window
    empty = 1 - cells.sum() / (cells.size * OBS)
    assert empty > 0.98  # CDNOW: ~99.5% of customer-days hold no purchase
    buys = frame[frame["event_type"] == "purchase"].groupby("id", observed=True).size()
    buys = buys.reindex(frame["id"].unique(), fill_value=0)
    assert buys.median() <= 2 and (buys <= 5).mean() > 0.85
    assert buys.max() >= 10  # ... and a few buy often


def test_prepare_with_the_retail_flags_yields_both_labels(tmp_path: Path, table: pa.Table, frame: pd.DataFrame) -> None:
    events = write_events(table, tmp_path / "events.parquet")
    spec = prepare(PrepareConfig(events=str(events), out=str(tmp_path / "d"), session_type="purchase", min_sessions=1,
                                 observation_days=OBS, label_days=LABEL, min_active_days=0))
    y = np.load(tmp_path / "d" / "y.npy")
    assert set(np.unique(y)) == {0, 1}
    # A 273-day window gets weekly steps by default: 39 of them.
    assert spec["window"]["bucket_days"] == 7 and spec["window"]["steps"] == OBS // 7
    assert np.load(tmp_path / "d" / "X.npy", mmap_mode="r").shape[:2] == (y.size, OBS // 7)
    last_day = frame["day"].max()
    assert spec["window"]["cutoff_s"] == START_UNIX_S + (last_day + 1 - LABEL) * DAY_S
    # Customers acquired after the cut-off have no event to score them on: left out.
    first_day = frame.groupby("id", observed=True)["day"].min()
    assert spec["counts"]["customers_kept"] == (first_day < last_day + 1 - LABEL).sum() < 1000
    bought = frame[(frame["event_type"] == "purchase") & (frame["day"] < last_day + 1 - LABEL)]["id"].unique()
    churn_of_buyers = y[np.isin(np.load(tmp_path / "d" / "ids.npy"), bought.astype(str))].mean()
    assert 0.4 < churn_of_buyers < 0.8


def test_twenty_thousand_customers_in_seconds() -> None:
    t0 = time.perf_counter()
    big = generate_retail_events(RetailConfig(customers=20_000, seed=7))
    assert time.perf_counter() - t0 < 5.0
    assert pc.count_distinct(big["id"].cast(pa.string())).as_py() == 20_000


def test_bad_config_is_refused() -> None:
    with pytest.raises(DataError, match="--players 0: must be at least 1"):
        generate_retail_events(RetailConfig(customers=0))
    with pytest.raises(DataError, match="--observation-days -3"):
        generate_retail_events(RetailConfig(customers=10, days=-3))
    with pytest.raises(DataError, match="Beta parameters must be positive"):
        generate_retail_events(RetailConfig(customers=10, a=0.0))


def test_cli_refuses_mmo_options_for_retail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "events.csv"
    assert main(["generate", "--kind", "retail", "--players", "50", "--signal", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("notpu generate: error: --signal applies to --kind mmo only") and not out.exists()
    assert main(["generate", "--kind", "retail", "--players", "50", "--churn-rate", "0.3", "--out", str(out)]) == 2
    assert "--churn-rate applies to --kind mmo only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--kind", "shop", "--players", "50", "--out", str(out)])
    assert "invalid choice: 'shop'" in capsys.readouterr().err


def test_cli_writes_retail_csv_and_maps_days(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "events.csv"
    args = ["generate", "--kind", "retail", "--players", "200", "--observation-days", "100", "--seed", "3", "--out", str(out)]
    assert main(args) == 0
    assert "of 200 customers over 100+273 days" in capsys.readouterr().out
    df = pd.read_csv(out)
    assert list(df.columns) == ["id", "timestamp", "event_type", "event_value"]
    assert df["id"].nunique() == 200 and df["timestamp"].max() < START_UNIX_S + (100 + 273) * DAY_S

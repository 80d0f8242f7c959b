"""prepare's aggregation checked by hand on a tiny log, in several timestamp formats."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.features import signed_log1p
from models.prepare import PrepareConfig, prepare

# cut-off 2024-01-10, 3 observation days [01-07, 01-10), 2 label days [01-10, 01-12).
# Timestamps in several ISO forms and offsets; the comment gives the UTC day index.
EVENTS = [
    ("a", "2024-01-06T23:59:59Z", "connect", None),         # before the window: ignored
    ("a", "2024-01-07T00:00:00Z", "connect", None),         # first second of day 0
    ("a", "2024-01-07T05:00:00+02:00", "purchase", 10.0),   # 03:00Z, day 0
    ("a", "2024-01-07T01:00:00.500-01:00", "purchase", 20.0),  # 02:00:00.5Z, day 0
    ("a", "2024-01-08 01:00:00", "purchase", 2.5),           # no offset = UTC, day 1
    ("a", "2024-01-08T23:59:59Z", "purchase", None),        # counted, no value, day 1
    ("a", "2024-01-09T23:59:59+00:00", "battle", -5.0),     # last second of day 2
    ("a", "2024-01-10T00:00:00Z", "connect", None),         # first second of the label window
    ("a", "2024-01-11T23:59:59Z", "connect", None),         # last second of the label window
    ("a", "2024-01-12T05:00:00Z", "connect", None),         # after the label window; the log's last event
    ("b", "2024-01-08T10:00:00Z", "battle", 3.0),           # day 1
    ("b", "2024-01-09T12:00:00-05:00", "connect", None),    # 17:00Z, day 2
    ("b", "2024-01-10T10:00:00+09:00", "connect", None),    # 01:00Z on 01-10: label window
    ("b", "2024-01-12T00:00:00Z", "connect", None),         # just after the label window
    ("c", "2024-01-08T06:00:00Z", "trade", -1.0),           # one active day only: a newcomer
]
OPTS = dict(cutoff="2024-01-10", observation_days=3, label_days=2, min_active_days=2, max_types=3)


def _frame() -> pd.DataFrame:
    df = pd.DataFrame(EVENTS, columns=["id", "timestamp", "event_type", "event_value"])
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601")
    return df


def unix_s(ts: pd.Series) -> pd.Series:
    return (ts - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)


def write_log(tmp_path: Path, fmt: str) -> Path:
    """The same events as ISO text (CSV), unix seconds (CSV, Parquet) or a tz-aware Parquet timestamp."""
    df = _frame()
    if fmt == "iso_csv":
        path = tmp_path / "events.csv"
        raw = pd.DataFrame(EVENTS, columns=df.columns)
        raw.to_csv(path, index=False)
        return path
    if fmt == "unix_csv":
        df["timestamp"] = unix_s(df["timestamp"])
        path = tmp_path / "events.csv"
        df.to_csv(path, index=False)
        return path
    if fmt == "unix_parquet":
        df["timestamp"] = unix_s(df["timestamp"])
    elif fmt == "tokyo_parquet":
        df["timestamp"] = df["timestamp"].dt.tz_convert("Asia/Tokyo")
    path = tmp_path / "events.parquet"
    df.to_parquet(path, index=False)
    return path


def expected_x() -> np.ndarray:
    """By hand: types [purchase, battle, other]; per type (count, sum, min, max, mean)."""
    x = np.zeros((2, 3, 3, 5), np.float32)  # (customers a,b; days; types; aggregations)
    x[0, 0, 0] = [2, 30, 10, 20, 15]    # a, day 0, purchase 10 and 20
    x[0, 0, 2] = [1, 0, 0, 0, 0]        # a, day 0, connect (folded into other), no value
    x[0, 1, 0] = [2, 2.5, 2.5, 2.5, 2.5]  # a, day 1, purchase 2.5 and an empty value
    x[0, 2, 1] = [1, -5, -5, -5, -5]    # a, day 2, battle
    x[1, 1, 1] = [1, 3, 3, 3, 3]        # b, day 1, battle
    x[1, 2, 2] = [1, 0, 0, 0, 0]        # b, day 2, connect -> other
    return signed_log1p(x.reshape(2, 3, 15))


@pytest.mark.parametrize("fmt", ["iso_csv", "unix_csv", "unix_parquet", "tokyo_parquet"])
def test_aggregates_by_hand(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "data"
    prepare(PrepareConfig(events=str(write_log(tmp_path, fmt)), out=str(out), **OPTS))
    X = np.load(out / "X.npy")
    assert X.dtype == np.float32 and X.shape == (2, 3, 15)
    np.testing.assert_allclose(X, expected_x(), rtol=1e-6, atol=1e-7)
    ids = np.load(out / "ids.npy", allow_pickle=False)
    assert ids.dtype.kind == "U" and list(ids) == ["a", "b"]
    # a: 2 connects in [cut-off, +2 days) -> stays; b: 1 (the 01-12 one is outside) -> churns.
    y = np.load(out / "y.npy")
    assert y.dtype == np.int8 and list(y) == [0, 1]


def expected_buckets(bucket_days: int) -> np.ndarray:
    """By hand, steps of `bucket_days` over the 3 days; the oldest step is the short one."""
    if bucket_days == 3:  # one step: days 0-2
        x = np.zeros((2, 1, 3, 5), np.float32)
        # a's purchases 10, 20, 2.5 and one without a value: the mean is over the 3 values (10.83), not the mean
        # of the daily means (8.75), and min/max run over the whole step.
        x[0, 0, 0] = [4, 32.5, 2.5, 20, 32.5 / 3]
        x[0, 0, 1] = [1, -5, -5, -5, -5]
        x[0, 0, 2] = [1, 0, 0, 0, 0]
        x[1, 0, 1] = [1, 3, 3, 3, 3]
        x[1, 0, 2] = [1, 0, 0, 0, 0]
    else:  # bucket_days == 2: step 0 = day 0 alone, step 1 = days 1 and 2 (aligned to the cut-off)
        x = np.zeros((2, 2, 3, 5), np.float32)
        x[0, 0, 0] = [2, 30, 10, 20, 15]
        x[0, 0, 2] = [1, 0, 0, 0, 0]
        x[0, 1, 0] = [2, 2.5, 2.5, 2.5, 2.5]
        x[0, 1, 1] = [1, -5, -5, -5, -5]
        x[1, 1, 1] = [1, 3, 3, 3, 3]
        x[1, 1, 2] = [1, 0, 0, 0, 0]
    return signed_log1p(x.reshape(2, -1, 15))


@pytest.mark.parametrize("bucket_days", [2, 3])
def test_buckets_aggregate_the_raw_events(tmp_path: Path, bucket_days: int) -> None:
    out = tmp_path / "data"
    spec = prepare(PrepareConfig(events=str(write_log(tmp_path, "unix_parquet")), out=str(out),
                                 bucket_days=bucket_days, **OPTS))
    X = np.load(out / "X.npy")
    np.testing.assert_allclose(X, expected_buckets(bucket_days), rtol=1e-6, atol=1e-7)
    # The newcomer filter still counts days, not steps: c (one active day) is left out in one step of 3 days too.
    assert list(np.load(out / "ids.npy")) == ["a", "b"] and list(np.load(out / "y.npy")) == [0, 1]
    w = spec["window"]
    assert (w["bucket_days"], w["steps"], w["first_step_days"]) == {2: (2, 2, 1), 3: (3, 1, 3)}[bucket_days]


def test_bucket_days_is_checked(tmp_path: Path) -> None:
    from models.errors import DataError

    for bad, why in ((0, "must be at least 1"), (4, "longer than the 3-day observation window")):
        with pytest.raises(DataError, match=why):
            prepare(PrepareConfig(events=str(write_log(tmp_path, "iso_csv")), out=str(tmp_path / "d"),
                                  bucket_days=bad, **OPTS))
    assert not (tmp_path / "d").exists()


def test_spec_records_window_types_and_counts(tmp_path: Path) -> None:
    out = tmp_path / "data"
    prepare(PrepareConfig(events=str(write_log(tmp_path, "iso_csv")), out=str(out), **OPTS))
    spec = json.loads((out / "spec.json").read_text())
    # purchase (4 events) first; battle and connect tie at 2: the name breaks the tie.
    assert spec["types"] == ["purchase", "battle", "other"]
    assert spec["features"][:6] == ["purchase:count", "purchase:sum", "purchase:min", "purchase:max", "purchase:mean", "battle:count"]
    assert spec["window"]["start"] == "2024-01-07T00:00:00Z" and spec["window"]["cutoff"] == "2024-01-10T00:00:00Z"
    assert spec["label"]["end"] == "2024-01-12T00:00:00Z"
    assert spec["counts"] == {"events_read": len(EVENTS), "customers_seen": 3, "customers_kept": 2,
                              "customers_dropped_newcomers": 1, "churn_rate": 0.5}
    assert spec["scaling"]["name"] == "signed_log1p"


def test_default_cutoff_is_label_days_before_the_end_of_the_last_day(tmp_path: Path) -> None:
    out = tmp_path / "data"
    # Last event 2024-01-12T05:00:00Z -> log ends 2024-01-13 -> cut-off 2024-01-11 for 2 label days.
    opts = {**OPTS, "cutoff": None}
    spec = prepare(PrepareConfig(events=str(write_log(tmp_path, "unix_parquet")), out=str(out), **opts))
    assert spec["window"]["cutoff"] == "2024-01-11T00:00:00Z"
    assert spec["window"]["start"] == "2024-01-08T00:00:00Z"
    # a: connects on 01-11 and 01-12 -> stays; b: only 01-12 -> churns; c: one active day -> left out.
    assert list(np.load(out / "ids.npy")) == ["a", "b"] and list(np.load(out / "y.npy")) == [0, 1]


def test_max_types_folds_rare_types_into_other(tmp_path: Path) -> None:
    out = tmp_path / "data"
    spec = prepare(PrepareConfig(events=str(write_log(tmp_path, "iso_csv")), out=str(out), **{**OPTS, "max_types": 2}))
    assert spec["types"] == ["purchase", "other"]
    X = np.load(out / "X.npy")
    # a's battle on day 2 now lands in 'other'.
    np.testing.assert_allclose(X[0, 2, 5:10], signed_log1p(np.array([1, -5, -5, -5, -5], np.float32)), rtol=1e-6)

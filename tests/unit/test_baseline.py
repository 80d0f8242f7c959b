"""The boosting baseline: period aggregates by hand, and an end-to-end run on generated data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models.baseline import BaselineConfig, baseline, period_features
from models.features import signed_log1p
from models.generate import GeneratorConfig, generate_events, write_events
from models.prepare import PrepareConfig, prepare


def test_period_features_by_hand() -> None:
    daily = np.zeros((1, 10, 1, 5), np.float32)  # (customer, days, one type, aggregations)
    daily[0, 2, 0] = [2, 10, 3, 7, 5]
    daily[0, 8, 0] = [1, -4, -4, -4, -4]
    feats = period_features(signed_log1p(daily.reshape(1, 10, 5)), n_types=1)
    # 10 days: the 7-day period, then 14/30/all collapse into one 10-day period.
    #             count sum  min  max mean active | count sum min max mean active | days since last active
    expected = [[1, -4, -4, -4, -4, 1, 3, 6, -4, 7, 2, 2, 1]]
    np.testing.assert_allclose(feats, expected, rtol=1e-5)


def test_period_features_of_weekly_steps_by_hand() -> None:
    weekly = np.zeros((1, 3, 1, 5), np.float32)  # (customer, 3 steps of 7 days, one type, aggregations)
    weekly[0, 0, 0] = [2, 10, 3, 7, 5]
    weekly[0, 1, 0] = [1, -4, -4, -4, -4]
    active_days = np.zeros((1, 21), bool)
    active_days[0, [2, 5, 12]] = True  # the last activity on day 12 of 21: 8 days before the end
    feats = period_features(signed_log1p(weekly.reshape(1, 3, 5)), n_types=1, bucket_days=7, active_days=active_days)
    # Periods in whole steps: 7 days = 1 step, 14 = 2, 30 and all = the 3 steps.
    #             count sum min max mean active | count sum min max mean active | count sum min max mean active
    #             | days since the last active step (in whole steps: 1 step = 7 days) | ... day (8)
    expected = [[0, 0, 0, 0, 0, 0, 1, -4, -4, -4, -4, 1, 3, 6, -4, 7, 2, 2, 7, 8]]
    np.testing.assert_allclose(feats, expected, rtol=1e-5)


def test_idle_customer_has_zero_aggregates_and_full_recency() -> None:
    feats = period_features(np.zeros((1, 10, 5), np.float32), n_types=1)
    np.testing.assert_array_equal(feats[0, :-1], 0)
    assert feats[0, -1] == 10


def test_baseline_learns_generated_churn(tmp_path: Path) -> None:
    events = write_events(generate_events(GeneratorConfig(players=800, seed=5)), tmp_path / "ev.parquet")
    prepare(PrepareConfig(events=str(events), out=str(tmp_path / "d")))
    result = baseline(BaselineConfig(data_dir=str(tmp_path / "d"), n_jobs=1))
    saved = json.loads((tmp_path / "d" / "baseline.json").read_text())
    assert saved == result
    assert result["test_auc"] > 0.8  # the fade is visible in the last-7/14-day aggregates
    assert sum(result["customers"].values()) == len(np.load(tmp_path / "d" / "y.npy"))

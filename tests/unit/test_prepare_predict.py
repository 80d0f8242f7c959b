"""The spec written by prepare, applied by predict, gives the same features and scores."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.events import EventColumns
from models.features import signed_log1p
from models.generate import GeneratorConfig, generate_events, write_events
from models.predict import PredictConfig, build_features, predict
from models.prepare import PrepareConfig, prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("rt")
    events = write_events(generate_events(GeneratorConfig(players=120, days=30, seed=11)), tmp / "events.csv")
    spec = prepare(PrepareConfig(events=str(events), out=str(tmp / "data"), observation_days=30, max_types=8))
    return tmp, events, spec


@pytest.fixture(scope="module")
def run_dir(prepared: tuple[Path, Path, dict]) -> Path:
    """A tiny Keras model with the trainer's contract: (batch, days, features) -> softmax (batch, 2)."""
    import keras

    tmp, _, spec = prepared
    keras.utils.set_random_seed(0)
    x = keras.Input((spec["window"]["observation_days"], len(spec["features"])))
    model = keras.Model(x, keras.layers.Dense(2, activation="softmax")(keras.layers.GRU(4)(x)))
    run = tmp / "run"
    run.mkdir()
    model.save(run / "model.keras")
    shutil.copy(tmp / "data" / "spec.json", run / "spec.json")  # what the trainer does
    return run


def test_predict_reproduces_training_features_and_scores(prepared: tuple[Path, Path, dict], run_dir: Path) -> None:
    import keras

    tmp, events, spec = prepared
    # The same cut-off as prepare: predict must rebuild X exactly, row for row by id.
    scores = predict(PredictConfig(model=str(run_dir / "model.keras"), events=str(events), out=str(tmp / "s.csv"),
                                   cutoff=spec["window"]["cutoff"]))
    X, ids = np.load(tmp / "data" / "X.npy"), np.load(tmp / "data" / "ids.npy")
    expected = keras.models.load_model(run_dir / "model.keras").predict(X, verbose=0)[:, 1]
    got = scores.set_index("id").loc[ids, "churn_probability"].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    on_disk = pd.read_csv(tmp / "s.csv", dtype={"id": str})
    assert list(on_disk.columns) == ["id", "churn_probability"] and len(on_disk) == len(scores)
    assert on_disk["churn_probability"].between(0, 1).all()


def test_unknown_types_go_to_other(prepared: tuple[Path, Path, dict], tmp_path: Path) -> None:
    _, _, spec = prepared
    kept = spec["types"][0]
    log = tmp_path / "new.csv"
    log.write_text("id,timestamp,event_type,event_value\n"
                   f"z,2024-05-01T10:00:00Z,{kept},4\n"
                   "z,2024-05-01T11:00:00Z,dragon_attack,-9\n"
                   "z,2024-05-01T12:00:00Z,dragon_attack,\n")
    agg, rows, _ = build_features(str(log), spec, EventColumns(), cutoff=None)
    x = agg.block(rows)  # (1, days, features); the log's last day is the window's last day
    other = spec["types"].index("other") * 5
    np.testing.assert_allclose(x[0, -1, other:other + 5], signed_log1p(np.array([2, -9, -9, -9, -9], np.float32)))
    np.testing.assert_allclose(x[0, -1, 0:5], signed_log1p(np.array([1, 4, 4, 4, 4], np.float32)))
    assert np.count_nonzero(x[0, :-1]) == 0


def test_predict_cli_and_its_errors(prepared: tuple[Path, Path, dict], run_dir: Path, tmp_path: Path, notpu_cli) -> None:
    tmp, events, _ = prepared
    out = tmp_path / "scores.csv"
    code, _ = notpu_cli("predict", str(run_dir / "model.keras"), str(events), "--out", str(out))
    assert code == 0 and out.read_text().startswith("id,churn_probability\n")

    lonely = tmp_path / "m" / "model.keras"  # a model without a spec beside it
    lonely.parent.mkdir()
    shutil.copy(run_dir / "model.keras", lonely)
    code, err = notpu_cli("predict", str(lonely), str(events), "--out", str(tmp_path / "x.csv"))
    assert code == 2 and "pass --spec" in err and not (tmp_path / "x.csv").exists()

    other = tmp_path / "other"  # a spec with another number of types than the model takes
    prepare(PrepareConfig(events=str(events), out=str(other), observation_days=30, max_types=4))
    code, err = notpu_cli("predict", str(run_dir / "model.keras"), str(events), "--out", str(tmp_path / "x.csv"),
                      "--spec", str(other / "spec.json"))
    assert code == 2 and "model takes (steps, features) = (30, 40), the spec gives (30, 20)" in err


def test_predict_applies_the_specs_buckets(prepared: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """Weekly steps over 30 days (5 steps, the oldest of 2 days): predict's features equal prepare's X."""
    _, events, _ = prepared
    spec = prepare(PrepareConfig(events=str(events), out=str(tmp_path / "weekly"), observation_days=30, max_types=8,
                                 bucket_days=7))
    assert (spec["window"]["steps"], spec["window"]["first_step_days"]) == (5, 2)
    agg, rows, _ = build_features(str(events), spec, EventColumns(**spec["columns"]), spec["window"]["cutoff"])
    X, ids = np.load(tmp_path / "weekly" / "X.npy"), np.load(tmp_path / "weekly" / "ids.npy")
    assert X.shape[1] == 5
    got = dict(zip(agg.ids()[rows], agg.block(rows)))  # predict scores everyone active in the window
    np.testing.assert_array_equal(np.stack([got[i] for i in ids]), X)

"""Your own Keras model through the parameter server: `runner.fit`, `notpu train --model`, callbacks, TensorBoard.

Tiny models on the fading-activity set (tests/integration/datasets.py), real
processes: a parameter server, two workers and the evaluator per run.
"""
import glob
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from datasets import write_fading  # noqa: E402

from models.dataset import load_dataset, split_indices  # noqa: E402
from models.outputs import churn_probability  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

keras = pytest.importorskip("keras")

# As in test_train.py: untrained, these models score 0.3–0.6 on this data (the label is the sign of the slope of
# feature 0, which noise hides); a logistic regression on the slope would score ~0.97. A model above 0.8 has learned
# the slope from the centre's updates. 6 epochs of 512 training rows, batch 32, base rate 10× Adam's default.
AUC_THRESHOLD = 0.8
FAST = dict(epochs=6, batch_size=32, eval_interval_s=1.0, progress=False)


@pytest.fixture(scope="module")
def fading_arrays(tmp_path_factory):
    d = load_dataset(write_fading(tmp_path_factory.mktemp("fading")), mmap=False)
    return np.asarray(d.X), np.asarray(d.y)


def conv1d_model(steps, features):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((steps, features)), keras.layers.Conv1D(8, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    return model


def aggregates_model(steps, features):
    """Dense layers on learned aggregates over time. The plain mean over time (GlobalAveragePooling1D on the
    input) cannot learn this set: a slope averages to zero. Dense(4) across the time axis learns weighted sums
    (a slope is one), pooled over features, then a two-unit softmax with categorical cross-entropy."""
    keras.utils.set_random_seed(0)
    x = keras.Input((steps, features))
    h = keras.layers.Dense(4, activation="relu")(keras.layers.Permute((2, 1))(x))  # (batch, features, 4)
    h = keras.layers.GlobalAveragePooling1D()(h)  # (batch, 4)
    model = keras.Model(x, keras.layers.Dense(2, activation="softmax")(h))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy")
    return model


def event_tags(log_dir: Path) -> dict[str, list[float]]:
    import tensorflow as tf

    tags: dict[str, list[float]] = {}
    for path in glob.glob(str(log_dir / "**" / "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    return tags


def test_conv1d_from_arrays_learns_and_writes_tensorboard_scalars(fading_arrays, tmp_path):
    from runner import fit

    X, y = fading_arrays
    tb = tmp_path / "tb"
    result = fit(conv1d_model(*X.shape[1:]), (X, y), out=tmp_path / "run", workers=2,
                 callbacks=[keras.callbacks.TensorBoard(log_dir=str(tb))], **FAST)
    print(f"\nConv1D: test AUC {result.summary['test_auc']:.4f}")
    assert result.summary["test_auc"] > AUC_THRESHOLD
    assert result.summary["learning_rate"] == pytest.approx(0.01 * result.summary["window"])  # Adam(0.01) × λ (ADAG)
    # at least the final evaluation: on a quiet machine the run can end before the evaluator's second one
    assert len(result.history["val_auc"]) == len(result.evaluations) >= 1
    assert (tmp_path / "run" / "data" / "X.npy").is_file() and result.model_path.is_file()
    tags = event_tags(tb)
    for tag in ("val_auc", "val_loss", "samples_per_s", "mean_staleness", "refused"):
        assert len(tags.get(tag, [])) == len(result.evaluations), (tag, tags.keys())
    np.testing.assert_allclose(tags["val_auc"], result.history["val_auc"], atol=1e-6)
    scores = pd.read_csv(tmp_path / "run" / "test_scores.csv")
    assert list(scores.columns) == ["id", "label", "churn_probability"]  # predict's name for the same column
    assert scores["churn_probability"].between(0, 1).all() and len(scores) == len(split_indices(len(y)).test)


def test_dense_on_aggregates_softmax_learns(fading_arrays, tmp_path):
    from runner import fit

    X, y = fading_arrays
    result = fit(aggregates_model(*X.shape[1:]), (X, y), out=tmp_path / "run", workers=2, **FAST)
    print(f"\naggregates: test AUC {result.summary['test_auc']:.4f}")
    assert result.summary["test_auc"] > AUC_THRESHOLD
    model = result.load_model()
    val = split_indices(len(y)).val
    p = churn_probability(model.predict(X[val], verbose=0))
    assert p.shape == (len(val),) and ((0 <= p) & (p <= 1)).all()


def test_compiled_metrics_are_measured_and_the_model_holds_the_trained_centre(fading_arrays, tmp_path):
    """A model compiled as most Keras users compile one: metrics=["AUC"], a metric object (named "auc", as our
    val_auc), weighted_metrics. The workers train (the centre receives updates), the evaluator reports each
    metric per evaluation as Keras names it, and the model passed in holds the centre model.keras holds (without a
    callback that keeps the best: the last, as after Keras' fit). 2 epochs at λ=4: 4 updates per worker, fewer than the evaluator's minimum
    of 10, so the run warns, as a Python warning."""
    from pserver.errors import RunWarning
    from runner import fit
    from runner.evaluator import binary_metrics

    X, y = fading_arrays
    model = conv1d_model(*X.shape[1:])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy",
                  metrics=["AUC", "accuracy", keras.metrics.AUC(name="auc", curve="PR")],
                  weighted_metrics=["accuracy"])
    with pytest.warns(RunWarning, match=r"4\.0 updates per worker \(fewer than 10\)"):
        result = fit(model, (X, y), out=tmp_path / "run", workers=2, window=4, **{**FAST, "epochs": 2})
    assert result.summary["status"] == "ok" and sum(result.summary["updates"].values()) > 0
    assert result.summary["lost_workers"] == []
    history = result.history
    # val_auc_1: "auc" beside our own val_auc; weighted_accuracy: Keras' name beside the plain accuracy
    for key in ("val_AUC", "val_accuracy", "val_auc_1", "val_weighted_accuracy"):
        # at least the final evaluation: on a quiet machine the run can end before a second one
        assert len(history[key]) == len(result.evaluations) >= 1, history.keys()
        assert all(0 <= v <= 1 for v in history[key]), (key, history[key])
    # Keras' AUC (200 thresholds) on the same split and centre as sklearn's exact one
    np.testing.assert_allclose(history["val_AUC"], history["val_auc"], atol=0.02)
    frame = result.history_frame()
    assert len(frame) == len(result.evaluations) and frame.index.name == "evaluation"
    assert frame["val_AUC"].tolist() == history["val_AUC"]
    saved = result.load_model(compile=False).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), saved))
    val = split_indices(len(y)).val
    _, auc = binary_metrics(y[val], churn_probability(model.predict(X[val], verbose=0)))
    assert auc == pytest.approx(result.summary["val_auc"], abs=1e-4)


def test_a_run_whose_workers_all_fail_raises_naming_the_error_and_its_log(fading_arrays, tmp_path):
    """Every worker fails at its first step: fit raises (no untrained model handed back as if trained),
    summary.json says why, and the model passed in is left as it was."""
    from failing_models import build

    from pserver.errors import TrainingFailed
    from runner import fit

    X, y = fading_arrays
    model = build(*X.shape[1:])
    before = model.get_weights()
    run = tmp_path / "run"
    with pytest.raises(TrainingFailed, match=r"^every worker failed, the model did not train; worker 0: ValueError: "
                                             r".*this layer refuses to train \(see .*worker0\.log\)$"):
        fit(model, (X, y), out=run, workers=2, **{**FAST, "epochs": 1})
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "this layer refuses to train" in summary["reason"]
    assert sorted(summary["lost_workers"]) == [0, 1]
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def conv1d_max_model(steps, features):
    """The Conv1D of a user's first try: Conv1D(16, 7), global max pooling, one sigmoid."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((steps, features)), keras.layers.Conv1D(16, 7, activation="relu"),
                              keras.layers.GlobalMaxPooling1D(), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    return model


@pytest.mark.parametrize("build", [conv1d_max_model, aggregates_model], ids=["conv1d", "aggregates_softmax"])
def test_fit_lands_within_0_02_test_auc_of_plain_keras(fading_arrays, tmp_path, build):
    """The same model (same initial weights), split, batch and epochs: Keras' own `model.fit` on the training
    rows in one process, and `fit` with two workers (ADAG at its defaults). Both keep the last weights."""
    from models.outputs import targets
    from runner import fit
    from runner.evaluator import binary_metrics
    from runner.keras_model import run_kind

    X, y = fading_arrays
    split = split_indices(len(y))
    plain = build(*X.shape[1:])
    kind = run_kind({"architecture": "yes", "compile_config": plain.get_compile_config()})
    plain.fit(X[split.train], targets(y[split.train], kind), batch_size=FAST["batch_size"], epochs=FAST["epochs"],
              shuffle=True, verbose=0)
    _, keras_auc = binary_metrics(y[split.test], churn_probability(plain.predict(X[split.test], verbose=0)))
    result = fit(build(*X.shape[1:]), (X, y), out=tmp_path / "run", workers=2, **FAST)
    print(f"\n{build.__name__}: test AUC plain Keras {keras_auc:.4f}, fit {result.summary['test_auc']:.4f}")
    assert result.summary["test_auc"] == pytest.approx(keras_auc, abs=0.02)


def test_registered_custom_layer_travels_through_custom_modules(fading_arrays, tmp_path):
    from custom_layers import TemporalMix

    from runner import fit

    X, y = fading_arrays
    keras.utils.set_random_seed(0)
    x = keras.Input(X.shape[1:])
    h = keras.layers.Flatten()(TemporalMix(2)(x))
    model = keras.Model(x, keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    result = fit(model, (X, y), out=tmp_path / "run", workers=2, custom_modules=["custom_layers"], **FAST)
    print(f"\ncustom layer: test AUC {result.summary['test_auc']:.4f}")
    assert result.summary["run_config"]["custom_modules"] == ["custom_layers"]
    assert result.summary["test_auc"] > AUC_THRESHOLD
    assert isinstance(result.load_model().layers[1], TemporalMix)


def test_early_stopping_stops_and_keeps_the_best_centre(fading_arrays, tmp_path):
    """min_delta 1.0: no AUC can improve by that, so patience 2 runs out at the third evaluation, whatever the
    timing; 1,000 epochs would take far longer (on a quiet 2-core machine the stop came after ~49,000 samples,
    a tenth of the plan)."""
    from models.outputs import churn_probability
    from runner import fit
    from runner.evaluator import binary_metrics

    X, y = fading_arrays
    stop = keras.callbacks.EarlyStopping(monitor="val_auc", patience=2, min_delta=1.0, restore_best_weights=True)
    result = fit(conv1d_model(*X.shape[1:]), (X, y), out=tmp_path / "run", workers=2,
                 **{**FAST, "epochs": 1000}, callbacks=[stop])
    planned = 2 * 1000 * 8 * 32  # workers × epochs × steps per epoch × batch
    assert result.summary["stopped_early"].startswith("val_auc did not improve")
    assert result.summary["samples"] < planned / 4
    assert 3 <= len(result.evaluations) <= 6  # the stop, then the evaluations until the workers have stopped
    best = result.best
    aucs = result.history["val_auc"]
    assert best["model"] == "best" and best["value"] == max(aucs) and aucs[best["evaluation"]] == max(aucs)
    val = split_indices(len(y)).val
    _, auc = binary_metrics(y[val], churn_probability(result.load_model().predict(X[val], verbose=0)))
    assert auc == pytest.approx(max(aucs), abs=1e-4)
    assert result.summary["val_auc"] == pytest.approx(max(aucs), abs=1e-4)


def test_callbacks_the_evaluator_cannot_honour_are_refused(fading_arrays, tmp_path):
    from pserver.errors import ConfigError
    from runner import fit

    X, y = fading_arrays
    model = conv1d_model(*X.shape[1:])
    with pytest.raises(ConfigError, match="ReduceLROnPlateau, CSVLogger"):
        fit(model, (X, y), out=tmp_path / "run", callbacks=[keras.callbacks.ReduceLROnPlateau(),
                                                            keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))])
    with pytest.raises(ConfigError, match="monitor='val_accuracy'"):
        fit(model, (X, y), out=tmp_path / "run", callbacks=[keras.callbacks.EarlyStopping(monitor="val_accuracy")])
    x = keras.Input(X.shape[1:])
    two = keras.Model(x, [keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(x))] * 2)
    two.compile(optimizer="adam", loss="binary_crossentropy")
    with pytest.raises(ConfigError, match="2 outputs"):
        fit(two, (X, y), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("build, message", [
    ("churn_models", "expected package.module:function"),
    ("no_such_module:build", "cannot import no_such_module"),
    ("churn_models:missing", "has no function missing"),
    ("churn_models:nothing", "is a NoneType, not a keras.Model"),
    ("churn_models:not_compiled", "is not compiled"),
    ("churn_models:wrong_shape", "the data's are (steps, features) = (10, 4)"),
    ("churn_models:regression", "loss 'mse'"),
])
def test_model_option_errors(notpu_cli, tmp_path, build, message):
    data = write_fading(tmp_path / "data", customers=100)
    code, err = notpu_cli("train", str(data), "--out", str(tmp_path / "run"), "--model", build, "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from models.generate import GeneratorConfig, generate_events, write_events
    from models.prepare import PrepareConfig, prepare

    tmp = tmp_path_factory.mktemp("events")
    events = write_events(generate_events(GeneratorConfig(players=300, days=30, seed=11)), tmp / "events.csv")
    spec = prepare(PrepareConfig(events=str(events), out=str(tmp / "data"), observation_days=30, max_types=8))
    return tmp / "data", events, spec


@pytest.mark.parametrize("build", ["sigmoid", "softmax"])
def test_model_option_sigmoid_and_softmax_score_probabilities(prepared, tmp_path, build):
    import subprocess

    data, events, spec = prepared
    run = tmp_path / "run"
    here = str(Path(__file__).parent)
    train = subprocess.run([sys.executable, "-m", "runner.cli", "train", str(data), "--out", str(run), "--model",
                            f"churn_models:{build}", "--workers", "1", "--epochs", "2", "--eval-interval-s", "1000",
                            "--no-progress"],
                           capture_output=True, text=True, timeout=300, cwd=here)
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run_config"]["custom_modules"] == ["churn_models"]
    scores = pd.read_csv(run / "test_scores.csv")
    assert scores["churn_probability"].between(0, 1).all() and scores["churn_probability"].nunique() > 1
    out = tmp_path / "scores.csv"
    predicted = subprocess.run([sys.executable, "-m", "runner.cli", "predict", str(run / "model.keras"), str(events),
                                "--out", str(out), "--cutoff", spec["window"]["cutoff"]],
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    got = pd.read_csv(out, dtype={"id": str}).set_index("id")["churn_probability"]
    X, ids = np.load(data / "X.npy"), np.load(data / "ids.npy")
    expected = churn_probability(keras.saving.load_model(run / "model.keras").predict(X, verbose=0))
    np.testing.assert_allclose(got.loc[ids].to_numpy(), expected, atol=1e-5)
    assert got.between(0, 1).all()


def test_predict_imports_the_custom_modules_the_run_recorded(prepared, tmp_path):
    """A model with a registered custom layer: `notpu predict` imports the modules RUN/summary.json names; where
    they cannot be imported, the error says which and how to fix it."""
    import os
    import subprocess

    data, events, spec = prepared
    run, here = tmp_path / "run", str(Path(__file__).parent)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    train = subprocess.run([sys.executable, "-m", "runner.cli", "train", str(data), "--out", str(run), "--model",
                            "churn_models:custom", "--workers", "1", "--epochs", "1", "--eval-interval-s", "1000",
                            "--no-progress"],
                           capture_output=True, text=True, timeout=300, cwd=here, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "custom_layers" in json.loads((run / "summary.json").read_text())["run_config"]["custom_modules"]
    predict_cmd = [sys.executable, "-m", "runner.cli", "predict", str(run / "model.keras"), str(events),
                   "--cutoff", spec["window"]["cutoff"]]
    # Elsewhere (tmp_path as the working directory, no PYTHONPATH) the modules are not importable: a clear error.
    away = subprocess.run([*predict_cmd, "--out", str(tmp_path / "away.csv")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert away.returncode == 2 and "custom module(s)" in away.stderr and "custom_layers" in away.stderr, away.stderr
    assert "--custom-module" in away.stderr and not (tmp_path / "away.csv").exists()
    # Where they are importable, predict imports them unasked and scores as the saved model does.
    out = tmp_path / "scores.csv"
    ok = subprocess.run([*predict_cmd, "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=here,
                        env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    got = pd.read_csv(out, dtype={"id": str}).set_index("id")["churn_probability"]
    from custom_layers import TemporalMix  # noqa: F401 - registers the layer for the load below

    X, ids = np.load(data / "X.npy"), np.load(data / "ids.npy")
    expected = churn_probability(keras.saving.load_model(run / "model.keras").predict(X, verbose=0))
    np.testing.assert_allclose(got.loc[ids].to_numpy(), expected, atol=1e-5)

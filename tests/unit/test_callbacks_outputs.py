"""Churn outputs written either way (models.outputs) and the evaluator's callback semantics (runner.callbacks)."""
from __future__ import annotations

import numpy as np
import pytest

from models.errors import DataError
from models.outputs import churn_probability, loss_kind, targets
from pserver.errors import ConfigError
from runner.callbacks import CallbackSettings, Tracker, checkpoint_path


@pytest.mark.parametrize("loss, kind", [
    ("binary_crossentropy", "binary"), ("bce", "binary"),
    ({"module": "keras.losses", "class_name": "BinaryCrossentropy", "config": {"from_logits": False}}, "binary"),
    ({"module": "builtins", "class_name": "function", "config": "binary_crossentropy"}, "binary"),
    ("categorical_crossentropy", "categorical"),
    ({"class_name": "SparseCategoricalCrossentropy", "config": {}}, "sparse_categorical"),
])
def test_loss_kinds(loss, kind):
    assert loss_kind(loss) == kind


def test_other_losses_and_logits_are_refused():
    with pytest.raises(DataError, match="loss 'mse'"):
        loss_kind("mse")
    with pytest.raises(DataError, match="from_logits=True"):
        loss_kind({"class_name": "BinaryCrossentropy", "config": {"from_logits": True}})


def test_targets_and_probabilities_for_both_outputs():
    y = np.array([0, 1, 1], np.int8)
    assert targets(y, "binary").tolist() == [[0.0], [1.0], [1.0]]
    assert targets(y, "categorical").tolist() == [[1, 0], [0, 1], [0, 1]]
    assert targets(y, "sparse_categorical").tolist() == [0, 1, 1]
    assert churn_probability(np.array([[0.2], [0.9]])).tolist() == [0.2, 0.9]
    assert churn_probability(np.array([[0.8, 0.2], [0.1, 0.9]])).tolist() == [0.2, 0.9]
    with pytest.raises(DataError, match=r"\(customers, 1\)"):
        churn_probability(np.zeros((2, 3)))


def test_patience_counts_evaluations_without_an_improvement_over_min_delta():
    t = Tracker(CallbackSettings(monitor="val_auc", early_stopping_patience=2, min_delta=0.01))
    assert t.update(0, 0.70) == (True, "")
    assert t.update(1, 0.705) == (True, "")  # a new best, but within min_delta: patience 1 used
    improved, stop = t.update(2, 0.70)
    assert not improved and stop.startswith("val_auc did not improve by more than 0.01 in 2")
    assert (t.best, t.best_index) == (0.705, 1)


def test_val_loss_is_better_lower_and_nan_never_improves():
    t = Tracker(CallbackSettings(monitor="val_loss"))
    assert t.update(0, float("nan")) == (False, "")
    assert t.update(1, 0.5)[0] and not t.update(2, 0.6)[0] and t.update(3, 0.4)[0]
    assert t.best_index == 3


def test_settings_are_checked_and_checkpoint_paths_formatted():
    with pytest.raises(ConfigError, match="--monitor 'val_acc'"):
        CallbackSettings(monitor="val_acc").check()
    with pytest.raises(ConfigError, match="at least 1"):
        CallbackSettings(early_stopping_patience=0).check()
    assert checkpoint_path("m-{epoch:02d}-{val_auc:.2f}.keras", 2, {"val_auc": 0.91, "val_loss": 0.3}) == "m-03-0.91.keras"
    with pytest.raises(ConfigError, match="cannot fill in"):
        checkpoint_path("m-{acc}.keras", 0, {"val_auc": 0.9})


def test_keras_callback_objects_are_read_or_refused(tmp_path):
    keras = pytest.importorskip("keras")
    from runner.callbacks import settings_from_keras

    got = settings_from_keras([
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=4, min_delta=0.001, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_loss", save_best_only=True),
        keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb"))])
    assert got == {"monitor": "val_loss", "early_stopping_patience": 4, "min_delta": 0.001, "restore_best": True,
                   "checkpoint": str(tmp_path / "best.keras"), "checkpoint_best_only": True,
                   "checkpoint_weights_only": False, "tensorboard": str(tmp_path / "tb")}
    with pytest.raises(ConfigError, match="callback\\(s\\) LambdaCallback cannot run here"):
        settings_from_keras([keras.callbacks.LambdaCallback()])
    with pytest.raises(ConfigError, match="different values"):
        settings_from_keras([keras.callbacks.EarlyStopping(monitor="val_auc"),
                             keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"), monitor="val_loss")])
    with pytest.raises(ConfigError, match="mode='min'"):
        settings_from_keras([keras.callbacks.EarlyStopping(monitor="val_auc", mode="min")])
    with pytest.raises(ConfigError, match="scalars only"):
        settings_from_keras([keras.callbacks.TensorBoard(log_dir=str(tmp_path), histogram_freq=1)])

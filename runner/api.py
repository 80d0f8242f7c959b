"""`runner.fit`: train your own compiled Keras model through the parameter server, from Python.

    import keras, numpy as np
    from runner import fit

    model = keras.Sequential([keras.Input((steps, features)), keras.layers.Conv1D(16, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    result = fit(model, (X, y), out="run/", workers=2, epochs=5,
                 callbacks=[keras.callbacks.EarlyStopping(monitor="val_auc", patience=3, restore_best_weights=True)])
    result.history["val_auc"], result.history_frame(), result.summary["test_auc"]
    model.predict(X_new)  # the trained centre, as after Keras' own fit

It runs local mode, the same processes as `notpu train`: a sharded
parameter server, `workers` worker processes and an evaluator, on this
machine. `data` is a prepared DIR (`notpu prepare`) or `(X, y)`: X float
[customers, steps, features], y 0/1 [customers]; arrays are written once
to OUT/data/ (X.npy, y.npy, ids.npy), which every process memory-maps.
The split is the seeded 64/16/20 train/val/test split of `notpu train`.

What travels to the workers, and what does not (see runner.keras_model):

- Travels: the architecture (`model.to_json()`: any built-in layer, nested
  models, Sequential or functional), custom layers, activations, losses or
  regularisers registered with `keras.saving.register_keras_serializable` in
  an importable module (named in `custom_modules`, or found from the layers'
  classes), the loss (binary or (sparse) categorical cross-entropy on one
  sigmoid or two softmax units), the optimizer's learning rate (as the base
  rate the rule scales, unless `learning_rate=` is given), the weights
  the model has now (the centre starts from them), and its compiled
  `metrics` and `weighted_metrics`: the evaluator measures them on the
  validation split per evaluation, beside its own val_auc and val_loss, as
  val_<name> in history.jsonl and `result.history` (named as Keras names
  them: `metrics=["AUC"]` is val_AUC; one named "auc" is val_auc_1).
- Does not travel: the optimizer itself (each rule runs its own local
  optimizer: Adam, Nadam or SGD, see the rule table in docs/guides/rules.md), a `train_step` override or any
  custom training loop (workers call `train_on_batch`, and each rule needs
  the weights before and after λ plain steps), stateful RNNs (batches are
  shuffled rows of a partition, state would leak between customers),
  several inputs or outputs (one tensor of customers × steps × features in,
  one churn probability out), sample or class weights, losses on logits,
  and regression or multi-class models: those are refused at the start.
- Callbacks: Keras runs its callbacks inside its own `fit` loop, which no
  process runs here; `EarlyStopping`, `ModelCheckpoint` and `TensorBoard`
  objects are read and honoured per evaluation by the evaluator
  (runner.callbacks), any other callback is refused at the start.

After `fit`, as after Keras' `fit`, `model` holds the trained centre: the
one OUT/model.keras holds (the best evaluation's with
`EarlyStopping(restore_best_weights=True)` or
`ModelCheckpoint(save_best_only=True)`, otherwise the last). A run that did
not train (every worker failed, or the centre received no update) raises
`pserver.errors.TrainingFailed` naming the first worker's error and its log,
and leaves `model` as it was; what summary.json warns of (lost workers, too
few exchanges, no progress) is raised as a `pserver.errors.RunWarning`.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from pserver.errors import ConfigError, RunWarning


@dataclass(frozen=True)
class FitResult:
    out: Path
    evaluations: list[dict[str, Any]]  # history.jsonl, one dict per evaluation
    summary: dict[str, Any]  # summary.json

    @property
    def history(self) -> dict[str, list]:
        """Like Keras' `History.history`: per evaluation, val_auc, val_loss, wall_s, samples, val_<metric>, ...
        (None where an evaluation lacks a key: a metric dropped mid-run)."""
        keys = dict.fromkeys(k for e in self.evaluations for k in e)
        return {k: [e.get(k) for e in self.evaluations] for k in keys}

    def history_frame(self):
        """The history as a pandas DataFrame: one row per evaluation (index: its number, as summary.json's
        `best.evaluation` counts), one column per key of `history`."""
        import pandas as pd

        frame = pd.DataFrame(self.evaluations)
        frame.index.name = "evaluation"
        return frame

    @property
    def model_path(self) -> Path:
        return self.out / "model.keras"

    @property
    def best(self) -> dict[str, Any] | None:
        """Which evaluation was best, with callbacks that monitor one (summary.json's `best`)."""
        return self.summary.get("best")

    def load_model(self, compile: bool = True):
        import keras

        from runner.keras_model import import_custom

        import_custom(self.summary.get("run_config", {}).get("custom_modules"))
        return keras.saving.load_model(self.model_path, compile=compile)


def write_arrays(X, y, directory: Path) -> Path:
    """(X, y) as a directory `models.dataset.load_dataset` memory-maps, written once, atomically."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 3:
        raise ConfigError(f"X has shape {X.shape}; expected [customers, steps, features]")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2 and y.shape[1] == 2:
        y = y.argmax(axis=1)  # one-hot [stays, churns]
    if y.shape != (X.shape[0],):
        raise ConfigError(f"y has shape {y.shape}; expected one 0/1 label per customer ({X.shape[0]})")
    if not np.isin(y, (0, 1)).all():
        raise ConfigError("y must hold 0/1 labels (1 = churned)")
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "X.npy", np.ascontiguousarray(X, dtype=np.float32))
    np.save(tmp / "y.npy", y.astype(np.int8))
    np.save(tmp / "ids.npy", np.arange(X.shape[0]).astype(str))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def fit(model, data, *, out, workers: int = 2, rule: str | None = None, epochs: int | None = None,
        batch_size: int | None = None, learning_rate: float | None = None, callbacks=None, custom_modules=(),
        **run_options) -> FitResult:
    """Train the compiled Keras `model` on `data` (a prepared DIR or `(X, y)`) through the parameter server.

    `run_options` are `runner.train_config.TrainConfig`'s other fields: window, alpha, shards, threads, target_auc,
    eval_interval_s, seed, progress, checkpoint_every_s, monitor, early_stopping_patience, ... (an unknown
    one is a ConfigError). OUT/model.keras is the trained centre (the best one with
    `EarlyStopping(restore_best_weights=True)` or `ModelCheckpoint(save_best_only=True)`). See the module
    docstring for which Keras features travel to the workers.
    """
    from runner.callbacks import settings_from_keras
    from runner.keras_model import describe, save_initial_weights
    from runner.launcher import run
    from runner.local import LocalLauncher
    from runner.train_config import TrainConfig
    from runner.run_config import RunConfig

    from models.outdir import check_run_out

    out = Path(out)
    check_run_out(out, bool(run_options.get("overwrite", False)), option="out")  # before anything is written
    allowed = {f.name for f in fields(TrainConfig)} - {"data_dir", "out_dir", "model", "architecture", "compile_config",
                                                       "custom_modules", "initial_weights"}
    unknown = sorted(set(run_options) - allowed)
    if unknown:
        raise ConfigError(f"fit() got unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    cb = settings_from_keras(callbacks)  # refused callbacks fail before anything is written
    arrays = isinstance(data, (tuple, list)) and len(data) == 2
    if arrays:
        X = np.asarray(data[0])
        if X.ndim != 3:
            raise ConfigError(f"X has shape {X.shape}; expected [customers, steps, features]")
    elif isinstance(data, (str, os.PathLike)):
        from models.dataset import load_dataset

        X = load_dataset(data).X
    else:
        raise ConfigError(f"data is a {type(data).__name__}; pass a prepared DIR or a tuple (X, y) of arrays")
    spec = describe(model, X.shape[1], X.shape[2], custom_modules)  # before anything is written
    data_dir = write_arrays(X, data[1], out / "data") if arrays else Path(data)
    config = TrainConfig(
        data_dir=str(data_dir), out_dir=str(out), workers=workers, rule=rule or RunConfig.rule,
        epochs=epochs or RunConfig.epochs, batch_size=batch_size or RunConfig.batch_size,
        learning_rate=learning_rate if learning_rate is not None else spec.learning_rate,
        architecture=spec.architecture, compile_config=spec.compile_config, custom_modules=spec.custom_modules,
        initial_weights=save_initial_weights(model, out / "initial_weights.npz"), **{**cb, **run_options})
    # summary.json's warnings as Python warnings, attributed to the caller's line (warn ← run ← fit ← caller)
    run(config, LocalLauncher(), warn=lambda message: warnings.warn(message, RunWarning, stacklevel=4))
    history = out / "history.jsonl"
    evaluations = [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []
    result = FitResult(out=out, evaluations=evaluations, summary=json.loads((out / "summary.json").read_text()))
    model.set_weights(result.load_model(compile=False).get_weights())  # as Keras' fit leaves it: trained
    return result

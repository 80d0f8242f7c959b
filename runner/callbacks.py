"""Callbacks the evaluator honours: early stopping, keeping the best centre, checkpoints, TensorBoard scalars.

Keras calls its callbacks from inside its own `fit` loop, at the end of each
epoch of one process. Here no process runs that loop over the whole run: the
workers each train on a partition and only exchange with the parameter
server, and the evaluator scores the centre every `--eval-interval-s`. So the
evaluator reads the attributes of `keras.callbacks.EarlyStopping`,
`ModelCheckpoint` and `TensorBoard` objects (`settings_from_keras`) and
applies their semantics per *evaluation*, where Keras applies them per
epoch:

- EarlyStopping(monitor="val_auc"|"val_loss", patience=N, min_delta=d,
  restore_best_weights=b): after N evaluations without an improvement larger
  than d, the evaluator stops the run the way `--target-auc` does (STOP to
  the coordinator; workers stop at their next exchange). With b, RUN/model.keras
  and the test scores are the best centre's.
- ModelCheckpoint(filepath, monitor, save_best_only, save_weights_only):
  the centre is saved to filepath (formatted with `epoch`, the evaluation's
  number from 1, `val_auc` and `val_loss`) at every evaluation, or only at
  improvements; with save_best_only, RUN/model.keras is the best centre too.
- TensorBoard(log_dir): val_auc, val_loss, samples_per_s, mean_staleness and
  refused as scalars per evaluation, at step = samples trained so far. Only
  scalars: no graph, histograms, images or profiles.

Without callbacks, `notpu train` keeps the best centre (`--no-restore-best` keeps
the last); `fit()`, like Keras, keeps the last unless a callback asks.

"Best" is the strictly best value of the one monitor; `min_delta` only
decides when patience runs out. Any other callback (ReduceLROnPlateau,
LearningRateScheduler, CSVLogger, LambdaCallback, your own subclass) needs
Keras' loop and is refused before the run starts, by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from pserver.errors import ConfigError

#: What the evaluator can monitor, and which way is better.
MONITORS = {"val_auc": "max", "val_loss": "min"}


@dataclass(frozen=True)
class CallbackSettings:
    """The evaluator's per-evaluation duties; `TrainConfig` and `EvaluatorConfig` carry these fields flat."""

    monitor: str = "val_auc"
    early_stopping_patience: int | None = None  # evaluations without improvement; None: never stop early
    min_delta: float = 0.0  # an improvement must exceed this to reset the patience
    # RUN/model.keras and the test scores from the best centre of the run, not the last. On by default for
    # `notpu train` (--no-restore-best turns it off): a centre is scored every few seconds, and the last one of an
    # asynchronous run is one noisy step of many (bench/RESULTS.md, "Why the defaults are what they are").
    # `fit()` follows Keras: the last weights unless EarlyStopping(restore_best_weights=True) or
    # ModelCheckpoint(save_best_only=True).
    restore_best: bool = True
    checkpoint: str | None = None  # ModelCheckpoint's filepath
    checkpoint_best_only: bool = False
    checkpoint_weights_only: bool = False
    tensorboard: str | None = None  # a log dir for the scalars

    @classmethod
    def of(cls, config: Any) -> "CallbackSettings":
        """The settings held flat in a `TrainConfig` or `EvaluatorConfig`, checked."""
        settings = cls(**{f.name: getattr(config, f.name) for f in fields(cls)})
        settings.check()
        return settings

    def check(self) -> None:
        if self.monitor not in MONITORS:
            raise ConfigError(f"--monitor {self.monitor!r}: the evaluator measures {' and '.join(MONITORS)}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ConfigError(f"--early-stopping-patience must be at least 1 evaluation, got "
                              f"{self.early_stopping_patience}")
        if not self.min_delta >= 0:
            raise ConfigError(f"--min-delta must be non-negative, got {self.min_delta}")

    @property
    def keeps_best(self) -> bool:
        return self.restore_best or (self.checkpoint is not None and self.checkpoint_best_only)

    @property
    def active(self) -> bool:
        return self.early_stopping_patience is not None or self.keeps_best or self.checkpoint is not None


def settings_from_keras(callbacks) -> dict[str, Any]:
    """CallbackSettings fields from real `keras.callbacks` objects; any other callback is a ConfigError naming it."""
    import keras

    values: dict[str, Any] = {}
    monitors: dict[str, str] = {}
    refused = []
    seen: set[type] = set()
    for cb in callbacks or ():
        kind = type(cb)
        if kind in seen:
            raise ConfigError(f"two {kind.__name__} callbacks: the evaluator honours one of each")
        seen.add(kind)
        if kind is keras.callbacks.EarlyStopping:
            _monitor(cb, monitors)
            if cb.baseline is not None or getattr(cb, "start_from_epoch", 0):
                raise ConfigError("EarlyStopping(baseline=..., start_from_epoch=...) are not supported here; "
                                  "use patience and min_delta")
            values.update(early_stopping_patience=max(int(cb.patience), 1), min_delta=abs(float(cb.min_delta)),
                          restore_best=bool(cb.restore_best_weights) or values.get("restore_best", False))
        elif kind is keras.callbacks.ModelCheckpoint:
            _monitor(cb, monitors)
            if cb.save_freq != "epoch":
                raise ConfigError(f"ModelCheckpoint(save_freq={cb.save_freq!r}): the evaluator saves per evaluation "
                                  f"(save_freq='epoch')")
            if getattr(cb, "initial_value_threshold", None) is not None:
                raise ConfigError("ModelCheckpoint(initial_value_threshold=...) is not supported here")
            values.update(checkpoint=str(cb.filepath), checkpoint_best_only=bool(cb.save_best_only),
                          checkpoint_weights_only=bool(cb.save_weights_only))
        elif kind is keras.callbacks.TensorBoard:
            asked = [a for a in ("histogram_freq", "embeddings_freq", "write_images") if getattr(cb, a, 0)]
            if asked:
                raise ConfigError(f"TensorBoard({', '.join(asked)}): the evaluator writes scalars only")
            values["tensorboard"] = str(cb.log_dir)
        else:
            refused.append(kind.__name__)
    if refused:
        raise ConfigError(f"callback(s) {', '.join(refused)} cannot run here: the workers do not run Keras' fit loop; "
                          f"the evaluator honours EarlyStopping, ModelCheckpoint and TensorBoard")
    if len(set(monitors.values())) > 1:
        raise ConfigError(f"the callbacks monitor different values ({monitors}); use one of {', '.join(MONITORS)}")
    if monitors:
        values["monitor"] = next(iter(monitors.values()))
    values.setdefault("restore_best", False)  # Keras keeps the last weights unless a callback asks for the best
    return values


def _monitor(cb, monitors: dict[str, str]) -> None:
    name = type(cb).__name__
    if cb.monitor not in MONITORS:
        raise ConfigError(f"{name}(monitor={cb.monitor!r}): the evaluator measures {' and '.join(MONITORS)}")
    mode = getattr(cb, "mode", "auto")
    if mode not in ("auto", MONITORS[cb.monitor]):
        raise ConfigError(f"{name}(monitor={cb.monitor!r}, mode={mode!r}): {cb.monitor} is better when "
                          f"{'higher' if MONITORS[cb.monitor] == 'max' else 'lower'}")
    monitors[name] = cb.monitor


class Tracker:
    """The monitor's best value and the patience left, updated once per evaluation."""

    def __init__(self, settings: CallbackSettings) -> None:
        self.s = settings
        self.sign = 1.0 if MONITORS[settings.monitor] == "max" else -1.0
        self.best: float | None = None  # strictly best value
        self.best_index: int | None = None  # into the history
        self._reference: float | None = None  # the last value that beat the reference by more than min_delta
        self.wait = 0

    def update(self, index: int, value: float) -> tuple[bool, str]:
        """(a new best, a reason to stop or "") after evaluation `index` measured `value`."""
        if not math.isfinite(value):
            improved = False
        else:
            improved = self.best is None or self.sign * (value - self.best) > 0
        if improved:
            self.best, self.best_index = value, index
        if math.isfinite(value) and (self._reference is None or self.sign * (value - self._reference) > self.s.min_delta):
            self._reference, self.wait = value, 0
        else:
            self.wait += 1
        patience = self.s.early_stopping_patience
        if patience is not None and self.wait >= patience:
            return improved, (f"{self.s.monitor} did not improve by more than {self.s.min_delta:g} in {patience} "
                              f"evaluation(s) (best {self.best} at evaluation {self.best_index})")
        return improved, ""


def checkpoint_path(template: str, index: int, line: dict[str, Any]) -> str:
    """ModelCheckpoint's filepath for evaluation `index` (0-based): {epoch} counts evaluations from 1."""
    try:
        return template.format(epoch=index + 1, **line)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"ModelCheckpoint filepath {template!r}: cannot fill in {exc}; it may use {{epoch}}, "
                          f"{{val_auc}} and {{val_loss}}") from None


class Scalars:
    """TensorBoard scalars through tf.summary. tf.summary.scalar lives in the tensorboard package, which a
    TensorFlow install may lack; tf.summary.write with the scalars plug-in's metadata is what it writes."""

    def __init__(self, log_dir: str) -> None:
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self.tf = tf
        self.metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        self.writer = tf.summary.create_file_writer(log_dir)

    def write(self, step: int, values: dict[str, float]) -> None:
        tf = self.tf
        with self.writer.as_default():
            for tag, value in values.items():
                tf.summary.write(tag, tf.constant(float(value), tf.float32), step=int(step), metadata=self.metadata)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

"""The talk's churn network, width configurable.

    (batch, days, features)
    → BatchNorm → GRU(h, return_sequences) → Dropout 0.5
    → BatchNorm → GRU(h) → Dropout 0.5
    → BatchNorm → Dense(2, softmax)

Adam and categorical cross-entropy, as in the talk. With h = 512 and 50
features the model has 2,447,562 weights (BatchNorm statistics included),
the size the parameter-server benchmarks use.

Import this module only where TensorFlow is wanted: it imports Keras.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from models.outputs import targets


@dataclass(frozen=True)
class ModelConfig:
    days: int
    features: int
    hidden: int = 64  # the talk used 512; 64 trains in minutes on 2 cores with little loss of AUC
    dropout: float = 0.5  # the talk's value: the data sets are small next to the model
    learning_rate: float = 1e-3  # Adam's default
    optimizer: str = "adam"  # "adam", "nadam" (Adam with Nesterov momentum, for EAMSGD), "sgd" or "nesterov" (SGD + 0.9)
    seed: int = 0


def build_model(cfg: ModelConfig) -> keras.Model:
    keras.utils.set_random_seed(cfg.seed)
    inputs = keras.Input(shape=(cfg.days, cfg.features), name="events")  # (batch, days, features)
    x = keras.layers.BatchNormalization()(inputs)
    x = keras.layers.GRU(cfg.hidden, return_sequences=True)(x)  # (batch, days, hidden)
    x = keras.layers.Dropout(cfg.dropout)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GRU(cfg.hidden)(x)  # (batch, hidden)
    x = keras.layers.Dropout(cfg.dropout)(x)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="churn")(x)  # (batch, 2): [stays, churns]
    model = keras.Model(inputs, outputs, name="churn_gru")
    compile_model(model, cfg.optimizer, cfg.learning_rate)
    return model


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate)
    if name == "nadam":
        return keras.optimizers.Nadam(learning_rate)
    if name == "nesterov":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown local optimizer {name!r}; expected adam, nadam, sgd or nesterov")


def compile_model(model: keras.Model, optimizer: str = "adam", learning_rate: float = 1e-3,
                  loss: object = "categorical_crossentropy") -> None:
    """The run's local optimizer at its rate; the loss: the GRU's, or the one a user's model was compiled with."""
    model.compile(optimizer=make_optimizer(optimizer, learning_rate), loss=loss)


def one_hot(y: np.ndarray) -> np.ndarray:
    """(batch,) 0/1 labels → (batch, 2) float32 targets."""
    return targets(y, "categorical")

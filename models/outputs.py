"""What a binary churn classifier outputs and trains on, written either way a Keras user would.

    Dense(1, sigmoid)  + binary cross-entropy                    → P(churn) = column 0; targets y as (batch, 1)
    Dense(2, softmax)  + categorical cross-entropy (the GRU's)   → P(churn) = column 1; targets one-hot (batch, 2)
    Dense(2, softmax)  + sparse categorical cross-entropy        → P(churn) = column 1; targets y as (batch,)

Losses on logits (`from_logits=True`) and every other loss are refused: the
scores written to test_scores.csv and by `notpu predict` are the model's own
outputs, so they must be probabilities. No Keras import here: predict and the
evaluator only need the numpy side.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from models.errors import DataError

#: loss kind → (units of the output layer, its activation)
OUTPUTS = {"binary": (1, "sigmoid"), "categorical": (2, "softmax"), "sparse_categorical": (2, "softmax")}

_LOSS_NAMES = {
    "binary_crossentropy": "binary", "bce": "binary", "binarycrossentropy": "binary",
    "categorical_crossentropy": "categorical", "cce": "categorical", "categoricalcrossentropy": "categorical",
    "sparse_categorical_crossentropy": "sparse_categorical", "scce": "sparse_categorical",
    "sparsecategoricalcrossentropy": "sparse_categorical",
}


def loss_kind(loss: Any) -> str:
    """"binary", "categorical" or "sparse_categorical" from a serialised Keras loss (a name, or the dict
    `model.get_compile_config()["loss"]` holds); anything else is a DataError naming it."""
    name, config = loss, {}
    if isinstance(loss, dict):
        config = loss.get("config") if isinstance(loss.get("config"), dict) else {}
        name = loss.get("config") if loss.get("class_name") == "function" else loss.get("class_name")
    kind = _LOSS_NAMES.get(str(name).lower()) if isinstance(name, str) else None
    if kind is None:
        raise DataError(f"loss {name!r}: notpu trains binary classifiers: compile with loss='binary_crossentropy' on "
                        f"Dense(1, activation='sigmoid'), or 'categorical_crossentropy' (or "
                        f"'sparse_categorical_crossentropy') on Dense(2, activation='softmax')")
    if config.get("from_logits"):
        raise DataError(f"loss {name} with from_logits=True: the scores must be probabilities; end the model with "
                        f"activation='{OUTPUTS[kind][1]}' and compile with from_logits=False")
    return kind


def targets(y: np.ndarray, kind: str) -> np.ndarray:
    """0/1 labels (batch,) as the loss `kind` wants them (see the module docstring)."""
    y = np.asarray(y)
    if kind == "binary":
        return y.astype(np.float32).reshape(-1, 1)  # (batch, 1)
    if kind == "sparse_categorical":
        return y.astype(np.int32)  # (batch,)
    out = np.zeros((len(y), 2), np.float32)  # (batch, 2): [stays, churns]
    out[np.arange(len(y)), y.astype(np.int64)] = 1.0
    return out


def churn_probability(pred: np.ndarray) -> np.ndarray:
    """P(churn) from a model's output (batch, 1) sigmoid or (batch, 2) softmax → (batch,)."""
    pred = np.asarray(pred)
    if pred.ndim != 2 or pred.shape[1] not in (1, 2):
        raise DataError(f"the model outputs shape {pred.shape}; a churn model outputs (customers, 1) from a sigmoid "
                        f"or (customers, 2) from a softmax")
    return pred[:, 0] if pred.shape[1] == 1 else pred[:, 1]

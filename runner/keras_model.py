"""Your own Keras model in a run: what of it travels to the workers, checked before any process starts.

A compiled Keras model travels as two JSON documents in the run config that
every worker receives from the coordinator (and the evaluator with MODEL):
its architecture (`model.to_json()`) and its compile config
(`model.get_compile_config()`). Workers and the evaluator import the run's
`custom_modules` first (where `keras.saving.register_keras_serializable`
classes live), rebuild the model with `keras.models.model_from_json`, and
compile it with the model's own loss and the rule's local optimizer (the
rule's equations are stated for Adam, Nadam or SGD; your optimizer's
learning rate is the base rate the rule scales, unless you give one).

`describe` refuses at once, with a message naming what to change, what the
workers could not train or the evaluator could not score: an uncompiled
model, several inputs or outputs, an input shape other than the data's
(steps, features), an output that is not one binary probability (see
`models.outputs`), a custom layer defined in `__main__` or a notebook, or an
architecture too large for a command line.

Import this module lazily: `describe` and `build_for_run` import Keras.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import DataError
from models.outputs import OUTPUTS, loss_kind
from pserver.errors import ConfigError

log = logging.getLogger(__name__)

#: The run config reaches the server as one command-line argument, which Linux caps at 128 KiB.
MAX_ARCHITECTURE_BYTES = 100_000

_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # model.to_json()
    compile_config: dict[str, Any]  # model.get_compile_config(), JSON-able
    custom_modules: tuple[str, ...]  # to import before deserialising, in this order
    learning_rate: float | None  # the model's optimizer's rate, if a plain number
    kind: str  # models.outputs loss kind: binary, categorical, sparse_categorical


def import_custom(modules) -> None:
    """Import the modules holding registered custom objects; an import error names the module."""
    for name in modules or ():
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure of a user's module is reported the same way
            raise ConfigError(f"custom module {name!r} cannot be imported ({type(exc).__name__}: {exc}); "
                              f"it must be importable on every host (PYTHONPATH)") from None


def module_roots(modules) -> list[str]:
    """The sys.path entries the modules were imported from, so child processes can import them too."""
    roots = []
    for name in modules or ():
        mod = sys.modules.get(name) or importlib.import_module(name)
        file = getattr(mod, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        depth = name.count(".") + (2 if path.name == "__init__.py" else 1)
        root = str(path.parents[depth - 1])
        if root not in roots:
            roots.append(root)
    return roots


def _output_layer(model):
    history = getattr(model.outputs[0], "_keras_history", None)
    return history[0] if history else model.layers[-1]


def _activation(layer) -> str | None:
    import keras

    if type(layer).__name__ == "Softmax":
        return "softmax"
    fn = getattr(layer, "activation", None)
    if fn is None:
        return None
    name = keras.activations.serialize(fn)
    return name if isinstance(name, str) else None


def _custom_layer_modules(model) -> list[str]:
    """Modules of the model's layer classes that are not Keras' own; a class from __main__ is refused."""
    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        module = type(layer).__module__
        if module.split(".")[0] == "keras":
            continue
        if module == "__main__" or module.startswith("__"):
            raise ConfigError(f"layer class {type(layer).__name__} is defined in {module}: workers cannot import it; "
                              f"move it to a module, decorate it with @keras.saving.register_keras_serializable() "
                              f"and pass that module in custom_modules")
        if module not in found:
            found.append(module)
    return found


def describe(model, steps: int, features: int, custom_modules=(), what: str = "the model") -> ModelSpec:
    """Check that `model` can be trained and scored here; returns what travels to the workers."""
    import keras

    if not isinstance(model, keras.Model):
        raise ConfigError(f"{what} is a {type(model).__name__}, not a keras.Model")
    if not getattr(model, "compiled", False) or getattr(model, "loss", None) is None:
        raise ConfigError(f"{what} is not compiled; call model.compile(optimizer='adam', loss='binary_crossentropy') "
                          f"(or a softmax output with 'categorical_crossentropy') first")
    if len(model.inputs) != 1:
        raise ConfigError(f"{what} has {len(model.inputs)} inputs; notpu feeds one (batch, steps, features) tensor")
    if len(model.outputs) != 1:
        raise ConfigError(f"{what} has {len(model.outputs)} outputs; notpu trains one binary churn output "
                          f"(multi-output and regression models are not supported)")
    got = tuple(model.input_shape[1:])
    if len(got) != 2 or any(g is not None and g != w for g, w in zip(got, (steps, features))):
        raise ConfigError(f"{what} takes inputs of shape {got}; the data's are (steps, features) = ({steps}, "
                          f"{features}): build it on keras.Input(shape=({steps}, {features}))")
    compile_config = model.get_compile_config() or {}
    try:
        kind = loss_kind(compile_config.get("loss"))
    except DataError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    units, activation = OUTPUTS[kind]
    out_shape = tuple(model.output_shape)
    found = _activation(_output_layer(model))
    if len(out_shape) != 2 or out_shape[-1] != units or found != activation:
        raise ConfigError(f"{what} outputs shape {out_shape} with activation {found}; its loss ({kind} cross-entropy) "
                          f"needs Dense({units}, activation='{activation}') as the last layer: notpu trains binary "
                          f"churn classifiers, not regression or multi-class models")
    modules = tuple(dict.fromkeys([*(custom_modules or ()), *_custom_layer_modules(model)]))
    import_custom(modules)
    architecture = model.to_json()
    if len(architecture.encode()) > MAX_ARCHITECTURE_BYTES:
        raise ConfigError(f"{what}'s architecture JSON is {len(architecture.encode()) // 1024} KiB; the run config "
                          f"carries at most {MAX_ARCHITECTURE_BYTES // 1024} KiB (it reaches the server on a command "
                          f"line): use fewer layers")
    try:
        keras.models.model_from_json(architecture)
    except Exception as exc:  # noqa: BLE001 - whatever Keras raises, the workers would raise too
        raise ConfigError(f"{what} cannot be rebuilt from its JSON ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                          f"decorate custom layers with @keras.saving.register_keras_serializable() in a module "
                          f"passed in custom_modules") from None
    lr = None
    optimizer = compile_config.get("optimizer")
    if isinstance(optimizer, dict) and isinstance(optimizer.get("config", {}).get("learning_rate"), (int, float)):
        lr = float(f"{optimizer['config']['learning_rate']:.7g}")  # float32 0.0099999998 → 0.01
    return ModelSpec(architecture=architecture, compile_config=_jsonable(compile_config), custom_modules=modules,
                     learning_rate=lr, kind=kind)


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    import json

    try:
        return json.loads(json.dumps(config))
    except (TypeError, ValueError):  # an optimizer or metric that does not serialise: the loss is what travels
        return {"loss": json.loads(json.dumps(config.get("loss")))}


def from_builder(spec: str, steps: int, features: int, seed: int = 0) -> ModelSpec:
    """`--model package.module:build`: import it, call build(steps, features), check what it returned."""
    if not _SPEC.match(spec or ""):
        raise ConfigError(f"--model {spec!r}: expected package.module:function, e.g. mymodels.churn:build")
    module, name = spec.split(":")
    if os.getcwd() not in sys.path:  # `notpu` (a console script) does not put the current directory on sys.path
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"--model {spec}: cannot import {module} ({type(exc).__name__}: {exc})") from None
    build = getattr(mod, name, None)
    if not callable(build):
        raise ConfigError(f"--model {spec}: {module} has no function {name}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(seed)
    try:
        model = build(steps, features)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"--model {spec}: {name}({steps}, {features}) raised {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return describe(model, steps, features, custom_modules=(module,),
                    what=f"--model {spec}: what {name}({steps}, {features}) returned")


def save_initial_weights(model, path: Path) -> str:
    """The weights the centre starts from, for workers on this host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, *model.get_weights())
    return str(path)


def build_for_run(run: dict[str, Any], optimizer: str = "adam", learning_rate: float = 1e-3, seed: int = 0):
    """A worker's or the evaluator's copy of the run's own model, compiled with its loss and the given optimizer."""
    import_custom(run.get("custom_modules"))
    import keras

    from models.gru import compile_model

    keras.utils.set_random_seed(seed)
    model = keras.models.model_from_json(_uncompiled(run["architecture"]))
    compile_model(model, optimizer, learning_rate, loss=loss_object(run.get("compile_config") or {}))
    if run.get("initial_weights"):
        with np.load(run["initial_weights"]) as saved:
            model.set_weights([saved[f"arr_{i}"] for i in range(len(saved.files))])
    return model


def _uncompiled(architecture: str) -> str:
    """The architecture without the compile config `model.to_json()` carries. Rebuilt with it, the model is
    compiled with the user's metrics, which a later `compile` does not remove: every training step would
    compute them (and a metric that fails would stop the worker). The evaluator measures them instead."""
    import json

    config = json.loads(architecture)
    config.pop("compile_config", None)
    return json.dumps(config)


def loss_object(compile_config: dict[str, Any]):
    import keras

    loss = compile_config.get("loss") or "categorical_crossentropy"
    if isinstance(loss, dict) and loss.get("class_name") == "function":
        loss = loss.get("config")
    return keras.losses.get(loss)


def run_kind(run: dict[str, Any]) -> str:
    """The loss kind the run's targets take: the GRU's categorical, or the run's own model's."""
    if not run.get("architecture"):
        return "categorical"
    return loss_kind((run.get("compile_config") or {}).get("loss"))


class CompiledMetrics:
    """The metrics and weighted metrics a user's model was compiled with, measured on the evaluator's predictions.

    Named as Keras names them in `History.history` (`metrics=["AUC"]` is "AUC", `AUC(name="auc_pr")` is
    "auc_pr", `weighted_metrics=["accuracy"]` beside `metrics=["accuracy"]` is "weighted_accuracy"), resolved
    as Keras' `compile` resolves them ("accuracy" on a sigmoid output is binary accuracy) by Keras' own
    `CompileMetrics` (from keras.src: the one place that knows those rules). Rows carry no sample weights, so
    a weighted metric equals its plain one. A metric that cannot be built or measured is dropped with a
    warning naming it: a metric never stops a run.
    """

    def __init__(self, compile_config: dict[str, Any] | None, kind: str) -> None:
        config = compile_config or {}
        self.kind = kind
        self._metrics = self._resolve(config.get("metrics"))
        self._weighted = self._resolve(config.get("weighted_metrics"))
        self._compiled = None
        self.failed = False

    @staticmethod
    def _resolve(metrics) -> list:
        import keras

        if metrics is None:
            return []
        if isinstance(metrics, dict) and "class_name" not in metrics:  # per output name: one output here
            metrics = [m for ms in metrics.values() for m in (ms if isinstance(ms, (list, tuple)) else [ms])]
        if not isinstance(metrics, (list, tuple)):
            metrics = [metrics]
        out = []
        for m in metrics:
            try:
                out.append(keras.metrics.deserialize(m) if isinstance(m, dict) else m)
            except Exception as exc:  # noqa: BLE001 - a custom metric whose module is not imported, ...
                log.warning("metric %s cannot be rebuilt (%s: %s); it is not reported",
                            m.get("class_name") if isinstance(m, dict) else m, type(exc).__name__, exc)
        return out

    def __bool__(self) -> bool:
        return bool(self._metrics or self._weighted) and not self.failed

    def measure(self, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        """{name: value} on 0/1 labels y (customers,) and the model's outputs pred (customers, units)."""
        if not self:
            return {}
        from keras.src.trainers.compile_utils import CompileMetrics

        from models.outputs import targets

        y_true = targets(y, self.kind)
        try:
            if self._compiled is None:
                self._compiled = CompileMetrics(self._metrics or None, self._weighted or None)
                self._compiled.build(y_true, pred)
            self._compiled.reset_state()
            self._compiled.update_state(y_true, pred)
            return {name: float(value) for name, value in self._compiled.result().items()}
        except Exception as exc:  # noqa: BLE001 - whatever a user's metric raises, training goes on
            self.failed = True
            log.warning("the model's compiled metrics cannot be measured (%s: %s); val_auc and val_loss still are",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return {}


def metric_keys(line: dict[str, Any], measured: dict[str, float], prefix: str = "val_") -> dict[str, float]:
    """`measured` as history keys val_<name>; a name that would shadow one already in `line` (a metric named
    "auc" beside our val_auc) takes the first free suffix _1, _2, ..."""
    out: dict[str, float] = {}
    for name, value in measured.items():
        key, n = f"{prefix}{name}", 0
        while key in line or key in out:
            n += 1
            key = f"{prefix}{name}_{n}"
        out[key] = round(value, 6) if math.isfinite(value) else value
    return out

"""`runner.prepare` and `runner.predict`: the data commands from Python, on a pandas DataFrame or a file.

    from runner import prepare, fit, predict

    data = prepare(events_df, out="prepared/")             # or a CSV / Parquet path; the options of `notpu prepare`
    result = fit(model, data, out="run/", workers=2)       # model built for (data.steps, data.features)
    scores = predict("run/", new_events_df)                # DataFrame id, churn_probability

They build the same frozen configs as `notpu prepare` and `notpu predict` (models.prepare.PrepareConfig,
models.predict.PredictConfig), so each default has one home and the errors are the same `DataError`s.
Event types the training log never had become a `warnings.warn` (`UnseenTypesWarning`) rather than a log line.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

from models.errors import DataError
from models.events import EventColumns, EventSource


class UnseenTypesWarning(UserWarning):
    """The new events have event types the training log never had; they were scored as 'other'."""


@dataclass(frozen=True)
class Prepared:
    """A prepared DIR: pass it wherever a path goes (`fit(model, data, ...)`, `notpu train`), read its shape here."""

    dir: Path
    spec: dict[str, Any]  # DIR/spec.json

    def __fspath__(self) -> str:
        return str(self.dir)

    @property
    def steps(self) -> int:
        return int(self.spec["window"]["steps"])

    @property
    def features(self) -> int:
        return len(self.spec["features"])

    @property
    def customers(self) -> int:
        return int(self.spec["counts"]["customers_kept"])

    @property
    def churn_rate(self) -> float:
        return float(self.spec["counts"]["churn_rate"])


def _columns(columns: EventColumns | dict[str, str] | None) -> EventColumns | None:
    if columns is None or isinstance(columns, EventColumns):
        return columns
    if not isinstance(columns, dict) or not set(columns) <= {"id", "time", "type", "value"}:
        raise DataError(f"columns={columns!r}: pass a dict with some of the keys id, time, type, value "
                        "(the names of those columns in the events)")
    return EventColumns(**columns)


def prepare(events: EventSource, *, out: str | os.PathLike, columns: EventColumns | dict[str, str] | None = None,
            **options: Any) -> Prepared:
    """`notpu prepare` on a DataFrame of events or a CSV/Parquet path; writes DIR `out` and returns it.

    `options` are PrepareConfig's: cutoff, observation_days, label_days, session_type, min_sessions,
    min_active_days, max_types, bucket_days, engine (a DataFrame needs engine "local"), master, parts.
    `columns` names the four columns when they are not id, timestamp, event_type, event_value.
    """
    from models.prepare import PrepareConfig, prepare as run_prepare

    allowed = {f.name for f in fields(PrepareConfig)} - {"events", "out", "columns"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DataError(f"prepare() got unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    if not isinstance(events, (pd.DataFrame, str, os.PathLike)):
        raise DataError(f"events is a {type(events).__name__}; pass a pandas DataFrame or the path of a CSV or "
                        "Parquet event log")
    cols = _columns(columns)
    spec = run_prepare(PrepareConfig(events=events if isinstance(events, pd.DataFrame) else str(events), out=str(out),
                                     **({"columns": cols} if cols else {}), **options))
    return Prepared(dir=Path(out), spec=spec)


def predict(model: str | os.PathLike | Any, events: EventSource, *, out: str | os.PathLike | None = None,
            spec: str | os.PathLike | None = None, cutoff: str | None = None,
            columns: EventColumns | dict[str, str] | None = None, custom_modules: tuple[str, ...] = (),
            batch_size: int | None = None) -> pd.DataFrame:
    """Churn probabilities for every customer with events in the spec's window: a DataFrame `id, churn_probability`.

    `model` is a RUN directory (from `fit` or `notpu train`; its FitResult works too) or a model.keras file;
    `events` a DataFrame or a CSV/Parquet path; `out`, if given, also gets the scores as CSV. `spec` defaults
    to the one beside the model, `columns` to the names in the spec.
    """
    from models.predict import score

    events = events if isinstance(events, pd.DataFrame) else str(events)
    scores, warning = score(predict_config(model, events, out=out, spec=spec, cutoff=cutoff, columns=columns,
                                           custom_modules=custom_modules, batch_size=batch_size))
    if warning:
        warnings.warn(warning, UnseenTypesWarning, stacklevel=2)
    return scores


def predict_config(model: str | os.PathLike | Any, events: Any, *, out: str | os.PathLike | None = None,
                   spec: str | os.PathLike | None = None, cutoff: str | None = None,
                   columns: EventColumns | dict[str, str] | None = None, custom_modules: tuple[str, ...] = (),
                   batch_size: int | None = None, engine: str = "local"):  # noqa: ANN201 - PredictConfig, lazily
    """The PredictConfig `predict`'s arguments make; `events`: a path, or a pandas or Spark DataFrame kept as it is."""
    from models.predict import PredictConfig, load_spec, model_file

    if hasattr(model, "model_path"):  # a FitResult
        model = model.model_path
    if not isinstance(model, (str, os.PathLike)):
        raise DataError(f"model is a {type(model).__name__}; pass a RUN directory, RUN/model.keras or a FitResult")
    cols = _columns(columns)
    if isinstance(columns, dict):  # the names given, the rest as in the spec
        spec_cols = load_spec(model_file(model), None if spec is None else str(spec))["columns"]
        cols = EventColumns(**{**spec_cols, **columns})
    return PredictConfig(model=str(model), events=str(events) if isinstance(events, (str, os.PathLike)) else events,
                         out=None if out is None else str(out), spec=None if spec is None else str(spec),
                         cutoff=cutoff, columns=cols, custom_modules=tuple(custom_modules), engine=engine,
                         **({} if batch_size is None else {"batch_size": batch_size}))

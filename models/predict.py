"""`notpu predict`: score new events with a trained model and the spec it was trained on.

The spec (types, aggregations, scaling, window length, days per step) is applied unchanged: types
the spec does not know go to 'other', and the observation window is the spec's
number of days up to the end of the new log (or up to --cutoff). Every customer
with at least one event in that window gets a score.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from models.errors import DataError
from models.events import DAY_S, EventColumns, check_columns, iter_events, last_timestamp
from models.features import AGGREGATIONS, SCALING, DailyAggregator, Window
from models.fileio import atomic_path
from models.outputs import churn_probability
from models.prepare import OTHER, SPEC_FORMAT, iso, parse_cutoff, type_index

log = logging.getLogger(__name__)

PROGRESS_MIN_ROWS = 20_000  # below this a progress bar is noise


@dataclass(frozen=True)
class PredictConfig:
    model: str
    events: str
    out: str
    spec: str | None = None  # default: spec.json next to the model
    cutoff: str | None = None  # default: the end of the new log's last UTC day
    batch_size: int = 1024  # customers per forward pass
    columns: EventColumns | None = field(default=None)  # default: the column names in the spec
    # Modules holding the model's registered custom layers, imported before loading; those recorded in
    # RUN/summary.json (run_config.custom_modules, written by `notpu train`) are tried as well.
    custom_modules: tuple[str, ...] = ()


def load_spec(model_path: Path, spec_path: str | None) -> dict:
    path = Path(spec_path) if spec_path else model_path.parent / "spec.json"
    if not path.is_file():
        raise DataError(f"{path}: no feature spec; pass --spec DIR/spec.json (the one `notpu prepare` wrote)")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}); pass the spec.json that `notpu prepare` wrote") from None
    if spec.get("format") != SPEC_FORMAT or spec.get("scaling", {}).get("name") != SCALING \
            or spec.get("aggregations") != list(AGGREGATIONS) or OTHER not in spec.get("types", []):
        raise DataError(f"{path}: not a {SPEC_FORMAT} feature spec; re-run `notpu prepare` with this version")
    return spec


def build_features(events: str, spec: dict, columns: EventColumns, cutoff: str | None) -> tuple[DailyAggregator, np.ndarray]:
    """Aggregate the new log with the spec; returns the aggregator and its rows sorted by id."""
    check_columns(events, columns)
    end = parse_cutoff(cutoff) if cutoff else (last_timestamp(events, columns) // DAY_S + 1) * DAY_S
    days = int(spec["window"]["observation_days"])
    bucket = int(spec["window"].get("bucket_days", 1))  # specs written before buckets existed are daily
    types = list(spec["types"])
    agg = DailyAggregator(Window(start_s=end - days * DAY_S, days=days, bucket_days=bucket), len(types))
    for b in iter_events(events, columns):
        inside = (b.ts_s >= agg.window.start_s) & (b.ts_s < agg.window.end_s)
        cust = agg.encode(b.id_codes, b.id_uniques, inside)
        agg.add(cust, b.ts_s, type_index(b.type_uniques, types)[b.type_codes], b.value)
    if agg.n_customers == 0:
        raise DataError(f"{events}: no events between {iso(agg.window.start_s)} and {iso(end)}; check --cutoff")
    rows = np.argsort(agg.ids(), kind="stable")
    newcomers = int((agg.active_days() < spec.get("filter", {}).get("min_active_days", 0)).sum())
    if newcomers:
        log.info("%d of %d customers have fewer active days than the training filter; their scores are less reliable",
                 newcomers, agg.n_customers)
    return agg, rows


def predict(cfg: PredictConfig) -> pd.DataFrame:
    """Write `id,churn_probability` to cfg.out (atomically) and return it."""
    model_path = Path(cfg.model)
    if not model_path.is_file():
        raise DataError(f"{model_path}: no such model; pass RUN/model.keras written by `notpu train`")
    spec = load_spec(model_path, cfg.spec)
    columns = cfg.columns or EventColumns(**spec["columns"])
    agg, rows = build_features(cfg.events, spec, columns, cfg.cutoff)
    model = _load_keras(model_path, cfg.custom_modules)
    want = (agg.window.steps, len(spec["types"]) * len(AGGREGATIONS))
    got = tuple(model.input_shape[1:])
    if len(got) != len(want) or any(g is not None and g != w for g, w in zip(got, want)):
        raise DataError(f"{model_path}: model takes (steps, features) = {got}, the spec gives {want}; pass the matching --spec")

    import keras
    from tqdm import tqdm

    probs = np.empty(rows.size, np.float32)  # (customers,)
    starts = range(0, rows.size, cfg.batch_size)
    for i in tqdm(starts, desc="predict", unit="batch", disable=rows.size < PROGRESS_MIN_ROWS):
        x = agg.block(rows[i:i + cfg.batch_size])  # (b, steps, features) float32
        probs[i:i + x.shape[0]] = churn_probability(keras.ops.convert_to_numpy(model(x, training=False)))
    scores = pd.DataFrame({"id": agg.ids()[rows], "churn_probability": probs})
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        scores.to_csv(tmp, index=False, float_format="%.6f")
    log.info("scored %d customers -> %s (mean churn probability %.3f)", len(scores), out, float(probs.mean()))
    return scores


def recorded_custom_modules(model_path: Path) -> list[str]:
    """The custom modules the training run recorded next to the model (RUN/summary.json), if any."""
    summary = model_path.parent / "summary.json"
    try:
        modules = json.loads(summary.read_text()).get("run_config", {}).get("custom_modules") or []
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    return [m for m in modules if isinstance(m, str)]


def _load_keras(path: Path, custom_modules: tuple[str, ...] = ()):  # noqa: ANN202 - keras is imported lazily
    # TensorFlow is imported here only: the rest of the CLI must start fast.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import importlib

    import keras

    for name in custom_modules:  # asked for: must import
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure of a user's module is reported the same way
            raise DataError(f"--custom-module {name}: cannot be imported ({type(exc).__name__}: {exc}); "
                            "put its directory on PYTHONPATH") from None
    missing = []
    for name in recorded_custom_modules(path):  # recorded by the run: needed only if the model uses them
        if name in custom_modules:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001
            missing.append(f"{name} ({type(exc).__name__})")
    try:
        return keras.models.load_model(path, compile=False)
    except (ValueError, OSError, TypeError) as exc:
        hint = (f"; the run recorded custom module(s) {', '.join(missing)} that cannot be imported here: put them "
                "on PYTHONPATH or pass --custom-module") if missing else ""
        raise DataError(f"{path}: cannot load the Keras model ({str(exc).splitlines()[0]}){hint}") from None

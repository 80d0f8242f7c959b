"""`notpu predict`: score new events with a trained model and the spec it was trained on.

The spec (types, aggregations, scaling, window length, days per step) is applied unchanged: types
the spec does not know go to 'other' (with a warning naming those the training log never had),
and the observation window is the spec's number of days up to the end of the new log (or up to
--cutoff). Every customer with at least one event in that window gets a score. Events come
from a CSV or Parquet file or a pandas DataFrame; every field of the spec is checked on load.
`models.spark_predict` (--engine spark) applies the spec with this module's functions.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from models.errors import DataError
from models.events import DAY_S, EventColumns, EventSource, check_columns, iter_events, last_timestamp, source_name
from models.features import AGGREGATIONS, SCALING, DailyAggregator, Window, feature_names
from pserver.fileio import atomic_path
from models.outdir import check_file_out
from models.outputs import churn_probability
from models.prepare_plan import ENGINES, MAX_OBSERVATION_DAYS, OTHER, SPEC_FORMAT, iso, parse_cutoff, type_index

log = logging.getLogger(__name__)

PROGRESS_MIN_ROWS = 20_000  # below this a progress bar is noise
UNSEEN_SHOWN = 10  # unseen event types a warning names, the most frequent first


@dataclass(frozen=True)
class PredictConfig:
    model: str  # RUN/model.keras, or the RUN directory
    events: EventSource  # a CSV or Parquet path, or a pandas DataFrame; --engine spark: any path Spark reads
    out: str | None  # scores.csv; None: write nothing, return the scores
    spec: str | None = None  # default: spec.json next to the model
    cutoff: str | None = None  # default: the end of the new log's last UTC day
    batch_size: int = 1024  # customers per forward pass
    columns: EventColumns | None = field(default=None)  # default: the column names in the spec
    # Modules holding the model's registered custom layers, imported before loading; those recorded in
    # RUN/summary.json (run_config.custom_modules, written by `notpu train`) are tried as well.
    custom_modules: tuple[str, ...] = ()
    engine: str = "local"  # "local": numpy and Keras here; "spark": Spark executors (models.spark_predict)
    master: str | None = None  # --engine spark: the Spark master URL; None: local[*]


def model_file(model: str | Path) -> Path:
    """RUN/model.keras for a RUN directory, else the path itself; DataError if there is no model."""
    path = Path(model)
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise DataError(f"{path}: no such model; pass RUN/model.keras written by `notpu train` (or the RUN directory)")
    return path


def load_spec(model_path: Path, spec_path: str | None) -> dict:
    path = Path(spec_path) if spec_path else model_path.parent / "spec.json"
    if not path.is_file():
        raise DataError(f"{path}: no feature spec; pass --spec DIR/spec.json (the one `notpu prepare` wrote)")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}); pass the spec.json that `notpu prepare` wrote") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file; pass the spec.json that `notpu prepare` wrote") from None
    return validate_spec(spec, path)


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"the number {value!r}" if isinstance(value, (int, float)) else type(value).__name__)


def validate_spec(spec: object, path: Path | str) -> dict:
    """`spec` if every field predict reads is what `notpu prepare` writes; else DataError naming the field and file."""
    fix = "re-run `notpu prepare`, or pass the spec.json it wrote with --spec"

    def bad(name: str, value: object, want: str) -> DataError:
        shown = repr(value) if isinstance(value, (str, int, float, bool)) and not isinstance(value, bool) else _kind(value)
        return DataError(f"{path}: field {name} is {shown}; expected {want}; {fix}")

    def whole(name: str, value: object, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise bad(name, value, f"a whole number from {low} to {high}")
        return value

    def obj(name: str, value: object) -> dict:
        if not isinstance(value, dict):
            raise bad(name, value, "an object")
        return value

    if not isinstance(spec, dict):
        raise DataError(f"{path}: holds {_kind(spec)}, not a {SPEC_FORMAT} object; {fix}")
    if spec.get("format") != SPEC_FORMAT:
        raise bad("format", spec.get("format"), repr(SPEC_FORMAT))
    if obj("scaling", spec.get("scaling")).get("name") != SCALING:
        raise bad("scaling.name", spec["scaling"].get("name"), repr(SCALING))
    if spec.get("aggregations") != list(AGGREGATIONS):
        raise bad("aggregations", spec.get("aggregations"), f"the list {list(AGGREGATIONS)}")
    types = spec.get("types")
    if not isinstance(types, list) or not types or not all(isinstance(t, str) and t for t in types):
        raise bad("types", types, "a list of event type names")
    dupes = sorted({t for t in types if types.count(t) > 1})
    if dupes:
        raise DataError(f"{path}: field types names {', '.join(map(repr, dupes))} more than once; each type once; {fix}")
    if OTHER not in types:
        raise DataError(f"{path}: field types has no {OTHER!r}, where unknown types go; {fix}")
    others = spec.get("other_types", [])
    if not isinstance(others, list) or not all(isinstance(t, str) for t in others):
        raise bad("other_types", others, "a list of event type names")
    if "features" in spec and spec["features"] != feature_names(types):
        raise DataError(f"{path}: field features does not match field types ({len(types)} types x "
                        f"{len(AGGREGATIONS)} aggregations); {fix}")
    columns = obj("columns", spec.get("columns"))
    roles = ("id", "time", "type", "value")
    if sorted(columns) != sorted(roles):
        raise DataError(f"{path}: field columns has keys {sorted(columns)}; expected {list(roles)}; {fix}")
    for role in roles:
        if not isinstance(columns[role], str) or not columns[role]:
            raise bad(f"columns.{role}", columns[role], "a column name")
    window = obj("window", spec.get("window"))
    days = whole("window.observation_days", window.get("observation_days"), 1, MAX_OBSERVATION_DAYS)
    bucket = whole("window.bucket_days", window.get("bucket_days", 1), 1, days)  # older specs: daily
    if "steps" in window and window["steps"] != -(-days // bucket):
        raise bad("window.steps", window["steps"], f"{-(-days // bucket)} (observation_days / bucket_days, rounded up)")
    whole("filter.min_active_days", obj("filter", spec.get("filter", {})).get("min_active_days", 0), 0,
          MAX_OBSERVATION_DAYS)
    return spec


def window_end(cutoff: str | None, last_s: Callable[[], int]) -> int:
    """The window's end: --cutoff, else the end of the UTC day of the log's last event (`last_s()`)."""
    return parse_cutoff(cutoff) if cutoff else (last_s() // DAY_S + 1) * DAY_S


def observation_window(spec: dict, end_s: int) -> Window:
    """The spec's observation window (its days, in its steps) ending at end_s."""
    days = int(spec["window"]["observation_days"])
    bucket = int(spec["window"].get("bucket_days", 1))  # specs written before buckets existed are daily
    return Window(start_s=end_s - days * DAY_S, days=days, bucket_days=bucket)


def known_types(spec: dict) -> pd.Index:
    """The types the training log had: the kept ones and those folded into 'other'."""
    return pd.Index(list(spec["types"]) + list(spec.get("other_types", [])))


def lists_every_type(spec: dict) -> bool:
    """Whether the spec's other_types name every type of the training log (not cut at the recorded maximum)."""
    return bool(spec.get("other_types_complete")) and "other_types" in spec


def no_events_error(source: str, window: Window) -> DataError:
    return DataError(f"{source}: no events between {iso(window.start_s)} and {iso(window.end_s)}; check --cutoff")


def log_newcomers(newcomers: int, customers: int) -> None:
    if newcomers:
        log.info("%d of %d customers have fewer active days than the training filter; their scores are less reliable",
                 newcomers, customers)


def min_active_days(spec: dict) -> int:
    return int(spec.get("filter", {}).get("min_active_days", 0))


def build_features(events: EventSource, spec: dict, columns: EventColumns,
                   cutoff: str | None) -> tuple[DailyAggregator, np.ndarray, str | None]:
    """Aggregate the new log with the spec: the aggregator, its rows sorted by id, and a warning naming the
    event types the training log never had (None if there are none)."""
    check_columns(events, columns)
    window = observation_window(spec, window_end(cutoff, lambda: last_timestamp(events, columns)))
    types = list(spec["types"])
    known = known_types(spec)
    unseen: dict[str, int] = {}
    inside_total = 0
    agg = DailyAggregator(window, len(types))
    for b in iter_events(events, columns):
        inside = (b.ts_s >= agg.window.start_s) & (b.ts_s < agg.window.end_s)
        cust = agg.encode(b.id_codes, b.id_uniques, inside)
        agg.add(cust, b.ts_s, type_index(b.type_uniques, types)[b.type_codes], b.value)
        inside_total += int(inside.sum())
        new = np.flatnonzero(known.get_indexer(b.type_uniques) < 0)  # distinct types of this batch, few
        if new.size:
            n = np.bincount(b.type_codes[inside], minlength=len(b.type_uniques))[new]
            for name, count in zip(b.type_uniques[new], n):
                if count:
                    unseen[str(name)] = unseen.get(str(name), 0) + int(count)
    if agg.n_customers == 0:
        raise no_events_error(source_name(events), window)
    rows = np.argsort(agg.ids(), kind="stable")
    log_newcomers(int((agg.active_days() < min_active_days(spec)).sum()), agg.n_customers)
    return agg, rows, unseen_warning(source_name(events), unseen, inside_total, lists_every_type(spec))


def unseen_warning(source: str, unseen: dict[str, int], total: int, complete: bool) -> str | None:
    """One line naming the types the training log never had, with their event counts; None if none."""
    if not unseen:
        return None
    ranked = sorted(unseen.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{name!r} ({n:,})" for name, n in ranked[:UNSEEN_SHOWN])
    more = f" and {len(ranked) - UNSEEN_SHOWN} more" if len(ranked) > UNSEEN_SHOWN else ""
    never = "the training log never had" if complete else "outside the spec's kept types"
    return (f"{source}: {sum(unseen.values()):,} of {total:,} events in the window have event types {never}, "
            f"scored as {OTHER!r}: {shown}{more}; if they matter, prepare and train on a log that has them")


def check_engine(cfg: PredictConfig) -> None:
    if cfg.engine not in ENGINES:
        raise DataError(f"--engine {cfg.engine!r}: not one of {', '.join(ENGINES)}")
    if cfg.engine != "spark" and cfg.master is not None:
        raise DataError("--master applies to --engine spark only; add --engine spark or leave it out")


def predict(cfg: PredictConfig) -> pd.DataFrame:
    """Write `id,churn_probability` to cfg.out (atomically) and return it; unseen types are a logged warning.

    This is the local engine; `models.spark_predict.predict_spark` scores with ``engine="spark"`` (the CLI
    picks one by --engine).
    """
    check_engine(cfg)
    if cfg.engine == "spark":
        raise DataError("engine 'spark' scores with models.spark_predict.predict_spark (or runner.spark.predict)")
    scores, warning = score(cfg)
    if warning:
        log.warning("%s", warning)
    return scores


def score(cfg: PredictConfig) -> tuple[pd.DataFrame, str | None]:
    """(`id,churn_probability` for every customer in the window, the unseen-types warning or None).

    Everything is checked before any scoring (the model and spec files, the spec's fields, --out, the
    cut-off); cfg.out, if given, is written atomically at the end.
    """
    model_path = model_file(cfg.model)
    spec = load_spec(model_path, cfg.spec)
    if cfg.out is not None:
        check_file_out(Path(cfg.out), example="scores.csv")
    if cfg.cutoff is not None:
        parse_cutoff(cfg.cutoff)
    columns = cfg.columns or EventColumns(**spec["columns"])
    agg, rows, warning = build_features(cfg.events, spec, columns, cfg.cutoff)
    model = load_keras(model_path, cfg.custom_modules)
    check_model_shape(model, model_path, spec, agg.window)

    from tqdm import tqdm

    probs = np.empty(rows.size, np.float32)  # (customers,)
    starts = range(0, rows.size, cfg.batch_size)
    for i in tqdm(starts, desc="predict", unit="batch", disable=rows.size < PROGRESS_MIN_ROWS):
        x = agg.block(rows[i:i + cfg.batch_size])  # (b, steps, features) float32
        probs[i:i + x.shape[0]] = probabilities(model, x)
    scores = pd.DataFrame({"id": agg.ids()[rows], "churn_probability": probs})
    if cfg.out is not None:
        write_scores(scores, Path(cfg.out))
    return scores, warning


def check_model_shape(model, model_path: Path, spec: dict, window: Window) -> None:  # noqa: ANN001 - a Keras model
    """DataError unless the model takes the (steps, features) the spec gives."""
    want = (window.steps, len(spec["types"]) * len(AGGREGATIONS))
    got = tuple(model.input_shape[1:])
    if len(got) != len(want) or any(g is not None and g != w for g, w in zip(got, want)):
        raise DataError(f"{model_path}: model takes (steps, features) = {got}, the spec gives {want}; "
                        "pass the matching --spec")


def probabilities(model, x: np.ndarray) -> np.ndarray:  # noqa: ANN001 - a Keras model
    """P(churn) (b,) float32 for features x (b, steps, features): one forward pass."""
    import keras

    return churn_probability(keras.ops.convert_to_numpy(model(x, training=False))).astype(np.float32, copy=False)


def write_scores(scores: pd.DataFrame, out: Path) -> None:
    """`id,churn_probability` as one CSV file, written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        scores.to_csv(tmp, index=False, float_format="%.6f")
    log.info("scored %d customers -> %s (mean churn probability %.3f)", len(scores), out,
             float(scores["churn_probability"].mean()))


def recorded_custom_modules(model_path: Path) -> list[str]:
    """The custom modules the training run recorded next to the model (RUN/summary.json), if any."""
    summary = model_path.parent / "summary.json"
    try:
        modules = json.loads(summary.read_text()).get("run_config", {}).get("custom_modules") or []
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    return [m for m in modules if isinstance(m, str)]


def load_keras(path: Path, custom_modules: tuple[str, ...] = ()):  # noqa: ANN202 - keras is imported lazily
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

"""`notpu predict --engine spark`: the local path's scores, with the features built and scored by Spark executors.

The spec is applied as `models.predict` applies it (the same window, types, `other` and warning), and the
features come from `notpu prepare --engine spark`'s code (`models.spark_prepare`):

1. `read_events`/`event_frame` and `survey`: the log's bad rows refused as prepare refuses them, and its
   last event, which ends the window unless --cutoff does; the events of each type inside the window
   (from the survey's (type, day) counts, or one more aggregation when --cutoff falls inside a day) give
   the unseen-type warning;
2. `cells` of (customer, window day, type), range-partitioned by id and sorted within each partition;
   each task folds whole customers, `batch_size` at a time, into the local path's `DailyAggregator`
   (`aggregate_cells`) and scores their features with one forward pass, so a task holds one batch of
   customers whatever its partition's size. The Keras model is loaded once per executor Python worker.

The scores come back as a DataFrame `id, churn_probability` sorted by id. Written, a path ending .csv (or
.csv.gz) is one CSV file gathered on the driver, as the local path writes it; any other path a Parquet
directory of part files. Both are staged beside --out and renamed at the end, so a failure leaves it as it
was. Everything is checked first: the model and spec files, the spec's fields, --out, the cut-off, that the
model loads and takes the spec's (steps, features) and outputs a probability. The model's path must be
one every executor can read (any path in local[N], a shared mount on a cluster).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from models.errors import DataError
from models.events import DAY_S, FRAME, EventColumns, is_frame
from models.features import AGGREGATIONS, Window
from models.outdir import check_file_out, check_parent, check_replaceable, staged_dir
from models.predict import (PredictConfig, check_model_shape, known_types, lists_every_type, load_keras, load_spec,
                            log_newcomers, min_active_days, model_file, no_events_error, observation_window,
                            probabilities, unseen_warning, window_end, write_scores)
from models.prepare_plan import LogSurvey, Plan, parse_cutoff
from models.spark_prepare import aggregate_cells, cells, event_frame, read_events, source_format, survey
from models.spark_session import spark_session, stop_spark

log = logging.getLogger(__name__)

SCORES_SCHEMA = "id string, churn_probability float"
CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_MARKER = "_SUCCESS"  # what Spark writes into a finished Parquet directory
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")

#: (model path, mtime in ns) -> the Keras model, in each executor's Python worker: loaded by its first task.
MODEL_CACHE: dict[tuple[str, int], Any] = {}


@dataclass(frozen=True)
class ScoreJob:
    """What each task needs, shipped in its closure."""

    model: str  # model.keras's absolute path, seen by every executor
    custom_modules: tuple[str, ...]
    plan: Plan
    batch_size: int  # customers per forward pass
    min_active_days: int  # the training filter, for the newcomers count
    newcomers: Any  # accumulators: customers below the filter, customers scored
    customers: Any


def is_csv(out: str) -> bool:
    return out.lower().endswith(CSV_SUFFIXES)


def out_path(out: str) -> Path:
    """--out as a local path; DataError for a URI other than file://."""
    if "://" in out and not out.startswith("file://"):
        raise DataError(f"--out {out}: scores are staged and renamed on a filesystem path; pass a local path, or a "
                        "shared mount (NFS) that the driver and every executor see")
    return Path(out.removeprefix("file://"))


def check_out(out: str) -> None:
    """Refuse --out before any work: a CSV path that is a directory, a Parquet directory holding other files."""
    path = out_path(out)
    if is_csv(out):
        check_file_out(path, example="scores.csv")
        return
    if path.exists() and not path.is_dir():
        raise DataError(f"--out {path}: is a file; Parquet scores are a directory: pass a new directory, or a path "
                        "ending .csv for one CSV file")
    check_parent(path, "--out", "pass a path such as scores.parquet or scores.csv")
    check_replaceable(path, marker=PARQUET_MARKER)


def spark_events(spark: Any, events: Any, columns: EventColumns) -> tuple[Any, str]:
    """(events as `event_frame` rows, how messages name them) from a Spark DataFrame or a path/URI Spark reads."""
    if is_frame(events):
        raise DataError("--engine spark reads files or Spark DataFrames: write the pandas DataFrame to Parquet "
                        "first, or use engine='local'")
    from pyspark.sql import DataFrame

    if isinstance(events, DataFrame):
        return event_frame(events, FRAME, columns), FRAME
    path = str(events)
    return read_events(spark, path, source_format(path), columns), path


def window_type_counts(ev: Any, s: LogSurvey, window: Window) -> pd.Series:
    """Events per type name inside the window: from pass 1's counts per (type, UTC day) when the window is
    whole days (unless --cutoff falls inside a day), else one more aggregation."""
    if window.start_s % DAY_S == 0:
        day = s.type_day.index.get_level_values("day")
        inside = s.type_day[(day >= window.start_s // DAY_S) & (day < window.end_s // DAY_S)]
        n = inside.groupby(level="type").sum()
        return pd.Series(n.to_numpy(np.int64), index=s.type_names[n.index.to_numpy()])
    from pyspark.sql import functions as F

    rows = (ev.where((F.col("ts") >= window.start_s) & (F.col("ts") < window.end_s))
            .groupBy("type").count().collect())  # one row per type
    return pd.Series([r["count"] for r in rows], index=[r["type"] for r in rows], dtype=np.int64)


def check_model(model_path: Path, cfg: PredictConfig, spec: dict, window: Window) -> None:
    """The model loads here, takes the spec's (steps, features) and outputs P(churn): what the executors will need."""
    model = load_keras(model_path, cfg.custom_modules)
    check_model_shape(model, model_path, spec, window)
    probabilities(model, np.zeros((1, window.steps, len(spec["types"]) * len(AGGREGATIONS)), np.float32))


def score_frame(spark: Any, cfg: PredictConfig) -> tuple[Any, str | None, ScoreJob]:
    """(the lazy DataFrame `id, churn_probability` of every customer in the window, sorted by id; the unseen-types
    warning or None; the job, whose accumulators count the newcomers once the frame is computed).

    Everything is checked here, before any scoring; pass 1 runs here (one aggregation, two with a --cutoff
    inside a day)."""
    model_path = model_file(cfg.model)
    spec = load_spec(model_path, cfg.spec)
    if cfg.out is not None:
        check_out(cfg.out)
    if cfg.cutoff is not None:
        parse_cutoff(cfg.cutoff)
    if cfg.batch_size < 1:
        raise DataError(f"batch_size {cfg.batch_size}: must be at least 1")
    columns = cfg.columns or EventColumns(**spec["columns"])
    ev, source = spark_events(spark, cfg.events, columns)
    s = survey(ev, source, columns)
    window = observation_window(spec, window_end(cfg.cutoff, lambda: s.last_s))
    counts = window_type_counts(ev, s, window)
    if int(counts.sum()) == 0:
        raise no_events_error(source, window)
    unseen = counts[(known_types(spec).get_indexer(counts.index) < 0) & (counts.to_numpy() > 0)]
    warning = unseen_warning(source, {str(k): int(v) for k, v in unseen.items()}, int(counts.sum()),
                             lists_every_type(spec))
    check_model(model_path, cfg, spec, window)
    sc = spark.sparkContext
    plan = Plan(cutoff_s=window.end_s, label_end_s=window.end_s, window=window, types=list(spec["types"]))
    job = ScoreJob(model=str(model_path.resolve()), custom_modules=tuple(cfg.custom_modules), plan=plan,
                   batch_size=cfg.batch_size, min_active_days=min_active_days(spec), newcomers=sc.accumulator(0),
                   customers=sc.accumulator(0))
    scores = (cells(ev, plan, session_type=None).repartitionByRange(sc.defaultParallelism, "id")
              .sortWithinPartitions("id")
              .mapInArrow(partial(score_part, job), SCORES_SCHEMA))
    return scores, warning, job


def whole_customers(batches: Iterable[pa.RecordBatch], customers: int) -> Iterator[pa.Table]:
    """The rows of a partition sorted by id, regrouped into tables of whole customers, at least `customers`
    of them each (the last table: the rest)."""
    held: list[pa.RecordBatch] = []
    done, last = 0, None  # customers whose rows have all arrived; the id of the newest row
    for b in batches:
        if b.num_rows == 0:
            continue
        ids = b.column("id").to_numpy(zero_copy_only=False)
        done += int(np.count_nonzero(ids[1:] != ids[:-1])) + int(last is not None and ids[0] != last)
        last = ids[-1]
        held.append(b)
        if done >= customers:
            table = pa.Table.from_batches(held)
            cut = int(np.flatnonzero(table.column("id").to_numpy() != last)[-1]) + 1  # the newest id's first row
            yield table.slice(0, cut)
            held, done = table.slice(cut).to_batches(), 0
    if held:
        yield pa.Table.from_batches(held)


def limit_threads(cpus: int) -> None:
    """TensorFlow's thread pools to the task's cores; read when TensorFlow is imported, so before that."""
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(max(cpus, 1)))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cached_model(path: str, custom_modules: tuple[str, ...]) -> Any:
    """The Keras model at `path`, loaded once per Python worker and again only when the file changes."""
    key = (path, os.stat(path).st_mtime_ns)
    if key not in MODEL_CACHE:
        for old in [k for k in MODEL_CACHE if k[0] == path]:
            del MODEL_CACHE[old]
        MODEL_CACHE[key] = load_keras(Path(path), custom_modules)
    return MODEL_CACHE[key]


def score_part(job: ScoreJob, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """One task: its partition's cells (sorted by id) -> `id, churn_probability`, a batch of customers at a time."""
    from pyspark import TaskContext

    limit_threads(TaskContext.get().cpus())
    model = None  # loaded by the first table: a partition without customers needs no TensorFlow
    for table in whole_customers(batches, job.batch_size):
        if model is None:
            model = cached_model(job.model, job.custom_modules)
        agg = aggregate_cells(job.plan, table.to_batches())
        rows = np.argsort(agg.ids(), kind="stable")
        for i in range(0, rows.size, job.batch_size):
            block = rows[i:i + job.batch_size]
            probs = probabilities(model, agg.block(block))  # (b,) from (b, steps, features)
            yield pa.RecordBatch.from_arrays([pa.array(agg.ids()[block], pa.string()), pa.array(probs, pa.float32())],
                                             names=["id", "churn_probability"])
        job.newcomers.add(int((agg.active_days() < job.min_active_days).sum()))
        job.customers.add(agg.n_customers)


@contextlib.contextmanager
def executor_errors() -> Iterator[None]:
    """A DataError raised in an executor (a model path it cannot read, say) as the one-line DataError it was."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - Spark wraps a task's exception in its own types
        found = re.search(r"models\.errors\.DataError: (.+)", str(exc))
        if found is None:
            raise
        raise DataError(found.group(1).strip()) from None


def write_csv(scores: Any, path: Path) -> pd.DataFrame:
    """The scores gathered on the driver and written as the local path writes them; returns them."""
    with executor_errors():
        frame = scores.toArrow().to_pandas()  # (customers,) rows in id order: the partitions are id ranges
    write_scores(frame, path)
    return frame


def write_parquet(scores: Any, path: Path) -> int:
    """The scores as a Parquet directory, a file per partition; returns how many were written."""
    with executor_errors(), staged_dir(path) as tmp:
        scores.write.mode("overwrite").parquet(str(tmp.resolve()))
        written = scores.sparkSession.read.parquet(str(tmp.resolve())).selectExpr(
            "count(*) AS n", "avg(churn_probability) AS mean").first()
    log.info("scored %d customers -> %s (mean churn probability %.3f)", written["n"], path,
             float(written["mean"] or 0.0))
    return int(written["n"])


def predict_frame(spark: Any, cfg: PredictConfig) -> tuple[Any, str | None]:
    """(the scores as a DataFrame on `spark`, the unseen-types warning or None).

    Without cfg.out the frame is lazy: each action on it scores again. With cfg.out the scores are written
    first and the frame returned holds them: read back from the Parquet directory, or the CSV's values as
    the driver gathered them.
    """
    scores, warning, job = score_frame(spark, cfg)
    if cfg.out is None:
        return scores, warning
    path = out_path(cfg.out)
    if is_csv(cfg.out):
        written = spark.createDataFrame(write_csv(scores, path), schema=SCORES_SCHEMA)
    else:
        write_parquet(scores, path)
        written = spark.read.parquet(str(path.resolve()))
    log_newcomers(job.newcomers.value, job.customers.value)
    return written, warning


def predict_spark(cfg: PredictConfig, spark: Any = None) -> int:
    """`notpu predict --engine spark`: score and write cfg.out; returns the number of customers scored.

    `spark`: a session to use (and leave running); None starts one on `cfg.master` and stops it.
    """
    if cfg.out is None:
        raise DataError("--engine spark writes its scores: pass --out scores.csv or a Parquet directory")
    load_spec(model_file(cfg.model), cfg.spec)  # the cheap checks, before a JVM starts
    check_out(cfg.out)
    own = spark is None
    if own:
        spark = spark_session(cfg.master, app="notpu-predict")
    try:
        scores, warning, job = score_frame(spark, cfg)
        if warning:
            log.warning("%s", warning)
        path = out_path(cfg.out)
        n = len(write_csv(scores, path)) if is_csv(cfg.out) else write_parquet(scores, path)
        log_newcomers(job.newcomers.value, job.customers.value)
        return n
    finally:
        if own:
            stop_spark(spark)

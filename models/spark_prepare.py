"""`notpu prepare --engine spark`: the local path's tensor, computed by Spark SQL, written in parts.

The same two passes as `models.prepare` (and the same `models.prepare_plan`), over any CSV/Parquet path Spark reads
(a file, a directory, a glob, an hdfs:// or s3a:// URI):

1. one aggregation to the counts of each (type, UTC day), with the last event
   and the counts of bad ids, types, timestamps and values; the driver gathers
   that small table and decides the cut-off, window and kept types with the
   same `prepare.plan` as the local path;
2. one aggregation to cells of (customer, window day, type): count, finite
   values, their sum, min and max; in the same scan, each customer's sessions
   in the label window. The customers are range-partitioned by id (ranges, not
   hashes: the parts laid end to end are then the local path's id order) into P parts; the
   task of part k folds its cells into steps, filters newcomers and builds the
   features with the local path's `DailyAggregator` (`add_cells`, `block`), and
   writes DIR/parts/part-k itself. The driver gets one row per part back.

So the driver never holds events, cells or features: its memory is set by the
number of types, days and parts, not by the log. The parts layout and how a
worker reads its part are `models.dataset`'s (`load_part`, `num_parts`).

DIR must be a path the driver and every executor can write: a local directory
with local[N], a shared mount (NFS) on a cluster. It is staged beside DIR and
renamed at the end like the local path's, so a failure leaves DIR as it was.
"""
from __future__ import annotations

import glob
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from models.dataset import part_dir, write_part, write_parts_index
from models.errors import DataError
from models.events import DAY_S, MAX_PLAUSIBLE_UNIX_S, EventColumns, check_column_names, detect_format
from models.features import AGGREGATIONS, BLOCK_ROWS, DailyAggregator
from models.outdir import check_replaceable, staged_dir
from models.prepare_plan import OTHER, LogSurvey, Plan, PrepareConfig, iso, kept_rows, make_spec, plan
from models.spark_session import spark_session, stop_spark

log = logging.getLogger(__name__)

SUMMARY_FIELDS = ("part", "seen", "kept", "churned")  # what each part's task hands the driver, all int64


def source_format(path: str) -> str:
    """'parquet' or 'csv' for a file, directory or glob: by suffix, else by the local files it names."""
    name = path.rstrip("/").lower()
    if name.endswith((".parquet", ".pq", ".csv", ".csv.gz")):
        return detect_format(Path(name))
    local = path[len("file://"):] if path.startswith("file://") else None if "://" in path else path
    if local is not None:
        names = [p for p in (Path(local).rglob("*") if Path(local).is_dir() else map(Path, glob.glob(local)))
                 if p.is_file() and not p.name.startswith(("_", "."))]
        found = {detect_format(p) for p in names if p.name.lower().endswith((".parquet", ".pq", ".csv", ".csv.gz"))}
        if len(found) == 1:
            return found.pop()
        if not names:
            raise DataError(f"{path}: no such file, or no files in that directory or glob; "
                            "pass a CSV or Parquet event log, a directory of them or a glob")
    raise DataError(f"{path}: cannot tell CSV from Parquet; name the files *.csv, *.csv.gz or *.parquet, "
                    f"or pass a glob such as {path.rstrip('/')}/*.parquet")


def _quoted(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def read_events(spark: Any, path: str, fmt: str, columns: EventColumns) -> Any:
    """The log as a DataFrame of id, ts (unix seconds, null if unparseable), type, value, and what `survey` reports."""
    from pyspark.errors import AnalysisException

    try:
        reader = spark.read.option("header", True).option("inferSchema", False) if fmt == "csv" else spark.read
        df = reader.csv(path) if fmt == "csv" else reader.parquet(path)
    except AnalysisException as exc:
        first = str(exc).splitlines()[0]
        if "PATH_NOT_FOUND" in first or "does not exist" in first:
            raise DataError(f"{path}: no such file, directory or glob match; pass a CSV or Parquet event log") from None
        raise DataError(f"{path}: cannot read as {fmt} ({first})") from None
    return event_frame(df, path, columns)


def event_frame(df: Any, path: str, columns: EventColumns) -> Any:
    """A DataFrame of events (any column types Spark reads) as id, ts, type, value and the bad-row markers
    `survey` checks; `path` names it in errors."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    check_column_names(path, df.columns, columns, ("id", "time", "type", "value"))
    kinds = {f.name: f.dataType for f in df.schema.fields}
    time_raw, value_raw = F.col(_quoted(columns.time)), F.col(_quoted(columns.value))
    tk, vk = kinds[columns.time], kinds[columns.value]
    if isinstance(tk, (T.TimestampType, T.TimestampNTZType, T.DateType)):
        # Spark timestamps are UTC instants; naive ones (NTZ) we take as UTC, as the local path does.
        ts = F.floor(F.unix_micros(time_raw.cast("timestamp")) / 1_000_000)
    elif isinstance(tk, T.IntegralType):
        ts = time_raw.cast("long")
    elif isinstance(tk, (T.FloatType, T.DoubleType, T.DecimalType)):
        ts = F.when(~F.isnan(time_raw.cast("double")) & (F.abs(time_raw.cast("double")) < float("inf")),
                    F.floor(time_raw.cast("double")))
    elif isinstance(tk, T.StringType):
        as_float = time_raw.try_cast("double")
        ts = F.coalesce(time_raw.try_cast("long"),
                        F.when(~F.isnan(as_float) & (F.abs(as_float) < float("inf")), F.floor(as_float)),
                        F.floor(F.unix_micros(time_raw.try_cast("timestamp")) / 1_000_000))
    else:
        raise DataError(f"{path}: column {columns.time!r} has type {tk.simpleString()}; "
                        "expected unix seconds or ISO 8601 text")
    if isinstance(vk, T.StringType):
        value = value_raw.try_cast("double")
        bad_value = value_raw.isNotNull() & (F.trim(value_raw) != "") & value.isNull()
    elif isinstance(vk, (T.NumericType, T.BooleanType)):
        value, bad_value = value_raw.cast("double"), F.lit(False)
    else:
        raise DataError(f"{path}: column {columns.value!r} is not numeric ({vk.simpleString()}); "
                        "pass numbers or leave empty")
    return df.select(
        F.col(_quoted(columns.id)).cast("string").alias("id"),
        ts.cast("long").alias("ts"),
        F.col(_quoted(columns.type)).cast("string").alias("type"),
        value.alias("value"),
        time_raw.isNull().alias("time_null"),
        # Text only for the rows in error: a cast per event would cost more than the survey itself.
        F.when(time_raw.isNotNull() & ts.isNull(), time_raw.cast("string")).alias("bad_time"),
        F.when(bad_value, value_raw.cast("string")).alias("bad_value"),
    )


def survey(ev: Any, path: str, columns: EventColumns) -> LogSurvey:
    """Pass 1 as one Spark aggregation; DataError for the bad rows the local path refuses, named as it names them."""
    from pyspark.sql import functions as F

    rows = (ev.groupBy("type", F.floor(F.col("ts") / DAY_S).alias("day"))
            .agg(F.count(F.lit(1)).alias("n"), F.max("ts").alias("last"), F.min("ts").alias("first"),
                 F.count(F.when(F.col("id").isNull(), 1)).alias("null_ids"),
                 F.count(F.when(F.col("time_null"), 1)).alias("null_times"),
                 F.min("bad_time").alias("bad_time"), F.min("bad_value").alias("bad_value"))
            .collect())  # (types x days) rows, however many events
    t = pd.DataFrame([r.asDict() for r in rows], columns=["type", "day", "n", "last", "first", "null_ids",
                                                          "null_times", "bad_time", "bad_value"])
    events = int(t["n"].sum())
    if events == 0:
        raise DataError(f"{path}: no events (only a header or no rows); pass a log with at least one event")
    for column, count in ((columns.id, int(t["null_ids"].sum())), (columns.type, int(t.loc[t["type"].isna(), "n"].sum()))):
        if count:
            raise DataError(f"{path}: column {column!r} has {count} empty values; fill or drop those rows")
    if int(t["null_times"].sum()):
        raise DataError(f"{path}: column {columns.time!r} has {int(t['null_times'].sum())} empty timestamps; "
                        "fill or drop those rows")
    if t["bad_time"].notna().any():
        raise DataError(f"{path}: column {columns.time!r}: cannot parse {t['bad_time'].dropna().min()!r} as "
                        "unix seconds or ISO 8601; fix or drop such rows")
    if t["bad_value"].notna().any():
        raise DataError(f"{path}: column {columns.value!r} is not numeric ({t['bad_value'].dropna().min()!r}); "
                        "pass numbers or leave empty")
    last, first = int(t["last"].max()), int(t["first"].min())
    if last > MAX_PLAUSIBLE_UNIX_S or first < -MAX_PLAUSIBLE_UNIX_S:
        raise DataError(f"{path}: column {columns.time!r} has values like {last}, beyond the year 2200; "
                        "convert milliseconds/nanoseconds to unix seconds")
    codes, names = pd.factorize(t["type"], sort=True)
    counts = pd.Series(t["n"].to_numpy(np.int64),
                       index=pd.MultiIndex.from_arrays([codes.astype(np.int64), t["day"].to_numpy(np.int64)],
                                                       names=["type", "day"]))
    return LogSurvey(events, last, np.asarray(names, dtype=str), counts.groupby(level=[0, 1]).sum())


@dataclass(frozen=True)
class PartJob:
    """What each part's task needs, shipped in its closure (no session conf, no driver state)."""

    cfg: PrepareConfig
    plan: Plan
    staged: str  # the staged DIR's absolute path, seen by every executor


def aggregate_cells(p: Plan, batches: Iterable[pa.RecordBatch]) -> DailyAggregator:
    """`cells` rows (any subset of the customers, each customer's rows all there) folded into the local path's
    aggregator: the cells into steps, the label rows (day -1) into the tally."""
    agg = DailyAggregator(p.window, len(p.types))
    for b in batches:
        if b.num_rows == 0:
            continue
        col = {name: b.column(name).to_numpy(zero_copy_only=False) for name in b.schema.names}
        codes, uniques = pd.factorize(col["id"])
        cust = agg.encode(codes.astype(np.int64), np.asarray(uniques, dtype=object), np.ones(b.num_rows, bool))
        cell = col["day"] >= 0  # label rows carry day -1
        agg.add_cells(cust[cell], col["day"][cell], col["t"][cell], col["n"][cell], col["nval"][cell],
                      col["total"][cell], col["low"][cell], col["high"][cell])
        agg.add_tally(cust[~cell], col["n"][~cell])
    return agg


def build_part(job: PartJob, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """One part's task: its customers' cells -> DIR/parts/part-k (rows sorted by id); yields one summary row."""
    from pyspark import TaskContext

    k = TaskContext.get().partitionId()
    agg = aggregate_cells(job.plan, batches)
    kept, y = kept_rows(job.cfg, agg)
    write_part(part_dir(job.staged, k), (agg.block(kept[i:i + BLOCK_ROWS]) for i in range(0, kept.size, BLOCK_ROWS)),
               (kept.size, job.plan.window.steps, agg.n_types * len(AGGREGATIONS)), y, agg.ids()[kept], agg.active[kept])
    summary = dict(zip(SUMMARY_FIELDS, (k, agg.n_customers, int(kept.size), int(y.sum()))))
    yield pa.RecordBatch.from_pydict({name: [v] for name, v in summary.items()},
                                     schema=pa.schema([(name, pa.int64()) for name in SUMMARY_FIELDS]))


def cells(ev: Any, p: Plan, session_type: str | None) -> Any:
    """Pass 2's rows, from one scan: a cell per (customer, window day, type), and per customer with
    sessions in the label window a row of day -1 whose `n` is their count (none if `session_type` is None,
    as at predict time). The windows do not overlap, so an event lands in one row or none."""
    from pyspark.sql import functions as F

    w, ts = p.window, F.col("ts")
    type_of = F.create_map(*[F.lit(x) for i, name in enumerate(p.types) for x in (name, i)])
    other = p.types.index(OTHER)  # types outside the kept ones go where the type named OTHER does
    in_obs = (ts >= w.start_s) & (ts < p.cutoff_s)
    in_label = ((F.col("type") == session_type) & (ts >= p.cutoff_s) & (ts < p.label_end_s)
                if session_type is not None else F.lit(False))
    finite = F.col("value").isNotNull() & ~F.isnan("value") & (F.abs("value") < float("inf"))
    return (ev.where(in_obs | in_label)
            .select("id",
                    F.when(in_obs, ((ts - w.start_s) / DAY_S).cast("int")).otherwise(-1).alias("day"),
                    F.when(in_obs, F.coalesce(type_of[F.col("type")], F.lit(other))).otherwise(-1).alias("t"),
                    F.when(finite, F.col("value")).alias("v"))  # NaN/inf/empty: counted, no value
            .groupBy("id", "day", "t")
            .agg(F.count(F.lit(1)).alias("n"), F.count("v").alias("nval"),
                 F.coalesce(F.sum("v"), F.lit(0.0)).alias("total"),
                 F.coalesce(F.min("v"), F.lit(float("inf"))).alias("low"),
                 F.coalesce(F.max("v"), F.lit(float("-inf"))).alias("high")))


def prepare_spark(cfg: PrepareConfig, spark: Any = None) -> dict:
    """Both passes on Spark; writes DIR in the parts layout and returns the spec (also DIR/spec.json).

    `spark`: a session to use (and leave running); None starts one on `cfg.master` and stops it.
    """
    if "://" in cfg.out and not cfg.out.startswith("file://"):
        raise DataError(f"--out {cfg.out}: parts are written by the executors to a filesystem path; pass a local "
                        "directory, or a shared mount (NFS) that every executor sees")
    out = Path(cfg.out.removeprefix("file://"))
    check_replaceable(out, marker="spec.json")
    fmt = source_format(cfg.events)
    own = spark is None
    if own:
        spark = spark_session(cfg.master)
    try:
        t0 = time.perf_counter()
        ev = read_events(spark, cfg.events, fmt, cfg.columns)
        s = survey(ev, cfg.events, cfg.columns)
        p = plan(cfg, s)
        t1 = time.perf_counter()
        log.info("pass 1: %d events in %.1fs; cut-off %s, %d types kept", s.events, t1 - t0, iso(p.cutoff_s),
                 len(p.types) - 1)
        n_parts = cfg.parts or spark.sparkContext.defaultParallelism
        with staged_dir(out) as tmp:
            staged = str(tmp.resolve())
            job = PartJob(cfg=cfg, plan=p, staged=staged)
            summary = (cells(ev, p, cfg.session_type).repartitionByRange(n_parts, "id")
                       .mapInArrow(partial(build_part, job), ", ".join(f"{f} long" for f in SUMMARY_FIELDS))
                       .collect())  # one row per part
            by_part = {int(r["part"]): r for r in summary}
            for k in set(range(n_parts)) - set(by_part):  # a part with no customers: its task may not have run
                _write_empty_part(staged, k, p)
            rows = [int(by_part[k]["kept"]) if k in by_part else 0 for k in range(n_parts)]
            spec = make_spec(cfg, p, fmt, events=s.events, seen=sum(int(r["seen"]) for r in summary),
                             kept=sum(rows), churned=sum(int(r["churned"]) for r in summary))
            write_parts_index(tmp, rows)
            (tmp / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        elapsed = time.perf_counter() - t0
        log.info("prepared %d customers in %d parts x %d steps of %d day(s) x %d features in %.1fs (%.0f events/s) -> %s",
                 sum(rows), n_parts, p.window.steps, p.window.bucket_days, len(spec["features"]), elapsed,
                 s.events / elapsed, out)
        return spec
    finally:
        if own:
            stop_spark(spark)


def _write_empty_part(staged: str, k: int, p: Plan) -> None:
    steps, features = p.window.steps, len(p.types) * len(AGGREGATIONS)
    write_part(part_dir(staged, k), iter(()), (0, steps, features), np.zeros(0, np.int8), np.zeros(0, dtype="<U1"),
               np.zeros((0, p.window.days), bool))


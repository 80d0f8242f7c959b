"""`notpu prepare`: event log -> X.npy, y.npy, ids.npy, spec.json.

Two streaming passes over the log, each one batch (~1M events) at a time:

1. timestamps and types only: the last event (for the default cut-off) and how
   often each type occurs per day (to choose the kept types inside the window);
2. everything: aggregates per customer and step (a day, or a bucket of days)
   in the observation window, and the session count in the label window.

Output is written into a temporary directory beside DIR and renamed at the end,
so a failure leaves DIR as it was.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from models.events import (DAY_S, CodeBook, EventColumns, EventSource, check_columns, detect_format, is_frame,
                           iter_events, source_name)
from models.features import AGGREGATIONS, BLOCK_ROWS, SCALING, DailyAggregator, Window, auto_bucket_days, feature_names
from models.outdir import check_replaceable, staged_dir
from models.errors import DataError

log = logging.getLogger(__name__)

OTHER = "other"  # the bucket for types outside the kept ones (and, at predict time, unknown types)
SPEC_FORMAT = "notpu-churn-spec/1"
ENGINES = ("local", "spark")
# Longest observation window: a century of days. Beyond it the window reaches past the timestamps a log can hold
# (MAX_PLAUSIBLE_UNIX_S), and the tensor's steps axis alone would be absurd.
MAX_OBSERVATION_DAYS = 36_525
# The types folded into 'other' are recorded in the spec (so that predict can tell a type it never saw from a
# rare one), up to this many: a log whose event_type is really free text must not make spec.json huge.
MAX_RECORDED_OTHER_TYPES = 10_000
# What --cutoff accepts: an ISO 8601 date or date-time, with an optional offset (none means UTC).
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}(:?\d{2})?)?")


@dataclass(frozen=True)
class PrepareConfig:
    events: EventSource  # a CSV or Parquet path, or (local engine) a pandas DataFrame of events
    out: str
    cutoff: str | None = None  # ISO date/time (UTC if no offset); default: label_days before the log's end
    observation_days: int = 90
    label_days: int = 21  # the talk: churn = fewer than 2 sessions in the first 3 weeks after the cut-off
    session_type: str = "connect"
    min_sessions: int = 2
    min_active_days: int = 7  # the talk: no newcomers, > 7 game days
    max_types: int = 50  # kept types + 'other'; the talk: 50 types x 5 functions = 250 features
    columns: EventColumns = field(default_factory=EventColumns)
    bucket_days: int | None = None  # days per time step; None: `auto_bucket_days(observation_days)`
    engine: str = "local"  # "local": numpy on this machine; "spark": Spark SQL (models.spark_prepare)
    master: str | None = None  # --engine spark: the Spark master URL; None: local[*]
    parts: int | None = None  # --engine spark: files under DIR/parts/; None: Spark's default parallelism



def parse_cutoff(text: str, option: str = "--cutoff") -> int:
    """Unix seconds of an ISO date or date-time; no offset means UTC."""
    if not isinstance(text, str) or not ISO_DATE.fullmatch(text.strip()):
        raise DataError(f"{option} {text!r}: not an ISO date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS, "
                        "such as 2024-03-01 (UTC unless an offset such as +02:00 follows)")
    try:
        ts = pd.Timestamp(text.strip())
    except (ValueError, TypeError):
        raise DataError(f"{option} {text!r}: not a date; use ISO 8601 such as 2024-03-01 or 2024-03-01T00:00:00Z") from None
    if ts is pd.NaT:
        raise DataError(f"{option} {text!r}: not a date; use ISO 8601 such as 2024-03-01")
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return int(ts.value // 1_000_000_000)


def iso(ts_s: int) -> str:
    return pd.Timestamp(ts_s, unit="s", tz="UTC").isoformat().replace("+00:00", "Z")


def _check_options(cfg: PrepareConfig) -> None:
    for option, value, low in (("--observation-days", cfg.observation_days, 1), ("--label-days", cfg.label_days, 1),
                               ("--min-sessions", cfg.min_sessions, 1), ("--min-active-days", cfg.min_active_days, 0),
                               ("--max-types", cfg.max_types, 2), ("--bucket-days", 1 if cfg.bucket_days is None else cfg.bucket_days, 1)):
        if value < low:
            raise DataError(f"{option} {value}: must be at least {low}")
    if cfg.observation_days > MAX_OBSERVATION_DAYS:
        raise DataError(f"--observation-days {cfg.observation_days}: more than {MAX_OBSERVATION_DAYS} days (a century); "
                        "pass the days of history before the cut-off")
    if cfg.cutoff is not None:
        parse_cutoff(cfg.cutoff)  # before a pass over the log
    if cfg.engine not in ENGINES:
        raise DataError(f"--engine {cfg.engine!r}: not one of {', '.join(ENGINES)}")
    if cfg.engine != "spark":
        given = [flag for flag, value in (("--master", cfg.master), ("--parts", cfg.parts)) if value is not None]
        if given:
            raise DataError(f"{' and '.join(given)} apply to --engine spark only; add --engine spark or leave them out")
    if cfg.engine == "spark" and is_frame(cfg.events):
        raise DataError("--engine spark reads files: write the DataFrame to Parquet first, or use engine='local'")
    if cfg.parts is not None and cfg.parts < 1:
        raise DataError(f"--parts {cfg.parts}: must be at least 1")
    if cfg.bucket_days is not None and cfg.bucket_days > cfg.observation_days:
        raise DataError(f"--bucket-days {cfg.bucket_days}: longer than the {cfg.observation_days}-day observation window; "
                        "use fewer --bucket-days or more --observation-days")


@dataclass(frozen=True)
class LogSurvey:
    """What pass 1 learns: the last event and event counts per (type, UTC day)."""

    events: int
    last_s: int
    type_names: np.ndarray  # (k,) str
    type_day: pd.Series  # counts indexed by (type code, unix day)


def survey(path: EventSource, columns: EventColumns) -> LogSurvey:
    """Pass 1: timestamps and types only."""
    types = CodeBook()
    parts: list[pd.Series] = []
    last, events = None, 0
    for b in iter_events(path, columns, roles=("time", "type")):
        events += b.n
        last = int(b.ts_s.max()) if last is None else max(last, int(b.ts_s.max()))
        g = types.encode(b.type_uniques)[b.type_codes]  # (n,) global type codes
        key = g * (1 << 32) + (b.ts_s // DAY_S + (1 << 31))  # (type, day) packed in one int64
        uk, cnt = np.unique(key, return_counts=True)
        parts.append(pd.Series(cnt, index=uk))
    both = pd.concat(parts).groupby(level=0).sum()
    keys = both.index.to_numpy()
    idx = pd.MultiIndex.from_arrays([keys >> 32, (keys & ((1 << 32) - 1)) - (1 << 31)], names=["type", "day"])
    return LogSurvey(events, last, types.keys().astype(str), pd.Series(both.to_numpy(), index=idx))


def choose_types(s: LogSurvey, start_s: int, cutoff_s: int, max_types: int) -> list[str]:
    """The max_types - 1 most frequent types inside the window (ties by name), then 'other'."""
    day = s.type_day.index.get_level_values("day")
    inside = s.type_day[(day >= start_s // DAY_S) & (day * DAY_S < cutoff_s)]
    counts = inside.groupby(level="type").sum()
    table = pd.DataFrame({"name": s.type_names[counts.index.to_numpy()], "n": counts.to_numpy()})
    table = table[(table["n"] > 0) & (table["name"] != OTHER)].sort_values(["n", "name"], ascending=[False, True])
    return list(table["name"].head(max_types - 1)) + [OTHER]


def type_index(uniques: np.ndarray, types: list[str]) -> np.ndarray:
    """Feature-type index (int64 [u]) for a batch's distinct type names; unknown -> 'other'."""
    idx = pd.Index(types).get_indexer(uniques)
    return np.where(idx < 0, types.index(OTHER), idx).astype(np.int64)


@dataclass(frozen=True)
class Plan:
    """What pass 1 decides, whichever engine runs pass 2: the windows and the kept types."""

    cutoff_s: int
    label_end_s: int
    window: Window
    types: list[str]  # kept types, then OTHER
    other_types: list[str] = field(default_factory=list)  # the log's other types, folded into OTHER (sorted)


def plan(cfg: PrepareConfig, s: LogSurvey) -> Plan:
    """The cut-off, label window, time steps and kept types for a surveyed log; DataError if they cannot be had."""
    end_of_log = (s.last_s // DAY_S + 1) * DAY_S  # the end of the last event's UTC day
    cutoff = parse_cutoff(cfg.cutoff) if cfg.cutoff else end_of_log - cfg.label_days * DAY_S
    label_end = cutoff + cfg.label_days * DAY_S
    if label_end > end_of_log:
        raise DataError(
            f"--cutoff {iso(cutoff)}: the {cfg.label_days}-day label window ends after the log ({iso(s.last_s)}); "
            f"use --cutoff {iso(end_of_log - cfg.label_days * DAY_S)[:10]} or earlier, or fewer --label-days"
        )
    if cfg.session_type not in set(s.type_names):
        raise DataError(
            f"--session-type {cfg.session_type!r}: no such {cfg.columns.type!r} in {source_name(cfg.events)} "
            f"(types include {', '.join(repr(str(t)) for t in sorted(s.type_names)[:8])}); "
            "pass the type that marks a session"
        )
    bucket = cfg.bucket_days if cfg.bucket_days is not None else auto_bucket_days(cfg.observation_days)
    window = Window(start_s=cutoff - cfg.observation_days * DAY_S, days=cfg.observation_days, bucket_days=bucket)
    types = choose_types(s, window.start_s, cutoff, cfg.max_types)
    others = sorted(set(map(str, s.type_names)) - set(types))
    return Plan(cutoff, label_end, window, types, others)


def prepare(cfg: PrepareConfig) -> dict:
    """Run both passes and write DIR; returns the spec (also DIR/spec.json).

    `cfg.engine` "spark" runs the same passes as Spark SQL (`models.spark_prepare`).
    """
    _check_options(cfg)
    if cfg.engine == "spark":
        from models.spark_prepare import prepare_spark

        return prepare_spark(cfg)
    out = Path(cfg.out)
    check_replaceable(out, marker="spec.json")
    check_columns(cfg.events, cfg.columns)
    t0 = time.perf_counter()
    s = survey(cfg.events, cfg.columns)
    p = plan(cfg, s)
    window, cutoff, types = p.window, p.cutoff_s, p.types
    t1 = time.perf_counter()
    log.info("pass 1: %d events in %.1fs; cut-off %s, %d types kept", s.events, t1 - t0, iso(cutoff), len(types) - 1)

    agg = DailyAggregator(window, len(types))
    for b in iter_events(cfg.events, cfg.columns):
        ftype = type_index(b.type_uniques, types)[b.type_codes]  # (n,)
        is_session = (b.type_uniques == cfg.session_type)[b.type_codes]
        in_obs = (b.ts_s >= window.start_s) & (b.ts_s < cutoff)
        in_label = is_session & (b.ts_s >= cutoff) & (b.ts_s < p.label_end_s)
        cust = agg.encode(b.id_codes, b.id_uniques, in_obs | in_label)
        agg.add(cust, b.ts_s, ftype, b.value)
        agg.add_tally(cust[in_label])
    t2 = time.perf_counter()
    log.info("pass 2: %d customers in the windows in %.1fs", agg.n_customers, t2 - t1)

    kept, y = kept_rows(cfg, agg)
    ids = agg.ids()
    spec = make_spec(cfg, p, detect_format(cfg.events), events=s.events, seen=agg.n_customers,
                     kept=kept.size, churned=int(y.sum()))
    _write(out, agg, kept, y, ids[kept], spec)
    log.info("prepared %d customers x %d steps of %d day(s) x %d features in %.1fs (%.0f events/s) -> %s",
             kept.size, window.steps, window.bucket_days, len(spec["features"]), time.perf_counter() - t0,
             s.events / (time.perf_counter() - t0), out)
    return spec


def kept_rows(cfg: PrepareConfig, agg: DailyAggregator) -> tuple[np.ndarray, np.ndarray]:
    """(rows of `agg` kept by the newcomer filter, sorted by id; their labels int8, 1 = churned)."""
    active = agg.active_days()
    kept = np.flatnonzero(active >= max(cfg.min_active_days, 1))
    kept = kept[np.argsort(agg.ids()[kept], kind="stable")]  # rows sorted by id, so CSV and Parquet give the same X
    y = (agg.tally[kept] < cfg.min_sessions).astype(np.int8)  # (customers,) 1 = churned
    return kept, y


def make_spec(cfg: PrepareConfig, p: Plan, source_format: str, events: int, seen: int, kept: int, churned: int) -> dict:
    """spec.json for the counts pass 2 found; DataError if no customer is kept or the label is the same for all."""
    window, cutoff = p.window, p.cutoff_s
    if kept == 0:
        raise DataError(
            f"{source_name(cfg.events)}: no customer has {cfg.min_active_days}+ active days in the window "
            f"{iso(window.start_s)} .. {iso(cutoff)}; check --cutoff, --observation-days or lower --min-active-days"
        )
    churn_rate = churned / kept
    if churn_rate in (0.0, 1.0):
        which = "churned" if churn_rate == 1.0 else "stayed"
        raise DataError(
            f"label rule: all {kept} customers {which} (fewer than --min-sessions {cfg.min_sessions} "
            f"{cfg.session_type!r} events in {cfg.label_days} days after {iso(cutoff)}); "
            "change --min-sessions, --label-days, --session-type or --cutoff"
        )
    return {
        "format": SPEC_FORMAT,
        "source": {"path": source_name(cfg.events), "format": source_format},
        "columns": asdict(cfg.columns),
        "types": p.types,
        "other_type": OTHER,
        "other_types": p.other_types[:MAX_RECORDED_OTHER_TYPES],  # the log's types folded into other_type
        "other_types_complete": len(p.other_types) <= MAX_RECORDED_OTHER_TYPES,
        "max_types": cfg.max_types,
        "aggregations": list(AGGREGATIONS),
        "features": feature_names(p.types),
        "feature_layout": "X[customer, step, type_index * 5 + aggregation_index]",
        "missing_values": "NaN/empty values are counted but excluded from sum/min/max/mean; empty cells are 0",
        "scaling": {"name": SCALING, "formula": "sign(x) * log1p(|x|)", "applies_to": "all features"},
        "window": {
            "observation_days": cfg.observation_days, "day_s": DAY_S, "bucket_days": window.bucket_days,
            "steps": window.steps, "step_0": "oldest", "first_step_days": window.bucket_days - window.pad_days,
            "start": iso(window.start_s), "cutoff": iso(cutoff), "start_s": window.start_s, "cutoff_s": cutoff,
        },
        "label": {
            "session_type": cfg.session_type, "label_days": cfg.label_days, "min_sessions": cfg.min_sessions,
            "end": iso(p.label_end_s),
            "rule": f"y = 1 (churn) if fewer than {cfg.min_sessions} {cfg.session_type!r} events in [cutoff, cutoff + {cfg.label_days} days)",
        },
        "filter": {"min_active_days": cfg.min_active_days, "rule": "keep customers with at least min_active_days days with an event in the window"},
        "counts": {
            "events_read": events, "customers_seen": int(seen), "customers_kept": int(kept),
            "customers_dropped_newcomers": int(seen - kept), "churn_rate": round(churn_rate, 6),
        },
    }


def _write(out: Path, agg: DailyAggregator, kept: np.ndarray, y: np.ndarray, ids: np.ndarray, spec: dict) -> None:
    with staged_dir(out) as tmp:
        shape = (kept.size, agg.window.steps, agg.n_types * len(AGGREGATIONS))  # (customers, steps, features)
        X = np.lib.format.open_memmap(tmp / "X.npy", mode="w+", dtype=np.float32, shape=shape)
        for i in range(0, kept.size, BLOCK_ROWS):
            X[i:i + BLOCK_ROWS] = agg.block(kept[i:i + BLOCK_ROWS])
        X.flush()
        del X
        np.save(tmp / "y.npy", y)
        np.save(tmp / "ids.npy", ids.astype(str), allow_pickle=False)  # (customers,) unicode, no pickle
        np.save(tmp / "active.npy", agg.active[kept])  # (customers, days) bool: the baseline's recency, per day
        (tmp / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")

"""What both engines of `notpu prepare` share: the options, the plan pass 1 leads to, and the spec.

`models.prepare` (numpy, one machine) and `models.spark_prepare` (Spark SQL)
each run the two passes their own way, and both go through this module for
what must come out the same: the options they accept (`check_options`), the
cut-off, windows and kept types a surveyed log gives (`plan`), the newcomer
filter and labels (`kept_rows`) and spec.json (`make_spec`). `notpu predict`
reads the constants and the date parsing from here too. `models.spark_prepare`
needs nothing of `models.prepare`, so the two no longer import each other;
`models.prepare.prepare` hands engine "spark" on when it is called.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from models.errors import DataError
from models.events import DAY_S, EventColumns, EventSource, is_frame, source_name
from models.features import AGGREGATIONS, SCALING, DailyAggregator, Window, auto_bucket_days, feature_names

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


def check_options(cfg: PrepareConfig) -> None:
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

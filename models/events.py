"""Reading and validating event logs (CSV or Parquet), one bounded batch at a time.

An event log has four columns, whose names are configurable:

    id          customer id (string or integer; kept as text in ids.npy)
    timestamp   unix seconds (int or float) or ISO 8601 text with any offset
    event_type  text
    event_value float; empty / NaN where it means nothing

Every batch is normalised to plain numpy arrays: customer ids and event types
arrive as (codes, uniques) pairs so callers can map them to global integer codes
without touching one Python object per event, timestamps as int64 UTC seconds
and values as float64 (NaN where missing). Errors name the file, the column and
what to do, and are raised as `DataError`.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from models.errors import DataError

log = logging.getLogger(__name__)

DAY_S = 86_400
BATCH_ROWS = 1 << 20  # ~1M events per batch: ~30 MB of arrays, well under the output size
CSV_BLOCK_BYTES = 32 << 20  # about 1M rows of a typical 30-40 byte CSV line
# Anything past this is almost surely milliseconds or nanoseconds, not seconds.
MAX_PLAUSIBLE_UNIX_S = 7_258_118_400  # 2200-01-01


@dataclass(frozen=True)
class EventColumns:
    """Names of the four columns in the user's log."""

    id: str = "id"
    time: str = "timestamp"
    type: str = "event_type"
    value: str = "event_value"

    def names(self, roles: Sequence[str]) -> list[str]:
        return [getattr(self, r) for r in roles]


ALL_ROLES = ("id", "time", "type", "value")

#: Where events come from: a CSV or Parquet file, or a pandas DataFrame with the four columns.
EventSource = Union[str, Path, pd.DataFrame]
FRAME = "the DataFrame"  # how messages name a DataFrame source


def is_frame(source: EventSource) -> bool:
    return isinstance(source, pd.DataFrame)


def source_name(source: EventSource) -> str:
    """The source as messages name it: its path, or 'the DataFrame'."""
    return FRAME if is_frame(source) else str(source)


@dataclass(frozen=True)
class EventBatch:
    """One batch of normalised events; arrays have the batch's length n unless noted."""

    ts_s: np.ndarray | None  # (n,) int64 unix seconds, UTC
    type_codes: np.ndarray | None  # (n,) int64 index into type_uniques
    type_uniques: np.ndarray | None  # (u,) the distinct type names of this batch
    id_codes: np.ndarray | None  # (n,) int64 index into id_uniques
    id_uniques: np.ndarray | None  # (v,) the distinct ids of this batch
    value: np.ndarray | None  # (n,) float64, NaN where missing
    n: int


def detect_format(path: EventSource) -> str:
    if is_frame(path):
        return "dataframe"
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith(".parquet") or suffix.endswith(".pq"):
        return "parquet"
    if suffix.endswith(".csv") or suffix.endswith(".csv.gz"):
        return "csv"
    raise DataError(f"{path}: unknown file type; name event logs *.csv, *.csv.gz or *.parquet")


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"{path}: is a directory; pass the path of one CSV or Parquet event log "
                        "(a directory of part files needs --engine spark)")
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the path of a CSV or Parquet event log")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; expected a header and events")


def check_column_names(path: Path | str, found: Sequence[str], columns: EventColumns, roles: Sequence[str]) -> None:
    """DataError naming the first of the `roles` columns not among `found`, and the flag that renames it."""
    flags = {"id": "--id-col", "time": "--time-col", "type": "--type-col", "value": "--value-col"}
    for role in roles:
        name = getattr(columns, role)
        if name not in found:
            raise DataError(
                f"{path}: no column {name!r} (columns are {', '.join(map(repr, found))}); "
                f"rename it or pass {flags[role]} NAME"
            )


def _csv_header(path: Path) -> list[str]:
    import gzip

    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", newline="") as fh:  # type: ignore[operator]
        row = next(csv.reader(fh), None)
    if not row:
        raise DataError(f"{path}: the file is empty; expected a header and events")
    return row


def _csv_batches(path: Path, columns: EventColumns, roles: Sequence[str]) -> Iterator[pa.RecordBatch]:
    header = _csv_header(path)
    check_column_names(path, header, columns, roles)
    dict_str = pa.dictionary(pa.int32(), pa.string())
    # Ids and types are low-cardinality per block: dictionary-encoding them makes the
    # per-batch factorisation free. Timestamps stay text until we know their format.
    types = {columns.id: dict_str, columns.type: dict_str, columns.time: pa.string(), columns.value: pa.float64()}
    convert = pacsv.ConvertOptions(
        include_columns=columns.names(roles),
        column_types={name: types[name] for name in columns.names(roles)},
        strings_can_be_null=True,
    )
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES), convert_options=convert)
        for batch in reader:
            yield batch
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: cannot read as CSV ({str(exc).splitlines()[0]}); check the delimiter and quoting") from None


def _frame_batches(frame: pd.DataFrame, columns: EventColumns, roles: Sequence[str]) -> Iterator[pa.RecordBatch]:
    check_column_names(FRAME, [str(c) for c in frame.columns], columns, roles)
    names = columns.names(roles)
    for start in range(0, len(frame), BATCH_ROWS):
        part = frame.iloc[start:start + BATCH_ROWS][names]
        try:
            table = pa.Table.from_pandas(part, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(f"{FRAME}: cannot convert its columns {names} ({str(exc).splitlines()[0]}); "
                            "give each column one type") from None
        yield from table.combine_chunks().to_batches()


def _parquet_batches(path: Path, columns: EventColumns, roles: Sequence[str]) -> Iterator[pa.RecordBatch]:
    try:
        pf = pq.ParquetFile(path, read_dictionary=[columns.id, columns.type])
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot read as Parquet ({str(exc).splitlines()[0]})") from None
    check_column_names(path, pf.schema_arrow.names, columns, roles)
    yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=columns.names(roles))


def _factorize(arr: pa.Array, path: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes int64 [n], uniques [u]) for a column; nulls are an error."""
    if arr.null_count:
        raise DataError(f"{path}: column {column!r} has {arr.null_count} empty values; fill or drop those rows")
    if pa.types.is_dictionary(arr.type):
        codes = arr.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        uniques = arr.dictionary.to_numpy(zero_copy_only=False)
        return codes, uniques
    codes, uniques = pd.factorize(arr.to_numpy(zero_copy_only=False))
    return codes.astype(np.int64, copy=False), np.asarray(uniques)


def _row(path: Path | str, row0: int, i: int) -> str:
    """How a message names the i-th value of a batch starting at data row `row0` (0-based)."""
    n = row0 + i + 1  # 1-based, the header not counted
    return f"row {n} (line {n + 1})" if str(path).lower().endswith((".csv", ".csv.gz")) else f"row {n}"


def _first_bad(path: Path, column: str, values: np.ndarray, ok: np.ndarray, what: str, row0: int = 0) -> DataError:
    bad = int(np.flatnonzero(~ok)[0])
    return DataError(f"{path}: column {column!r}, {_row(path, row0, bad)}: cannot parse {str(values[bad])!r} "
                     f"as {what}; fix or drop such rows")


def parse_timestamps(arr: pa.Array, path: Path, column: str, row0: int = 0,
                     seen: dict[str, tuple[int, str]] | None = None) -> np.ndarray:
    """Unix seconds (int64, UTC) from integer/float seconds, Arrow timestamps or ISO 8601 text.

    `row0` is the batch's first data row in the source (0-based), so that errors name the row; `seen`
    (kept by the caller across a source's batches) records the first row of each text format met, so that
    a log whose batches use different formats is refused as one whose rows do.
    """
    if arr.null_count:
        raise DataError(f"{path}: column {column!r} has {arr.null_count} empty timestamps; fill or drop those rows")
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_timestamp(arr.type):
        # Arrow timestamps are UTC instants whatever their tz; naive ones we take as UTC.
        ns = arr.cast(pa.timestamp("ns")).cast(pa.int64()).to_numpy(zero_copy_only=False)
        out = np.floor_divide(ns, 1_000_000_000)
    elif pa.types.is_integer(arr.type):
        out = arr.cast(pa.int64()).to_numpy(zero_copy_only=False)
    elif pa.types.is_floating(arr.type):
        f = arr.to_numpy(zero_copy_only=False)
        if not np.isfinite(f).all():
            raise _first_bad(path, column, f, np.isfinite(f), "unix seconds", row0)
        out = np.floor(f).astype(np.int64)
    elif pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        out = _parse_text_timestamps(arr, path, column, row0, {} if seen is None else seen)
    else:
        raise DataError(f"{path}: column {column!r} has type {arr.type}; expected unix seconds or ISO 8601 text")
    if out.size and (out.max() > MAX_PLAUSIBLE_UNIX_S or out.min() < -MAX_PLAUSIBLE_UNIX_S):
        raise DataError(
            f"{path}: column {column!r} has values like {int(out.max())}, beyond the year 2200; "
            "convert milliseconds/nanoseconds to unix seconds"
        )
    return out


UNIX, ISO = "unix seconds", "ISO 8601"


def _one_format(path: Path, column: str, seen: dict[str, tuple[int, str]], kind: str, row: int, value: str) -> None:
    """Record that data row `row` (0-based) holds `kind`; DataError if an earlier batch held the other format."""
    seen.setdefault(kind, (row, value))
    other = ISO if kind == UNIX else UNIX
    if other in seen:
        (u_row, u_val), (i_row, i_val) = seen[UNIX], seen[ISO]
        raise DataError(f"{path}: column {column!r} has mixed formats: {_row(path, u_row, 0)} is {u_val!r} ({UNIX}), "
                        f"{_row(path, i_row, 0)} is {i_val!r} ({ISO}); write every timestamp one way")


def _parse_text_timestamps(arr: pa.Array, path: Path, column: str, row0: int,
                           seen: dict[str, tuple[int, str]]) -> np.ndarray:
    # Fast paths first: integer or decimal seconds written as text (typical CSV export).
    for parse in (lambda: arr.cast(pa.int64()).to_numpy(zero_copy_only=False),
                  lambda: np.floor(arr.cast(pa.float64()).to_numpy(zero_copy_only=False)).astype(np.int64)):
        try:
            out = parse()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        _one_format(path, column, seen, UNIX, row0, str(arr[0].as_py()))
        return out
    text = arr.to_numpy(zero_copy_only=False)
    # utc=True converts every offset ("+02:00", "Z", "-0500") to UTC; a value
    # without an offset is taken as UTC.
    parsed = pd.to_datetime(pd.Series(text), utc=True, format="ISO8601", errors="coerce")
    ok = parsed.notna().to_numpy()
    if not ok.all():
        numeric = pd.to_numeric(pd.Series(text), errors="coerce").notna().to_numpy()  # text that is unix seconds
        if ok.any() and numeric.any():
            i, j = int(np.flatnonzero(ok)[0]), int(np.flatnonzero(numeric)[0])
            _one_format(path, column, seen, UNIX, row0 + j, str(text[j]))
            _one_format(path, column, seen, ISO, row0 + i, str(text[i]))
        raise _first_bad(path, column, text, ok, f"{UNIX} or {ISO}", row0)
    _one_format(path, column, seen, ISO, row0, str(text[0]))
    ns = parsed.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    return np.floor_divide(ns, 1_000_000_000)


def check_columns(path: EventSource, columns: EventColumns = EventColumns(), roles: Sequence[str] = ALL_ROLES) -> None:
    """Fail early, before any pass, if the file or one of the named columns is missing."""
    if is_frame(path):
        check_column_names(FRAME, [str(c) for c in path.columns], columns, roles)
        if len(path) == 0:
            raise DataError(f"{FRAME}: no events (no rows); pass a log with at least one event")
        return
    path = Path(path)
    _check_file(path)
    if detect_format(path) == "parquet":
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: cannot read as Parquet ({str(exc).splitlines()[0]})") from None
    else:
        names = _csv_header(path)
    check_column_names(path, names, columns, roles)


def iter_events(
    path: EventSource,
    columns: EventColumns = EventColumns(),
    roles: Sequence[str] = ALL_ROLES,
) -> Iterator[EventBatch]:
    """Yield normalised batches of the columns named by `roles` (others are None).

    `path` is a CSV or Parquet file or a pandas DataFrame with the columns.
    Reading only the roles a pass needs keeps Parquet scans cheap (column pruning).
    Raises DataError for a missing file or column, an empty log, empty ids, types
    or timestamps, and timestamps that are neither unix seconds nor ISO 8601.
    """
    if is_frame(path):
        batches = _frame_batches(path, columns, roles)
        path = FRAME
    else:
        path = Path(path)
        _check_file(path)
        fmt = detect_format(path)
        batches = _parquet_batches(path, columns, roles) if fmt == "parquet" else _csv_batches(path, columns, roles)
    total = 0
    formats: dict[str, tuple[int, str]] = {}  # the first row of each text timestamp format met
    for rb in batches:
        if rb.num_rows == 0:
            continue
        row0 = total
        total += rb.num_rows
        get = {role: rb.column(rb.schema.get_field_index(getattr(columns, role))) for role in roles}
        ts = parse_timestamps(get["time"], path, columns.time, row0, formats) if "time" in get else None
        type_codes = type_uniques = id_codes = id_uniques = value = None
        if "type" in get:
            type_codes, type_uniques = _factorize(get["type"], path, columns.type)
            type_uniques = type_uniques.astype(str)
        if "id" in get:
            id_codes, id_uniques = _factorize(get["id"], path, columns.id)
        if "value" in get:
            value = _to_float(get["value"], path, columns.value)
        yield EventBatch(ts, type_codes, type_uniques, id_codes, id_uniques, value, rb.num_rows)
    if total == 0:
        raise DataError(f"{path}: no events (only a header or no rows); pass a log with at least one event")


def _to_float(arr: pa.Array, path: Path, column: str) -> np.ndarray:
    try:
        arr = arr.cast(pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"{path}: column {column!r} is not numeric ({arr.type}); pass numbers or leave empty") from None
    # to_numpy turns nulls into NaN for floating arrays.
    return arr.to_numpy(zero_copy_only=False)


def last_timestamp(path: EventSource, columns: EventColumns = EventColumns()) -> int:
    """The latest event's unix seconds (one timestamp-only scan)."""
    return max(int(b.ts_s.max()) for b in iter_events(path, columns, roles=("time",)))


class CodeBook:
    """Grows a global key → integer code mapping, one batch of distinct keys at a time.

    Vectorised through pandas' hash tables: the cost is per distinct key per batch,
    never per event, and no Python loop runs over keys.
    """

    def __init__(self) -> None:
        self._index = pd.Index([], dtype=object)

    def __len__(self) -> int:
        return len(self._index)

    def encode(self, keys: np.ndarray) -> np.ndarray:
        """Global codes (int64 [len(keys)]) for distinct `keys`; unseen keys are appended."""
        keys = np.asarray(keys, dtype=object)
        codes = self._index.get_indexer(keys)
        new = codes < 0
        if new.any():
            start = len(self._index)
            self._index = self._index.append(pd.Index(keys[new], dtype=object))
            codes[new] = np.arange(start, start + int(new.sum()))
        return codes.astype(np.int64, copy=False)

    def keys(self) -> np.ndarray:
        return self._index.to_numpy(dtype=object)

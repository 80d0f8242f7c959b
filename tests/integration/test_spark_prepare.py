"""`notpu prepare --engine spark` against the local path, on real Spark in local[2].

The invariant: on the same log, both engines give the same customers, labels,
features (float32 tolerance), active days and spec, with daily steps and with
buckets; the parts laid end to end are the one-file layout, and each part's
share of the split is the whole split's. One SparkSession serves the module.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

pytest.importorskip("pyspark")

from conftest import fail_on_leftovers  # noqa: E402
from spark_local import spark, spark_processes  # noqa: E402,F401 - the module's session fixture

from models.dataset import load_dataset, load_part, num_parts, split_indices  # noqa: E402
from models.errors import DataError  # noqa: E402
from models.events import EventColumns  # noqa: E402
from models.generate import GeneratorConfig, generate_events, write_events  # noqa: E402
from models.prepare import PrepareConfig, prepare  # noqa: E402
from models.spark_prepare import prepare_spark  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def no_leftover_processes(spark) -> Iterator[None]:
    """The suite's check for child processes left behind, but for the module's JVM and its Python workers.

    They live until the module ends; the `spark` fixture then checks that the JVM is gone.
    """
    yield
    fail_on_leftovers(spark_processes(spark))


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spark") / "events.parquet"
    return write_events(generate_events(GeneratorConfig(players=300, seed=7)), path)


def assert_same(local_dir: Path, spark_dir: Path) -> None:
    a, b = load_dataset(local_dir), load_dataset(spark_dir)
    np.testing.assert_array_equal(b.ids, a.ids)
    np.testing.assert_array_equal(b.y, a.y)
    np.testing.assert_allclose(b.X, a.X, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(b.active, a.active)


def test_same_tensor_and_spec_as_local_and_parts_tile_the_split(spark, log_file: Path, tmp_path: Path) -> None:
    local, parted = tmp_path / "local", tmp_path / "spark"
    spec = prepare(PrepareConfig(events=str(log_file), out=str(local)))
    spec_spark = prepare_spark(PrepareConfig(events=str(log_file), out=str(parted), engine="spark", parts=3), spark)
    assert spec_spark == spec
    assert spec == json.loads((parted / "spec.json").read_text())
    assert_same(local, parted)

    # Each part is a contiguous block of the id order; its share of the split is the whole split's.
    whole = split_indices(spec["counts"]["customers_kept"])
    assert num_parts(parted) == 3 and num_parts(local) == 1
    parts = [load_part(parted, k) for k in range(3)]
    assert [p.start for p in parts] == list(np.cumsum([0] + [len(p.y) for p in parts[:-1]]))
    assert min(len(p.y) for p in parts) > 0
    for name in ("train", "val", "test"):
        mine = np.concatenate([getattr(p.split(), name) + p.start for p in parts])
        np.testing.assert_array_equal(mine, getattr(whole, name))
    one = load_part(local, 0)
    np.testing.assert_array_equal(one.split().test, whole.test)
    with pytest.raises(DataError, match=r"part 3 of 3; parts are numbered 0 \.\. 2"):
        load_part(parted, 3)


def test_buckets_from_a_glob_of_csv_files_with_iso_times(spark, tmp_path: Path) -> None:
    # 60 days in weeks: 9 steps, the oldest 3 days short; ISO text times, the log split over two CSV files.
    table = generate_events(GeneratorConfig(players=100, days=60, seed=5))
    table = table.set_column(1, "timestamp", table["timestamp"].cast("timestamp[s]").cast("string"))
    whole_csv, parts_dir = tmp_path / "events.csv", tmp_path / "csv"
    parts_dir.mkdir()
    pacsv.write_csv(table, whole_csv)
    half = table.num_rows // 2
    pacsv.write_csv(table.slice(0, half), parts_dir / "a.csv")
    pacsv.write_csv(table.slice(half), parts_dir / "b.csv")
    common = dict(observation_days=60, bucket_days=7, max_types=8)
    spec = prepare(PrepareConfig(events=str(whole_csv), out=str(tmp_path / "local"), **common))
    spec_spark = prepare_spark(PrepareConfig(events=str(parts_dir / "*.csv"), out=str(tmp_path / "spark"),
                                             engine="spark", parts=2, **common), spark)
    assert spec["window"]["steps"] == 9 and spec["window"]["first_step_days"] == 4
    assert spec_spark["source"] == {"path": str(parts_dir / "*.csv"), "format": "csv"}
    assert {**spec_spark, "source": None} == {**spec, "source": None}
    assert_same(tmp_path / "local", tmp_path / "spark")


def test_driver_memory_stays_flat_as_the_log_grows(spark, tmp_path: Path) -> None:
    """Python heap peak of the driver for a log and one 8x its size: the events never come to the driver."""
    peaks, sizes = [], []
    for players in (40, 320):
        events = write_events(generate_events(GeneratorConfig(players=players, days=30, seed=3)),
                              tmp_path / f"e{players}.parquet")
        sizes.append(pq.ParquetFile(events).metadata.num_rows)
        tracemalloc.start()
        try:
            prepare_spark(PrepareConfig(events=str(events), out=str(tmp_path / f"d{players}"), engine="spark",
                                        observation_days=30, parts=2), spark)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    print(f"\ndriver Python heap peak: {sizes[0]} events {peaks[0] / 2**20:.1f} MiB, "
          f"{sizes[1]} events {peaks[1] / 2**20:.1f} MiB")
    assert sizes[1] > 5 * sizes[0]
    assert peaks[1] < 1.3 * peaks[0] + 2**20, peaks
    assert peaks[1] < sizes[1] * 8  # less than one float64 per event: no column of events was ever held


def test_bad_input_names_what_and_what_to_do(spark, log_file: Path, tmp_path: Path) -> None:
    cfg = dict(out=str(tmp_path / "d"), engine="spark")
    with pytest.raises(DataError, match=r"no column 'user' \(columns are 'id', 'timestamp', 'event_type', "
                                        r"'event_value'\); rename it or pass --id-col NAME"):
        prepare_spark(PrepareConfig(events=str(log_file), columns=EventColumns(id="user"), **cfg), spark)
    with pytest.raises(DataError, match="no such file, directory or glob match; pass a CSV or Parquet event log"):
        prepare_spark(PrepareConfig(events=str(tmp_path / "nowhere" / "*.csv"), **cfg), spark)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,timestamp,event_type,event_value\nu1,1704067200,connect,1\nu2,yesterday,connect,2\n")
    with pytest.raises(DataError, match=r"column 'timestamp': cannot parse 'yesterday' as unix seconds or ISO 8601"):
        prepare_spark(PrepareConfig(events=str(bad), **cfg), spark)
    with pytest.raises(DataError, match="--master apply to --engine spark only"):
        prepare(PrepareConfig(events=str(log_file), out=str(tmp_path / "d"), master="local[2]"))
    assert not (tmp_path / "d").exists()


def notpu(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_no_java_or_no_pyspark_is_one_line_and_exit_2(log_file: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env["PATH"] = str(Path(sys.executable).parent)  # the venv's python, no java
    r = notpu("prepare", str(log_file), "--out", str(tmp_path / "d"), "--engine", "spark", env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "notpu prepare: error: --engine spark needs Java 17+ (none on JAVA_HOME or PATH): "
        "install a JDK such as openjdk-17-jre-headless, or set JAVA_HOME"]
    code = ("import sys; sys.modules['pyspark'] = None\nfrom runner.cli import main\n"
            f"sys.exit(main(['prepare', {str(log_file)!r}, '--out', {str(tmp_path / 'd')!r}, '--engine', 'spark']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "notpu prepare: error: --engine spark needs pyspark 4: pip install 'notpu[spark]'"
    r = notpu("prepare", str(log_file), "--out", str(tmp_path / "d"), "--engine", "dask")
    assert (r.returncode, r.stderr.strip()) == (2, "notpu prepare: error: argument --engine: invalid choice: 'dask' "
                                                   "(choose from 'local', 'spark') (see notpu prepare --help)")
    assert not (tmp_path / "d").exists()

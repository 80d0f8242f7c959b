"""`notpu predict --engine spark` against the local path, on real Spark in local[2] with small real Keras models.

The invariant: on the same log, model and spec, both engines score the same customers with the same
probabilities (float32 tolerance), with daily steps and with weekly buckets, on an MMO log and a retail
log; the unseen-type warning is the local one word for word; what the local path refuses, Spark refuses
before anything is written. One SparkSession serves the module.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

pytest.importorskip("pyspark")

from conftest import fail_on_leftovers  # noqa: E402
from spark_local import spark, spark_processes  # noqa: E402,F401 - the module's session fixture

from models.errors import DataError  # noqa: E402
from models.generate import GeneratorConfig, generate_events, write_events  # noqa: E402
from models.generate_retail import RetailConfig, generate_retail_events  # noqa: E402
from models.predict import PredictConfig, score  # noqa: E402
from models.prepare import PrepareConfig, prepare  # noqa: E402
from models.spark_predict import predict_frame, predict_spark, whole_customers  # noqa: E402

pytestmark = pytest.mark.integration

TOLERANCE = 1e-5  # float32 features summed in another order, the same model
CLI_TIMEOUT_S = 150


@pytest.fixture(autouse=True)
def no_leftover_processes(spark) -> Iterator[None]:
    """The suite's check for child processes left behind, but for the module's JVM and its Python workers."""
    yield
    fail_on_leftovers(spark_processes(spark))


def run_dir(tmp: Path, spec: dict, data: Path, units: int = 2, seed: int = 0) -> Path:
    """RUN/model.keras beside the spec it was 'trained' on: GRU(4) on the spec's shapes, random weights, softmax
    (units 2) or sigmoid (units 1) out."""
    import keras

    keras.utils.set_random_seed(seed)
    x = keras.Input((spec["window"]["steps"], len(spec["features"])))
    out = keras.layers.Dense(units, activation="softmax" if units == 2 else "sigmoid")(keras.layers.GRU(4)(x))
    model = keras.Model(x, out)
    model.compile(loss="categorical_crossentropy" if units == 2 else "binary_crossentropy")
    run = tmp / "run"
    run.mkdir()
    model.save(run / "model.keras")
    shutil.copy(data / "spec.json", run / "spec.json")  # what the trainer does
    return run


def mmo_log(tmp: Path) -> tuple[Path, dict]:
    events = write_events(generate_events(GeneratorConfig(players=150, days=30, seed=3)), tmp / "events.parquet")
    return events, dict(observation_days=30, max_types=8)


def retail_log(tmp: Path) -> tuple[Path, dict]:
    table = generate_retail_events(RetailConfig(customers=400, days=60, label_days=60, seed=4))
    events = tmp / "events.csv"
    pacsv.write_csv(table.cast(pa.schema([(f.name, pa.string() if pa.types.is_dictionary(f.type) else f.type)
                                          for f in table.schema])), events)
    return events, dict(observation_days=60, label_days=60, session_type="purchase", min_sessions=1,
                        min_active_days=0)


def assert_same_scores(local: pd.DataFrame, spark_scores: pd.DataFrame) -> float:
    """Same ids in the same (sorted) order; returns the largest difference of probabilities."""
    assert list(spark_scores.columns) == ["id", "churn_probability"]
    assert spark_scores["id"].tolist() == local["id"].tolist()
    diff = float(np.max(np.abs(spark_scores["churn_probability"].to_numpy(np.float64)
                               - local["churn_probability"].to_numpy(np.float64))))
    assert diff <= TOLERANCE
    return diff


def test_a_task_scores_whole_customers_a_batch_at_a_time() -> None:
    """Cells sorted by id, in Arrow batches that cut customers anywhere: regrouped, no customer is split."""
    ids = ["a", "a", "b", "b", "b", "c", "d", "d", "d", "d", "e", "f", "f"]
    cuts = [0, 3, 5, 6, 9, 10, 13]  # batch bounds: b, d and f straddle two batches
    batches = [pa.RecordBatch.from_pydict({"id": ids[i:j], "n": list(range(i, j))}) for i, j in zip(cuts, cuts[1:])]
    tables = list(whole_customers(iter(batches), customers=2))
    seen = [t.column("id").to_pylist() for t in tables]
    assert sum(seen, []) == ids and sum((t.column("n").to_pylist() for t in tables), []) == list(range(len(ids)))
    assert [sorted(set(x)) for x in seen] == [["a", "b"], ["c", "d", "e"], ["f"]]  # at least 2, then the rest


CASES = {  # name: (log, bucket days, output units, batch size, cut-off)
    "mmo-daily": (mmo_log, 1, 2, 1024, None),
    "mmo-weekly": (mmo_log, 7, 1, 7, "2024-01-20T12:00:00"),  # a cut-off inside a day; many small batches
    "retail-daily": (retail_log, 1, 2, 64, None),
    "retail-weekly": (retail_log, 7, 1, 1024, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_spark_scores_equal_local_scores(spark, tmp_path: Path, case: str) -> None:
    make_log, bucket, units, batch, cutoff = CASES[case]
    events, options = make_log(tmp_path)
    spec = prepare(PrepareConfig(events=str(events), out=str(tmp_path / "data"), bucket_days=bucket, **options))
    assert spec["window"]["bucket_days"] == bucket
    run = run_dir(tmp_path, spec, tmp_path / "data", units=units)
    common = dict(model=str(run), events=str(events), cutoff=cutoff, batch_size=batch)
    local, warning = score(PredictConfig(out=str(tmp_path / "local.csv"), **common))
    assert warning is None and len(local) > 50

    out = tmp_path / "spark.csv"
    frame, spark_warning = predict_frame(spark, PredictConfig(out=str(out), engine="spark", **common))
    assert spark_warning is None
    diff = assert_same_scores(local, frame.toPandas())  # the scores as gathered, before the CSV's 6 decimals
    assert_same_scores(pd.read_csv(tmp_path / "local.csv", dtype={"id": str}), pd.read_csv(out, dtype={"id": str}))
    print(f"\n{case}: {len(local)} customers, max |spark - local| = {diff:.2e}")

    lazy, _ = predict_frame(spark, PredictConfig(out=None, engine="spark", **common))
    assert_same_scores(local, lazy.toPandas())


def test_parquet_out_and_a_spark_dataframe_of_events(spark, tmp_path: Path) -> None:
    """A path not ending .csv is a Parquet directory, a file per partition; events may be a Spark DataFrame."""
    events, options = mmo_log(tmp_path)
    spec = prepare(PrepareConfig(events=str(events), out=str(tmp_path / "data"), **options))
    run = run_dir(tmp_path, spec, tmp_path / "data")
    local, _ = score(PredictConfig(model=str(run), events=str(events), out=None))
    out = tmp_path / "scores"
    n = predict_spark(PredictConfig(model=str(run), events=str(events), out=str(out), engine="spark"), spark)
    assert n == len(local) and (out / "_SUCCESS").is_file()
    assert len(list(out.glob("*.parquet"))) == spark.sparkContext.defaultParallelism
    assert_same_scores(local, pq.read_table(out).to_pandas())

    from runner.spark import predict

    scores = predict(spark, run / "model.keras", spark.read.parquet(str(events)), out=str(out))  # replaced
    assert_same_scores(local, scores.toPandas())


def test_unseen_types_warn_as_the_local_path_does(spark, tmp_path: Path) -> None:
    events, options = mmo_log(tmp_path)
    spec = prepare(PrepareConfig(events=str(events), out=str(tmp_path / "data"), **options))
    run = run_dir(tmp_path, spec, tmp_path / "data")
    frame = pq.read_table(events).to_pandas()
    frame["id"] = frame["id"].astype(str)
    frame["event_type"] = frame["event_type"].astype(str)
    last = int(frame["timestamp"].max())
    new = pd.DataFrame({"id": [frame["id"].iloc[0], "dragon_only", "dragon_only", "old_dragon"],
                        "timestamp": [last - 60, last - 3600, last - 7200, last - 90 * 86_400],
                        "event_type": ["dragon_attack", "dragon_attack", "pet_dragon", "dragon_attack"],
                        "event_value": [1.0, -9.0, None, 3.0]})
    frame = pd.concat([frame, new], ignore_index=True)
    frame.to_parquet(tmp_path / "new.parquet")
    local, warning = score(PredictConfig(model=str(run), events=frame, out=None))
    assert warning.startswith("the DataFrame: 3 of ") and "'dragon_attack' (2), 'pet_dragon' (1)" in warning
    assert "dragon_only" in set(local["id"]) and "old_dragon" not in set(local["id"])  # outside the window

    from runner.frames import UnseenTypesWarning
    from runner.spark import predict

    with pytest.warns(UnseenTypesWarning) as caught:
        scores = predict(spark, run, spark.read.parquet(str(tmp_path / "new.parquet"))).toPandas()
    assert [str(w.message) for w in caught if w.category is UnseenTypesWarning] == [warning]
    assert_same_scores(local, scores)


def test_bad_spec_model_out_or_window_is_refused_with_nothing_written(spark, tmp_path: Path) -> None:
    events, options = mmo_log(tmp_path)
    spec = prepare(PrepareConfig(events=str(events), out=str(tmp_path / "data"), **options))
    run = run_dir(tmp_path, spec, tmp_path / "data")
    out = tmp_path / "out" / "scores.csv"

    def both(message: str, **given: object) -> None:
        """The local path's DataError and Spark's are the same, and neither wrote anything."""
        cfg = dict(model=str(run), events=str(events), out=str(out), **given)
        with pytest.raises(DataError) as local:
            score(PredictConfig(**cfg))
        with pytest.raises(DataError) as on_spark:
            predict_frame(spark, PredictConfig(engine="spark", **cfg))
        assert str(on_spark.value) == str(local.value) and message in str(local.value)
        assert not out.is_file() and not any(p.is_file() for p in tmp_path.glob("out/**/*"))

    bad = json.loads((run / "spec.json").read_text())
    bad["window"]["observation_days"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    both("field window.observation_days is 0; expected a whole number from 1 to 36525",
         spec=str(tmp_path / "bad.json"))
    (tmp_path / "out" / "scores.csv").mkdir(parents=True)
    both("is a directory; pass a file path such as")
    (tmp_path / "out" / "scores.csv").rmdir()
    both("no events between 2023-01-01T00:00:00Z and 2023-01-31T00:00:00Z; check --cutoff", cutoff="2023-01-31")
    other = tmp_path / "other"
    prepare(PrepareConfig(events=str(events), out=str(other), observation_days=30, max_types=4))
    both("model takes (steps, features) = (30, 40), the spec gives (30, 20)", spec=str(other / "spec.json"))

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="directory has other files and no _SUCCESS; pass a new or empty directory"):
        predict_frame(spark, PredictConfig(model=str(run), events=str(events), out=str(tmp_path / "mine"),
                                           engine="spark"))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def notpu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


def test_cli(spark, tmp_path: Path) -> None:
    """`notpu predict --engine spark --master local[2]` writes what the local engine writes; bad --out: exit 2."""
    events, options = mmo_log(tmp_path)
    spec = prepare(PrepareConfig(events=str(events), out=str(tmp_path / "data"), **options))
    run = run_dir(tmp_path, spec, tmp_path / "data")
    model = str(run / "model.keras")
    local, _ = score(PredictConfig(model=model, events=str(events), out=None))

    (tmp_path / "taken").write_text("a file")
    r = notpu("predict", model, str(events), "--out", str(tmp_path / "taken"), "--engine", "spark")
    assert (r.returncode, r.stderr.strip().splitlines()) == (2, [
        f"notpu predict: error: --out {tmp_path / 'taken'}: is a file; Parquet scores are a directory: pass a new "
        "directory, or a path ending .csv for one CSV file"])
    r = notpu("predict", model, str(events), "--out", str(tmp_path / "x.csv"), "--master", "local[2]")
    assert (r.returncode, r.stderr.strip().splitlines()[-1:]) == (2, [
        "notpu predict: error: --master applies to --engine spark only; add --engine spark or leave it out"])

    out = tmp_path / "scores.csv"
    r = notpu("predict", model, str(events), "--out", str(out), "--engine", "spark", "--master", "local[2]")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{len(local)} customers scored -> {out}"
    assert_same_scores(local, pd.read_csv(out, dtype={"id": str}))

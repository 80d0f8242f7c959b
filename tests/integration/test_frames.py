"""`from runner import prepare, fit, predict` on DataFrames: the same tensor and scores as from files, and
the notebook example of docs/guides/python.md run as written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.generate import GeneratorConfig, generate_events, write_events

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("frames")
    table = generate_events(GeneratorConfig(players=300, seed=9))
    write_events(table, root / "events.parquet")
    return root, table.to_pandas()


def _same_prepared(a: Path, b: Path, *differ: str) -> None:
    """The same arrays and spec, but for the spec's source and the fields `differ`."""
    for name in ("X.npy", "y.npy", "ids.npy", "active.npy"):
        np.testing.assert_array_equal(np.load(a / name), np.load(b / name), err_msg=name)
    sa, sb = (json.loads((d / "spec.json").read_text()) for d in (a, b))
    for field in ("source", *differ):
        sa.pop(field), sb.pop(field)
    assert sa == sb


def test_prepare_from_a_dataframe_equals_from_the_file(log: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    from runner import prepare

    root, events = log
    from_file = prepare(root / "events.parquet", out=tmp_path / "from-file", max_types=8)
    from_frame = prepare(events, out=tmp_path / "from-frame", max_types=8)
    _same_prepared(tmp_path / "from-file", tmp_path / "from-frame")
    assert from_frame.spec["source"] == {"path": "the DataFrame", "format": "dataframe"}
    assert (from_frame.steps, from_frame.features) == np.load(tmp_path / "from-frame" / "X.npy", mmap_mode="r").shape[1:]
    assert os.fspath(from_frame) == str(tmp_path / "from-frame")

    # other column names, ISO datetimes with an offset, a shuffled order: the same tensor
    renamed = events.rename(columns={"id": "user", "timestamp": "at"}).sample(frac=1.0, random_state=0)
    renamed["at"] = pd.to_datetime(renamed["at"], unit="s", utc=True).dt.tz_convert("Europe/Paris")
    prepare(renamed, out=tmp_path / "renamed", max_types=8, columns={"id": "user", "time": "at"})
    _same_prepared(tmp_path / "from-file", tmp_path / "renamed", "columns")
    assert json.loads((tmp_path / "renamed" / "spec.json").read_text())["columns"]["id"] == "user"


def test_a_bad_dataframe_is_a_one_line_data_error(log: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    from models.errors import DataError
    from runner import prepare

    _, events = log
    with pytest.raises(DataError, match=r"^the DataFrame: no column 'event_type' \(columns are 'id', 'timestamp', "
                                        r"'event_value'\); rename it or pass --type-col NAME$"):
        prepare(events.drop(columns="event_type"), out=tmp_path / "p")
    with pytest.raises(DataError, match="--engine spark reads files"):
        prepare(events, out=tmp_path / "p", engine="spark")
    with pytest.raises(DataError, match="unknown option.*observation_dys"):
        prepare(events, out=tmp_path / "p", observation_dys=30)
    assert list(tmp_path.iterdir()) == []


def test_predict_takes_a_run_or_model_and_a_dataframe_or_path(log: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from runner import UnseenTypesWarning, predict, prepare

    root, events = log
    data = prepare(events, out=tmp_path / "prepared", max_types=8)
    run = tmp_path / "run"
    run.mkdir()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((data.steps, data.features)), keras.layers.GlobalAveragePooling1D(),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.save(run / "model.keras")
    (run / "spec.json").write_text((tmp_path / "prepared" / "spec.json").read_text())

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnseenTypesWarning)  # the log's own types are no news
        from_frame = predict(run, events)
    from_path = predict(run / "model.keras", root / "events.parquet", out=tmp_path / "scores.csv")
    assert list(from_frame.columns) == ["id", "churn_probability"]
    assert len(from_frame) == events["id"].nunique()
    pd.testing.assert_frame_equal(from_frame, from_path)
    written = pd.read_csv(tmp_path / "scores.csv")
    np.testing.assert_allclose(written["churn_probability"], from_frame["churn_probability"], atol=1e-6)

    new = events.astype({"event_type": str})
    new.loc[new.index[-50:], "event_type"] = "brand_new"
    with pytest.warns(UnseenTypesWarning, match=r"50 of [\d,]+ events in the window have event types the training "
                                                r"log never had, scored as 'other': 'brand_new' \(50\)"):
        predict(run, new)


def test_runner_stays_lazy() -> None:
    code = ("import sys, runner\n"
            "print(sorted(m for m in ('pandas', 'runner.frames', 'runner.api', 'tensorflow') if m in sys.modules))\n"
            "from runner import prepare, fit, predict\n"
            "print(callable(prepare) and callable(fit) and callable(predict), 'tensorflow' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["[]", "True False"]


def docs_notebook_example() -> str:
    text = (REPO / "docs" / "guides" / "python.md").read_text()
    section = text.split("## From a notebook", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_docs_notebook_example_runs(tmp_path: Path) -> None:
    code = docs_notebook_example()
    assert "from runner import prepare, fit, predict" in code
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert "churn_probability" in r.stdout and len(lines) == 7  # the test AUC, the header and five rows
    assert float(lines[0].removeprefix("test AUC ")) > 0.7  # it learns: 0.799 in one run
    assert (tmp_path / "prepared" / "spec.json").is_file() and (tmp_path / "run" / "model.keras").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sum(summary["updates"].values()) > 0 and 0 <= summary["test_auc"] <= 1


def test_fit_refuses_a_directory_of_other_files_before_writing(tmp_path: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from models.errors import DataError
    from runner import fit

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.GlobalAveragePooling1D(),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    X, y = np.zeros((20, 5, 3), np.float32), np.arange(20) % 2
    with pytest.raises(DataError, match=r"out='.*mine': directory holds other files \(notes.txt\) and no previous run; "
                                        r"pass a new or empty directory, or add overwrite=True to write into it"):
        fit(model, (X, y), out=mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(DataError, match=r"is a file; pass a directory for the run"):
        fit(model, (X, y), out=mine / "notes.txt")

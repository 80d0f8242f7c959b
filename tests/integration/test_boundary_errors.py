"""Mistakes at the command line's boundary, as a user makes them: the real `notpu`, real files.

Every case must end in exit code 2 with one line on stderr that names what was wrong, no traceback,
and the directory exactly as it was (same files, same sizes, same modification times).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.generate import GeneratorConfig, generate_events, write_events

pytestmark = pytest.mark.integration


def notpu(*args: str, cwd: Path | None = None, timeout_s: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=cwd)


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and modification time (ns)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


def refused(root: Path, *args: str, cwd: Path | None = None) -> str:
    """Run `notpu args`; assert exit 2, one stderr line without a traceback, nothing changed under root."""
    before = listing(root)
    r = notpu(*args, cwd=cwd)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert listing(root) == before
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """events.csv, prepared/, and run/ holding a real (untrained) Keras model with the spec beside it."""
    root = tmp_path_factory.mktemp("boundary")
    write_events(generate_events(GeneratorConfig(players=300, seed=5)), root / "events.csv")
    r = notpu("prepare", str(root / "events.csv"), "--out", str(root / "prepared"), "--max-types", "8")
    assert r.returncode == 0, r.stderr
    (root / "run").mkdir()
    code = ("import json, sys, keras\n"
            "s = json.load(open(sys.argv[1]))\n"
            "m = keras.Sequential([keras.Input((s['window']['steps'], len(s['features']))),\n"
            "                      keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1, activation='sigmoid')])\n"
            "m.save(sys.argv[2])\n")
    r = subprocess.run([sys.executable, "-c", code, str(root / "prepared" / "spec.json"), str(root / "run" / "model.keras")],
                       capture_output=True, text=True, timeout=180, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert r.returncode == 0, r.stderr
    shutil.copy(root / "prepared" / "spec.json", root / "run" / "spec.json")
    return root


def test_train_out_must_be_empty_or_a_previous_run(world: Path, tmp_path: Path) -> None:
    prepared = str(world / "prepared")
    (tmp_path / "a-file").write_text("mine\n")
    line = refused(tmp_path, "train", prepared, "--out", str(tmp_path / "a-file"))
    assert line == f"notpu train: error: --out {tmp_path / 'a-file'}: is a file; pass a directory for the run (absent, empty, or a previous run)"

    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    for name in ("notes.txt", "history.jsonl.bak"):
        (mine / name).write_text("keep me\n")
    line = refused(tmp_path, "train", prepared, "--out", str(mine))
    assert "directory holds other files (checkpoints, history.jsonl.bak, notes.txt) and no previous run" in line
    assert "--overwrite" in line

    # the prepared DIR itself is no run either
    line = refused(world, "train", prepared, "--out", prepared)
    assert line.startswith(f"notpu train: error: --out {prepared}: directory holds other files")


def test_train_on_an_events_file_suggests_a_prepared_dir(world: Path) -> None:
    line = refused(world, "train", "events.csv", "--out", "run2", cwd=world)
    assert line == ("notpu train: error: events.csv: is a file, not a prepared DIR; "
                    "run `notpu prepare events.csv --out prepared` first and pass prepared")


def test_previous_run_is_recognised_and_overwrite_allows_others(tmp_path: Path) -> None:
    from models.outdir import check_run_out, start_run_dir
    from models.errors import DataError

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "evaluator.log").write_text("")
    (run / "summary.json").write_text("{}")
    (run / "checkpoints").mkdir()
    (run / "model.keras").write_text("old")
    start_run_dir(run)  # a previous run: its stale state goes, the rest is overwritten by the new run
    assert sorted(p.name for p in run.iterdir()) == ["logs", "model.keras"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me\n")
    with pytest.raises(DataError, match=r"out='.*other': directory holds other files \(notes.txt\).*overwrite=True"):
        check_run_out(other, option="out")
    start_run_dir(other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me\n"


def test_predict_checks_out_before_scoring(world: Path, tmp_path: Path) -> None:
    (tmp_path / "scores").mkdir()
    line = refused(tmp_path, "predict", str(world / "run" / "model.keras"), str(world / "events.csv"),
                   "--out", str(tmp_path / "scores"))
    assert line == (f"notpu predict: error: --out {tmp_path / 'scores'}: is a directory; "
                    f"pass a file path such as {tmp_path / 'scores' / 'scores.csv'}")
    (tmp_path / "file").write_text("")
    line = refused(tmp_path, "predict", str(world / "run"), str(world / "events.csv"),
                   "--out", str(tmp_path / "file" / "scores.csv"))
    assert f"{tmp_path / 'file'} is a file, not a directory" in line


BAD_FIELDS = [
    (["window", "observation_days"], -5, "field window.observation_days is -5; expected a whole number from 1 to 36525"),
    (["window", "observation_days"], 0, "field window.observation_days is 0; expected a whole number from 1 to 36525"),
    (["window", "observation_days"], "ninety", "field window.observation_days is 'ninety'; expected a whole number"),
    (["window", "observation_days"], 1e9, "field window.observation_days is 1000000000.0; expected a whole number"),
    (["window", "observation_days"], 10**9, "field window.observation_days is 1000000000; expected a whole number"),
    (["window", "bucket_days"], 0, "field window.bucket_days is 0; expected a whole number from 1 to 90"),
    (["window"], [90], "field window is a list; expected an object"),
    (["types"], ["connect", "connect", "other"], "field types names 'connect' more than once"),
    (["types"], ["connect", "battle"], "field types has no 'other'"),
    (["columns", "id"], 7, "field columns.id is 7; expected a column name"),
    (["filter", "min_active_days"], True, "field filter.min_active_days is a boolean; expected a whole number"),
    (["format"], "v0", "field format is 'v0'; expected 'notpu-churn-spec/1'"),
]


@pytest.mark.parametrize("keys, value, message", BAD_FIELDS, ids=[f"{'.'.join(k)}={v!r}" for k, v, _ in BAD_FIELDS])
def test_predict_validates_every_spec_field(world: Path, tmp_path: Path, keys: list[str], value, message: str) -> None:
    spec = json.loads((world / "run" / "spec.json").read_text())
    node = spec
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    if keys == ["types"]:  # keep features consistent, so that the types field itself is what is refused
        from models.features import feature_names

        spec["features"] = feature_names(value)
    bad = tmp_path / "spec.json"
    bad.write_text(json.dumps(spec))
    line = refused(tmp_path, "predict", str(world / "run"), str(world / "events.csv"), "--out",
                   str(tmp_path / "scores.csv"), "--spec", str(bad))
    assert line.startswith(f"notpu predict: error: {bad}: {message}"), line
    assert "re-run `notpu prepare`" in line


def test_a_spec_that_is_a_list(world: Path, tmp_path: Path) -> None:
    bad = tmp_path / "spec.json"
    bad.write_text("[1, 2]")
    line = refused(tmp_path, "predict", str(world / "run"), str(world / "events.csv"), "--out",
                   str(tmp_path / "scores.csv"), "--spec", str(bad))
    assert line.startswith(f"notpu predict: error: {bad}: holds a list, not a notpu-churn-spec/1 object")


def test_predict_warns_of_unseen_types_with_counts(world: Path, tmp_path: Path) -> None:
    events = pd.read_csv(world / "events.csv")
    events.loc[events.index[-300:], "event_type"] = "brand_new"  # the log's last events: inside the window
    events.loc[events.index[-320:-300], "event_type"] = "also_new"
    events.to_csv(tmp_path / "new.csv", index=False)
    r = notpu("predict", str(world / "run"), str(tmp_path / "new.csv"), "--out", str(tmp_path / "scores.csv"))
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if "WARNING models.predict" in line]
    assert len(warning) == 1, r.stderr
    assert "320 of" in warning[0] and "event types the training log never had, scored as 'other': " \
        "'brand_new' (300), 'also_new' (20)" in warning[0]
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert list(scores.columns) == ["id", "churn_probability"] and scores["churn_probability"].between(0, 1).all()

    # types the training log had but folded into 'other' are no news
    spec = json.loads((world / "run" / "spec.json").read_text())
    assert spec["other_types"] and spec["other_types_complete"]
    r = notpu("predict", str(world / "run"), str(world / "events.csv"), "--out", str(tmp_path / "scores.csv"))
    assert r.returncode == 0 and "WARNING models" not in r.stderr, r.stderr


def test_mixed_timestamps_name_rows_and_formats(tmp_path: Path) -> None:
    log = tmp_path / "events.csv"
    log.write_text("id,timestamp,event_type,event_value\n"
                   "u1,2024-01-01T06:00:00Z,connect,\n"
                   "u1,2024-01-01T07:00:00Z,battle,1\n"
                   "u2,1704091259,connect,\n")
    line = refused(tmp_path, "prepare", str(log), "--out", str(tmp_path / "data"))
    assert line == (f"notpu prepare: error: {log}: column 'timestamp' has mixed formats: row 3 (line 4) is "
                    "'1704091259' (unix seconds), row 1 (line 2) is '2024-01-01T06:00:00Z' (ISO 8601); "
                    "write every timestamp one way")
    log.write_text("id,timestamp,event_type,event_value\nu1,2024-01-01,connect,\nu1,yesterday,battle,1\n")
    line = refused(tmp_path, "prepare", str(log), "--out", str(tmp_path / "data"))
    assert line == (f"notpu prepare: error: {log}: column 'timestamp', row 2 (line 3): cannot parse 'yesterday' "
                    "as unix seconds or ISO 8601; fix or drop such rows")


def test_prepare_hints(world: Path) -> None:
    out = str(world / "data2")
    line = refused(world, "prepare", str(world), "--out", out)
    assert line == (f"notpu prepare: error: {world}: is a directory; pass the path of one CSV or Parquet event log "
                    "(a directory of part files needs --engine spark)")
    line = refused(world, "prepare", str(world / "events.csv"), "--out", out, "--session-type", "login")
    assert "(types include 'ad_view', 'battle'," in line and "np.str_" not in line
    for bad in ("03/31/2024", "2024-3-31", "31.03.2024", "March 31 2024"):
        line = refused(world, "prepare", str(world / "events.csv"), "--out", out, "--cutoff", bad)
        assert line == (f"notpu prepare: error: --cutoff {bad!r}: not an ISO date; use YYYY-MM-DD or "
                        "YYYY-MM-DDTHH:MM:SS, such as 2024-03-01 (UTC unless an offset such as +02:00 follows)")
    line = refused(world, "predict", str(world / "run"), str(world / "events.csv"), "--out", out,
                   "--cutoff", "03/31/2024")
    assert "--cutoff '03/31/2024': not an ISO date" in line


def test_iso_cutoffs_still_parse() -> None:
    from models.prepare import parse_cutoff

    assert parse_cutoff("2024-03-31") == parse_cutoff("2024-03-31T00:00:00") == parse_cutoff("2024-03-31T00:00:00Z")
    assert parse_cutoff("2024-03-31T02:00:00+02:00") == parse_cutoff("2024-03-31")
    assert parse_cutoff("2024-03-31 00:00") == parse_cutoff("2024-03-31")
    assert np.int64(parse_cutoff("2024-03-31")) == 1711843200


# What a run writes into --out does not depend on the training: one worker, one epoch, and no evaluation
# before the final one, so each run starts the fewest TensorFlow processes.
ONE_QUICK_RUN = ["--workers", "1", "--hidden", "4", "--epochs", "1", "--eval-interval-s", "1000", "--no-progress"]


def test_overwrite_trains_into_a_directory_of_other_files(world: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    r = notpu("train", str(world / "prepared"), "--out", str(mine), "--overwrite", *ONE_QUICK_RUN,
              timeout_s=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (mine / "notes.txt").read_text() == "keep me\n"
    assert (mine / "summary.json").is_file() and (mine / "model.keras").is_file()
    # now a previous run: training again needs no --overwrite, and leaves no history of the first run behind
    with (mine / "history.jsonl").open("a") as f:
        f.write('{"from": "the first run"}\n')
    r = notpu("train", str(world / "prepared"), "--out", str(mine), *ONE_QUICK_RUN, timeout_s=600)
    assert r.returncode == 0, r.stderr[-2000:]
    history = (mine / "history.jsonl").read_text()
    assert history and "the first run" not in history
    assert (mine / "notes.txt").read_text() == "keep me\n"

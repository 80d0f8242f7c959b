"""Labels, the newcomer filter and every bad-input error of `notpu prepare`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.prepare import PrepareConfig, prepare

CUTOFF = pd.Timestamp("2024-03-01", tz="UTC")
DAY = pd.Timedelta(days=1)


def crafted_log(tmp_path: Path) -> Path:
    """Players named after what they do: 'sK' has K connects after the cut-off, 'aN' N active days."""
    rows = []
    for k in range(4):  # 10 active days each, then k sessions in the label window
        rows += [(f"s{k}", CUTOFF - (d + 1) * DAY + pd.Timedelta(hours=12), "battle", 1.0) for d in range(10)]
        rows += [(f"s{k}", CUTOFF + d * DAY + pd.Timedelta(hours=20), "connect", None) for d in range(k)]
    for n in (6, 7):  # n active days (two events on each), 3 sessions after the cut-off
        rows += [(f"a{n}", CUTOFF - (d + 1) * DAY + pd.Timedelta(hours=h), "battle", 1.0) for d in range(n) for h in (1, 2)]
        rows += [(f"a{n}", CUTOFF + d * DAY, "connect", None) for d in range(3)]
    rows.append(("gone", CUTOFF - 200 * DAY, "battle", 1.0))  # active only long before the window
    rows.append(("late", CUTOFF + 30 * DAY, "connect", None))  # makes the log end after the label window
    df = pd.DataFrame(rows, columns=["id", "timestamp", "event_type", "event_value"])
    path = tmp_path / "crafted.parquet"
    df.to_parquet(path, index=False)
    return path


def test_labels_and_newcomer_filter(tmp_path: Path) -> None:
    log = crafted_log(tmp_path)
    out = tmp_path / "d2"
    spec = prepare(PrepareConfig(events=str(log), out=str(out), cutoff="2024-03-01", min_sessions=2))
    ids = list(np.load(out / "ids.npy"))
    y = dict(zip(ids, np.load(out / "y.npy")))
    assert ids == ["a7", "s0", "s1", "s2", "s3"]  # a6 has 6 active days < 7; 'gone' and 'late' never in the window
    assert y == {"a7": 0, "s0": 1, "s1": 1, "s2": 0, "s3": 0}
    assert spec["counts"]["customers_dropped_newcomers"] == 1  # a6
    assert spec["counts"]["customers_seen"] == 6  # 'late' connects after the label window

    out3 = tmp_path / "d3"
    prepare(PrepareConfig(events=str(log), out=str(out3), cutoff="2024-03-01", min_sessions=3, min_active_days=6))
    y3 = dict(zip(np.load(out3 / "ids.npy"), np.load(out3 / "y.npy")))
    assert y3 == {"a6": 0, "a7": 0, "s0": 1, "s1": 1, "s2": 1, "s3": 0}


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "events.csv"
    path.write_text(text)
    return path


GOOD = "id,timestamp,event_type,event_value\n" + "".join(
    f"p{p},2024-02-{d:02d}T10:00:00Z,connect,\n" for p in range(3) for d in range(1, 29)
)
# p2 stops playing a week before the end: with 7 label days it churns, p0 and p1 stay.
TWO_CLASSES = "".join(line + "\n" for line in GOOD.splitlines() if not line.startswith(("p2,2024-02-2",)) or line < "p2,2024-02-22")
SMALL = ["--label-days", "7", "--observation-days", "20"]


@pytest.mark.parametrize("content, extra, needle", [
    ("", [], "the file is empty"),
    ("id,timestamp,event_type,event_value\n", [], "no events"),
    (GOOD.replace("event_type", "kind"), [], "no column 'event_type'"),
    (GOOD, ["--value-col", "amount"], "pass --value-col"),
    (GOOD.replace("2024-02-05T10:00:00Z", "yesterday", 1), [], "cannot parse 'yesterday'"),
    (GOOD.replace("p1,2024-02-03T10:00:00Z", ",2024-02-03T10:00:00Z", 1), [], "column 'id' has 1 empty values"),
    (GOOD.replace("T10:00:00Z", "T10:00:00Z000", 1), [], "cannot parse"),
    (GOOD, ["--cutoff", "2023-01-01"], "no customer has 7+ active days"),
    (GOOD, ["--cutoff", "2024-02-20"], "the 21-day label window ends after the log"),
    (GOOD, ["--cutoff", "sometime"], "--cutoff 'sometime': not an ISO date"),
    (GOOD, ["--session-type", "login"], "--session-type 'login'"),
    (GOOD, ["--label-days", "7", "--observation-days", "20"], "label rule: all 3 customers stayed"),
    (GOOD, ["--min-sessions", "0"], "--min-sessions 0: must be at least 1"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, notpu_cli, content: str, extra: list[str], needle: str) -> None:
    out = tmp_path / "out"
    code, err = notpu_cli("prepare", str(_csv(tmp_path, content)), "--out", str(out), *extra)
    assert code == 2
    assert needle in err and err.startswith("notpu prepare: error: ") and err.count("\n") == 1, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv"]  # no temporary directory left


def test_failure_leaves_an_existing_dir_as_it_was(tmp_path: Path, notpu_cli) -> None:
    out = tmp_path / "out"
    code, _ = notpu_cli("prepare", str(_csv(tmp_path, TWO_CLASSES)), "--out", str(out), *SMALL)
    assert code == 0 and list(np.load(out / "y.npy")) == [0, 0, 1]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = notpu_cli("prepare", str(_csv(tmp_path, GOOD)), "--out", str(out), "--time-col", "when")
    assert code == 2 and "no column 'when'" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path: Path, notpu_cli) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = notpu_cli("prepare", str(_csv(tmp_path, GOOD)), "--out", str(out))
    assert code == 2 and "pass a new or empty directory" in err
    assert (out / "precious.txt").read_text() == "keep me"

"""The data commands as a user runs them: real `notpu` processes, exit codes, files on disk."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

def notpu(*args: str, timeout_s: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s)


def test_generate_prepare_baseline(tmp_path: Path) -> None:
    events, data = tmp_path / "events.csv", tmp_path / "data"
    r = notpu("generate", "--players", "500", "--seed", "4", "--out", str(events))
    assert r.returncode == 0, r.stderr
    assert "events of 500 players" in r.stdout and events.is_file()

    r = notpu("prepare", str(events), "--out", str(data), "--max-types", "12")
    assert r.returncode == 0, r.stderr
    spec = json.loads((data / "spec.json").read_text())
    X = np.load(data / "X.npy", mmap_mode="r")
    assert X.shape == (spec["counts"]["customers_kept"], 90, 12 * 5) and X.dtype == np.float32
    assert len(spec["types"]) == 12 and spec["types"][-1] == "other"
    assert 0.2 < spec["counts"]["churn_rate"] < 0.4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "events.csv"]  # no temporary dirs left

    r = notpu("baseline", str(data))
    assert r.returncode == 0, r.stderr
    result = json.loads((data / "baseline.json").read_text())
    assert f"baseline test AUC {result['test_auc']:.4f}" in r.stdout
    assert result["test_auc"] > 0.8


def test_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    log = tmp_path / "events.csv"
    log.write_text("user,timestamp,event_type,event_value\nu1,1704067200,connect,\n")
    r = notpu("prepare", str(log), "--out", str(tmp_path / "data"))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"notpu prepare: error: {log}: no column 'id' (columns are 'user', 'timestamp', "
                                "'event_type', 'event_value'); rename it or pass --id-col NAME")
    assert not (tmp_path / "data").exists()
    r = notpu("baseline", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "run `notpu prepare EVENTS --out" in r.stderr


def test_help_does_not_import_heavy_libraries() -> None:
    code = ("import sys\nfrom runner.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('tensorflow', 'keras', 'lightgbm', 'matplotlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = notpu("demo", "--out", str(out), "--players", "400", "--epochs", "1", "--hidden", "8", timeout_s=600)
    assert r.returncode == 0, r.stderr
    assert (out / "report.txt").is_file() and (out / "data" / "baseline.json").is_file()
    assert (out / "report.png").stat().st_size > 0 and "GRU (adag, 2 workers" in (out / "report.txt").read_text()
    assert json.loads((out / "run" / "summary.json").read_text())["rule"] == "adag"

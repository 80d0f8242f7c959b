"""Every rule, with its defaults, learns as well as plain Keras: small MMO and small retail logs.

Each rule runs `notpu train --rule R` with no other rule flag (2 workers,
their λ, α and learning-rate scaling resolved from the data and the world),
and is compared with `python -m bench.keras_run`, one process of plain Keras
on the same data, split, model, batch, local rate and epochs.

The tolerance, 0.02 of AUC, is argued from the noise of these sizes: the
comparison is paired (the same validation and test customers, the same
initial weights), and what differs between a rule and plain Keras is the
order and grouping of the same batches. We compare the mean of val and test
AUC (about 1,000 customers in all), whose run-to-run spread for plain Keras
alone, changing only the seed of the batch order, was 0.006–0.011 on these
data. A rule that does not learn as well is further off than that: before
its defaults took the data size and the world into account, ADAG scored
0.18 and AEASGD 0.31 below plain Keras on the small MMO log.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.dataset import split_indices

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULES = ("downpour", "adag", "dynsgd", "aeasgd", "eamsgd", "easgd", "averaging")
TOLERANCE = 0.02
COMMON = ["--epochs", "3", "--hidden", "16"]
KINDS = {
    # 3,000 players, 90 days: ~2,900 customers, 16 steps an epoch per worker.
    "mmo": (["--players", "3000", "--seed", "7"], []),
    # 4,000 retail customers over 546 days: ~2,500 customers who can be scored, 99.5% empty purchase days.
    "retail": (["--kind", "retail", "--players", "4000", "--seed", "7"],
               ["--session-type", "purchase", "--min-sessions", "1", "--observation-days", "273", "--label-days", "273",
                "--min-active-days", "0"]),
}


def _cli(*args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout_s)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _score(summary: dict) -> float:
    return (summary["val_auc"] + summary["test_auc"]) / 2


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rules-learn")
    out = {}
    for kind, (gen, prep) in KINDS.items():
        events, data = root / f"{kind}.parquet", root / kind
        _cli("-m", "runner.cli", "generate", *gen, "--out", str(events))
        _cli("-m", "runner.cli", "prepare", str(events), "--out", str(data), *prep)
        out[kind] = data
    return out


@pytest.fixture(scope="module")
def keras_reference(prepared: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("keras")
    refs = {}
    for kind, data in prepared.items():
        _cli("-m", "bench.keras_run", "--data", str(data), "--out", str(root / kind), "--threads", "2",
             "--interval-s", "1000", *COMMON)
        refs[kind] = json.loads((root / kind / "summary.json").read_text())
    return refs


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("rule", RULES)
def test_rule_with_defaults_learns_as_well_as_plain_keras(prepared, keras_reference, tmp_path, kind, rule):
    data, run = prepared[kind], tmp_path / "run"
    _cli("-m", "runner.cli", "train", str(data), "--out", str(run), "--workers", "2", "--rule", rule, *COMMON,
         "--eval-interval-s", "1000", "--no-progress")
    summary = json.loads((run / "summary.json").read_text())
    plain = keras_reference[kind]
    assert summary["rule"] == rule and summary["workers"] == 2 and summary["lost_workers"] == []
    assert summary["warnings"] == [], summary["warnings"]
    assert _score(summary) >= _score(plain) - TOLERANCE, (
        f"{rule} on {kind}: val/test AUC {summary['val_auc']:.4f}/{summary['test_auc']:.4f} against plain Keras "
        f"{plain['val_auc']:.4f}/{plain['test_auc']:.4f}; effective settings {summary['effective']}")
    # the same samples as plain Keras: every worker its share, in whole batches, for every epoch
    assert summary["samples"] == plain["samples"] or abs(summary["samples"] - plain["samples"]) <= 2 * 64 * 3
    eff = summary["effective"]
    assert summary["learning_rate"] == eff["learning_rate"] and summary["window"] == eff["window"]
    assert summary["run_config"]["rule"] == rule and summary["seed"] == 0
    scores = (run / "test_scores.csv").read_text().splitlines()
    n = len(split_indices(len(__import__("numpy").load(data / "y.npy"))).test)
    assert scores[0] == "id,label,score" and len(scores) - 1 == n
    if rule in ("easgd", "averaging"):
        assert summary["staleness"]["mean"] == 0.0

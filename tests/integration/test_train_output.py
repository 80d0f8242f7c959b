"""What `notpu train` and `fit()` show and leave: phases, then a bar of epochs × training rows; report.png.

Real processes: a parameter server, two workers and the evaluator per run, a tiny GRU on the fading set.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from datasets import write_fading  # noqa: E402

from models.dataset import load_dataset, split_indices  # noqa: E402
from runner.progress import PHASES  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCHS = 3


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 1000 and height > 800


def test_train_shows_phases_then_a_bar_and_lists_what_it_wrote(tmp_path):
    data = write_fading(tmp_path / "fading")
    (data / "baseline.json").write_text(json.dumps({"val_auc": 0.9, "test_auc": 0.9}))  # as `notpu baseline` leaves
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "runner.cli", "train", str(data), "--out", str(run), "--hidden", "16",
                          "--batch-size", "32", "--epochs", str(EPOCHS), "--learning-rate", "0.01",
                          "--eval-interval-s", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    err = out.stderr
    at = [err.find(name) for name in PHASES]
    assert -1 not in at and at == sorted(at), err[-3000:]
    bars = [s for s in re.split(r"[\r\n]", err) if "%|" in s]
    assert bars and err.index(bars[0]) > at[-1], "the bar comes after the phases"
    total = EPOCHS * len(split_indices(800).train)
    totals = {int(m.group(1)) for b in bars if (m := re.search(r"\| *\d+/(\d+) \[", b))}
    assert totals == {total}, bars[-3:]
    summary = json.loads((run / "summary.json").read_text())
    final = re.search(r"([\d.]+) samples/s", bars[-1])
    assert final and float(final.group(1)) == summary["samples_per_s"], (bars[-1], summary["samples_per_s"])
    assert f"{summary['samples']}/{max(total, summary['samples'])}" in bars[-1]
    last = out.stdout.strip().splitlines()[-1]
    names = ["model.keras", "test_scores.csv", "history.jsonl", "summary.json", "report.png", "logs/"]
    assert last == f"wrote {run}: {', '.join(names)}"
    assert all((run / n.rstrip("/")).exists() for n in names)
    assert_png(run / "report.png")


def test_fit_writes_report_png_and_is_silent_without_progress(tmp_path, capsys):
    keras = pytest.importorskip("keras")
    from runner import fit

    d = load_dataset(write_fading(tmp_path / "fading"), mmap=False)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(d.X.shape[1:]), keras.layers.Conv1D(8, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    result = fit(model, (np.asarray(d.X), np.asarray(d.y)), out=tmp_path / "run", workers=2, epochs=2, batch_size=32,
                 eval_interval_s=1.0, progress=False)
    assert_png(result.out / "report.png")
    err = capsys.readouterr().err
    assert not any(name in err for name in PHASES) and "samples/s" not in err, err[-2000:]

"""The progress display and report.png without processes: phases and bar from files, the report's numbers by hand."""
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.report import (best_evaluation, brier, calibration_bins, cumulative_gains, draw_report, gain_at,
                           read_history, read_test_scores, run_title, write_run_report)
from runner.progress import PHASES, Progress, bar_total, samples_per_s

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- the report's numbers, against hand computations -------------------------------------------------------------

def test_cumulative_gains_by_hand():
    # scores sorted: 0.9 (churner), 0.8 (stays), 0.7 (churner), 0.2 (stays), 0.1 (churner): 3 churners in 5
    labels = np.array([0, 1, 1, 0, 1])
    scores = np.array([0.8, 0.9, 0.7, 0.2, 0.1])
    contacted, caught = cumulative_gains(labels, scores)
    np.testing.assert_allclose(contacted, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(caught, [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0])
    assert gain_at(labels, scores, 0.4) == pytest.approx(1 / 3)  # the top 2 customers hold one churner of 3
    assert gain_at(labels, scores, 0.6) == pytest.approx(2 / 3)
    assert gain_at(labels, scores, 0.5) == pytest.approx(1 / 3)  # 2.5 customers: the top 2


def test_cumulative_gains_keeps_the_input_order_of_equal_scores():
    contacted, caught = cumulative_gains(np.array([0, 1]), np.array([0.5, 0.5]))
    np.testing.assert_allclose(caught, [0, 0, 1])


def test_cumulative_gains_needs_a_churner():
    with pytest.raises(ValueError, match="at least one churner"):
        cumulative_gains(np.zeros(4), np.linspace(0, 1, 4))


def test_calibration_bins_by_hand():
    # bin 0 [0, 0.1): 0.05 (0); bin 2: 0.2 (0), 0.25 (1); bin 9: 0.95 (1), 1.0 (1, the last bin holds 1 exactly)
    scores = np.array([0.05, 0.2, 0.25, 0.95, 1.0])
    labels = np.array([0, 0, 1, 1, 1])
    mean_p, rate, counts = calibration_bins(labels, scores, bins=10)
    np.testing.assert_allclose(mean_p, [0.05, 0.225, 0.975])
    np.testing.assert_allclose(rate, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(counts, [1, 2, 2])


def test_brier_by_hand():
    assert brier(np.array([1, 0]), np.array([0.75, 0.5])) == pytest.approx((0.0625 + 0.25) / 2)


def test_best_evaluation_is_the_monitored_one_else_the_highest_val_auc():
    history = [{"val_auc": 0.6}, {"val_auc": 0.8}, {"val_auc": 0.7}]
    assert best_evaluation(history, {}) == 1
    assert best_evaluation(history, {"best": {"monitor": "val_loss", "evaluation": 2}}) == 2
    assert best_evaluation([], {}) is None


def test_samples_per_s_and_bar_total():
    assert samples_per_s(1536, 3.0) == 512.0
    assert samples_per_s(100, 0.0) == 0.0
    assert bar_total(3, 512) == 1536


# --- report.png from a run directory's files -----------------------------------------------------------------------

def fake_run(tmp_path: Path, label_column: bool = True) -> tuple[Path, Path]:
    """A run directory and a DIR as a run and `notpu baseline` leave them (no training: the files only)."""
    from models.dataset import split_indices

    data = tmp_path / "shop"
    data.mkdir()
    n = 200
    rng = np.random.default_rng(0)
    y = (rng.random(n) < 0.3).astype(np.int8)
    np.save(data / "X.npy", rng.standard_normal((n, 5, 2)).astype(np.float32))
    np.save(data / "y.npy", y)
    np.save(data / "ids.npy", np.array([f"c{i:03d}" for i in range(n)]))
    (data / "spec.json").write_text("{}")
    (data / "baseline.json").write_text(json.dumps({"val_auc": 0.81, "test_auc": 0.8}))
    run = tmp_path / "run"
    run.mkdir()
    history = [{"wall_s": 20.0 + i, "samples": 100 * i, "updates": i, "val_loss": 0.6, "val_auc": 0.5 + 0.04 * i}
               for i in range(8)]
    (run / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (run / "summary.json").write_text(json.dumps({"rule": "adag", "workers": 2, "epochs": 3, "hidden": 16,
                                                  "test_auc": 0.79, "run_config": {}}))
    test = split_indices(n).test
    frame = {"id": [f"c{i:03d}" for i in test], "score": np.clip(0.3 + 0.4 * (y[test] - 0.3)
                                                                  + 0.1 * rng.standard_normal(len(test)), 0, 1)}
    if label_column:
        frame = {"id": frame["id"], "label": y[test], "score": frame["score"]}
    pd.DataFrame(frame).to_csv(run / "test_scores.csv", index=False)
    return run, data


def test_report_png_is_drawn_from_the_run_files(tmp_path):
    run, data = fake_run(tmp_path)
    path = write_run_report(run, data)
    assert path == run / "report.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 1000 and height > 800
    assert run_title(json.loads((run / "summary.json").read_text()), run, data) == \
        "GRU 16, adag × 2 workers, 3 epochs · shop · test AUC 0.790"


def test_report_plots_the_computed_curves_the_baseline_and_the_best_evaluation(tmp_path):
    import matplotlib.pyplot as plt

    run, data = fake_run(tmp_path)
    labels, scores = read_test_scores(run, data)
    history = read_history(run)
    fig = draw_report(history, {}, {"val_auc": 0.81, "test_auc": 0.8}, (labels, scores), "t")
    try:
        auc_ax, gains_ax, calib_ax = fig.axes[:3]
        lines = {ax: {line.get_label(): line for line in ax.get_lines()} for ax in (auc_ax, gains_ax, calib_ax)}
        contacted, caught = cumulative_gains(labels, scores)
        np.testing.assert_allclose(lines[gains_ax]["model"].get_xydata(), np.column_stack([contacted, caught]))
        mean_p, rate, _ = calibration_bins(labels, scores)
        model = next(v for k, v in lines[calib_ax].items() if k.startswith("model"))
        np.testing.assert_allclose(model.get_xydata(), np.column_stack([mean_p, rate]))
        baseline = next(v for k, v in lines[auc_ax].items() if k.startswith("LightGBM"))
        assert set(baseline.get_ydata()) == {0.81}
        best = next(v for k, v in lines[auc_ax].items() if k.startswith("best"))
        assert list(best.get_xydata()[0]) == [history[-1]["wall_s"], history[-1]["val_auc"]]  # rising: the last
        assert auc_ax.get_xlim()[0] == 0  # start-up is on the axis
    finally:
        plt.close(fig)


def test_report_takes_the_labels_from_the_dir_when_the_scores_have_none(tmp_path):
    run, data = fake_run(tmp_path, label_column=False)
    labels, scores = read_test_scores(run, data)
    from models.dataset import split_indices

    np.testing.assert_array_equal(labels, np.load(data / "y.npy")[split_indices(200).test])
    assert len(scores) == len(labels)
    write_run_report(run, data)
    assert (run / "report.png").read_bytes()[:8] == PNG_MAGIC


# --- the phases and the bar, from the files the run's processes write ---------------------------------------------

def bar_states(text: str) -> list[str]:
    return [s for s in re.split(r"[\r\n]", text) if "%|" in s]


def test_progress_phases_in_order_then_a_bar_ending_at_the_summarys_figures(tmp_path):
    (tmp_path / "logs").mkdir()
    stream = io.StringIO()
    import time

    p = Progress(True, "adag × 2", bar_total(3, 512), tmp_path, started_at=time.time(), stream=stream)
    p.phase(0)
    p.phase(1, "2 local worker(s) and the evaluator")
    log = tmp_path / "logs" / "pserver.log"
    log.write_text("13:04:57 INFO pserver.coordinator: worker 0 of 2 joined (local-0)\n13:05:13 INFO pserver.coor")
    p.poll()
    with open(log, "a") as f:  # the line's end arrives later: it is read once whole
        f.write("dinator: model of 20 tensors, 2866 floats, over 1 shard(s)\n")
    p.poll()
    with open(tmp_path / "history.jsonl", "w") as f:
        f.write(json.dumps({"wall_s": 5.0, "samples": 0, "updates": 0, "val_auc": 0.5}) + "\n")
        f.write(json.dumps({"wall_s": 7.0, "samples": 768, "updates": 12, "val_auc": 0.8}) + "\n")
    p.poll()
    p.close({"samples": 1536, "train_s": 2.9, "val_auc": 0.9, "test_auc": 0.88})
    text = stream.getvalue()
    at = [text.index(name) for name in PHASES]
    assert at == sorted(at), text
    bars = bar_states(text)
    assert bars and text.index(PHASES[-1]) < text.index(bars[0])
    assert all(re.search(r" (\d+)/1536 ", b) for b in bars), bars
    assert bars[-1].count("1536/1536") == 1 and "100%" in bars[-1]
    assert f"{samples_per_s(1536, 2.9):.2f} samples/s" in bars[-1]


def test_progress_disabled_writes_nothing(tmp_path):
    stream = io.StringIO()
    p = Progress(False, "adag × 2", 10, tmp_path, started_at=0.0, stream=stream)
    p.phase(3)
    (tmp_path / "history.jsonl").write_text(json.dumps({"wall_s": 1.0, "samples": 5, "updates": 1,
                                                         "val_auc": 0.5}) + "\n")
    p.poll()
    p.close({"samples": 5, "train_s": 1.0, "val_auc": 0.5, "test_auc": 0.5})
    p.done("drawing report.png")
    assert stream.getvalue() == ""


def test_title_of_a_fit_on_arrays(tmp_path):
    summary = {"rule": "downpour", "workers": 3, "epochs": 2, "test_auc": 0.91234, "run_config": {"architecture": "{}"}}
    assert run_title(summary, tmp_path, tmp_path / "data") == \
        "your model, downpour × 3 workers, 2 epochs · (X, y) arrays · test AUC 0.912"


def test_report_without_test_scores_says_so(tmp_path):
    run, data = fake_run(tmp_path)
    (run / "test_scores.csv").unlink()
    write_run_report(run, data)
    assert (run / "report.png").read_bytes()[:8] == PNG_MAGIC


def test_title_names_a_dir_called_data_with_its_parent(tmp_path):
    summary = {"rule": "adag", "workers": 2, "epochs": 10, "hidden": 64, "test_auc": 0.9}
    assert " · demo/data · " in run_title(summary, tmp_path / "run", tmp_path / "demo" / "data")
